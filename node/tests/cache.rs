//! One real node process against an in-test origin that counts requests: one test per caching
//! behaviour the node promises (INTERFACE.md, "How requests flow" and "Headers").

use std::path::Path;
use std::time::Duration;

use stratus_chaos::{client, eventually, Gate, NodeProcess, OriginEntry, Reply, TestOrigin};

const HOST: &str = "example.test";

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_stratus"))
}

async fn setup(extra: &str) -> (TestOrigin, NodeProcess) {
    let origin = TestOrigin::start().await.expect("origin starts");
    let node = NodeProcess::start(
        bin(),
        "edge-1",
        &[OriginEntry::new(HOST, origin.addr())],
        extra,
    )
    .await
    .expect("node starts");
    (origin, node)
}

async fn get(node: &NodeProcess, path: &str, headers: &[(&str, &str)]) -> client::Response {
    client::get(node.listen, HOST, path, headers)
        .await
        .expect("exchange completes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn miss_then_hit_contacts_the_origin_once() {
    let (origin, node) = setup("").await;
    origin.fixed(
        "/a",
        Reply::ok("hello").header("cache-control", "max-age=60"),
    );
    let first = get(&node, "/a", &[]).await;
    assert_eq!((first.status, first.text().as_str()), (200, "hello"));
    assert!(
        first.cache_status().starts_with("edge-1; fwd=uri-miss"),
        "{}",
        first.cache_status()
    );
    assert!(first.cache_status().contains("stored"));
    let second = get(&node, "/a", &[]).await;
    assert_eq!((second.status, second.text().as_str()), (200, "hello"));
    assert!(
        second.cache_status().starts_with("edge-1; hit; ttl="),
        "{}",
        second.cache_status()
    );
    assert_eq!(origin.count("/a"), 1);
    // HEAD is answered from the same object.
    let head = client::request(node.listen, "HEAD", HOST, "/a", &[])
        .await
        .expect("head");
    assert_eq!(head.status, 200);
    assert!(head.cache_status().contains("hit"));
    assert_eq!(origin.count("/a"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_store_and_private_are_not_stored() {
    let (origin, node) = setup("").await;
    origin.fixed(
        "/ns",
        Reply::ok("x").header("cache-control", "no-store, max-age=60"),
    );
    origin.fixed(
        "/p",
        Reply::ok("y").header("cache-control", "private, max-age=60"),
    );
    origin.fixed("/none", Reply::ok("z"));
    for path in ["/ns", "/p", "/none"] {
        for _ in 0..2 {
            let r = get(&node, path, &[]).await;
            assert_eq!(r.status, 200);
            assert!(
                !r.cache_status().contains("stored"),
                "{path}: {}",
                r.cache_status()
            );
            assert!(
                !r.cache_status().contains("hit"),
                "{path}: {}",
                r.cache_status()
            );
        }
        assert_eq!(
            origin.count(path),
            2,
            "{path} must reach the origin every time"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn vary_variants_are_kept_apart() {
    let (origin, node) = setup("").await;
    origin.route("/v", |req, _| {
        let enc = req
            .header("accept-encoding")
            .unwrap_or("identity")
            .to_string();
        Reply::ok(format!("body for {enc}"))
            .header("cache-control", "max-age=60")
            .header("vary", "Accept-Encoding")
    });
    for _ in 0..2 {
        for enc in ["gzip", "br"] {
            let r = get(&node, "/v", &[("accept-encoding", enc)]).await;
            assert_eq!(r.text(), format!("body for {enc}"));
        }
    }
    assert_eq!(origin.count("/v"), 2, "one fetch per variant");
    let star = Reply::ok("s")
        .header("cache-control", "max-age=60")
        .header("vary", "*");
    origin.fixed("/star", star);
    get(&node, "/star", &[]).await;
    get(&node, "/star", &[]).await;
    assert_eq!(origin.count("/star"), 2, "Vary: * is never stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_objects_revalidate_with_304() {
    let (origin, node) = setup("").await;
    // Age beyond max-age: stored already stale, so the next request must revalidate.
    origin.route("/r", |req, _| {
        if req.header("if-none-match") == Some("\"v1\"") {
            Reply::ok("")
                .status(304)
                .header("etag", "\"v1\"")
                .header("cache-control", "max-age=60")
        } else {
            Reply::ok("version one")
                .header("etag", "\"v1\"")
                .header("cache-control", "max-age=10")
                .header("age", "20")
        }
    });
    let first = get(&node, "/r", &[]).await;
    assert_eq!(first.text(), "version one");
    let second = get(&node, "/r", &[]).await;
    assert_eq!(
        (second.status, second.text().as_str()),
        (200, "version one")
    );
    assert!(
        second.cache_status().contains("fwd=stale; fwd-status=304"),
        "{}",
        second.cache_status()
    );
    let seen = origin.requests("/r");
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].header("if-none-match"), Some("\"v1\""));
    // Fresh again after the merge: a hit, and a client's conditional is answered here.
    let third = get(&node, "/r", &[("if-none-match", "\"v1\"")]).await;
    assert_eq!(third.status, 304);
    assert_eq!(origin.count("/r"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_while_revalidate_answers_at_once_and_refreshes_once() {
    let (origin, node) = setup("").await;
    let refresh_gate = Gate::default();
    let gate = refresh_gate.clone();
    origin.route("/swr", move |_, nth| match nth {
        0 => Reply::ok("old")
            .header("cache-control", "max-age=10, stale-while-revalidate=600")
            .header("age", "20"),
        _ => Reply::ok("new")
            .header("cache-control", "max-age=600")
            .hold(&gate),
    });
    assert_eq!(get(&node, "/swr", &[]).await.text(), "old");
    // The refresh is held at the origin, yet the stale answer arrives: it did not wait.
    let stale = get(&node, "/swr", &[]).await;
    assert_eq!(stale.text(), "old");
    assert!(
        stale.cache_status().contains("stale-while-revalidate"),
        "{}",
        stale.cache_status()
    );
    let again = get(&node, "/swr", &[]).await;
    assert_eq!(
        again.text(),
        "old",
        "still stale while the refresh is in flight"
    );
    assert!(
        eventually(Duration::from_secs(10), || async {
            origin.count("/swr") == 2
        })
        .await
    );
    refresh_gate.open();
    let refreshed = eventually(Duration::from_secs(10), || async {
        get(&node, "/swr", &[]).await.text() == "new"
    })
    .await;
    assert!(refreshed, "the background refresh replaced the object");
    assert_eq!(origin.count("/swr"), 2, "refreshed exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_if_error_serves_while_the_origin_is_down() {
    let (origin, node) = setup("").await;
    origin.fixed(
        "/sie",
        Reply::ok("keep me")
            .header("cache-control", "max-age=10, stale-if-error=600")
            .header("age", "20"),
    );
    assert_eq!(get(&node, "/sie", &[]).await.text(), "keep me");
    origin.stop();
    let r = get(&node, "/sie", &[]).await;
    assert_eq!((r.status, r.text().as_str()), (200, "keep me"));
    assert!(
        r.cache_status().contains("stale-if-error"),
        "{}",
        r.cache_status()
    );
    // Without a stale copy the same outage is a 502 that says why.
    let cold = get(&node, "/never-fetched", &[]).await;
    assert_eq!(cold.status, 502);
    assert!(
        cold.cache_status().contains("detail=connection-refused"),
        "{}",
        cold.cache_status()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn concurrent_misses_are_coalesced_into_one_fetch() {
    let (origin, node) = setup("").await;
    let gate = Gate::default();
    origin.fixed(
        "/hot",
        Reply::ok(vec![b'h'; 50_000])
            .header("cache-control", "max-age=60")
            .hold(&gate),
    );
    let listen = node.listen;
    let clients: Vec<_> = (0..100)
        .map(|_| tokio::spawn(async move { client::get(listen, HOST, "/hot", &[]).await }))
        .collect();
    // Let every request arrive before the one origin fetch is released.
    assert!(
        eventually(Duration::from_secs(10), || async {
            origin.count("/hot") >= 1
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(300)).await; // ok: gives stragglers time to queue; correctness does not depend on it
    gate.open();
    for c in clients {
        let r = c.await.expect("task").expect("exchange");
        assert_eq!(r.status, 200);
        assert!(r.complete && r.body.len() == 50_000);
    }
    assert_eq!(
        origin.count("/hot"),
        1,
        "100 concurrent misses → 1 origin request"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ranges_are_served_from_a_stored_object() {
    let (origin, node) = setup("").await;
    origin.fixed(
        "/range",
        Reply::ok("0123456789").header("cache-control", "max-age=60"),
    );
    assert_eq!(get(&node, "/range", &[]).await.text(), "0123456789");
    let r = get(&node, "/range", &[("range", "bytes=2-5")]).await;
    assert_eq!(r.status, 206);
    assert_eq!(r.text(), "2345");
    assert_eq!(r.header("content-range"), Some("bytes 2-5/10"));
    let bad = get(&node, "/range", &[("range", "bytes=20-30")]).await;
    assert_eq!(bad.status, 416);
    assert_eq!(
        origin.count("/range"),
        1,
        "origin fetches are always for the whole object"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_objects_stream_through_uncached() {
    let (origin, node) = setup("[cache]\nmax_object_size = \"64KiB\"\n").await;
    let big = vec![b'b'; 256 * 1024];
    origin.fixed(
        "/big",
        Reply::ok(big.clone()).header("cache-control", "max-age=60"),
    );
    for _ in 0..2 {
        let r = get(&node, "/big", &[]).await;
        assert!(r.complete);
        assert_eq!(r.body, big);
        assert!(!r.cache_status().contains("stored"), "{}", r.cache_status());
    }
    assert_eq!(origin.count("/big"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_aborted_fill_is_never_cached_or_served_short() {
    let (origin, node) = setup("").await;
    origin.route("/cut", |_, nth| {
        let r = Reply::ok(vec![b'c'; 100_000]).header("cache-control", "max-age=60");
        if nth == 0 {
            r.truncate_at(30_000).delay(Duration::from_millis(200))
        } else {
            r
        }
    });
    // Two clients: the second usually joins the first one's fill while it is cut off.
    let listen = node.listen;
    let both: Vec<_> = (0..2)
        .map(|_| tokio::spawn(async move { client::get(listen, HOST, "/cut", &[]).await }))
        .collect();
    for c in both {
        let r = c.await.expect("task").expect("exchange");
        let full = r.status == 200 && r.complete && r.body.len() == 100_000;
        let visibly_failed = r.status == 502 || !r.complete;
        assert!(
            full || visibly_failed,
            "short body served as complete: {} {:?} {} bytes",
            r.status,
            r.headers,
            r.body.len()
        );
    }
    let after = get(&node, "/cut", &[]).await;
    assert!(
        after.complete && after.body.len() == 100_000,
        "{:?}",
        after.headers
    );
    let fetches = origin.count("/cut");
    assert!(
        (2..=3).contains(&fetches),
        "the aborted fill was not stored ({fetches} fetches)"
    );
    let hit = get(&node, "/cut", &[]).await;
    assert!(hit.complete && hit.cache_status().contains("hit"));
    assert_eq!(origin.count("/cut"), fetches);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_input_gets_the_documented_4xx_and_the_node_keeps_serving() {
    let (origin, node) = setup("").await;
    origin.fixed(
        "/ok",
        Reply::ok("fine").header("cache-control", "max-age=60"),
    );
    let huge = "a".repeat(40 * 1024);
    let r = get(&node, "/ok", &[("x-junk", huge.as_str())]).await;
    assert_eq!(r.status, 431);
    assert!(r.cache_status().contains("detail=headers-too-large"));
    let r = client::get(node.listen, "bad host!", "/ok", &[])
        .await
        .expect("exchange");
    assert_eq!(r.status, 400);
    assert!(r.cache_status().contains("detail=bad-host"));
    let r = client::send_raw(node.listen, b"GARBAGE\r\n\r\n", false)
        .await
        .expect("exchange");
    assert_eq!(r.status, 400);
    let r = client::send_raw(
        node.listen,
        b"GET /ok HTTP/1.1\r\nHost: example.test\r\nHost: other.test\r\nConnection: close\r\n\r\n",
        false,
    )
    .await
    .expect("exchange");
    assert_eq!(r.status, 400);
    let r = client::get(node.listen, "unknown.test", "/ok", &[])
        .await
        .expect("exchange");
    assert_eq!(r.status, 421);
    assert!(r.cache_status().contains("detail=unknown-host"));
    assert_eq!(
        r.text(),
        "421 no origin is configured for this host (unknown-host)\n"
    );
    let r = get(&node, "/ok", &[("stratus-ctx", "forged")]).await;
    assert_eq!((r.status, r.text().as_str()), (200, "fine"));
    assert_eq!(
        origin.requests("/ok")[0].header("stratus-ctx"),
        None,
        "client control headers never reach an origin"
    );
    assert_eq!(origin.count("/ok"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_api_reports_and_purges() {
    let (origin, node) = setup("").await;
    origin.fixed(
        "/p",
        Reply::ok("purge me").header("cache-control", "max-age=60"),
    );
    get(&node, "/p", &[]).await;
    let m = client::get(node.admin, "admin", "/metrics", &[])
        .await
        .expect("metrics");
    let text = m.text();
    for name in [
        "stratus_requests_total",
        "stratus_origin_requests_total 1",
        "stratus_cache_objects 1",
        "stratus_cache_bytes",
        "stratus_spans_dropped_total 0",
    ] {
        assert!(text.contains(name), "missing {name} in\n{text}");
    }
    let body = r#"{"url": "http://example.test/p"}"#;
    let len = body.len().to_string();
    let raw = format!("POST /purge HTTP/1.1\r\nHost: admin\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n{body}");
    let purged = client::send_raw(node.admin, raw.as_bytes(), false)
        .await
        .expect("purge");
    assert_eq!(purged.status, 200);
    assert!(purged.text().contains("\"purged\""), "{}", purged.text());
    get(&node, "/p", &[]).await;
    assert_eq!(origin.count("/p"), 2, "purged objects are fetched again");
    let bad = client::send_raw(
        node.admin,
        b"POST /purge HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
        false,
    )
    .await
    .expect("bad purge");
    assert_eq!(bad.status, 400);
}
