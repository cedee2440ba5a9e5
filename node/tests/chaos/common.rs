//! What every scenario shares: the binary, fleets, and a [`Run`] that keeps the seed, the
//! fault timeline and the request history, and turns them into a summary row.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use stratus_chaos::{Fleet, FleetOptions, FleetSpec, History, OriginEntry, Summary, TestOrigin};

/// The host every scenario's origin serves.
pub const HOST: &str = "example.test";

/// The `stratus` binary under test.
pub fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_stratus"))
}

/// One scenario's run: its name, seed, fault timeline and request history.
#[derive(Clone)]
pub struct Run {
    /// The scenario's name, as in the table.
    pub name: &'static str,
    /// Seed for anything random in the scenario.
    pub seed: u64,
    /// Every client request and its outcome.
    pub history: History,
    timeline: Arc<Mutex<Vec<(Duration, String)>>>,
    started: Instant,
}

impl Run {
    /// A run of `name` with `seed`.
    pub fn new(name: &'static str, seed: u64) -> Run {
        Run {
            name,
            seed,
            history: History::new(),
            timeline: Arc::default(),
            started: Instant::now(),
        }
    }

    /// Records a fault or a step in the timeline.
    pub fn note(&self, what: impl Into<String>) {
        self.timeline
            .lock()
            .push((self.started.elapsed(), what.into()));
    }

    /// Seed and timeline, printed when the scenario fails.
    pub fn report(&self) -> String {
        let mut out = format!("--- {} (seed {:#x}) timeline:\n", self.name, self.seed);
        for (at, what) in self.timeline.lock().iter() {
            out.push_str(&format!("  {:>8.3}s  {what}\n", at.as_secs_f64()));
        }
        let errors = self.history.errors();
        out.push_str(&format!("  {} client errors; first few:\n", errors.len()));
        for e in errors.iter().take(8) {
            out.push_str(&format!("    {e:?}\n"));
        }
        out
    }

    /// The summary row from the history and what the scenario measured.
    pub fn summary(
        &self,
        origin_fetches: usize,
        failover: Option<Duration>,
        verdict: Result<(), String>,
    ) -> Summary {
        Summary {
            scenario: self.name.to_string(),
            requests: self.history.len(),
            client_errors: self.history.errors().len(),
            origin_fetches,
            failover,
            verdict,
        }
    }
}

/// How a scenario's fleet is built.
pub struct Shape {
    /// Lower nodes.
    pub lowers: usize,
    /// Upper nodes.
    pub uppers: usize,
    /// Extra `[tier]` lines for lowers.
    pub lower_extra: String,
    /// Appended to every node's config.
    pub common_extra: String,
    /// Harness options (link proxies, default timeouts).
    pub options: FleetOptions,
}

impl Shape {
    /// `lowers` × `uppers` with the harness's short, nested timeouts.
    pub fn new(lowers: usize, uppers: usize) -> Shape {
        Shape {
            lowers,
            uppers,
            lower_extra: String::new(),
            common_extra: String::new(),
            options: FleetOptions::default(),
        }
    }

    /// With a fault proxy on every link.
    pub fn proxied(mut self) -> Shape {
        self.options.link_proxies = true;
        self
    }

    /// Starts an origin and the fleet in front of it.
    pub async fn start(self) -> (TestOrigin, Fleet) {
        let origin = TestOrigin::start().await.expect("origin starts");
        let spec = FleetSpec {
            lowers: self.lowers,
            uppers: self.uppers,
            origins: vec![OriginEntry::new(HOST, origin.addr())],
            lower_tier_extra: self.lower_extra,
            common_extra: self.common_extra,
        };
        let fleet = Fleet::start_with(bin(), &spec, &self.options)
            .await
            .expect("fleet starts");
        (origin, fleet)
    }
}

/// `Ok` when `ok`, else the reason.
pub fn check(ok: bool, why: impl FnOnce() -> String) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(why())
    }
}

/// Every scenario ends with: nodes alive unless killed on purpose, no panic in any log.
/// `killed` lists `("upper" | "lower", index)` pairs that were stopped on purpose.
pub fn end_checks(fleet: &mut Fleet, killed: &[(&str, usize)]) -> Result<(), String> {
    for (role, nodes) in [("upper", &mut fleet.uppers), ("lower", &mut fleet.lowers)] {
        for (i, n) in nodes.iter_mut().enumerate() {
            if n.panicked() {
                return Err(format!("{role} {i} panicked:\n{}", n.log()));
            }
            if !killed.contains(&(role, i)) && !n.is_running() {
                return Err(format!("{role} {i} died:\n{}", n.log()));
            }
        }
    }
    Ok(())
}

/// Keys `/{prefix}/0..n`.
pub fn keys(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("/{prefix}/{i}")).collect()
}

/// The origin fetches of `keys` so far.
pub fn fetches(origin: &TestOrigin, keys: &[String]) -> usize {
    keys.iter().map(|k| origin.count(k)).sum()
}
