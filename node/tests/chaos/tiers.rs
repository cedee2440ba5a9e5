//! Scenarios about the tiers themselves: members killed, hung, partitioned and upgraded, the
//! origin behind the uppers gone, herds on one key, and hostile clients against the fleet's
//! control state.
//!
//! Unless a scenario says otherwise, fleets use the harness's short timeouts, which keep the
//! defaults' nesting and ratios: lower→upper connect 300 ms / read 3 s, upper→origin connect
//! 500 ms / read 2 s (defaults: 500 ms / 35 s derived, 2 s / 30 s), probes every 200 ms with a
//! 1 s probe timeout, 3 failures to mark down, 2 ready probes to return.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use stratus_chaos::{
    client, eventually, load, Fault, Fleet, Reply, Summary, TestOrigin, TEST_SECRET,
};
use stratus_tiering::{Member, Ring};
use tokio::task::JoinSet;

use super::common::{check, end_checks, fetches, keys, Run, Shape, HOST};

/// The tier read timeout of the short-timeout fleets, plus its connect timeout.
const TIER_WAIT: Duration = Duration::from_millis(3300);

/// The name in the first `Cache-Status` entry when it is an upper's.
fn upper_of(cache_status: &str) -> Option<String> {
    let name = cache_status.split(';').next()?.trim();
    name.starts_with("up-").then(|| name.to_string())
}

/// Serves every key with a body naming it, fresh for 10 minutes.
fn serve(origin: &TestOrigin, keys: &[String]) {
    for k in keys {
        let body = format!("body of {k}");
        origin.fixed(k, Reply::ok(body).header("cache-control", "max-age=600"));
    }
}

/// Health states of every member in `lower`'s `/ring`, by member name.
async fn states(fleet: &Fleet, lower: usize) -> HashMap<String, String> {
    let ring = fleet.ring(lower).await.unwrap_or_default();
    ring["upper"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap_or("?").to_string(),
                m["health"]["state"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect()
}

async fn is_down(fleet: &Fleet, lower: usize, member: &str) -> bool {
    states(fleet, lower)
        .await
        .get(member)
        .is_some_and(|s| s == "down")
}

async fn all_up(fleet: &Fleet, lower: usize) -> bool {
    let s = states(fleet, lower).await;
    !s.is_empty() && s.values().all(|v| v == "up")
}

/// Client requests whose outcome was not a whole 200.
fn not_ok(run: &Run) -> usize {
    run.history
        .records()
        .iter()
        .filter(|r| r.status != Some(200) || !r.complete)
        .count()
}

/// Continuous load on every lower (batches of 100 requests over `keys`, 4 at a time) until the
/// returned sender says stop, at most `max`.
fn load_until_stopped(
    fleet: &Fleet,
    keys: &[String],
    run: &Run,
    max: Duration,
) -> (
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    let addrs = lowers(fleet);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (history, keys) = (run.history.clone(), keys.to_vec());
    let loader = tokio::spawn(async move {
        let deadline = Instant::now() + max;
        while !*stop_rx.borrow() && Instant::now() < deadline {
            stratus_chaos::load(&addrs, HOST, &keys, 100, 4, &history).await;
        }
    });
    (stop_tx, loader)
}

fn lowers(fleet: &Fleet) -> Vec<std::net::SocketAddr> {
    fleet.lowers.iter().map(|n| n.listen).collect()
}

/// The owner of `path` on the fleet's ring (lowers list uppers by their listen addresses,
/// in order, weight 1), by member name.
fn ring_owner(fleet: &Fleet, path: &str) -> String {
    let members = fleet
        .uppers
        .iter()
        .map(|u| Member {
            addr: u.listen,
            weight: 1,
        })
        .collect();
    let ring = Ring::new(members).expect("ring");
    let key = stratus_node::policy::primary_key(HOST, path);
    ring.owner(key.as_bytes())
        .map_or_else(String::new, |id| format!("up-{}", id + 1))
}

/// Serves any path without a route of its own with a body naming it.
fn serve_any(origin: &TestOrigin) {
    origin.fallback(|req, _| {
        Reply::ok(format!("body of {}", req.path)).header("cache-control", "max-age=600")
    });
}

/// Sends `n` requests from `workers` concurrent workers through `addrs` (the lowers):
/// request `i` goes to `pick(i) = (lower, key)`. Bounded by `n`.
async fn drive(
    run: Run,
    addrs: Vec<std::net::SocketAddr>,
    n: usize,
    workers: usize,
    pick: fn(usize) -> (usize, String),
) {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut set = JoinSet::new();
    for _ in 0..workers {
        let (addrs, history, next) = (addrs.clone(), run.history.clone(), next.clone());
        set.spawn(async move {
            for _ in 0..n {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= n {
                    return;
                }
                let (lower, key) = pick(i);
                history.get(&addrs, lower, HOST, &key).await;
            }
        });
    }
    while set.join_next().await.is_some() {}
}

/// Requests served by an upper other than the key's owner while `up` was, by the ring, alive
/// for it: keys that moved although their owner lived.
fn moved_while_owner_lived(run: &Run, fleet: &Fleet, dead: &str) -> usize {
    run.history
        .records()
        .iter()
        .filter_map(|r| Some((upper_of(&r.cache_status)?, ring_owner(fleet, &r.key))))
        .filter(|(served, owner)| served != owner && owner != dead)
        .count()
}

/// Scenario 1: An upper is SIGKILLed mid-load: zero errors, keys cached at a lower never leave it, only
/// the dead member's keys move, and after its restart ownership returns with zero errors.
/// Cold keys (each requested once) keep every lower miss going to the uppers during the fault.
pub async fn upper_killed(run: Run) -> Summary {
    let (origin, mut fleet) = Shape::new(3, 2).start().await;
    serve_any(&origin);
    let hot = keys("hot", 30);
    for k in &hot {
        let _ = client::get(fleet.lowers[0].listen, HOST, k, &[]).await;
    }
    run.note("warmed 30 hot keys at edge-1");
    // Every third request a hot key at edge-1; the rest cold keys through edge-2 and edge-3.
    let pick: fn(usize) -> (usize, String) = |i| {
        if i % 3 == 0 {
            (0, format!("/hot/{}", i % 30))
        } else {
            (1 + i % 2, format!("/cold/{i}"))
        }
    };
    let driving = tokio::spawn(drive(run.clone(), lowers(&fleet), 900, 8, pick));
    eventually(Duration::from_secs(20), || async {
        run.history.len() >= 200
    })
    .await;
    let killed_at = Instant::now();
    fleet.uppers[0].kill_hard();
    run.note("SIGKILL up-1");
    let marked = eventually(Duration::from_secs(10), || async {
        is_down(&fleet, 1, "up-1").await && is_down(&fleet, 2, "up-1").await
    })
    .await;
    let failover = marked.then(|| killed_at.elapsed());
    run.note(format!("edge-2 and edge-3 mark up-1 down: {marked}"));
    let _ = driving.await;
    let verdict = async {
        check(not_ok(&run) == 0, || {
            format!("{} client errors", not_ok(&run))
        })?;
        check(marked, || "up-1 never marked down".into())?;
        let records = run.history.records();
        let hot_moved = records
            .iter()
            .filter(|r| r.lower == 0 && !r.cache_status.starts_with("edge-1; hit"))
            .count();
        check(hot_moved == 0, || {
            format!("{hot_moved} edge-1 hot requests left edge-1")
        })?;
        let to_uppers = records
            .iter()
            .filter(|r| upper_of(&r.cache_status).is_some())
            .count();
        check(to_uppers > 400, || {
            format!("only {to_uppers} requests reached an upper")
        })?;
        let moved = moved_while_owner_lived(&run, &fleet, "up-1");
        check(moved == 0, || {
            format!("{moved} keys of the living member moved")
        })?;
        fleet.uppers[0].restart().await.map_err(|e| e.to_string())?;
        run.note("up-1 restarted");
        let back = eventually(Duration::from_secs(10), || async {
            all_up(&fleet, 1).await && all_up(&fleet, 2).await
        })
        .await;
        check(back, || "up-1 never came back".into())?;
        let before = run.history.len();
        drive(run.clone(), lowers(&fleet), 60, 4, |i| {
            (1 + i % 2, format!("/after/{i}"))
        })
        .await;
        let after = &run.history.records()[before..];
        check(
            after.iter().all(|r| r.status == Some(200) && r.complete),
            || "errors after the restart".into(),
        )?;
        let wrong = after
            .iter()
            .filter(|r| upper_of(&r.cache_status) != Some(ring_owner(&fleet, &r.key)))
            .count();
        check(wrong == 0, || {
            format!("{wrong} keys not back at their owner after the restart")
        })?;
        end_checks(&mut fleet, &[])
    }
    .await;
    run.summary(origin.total(), failover, verdict)
}

/// Scenario 2: An upper hangs (SIGSTOP, later SIGCONT): connects still succeed, so each affected
/// request costs at most the tier timeout plus one failover; the member is marked down; after
/// SIGCONT traffic returns to it. Cold keys keep every request going to the uppers.
pub async fn upper_hung(run: Run) -> Summary {
    let (origin, mut fleet) = Shape::new(2, 2).start().await;
    serve_any(&origin);
    let driving = tokio::spawn(drive(run.clone(), lowers(&fleet), 400, 6, |i| {
        (i % 2, format!("/hung/{i}"))
    }));
    eventually(Duration::from_secs(20), || async {
        run.history.len() >= 60
    })
    .await;
    let stopped_at = Instant::now();
    let stop = fleet.uppers[0].stop();
    run.note(format!("SIGSTOP up-1: {stop:?}"));
    let marked = eventually(Duration::from_secs(10), || async {
        is_down(&fleet, 0, "up-1").await && is_down(&fleet, 1, "up-1").await
    })
    .await;
    let failover = marked.then(|| stopped_at.elapsed());
    let _ = driving.await;
    let cont = fleet.uppers[0].cont();
    run.note(format!("SIGCONT up-1: {cont:?}"));
    let verdict = async {
        check(not_ok(&run) == 0, || {
            format!("{} client errors", not_ok(&run))
        })?;
        check(marked, || "up-1 never marked down".into())?;
        let records = run.history.records();
        let slow = records
            .iter()
            .filter(|r| r.took > Duration::from_secs(2))
            .count();
        check(slow > 0, || "no request met the hung member".into())?;
        let slowest = records.iter().map(|r| r.took).max().unwrap_or_default();
        // One read timeout on the hung member, then the next member answers.
        check(slowest < TIER_WAIT + Duration::from_millis(1500), || {
            format!("a request took {slowest:?}")
        })?;
        let moved = moved_while_owner_lived(&run, &fleet, "up-1");
        check(moved == 0, || {
            format!("{moved} keys of the living member moved")
        })?;
        let back = eventually(Duration::from_secs(10), || async {
            all_up(&fleet, 0).await
        })
        .await;
        check(back, || "up-1 not back after SIGCONT".into())?;
        let before = run.history.len();
        drive(run.clone(), lowers(&fleet), 40, 4, |i| {
            (0, format!("/hung-after/{i}"))
        })
        .await;
        let after = &run.history.records()[before..];
        check(after.iter().all(|r| r.status == Some(200)), || {
            "errors after SIGCONT".into()
        })?;
        check(
            after
                .iter()
                .any(|r| upper_of(&r.cache_status).as_deref() == Some("up-1")),
            || "traffic did not return to up-1".into(),
        )?;
        end_checks(&mut fleet, &[])
    }
    .await;
    run.summary(origin.total(), failover, verdict)
}

/// Scenario 3: The origin goes down with stale objects cached: stale-if-error serves the old body,
/// uncached keys get a prompt 502/504 from the upper (naming the origin), no member is blamed,
/// and recovery refreshes.
pub async fn origin_down_with_stale(run: Run) -> Summary {
    let (origin, mut fleet) = Shape::new(1, 1).proxied().start().await;
    let stale = keys("sie", 10);
    for k in &stale {
        let k2 = k.clone();
        origin.route(k, move |_, nth| {
            Reply::ok(format!("{k2} v{nth}"))
                .header("cache-control", "max-age=1, stale-if-error=60")
        });
    }
    let lower = fleet.lowers[0].listen;
    for k in &stale {
        let _ = client::get(lower, HOST, k, &[]).await;
    }
    fleet.origin_link(0).set(Fault::ResetOnAccept);
    fleet.origin_link(0).sever();
    run.note("origin unreachable from the upper (reset on accept)");
    // Wait until the objects are stale (max-age=1): a stale-if-error answer shows it.
    let went_stale = eventually(Duration::from_secs(5), || async {
        client::get(lower, HOST, &stale[0], &[])
            .await
            .is_ok_and(|r| r.cache_status().contains("stale-if-error"))
    })
    .await;
    let verdict = async {
        check(went_stale, || "never served stale-if-error".into())?;
        for k in &stale {
            run.history.get(&[lower], 0, HOST, k).await;
        }
        let records = run.history.records();
        for r in &records {
            let r2 = client::get(lower, HOST, &r.key, &[])
                .await
                .map_err(|e| e.to_string())?;
            check(
                r2.status == 200 && r2.text() == format!("{} v0", r.key),
                || format!("{}: {} {}", r.key, r2.status, r2.text()),
            )?;
        }
        check(not_ok(&run) == 0, || {
            format!("{} stale requests failed", not_ok(&run))
        })?;
        // Uncached keys: a prompt error from the upper, naming the origin.
        for k in keys("sie-cold", 3) {
            let at = Instant::now();
            let r = client::get(lower, HOST, &k, &[])
                .await
                .map_err(|e| e.to_string())?;
            let took = at.elapsed();
            check(matches!(r.status, 502 | 504), || {
                format!("{k}: {}", r.status)
            })?;
            check(r.cache_status().starts_with("up-1;"), || {
                format!("{k}: error not from the upper: {}", r.cache_status())
            })?;
            check(took < TIER_WAIT, || format!("{k}: took {took:?}"))?;
        }
        check(all_up(&fleet, 0).await, || {
            "the upper was blamed for its origin".into()
        })?;
        fleet.origin_link(0).set(Fault::Pass);
        run.note("origin reachable again");
        let refreshed = eventually(Duration::from_secs(10), || async {
            client::get(lower, HOST, &stale[1], &[])
                .await
                .is_ok_and(|r| r.text() != format!("{} v0", stale[1]))
        })
        .await;
        check(refreshed, || "recovery did not refresh".into())?;
        end_checks(&mut fleet, &[])
    }
    .await;
    run.summary(fetches(&origin, &stale), None, verdict)
}

/// Scenario 4: A thundering herd on a cold key across every lower: exactly one origin fetch; when the
/// leader's fetch is cut mid-body, exactly one refetch, and nothing truncated is cached.
pub async fn thundering_herd(run: Run) -> Summary {
    let (origin, mut fleet) = Shape::new(3, 2).start().await;
    origin.fixed(
        "/herd",
        Reply::ok("the one body".repeat(100))
            .header("cache-control", "max-age=600")
            .delay(Duration::from_millis(800)),
    );
    origin.route("/herd-cut", |_, nth| {
        let r = Reply::ok("whole body ".repeat(500))
            .header("cache-control", "max-age=600")
            .delay(Duration::from_millis(800));
        if nth == 0 {
            r.truncate_at(100)
        } else {
            r
        }
    });
    let addrs = lowers(&fleet);
    let herd = |path: &'static str| {
        let addrs = addrs.clone();
        let history = run.history.clone();
        async move {
            let mut set = JoinSet::new();
            for i in 0..30 {
                let (addrs, history) = (addrs.clone(), history.clone());
                set.spawn(async move { history.get(&addrs, i % addrs.len(), HOST, path).await });
            }
            while set.join_next().await.is_some() {}
        }
    };
    herd("/herd").await;
    run.note("30 concurrent requests for /herd over 3 lowers");
    herd("/herd-cut").await;
    run.note(
        "30 concurrent requests for /herd-cut; the first origin answer is cut after 100 bytes",
    );
    let verdict = async {
        let records = run.history.records();
        let herd: Vec<_> = records.iter().filter(|r| r.key == "/herd").collect();
        check(
            herd.iter().all(|r| r.status == Some(200) && r.complete),
            || "a /herd request failed".into(),
        )?;
        check(origin.count("/herd") == 1, || {
            format!("/herd fetched {} times", origin.count("/herd"))
        })?;
        let whole = "whole body ".repeat(500);
        // Never a clean 200 with a short body.
        for r in records
            .iter()
            .filter(|r| r.key == "/herd-cut" && r.status == Some(200) && r.complete)
        {
            let again = client::get(addrs[r.lower], HOST, "/herd-cut", &[])
                .await
                .map_err(|e| e.to_string())?;
            check(again.text() == whole, || {
                "a truncated body was cached".into()
            })?;
        }
        // Every lower serves the whole body afterwards: the cut copy was never stored.
        for a in &addrs {
            let r = client::get(*a, HOST, "/herd-cut", &[])
                .await
                .map_err(|e| e.to_string())?;
            check(r.complete && r.text() == whole, || {
                "a lower serves a short body".into()
            })?;
        }
        // One refetch after the cut: by a herd request that waited on the lock and found the
        // fill abandoned, or (when every herd request was streaming the cut fill) by the first
        // request after it. A lock waiter whose fill was cut while it streamed it may be
        // abandoned by pingora's lock (LockWaitOutcome::Abandoned) and fetch once more,
        // uncached: at most one extra, never a stampede.
        let fetched = origin.count("/herd-cut");
        run.note(format!("/herd-cut reached the origin {fetched} times"));
        check((2..=3).contains(&fetched), || {
            format!("/herd-cut fetched {fetched} times (1 cut + 1 refetch, at most 1 more)")
        })?;
        end_checks(&mut fleet, &[])
    }
    .await;
    run.summary(
        origin.count("/herd") + origin.count("/herd-cut"),
        None,
        verdict,
    )
}

/// Scenario 5: A herd at expiry with stale-while-revalidate, through both tiers: exactly one background
/// revalidation reaches the origin, and no client waits for it.
pub async fn herd_at_expiry(run: Run) -> Summary {
    let (origin, mut fleet) = Shape::new(3, 1).start().await;
    origin.route("/swr", |_, nth| {
        let r = Reply::ok(format!("version {nth}"))
            .header("cache-control", "max-age=1, stale-while-revalidate=60");
        if nth == 0 {
            r
        } else {
            r.delay(Duration::from_millis(1500))
        }
    });
    let addrs = lowers(&fleet);
    for a in &addrs {
        let _ = client::get(*a, HOST, "/swr", &[]).await;
    }
    // Stale at every tier: the upper's copy ages like the lowers'.
    let stale = eventually(Duration::from_secs(5), || async {
        client::get(addrs[0], HOST, "/swr", &[])
            .await
            .is_ok_and(|r| r.cache_status().contains("stale-while-revalidate"))
    })
    .await;
    run.note(format!("objects stale: {stale}"));
    let mut set = JoinSet::new();
    for i in 0..30 {
        let (addrs, history) = (addrs.clone(), run.history.clone());
        set.spawn(async move { history.get(&addrs, i % addrs.len(), HOST, "/swr").await });
    }
    while set.join_next().await.is_some() {}
    run.note("30 concurrent requests at expiry");
    let settled = eventually(Duration::from_secs(8), || async {
        origin.count("/swr") >= 2
    })
    .await;
    // Give a second, wrong revalidation the time to show up before counting.
    let extra = eventually(Duration::from_secs(3), || async {
        origin.count("/swr") > 2
    })
    .await;
    let verdict = async {
        check(stale, || "never went stale".into())?;
        check(not_ok(&run) == 0, || format!("{} errors", not_ok(&run)))?;
        let slowest = run
            .history
            .records()
            .iter()
            .map(|r| r.took)
            .max()
            .unwrap_or_default();
        check(slowest < Duration::from_millis(1000), || {
            format!("a client waited {slowest:?} (origin takes 1.5 s)")
        })?;
        check(settled && !extra, || {
            format!(
                "origin saw {} requests (1 fill + 1 revalidation expected)",
                origin.count("/swr")
            )
        })?;
        end_checks(&mut fleet, &[])
    }
    .await;
    run.summary(origin.count("/swr"), None, verdict)
}

/// Scenario 6: A partition between one lower and one upper (blackhole, then fast reject): that lower
/// fails over without errors, the other lower keeps using the member (health is local, no
/// flapping), and after healing traffic returns.
pub async fn partition_lower_upper(run: Run) -> Summary {
    let (origin, mut fleet) = Shape::new(2, 2).proxied().start().await;
    let ks = keys("part", 40);
    serve(&origin, &ks);
    let mut failover = None;
    let verdict = async {
        for (fault, label) in [
            (Fault::Blackhole, "blackhole"),
            (Fault::ResetOnAccept, "reset"),
        ] {
            fleet.link(0, 0).set(fault);
            fleet.link(0, 0).sever();
            let cut = Instant::now();
            run.note(format!("edge-1 -> up-1: {label}"));
            let addrs = lowers(&fleet);
            let round: Vec<String> = ks.iter().map(|k| format!("{k}?{label}")).collect();
            for k in &round {
                let k0 = k.split('?').next().unwrap_or("").to_string();
                let body = format!("body of {k0}");
                origin.fixed(k, Reply::ok(body).header("cache-control", "max-age=600"));
            }
            load(&addrs, HOST, &round, 120, 6, &run.history).await;
            let down = eventually(Duration::from_secs(8), || async {
                is_down(&fleet, 0, "up-1").await
            })
            .await;
            failover.get_or_insert(cut.elapsed());
            check(down, || format!("{label}: edge-1 never marked up-1 down"))?;
            check(all_up(&fleet, 1).await, || {
                format!("{label}: edge-2 marked a member down (flapping)")
            })?;
            let to_up1 = run
                .history
                .records()
                .iter()
                .filter(|r| {
                    r.lower == 1
                        && r.key.ends_with(label)
                        && upper_of(&r.cache_status).as_deref() == Some("up-1")
                })
                .count();
            check(to_up1 > 0, || format!("{label}: edge-2 stopped using up-1"))?;
            fleet.link(0, 0).set(Fault::Pass);
            run.note(format!("healed ({label})"));
            let healed =
                eventually(Duration::from_secs(8), || async { all_up(&fleet, 0).await }).await;
            check(healed, || {
                format!("{label}: up-1 not back at edge-1 after healing")
            })?;
        }
        check(not_ok(&run) == 0, || {
            format!("{} client errors", not_ok(&run))
        })?;
        end_checks(&mut fleet, &[])
    }
    .await;
    run.summary(origin.total(), failover, verdict)
}

/// Scenario 7: A partition between the uppers and the origin: stale where allowed, no member marked
/// down for its origin's failure, and the lowers do not bypass the uppers (they may only with
/// `on_all_upper_down = "origin"` and every member down, which is not the case here).
pub async fn partition_upper_origin(run: Run) -> Summary {
    let mut shape = Shape::new(2, 2).proxied();
    shape.lower_extra = "on_all_upper_down = \"origin\"".into();
    let (origin, mut fleet) = shape.start().await;
    let ks = keys("uo", 20);
    for k in &ks {
        let k2 = k.clone();
        origin.route(k, move |_, nth| {
            Reply::ok(format!("{k2} v{nth}"))
                .header("cache-control", "max-age=1, stale-if-error=60")
        });
    }
    let addrs = lowers(&fleet);
    // Through link proxies each lower lists its uppers by other addresses, so its ring places
    // keys differently: warm every key through both lowers.
    for k in &ks {
        for a in &addrs {
            let _ = client::get(*a, HOST, k, &[]).await;
        }
    }
    let before = origin.total();
    for u in 0..2 {
        fleet.origin_link(u).set(Fault::ResetOnAccept);
        fleet.origin_link(u).sever();
    }
    run.note("both uppers cut off from the origin");
    let stale = eventually(Duration::from_secs(5), || async {
        client::get(addrs[0], HOST, &ks[0], &[])
            .await
            .is_ok_and(|r| r.cache_status().contains("stale-if-error"))
    })
    .await;
    for round in 0..3 {
        for (i, k) in ks.iter().enumerate() {
            run.history.get(&addrs, (i + round) % 2, HOST, k).await;
        }
    }
    let verdict = async {
        check(stale, || "never served stale".into())?;
        check(not_ok(&run) == 0, || {
            format!("{} requests not served stale", not_ok(&run))
        })?;
        check(all_up(&fleet, 0).await && all_up(&fleet, 1).await, || {
            "a member was blamed for its origin".into()
        })?;
        check(origin.total() == before, || {
            format!(
                "a lower bypassed the uppers: {} direct origin requests",
                origin.total() - before
            )
        })?;
        end_checks(&mut fleet, &[])
    }
    .await;
    run.summary(origin.total(), None, verdict)
}

/// Scenario 11a: A rolling upgrade (`--upgrade` + SIGQUIT) of every node under continuous load: zero
/// failed requests.
pub async fn rolling_upgrade(run: Run) -> Summary {
    let (origin, mut fleet) = Shape::new(2, 2).start().await;
    let ks = keys("roll", 40);
    serve(&origin, &ks);
    let (stop_tx, loader) = load_until_stopped(&fleet, &ks, &run, Duration::from_secs(180));
    let verdict = async {
        for i in 0..2 {
            fleet.uppers[i]
                .upgrade()
                .await
                .map_err(|e| format!("upgrade up-{}: {e:#}", i + 1))?;
            run.note(format!("upgraded up-{}", i + 1));
        }
        for i in 0..2 {
            fleet.lowers[i]
                .upgrade()
                .await
                .map_err(|e| format!("upgrade edge-{}: {e:#}", i + 1))?;
            run.note(format!("upgraded edge-{}", i + 1));
        }
        let _ = stop_tx.send(true);
        let _ = loader.await;
        check(run.history.len() > 50, || {
            format!("only {} requests during the upgrades", run.history.len())
        })?;
        // Pingora 0.9 drops a connection whose first request head has not been read when the
        // old process starts its shutdown (pingora-proxy `handle_new_request`: "dropping the
        // connection to stop more req from coming in"), even a fresh one it accepted an
        // instant before the hand-over. Seen about once per 20 000 requests here; counted in
        // the table, tolerated only in that exact form (closed before any byte) and rarely.
        let records = run.history.records();
        let dropped_unread = records
            .iter()
            .filter(|r| r.error.as_deref().is_some_and(|e| e.contains("(0 bytes)")))
            .count();
        if dropped_unread > 0 {
            run.note(format!(
                "{dropped_unread} connections closed before any byte at a hand-over (pingora)"
            ));
        }
        let other = not_ok(&run) - dropped_unread;
        check(other == 0, || {
            format!("{other} failed requests of {}", records.len())
        })?;
        check(dropped_unread <= 2, || {
            format!("{dropped_unread} connections dropped unread at hand-overs")
        })?;
        end_checks(&mut fleet, &[])
    }
    .await;
    run.summary(fetches(&origin, &ks), None, verdict)
}

/// Scenario 11b: SIGHUP under continuous load: a broken file and a file that would move a
/// listener are each rejected or refused with the old config serving on; a good file then
/// applies (a lower drops an upper member, an upper gets a new origin timeout). Zero failed
/// requests, no process restarted, every result counted.
pub async fn reload_broken_config(run: Run) -> Summary {
    let (origin, mut fleet) = Shape::new(2, 2).start().await;
    let ks = keys("reload", 40);
    serve(&origin, &ks);
    let (stop_tx, loader) = load_until_stopped(&fleet, &ks, &run, Duration::from_secs(60));
    let pids: Vec<u32> = fleet
        .lowers
        .iter()
        .chain(&fleet.uppers)
        .map(|n| n.pid())
        .collect();
    let verdict = async {
        let lower_good = fleet.lowers[0].config_text().map_err(|e| e.to_string())?;
        let upper_good = fleet.uppers[0].config_text().map_err(|e| e.to_string())?;
        let lower = &mut fleet.lowers[0];
        lower
            .reload(&format!("{lower_good}\n[tier\n"), "rejected")
            .await
            .map_err(|e| format!("broken TOML: {e:#}"))?;
        run.note("edge-1: broken TOML rejected");
        let unknown = lower_good.replacen("[node]", "[node]\nworkers = 4", 1);
        lower
            .reload(&unknown, "rejected")
            .await
            .map_err(|e| format!("unknown key: {e:#}"))?;
        run.note("edge-1: unknown key rejected");
        let port = stratus_chaos::free_port().map_err(|e| e.to_string())?;
        let relisten = lower_good.replacen(
            &format!("listen = \"{}\"", lower.listen),
            &format!("listen = \"{port}\""),
            1,
        );
        lower
            .reload(&relisten, "refused")
            .await
            .map_err(|e| format!("new listener: {e:#}"))?;
        run.note("edge-1: new listen address refused");
        // Good: edge-1 keeps only its first upper member.
        let members = lower_good
            .lines()
            .find(|l| l.starts_with("upper = ["))
            .ok_or("no upper line")?
            .to_string();
        let first = members
            .trim_start_matches("upper = [")
            .split(" }, ")
            .next()
            .ok_or("no member")?
            .to_string();
        let one = lower_good.replace(&members, &format!("upper = [{first} }}]"));
        lower
            .reload(&one, "ok")
            .await
            .map_err(|e| format!("good lower config: {e:#}"))?;
        run.note("edge-1: reloaded with one upper member");
        let slower = upper_good.replace("read_timeout = \"2s\"", "read_timeout = \"1500ms\"");
        check(slower != upper_good, || {
            "no origin read_timeout to change".into()
        })?;
        fleet.uppers[0]
            .reload(&slower, "ok")
            .await
            .map_err(|e| format!("good upper config: {e:#}"))?;
        run.note("up-1: reloaded with a new origin timeout");
        // Let load run on the new configs before stopping.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let _ = stop_tx.send(true);
        let _ = loader.await;
        let now: Vec<u32> = fleet
            .lowers
            .iter()
            .chain(&fleet.uppers)
            .map(|n| n.pid())
            .collect();
        check(now == pids, || "a node restarted during the reloads".into())?;
        let records = run.history.records();
        check(records.len() > 100, || {
            format!("only {} requests during the reloads", records.len())
        })?;
        let failed = not_ok(&run);
        check(failed == 0, || {
            format!("{failed} failed requests of {}", records.len())
        })?;
        end_checks(&mut fleet, &[])
    }
    .await;
    run.summary(fetches(&origin, &ks), None, verdict)
}

/// Scenario 12: Hostile clients against the control state, beside innocent load: loop headers, a
/// leaked context replayed to another upper, `Host` with a port, unclassifiable targets, and
/// fetches that outwait the coalescing lock past a context's age. No member is marked down,
/// innocents see no error, no key is poisoned.
pub async fn hostile_clients(run: Run) -> Summary {
    let mut shape = Shape::new(2, 2);
    // The lock wait is scaled with the other timeouts (default 10 s, like the context's age).
    shape.common_extra = "[cache]\nlock_wait_timeout = \"1s\"\n".into();
    let (origin, mut fleet) = shape.start().await;
    let ks = keys("innocent", 30);
    serve(&origin, &ks);
    origin.route("/slowfill", |_, nth| {
        Reply::ok(format!("slow {nth}"))
            .header("cache-control", "max-age=600")
            .delay(Duration::from_millis(1500))
    });
    let addrs = lowers(&fleet);
    let history = run.history.clone();
    let ks2 = ks.clone();
    let innocent = {
        let addrs = addrs.clone();
        tokio::spawn(async move { load(&addrs, HOST, &ks2, 300, 4, &history).await })
    };
    let looped = ["stratus"; 7].join(", ");
    let mut hostile = Vec::new();
    for i in 0..40 {
        let a = addrs[i % 2];
        let r = client::get(a, HOST, &ks[i % ks.len()], &[("cdn-loop", &looped)]).await;
        hostile.push(("loop", r.map(|r| r.status).ok()));
        let r = client::get(
            fleet.uppers[1].listen,
            HOST,
            "/innocent/0",
            &[(
                "stratus-ctx",
                &super::support::signed_context(
                    HOST,
                    "/innocent/0",
                    "up-1",
                    TEST_SECRET,
                    SystemTime::now(),
                ),
            )],
        )
        .await;
        hostile.push(("replay to another upper", r.map(|r| r.status).ok()));
        let r = client::get(a, &format!("{HOST}:1337"), &ks[(i + 3) % ks.len()], &[]).await;
        hostile.push(("host with port", r.map(|r| r.status).ok()));
        let raw = format!("GET foo:{i} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n");
        let r = client::send_raw(a, raw.as_bytes(), false).await;
        hostile.push(("bad target", r.map(|r| r.status).ok()));
    }
    // Three waiters outwait the 1 s lock on a 1.5 s fill, then fetch themselves.
    let mut set = JoinSet::new();
    for i in 0..4 {
        let a = addrs[i % 2];
        set.spawn(async move {
            client::get(a, HOST, "/slowfill", &[])
                .await
                .map(|r| r.status)
                .ok()
        });
    }
    let mut lock_waits = Vec::new();
    while let Some(r) = set.join_next().await {
        lock_waits.push(r.ok().flatten());
    }
    run.note("hostile traffic sent");
    let _ = innocent.await;
    let verdict = async {
        let expected = |what: &str| match what {
            "loop" => Some(508),
            // The tiers talk mutual TLS: a client without a fleet certificate gets no
            // HTTP answer from an upper at all (a plain fleet answers 403; integrity tests).
            "replay to another upper" => None,
            "host with port" => Some(200),
            _ => Some(400),
        };
        for (what, status) in &hostile {
            check(*status == expected(what), || format!("{what}: {status:?}"))?;
        }
        check(lock_waits.iter().all(|s| *s == Some(200)), || {
            format!("lock waiters: {lock_waits:?}")
        })?;
        check(not_ok(&run) == 0, || {
            format!("{} innocent errors", not_ok(&run))
        })?;
        for lower in 0..2 {
            check(all_up(&fleet, lower).await, || {
                format!("edge-{} marked a member down", lower + 1)
            })?;
        }
        for (i, k) in ks.iter().enumerate() {
            let r = client::get(addrs[i % 2], HOST, k, &[])
                .await
                .map_err(|e| e.to_string())?;
            check(r.text() == format!("body of {k}"), || {
                format!("{k} poisoned: {}", r.text())
            })?;
        }
        for req in origin.all_requests() {
            check(req.header("host") == Some(HOST), || {
                format!("origin saw Host {:?}", req.header("host"))
            })?;
        }
        end_checks(&mut fleet, &[])
    }
    .await;
    run.summary(origin.total(), None, verdict)
}
