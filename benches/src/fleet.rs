//! The fleet load benchmark: the same scenarios against stratus and nginx in one invocation,
//! measured the same way, gathered into a [`Report`].
//!
//! Scenarios: a hot hit on one node (alternating rounds, equal worker counts), the same
//! through the lower of a two-tier fleet, Zipf load through a fresh two-tier fleet (origin
//! requests per distinct key), stratus with tracing off / unsampled / sampled and exporting,
//! and stratus's resident memory per cached object and under its `capacity`.
//!
//! The load generator, the origin and the span sink run on core 0; the measured process is
//! pinned to core 1, so its CPU time per request is its own.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::load::{self, Keys, LoadResult, LoadSpec};
use crate::origin::BenchOrigin;
use crate::sys;
use crate::systems::{self, Deployment, System, HOST};

/// How big a run is.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The `stratus` binary to run.
    pub stratus: PathBuf,
    /// Seconds of load per measured round.
    pub secs: f64,
    /// Alternating rounds per comparison.
    pub rounds: usize,
    /// Concurrent client connections.
    pub connections: usize,
    /// Body size of every object.
    pub body: usize,
    /// Distinct keys of the Zipf run.
    pub zipf_keys: u64,
    /// Requests of the Zipf run (bounded by `secs` × 3 as well).
    pub zipf_requests: u64,
    /// Objects filled for the memory figure.
    pub objects: u64,
    /// `cache.capacity` of the capacity check, MiB.
    pub capacity_mib: u64,
    /// Leave nginx out (the smoke round without nginx installed).
    pub skip_nginx: bool,
    /// Pin the measured process to a core of its own and everything else to another.
    pub pin: bool,
    /// Another `stratus` build measured beside this one on the one-node hot hit (before/after).
    pub baseline: Option<PathBuf>,
    /// Run only this part, to iterate on one figure: `"hot"` (the hot hit on one node),
    /// `"fleet"` (through a fleet's lower), `"tracing"`, `"zipf"` or `"memory"`.
    pub only: Option<String>,
}

impl Plan {
    /// The full benchmark: 10 s rounds, three of each, 100 000 objects.
    pub fn full(stratus: PathBuf) -> Plan {
        Plan {
            stratus,
            secs: 10.0,
            rounds: 3,
            connections: 32,
            body: 1024,
            zipf_keys: 20_000,
            zipf_requests: 200_000,
            objects: 100_000,
            capacity_mib: 32,
            skip_nginx: false,
            pin: true,
            baseline: None,
            only: None,
        }
    }

    /// A smoke round of a few seconds: every scenario runs, the numbers mean little.
    pub fn smoke(stratus: PathBuf) -> Plan {
        Plan {
            secs: 0.5,
            rounds: 1,
            connections: 8,
            zipf_keys: 200,
            zipf_requests: 2_000,
            objects: 2_000,
            capacity_mib: 1,
            // Starved debug-build uppers could miss probes; a smoke round measures nothing.
            pin: false,
            ..Plan::full(stratus)
        }
    }
}

/// One measured load round against one deployment.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Scenario label (`"one node"`, `"fleet lower"`, `"tracing on"`…).
    pub scenario: String,
    /// What ran.
    pub system: System,
    /// What the load generator saw.
    pub load: LoadResult,
    /// CPU seconds the measured process spent during the round.
    pub cpu_secs: f64,
}

impl Sample {
    /// CPU microseconds of the measured process per answered request.
    pub fn cpu_us_per_request(&self) -> f64 {
        self.cpu_secs * 1e6 / self.load.requests.max(1) as f64
    }
}

/// The Zipf run through a fresh two-tier fleet.
#[derive(Debug, Clone)]
pub struct ZipfRun {
    /// What ran.
    pub system: System,
    /// What the load generator saw.
    pub load: LoadResult,
    /// Requests the origin received.
    pub origin_requests: u64,
    /// Distinct paths the origin was asked for.
    pub origin_distinct: u64,
}

impl ZipfRun {
    /// Origin requests per distinct key the clients asked for (1.00 is perfect).
    pub fn per_key(&self) -> f64 {
        self.origin_requests as f64 / self.load.distinct_keys.max(1) as f64
    }
}

/// Resident memory of a stratus node filled with distinct objects.
#[derive(Debug, Clone)]
pub struct Memory {
    /// Objects filled (each a miss, then stored).
    pub objects: u64,
    /// Body bytes of each.
    pub body: u64,
    /// Status line and header bytes of each, as the origin sent them.
    pub head: u64,
    /// RSS before the fill, bytes.
    pub rss_before: u64,
    /// RSS after it.
    pub rss_after: u64,
    /// Objects the node reports stored (`stratus_cache_objects`), when it reports them.
    pub stored: Option<u64>,
}

impl Memory {
    /// RSS per object beyond its body and header bytes.
    pub fn overhead_per_object(&self) -> f64 {
        let grown = self.rss_after.saturating_sub(self.rss_before) as f64;
        grown / self.objects.max(1) as f64 - (self.body + self.head) as f64
    }
}

/// RSS growth of a node whose cache is filled well past its `capacity`.
#[derive(Debug, Clone)]
pub struct Capacity {
    /// `cache.capacity`, bytes.
    pub capacity: u64,
    /// Bytes of bodies and headers the fill offered (several times the capacity).
    pub offered: u64,
    /// RSS before the fill.
    pub rss_before: u64,
    /// RSS after it.
    pub rss_after: u64,
}

impl Capacity {
    /// RSS growth as a share of `capacity`.
    pub fn ratio(&self) -> f64 {
        self.rss_after.saturating_sub(self.rss_before) as f64 / self.capacity.max(1) as f64
    }
}

/// Everything one invocation measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// The plan it ran.
    pub plan: Plan,
    /// [`sys::machine`].
    pub machine: String,
    /// `nginx -v`, or why nginx did not run.
    pub nginx_version: String,
    /// Hot-hit rounds (one node, fleet lower, tracing modes).
    pub samples: Vec<Sample>,
    /// Zipf runs, one per system.
    pub zipf: Vec<ZipfRun>,
    /// Memory per object.
    pub memory: Option<Memory>,
    /// Capacity respected.
    pub capacity: Option<Capacity>,
    /// Wall time of the whole run.
    pub wall: Duration,
    /// `(load generator's core, measured process's core)` when pinned.
    pub cores: Option<(usize, usize)>,
}

/// Scenario labels, in report order.
pub const ONE_NODE: &str = "one node";
/// The hot hit through the lower of a two-tier fleet.
pub const FLEET_LOWER: &str = "fleet lower";
/// stratus, one node, tracing off.
pub const TRACING_OFF: &str = "tracing off";
/// stratus, one node, tracing configured but sampling nothing.
pub const TRACING_UNSAMPLED: &str = "tracing unsampled";
/// stratus, one node, every request sampled and exported.
pub const TRACING_ON: &str = "tracing on";

/// Runs every scenario of `plan` and returns the figures. Pins the calling thread to core 0;
/// call it on a current-thread runtime so that the load generator stays there.
pub async fn run(plan: &Plan) -> anyhow::Result<Report> {
    let started = Instant::now();
    let allowed = sys::allowed_cores();
    let cores = match allowed.as_slice() {
        [load, node, ..] if plan.pin && sys::pin_current_thread(*load) => Some((*load, *node)),
        _ => None,
    };
    let node_core = cores.map(|(_, node)| node);
    let nginx_version = if plan.skip_nginx {
        "not run (skipped)".to_string()
    } else {
        nginx_version()?
    };
    // Which parts run: all, or the one `--only` names.
    let part = |name: &str| plan.only.as_deref().is_none_or(|only| only == name);
    let origin = BenchOrigin::start(plan.body).await?;
    let mut samples = Vec::new();

    // Hot hit on one node, then through a fleet's lower: both systems, alternating rounds.
    for (scenario, fleet) in [(ONE_NODE, false), (FLEET_LOWER, true)] {
        if !part(if fleet { "fleet" } else { "hot" }) {
            continue;
        }
        let mut deployments = Vec::new();
        for system in systems_of(plan) {
            deployments.push(deploy(plan, system, fleet, origin.addr(), "").await?);
        }
        if let (Some(before), false) = (&plan.baseline, fleet) {
            let mut d = systems::stratus_node(before, origin.addr(), "").await?;
            d.system = System::Baseline;
            deployments.push(d);
        }
        samples.extend(alternate(plan, node_core, scenario, &deployments, "/hot").await?);
    }

    if part("tracing") {
        // Tracing: off, unsampled, sampled and exporting to a sink in this process.
        let sink = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let sink_addr = sink.local_addr()?;
        let sink_task = tokio::spawn(stratus_node::demo::serve_otlp_sink(sink));
        let tracing = |ratio: f64| {
            format!("[tracing]\notlp_endpoint = \"http://{sink_addr}\"\nsample_ratio = {ratio}\n")
        };
        let modes = [
            (TRACING_OFF, String::new()),
            (TRACING_UNSAMPLED, tracing(0.0)),
            (TRACING_ON, tracing(1.0)),
        ];
        let mut traced = Vec::new();
        for (_, extra) in &modes {
            traced.push(systems::stratus_node(&plan.stratus, origin.addr(), extra).await?);
        }
        for round in 0..plan.rounds {
            for i in rotation(modes.len(), round) {
                samples.push(measure(plan, node_core, modes[i].0, &traced[i], "/hot").await?);
            }
        }
        for (i, d) in traced.iter().enumerate() {
            if let Some(admin) = d.admin {
                let dropped = metric(admin, "stratus_spans_dropped_total").await?;
                if dropped > 0.0 {
                    eprintln!("fleet-bench: {}: {dropped} spans dropped", modes[i].0);
                }
            }
        }
        drop(traced);
        sink_task.abort();
    }

    let mut zipf = Vec::new();
    if part("zipf") {
        // Zipf through a fresh fleet of each system.
        for system in systems_of(plan) {
            let origin = BenchOrigin::start(plan.body).await?;
            let deployment = deploy(plan, system, true, origin.addr(), "").await?;
            if let Some(core) = node_core {
                sys::pin_process(deployment.front_pid, core);
            }
            let spec = LoadSpec {
                target: deployment.front,
                host: HOST.into(),
                keys: Keys::Zipf {
                    prefix: "/z/".into(),
                    n: plan.zipf_keys,
                    s: 1.0,
                },
                connections: plan.connections,
                duration: Duration::from_secs_f64(plan.secs * 3.0),
                max_requests: plan.zipf_requests,
                seed: 7,
            };
            let load = load::run(&spec).await?;
            zipf.push(ZipfRun {
                system,
                origin_requests: origin.total(),
                origin_distinct: origin.distinct(),
                load,
            });
        }
    }

    let (memory, capacity) = if part("memory") {
        (
            Some(memory(plan, &origin).await?),
            Some(capacity(plan, &origin).await?),
        )
    } else {
        (None, None)
    };
    Ok(Report {
        plan: plan.clone(),
        machine: sys::machine(),
        nginx_version,
        samples,
        zipf,
        memory,
        capacity,
        wall: started.elapsed(),
        cores,
    })
}

fn systems_of(plan: &Plan) -> Vec<System> {
    if plan.skip_nginx {
        vec![System::Stratus]
    } else {
        vec![System::Stratus, System::Nginx]
    }
}

/// Round `round` visits the `n` deployments starting at a different one each time, so that no
/// system always runs first (or last) on a machine whose speed drifts.
fn rotation(n: usize, round: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |i| (i + round) % n)
}

async fn deploy(
    plan: &Plan,
    system: System,
    fleet: bool,
    origin: SocketAddr,
    extra: &str,
) -> anyhow::Result<Deployment> {
    match (system, fleet) {
        (System::Stratus, false) => systems::stratus_node(&plan.stratus, origin, extra).await,
        (System::Stratus, true) => systems::stratus_fleet(&plan.stratus, origin).await,
        (System::Nginx, false) => systems::nginx_node(origin),
        (System::Nginx, true) => systems::nginx_fleet(origin),
        (System::Baseline, _) => bail!("a baseline build runs only as one node"),
    }
}

/// `plan.rounds` rounds over `deployments`, in rotating order.
async fn alternate(
    plan: &Plan,
    node_core: Option<usize>,
    scenario: &str,
    deployments: &[Deployment],
    path: &str,
) -> anyhow::Result<Vec<Sample>> {
    let mut samples = Vec::new();
    for round in 0..plan.rounds {
        for i in rotation(deployments.len(), round) {
            samples.push(measure(plan, node_core, scenario, &deployments[i], path).await?);
        }
    }
    Ok(samples)
}

/// Warms `path` on `d`, pins its front process to `node_core` and measures one round of hot
/// hits.
async fn measure(
    plan: &Plan,
    node_core: Option<usize>,
    scenario: &str,
    d: &Deployment,
    path: &str,
) -> anyhow::Result<Sample> {
    if let Some(core) = node_core {
        sys::pin_process(d.front_pid, core);
    }
    let warm = LoadSpec {
        target: d.front,
        host: HOST.into(),
        keys: Keys::Hot(path.into()),
        connections: 1,
        duration: Duration::from_secs(5),
        max_requests: 3,
        seed: 1,
    };
    let warmed = load::run(&warm).await?;
    if warmed.status(200) != 3 {
        bail!(
            "{} ({scenario}) did not answer the warm-up: {:?}",
            d.system.name(),
            warmed.statuses
        );
    }
    let spec = LoadSpec {
        connections: plan.connections,
        duration: Duration::from_secs_f64(plan.secs),
        max_requests: u64::MAX,
        ..warm
    };
    let before = sys::cpu_seconds(d.front_pid)?;
    let load = load::run(&spec).await?;
    let cpu_secs = sys::cpu_seconds(d.front_pid)? - before;
    if load.errors > 0 || load.status(200) != load.requests {
        bail!(
            "{} ({scenario}): {} errors, statuses {:?}",
            d.system.name(),
            load.errors,
            load.statuses
        );
    }
    eprintln!(
        "fleet-bench: {scenario:>18} {:>8}: {:>8.0} req/s, {:>6.1} µs CPU/req, p99 {:.2} ms",
        d.system.name(),
        load.rate(),
        cpu_secs * 1e6 / load.requests.max(1) as f64,
        load.latency_ms(0.99)
    );
    Ok(Sample {
        scenario: scenario.into(),
        system: d.system,
        load,
        cpu_secs,
    })
}

/// Fills a node with `plan.objects` distinct objects and reads its RSS before and after.
async fn memory(plan: &Plan, origin: &BenchOrigin) -> anyhow::Result<Memory> {
    let cache = "[cache]\ncapacity = \"2GiB\"\n";
    let node = systems::stratus_node(&plan.stratus, origin.addr(), cache).await?;
    let (rss_before, rss_after) = fill(plan, &node, "/m/", plan.objects).await?;
    let stored = match node.admin {
        Some(admin) => Some(metric(admin, "stratus_cache_objects").await? as u64),
        None => None,
    };
    Ok(Memory {
        objects: plan.objects,
        body: origin.body_len() as u64,
        head: origin.head_len() as u64,
        rss_before,
        rss_after,
        stored,
    })
}

/// Fills a node whose `capacity` is small with four times as many bytes.
async fn capacity(plan: &Plan, origin: &BenchOrigin) -> anyhow::Result<Capacity> {
    let capacity = plan.capacity_mib * 1024 * 1024;
    let per_object = (origin.body_len() + origin.head_len()) as u64;
    let objects = 4 * capacity / per_object;
    let cache = format!(
        "[cache]\ncapacity = \"{}MiB\"\nmax_object_size = \"64KiB\"\n",
        plan.capacity_mib
    );
    let node = systems::stratus_node(&plan.stratus, origin.addr(), &cache).await?;
    let (rss_before, rss_after) = fill(plan, &node, "/c/", objects).await?;
    Ok(Capacity {
        capacity,
        offered: objects * per_object,
        rss_before,
        rss_after,
    })
}

/// Asks `d` once for each of `n` keys under `prefix`; returns the front's RSS before and after.
async fn fill(plan: &Plan, d: &Deployment, prefix: &str, n: u64) -> anyhow::Result<(u64, u64)> {
    // One object first, so the allocator's and the runtime's first growth is not counted.
    let warm = LoadSpec {
        target: d.front,
        host: HOST.into(),
        keys: Keys::Each {
            prefix: format!("{prefix}warm/"),
            n: 200,
        },
        connections: plan.connections,
        duration: Duration::from_secs(30),
        max_requests: u64::MAX,
        seed: 1,
    };
    load::run(&warm).await?;
    let before = sys::rss_bytes(d.front_pid)?;
    let spec = LoadSpec {
        keys: Keys::Each {
            prefix: prefix.into(),
            n,
        },
        duration: Duration::from_secs(600),
        ..warm
    };
    let result = load::run(&spec).await?;
    if result.requests != n || result.status(200) != n {
        bail!(
            "fill of {n} objects: {} answered, statuses {:?}",
            result.requests,
            result.statuses
        );
    }
    // Let moka finish its pending maintenance (evictions) before reading the RSS.
    tokio::time::sleep(Duration::from_millis(500)).await;
    Ok((before, sys::rss_bytes(d.front_pid)?))
}

/// The value of an unlabelled metric from a node's `/metrics`.
async fn metric(admin: SocketAddr, name: &str) -> anyhow::Result<f64> {
    let response = stratus_chaos::client::get(admin, "localhost", "/metrics", &[]).await?;
    let text = response.text();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .context(format!("no {name} in /metrics"))?
        .trim()
        .parse()
        .context("metric value")
}

fn nginx_version() -> anyhow::Result<String> {
    let out = std::process::Command::new(systems::nginx_binary()?)
        .arg("-v")
        .output()?;
    Ok(String::from_utf8_lossy(&out.stderr).trim().to_string())
}
