//! RFC 9111 behaviours, each against a real node and a counting origin, standalone and through
//! two tiers (a lower in front of an upper): `Age` (§5.1), `must-understand` (§5.2.2.3),
//! responses that set cookies, hop-by-hop fields (RFC 9110 §7.6.1), 304 freshening (§4.3.4) and
//! targeted cache control (RFC 9213, `Stratus-Cache-Control`, `Surrogate-Control`).

use std::net::SocketAddr;
use std::path::Path;

use stratus_chaos::{client, Fleet, FleetSpec, NodeProcess, OriginEntry, Reply, TestOrigin};

const HOST: &str = "example.test";

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_stratus"))
}

/// Where clients go: a standalone node, or the lower of a 1-lower/1-upper fleet.
#[allow(clippy::large_enum_variant)] // two per test, held for its length
enum Setup {
    Standalone(NodeProcess),
    Tiered(Fleet),
}

impl Setup {
    fn client_addr(&self) -> SocketAddr {
        match self {
            Setup::Standalone(n) => n.listen,
            Setup::Tiered(f) => f.lowers[0].listen,
        }
    }
}

/// Both setups in front of one origin.
async fn setups(origin: &TestOrigin) -> Vec<(&'static str, Setup)> {
    setups_with(origin, "").await
}

/// Both setups in front of one origin, every node's config ending with `extra`.
async fn setups_with(origin: &TestOrigin, extra: &str) -> Vec<(&'static str, Setup)> {
    let origins = [OriginEntry::new(HOST, origin.addr())];
    let standalone = NodeProcess::start(bin(), "solo", &origins, extra)
        .await
        .expect("standalone node");
    let spec = FleetSpec {
        lowers: 1,
        uppers: 1,
        origins: origins.to_vec(),
        lower_tier_extra: String::new(),
        common_extra: extra.to_string(),
    };
    let fleet = Fleet::start(bin(), &spec).await.expect("fleet");
    vec![
        ("standalone", Setup::Standalone(standalone)),
        ("tiered", Setup::Tiered(fleet)),
    ]
}

/// This node's `ttl=` in the last `Cache-Status` entry.
fn our_ttl(cache_status: &str) -> Option<i64> {
    cache_status
        .rsplit(',')
        .next()?
        .split(';')
        .find_map(|p| p.trim().strip_prefix("ttl="))?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn age_first_value_counts_and_an_invalid_one_is_stale() {
    let origin = TestOrigin::start().await.expect("origin");
    for (name, setup) in setups(&origin).await {
        let addr = setup.client_addr();
        // Several values: the first counts (one field or several).
        for (i, ages) in [vec!["100, 5"], vec!["100", "5"]].into_iter().enumerate() {
            let path = format!("/{name}/age-list/{i}");
            let mut reply = Reply::ok("aged").header("cache-control", "max-age=600");
            for a in &ages {
                reply = reply.header("age", a);
            }
            origin.fixed(&path, reply);
            let r = client::get(addr, HOST, &path, &[]).await.expect("exchange");
            let ttl = our_ttl(&r.cache_status());
            assert!(
                ttl.is_some_and(|t| (495..=500).contains(&t)),
                "{name} {ages:?}: {}",
                r.cache_status()
            );
        }
        // Not a non-negative integer: never trusted fresh, so the next request goes upstream.
        for (i, bad) in ["-5", "1.5", "5s", "x5", "5;q=1"].into_iter().enumerate() {
            let path = format!("/{name}/age-bad/{i}");
            origin.fixed(
                &path,
                Reply::ok("untrusted")
                    .header("cache-control", "max-age=600")
                    .header("age", bad),
            );
            for _ in 0..2 {
                let r = client::get(addr, HOST, &path, &[]).await.expect("exchange");
                assert_eq!(r.status, 200);
            }
            assert_eq!(origin.count(&path), 2, "{name}: Age {bad:?} was trusted");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_response_that_sets_a_cookie_is_never_served_to_another_client() {
    let origin = TestOrigin::start().await.expect("origin");
    for (name, setup) in setups(&origin).await {
        let addr = setup.client_addr();
        for (i, cc) in ["max-age=600", "public, max-age=600", "s-maxage=600"]
            .into_iter()
            .enumerate()
        {
            let path = format!("/{name}/cookie/{i}");
            origin.fixed(
                &path,
                Reply::ok("personal")
                    .header("cache-control", cc)
                    .header("set-cookie", "session=alice"),
            );
            let first = client::get(addr, HOST, &path, &[]).await.expect("exchange");
            assert_eq!(first.header("set-cookie"), Some("session=alice"));
            let second = client::get(addr, HOST, &path, &[]).await.expect("exchange");
            assert_eq!(second.status, 200);
            assert_eq!(
                origin.count(&path),
                2,
                "{name}: {cc} with Set-Cookie was stored"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn set_cookie_strip_stores_the_response_without_its_cookies() {
    let origin = TestOrigin::start().await.expect("origin");
    for (name, setup) in setups_with(&origin, "[cache]\nset_cookie = \"strip\"\n").await {
        let addr = setup.client_addr();
        let path = format!("/{name}/cookie-strip");
        origin.fixed(
            &path,
            Reply::ok("shared")
                .header("cache-control", "max-age=600")
                .header("set-cookie", "session=alice")
                .header("set-cookie", "theme=dark"),
        );
        // The request that caused the cookies gets them, both.
        let first = client::get(addr, HOST, &path, &[]).await.expect("exchange");
        assert_eq!(first.status, 200);
        let mut cookies = first.headers_named("set-cookie");
        cookies.sort();
        assert_eq!(cookies, ["session=alice", "theme=dark"], "{name}");
        // Every later client gets the stored copy, without any cookie.
        for _ in 0..2 {
            let hit = client::get(addr, HOST, &path, &[]).await.expect("exchange");
            assert_eq!(hit.status, 200);
            assert_eq!(hit.body, b"shared");
            assert!(
                hit.headers_named("set-cookie").is_empty(),
                "{name}: a stored cookie reached another client: {}",
                hit.cache_status()
            );
        }
        assert_eq!(origin.count(&path), 1, "{name}: stored once");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn must_understand_stores_only_understood_status_codes() {
    let origin = TestOrigin::start().await.expect("origin");
    for (name, setup) in setups(&origin).await {
        let addr = setup.client_addr();
        for (status, stored) in [(200u16, true), (299, false), (418, false)] {
            let path = format!("/{name}/mu/{status}");
            origin.fixed(
                &path,
                Reply::ok("mu")
                    .status(status)
                    .header("cache-control", "max-age=600, must-understand"),
            );
            for _ in 0..2 {
                let r = client::get(addr, HOST, &path, &[]).await.expect("exchange");
                assert_eq!(r.status, status);
            }
            let want = if stored { 1 } else { 2 };
            assert_eq!(origin.count(&path), want, "{name}: status {status}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hop_by_hop_fields_are_neither_stored_nor_forwarded() {
    let origin = TestOrigin::start().await.expect("origin");
    for (name, setup) in setups(&origin).await {
        let addr = setup.client_addr();
        let path = format!("/{name}/hop");
        origin.fixed(
            &path,
            Reply::ok("hop")
                .header("cache-control", "max-age=600")
                .header("connection", "x-private, keep-alive")
                .header("x-private", "for the next hop only")
                .header("keep-alive", "timeout=5"),
        );
        let chunked = format!("/{name}/hop-chunked");
        origin.fixed(
            &chunked,
            Reply::chunked(vec![b"one ".to_vec(), b"two".to_vec()])
                .header("cache-control", "max-age=600"),
        );
        for round in 0..2 {
            let r = client::get(addr, HOST, &path, &[]).await.expect("exchange");
            assert_eq!((r.status, r.text().as_str()), (200, "hop"));
            for field in ["x-private", "keep-alive"] {
                assert!(
                    r.header(field).is_none(),
                    "{name} round {round}: {field} reached the client: {:?}",
                    r.headers
                );
            }
            let c = client::get(addr, HOST, &chunked, &[])
                .await
                .expect("exchange");
            assert_eq!(c.text(), "one two", "{name} round {round}");
            let framings = c
                .headers
                .iter()
                .filter(|(k, _)| k == "transfer-encoding" || k == "content-length")
                .count();
            assert_eq!(framings, 1, "{name} round {round}: {:?}", c.headers);
        }
        assert_eq!(origin.count(&path), 1);
        assert_eq!(origin.count(&chunked), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cached_response_keeps_its_date() {
    let origin = TestOrigin::start().await.expect("origin");
    let made =
        httpdate::fmt_http_date(std::time::SystemTime::now() - std::time::Duration::from_secs(120));
    for (name, setup) in setups(&origin).await {
        let addr = setup.client_addr();
        // The origin's Date passes through every tier and stays on every hit (RFC 9110 §6.6.1).
        let dated = format!("/{name}/dated");
        origin.fixed(
            &dated,
            Reply::ok("d")
                .header("cache-control", "max-age=600")
                .header("date", &made),
        );
        // Without one, the time it was received is recorded once and stored with it.
        let undated = format!("/{name}/undated");
        origin.fixed(
            &undated,
            Reply::ok("u").header("cache-control", "max-age=600"),
        );
        let first = client::get(addr, HOST, &dated, &[])
            .await
            .expect("exchange");
        assert_eq!(first.header("date"), Some(made.as_str()), "{name}: miss");
        let received = client::get(addr, HOST, &undated, &[])
            .await
            .expect("exchange");
        let recorded = received
            .header("date")
            .expect("a Date is added")
            .to_string();
        // HTTP-dates have whole seconds: let the clock pass one before the hits.
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        for _ in 0..2 {
            for (path, date) in [(&dated, &made), (&undated, &recorded)] {
                let hit = client::get(addr, HOST, path, &[]).await.expect("exchange");
                assert!(
                    hit.cache_status().contains("hit"),
                    "{name}: {}",
                    hit.cache_status()
                );
                assert_eq!(
                    hit.header("date"),
                    Some(date.as_str()),
                    "{name} {path}: a hit must keep the stored Date"
                );
            }
        }
        assert_eq!(origin.count(&dated), 1);
        assert_eq!(origin.count(&undated), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_304_freshens_the_stored_header_fields() {
    let origin = TestOrigin::start().await.expect("origin");
    for (name, setup) in setups(&origin).await {
        let addr = setup.client_addr();
        let path = format!("/{name}/fresh304");
        origin.route(&path, |_, nth| {
            if nth == 0 {
                Reply::ok("body v1")
                    .header("cache-control", "max-age=1")
                    .header("etag", "\"v1\"")
                    .header("content-type", "text/plain")
                    .header("x-frame-options", "DENY")
                    .header("x-extension", "old")
            } else {
                Reply::ok("")
                    .status(304)
                    .header("cache-control", "max-age=600")
                    .header("etag", "\"v1\"")
                    .header("content-type", "text/x-new")
                    .header("x-frame-options", "SAMEORIGIN")
                    .header("x-extension", "new")
                    .header("set-cookie", "session=mallory")
                    .header("vary", "x-other")
            }
        });
        let first = client::get(addr, HOST, &path, &[]).await.expect("exchange");
        assert_eq!(first.header("x-extension"), Some("old"));
        let revalidated = stratus_chaos::eventually(std::time::Duration::from_secs(8), || async {
            origin.count(&path) >= 2 || client::get(addr, HOST, &path, &[]).await.is_err()
        })
        .await;
        assert!(revalidated, "{name}: no revalidation");
        let r = client::get(addr, HOST, &path, &[]).await.expect("exchange");
        assert_eq!(r.text(), "body v1", "{name}");
        for (field, want) in [
            ("x-extension", "new"),
            ("content-type", "text/x-new"),
            ("x-frame-options", "SAMEORIGIN"),
        ] {
            assert_eq!(
                r.header(field),
                Some(want),
                "{name}: {field}: {:?}",
                r.headers
            );
        }
    }
}

/// Response fields, whether stratus stores it, the ttl range it stores it with, and the fields
/// a client must not see.
type TargetedCase = (
    &'static [(&'static str, &'static str)],
    bool,
    (i64, i64),
    &'static [&'static str],
);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn targeted_cache_control_governs_stratus_not_browsers() {
    let origin = TestOrigin::start().await.expect("origin");
    for (name, setup) in setups(&origin).await {
        let addr = setup.client_addr();
        let cases: [TargetedCase; 4] = [
            (
                &[
                    ("cache-control", "max-age=1"),
                    ("cdn-cache-control", "max-age=600"),
                ],
                true,
                (595, 600),
                &[],
            ),
            (
                &[
                    ("cache-control", "no-store"),
                    ("cdn-cache-control", "max-age=600"),
                    ("stratus-cache-control", "max-age=300"),
                ],
                true,
                (295, 300),
                &["stratus-cache-control"],
            ),
            (
                &[
                    ("cache-control", "private"),
                    ("surrogate-control", "max-age=120"),
                ],
                true,
                (115, 120),
                &["surrogate-control"],
            ),
            (
                &[
                    ("cache-control", "max-age=600"),
                    ("cdn-cache-control", "no-store"),
                ],
                false,
                (0, 0),
                &[],
            ),
        ];
        for (i, (fields, stored, (lo, hi), hidden)) in cases.into_iter().enumerate() {
            let path = format!("/{name}/targeted/{i}");
            let mut reply = Reply::ok("targeted");
            for (k, v) in fields {
                reply = reply.header(k, v);
            }
            origin.fixed(&path, reply);
            let first = client::get(addr, HOST, &path, &[]).await.expect("exchange");
            let second = client::get(addr, HOST, &path, &[]).await.expect("exchange");
            for r in [&first, &second] {
                assert_eq!(r.status, 200);
                // Browsers keep following Cache-Control.
                assert_eq!(r.header("cache-control"), Some(fields[0].1), "{name} {i}");
                for h in hidden {
                    assert!(r.header(h).is_none(), "{name} {i}: {h} reached the client");
                }
            }
            if stored {
                assert_eq!(origin.count(&path), 1, "{name} {i}: not stored");
                let ttl = our_ttl(&first.cache_status());
                assert!(
                    ttl.is_some_and(|t| (lo..=hi).contains(&t)),
                    "{name} {i}: {}",
                    first.cache_status()
                );
            } else {
                assert_eq!(origin.count(&path), 2, "{name} {i}: stored");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unsafe_methods_invalidate_the_target_and_its_locations() {
    let origin = TestOrigin::start().await.expect("origin");
    let origins = [OriginEntry::new(HOST, origin.addr())];
    let standalone = NodeProcess::start(bin(), "solo", &origins, "")
        .await
        .expect("standalone node");
    // Two uppers, so some invalidated keys are owned by the upper that did not serve the POST.
    let spec = FleetSpec {
        lowers: 1,
        uppers: 2,
        origins: origins.to_vec(),
        lower_tier_extra: String::new(),
        common_extra: String::new(),
    };
    let fleet = Fleet::start(bin(), &spec).await.expect("fleet");
    let runs = [
        ("standalone", standalone.listen),
        ("tiered", fleet.lowers[0].listen),
    ];
    for (name, addr) in runs {
        let gets = |path: &str| {
            origin
                .requests(path)
                .iter()
                .filter(|r| r.method == "GET")
                .count()
        };
        for round in 0..4 {
            let target = format!("/{name}/inv/{round}/target");
            let created = format!("/{name}/inv/{round}/created");
            let described = format!("/{name}/inv/{round}/described");
            let elsewhere = format!("/{name}/inv/{round}/elsewhere");
            let (c, d) = (created.clone(), described.clone());
            origin.route(&target, move |req, _| {
                if req.method == "GET" {
                    Reply::ok("target").header("cache-control", "max-age=600")
                } else {
                    Reply::ok("made")
                        .status(201)
                        .header("location", &c)
                        .header("content-location", &format!("http://example.test{d}"))
                }
            });
            for p in [&created, &described, &elsewhere] {
                origin.fixed(
                    p,
                    Reply::ok("object").header("cache-control", "max-age=600"),
                );
            }
            for p in [&target, &created, &described, &elsewhere] {
                client::get(addr, HOST, p, &[]).await.expect("warm");
            }
            let method = ["POST", "PUT", "DELETE", "PATCH"][round];
            let r = client::request(addr, method, HOST, &target, &[("content-length", "0")])
                .await
                .expect("unsafe request");
            assert_eq!(r.status, 201, "{name} {method}");
            for p in [&target, &created, &described, &elsewhere] {
                client::get(addr, HOST, p, &[]).await.expect("again");
            }
            for p in [&target, &created, &described] {
                assert_eq!(gets(p), 2, "{name} {method}: {p} was not invalidated");
            }
            assert_eq!(
                gets(&elsewhere),
                1,
                "{name} {method}: an unrelated key was invalidated"
            );
        }
        // An error response invalidates nothing.
        let path = format!("/{name}/inv/error");
        origin.route(&path, |req, _| {
            if req.method == "GET" {
                Reply::ok("kept").header("cache-control", "max-age=600")
            } else {
                Reply::ok("no").status(500)
            }
        });
        client::get(addr, HOST, &path, &[]).await.expect("warm");
        client::request(addr, "POST", HOST, &path, &[("content-length", "0")])
            .await
            .expect("post");
        client::get(addr, HOST, &path, &[]).await.expect("again");
        assert_eq!(gets(&path), 1, "{name}: an error response invalidated");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expires_at_or_before_date_or_invalid_is_already_stale() {
    let origin = TestOrigin::start().await.expect("origin");
    let now = std::time::SystemTime::now();
    let date = httpdate::fmt_http_date(now);
    let before = httpdate::fmt_http_date(now - std::time::Duration::from_secs(60));
    let later = httpdate::fmt_http_date(now + std::time::Duration::from_secs(600));
    for (name, setup) in setups(&origin).await {
        let addr = setup.client_addr();
        for (i, (expires, stored)) in [
            (date.as_str(), false),
            (before.as_str(), false),
            ("0", false),
            ("not a date", false),
            (later.as_str(), true),
        ]
        .into_iter()
        .enumerate()
        {
            let path = format!("/{name}/expires/{i}");
            origin.fixed(
                &path,
                Reply::ok("e")
                    .header("date", &date)
                    .header("expires", expires),
            );
            for _ in 0..2 {
                client::get(addr, HOST, &path, &[]).await.expect("exchange");
            }
            let want = if stored { 1 } else { 2 };
            assert_eq!(origin.count(&path), want, "{name}: Expires {expires:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_variant_is_a_vary_miss() {
    let origin = TestOrigin::start().await.expect("origin");
    for (name, setup) in setups(&origin).await {
        let addr = setup.client_addr();
        let path = format!("/{name}/varied");
        origin.route(&path, |req, _| {
            let lang = req.header("accept-language").unwrap_or("none").to_string();
            Reply::ok(lang)
                .header("cache-control", "max-age=600")
                .header("vary", "Accept-Language")
        });
        let ours = |cs: String| cs.rsplit(',').next().unwrap_or("").trim().to_string();
        let en = [("accept-language", "en")];
        let fr = [("accept-language", "fr")];
        let first = client::get(addr, HOST, &path, &en).await.expect("exchange");
        assert!(
            ours(first.cache_status()).contains("fwd=uri-miss"),
            "{name}: {}",
            first.cache_status()
        );
        let other = client::get(addr, HOST, &path, &fr).await.expect("exchange");
        assert_eq!(other.text(), "fr");
        assert!(
            ours(other.cache_status()).contains("fwd=vary-miss"),
            "{name}: {}",
            other.cache_status()
        );
        let again = client::get(addr, HOST, &path, &en).await.expect("exchange");
        assert_eq!(again.text(), "en");
        assert!(
            ours(again.cache_status()).contains("; hit"),
            "{name}: {}",
            again.cache_status()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cache_status_names_the_key_every_spelling_shares() {
    let origin = TestOrigin::start().await.expect("origin");
    for (name, setup) in setups(&origin).await {
        let addr = setup.client_addr();
        let path = format!("/{name}/keyed?q=1");
        origin.fixed(&path, Reply::ok("k").header("cache-control", "max-age=600"));
        let key = format!("\"{}:{HOST}{path}\"", HOST.len());
        // The same object under another spelling of the host: one key, shown by every node
        // the response passed (the first time both tiers, then the lower's hit alone).
        for (i, host) in [HOST.to_string(), format!("{}:80", HOST.to_uppercase())]
            .into_iter()
            .enumerate()
        {
            let r = client::get(addr, &host, &path, &[])
                .await
                .expect("exchange");
            assert_eq!(r.status, 200);
            let entries = r.cache_status();
            let nodes = if name == "tiered" && i == 0 { 2 } else { 1 };
            assert_eq!(
                entries.matches(&format!("; key={key}")).count(),
                nodes,
                "{name} {host}: {entries}"
            );
        }
        assert_eq!(origin.count(&path), 1, "{name}: one key, one fetch");
        // Not cacheable by method: no key.
        let post = client::request(addr, "POST", HOST, &path, &[])
            .await
            .expect("exchange");
        assert!(
            !post.cache_status().contains("key="),
            "{name}: {}",
            post.cache_status()
        );
    }
}
