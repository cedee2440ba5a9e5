//! Fleet integrity, from the attacker's side: no client and no origin can steer the fleet's
//! control state (which members are up, which contexts an upper accepts, what a key stands
//! for). One test per row of the fleet-integrity table, each starting from the attack itself,
//! on real processes with the binary's **default** timeouts, asserting that the member stays
//! up (`/ring`), that innocent clients see no errors, and that the error lands on the party
//! that caused it.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use stratus_chaos::{
    client, eventually, Fleet, FleetOptions, FleetSpec, NodeProcess, OriginEntry, Reply,
    TestOrigin, TEST_SECRET,
};
#[path = "support/mod.rs"]
mod support;
use support::signed_context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const HOST: &str = "example.test";

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_stratus"))
}

/// A fleet with the binary's default timeouts and probe settings, mutual TLS between tiers.
async fn fleet(lowers: usize, uppers: usize, lower_extra: &str) -> (TestOrigin, Fleet) {
    fleet_with(lowers, uppers, lower_extra, false).await
}

/// [`fleet`] with plain HTTP between the tiers, for a test that talks to an upper itself
/// without a certificate: the context alone must hold there.
async fn plain_fleet(lowers: usize, uppers: usize) -> (TestOrigin, Fleet) {
    fleet_with(lowers, uppers, "", true).await
}

async fn fleet_with(
    lowers: usize,
    uppers: usize,
    lower_extra: &str,
    plain_tiers: bool,
) -> (TestOrigin, Fleet) {
    let origin = TestOrigin::start().await.expect("origin starts");
    let spec = FleetSpec {
        lowers,
        uppers,
        origins: vec![OriginEntry::new(HOST, origin.addr())],
        lower_tier_extra: lower_extra.to_string(),
        common_extra: String::new(),
    };
    let options = FleetOptions {
        default_timeouts: true,
        plain_tiers,
        ..FleetOptions::default()
    };
    let fleet = Fleet::start_with(bin(), &spec, &options)
        .await
        .expect("fleet starts");
    (origin, fleet)
}

/// Whether every upper member is up in `lower`'s `/ring`.
async fn all_up(fleet: &Fleet, lower: usize) -> bool {
    let ring = fleet.ring(lower).await.expect("ring");
    let members = ring["upper"].as_array().cloned().unwrap_or_default();
    !members.is_empty() && members.iter().all(|m| m["health"]["state"] == "up")
}

/// Asserts every member stays up in every lower's view, over a few probe intervals (a member
/// marked down would show within one).
async fn assert_members_stay_up(fleet: &Fleet, what: &str) {
    let end = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < end {
        for lower in 0..fleet.lowers.len() {
            let ring = fleet.ring(lower).await.expect("ring");
            assert!(
                all_up(fleet, lower).await,
                "{what}: a member is down: {ring}"
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The lower's count of member failures, by outcome, from `/metrics`.
async fn member_failures(fleet: &Fleet, lower: usize) -> u64 {
    let text = fleet
        .metrics(fleet.lowers[lower].admin)
        .await
        .expect("metrics");
    text.lines()
        .filter(|l| l.starts_with("stratus_upper_requests_total") && !l.contains("outcome=\"ok\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Serves `path` with a cacheable body.
fn cacheable(origin: &TestOrigin, path: &str) {
    let body = format!("body of {path}");
    origin.fixed(path, Reply::ok(body).header("cache-control", "max-age=600"));
}

/// Innocent clients: `n` requests for distinct cacheable keys, all must be 200 and whole.
async fn innocents(fleet: &Fleet, origin: &TestOrigin, tag: &str, n: usize) {
    for i in 0..n {
        let path = format!("/innocent/{tag}/{i}");
        cacheable(origin, &path);
        let lower = fleet.lowers[i % fleet.lowers.len()].listen;
        let r = client::get(lower, HOST, &path, &[])
            .await
            .expect("exchange");
        assert_eq!(r.status, 200, "innocent {path}: {}", r.cache_status());
        assert!(r.complete && r.text() == format!("body of {path}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn loop_headers_from_a_client_are_refused_at_the_lower() {
    let (origin, fleet) = fleet(1, 2, "").await;
    let lower = fleet.lowers[0].listen;
    let looped = ["stratus"; 7].join(", ");
    // Bursts of looped requests, interleaved with innocent ones.
    for burst in 0..4 {
        for i in 0..6 {
            let path = format!("/loop/{burst}/{i}");
            cacheable(&origin, &path);
            let r = client::get(lower, HOST, &path, &[("cdn-loop", &looped)])
                .await
                .expect("exchange");
            assert_eq!(r.status, 508, "{}", r.text());
            let cs = r.cache_status();
            assert!(
                cs.starts_with("edge-1;") && cs.contains("detail=loop"),
                "the lower answers itself: {cs}"
            );
        }
        innocents(&fleet, &origin, &format!("loop{burst}"), 3).await;
    }
    assert_eq!(origin.count("/loop/0/0"), 0);
    assert_eq!(
        member_failures(&fleet, 0).await,
        0,
        "a loop never counts against a member"
    );
    assert_members_stay_up(&fleet, "after looped requests").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn loop_headers_cannot_switch_the_shield_off() {
    let (origin, fleet) = fleet(1, 2, "on_all_upper_down = \"origin\"").await;
    let lower = fleet.lowers[0].listen;
    let looped = ["stratus"; 7].join(", ");
    for i in 0..12 {
        let path = format!("/shield/{i}");
        cacheable(&origin, &path);
        let r = client::get(lower, HOST, &path, &[("cdn-loop", &looped)])
            .await
            .expect("exchange");
        assert_eq!(r.status, 508);
    }
    let direct: usize = (0..12).map(|i| origin.count(&format!("/shield/{i}"))).sum();
    assert_eq!(
        direct, 0,
        "no looped request reached the origin, directly or not"
    );
    innocents(&fleet, &origin, "shield", 4).await;
    assert_eq!(member_failures(&fleet, 0).await, 0);
    for r in origin.all_requests() {
        let loops = r.headers.iter().filter(|(k, _)| k == "cdn-loop").count();
        assert_eq!(
            loops, 2,
            "innocent requests came through both tiers: {:?}",
            r.headers
        );
    }
    assert_members_stay_up(&fleet, "after looped requests").await;
}

/// Sends a POST promising 100 body bytes, sends 10, then either closes (abort) or waits for
/// whatever answer comes; returns the status line's code, if any.
async fn stalled_post(
    lower: std::net::SocketAddr,
    path: &str,
    abort_after: Option<Duration>,
) -> Option<u16> {
    let mut s = tokio::net::TcpStream::connect(lower).await.ok()?;
    let head =
        format!("POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 100\r\n\r\n0123456789");
    s.write_all(head.as_bytes()).await.ok()?;
    if let Some(after) = abort_after {
        tokio::time::sleep(after).await;
        return None; // dropping the stream closes it
    }
    // Read until a response head is complete, the peer closes, or the deadline passes: the
    // connection may stay open afterwards (the unread body), so EOF is not awaited.
    let started = Instant::now();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while started.elapsed() < Duration::from_secs(90) {
        let left = Duration::from_secs(90).saturating_sub(started.elapsed());
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
        if let Ok(r) = client::parse(&buf, true) {
            println!(
                "stalled POST answered {} after {:?}",
                r.status,
                started.elapsed()
            );
            return Some(r.status);
        }
    }
    println!(
        "stalled POST: no answer, connection ended after {:?}",
        started.elapsed()
    );
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_and_aborted_uploads_are_the_clients_failure() {
    let (origin, fleet) = fleet(1, 1, "").await;
    origin.fixed("/upload", Reply::ok("stored").status(201));
    let lower = fleet.lowers[0].listen;
    let aborts: Vec<_> = (0..3)
        .map(|_| {
            tokio::spawn(stalled_post(
                lower,
                "/upload",
                Some(Duration::from_millis(500)),
            ))
        })
        .collect();
    let stalls: Vec<_> = (0..3)
        .map(|_| tokio::spawn(stalled_post(lower, "/upload", None)))
        .collect();
    for a in aborts {
        let _ = a.await;
    }
    innocents(&fleet, &origin, "upload", 3).await;
    for s in stalls {
        let status = s.await.expect("stalled client task");
        // The client that stopped sending gets 408 (or a closed connection), never a 5xx
        // that would blame the tiers.
        assert!(
            matches!(status, None | Some(408)),
            "stalled client got {status:?}"
        );
    }
    assert_eq!(
        member_failures(&fleet, 0).await,
        0,
        "no stall counted against the member"
    );
    assert_members_stay_up(&fleet, "after stalled uploads").await;
    innocents(&fleet, &origin, "upload-after", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_origin_never_marks_its_upper_down() {
    let (origin, fleet) = fleet(1, 1, "").await;
    origin.fixed(
        "/slow",
        Reply::ok("slow body")
            .header("cache-control", "max-age=600")
            .delay(Duration::from_secs(6)),
    );
    origin.fixed("/slow2", Reply::ok("slow 2").delay(Duration::from_secs(6)));
    origin.fixed("/slow3", Reply::ok("slow 3").delay(Duration::from_secs(6)));
    let lower = fleet.lowers[0].listen;
    let gets: Vec<_> = ["/slow", "/slow2", "/slow3"]
        .into_iter()
        .map(|p| tokio::spawn(async move { client::get(lower, HOST, p, &[]).await }))
        .collect();
    innocents(&fleet, &origin, "slow", 3).await;
    for g in gets {
        let r = g.await.expect("task").expect("exchange");
        assert_eq!(
            r.status,
            200,
            "the upper waits for its origin: {}",
            r.cache_status()
        );
    }
    assert_eq!(member_failures(&fleet, 0).await, 0);
    assert_members_stay_up(&fleet, "after a slow origin").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_origins_stratus_generated_header_blames_nobody() {
    let (origin, fleet) = fleet(1, 1, "").await;
    origin.fixed(
        "/forged",
        Reply::ok("no")
            .status(403)
            .header("stratus-generated", "member; bad-context-signature; AAAA")
            .header("cache-control", "max-age=600"),
    );
    let lower = fleet.lowers[0].listen;
    for _ in 0..8 {
        let r = client::get(lower, HOST, "/forged", &[])
            .await
            .expect("exchange");
        assert_eq!(r.status, 403, "the origin's 403 passes through");
        assert!(
            r.header("stratus-generated").is_none(),
            "the header never reaches a client"
        );
    }
    assert_eq!(origin.count("/forged"), 1, "cached once, still harmless");
    assert_eq!(member_failures(&fleet, 0).await, 0);
    assert_members_stay_up(&fleet, "after forged marks").await;
    innocents(&fleet, &origin, "forged", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fetch_after_a_lock_wait_carries_a_fresh_context() {
    let (origin, fleet) = fleet(1, 1, "").await;
    // The first fill takes 12 s: longer than the 10 s lock wait and the context's 10 s age.
    origin.route("/held", |_, nth| {
        let r = Reply::ok(format!("held {nth}")).header("cache-control", "max-age=600");
        if nth == 0 {
            r.delay(Duration::from_secs(12))
        } else {
            r
        }
    });
    let lower = fleet.lowers[0].listen;
    let first = tokio::spawn(async move { client::get(lower, HOST, "/held", &[]).await });
    assert!(
        eventually(Duration::from_secs(5), || async {
            origin.count("/held") == 1
        })
        .await
    );
    let second = client::get(lower, HOST, "/held", &[])
        .await
        .expect("exchange");
    assert_eq!(
        second.status,
        200,
        "the waiter is served: {}",
        second.cache_status()
    );
    let first = first.await.expect("task").expect("exchange");
    assert_eq!(first.status, 200);
    let refusals = fleet.metrics(fleet.uppers[0].admin).await.expect("metrics");
    assert!(
        !refusals.contains("stratus_context_refusals_total{"),
        "the upper refused a context:\n{refusals}"
    );
    assert_eq!(member_failures(&fleet, 0).await, 0);
    assert_members_stay_up(&fleet, "after a long lock wait").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_while_revalidate_refreshes_through_both_tiers() {
    let (origin, fleet) = fleet(1, 1, "").await;
    // Refreshes are held at the origin until the gate opens: clients must not wait for them.
    let gate = stratus_chaos::Gate::default();
    let held = gate.clone();
    origin.route("/swr", move |_, nth| {
        let r = Reply::ok(format!("version {nth}"))
            .header("cache-control", "max-age=1, stale-while-revalidate=60");
        if nth == 0 {
            r
        } else {
            r.hold(&held)
        }
    });
    let lower = fleet.lowers[0].listen;
    let first = client::get(lower, HOST, "/swr", &[])
        .await
        .expect("exchange");
    assert_eq!((first.status, first.text().as_str()), (200, "version 0"));
    let seen = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let refreshed = eventually(Duration::from_secs(15), || {
        let (seen, origin) = (seen.clone(), &origin);
        async move {
            let r = client::get(lower, HOST, "/swr", &[])
                .await
                .expect("exchange");
            seen.lock().push((r.status, r.cache_status(), r.text()));
            origin.count("/swr") >= 2
        }
    })
    .await;
    // The refresh is now waiting at the origin; clients are still served the stale copy.
    for _ in 0..5 {
        let at = Instant::now();
        let r = client::get(lower, HOST, "/swr", &[])
            .await
            .expect("exchange");
        assert_eq!(r.text(), "version 0", "{}", r.cache_status());
        assert!(
            at.elapsed() < Duration::from_secs(5),
            "a client waited for the refresh"
        );
    }
    gate.open();
    let seen = seen.lock().clone();
    assert!(
        refreshed,
        "a background refresh reached the origin: {seen:?}"
    );
    for (status, cs, text) in &seen {
        assert_eq!(*status, 200, "{cs}");
        assert_eq!(text, "version 0", "served while the refresh was held: {cs}");
        // The lower never holds the object fresher than the origin allowed (max-age=1).
        let ours = cs.rsplit(',').next().unwrap_or("");
        if let Some(ttl) = ours.split(';').find_map(|p| p.trim().strip_prefix("ttl=")) {
            assert!(
                ttl.parse::<i64>().is_ok_and(|t| t <= 1),
                "stored as fresh: {cs}"
            );
        }
    }
    let upper_metrics = fleet.metrics(fleet.uppers[0].admin).await.expect("metrics");
    assert!(
        !upper_metrics.contains("replayed-context"),
        "{upper_metrics}"
    );
    let fresh = eventually(Duration::from_secs(10), || async {
        client::get(lower, HOST, "/swr", &[])
            .await
            .is_ok_and(|r| r.text() != "version 0")
    })
    .await;
    assert!(fresh, "the refreshed object reaches the client");
    assert_eq!(member_failures(&fleet, 0).await, 0);
    assert_members_stay_up(&fleet, "after refreshes").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_context_is_accepted_once_by_its_recipient_only() {
    let (origin, mut fleet) = plain_fleet(1, 2).await;
    cacheable(&origin, "/ctx");
    let ctx = signed_context(HOST, "/ctx", "up-1", TEST_SECRET, SystemTime::now());
    let (up1, up2) = (fleet.uppers[0].listen, fleet.uppers[1].listen);
    let first = client::get(up1, HOST, "/ctx", &[("stratus-ctx", &ctx)])
        .await
        .expect("exchange");
    assert_eq!(first.status, 200);
    let other = client::get(up2, HOST, "/ctx", &[("stratus-ctx", &ctx)])
        .await
        .expect("exchange");
    assert_eq!(other.status, 403);
    assert!(
        other.cache_status().contains("misdirected-context"),
        "{}",
        other.cache_status()
    );
    let again = client::get(up1, HOST, "/ctx", &[("stratus-ctx", &ctx)])
        .await
        .expect("exchange");
    assert!(again.cache_status().contains("replayed-context"));
    fleet.uppers[0].restart().await.expect("restart");
    let after = client::get(up1, HOST, "/ctx", &[("stratus-ctx", &ctx)])
        .await
        .expect("exchange");
    assert_eq!(
        after.status, 403,
        "a restart empties the replay cache but not the rule"
    );
    assert!(
        after.cache_status().contains("context-before-start"),
        "{}",
        after.cache_status()
    );
    assert_eq!(origin.count("/ctx"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_host_sent_upstream_is_the_one_the_key_names() {
    let (origin, fleet) = fleet(1, 1, "").await;
    origin.route("/go", |req, _| {
        let host = req.header("host").unwrap_or("").to_string();
        Reply::ok("moved")
            .status(301)
            .header("location", &format!("http://{host}/landing"))
            .header("cache-control", "max-age=600")
    });
    let lower = fleet.lowers[0].listen;
    let attack = client::get(lower, "example.test:1337", "/go", &[])
        .await
        .expect("exchange");
    assert_eq!(
        attack.header("location"),
        Some("http://example.test/landing")
    );
    let victim = client::get(lower, HOST, "/go", &[])
        .await
        .expect("exchange");
    assert_eq!(
        victim.header("location"),
        Some("http://example.test/landing")
    );
    let seen = origin.requests("/go");
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].header("host"),
        Some(HOST),
        "the origin saw the key's host"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_targets_that_could_replace_a_key_are_refused() {
    let (origin, fleet) = fleet(1, 1, "").await;
    origin.route("/", |_, nth| {
        Reply::ok(format!("home {nth}")).header("cache-control", "max-age=600")
    });
    origin
        .fallback(|_, nth| Reply::ok(format!("evil {nth}")).header("cache-control", "max-age=600"));
    let lower = fleet.lowers[0].listen;
    let home = client::get(lower, HOST, "/", &[]).await.expect("exchange");
    assert_eq!(home.text(), "home 0");
    for raw in [
        &b"GET foo:bar HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n"[..],
        b"GET /caf\xc3 HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n",
        b"GET example.test/ HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n",
    ] {
        let r = client::send_raw(lower, raw, false).await.expect("exchange");
        assert_eq!(
            r.status,
            400,
            "{:?}: {}",
            String::from_utf8_lossy(raw),
            r.text()
        );
    }
    let home = client::get(lower, HOST, "/", &[]).await.expect("exchange");
    assert_eq!(home.text(), "home 0", "the cached homepage is untouched");
    // A fragment is not part of the target: absolute-form with one is the same key, and the
    // context signed for it still verifies at the upper.
    let raw = b"GET http://example.test/#frag HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n";
    let r = client::send_raw(lower, raw, false).await.expect("exchange");
    assert_eq!(
        (r.status, r.text().as_str()),
        (200, "home 0"),
        "{}",
        r.cache_status()
    );
    assert_eq!(origin.total(), 1, "no refused target reached the origin");
    assert_eq!(member_failures(&fleet, 0).await, 0);
}

/// The upper named first in a `Cache-Status`.
fn served_by(cs: &str) -> String {
    cs.split(';').next().unwrap_or("").trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn purge_reaches_every_upper_including_failover_copies() {
    let (origin, mut fleet) = fleet(2, 2, "").await;
    origin.route("/p", |_, nth| {
        Reply::ok(format!("v{nth}")).header("cache-control", "max-age=600")
    });
    let r = client::get(fleet.lowers[0].listen, HOST, "/p", &[])
        .await
        .expect("exchange");
    let owner = served_by(&r.cache_status());
    let owner_i = if owner == "up-1" { 0 } else { 1 };
    // The owner dies; edge-2 fails over and the other upper now holds a copy (v1).
    fleet.uppers[owner_i].kill_hard();
    let r = client::get(fleet.lowers[1].listen, HOST, "/p", &[])
        .await
        .expect("exchange");
    assert_eq!(r.text(), "v1", "{}", r.cache_status());
    fleet.uppers[owner_i].restart().await.expect("restart");
    assert!(
        eventually(Duration::from_secs(10), || async {
            all_up(&fleet, 0).await
        })
        .await
    );
    let answer = reqwest_purge(fleet.lowers[0].admin, "http://example.test/p").await;
    for name in ["up-1", "up-2", "edge-1"] {
        assert!(
            answer.contains(&format!("\"node\": \"{name}\"")),
            "purge names {name}: {answer}"
        );
    }
    assert!(!answer.contains("error"), "{answer}");
    // The owner dies again: edge-1's failover must not find the old failover copy.
    fleet.uppers[owner_i].kill_hard();
    let r = client::get(fleet.lowers[0].listen, HOST, "/p", &[])
        .await
        .expect("exchange");
    assert_eq!(r.text(), "v2", "{}", r.cache_status());
}

async fn reqwest_purge(admin: std::net::SocketAddr, url: &str) -> String {
    let body = format!("{{\"url\": \"{url}\"}}");
    let raw = format!(
        "POST /purge HTTP/1.1\r\nHost: admin\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    client::send_raw(admin, raw.as_bytes(), false)
        .await
        .expect("purge")
        .text()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_with_the_wrong_secret_stays_down() {
    let (origin, mut fleet) = fleet(1, 2, "").await;
    let path = fleet.uppers[1].config_path.clone();
    let toml = std::fs::read_to_string(&path).expect("config");
    fleet.uppers[1]
        .rewrite_config(&toml.replace(TEST_SECRET, "another-fleet-secret-0123456789abcdef"))
        .expect("rewrite");
    fleet.uppers[1].restart().await.expect("restart");
    let down = eventually(Duration::from_secs(10), || async {
        !all_up(&fleet, 0).await
    })
    .await;
    assert!(
        down,
        "readiness probes with a signed context find the wrong secret"
    );
    let ring = fleet.ring(0).await.expect("ring");
    assert!(
        ring.to_string().contains("probe failed: status 403"),
        "/ring says why: {ring}"
    );
    // It stays down over several probe rounds (liveness alone would bring it back), and
    // clients see no errors meanwhile.
    innocents(&fleet, &origin, "secret", 12).await;
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        let ring = fleet.ring(0).await.expect("ring");
        let states: Vec<_> = ring["upper"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|m| m["health"]["state"].clone())
            .collect();
        assert!(states.iter().any(|s| s == "down"), "rejoined: {ring}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let metrics = fleet.metrics(fleet.lowers[0].admin).await.expect("metrics");
    assert!(metrics.contains("stratus_upper_down_reason{"), "{metrics}");
}

/// libfaketime, which `scripts/setup.sh faketime` installs (Debian's `faketime` package).
fn libfaketime() -> &'static str {
    let candidates = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ];
    candidates
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("libfaketime is installed (scripts/setup.sh faketime)")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_with_a_skewed_clock_stays_down() {
    let (origin, mut fleet) = fleet(1, 2, "").await;
    // up-2's wall clock runs a minute ahead: every context it receives looks expired.
    fleet.uppers[1].set_env("LD_PRELOAD", libfaketime());
    fleet.uppers[1].set_env("FAKETIME", "+60s");
    fleet.uppers[1].set_env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    fleet.uppers[1].restart().await.expect("restart");
    let down = eventually(Duration::from_secs(10), || async {
        !all_up(&fleet, 0).await
    })
    .await;
    assert!(down, "readiness probes find the skewed clock");
    let ring = fleet.ring(0).await.expect("ring");
    assert!(
        ring.to_string().contains("probe failed: status 403"),
        "{ring}"
    );
    let refusals = fleet.metrics(fleet.uppers[1].admin).await.expect("metrics");
    assert!(
        refusals.contains("expired-context"),
        "the member says why:\n{refusals}"
    );
    innocents(&fleet, &origin, "skew", 12).await;
    let end = Instant::now() + Duration::from_secs(3);
    while Instant::now() < end {
        assert!(!all_up(&fleet, 0).await, "the skewed member rejoined");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn probes_never_overlap() {
    let origin = TestOrigin::start().await.expect("origin starts");
    let spec = FleetSpec {
        lowers: 1,
        uppers: 1,
        origins: vec![OriginEntry::new(HOST, origin.addr())],
        lower_tier_extra: String::new(),
        common_extra: String::new(),
    };
    let options = FleetOptions {
        default_timeouts: true,
        link_proxies: true,
        ..FleetOptions::default()
    };
    let fleet = Fleet::start_with(bin(), &spec, &options)
        .await
        .expect("fleet starts");
    // A blackholed member: each probe waits out its 1 s timeout. Rounds that overlapped (the
    // old 5.5 s timeout every 1 s) would hold several probe connections open at once.
    let link = fleet.link(0, 0);
    link.set(stratus_chaos::Fault::Blackhole);
    link.sever();
    let before = link.connections();
    let down = eventually(Duration::from_secs(15), || async {
        !all_up(&fleet, 0).await
    })
    .await;
    assert!(down, "a blackholed member is marked down");
    // Let a few more rounds happen while it is down (probes continue), then look.
    let more = eventually(Duration::from_secs(15), || async {
        link.connections() >= before + 5
    })
    .await;
    assert!(more, "probes continue while the member is down");
    assert_eq!(link.peak_open(), 1, "probe connections overlapped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_clients_forwarding_headers_never_reach_the_origin() {
    let (origin, fleet) = fleet(1, 1, "").await;
    let standalone =
        NodeProcess::start(bin(), "solo", &[OriginEntry::new(HOST, origin.addr())], "")
            .await
            .expect("standalone node");
    origin.fixed("/fwd", Reply::ok("f").header("cache-control", "no-store"));
    // What a poisoning attempt sends: another host, another client, another path.
    let hostile = [
        ("x-forwarded-host", "evil.test"),
        ("x-forwarded-for", "6.6.6.6"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-port", "8443"),
        ("forwarded", "for=6.6.6.6;host=evil.test;proto=https"),
        ("x-real-ip", "6.6.6.6"),
        ("x-original-url", "/admin"),
        ("x-rewrite-url", "/admin"),
    ];
    for (name, addr) in [
        ("tiered", fleet.lowers[0].listen),
        ("standalone", standalone.listen),
    ] {
        let before = origin.requests("/fwd").len();
        let r = client::get(addr, HOST, "/fwd", &hostile)
            .await
            .expect("exchange");
        assert_eq!(r.status, 200, "{name}");
        let seen = origin.requests("/fwd");
        assert_eq!(seen.len(), before + 1, "{name}");
        let at_origin = &seen[before];
        for (field, value) in &at_origin.headers {
            assert!(
                !value.contains("evil") && !value.contains("6.6.6.6") && !value.contains("admin"),
                "{name}: {field}: {value} reached the origin"
            );
        }
        assert_eq!(at_origin.header("x-forwarded-host"), Some(HOST), "{name}");
        assert_eq!(
            at_origin.header("x-forwarded-for"),
            Some("127.0.0.1"),
            "{name}"
        );
        assert_eq!(
            at_origin.header("x-forwarded-proto"),
            Some("http"),
            "{name}"
        );
        assert_eq!(
            at_origin.header("forwarded"),
            Some("for=127.0.0.1;host=\"example.test\";proto=http"),
            "{name}"
        );
        for gone in [
            "x-forwarded-port",
            "x-real-ip",
            "x-original-url",
            "x-rewrite-url",
        ] {
            assert_eq!(at_origin.header(gone), None, "{name}: {gone}");
        }
    }
}

/// A live secret rotation in three reloads (accept the new one, sign with it, drop the old):
/// every node keeps serving through the tiers, no member is marked down, and afterwards a
/// context signed with the old secret — a leaked one — is refused by key id.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_secret_rotates_by_reloads_without_a_failed_request() {
    let (origin, mut fleet) = plain_fleet(1, 2).await;
    origin.fallback(|req, _| Reply::ok(format!("at {}", req.path)));
    const NEW: &str = "rotated-fleet-secret-fedcba9876543210";
    let steps = [
        format!("secret = \"{TEST_SECRET}\"\naccept_secrets = [\"{NEW}\"]"),
        format!("secret = \"{NEW}\"\naccept_secrets = [\"{TEST_SECRET}\"]"),
        format!("secret = \"{NEW}\""),
    ];
    let lower = fleet.lowers[0].listen;
    let mut n = 0;
    for step in &steps {
        // Uppers and lowers alternately, so every mix of old and new configs is served.
        let nodes = fleet.uppers.iter_mut().chain(fleet.lowers.iter_mut());
        for node in nodes {
            let toml: String = node
                .config_text()
                .expect("config")
                .lines()
                .filter(|l| !l.starts_with("secret = ") && !l.starts_with("accept_secrets = "))
                .map(|l| match l {
                    "[tier]" => format!("[tier]\n{step}\n"),
                    l => format!("{l}\n"),
                })
                .collect();
            node.reload(&toml, "ok").await.expect("reload applied");
            n += 1;
            let r = client::get(lower, HOST, &format!("/rot/{n}"), &[])
                .await
                .expect("exchange");
            assert_eq!(r.status, 200, "after reload {n}: {}", r.cache_status());
            assert!(r.cache_status().contains("up-"), "{}", r.cache_status());
        }
    }
    assert_members_stay_up(&fleet, "after a rotation").await;
    let leaked = signed_context(HOST, "/rot/leak", "up-1", TEST_SECRET, SystemTime::now());
    let r = client::get(
        fleet.uppers[0].listen,
        HOST,
        "/rot/leak",
        &[("stratus-ctx", &leaked)],
    )
    .await
    .expect("exchange");
    assert_eq!(r.status, 403);
    assert!(
        r.cache_status().contains("unknown-context-key"),
        "{}",
        r.cache_status()
    );
    assert_eq!(origin.count("/rot/leak"), 0);
}

/// The admin API's guards: with a token, a purge without it is refused (401) and purges
/// nothing; with `guard_reads`, `/ring` and `/metrics` too, while `/healthz` stays open for
/// load balancers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_admin_token_guards_purges_and_optionally_reads() {
    let (origin, mut fleet) = fleet(1, 1, "").await;
    origin.route("/adm", |_, nth| {
        Reply::ok(format!("v{nth}")).header("cache-control", "max-age=600")
    });
    let lower = fleet.lowers[0].listen;
    let admin = fleet.lowers[0].admin;
    let first = client::get(lower, HOST, "/adm", &[])
        .await
        .expect("exchange");
    const TOKEN: &str = "admin-token-0123456789";
    let toml = fleet.lowers[0].config_text().expect("config");
    let with_token = format!("{toml}\n[admin]\ntoken = \"{TOKEN}\"\n");
    fleet.lowers[0]
        .reload(&with_token, "ok")
        .await
        .expect("reload");
    let purge = |auth: Option<&'static str>| async move {
        let body = "{\"url\": \"http://example.test/adm\"}";
        let auth = auth.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        let raw = format!(
            "POST /purge HTTP/1.1\r\nHost: admin\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        client::send_raw(admin, raw.as_bytes(), false)
            .await
            .expect("purge")
    };
    for wrong in [None, Some("admin-token-012345678X"), Some("short")] {
        assert_eq!(purge(wrong).await.status, 401, "{wrong:?}");
    }
    let hit = client::get(lower, HOST, "/adm", &[])
        .await
        .expect("exchange");
    assert_eq!(hit.text(), first.text(), "a refused purge purged nothing");
    // Reads guarded too (the reload cannot be counted through the now guarded /metrics).
    fleet.lowers[0]
        .rewrite_config(&format!("{with_token}guard_reads = true\n"))
        .expect("rewrite");
    fleet.lowers[0]
        .signal(stratus_chaos::Signal::SIGHUP)
        .expect("SIGHUP");
    let guarded = eventually(Duration::from_secs(10), || async {
        client::get(admin, "admin", "/ring", &[])
            .await
            .is_ok_and(|r| r.status == 401)
    })
    .await;
    assert!(guarded, "the reload guarded /ring");
    for path in ["/ring", "/metrics"] {
        let bare = client::get(admin, "admin", path, &[]).await.expect("get");
        assert_eq!(bare.status, 401, "{path}");
        let auth = format!("Bearer {TOKEN}");
        let ok = client::get(admin, "admin", path, &[("authorization", &auth)])
            .await
            .expect("get");
        assert_eq!(ok.status, 200, "{path}");
    }
    let health = client::get(admin, "admin", "/healthz", &[])
        .await
        .expect("get");
    assert_eq!(health.status, 200);
    assert_eq!(purge(Some(TOKEN)).await.status, 200);
    let after = client::get(lower, HOST, "/adm", &[])
        .await
        .expect("exchange");
    assert_ne!(
        after.text(),
        first.text(),
        "the authorized purge removed it"
    );
}
