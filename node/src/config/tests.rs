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
    assert_eq!(normalize_host("[::1]:80").as_deref(), Some("::1"));
    assert_eq!(normalize_host("bad host"), None);
    assert_eq!(normalize_host(""), None);
    assert_eq!(normalize_host("a/b"), None);
}
