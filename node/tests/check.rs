//! `stratus check` as an operator meets it: the README's own example config passes, and a
//! broken file is reported one problem per line, each naming the file.

use std::path::Path;
use std::process::Command;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_stratus"))
}

fn check(text: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("node.toml");
    std::fs::write(&path, text).expect("write");
    let out = Command::new(bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("stratus check runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_readmes_example_config_passes() {
    let readme = include_str!("../../README.md");
    let section = readme
        .split("### Config")
        .nth(1)
        .expect("README has a Config section");
    let block = section
        .split("```toml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a toml block");
    let (code, stdout, stderr) = check(block);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.trim_end().ends_with(": ok"), "{stdout}");
}

#[test]
fn every_problem_is_one_line_naming_the_file() {
    for text in [
        "[node\nname = \"x\"\n",
        "[node]\nname = x\n",
        "[node]\nname = \"x\"\nrole = \"lower\"\nlisten = \"127.0.0.1:1\"\nadmin_listen = \"127.0.0.1:2\"\n[cache]\ncapacity = 256\n",
    ] {
        let (code, _, stderr) = check(text);
        assert_eq!(code, 64, "{stderr}");
        assert!(!stderr.is_empty());
        for line in stderr.lines() {
            assert!(line.contains("node.toml: "), "a line without its file: {line:?}\n{stderr}");
        }
    }
}
