//! stratus-chaos: a harness that runs real `stratus` processes on loopback against in-test
//! origins, and drives them with a client that reports exactly what came over the wire.
//!
//! Faults come from outside the processes, as in production: signals to a node (stop, kill,
//! terminate, upgrade), a TCP fault proxy on any link (latency, bandwidth, resets, black
//! holes, cut streams), and an origin that misbehaves on purpose (bad framing, resets, stalls).
//! Scenarios record every request in a history and judge the whole of it.
//!
//! It never binds a fixed port, never sleeps without a deadline, and kills every process and
//! stops every task it started when the handle drops.

pub mod client;
pub mod collector;
pub mod dns;
pub mod fault;
pub mod fleet;
pub mod history;
pub mod node;
pub mod origin;
pub mod pki;
mod wire;

pub use client::Response;
pub use collector::{CollectorMode, ReceivedSpan, TestCollector};
pub use dns::TestDns;
pub use fault::{Fault, FaultProxy};
pub use fleet::{Fleet, FleetOptions, FleetSpec, TEST_SECRET};
pub use history::{load, pending, table, History, Record, Summary};
pub use nix::sys::signal::Signal;
pub use node::{free_port, NodeProcess, OriginEntry};
pub use origin::{Framing, Gate, Reply, SeenRequest, TestOrigin};
pub use pki::{FleetPki, NodeCert};

use std::time::{Duration, Instant};

/// Polls `check` until it returns true or `deadline` passes; returns the last answer.
pub async fn eventually<F, Fut>(deadline: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
