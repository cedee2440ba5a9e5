//! Origins given by name: resolved asynchronously through the configured name servers, each
//! answer reused for its TTL, and a lookup bounded by the origin's connect timeout (a silent
//! or lying name server costs a clean 502, never a hung request).

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use stratus_chaos::{client, NodeProcess, OriginEntry, Reply, TestDns, TestOrigin};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_stratus"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn origins_by_name_are_cached_for_their_ttl_and_bounded_by_the_connect_timeout() {
    let origin = TestOrigin::start().await.expect("origin");
    let dns = TestDns::start().await.expect("name server");
    let port = origin.addr().port();
    let localhost = Ipv4Addr::LOCALHOST;
    dns.set("long.origin.test", localhost, 300);
    dns.set("short.origin.test", localhost, 1);
    // `silent.origin.test` is asked while the server is silent; `missing.origin.test` does not
    // exist (NXDOMAIN).
    let entries = [
        ("long.test", "long.origin.test"),
        ("short.test", "short.origin.test"),
        ("silent.test", "silent.origin.test"),
        ("missing.test", "missing.origin.test"),
    ]
    .map(|(host, name)| OriginEntry::new(host, format!("{name}:{port}")));
    let extra = format!("[dns]\nnameservers = [\"{}\"]\n", dns.addr());
    let node = NodeProcess::start(bin(), "dns", &entries, &extra)
        .await
        .expect("node");
    origin.fixed("/u", Reply::ok("fresh").header("cache-control", "no-store"));

    // Every request reaches the origin (nothing is stored), one lookup serves them all.
    for _ in 0..5 {
        let r = client::get(node.listen, "long.test", "/u", &[])
            .await
            .expect("exchange");
        assert_eq!(r.status, 200, "{}", r.cache_status());
    }
    assert_eq!(origin.count("/u"), 5);
    assert_eq!(
        dns.queries("long.origin.test"),
        1,
        "one lookup within the TTL"
    );

    // A 1 s TTL runs out: the next request asks again.
    let r = client::get(node.listen, "short.test", "/u", &[])
        .await
        .expect("exchange");
    assert_eq!(r.status, 200);
    assert_eq!(dns.queries("short.origin.test"), 1);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let r = client::get(node.listen, "short.test", "/u", &[])
        .await
        .expect("exchange");
    assert_eq!(r.status, 200);
    assert_eq!(
        dns.queries("short.origin.test"),
        2,
        "asked again after the TTL"
    );

    // A name that does not exist: a clean 502 naming DNS.
    let r = client::get(node.listen, "missing.test", "/u", &[])
        .await
        .expect("exchange");
    assert_eq!(r.status, 502);
    assert!(
        r.cache_status().contains("detail=dns-failed"),
        "{}",
        r.cache_status()
    );

    // A silent name server: the lookup gives up within the connect timeout; 502, not a hang.
    dns.set_silent(true);
    let r = client::get(node.listen, "silent.test", "/u", &[])
        .await
        .expect("exchange");
    assert_eq!(r.status, 502);
    assert!(
        r.cache_status().contains("detail=dns-failed"),
        "{}",
        r.cache_status()
    );
    // Names still cached keep working while the server is silent.
    let r = client::get(node.listen, "long.test", "/u", &[])
        .await
        .expect("exchange");
    assert_eq!(r.status, 200);
    assert_eq!(dns.queries("long.origin.test"), 1);
}
