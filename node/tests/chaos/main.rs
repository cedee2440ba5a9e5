//! The chaos suite: real fleets (processes on loopback) under faults — nodes killed, hung and
//! upgraded, links cut or slowed by a user-space fault proxy, origins slow, broken or gone,
//! clients hostile, the trace collector down — each scenario with pass/fail criteria checked
//! on a recorded history after the run (see `stratus-chaos`).
//!
//! One test runs the scenarios one after another (the machine has two cores; parallel fleets
//! would measure each other), turns a panicking scenario into a FAIL row with its seed and
//! fault timeline, and prints the summary table (also written to
//! `target/tmp/chaos-summary.txt`, which `scripts/test.sh` prints). `CHAOS_ONLY=PREFIX` runs
//! the scenarios whose name starts with PREFIX.

mod common;
mod faults;
#[path = "../support/mod.rs"]
mod support;
mod tiers;

use std::future::Future;
use std::pin::Pin;

use common::Run;
use stratus_chaos::{table, Summary};

type Scenario = fn(Run) -> Pin<Box<dyn Future<Output = Summary> + Send>>;

/// Every scenario, in the order.
fn scenarios() -> Vec<(&'static str, Scenario)> {
    vec![
        ("1 upper killed", |r| Box::pin(tiers::upper_killed(r))),
        ("2 upper hung", |r| Box::pin(tiers::upper_hung(r))),
        ("3 origin down, stale", |r| {
            Box::pin(tiers::origin_down_with_stale(r))
        }),
        ("4 herd on a cold key", |r| {
            Box::pin(tiers::thundering_herd(r))
        }),
        ("5 herd at expiry (SWR)", |r| {
            Box::pin(tiers::herd_at_expiry(r))
        }),
        ("6 partition lower-upper", |r| {
            Box::pin(tiers::partition_lower_upper(r))
        }),
        ("7 partition upper-origin", |r| {
            Box::pin(tiers::partition_upper_origin(r))
        }),
        ("8 slow origin, slow clients", |r| {
            Box::pin(faults::slow_origin_and_clients(r))
        }),
        ("9 malformed origin responses", |r| {
            Box::pin(faults::malformed_origin(r))
        }),
        ("10 collector down", |r| Box::pin(faults::collector_down(r))),
        ("11a rolling upgrade", |r| {
            Box::pin(tiers::rolling_upgrade(r))
        }),
        ("11b SIGHUP, broken config", |r| {
            Box::pin(tiers::reload_broken_config(r))
        }),
        ("12 hostile clients", |r| {
            Box::pin(tiers::hostile_clients(r))
        }),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_suite() {
    let only = std::env::var("CHAOS_ONLY").ok();
    let mut rows = Vec::new();
    for (i, (name, scenario)) in scenarios().into_iter().enumerate() {
        if only.as_deref().is_some_and(|o| !name.starts_with(o)) {
            continue;
        }
        let run = Run::new(name, 0x5eed_0000 + i as u64);
        let watched = run.clone();
        let row = match tokio::spawn(scenario(run)).await {
            Ok(row) => row,
            Err(e) => watched.summary(0, None, Err(format!("panicked: {}", panic_text(e)))),
        };
        if row.verdict_text().starts_with("FAIL") {
            eprintln!("{}", watched.report());
        }
        println!("{:<32} {}", name, row.verdict_text());
        rows.push(row);
    }
    let printed = table(&rows);
    println!("\n{printed}");
    // `scripts/test.sh` prints this after the run (cargo hides a passing test's output).
    let summary = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("chaos-summary.txt");
    let _ = std::fs::write(summary, &printed);
    let failed: Vec<_> = rows
        .iter()
        .filter(|r| r.verdict_text().starts_with("FAIL"))
        .map(|r| r.scenario.clone())
        .collect();
    assert!(failed.is_empty(), "failed scenarios: {failed:?}\n{printed}");
}

fn panic_text(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(p) => p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "non-text panic".into()),
        Err(e) => e.to_string(),
    }
}
