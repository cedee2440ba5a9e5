//! Fleet tests: real processes on loopback (3 lower, 2 upper, 1 counting origin), as
//! INTERFACE.md "How requests flow" describes them.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use stratus_chaos::{
    client, eventually, Fleet, FleetOptions, FleetSpec, NodeProcess, OriginEntry, Reply,
    TestOrigin, TEST_SECRET,
};
#[path = "support/mod.rs"]
mod support;
use support::signed_context;

const HOST: &str = "example.test";

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_stratus"))
}

async fn start_fleet(lowers: usize, uppers: usize, extra: &str) -> (TestOrigin, Fleet) {
    start_fleet_with(lowers, uppers, extra, &FleetOptions::default()).await
}

/// A fleet whose tiers talk plain HTTP, for a test that talks to an upper itself.
async fn start_plain_fleet(lowers: usize, uppers: usize) -> (TestOrigin, Fleet) {
    let plain = FleetOptions {
        plain_tiers: true,
        ..FleetOptions::default()
    };
    start_fleet_with(lowers, uppers, "", &plain).await
}

async fn start_fleet_with(
    lowers: usize,
    uppers: usize,
    extra: &str,
    options: &FleetOptions,
) -> (TestOrigin, Fleet) {
    let origin = TestOrigin::start().await.expect("origin starts");
    let spec = FleetSpec {
        lowers,
        uppers,
        origins: vec![OriginEntry::new(HOST, origin.addr())],
        lower_tier_extra: extra.to_string(),
        common_extra: String::new(),
    };
    let fleet = Fleet::start_with(bin(), &spec, options)
        .await
        .expect("fleet starts");
    (origin, fleet)
}

fn key_path(i: usize) -> String {
    format!("/objects/{i}")
}

fn serve_keys(origin: &TestOrigin, n: usize) {
    for i in 0..n {
        let path = key_path(i);
        origin.fixed(
            &path,
            Reply::ok(format!("object {i}")).header("cache-control", "max-age=600"),
        );
    }
}

/// A Zipf(1.0) sampler over `n` ranks.
fn zipf(n: usize) -> impl FnMut(&mut StdRng) -> usize {
    let weights: Vec<f64> = (1..=n).map(|k| 1.0 / k as f64).collect();
    let total: f64 = weights.iter().sum();
    let mut cdf = Vec::with_capacity(n);
    let mut acc = 0.0;
    for w in weights {
        acc += w / total;
        cdf.push(acc);
    }
    move |rng: &mut StdRng| {
        let u: f64 = rng.gen();
        cdf.partition_point(|&c| c < u).min(n - 1)
    }
}

/// The upper node named first in a Cache-Status (nearest the origin), if any.
fn upper_entry(cache_status: &str) -> Option<String> {
    let first = cache_status.split(',').next()?.trim();
    let name = first.split(';').next()?.trim();
    name.starts_with("up-").then(|| name.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn zipf_workload_reaches_the_origin_once_per_key() {
    let (origin, fleet) = start_fleet(3, 2, "").await;
    let keys = 300;
    serve_keys(&origin, keys);
    let lowers: Vec<_> = fleet.lowers.iter().map(|n| n.listen).collect();
    let mut workers = Vec::new();
    for w in 0..8u64 {
        let lowers = lowers.clone();
        workers.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(w);
            let mut sample = zipf(keys);
            let mut seen: Vec<(usize, u16, String)> = Vec::new();
            for r in 0..250usize {
                let k = sample(&mut rng);
                let lower = lowers[(r + w as usize) % lowers.len()];
                let resp = client::get(lower, HOST, &key_path(k), &[])
                    .await
                    .expect("exchange");
                seen.push((k, resp.status, resp.cache_status()));
                assert_eq!(resp.text(), format!("object {k}"));
            }
            seen
        }));
    }
    let mut owners: HashMap<usize, HashSet<String>> = HashMap::new();
    let mut requested = HashSet::new();
    let mut total = 0;
    for w in workers {
        for (k, status, cs) in w.await.expect("worker") {
            total += 1;
            assert_eq!(status, 200);
            requested.insert(k);
            if let Some(up) = upper_entry(&cs) {
                owners.entry(k).or_default().insert(up);
            }
        }
    }
    for &k in &requested {
        assert_eq!(
            origin.count(&key_path(k)),
            1,
            "key {k} reached the origin more than once"
        );
        let o = owners.get(&k).map_or(0, HashSet::len);
        assert!(o <= 1, "key {k} shows several owners: {:?}", owners.get(&k));
    }
    let per_upper: HashMap<&String, usize> =
        owners.values().flatten().fold(HashMap::new(), |mut m, u| {
            *m.entry(u).or_default() += 1;
            m
        });
    assert_eq!(per_upper.len(), 2, "both uppers own keys: {per_upper:?}");
    println!(
        "zipf: {total} requests, {} distinct keys, {} origin requests ({:.3} per key), owners {per_upper:?}",
        requested.len(),
        requested.iter().map(|&k| origin.count(&key_path(k))).sum::<usize>(),
        requested.iter().map(|&k| origin.count(&key_path(k))).sum::<usize>() as f64 / requested.len() as f64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_an_upper_mid_run_fails_no_request() {
    let (origin, mut fleet) = start_fleet(3, 2, "").await;
    let keys = 120;
    serve_keys(&origin, keys);
    // Warm every key through edge-1 and learn its owner; edge-1 now holds them all.
    let mut owner = HashMap::new();
    for k in 0..keys {
        let r = client::get(fleet.lowers[0].listen, HOST, &key_path(k), &[])
            .await
            .expect("warm");
        assert_eq!(r.status, 200);
        owner.insert(
            k,
            upper_entry(&r.cache_status()).expect("a miss names its upper"),
        );
    }
    let lowers: Vec<_> = fleet.lowers.iter().map(|n| n.listen).collect();
    let progress = Arc::new(AtomicUsize::new(0));
    let done = progress.clone();
    let run = tokio::spawn(async move {
        let mut results = Vec::new();
        for round in 0..6 {
            for k in 0..keys {
                let lower = lowers[(k + round) % lowers.len()];
                let ok = match client::get(lower, HOST, &key_path(k), &[]).await {
                    Ok(r) => r.status == 200 && r.complete && r.text() == format!("object {k}"),
                    Err(_) => false,
                };
                results.push((k, lower, ok));
                done.fetch_add(1, Ordering::Relaxed);
            }
        }
        results
    });
    // Kill mid-run: after a sixth of the requests.
    let under_way = eventually(Duration::from_secs(20), || async {
        progress.load(Ordering::Relaxed) >= 120
    })
    .await;
    assert!(under_way, "the run did not get under way");
    let killed_at = Instant::now();
    fleet.uppers[0].kill_hard();
    let ring_of_edge3 = fleet.lowers[2].admin;
    let marked_down = eventually(Duration::from_secs(10), || async {
        client::get(ring_of_edge3, "admin", "/ring", &[])
            .await
            .is_ok_and(|r| r.text().contains("\"down\""))
    })
    .await;
    let down_after = killed_at.elapsed();
    let results = run.await.expect("run");
    let edge1 = fleet.lowers[0].listen;
    let mut errors = (0usize, 0usize, 0usize); // (owner alive, cached at the lower, other)
    for (k, lower, ok) in &results {
        if !ok {
            if owner[k] == "up-2" {
                errors.0 += 1;
            } else if *lower == edge1 {
                errors.1 += 1;
            } else {
                errors.2 += 1;
            }
        }
    }
    println!(
        "failover: {} requests, errors: owner alive {}, cached at lower {}, owner killed {}; marked down after {down_after:?}",
        results.len(),
        errors.0,
        errors.1,
        errors.2
    );
    assert!(marked_down, "edge-3 never marked up-1 down");
    assert_eq!(errors.0, 0, "keys whose owner is alive must not fail");
    assert_eq!(errors.1, 0, "keys cached at the lower must not fail");
    assert_eq!(
        errors.2, 0,
        "keys of the killed owner fail over to the next member"
    );
    // Bring up-1 back on its ports: a probe returns it to the ring.
    let toml = std::fs::read_to_string(&fleet.uppers[0].config_path).expect("config");
    let (listen, admin) = (fleet.uppers[0].listen, fleet.uppers[0].admin);
    let restarted_at = Instant::now();
    let back = NodeProcess::start_with(bin(), "up-1", listen, admin, &toml)
        .await
        .expect("restart");
    let marked_up = eventually(Duration::from_secs(10), || async {
        client::get(ring_of_edge3, "admin", "/ring", &[])
            .await
            .is_ok_and(|r| !r.text().contains("\"down\""))
    })
    .await;
    println!(
        "recovery: up-1 marked up {:?} after its restart began",
        restarted_at.elapsed()
    );
    assert!(marked_up, "a successful probe brings the member back");
    drop(back);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_or_replayed_contexts_never_reach_an_origin() {
    // Plain tiers: the context alone must hold (a host that got past mutual TLS, or a fleet
    // that runs without it).
    let (origin, fleet) = start_plain_fleet(1, 1).await;
    origin.fixed(
        "/secret",
        Reply::ok("s").header("cache-control", "max-age=600"),
    );
    origin.fixed(
        "/fresh",
        Reply::ok("f").header("cache-control", "max-age=600"),
    );
    let upper = fleet.uppers[0].listen;
    let now = SystemTime::now();
    let cases: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("none", vec![]),
        (
            "garbage",
            vec![("stratus-ctx", "not-a-context".to_string())],
        ),
        (
            "wrong secret",
            vec![(
                "stratus-ctx",
                signed_context(
                    HOST,
                    "/secret",
                    "up-1",
                    "another-secret-0123456789abcdefghij",
                    now,
                ),
            )],
        ),
        (
            "other path",
            vec![(
                "stratus-ctx",
                signed_context(HOST, "/fresh", "up-1", TEST_SECRET, now),
            )],
        ),
        (
            "expired",
            vec![(
                "stratus-ctx",
                signed_context(
                    HOST,
                    "/secret",
                    "up-1",
                    TEST_SECRET,
                    now - Duration::from_secs(60),
                ),
            )],
        ),
        ("oversized", vec![("stratus-ctx", "A".repeat(5000))]),
    ];
    for (what, headers) in &cases {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let r = client::get(upper, HOST, "/secret", &h)
            .await
            .expect("exchange");
        assert_eq!(r.status, 403, "{what}: {}", r.text());
        assert!(
            r.cache_status().contains("detail="),
            "{what}: {}",
            r.cache_status()
        );
    }
    assert_eq!(
        origin.count("/secret"),
        0,
        "no refused context reached the origin"
    );
    // A valid context is served once; the same context again is a replay.
    let valid = signed_context(HOST, "/fresh", "up-1", TEST_SECRET, SystemTime::now());
    let first = client::get(upper, HOST, "/fresh", &[("stratus-ctx", &valid)])
        .await
        .expect("exchange");
    assert_eq!(first.status, 200);
    let replay = client::get(upper, HOST, "/fresh", &[("stratus-ctx", &valid)])
        .await
        .expect("exchange");
    assert_eq!(replay.status, 403);
    assert!(replay.cache_status().contains("replayed-context"));
    assert_eq!(origin.count("/fresh"), 1);
    // A forged context sent to a lower is dropped there; the origin never sees any context.
    let r = client::get(
        fleet.lowers[0].listen,
        HOST,
        "/secret",
        &[("stratus-ctx", &valid)],
    )
    .await
    .expect("exchange");
    assert_eq!(r.status, 200);
    assert!(origin
        .requests("/secret")
        .iter()
        .all(|q| q.header("stratus-ctx").is_none()));
    assert!(r.header("stratus-ctx").is_none() && r.header("stratus-generated").is_none());
    let cs = r.cache_status();
    assert!(
        cs.starts_with("up-1; fwd=uri-miss") && cs.contains(", edge-1; fwd=uri-miss"),
        "{cs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_lower_counts_the_upper_age_against_freshness() {
    let (origin, fleet) = start_fleet(2, 1, "").await;
    origin.fixed(
        "/aged",
        Reply::ok("a")
            .header("cache-control", "max-age=600")
            .header("age", "100"),
    );
    let first = client::get(fleet.lowers[0].listen, HOST, "/aged", &[])
        .await
        .expect("miss");
    // The upper stored 600 - 100; edge-2 then gets the upper's hit with its Age.
    let second = client::get(fleet.lowers[1].listen, HOST, "/aged", &[])
        .await
        .expect("upper hit");
    let ttl = |cs: &str, node: &str| -> i64 {
        let entry = cs
            .split(',')
            .map(str::trim)
            .find(|e| e.starts_with(node))
            .unwrap_or_default();
        entry
            .split(';')
            .map(str::trim)
            .find_map(|p| p.strip_prefix("ttl="))
            .and_then(|t| t.parse().ok())
            .unwrap_or(i64::MAX)
    };
    for (r, edge) in [(&first, "edge-1"), (&second, "edge-2")] {
        let cs = r.cache_status();
        assert!(
            ttl(&cs, edge) <= 500,
            "{edge} must not restart freshness: {cs}"
        );
        assert!(ttl(&cs, edge) >= 495, "{cs}");
    }
    let age: u64 = second
        .header("age")
        .and_then(|a| a.parse().ok())
        .expect("age header");
    assert!(age >= 100, "age {age}");
    assert_eq!(origin.count("/aged"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn purge_on_a_lower_reaches_every_upper_then_itself() {
    let (origin, fleet) = start_fleet(2, 2, "").await;
    origin.fixed("/p", Reply::ok("v").header("cache-control", "max-age=600"));
    client::get(fleet.lowers[0].listen, HOST, "/p", &[])
        .await
        .expect("warm");
    let body = r#"{"url": "http://example.test/p"}"#;
    let raw = format!(
        "POST /purge HTTP/1.1\r\nHost: admin\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let r = client::send_raw(fleet.lowers[0].admin, raw.as_bytes(), false)
        .await
        .expect("purge");
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("json");
    let outcomes: Vec<(&str, &str)> = v["results"]
        .as_array()
        .expect("results")
        .iter()
        .filter_map(|x| Some((x["node"].as_str()?, x["outcome"].as_str()?)))
        .collect();
    // Every upper first (the owner held it, the other did not), then this node.
    assert_eq!(outcomes.len(), 3, "{v}");
    assert_eq!(outcomes[2], ("edge-1", "purged"), "{v}");
    let mut uppers: Vec<_> = outcomes[..2].to_vec();
    uppers.sort_by_key(|(_, o)| *o);
    assert_eq!(
        uppers.iter().map(|(_, o)| *o).collect::<Vec<_>>(),
        ["not_found", "purged"],
        "{v}"
    );
    assert!(
        uppers.iter().all(|(n, _)| n.starts_with("up-")),
        "by node name: {v}"
    );
    // edge-2 never cached it, so this goes to the upper, which must miss now.
    client::get(fleet.lowers[1].listen, HOST, "/p", &[])
        .await
        .expect("refetch");
    assert_eq!(origin.count("/p"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_every_upper_down_the_policy_decides() {
    let (origin, mut fleet) = start_fleet(1, 1, "on_all_upper_down = \"origin\"").await;
    origin.fixed(
        "/d",
        Reply::ok("direct").header("cache-control", "max-age=600"),
    );
    fleet.uppers[0].kill_hard();
    let r = client::get(fleet.lowers[0].listen, HOST, "/d", &[])
        .await
        .expect("exchange");
    assert_eq!((r.status, r.text().as_str()), (200, "direct"));
    assert!(!r.cache_status().contains("up-1"));

    let (origin, mut fleet) = start_fleet(1, 1, "on_all_upper_down = \"error\"").await;
    origin.fixed("/e", Reply::ok("e").header("cache-control", "max-age=600"));
    // Stored already stale (Age beyond max-age) but within stale-if-error.
    let stale = Reply::ok("stale ok")
        .header("cache-control", "max-age=10, stale-if-error=600")
        .header("age", "20");
    origin.fixed("/s", stale);
    let warm = client::get(fleet.lowers[0].listen, HOST, "/s", &[])
        .await
        .expect("warm");
    assert_eq!(warm.text(), "stale ok");
    fleet.uppers[0].kill_hard();
    let r = client::get(fleet.lowers[0].listen, HOST, "/s", &[])
        .await
        .expect("exchange");
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "stale ok"),
        "{}",
        r.cache_status()
    );
    let r = client::get(fleet.lowers[0].listen, HOST, "/e", &[])
        .await
        .expect("exchange");
    assert_eq!(r.status, 502);
    assert!(
        r.cache_status().contains("detail=all-upper-down")
            || r.cache_status().contains("detail=connection-refused"),
        "{}",
        r.cache_status()
    );
    assert_eq!(
        origin.count("/e"),
        0,
        "policy error never contacts the origin"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_origins_own_5xx_does_not_mark_an_upper_down() {
    let (origin, fleet) = start_fleet(1, 1, "").await;
    origin.fixed("/broken", Reply::ok("origin trouble").status(503));
    for _ in 0..10 {
        let r = client::get(fleet.lowers[0].listen, HOST, "/broken", &[])
            .await
            .expect("exchange");
        assert_eq!((r.status, r.text().as_str()), (503, "origin trouble"));
        assert!(r.header("stratus-generated").is_none());
    }
    let ring = client::get(fleet.lowers[0].admin, "admin", "/ring", &[])
        .await
        .expect("ring");
    assert!(
        ring.text().contains("\"up\"") && !ring.text().contains("\"down\""),
        "{}",
        ring.text()
    );
    let metrics = client::get(fleet.lowers[0].admin, "admin", "/metrics", &[])
        .await
        .expect("metrics")
        .text();
    assert!(
        metrics.contains("stratus_upper_requests_total{outcome=\"ok\""),
        "{metrics}"
    );
    assert_eq!(origin.count("/broken"), 10);
}
