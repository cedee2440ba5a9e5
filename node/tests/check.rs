//! `stratus check` as an operator meets it: the README's own example config passes, and a
//! broken file is reported one problem per line as `FILE:LINE: key: message` (a syntax error
//! `FILE:LINE:COLUMN: message`), with "did you mean" for a misspelt key or section.

use std::path::Path;
use std::process::Command;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_stratus"))
}

/// Writes `body` to `dir/file` with permissions `mode`.
fn write(dir: &Path, file: &str, body: &str, mode: u32) {
    let path = dir.join(file);
    std::fs::write(&path, body).expect("write");
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(mode))
        .expect("chmod");
}

/// `stratus check` on the config at `path`: exit code, stdout, stderr.
fn run_check(path: &Path) -> (i32, String, String) {
    let out = Command::new(bin())
        .args(["check", "--config"])
        .arg(path)
        .output()
        .expect("stratus check runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn check(text: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "node.toml", text, 0o644);
    // The secret and token files the README's example names, private as `stratus check` demands.
    // And the certificates it names: the fleet's for edge-1, a site's for clients.
    let pki = stratus_chaos::FleetPki::new().expect("CA");
    let (node, site) = (
        pki.issue("edge-1").expect("cert"),
        pki.issue("example.test").expect("cert"),
    );
    let (ca, crl) = (pki.ca_pem(), pki.crl(&[]).expect("crl"));
    for (file, body, mode) in [
        ("fleet-ca.pem", ca.as_str(), 0o644),
        ("node.pem", &node.cert, 0o644),
        ("site.pem", &site.cert, 0o644),
        ("fleet.crl", &crl, 0o644),
        (
            "tier-secret",
            "0123456789abcdef0123456789abcdef-readme\n",
            0o600,
        ),
        ("admin-token", "admin-token-0123456789-readme\n", 0o600),
        ("node.key", &node.key, 0o600),
        ("site.key", &site.key, 0o600),
    ] {
        write(dir.path(), file, body, mode);
    }
    run_check(&dir.path().join("node.toml"))
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

/// Certificates that would fail a handshake are refused by `stratus check` (and so by a
/// reload), each at its key: a key of another certificate, a certificate of another CA, one
/// the CRL revokes, one that does not name the node, a key open to other users.
#[test]
fn tls_material_that_cannot_work_is_refused_at_its_key() {
    let pki = stratus_chaos::FleetPki::new().expect("CA");
    let other_ca = stratus_chaos::FleetPki::new().expect("another CA");
    let mine = pki.issue("edge-1").expect("cert");
    let someone = pki.issue("edge-2").expect("cert");
    let foreign = other_ca.issue("edge-1").expect("cert");
    let cases = [
        (
            "key of another certificate",
            mine.cert.clone(),
            someone.key.clone(),
            String::new(),
            0o600,
            "tier.tls.key",
        ),
        (
            "another CA",
            foreign.cert.clone(),
            foreign.key.clone(),
            String::new(),
            0o600,
            "tier.tls.cert",
        ),
        (
            "revoked",
            mine.cert.clone(),
            mine.key.clone(),
            pki.crl(&[mine.serial]).expect("crl"),
            0o600,
            "tier.tls.cert",
        ),
        (
            "another name",
            someone.cert.clone(),
            someone.key.clone(),
            String::new(),
            0o600,
            "tier.tls.cert",
        ),
        (
            "key open to others",
            mine.cert.clone(),
            mine.key.clone(),
            String::new(),
            0o644,
            "tier.tls.key",
        ),
    ];
    for (what, cert, key, crl, mode, at) in cases {
        let dir = tempfile::tempdir().expect("tempdir");
        let crl = if crl.is_empty() {
            pki.crl(&[]).expect("crl")
        } else {
            crl
        };
        for (file, body, mode) in [
            ("ca.pem", pki.ca_pem().as_str(), 0o644),
            ("node.pem", &cert, 0o644),
            ("node.key", &key, mode),
            ("fleet.crl", &crl, 0o644),
        ] {
            write(dir.path(), file, body, mode);
        }
        write(
            dir.path(),
            "node.toml",
            "[node]\nname = \"edge-1\"\nrole = \"lower\"\nlisten = \"127.0.0.1:1\"\n\n[tier]\nsecret = \"0123456789abcdef0123456789abcdef\"\nupper = [\"127.0.0.1:3\"]\n\n[tier.tls]\nca = \"ca.pem\"\ncert = \"node.pem\"\nkey = \"node.key\"\ncrl = \"fleet.crl\"\n\n[[origin]]\nhost = \"example.test\"\naddress = \"127.0.0.1:4\"\n",
            0o644,
        );
        let (code, _, stderr) = run_check(&dir.path().join("node.toml"));
        assert_eq!(code, 64, "{what}: {stderr}");
        assert!(stderr.contains(&format!(": {at}: ")), "{what}: {stderr}");
    }
}
