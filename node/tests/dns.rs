//! Names, against an in-test name server. Origins given by name: resolved asynchronously, each
//! answer reused for its TTL, and a lookup bounded by the origin's connect timeout (a silent
//! or lying name server costs a clean 502, never a hung request). Upper members given by name:
//! every address the name resolves to is a member, followed as the answer changes, kept while
//! the name server is silent.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use stratus_chaos::{client, NodeProcess, OriginEntry, Reply, TestDns, TestOrigin, TEST_SECRET};

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

/// The `addr`s of the members `/ring` lists, sorted.
async fn ring(lower: &NodeProcess) -> Vec<String> {
    let text = client::get(lower.admin, "admin", "/ring", &[])
        .await
        .expect("ring")
        .text();
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    let mut addrs: Vec<String> = v["upper"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| m["addr"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    addrs.sort();
    addrs
}

/// Polls `/ring` until it lists exactly `want` (bounded); returns what it listed last.
async fn ring_becomes(lower: &NodeProcess, want: &[String]) -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let now = ring(lower).await;
        if now == want || std::time::Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upper_members_follow_a_dns_name() {
    let origin = TestOrigin::start().await.expect("origin");
    for i in 0..30 {
        origin.fixed(
            &format!("/m/{i}"),
            Reply::ok("v").header("cache-control", "no-store"),
        );
    }
    let dns = TestDns::start().await.expect("name server");
    // Two uppers on one port of two loopback addresses, as pods behind a headless service.
    let port = stratus_chaos::free_port().expect("port").port();
    let ips = [Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3)];
    let mut uppers = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        let listen = std::net::SocketAddr::from((*ip, port));
        let admin = stratus_chaos::free_port().expect("port");
        let toml = format!(
            "[node]\nname = \"pod-{i}\"\nrole = \"upper\"\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\ngrace_period = \"1s\"\n\n[tier]\nsecret = \"{TEST_SECRET}\"\n\n[[origin]]\nhost = \"example.test\"\naddress = \"{}\"\n",
            origin.addr()
        );
        uppers.push(
            NodeProcess::start_with(bin(), &format!("pod-{i}"), listen, admin, &toml)
                .await
                .expect("upper"),
        );
    }
    let name = "uppers.svc.test";
    dns.set_all(name, &ips[..1], 1);
    let (listen, admin) = (
        stratus_chaos::free_port().expect("port"),
        stratus_chaos::free_port().expect("port"),
    );
    let toml = format!(
        "[node]\nname = \"edge\"\nrole = \"lower\"\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\ngrace_period = \"1s\"\n\n[tier]\nsecret = \"{TEST_SECRET}\"\nupper = [{{ dns = \"{name}:{port}\" }}]\nprobe_interval = \"200ms\"\n\n[dns]\nnameservers = [\"{}\"]\n\n[[origin]]\nhost = \"example.test\"\naddress = \"{}\"\n",
        dns.addr(),
        origin.addr()
    );
    let lower = NodeProcess::start_with(bin(), "edge", listen, admin, &toml)
        .await
        .expect("lower");
    let member = |ip: &Ipv4Addr| format!("{ip}:{port}");
    let served_by = |lower: &NodeProcess| {
        let listen = lower.listen;
        async move {
            let mut by = Vec::new();
            for i in 0..30 {
                let r = client::get(listen, "example.test", &format!("/m/{i}"), &[])
                    .await
                    .expect("exchange");
                assert_eq!(r.status, 200, "{}", r.cache_status());
                by.push(r.cache_status().split(';').next().unwrap_or("").to_string());
            }
            by.sort();
            by.dedup();
            by
        }
    };

    // One address: one member, and it serves every key.
    let one = vec![member(&ips[0])];
    assert_eq!(ring_becomes(&lower, &one).await, one);
    assert_eq!(served_by(&lower).await, ["pod-0"]);

    // The service grows: the new address becomes a member within its TTL and takes keys.
    dns.set_all(name, &ips, 1);
    let both: Vec<String> = ips.iter().map(member).collect();
    assert_eq!(ring_becomes(&lower, &both).await, both);
    assert_eq!(served_by(&lower).await, ["pod-0", "pod-1"]);

    // A silent name server past the TTL empties nothing: once a lookup has given up (its
    // warning logged), the members are still there.
    dns.set_silent(true);
    let gave_up = stratus_chaos::eventually(Duration::from_secs(20), || async {
        lower
            .log()
            .contains("lookup failed; keeping the last answer")
    })
    .await;
    assert!(gave_up, "no lookup gave up:\n{}", lower.log());
    assert_eq!(
        ring(&lower).await,
        both,
        "a DNS outage must not drop members"
    );
    assert_eq!(served_by(&lower).await, ["pod-0", "pod-1"]);

    // It shrinks: the address that left is no member any more.
    dns.set_silent(false);
    dns.set_all(name, &ips[1..], 1);
    let second = vec![member(&ips[1])];
    assert_eq!(ring_becomes(&lower, &second).await, second);
    assert_eq!(served_by(&lower).await, ["pod-1"]);
    assert!(!lower.log().contains(" ERROR "), "{}", lower.log());
    drop(uppers);
}
