//! `cargo xtask image`: builds ./Dockerfile with the first container engine that answers.
use std::process::{Command, Stdio};

use anyhow::bail;

use crate::{status, step, workspace_root};

/// What deploy/ and the Helm chart pull (the deploy test holds them to it).
pub const REPOSITORY: &str = "ghcr.io/droptrace/droptrace";

/// Engine, and its build subcommand. The probe (`ENGINE info`) fails without a daemon or
/// service to talk to, also when only a client is installed.
const ENGINES: [(&str, &str); 3] = [("docker", "build"), ("podman", "build"), ("buildah", "bud")];

fn reachable(engine: &str) -> bool {
    Command::new(engine)
        .arg("info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn run(tag: Option<&str>) -> anyhow::Result<()> {
    let tag = tag.map_or_else(
        || format!("{REPOSITORY}:{}", env!("CARGO_PKG_VERSION")),
        str::to_string,
    );
    let Some((engine, build)) = ENGINES.into_iter().find(|(e, _)| reachable(e)) else {
        bail!(
            "no container engine is available (`docker info`, `podman info` and `buildah info` all failed)"
        );
    };
    step(&format!("{engine} {build} -t {tag} (Dockerfile)"));
    status(Command::new(engine).current_dir(workspace_root()).args([
        build,
        "-t",
        &tag,
        "-f",
        "Dockerfile",
        ".",
    ]))?;
    step(&format!(
        "built {tag}; push it where the cluster pulls from, or set image in deploy/"
    ));
    Ok(())
}
