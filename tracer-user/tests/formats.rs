//! Golden files and JSON Schema validation for every event kind in every format, plus
//! the Community ID carried by ECS and OCSF. `UPDATE_GOLDEN=1` rewrites the golden files
//! (review the diff: it is the wire contract).
mod output_common;

use std::path::{Path, PathBuf};

use droptrace::encode::{self, Format, community_id};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn schema_path(format: Format, kind: &str) -> PathBuf {
    let s = root().join("schema");
    match format {
        Format::Native => s.join(format!("droptrace.v1/{kind}.schema.json")),
        Format::Ecs => s.join("ecs/droptrace.schema.json"),
        Format::Ocsf => s.join("ocsf/network_activity.schema.json"),
        Format::Text | Format::TextColor => unreachable!("text has no schema"),
    }
}

fn validator(path: &Path) -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn validate(path: &Path, v: &Value, what: &str) {
    let val = validator(path);
    let errors: Vec<String> = val
        .iter_errors(v)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{what} does not validate against {}:\n{}",
        path.display(),
        errors.join("\n")
    );
}

#[test]
fn golden_lines_match_and_validate() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut mismatches = Vec::new();
    let mut buf = Vec::new();
    for format in Format::ALL {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/golden")
            .join(format.as_str());
        std::fs::create_dir_all(&dir).unwrap();
        for (name, event) in output_common::samples() {
            encode::encode(format, &event, &mut buf);
            let line = String::from_utf8(buf.clone()).unwrap();
            let v: Value = serde_json::from_str(&line).unwrap();
            validate(
                &schema_path(format, event.kind.as_str()),
                &v,
                &format!("{format} {name}"),
            );
            let golden = dir.join(format!("{name}.json"));
            if update {
                std::fs::write(&golden, format!("{line}\n")).unwrap();
            } else {
                let want = std::fs::read_to_string(&golden).unwrap_or_default();
                if want.trim_end() != line {
                    mismatches.push(format!(
                        "{}:\n  want {}\n  got  {line}",
                        golden.display(),
                        want.trim_end()
                    ));
                }
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "encoded lines differ from the golden files (UPDATE_GOLDEN=1 to accept):\n{}",
        mismatches.join("\n")
    );
}

#[test]
fn native_round_trips() {
    let mut buf = Vec::new();
    for (name, mut event) in output_common::samples() {
        encode::native(&event, &mut buf);
        let back: droptrace::event::Event = serde_json::from_slice(&buf).unwrap();
        // The encoder adds the flow's Community ID when the event lacks it; a storm's folded
        // flow (source unspecified) has none.
        if let Some(f) = event.flow.as_mut()
            && !f.src_ip.is_unspecified()
        {
            assert!(back.flow.as_ref().unwrap().community_id.is_some(), "{name}");
            f.community_id = encode::community_id::tcp(f.src_ip, f.src_port, f.dst_ip, f.dst_port);
        }
        assert_eq!(back, event, "{name}");
    }
}

/// The schemas are strict enough to catch what matters: wrong enum, missing section.
#[test]
fn schemas_reject_broken_events() {
    let (_, drop) = output_common::samples().remove(0);
    let mut v = serde_json::to_value(&drop).unwrap();
    v["drop"]["reason"] = "lowercase not allowed".into();
    assert!(!validator(&schema_path(Format::Native, "drop")).is_valid(&v));
    let mut v = serde_json::to_value(&drop).unwrap();
    v.as_object_mut().unwrap().remove("flow");
    assert!(!validator(&schema_path(Format::Native, "drop")).is_valid(&v));
    let mut v = serde_json::to_value(&drop).unwrap();
    v["unknown_field"] = 1.into();
    assert!(!validator(&schema_path(Format::Native, "drop")).is_valid(&v));

    let mut buf = Vec::new();
    encode::encode(Format::Ocsf, &drop, &mut buf);
    let mut v: Value = serde_json::from_slice(&buf).unwrap();
    v.as_object_mut().unwrap().remove("severity_id");
    assert!(!validator(&schema_path(Format::Ocsf, "drop")).is_valid(&v));
    encode::encode(Format::Ecs, &drop, &mut buf);
    let mut v: Value = serde_json::from_slice(&buf).unwrap();
    v.as_object_mut().unwrap().remove("network");
    assert!(!validator(&schema_path(Format::Ecs, "drop")).is_valid(&v));
}

#[test]
fn ecs_and_ocsf_carry_the_community_id() {
    let mut buf = Vec::new();
    for (name, event) in output_common::samples() {
        let Some(f) = &event.flow else { continue };
        if f.src_ip.is_unspecified() {
            // A storm's folded flow stands for many: no Community ID anywhere.
            encode::encode(Format::Ecs, &event, &mut buf);
            let v: Value = serde_json::from_slice(&buf).unwrap();
            assert!(v["network"].get("community_id").is_none(), "ecs {name}");
            assert!(v.get("source").is_none(), "ecs {name}");
            continue;
        }
        let want = community_id::tcp(f.src_ip, f.src_port, f.dst_ip, f.dst_port).unwrap();
        encode::encode(Format::Ecs, &event, &mut buf);
        let v: Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(v["network"]["community_id"], want.as_str(), "ecs {name}");
        encode::encode(Format::Ocsf, &event, &mut buf);
        let v: Value = serde_json::from_slice(&buf).unwrap();
        assert_eq!(
            v["connection_info"]["community_uid"],
            want.as_str(),
            "ocsf {name}"
        );
    }
}

/// Every kind in every format, one golden file each.
#[test]
fn golden_set_covers_every_kind() {
    let kinds: std::collections::BTreeSet<_> = output_common::samples()
        .iter()
        .map(|(_, e)| e.kind.as_str())
        .collect();
    assert_eq!(
        kinds.into_iter().collect::<Vec<_>>(),
        [
            "connect",
            "conntrack",
            "drop",
            "lost",
            "retransmit",
            "stall",
            "storm",
            "tcp_state",
            "tns"
        ]
    );
}

/// `--format text`: one readable line per event (an incident's diagnosis, fix and fix check
/// under it), golden files like the JSON formats; colour only in `TextColor`.
#[test]
fn text_golden_lines_match() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/text");
    std::fs::create_dir_all(&dir).unwrap();
    let mut mismatches = Vec::new();
    let mut buf = Vec::new();
    let mut color = Vec::new();
    for (name, event) in output_common::samples() {
        encode::encode(Format::Text, &event, &mut buf);
        let text = String::from_utf8(buf.clone()).unwrap();
        assert!(!text.contains('\x1b'), "{name}: no colour in plain text");
        assert!(!text.ends_with('\n'), "{name}: the sink adds the newline");
        let first = text.lines().next().unwrap();
        let b = first.as_bytes();
        assert!(
            b.len() > 20 && b[6] == b' ' && b[9] == b':' && b[15] == b'.' && b[19] == b' ',
            "{name}: the time first (`Nov 25 10:00:05.250`): {first}"
        );
        // Every line after the first is indented under it.
        assert!(
            text.lines().skip(1).all(|l| l.starts_with("    ")),
            "{name}:\n{text}"
        );
        encode::encode(Format::TextColor, &event, &mut color);
        let colored = String::from_utf8(color.clone()).unwrap();
        assert!(colored.contains("\x1b["), "{name}: colour on a terminal");
        let stripped = strip_ansi(&colored);
        assert_eq!(stripped, text, "{name}: colour changes nothing but colour");
        let golden = dir.join(format!("{name}.txt"));
        if update {
            std::fs::write(&golden, format!("{text}\n")).unwrap();
        } else {
            let want = std::fs::read_to_string(&golden).unwrap_or_default();
            if want.trim_end_matches('\n') != text {
                mismatches.push(format!(
                    "{}:\n  want {want}\n  got  {text}",
                    golden.display()
                ));
            }
        }
    }
    assert!(
        mismatches.is_empty(),
        "text lines differ from the golden files (UPDATE_GOLDEN=1 to accept):\n{}",
        mismatches.join("\n")
    );
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for d in chars.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
