use super::*;

const GOOD: &str = r#"
[node]
name = "edge-1"
role = "lower"
listen = "127.0.0.1:8080"
admin_listen = "127.0.0.1:9080"

[cache]
capacity = "64MiB"
max_object_size = "1MiB"

[[origin]]
host = "example.test"
address = "127.0.0.1:9000"
"#;

fn keys(problems: &[Problem]) -> Vec<&str> {
    problems.iter().map(|p| p.key.as_str()).collect()
}

#[test]
fn a_good_config_parses_with_defaults() {
    let c = Config::parse(GOOD, Path::new(".")).expect("valid");
    assert_eq!(c.node.name, "edge-1");
    assert_eq!(c.node.role, Role::Lower);
    assert_eq!(c.cache.capacity, 64 << 20);
    assert_eq!(c.cache.max_object_size, 1 << 20);
    assert_eq!(c.node.threads, DEFAULT_THREADS);
    assert!(c.tier.is_none());
    assert_eq!(
        c.origin_for("EXAMPLE.test:8080")
            .map(|o| o.address.as_str()),
        Some("127.0.0.1:9000")
    );
    assert!(c.origin_for("other.test").is_none());
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = r#"
[node]
name = "edge 1"
role = "middle"
listen = "nowhere"
admin_listen = "127.0.0.1:9080"
colour = "blue"

[cache]
capacity = "lots"
max_object_size = 12

[tier]
secret = "short"
upper = ["127.0.0.1:8180", { addr = "127.0.0.1:8181", weight = 0 }]
on_all_upper_down = "panic"

[[origin]]
host = "Example.test:80"
address = "nowhere"
"#;
    let problems = Config::parse(text, Path::new(".")).expect_err("invalid");
    let k = keys(&problems);
    for want in [
        "node.name",
        "node.role",
        "node.listen",
        "node.colour",
        "cache.capacity",
        "tier.secret",
        "tier.upper[1]",
        "tier.on_all_upper_down",
        "origin[0].host",
        "origin[0].address",
    ] {
        assert!(k.contains(&want), "missing {want} in {k:?}");
    }
}

#[test]
fn upper_role_needs_a_tier_section() {
    let text = GOOD.replace("role = \"lower\"", "role = \"upper\"");
    let problems = Config::parse(&text, Path::new(".")).expect_err("invalid");
    assert_eq!(keys(&problems), vec!["tier"]);
}

#[test]
fn broken_toml_is_one_problem_with_a_line() {
    let problems = Config::parse("[node\nname=", Path::new(".")).expect_err("invalid");
    assert_eq!(problems.len(), 1);
    assert!(problems[0].key.starts_with("line"), "{:?}", problems[0]);
}

#[test]
fn sizes_and_durations() {
    assert_eq!(parse_size("64MiB"), Some(64 << 20));
    assert_eq!(parse_size("10"), Some(10));
    assert_eq!(parse_size("1GiB"), Some(1 << 30));
    assert_eq!(parse_size("1GB"), None);
    assert_eq!(parse_size("99999999999999GiB"), None);
    assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
    assert_eq!(parse_duration("2s"), Some(Duration::from_secs(2)));
    assert_eq!(parse_duration("2"), None);
    assert_eq!(parse_duration("s"), None);
}

#[test]
fn hosts_normalise() {
    assert_eq!(
        normalize_host("Example.TEST:8080").as_deref(),
        Some("example.test")
    );
    assert_eq!(normalize_host("[::1]:80").as_deref(), Some("[::1]"));
    assert_eq!(
        normalize_host("[2001:DB8::1]").as_deref(),
        Some("[2001:db8::1]")
    );
    assert_eq!(normalize_host("::1"), None, "unbracketed IPv6 is ambiguous");
    assert_eq!(normalize_host("[::1]x"), None);
    assert_eq!(normalize_host("[example.test]"), None);
    assert_eq!(normalize_host("example.test:http"), None);
    assert_eq!(normalize_host("bad host"), None);
    assert_eq!(normalize_host(""), None);
    assert_eq!(normalize_host("a/b"), None);
}

const TIERED: &str = r#"
[node]
name = "edge-1"
role = "lower"
listen = "127.0.0.1:8080"
admin_listen = "127.0.0.1:9080"

[tier]
secret = "0123456789abcdef0123456789abcdef"
upper = ["127.0.0.1:8180", { addr = "127.0.0.1:8181", weight = 2, name = "up-2" }]
"#;

#[test]
fn tier_timeouts_nest_around_the_origins() {
    // Not set: derived above the longest origin wait, and explained.
    let origin =
        "\n[[origin]]\nhost = \"a.test\"\naddress = \"127.0.0.1:9000\"\nread_timeout = \"10s\"\n";
    let c = Config::parse(&format!("{TIERED}{origin}"), Path::new(".")).expect("valid");
    let t = c.tier.as_ref().expect("tier");
    assert_eq!(
        t.read_timeout,
        Duration::from_secs(2 + 10) + TIER_NEST_MARGIN
    );
    assert!(t.read_timeout_derived);
    assert!(
        c.notes()[0].starts_with("tier.read_timeout: not set; derived"),
        "{:?}",
        c.notes()
    );
    assert_eq!(t.upper[0].recipient(), "127.0.0.1:8180");
    assert_eq!(t.upper[1].recipient(), "up-2");
    assert_eq!((t.rise, t.probe_timeout), (2, Duration::from_secs(1)));
    // Set, but not longer than an upper's wait for its origin: refused, saying why.
    let short = TIERED.replace("upper = [", "read_timeout = \"12s\"\nupper = [");
    let problems = Config::parse(&format!("{short}{origin}"), Path::new(".")).expect_err("nests");
    assert_eq!(keys(&problems), vec!["tier.read_timeout"]);
    assert!(
        problems[0].message.contains("12s"),
        "{}",
        problems[0].message
    );
    let long = TIERED.replace("upper = [", "read_timeout = \"13s\"\nupper = [");
    assert!(Config::parse(&format!("{long}{origin}"), Path::new(".")).is_ok());
    // With default origins (2 s + 30 s), the old 5 s default would not nest.
    let c = Config::parse(
        &format!("{TIERED}\n[[origin]]\nhost = \"a.test\"\naddress = \"127.0.0.1:9000\"\n"),
        Path::new("."),
    )
    .expect("valid");
    assert_eq!(c.tier.expect("tier").read_timeout, Duration::from_secs(35));
}

#[test]
fn max_object_size_fits_the_share_fills_may_hold() {
    let small = GOOD
        .replace("max_object_size = \"1MiB\"\n", "")
        .replace("64MiB", "8MiB");
    let c = Config::parse(&small, Path::new(".")).expect("valid");
    assert_eq!(
        c.cache.max_object_size,
        2 << 20,
        "defaults to a quarter of capacity"
    );
    let big = GOOD.replace("max_object_size = \"1MiB\"", "max_object_size = \"32MiB\"");
    let problems = Config::parse(&big, Path::new(".")).expect_err("too large");
    assert_eq!(keys(&problems), vec!["cache.max_object_size"]);
}

#[test]
fn a_reload_refuses_what_needs_a_restart_and_nothing_else() {
    let running = Config::parse(GOOD, Path::new(".")).expect("valid");
    let with = |from: &str, to: &str| {
        assert!(GOOD.contains(from), "{from}");
        Config::parse(&GOOD.replace(from, to), Path::new(".")).expect("valid")
    };
    // Live: origins, cache limits but capacity, new sections such as [dns].
    for (from, to) in [
        ("127.0.0.1:9000", "127.0.0.1:9001"),
        ("max_object_size = \"1MiB\"", "max_object_size = \"2MiB\""),
        (
            "[[origin]]",
            "[dns]\nnameservers = [\"127.0.0.1\"]\n\n[[origin]]\nconnect_timeout = \"1s\"",
        ),
    ] {
        let next = with(from, to);
        assert!(running.reload_refusals(&next).is_empty(), "{to}");
    }
    // A secret rotation, step by step: accept a new secret, sign with it, drop the old one.
    let upper = |tier: &str| {
        let text = GOOD.replace("role = \"lower\"", "role = \"upper\"");
        let text = text.replace("[[origin]]", &format!("[tier]\n{tier}\n\n[[origin]]"));
        Config::parse(&text, Path::new(".")).expect("valid")
    };
    let (old, new) = (
        "0123456789abcdef0123456789abcdef",
        "fedcba9876543210fedcba9876543210",
    );
    let steps = [
        upper(&format!("secret = \"{old}\"")),
        upper(&format!("secret = \"{old}\"\naccept_secrets = [\"{new}\"]")),
        upper(&format!("secret = \"{new}\"\naccept_secrets = [\"{old}\"]")),
        upper(&format!("secret = \"{new}\"")),
    ];
    for pair in steps.windows(2) {
        assert!(pair[0].reload_refusals(&pair[1]).is_empty());
    }
    // Fixed for the process's life: each refused at its key.
    for (from, to, key) in [
        ("edge-1", "edge-2", "node.name"),
        ("127.0.0.1:8080", "127.0.0.1:8081", "node.listen"),
        ("\"64MiB\"", "\"128MiB\"", "cache.capacity"),
        (
            "[[origin]]",
            "[tracing]\notlp_endpoint = \"http://127.0.0.1:4318\"\n\n[[origin]]",
            "tracing",
        ),
    ] {
        let next = with(from, to);
        assert_eq!(keys(&running.reload_refusals(&next)), [key]);
    }
}

#[test]
fn upper_members_may_be_given_by_dns_name() {
    let with = |members: &str| {
        let text = GOOD.replace(
            "[[origin]]",
            &format!(
                "[tier]\nsecret = \"0123456789abcdef0123456789abcdef\"\nupper = [{members}]\n\n[[origin]]"
            ),
        );
        Config::parse(&text, Path::new("."))
    };
    let c = with(r#"{ dns = "Uppers.Svc.Cluster.Local:8080", weight = 2 }, "127.0.0.1:9001""#)
        .expect("valid");
    let t = c.tier.expect("tier");
    assert_eq!(
        t.upper_dns,
        [DnsMember {
            name: "uppers.svc.cluster.local".into(),
            port: 8080,
            weight: 2,
            refresh: None,
        }]
    );
    assert_eq!(t.upper.len(), 1);
    // The table form, with a refresh interval.
    let text = GOOD.replace(
        "[[origin]]",
        "[tier]\nsecret = \"0123456789abcdef0123456789abcdef\"\nupper = { dns = \"uppers.stratus.svc:8080\", refresh = \"5s\" }\n\n[[origin]]",
    );
    let t = Config::parse(&text, Path::new("."))
        .expect("valid")
        .tier
        .expect("tier");
    assert_eq!(t.upper_dns[0].refresh, Some(Duration::from_secs(5)));
    assert!(t.upper.is_empty());
    for bad in [
        r#"{ dns = "uppers:80", refresh = "10ms" }"#,
        r#"{ addr = "127.0.0.1:80", refresh = "5s" }"#,
        r#"{ dns = "10.0.0.1:8080" }"#,
        r#"{ dns = "uppers" }"#,
        r#"{ dns = "uppers:0" }"#,
        r#"{ dns = "bad_name:80" }"#,
        r#"{ dns = "uppers:80", name = "up-1" }"#,
        r#"{ dns = "uppers:80", addr = "127.0.0.1:80" }"#,
        r#"{ dns = "uppers:80" }, { dns = "uppers:80" }"#,
    ] {
        let problems = with(bad).expect_err(bad);
        assert!(
            keys(&problems).iter().all(|k| k.starts_with("tier.upper[")),
            "{bad}: {problems:?}"
        );
    }
}

#[test]
fn check_catches_what_would_silently_misbehave() {
    // A bare number is refused rather than taken as bytes.
    for size in ["256", "\"256\""] {
        let text = GOOD.replace("\"64MiB\"", size);
        let problems = Config::parse(&text, Path::new(".")).expect_err(size);
        assert_eq!(keys(&problems), ["cache.capacity"], "{size}");
        assert!(problems[0].message.contains("\"256MiB\""), "{problems:?}");
    }
    let bytes = Config::parse(
        &GOOD
            .replace("\"64MiB\"", "\"4MiB\"")
            .replace("\"1MiB\"", "\"256B\""),
        Path::new("."),
    )
    .expect("an explicit B is fine");
    assert_eq!(bytes.cache.max_object_size, 256);
    // No [[origin]]: every request would get 421.
    let cut = GOOD.find("[[origin]]").expect("origin table");
    let problems = Config::parse(&GOOD[..cut], Path::new(".")).expect_err("no origin");
    assert_eq!(keys(&problems), ["origin"]);
    // A syntax error is one problem on one line, with its column.
    let problems = Config::parse("[node\nname = \"x\"\n", Path::new(".")).expect_err("toml");
    assert_eq!(problems.len(), 1);
    assert!(
        problems[0].key.starts_with("line 1, column "),
        "{problems:?}"
    );
    assert!(!problems[0].to_string().contains('\n'), "{problems:?}");
}

/// Secret files: relative to the config, trailing newline dropped, group-readable allowed (a
/// Kubernetes `fsGroup` mount), anything open to other users refused at its key.
#[test]
fn secret_files_must_be_private_and_accepted_secrets_long() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let write = |name: &str, body: &str, mode: u32| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).expect("chmod");
    };
    write("signing", "0123456789abcdef0123456789abcdef\n", 0o600);
    write("old", "fedcba9876543210fedcba9876543210\n", 0o640);
    write("open", "00112233445566778899aabbccddeeff\n", 0o644);
    let inline = "secret = \"0123456789abcdef0123456789abcdef\"";
    let parse = |tier: &str| {
        let text = GOOD.replace("role = \"lower\"", "role = \"upper\"");
        let text = text.replace("[[origin]]", &format!("[tier]\n{tier}\n\n[[origin]]"));
        Config::parse(&text, dir.path())
    };
    let ok = parse("secret_file = \"signing\"\naccept_secret_files = [\"old\"]").expect("valid");
    let tier = ok.tier.expect("tier");
    assert_eq!(tier.secret, b"0123456789abcdef0123456789abcdef");
    assert_eq!(
        tier.accept_secrets,
        [b"fedcba9876543210fedcba9876543210".to_vec()]
    );
    let refused = parse("secret_file = \"open\"\naccept_secret_files = [\"signing\", \"open\"]")
        .expect_err("a world-readable secret");
    assert_eq!(
        keys(&refused),
        ["tier.secret_file", "tier.accept_secret_files[1]"]
    );
    assert!(
        refused[0].message.contains("mode 0644"),
        "{}",
        refused[0].message
    );
    let short = parse(&format!("{inline}\naccept_secrets = [\"short\"]")).expect_err("short");
    assert_eq!(keys(&short), ["tier.accept_secrets[0]"]);
}

/// The admin API listens on loopback unless told otherwise, and anywhere else only with a
/// token; a token file is held to the secret file's rules.
#[test]
fn the_admin_api_is_loopback_unless_a_token_guards_it() {
    let no_admin = GOOD.replace("admin_listen = \"127.0.0.1:9080\"\n", "");
    let c = Config::parse(&no_admin, Path::new(".")).expect("valid");
    assert_eq!(c.node.admin_listen, DEFAULT_ADMIN_LISTEN);
    assert!(c.node.admin_listen.ip().is_loopback());
    let open = GOOD.replace("127.0.0.1:9080", "0.0.0.0:9080");
    let problems = Config::parse(&open, Path::new(".")).expect_err("no token");
    assert_eq!(keys(&problems), ["node.admin_listen"]);
    assert!(
        problems[0].message.contains("token"),
        "{}",
        problems[0].message
    );
    let guarded = format!("{open}\n[admin]\ntoken = \"0123456789abcdef-admin\"\n");
    assert!(Config::parse(&guarded, Path::new(".")).is_ok());
    let reads = format!("{GOOD}\n[admin]\nguard_reads = true\n");
    let problems = Config::parse(&reads, Path::new(".")).expect_err("nothing to guard with");
    assert_eq!(keys(&problems), ["admin.guard_reads"]);

    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("admin-token");
    std::fs::write(&token, "0123456789abcdef-admin\n").expect("write");
    let with_file = format!("{open}\n[admin]\ntoken_file = \"admin-token\"\n");
    for (mode, ok) in [(0o600, true), (0o440, true), (0o604, false)] {
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(mode)).expect("chmod");
        match Config::parse(&with_file, dir.path()) {
            Ok(c) => {
                assert!(ok, "{mode:o} accepted");
                assert_eq!(c.admin.token.as_deref(), Some("0123456789abcdef-admin"));
            }
            Err(p) => {
                assert!(!ok, "{mode:o} refused: {p:?}");
                assert_eq!(keys(&p), ["admin.token_file", "node.admin_listen"]);
            }
        }
    }
}
