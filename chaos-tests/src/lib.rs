//! stratus-chaos: a harness that runs real `stratus` processes on loopback against in-test
//! origins, and drives them with a client that reports exactly what came over the wire.
//!
//! It never binds a fixed port, never sleeps without a deadline, and kills every process it
//! started when the handle drops. Fault scenarios for the fleet build on it.

pub mod client;
pub mod collector;
pub mod fleet;
pub mod node;
pub mod origin;
mod wire;

pub use client::Response;
pub use collector::{CollectorMode, ReceivedSpan, TestCollector};
pub use fleet::{Fleet, FleetSpec, TEST_SECRET};
pub use node::{free_port, NodeProcess, OriginEntry};
pub use origin::{Gate, Reply, SeenRequest, TestOrigin};

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
