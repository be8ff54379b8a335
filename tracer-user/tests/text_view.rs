//! `--format text` through the real binary: the default on a terminal (a pseudo-terminal from
//! util-linux `script`), NDJSON when stdout is not one, `--format` always winning, colour only
//! on a terminal (and not with NO_COLOR), plain text into files, and the combinations refused.
mod output_common;

use std::process::Command;

use droptrace::encode::{self, Format};
use output_common::*;

fn input() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tmpdir();
    let path = dir.path().join("in.ndjson");
    let events: Vec<_> = samples().into_iter().map(|(_, e)| e).collect();
    std::fs::write(&path, ndjson(&events)).unwrap();
    (dir, path)
}

/// `droptrace replay ARGS` with stdout on a pseudo-terminal; what the terminal showed.
fn on_terminal(args: &str, envs: &[(&str, &str)]) -> String {
    let (_dir, path) = input();
    let cmd = format!(
        "{} replay --input {} --node-name n {args}",
        bin().display(),
        path.display()
    );
    let mut c = Command::new("script");
    c.args(["-qec", &cmd, "/dev/null"])
        .env("DROPTRACE_LOG", "warn")
        .env_remove("NO_COLOR");
    for (k, v) in envs {
        c.env(k, v);
    }
    let out = c.output().expect("util-linux script");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).replace("\r\n", "\n")
}

fn text_of_samples(format: Format) -> String {
    let mut buf = Vec::new();
    samples()
        .iter()
        .map(|(_, e)| {
            encode::encode(format, e, &mut buf);
            String::from_utf8(buf.clone()).unwrap() + "\n"
        })
        .collect()
}

#[test]
fn text_is_the_default_on_a_terminal_with_colour() {
    let shown = on_terminal("", &[]);
    assert!(shown.contains("\x1b[1;31mSTALL"), "{shown}");
    assert!(
        shown.starts_with(&text_of_samples(Format::TextColor)),
        "{shown}"
    );
    println!("{}", text_of_samples(Format::Text));
}

#[test]
fn no_color_keeps_the_text_plain() {
    let shown = on_terminal("", &[("NO_COLOR", "1")]);
    assert!(shown.starts_with(&text_of_samples(Format::Text)), "{shown}");
    assert!(!shown.contains('\x1b'));
}

#[test]
fn format_always_wins() {
    let shown = on_terminal("--format native", &[]);
    let first = shown.lines().next().unwrap();
    let v: serde_json::Value = serde_json::from_str(first).expect("NDJSON on a terminal too");
    assert_eq!(v["schema"], "droptrace.v1");
}

#[test]
fn ndjson_when_stdout_is_not_a_terminal() {
    let (_dir, path) = input();
    let out = droptrace()
        .args(["replay", "--input"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), samples().len());
    for l in text.lines() {
        serde_json::from_str::<serde_json::Value>(l).expect("one JSON object a line");
    }
}

#[test]
fn text_into_a_file_is_plain() {
    let (dir, path) = input();
    let file = dir.path().join("out.txt");
    let out = droptrace()
        .args(["replay", "--format", "text", "-o"])
        .arg(format!("file:{}", file.display()))
        .arg("--input")
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        text_of_samples(Format::Text)
    );
}

#[test]
fn text_is_refused_for_network_outputs_and_spools() {
    for args in [
        vec!["--format", "text", "-o", "tcp://127.0.0.1:9"],
        vec!["--format", "text", "-o", "otlp://127.0.0.1:9"],
        vec!["--format", "text", "--spool-dir", "/tmp/x"],
    ] {
        let out = droptrace()
            .args(["replay", "--input", "/dev/null"])
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(
            err.contains("--format text is for terminals and files"),
            "{err}"
        );
    }
}
