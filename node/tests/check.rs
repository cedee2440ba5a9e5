//! `stratus check` as an operator meets it: the README's own example config passes, and a
//! broken file is reported one problem per line as `FILE:LINE: key: message` (a syntax error
//! `FILE:LINE:COLUMN: message`), with "did you mean" for a misspelt key or section.

use std::path::Path;
use std::process::Command;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_stratus"))
}

fn check(text: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("node.toml");
    std::fs::write(&path, text).expect("write");
    // The secret and token files the README's example names, private as `stratus check` demands.
    for (file, body) in [
        ("tier-secret", "0123456789abcdef0123456789abcdef-readme\n"),
        ("admin-token", "admin-token-0123456789-readme\n"),
    ] {
        let path = dir.path().join(file);
        std::fs::write(&path, body).expect("write");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .expect("chmod");
    }
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
            assert!(line.contains("node.toml:"), "a line without its file: {line:?}\n{stderr}");
        }
    }
}

#[test]
fn problems_point_at_their_line_and_suggest_the_key_meant() {
    let text = "[node]\nname = \"x\"\nrole = \"lower\"\nlisten = \"127.0.0.1:1\"\nadmin_listen = \"127.0.0.1:2\"\nthred = 4\n\n[cache]\ncapacity = 256\n\n[[origin]]\nhost = \"a.test\"\naddress = \"127.0.0.1:3\"\n\n[[origin]]\nhost = \"b.test\"\nadress = \"127.0.0.1:4\"\n\n[tracng]\n";
    let (code, _, stderr) = check(text);
    assert_eq!(code, 64, "{stderr}");
    for want in [
        "node.toml:6: node.thred: unknown key; did you mean \"threads\"?",
        "node.toml:9: cache.capacity: must name its unit",
        "node.toml:17: origin[1].adress: unknown key; did you mean \"address\"?",
        "node.toml:19: tracng: unknown section; did you mean [tracing]?",
    ] {
        assert!(
            stderr.lines().any(|l| l
                .split_once("/node.toml")
                .is_some_and(|(_, rest)| { format!("node.toml{rest}").starts_with(want) })),
            "missing {want:?} in:\n{stderr}"
        );
    }
    let (_, _, stderr) = check("[node\nname = \"x\"\n");
    assert!(stderr.contains("node.toml:1:"), "{stderr}");
}
