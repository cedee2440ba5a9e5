//! The fuzz corpus as regression tests on stable: every input in `fuzz/corpus/<target>/` (the
//! seeds, and any crash a nightly fuzzing run found and committed) goes through the same
//! function its cargo-fuzz target calls, so a fixed finding stays fixed without nightly.

use std::path::{Path, PathBuf};

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{target}: an empty corpus tests nothing");
    files
}

fn replay(target: &str, run: fn(&[u8])) {
    for file in corpus(target) {
        let data = std::fs::read(&file).expect("read");
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "{target}: {} fails", file.display());
    }
}

#[test]
fn control_context_corpus() {
    replay("control_context", stratus_node::fuzzing::control_context);
}

#[test]
fn config_corpus() {
    replay("config", stratus_node::fuzzing::config);
}

#[test]
fn admission_corpus() {
    replay("admission", stratus_node::fuzzing::admission);
}

#[test]
fn cache_key_corpus() {
    replay("cache_key", stratus_node::fuzzing::cache_key);
}
