//! Admission from the attacker's side: whatever a client sends is admitted or refused with a
//! documented status, never a panic; loops stop at the lower; targets that could make one key
//! mean two things are refused.

use super::*;
use std::path::Path;

fn config() -> Config {
    Config::parse(
        r#"
[node]
name = "edge-1"
role = "lower"
listen = "127.0.0.1:1"
admin_listen = "127.0.0.1:2"
max_request_header_size = "1KiB"
[[origin]]
host = "example.test"
address = "127.0.0.1:3"
"#,
        Path::new("."),
    )
    .expect("valid test config")
}

fn req(headers: &[(&'static str, &str)]) -> RequestHeader {
    target_req(b"/a?b=1", headers)
}

fn target_req(target: &[u8], headers: &[(&'static str, &str)]) -> RequestHeader {
    let mut r = RequestHeader::build("GET", target, None).expect("request");
    for (k, v) in headers {
        r.append_header(*k, *v).expect("header");
    }
    r
}

fn admit_lower(c: &Config, r: &RequestHeader) -> Result<RequestContext, Generated> {
    admit(c, None, r, SystemTime::now(), Arrival::Network, None)
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

    /// Whatever a client sends, admission answers (admitted or a documented 4xx/508) and
    /// never panics; an admitted request always names a configured origin, and its target is
    /// exactly the origin-form target that arrived.
    #[test]
    fn admission_never_panics(
        method in "(GET|HEAD|POST|PURGE|[A-Z]{1,12})",
        path in "(/|http://example.test/|[a-z]{1,5}:)[ -~]{0,200}",
        headers in proptest::collection::vec(("[a-z][a-z0-9-]{0,20}", proptest::collection::vec(32u8..127, 0..300)), 0..12),
    ) {
        let c = config();
        let Ok(mut r) = RequestHeader::build(method.as_str(), path.as_bytes(), None) else {
            return Ok(());
        };
        for (k, v) in headers {
            if let Ok(value) = http::HeaderValue::from_bytes(&v) {
                let _ = r.append_header(k, value);
            }
        }
        match admit_lower(&c, &r) {
            Ok(ctx) => {
                proptest::prop_assert!(ctx.origin < c.origins.len());
                proptest::prop_assert!(ctx.path_and_query.starts_with('/'));
                if path.starts_with('/') {
                    proptest::prop_assert_eq!(ctx.path_and_query.as_str(), path.as_str());
                }
            }
            Err(g) => proptest::prop_assert!(matches!(g.status(), 400 | 405 | 421 | 431 | 508)),
        }
    }
}

#[test]
fn admission() {
    let c = config();
    let ok = admit_lower(&c, &req(&[("host", "Example.test:8080")])).expect("admitted");
    assert_eq!(
        (ok.host.as_str(), ok.origin, ok.path_and_query.as_str()),
        ("example.test", 0, "/a?b=1")
    );
    assert_eq!(
        admit_lower(&c, &req(&[("host", "other.test")])).err(),
        Some(Generated::UnknownHost)
    );
    assert_eq!(
        admit_lower(&c, &req(&[])).err(),
        Some(Generated::BadRequest("missing-host"))
    );
    assert_eq!(
        admit_lower(
            &c,
            &req(&[("host", "example.test"), ("host", "example.test")])
        )
        .err(),
        Some(Generated::BadRequest("duplicate-host"))
    );
    assert_eq!(
        admit_lower(&c, &req(&[("host", "bad host")])).err(),
        Some(Generated::BadRequest("bad-host"))
    );
    let big = "x".repeat(2000);
    assert_eq!(
        admit_lower(
            &c,
            &req(&[("host", "example.test"), ("cookie", big.as_str())])
        )
        .err(),
        Some(Generated::HeadersTooLarge)
    );
}

#[test]
fn a_lower_refuses_a_loop_before_its_next_hop_would_reach_the_limit() {
    let c = config();
    let almost = ["stratus"; MAX_STRATUS_HOPS - 2].join(", ");
    assert!(admit_lower(
        &c,
        &req(&[("host", "example.test"), ("cdn-loop", almost.as_str())])
    )
    .is_ok());
    // With 7 entries the lower would forward the 8th: it answers 508 itself.
    let seven = ["stratus"; MAX_STRATUS_HOPS - 1].join(", ");
    assert_eq!(
        admit_lower(
            &c,
            &req(&[("host", "example.test"), ("cdn-loop", seven.as_str())])
        )
        .err(),
        Some(Generated::LoopDetected)
    );
}

#[test]
fn targets_that_could_mean_two_keys_are_refused() {
    let c = config();
    let host = [("host", "example.test")];
    let mut checked = 0;
    for bad in [
        &b"foo:bar"[..],
        b"*",
        b"example.test/a",
        b"/caf\xc3",
        b"http://example.test/a b",
        b"http://user@example.test/a",
    ] {
        let Ok(r) = RequestHeader::build("GET", bad, None).map(|mut r| {
            r.append_header("host", "example.test").expect("header");
            r
        }) else {
            continue; // refused by the parser already
        };
        assert_eq!(
            admit_lower(&c, &r).err(),
            Some(Generated::BadRequest("bad-target")),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
        checked += 1;
    }
    assert!(checked >= 2, "only {checked} bad targets reached admission");
    // A fragment is not part of the target (RFC 9110 §4.2.4): it never reaches key or upstream.
    for with_fragment in [&b"http://example.test/a#x"[..], b"/a#x"] {
        let r = target_req(with_fragment, &host);
        assert_eq!(admit_lower(&c, &r).expect("admitted").path_and_query, "/a");
    }
    let absolute = target_req(b"http://example.test/x?y", &host);
    assert_eq!(
        admit_lower(&c, &absolute)
            .expect("absolute-form")
            .path_and_query,
        "/x?y"
    );
}
