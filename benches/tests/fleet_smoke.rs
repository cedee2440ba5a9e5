//! The fleet benchmark's smoke round: every scenario runs for a moment against the debug
//! `stratus` binary and nginx, and the report and plots are written, so the benchmark cannot
//! rot between the runs that measure. The numbers of a smoke round mean nothing and are not
//! asserted; what must hold whatever the speed is asserted: every request answered, and one
//! origin request per distinct key through a stratus fleet.

use std::path::PathBuf;

use stratus_benches::fleet::{self, Plan};
use stratus_benches::report;
use stratus_benches::systems::System;

/// `target/<profile>/stratus`, next to this test's own `deps/` directory (built by
/// `cargo test --workspace`).
fn stratus_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>");
    let bin = dir.join("stratus");
    assert!(
        bin.exists(),
        "{} is missing: build it with `cargo build -p stratus-node` (or run `cargo test --workspace`)",
        bin.display()
    );
    bin
}

#[test]
fn a_smoke_round_runs_every_scenario_and_writes_the_report() {
    let plan = Plan::smoke(stratus_binary());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let result = runtime.block_on(fleet::run(&plan)).expect("smoke round");

    // Every scenario measured both systems (tracing: stratus only), every request answered.
    let scenarios = [
        fleet::ONE_NODE,
        fleet::FLEET_LOWER,
        fleet::TRACING_OFF,
        fleet::TRACING_UNSAMPLED,
        fleet::TRACING_ON,
    ];
    for scenario in scenarios {
        assert!(
            result.samples.iter().any(|s| s.scenario == scenario),
            "{scenario} did not run"
        );
    }
    for system in [System::Stratus, System::Nginx] {
        assert!(result
            .samples
            .iter()
            .any(|s| s.scenario == fleet::ONE_NODE && s.system == system));
    }
    for s in &result.samples {
        assert!(
            s.load.requests > 0,
            "{} {}: no requests",
            s.scenario,
            s.system.name()
        );
        assert_eq!(s.load.errors, 0);
        assert!(s.cpu_secs >= 0.0);
    }

    // A stratus fleet fetches each key from the origin once.
    let zipf = result
        .zipf
        .iter()
        .find(|z| z.system == System::Stratus)
        .expect("stratus zipf run");
    assert_eq!(zipf.load.errors, 0);
    assert!(zipf.load.distinct_keys > 10);
    assert_eq!(zipf.origin_requests, zipf.load.distinct_keys);
    let memory = result.memory.as_ref().expect("memory figure");
    assert!(memory.rss_after > memory.rss_before);
    assert_eq!(memory.stored, Some(memory.objects + 200));

    let out = tempfile::tempdir().expect("tempdir");
    let md = report::markdown(&result, "cargo test -p stratus-benches");
    assert!(md.contains("## Goals") && md.contains("| one node | nginx |"));
    report::plots(&result, out.path()).expect("plots");
    for plot in ["throughput.svg", "cpu.svg", "latency.svg"] {
        let svg = std::fs::read_to_string(out.path().join(plot)).expect(plot);
        assert!(svg.starts_with("<svg") && svg.contains("stratus"), "{plot}");
    }
}
