//! The deployment files cannot run here (no Kubernetes, no docker), so this checks what can be
//! checked: every YAML and JSON file parses, the systemd unit reloads with SIGHUP, the shell
//! script is valid bash, every stratus config they hold or embed passes `stratus check`, and
//! every metric the dashboard and the alerts query is one a node exports.

use std::collections::BTreeSet;

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::process::Command;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_stratus"))
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every file under `dir`, recursively, sorted.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("deploy dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// Runs `stratus check` on a config as deployed, with its deployment-time parts filled in:
/// pod name and IP placeholders, and the secret and token files (mounted at run time) inline.
fn check_config(origin: &str, text: &str) {
    let filled: String = text
        .replace("@POD_NAME@", "pod-0")
        .replace("@POD_IP@", "10.0.0.7")
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("secret_file") {
                "secret = \"0123456789abcdef0123456789abcdef-deploy\"".to_string()
            } else if l.trim_start().starts_with("token_file") {
                "token = \"admin-token-0123456789-deploy\"".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("stratus.toml");
    std::fs::write(&path, filled).expect("write");
    let out = Command::new(bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("stratus check runs");
    assert!(
        out.status.success(),
        "{origin}: stratus check failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every `stratus_…` metric name in `text`, without histogram suffixes.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (i, _) in text.match_indices("stratus_") {
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name)
            .to_string();
        names.insert(base);
    }
    names
}

#[test]
fn every_deployment_file_parses_and_every_config_passes_check() {
    let mut configs = 0;
    let mut queried = BTreeSet::new();
    for path in files(&deploy_dir()) {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(&path).expect("readable");
        match path.extension().and_then(|e| e.to_str()) {
            Some("yml" | "yaml") => {
                for doc in serde_yaml::Deserializer::from_str(&text) {
                    let value = serde_yaml::Value::deserialize(doc)
                        .unwrap_or_else(|e| panic!("{name}: {e}"));
                    // ConfigMaps embed node configs under data."stratus.toml".
                    if let Some(toml) = value
                        .get("data")
                        .and_then(|d| d.get("stratus.toml"))
                        .and_then(|t| t.as_str())
                    {
                        check_config(&name, toml);
                        configs += 1;
                    }
                }
                queried.extend(metric_names(&text));
            }
            Some("json") => {
                serde_json::from_str::<serde_json::Value>(&text)
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                queried.extend(metric_names(&text));
            }
            Some("toml") => {
                check_config(&name, &text);
                configs += 1;
            }
            Some("service") => {
                assert!(text.contains("[Service]"), "{name}");
                // systemd runs every ExecReload= in order: one of them sends SIGHUP.
                assert!(
                    text.lines()
                        .any(|l| l.starts_with("ExecReload=") && l.contains("-HUP")),
                    "{name}: no ExecReload sends SIGHUP"
                );
            }
            Some("sh") => {
                let ok = Command::new("bash")
                    .arg("-n")
                    .arg(&path)
                    .status()
                    .expect("bash");
                assert!(ok.success(), "{name}: bash -n failed");
            }
            _ => {}
        }
    }
    assert!(configs >= 5, "only {configs} configs found");

    // What a node exports: every name the dashboard and the alerts query must be among them.
    let metrics = stratus_node::metrics::Metrics::new("deploy-test").expect("metrics");
    let exported: BTreeSet<String> = metrics.names().iter().cloned().collect();
    assert!(queried.len() >= 10, "only {queried:?} queried");
    let unknown: Vec<_> = queried.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "queried but never exported: {unknown:?}"
    );
}
