//! The node's side of tiering: the one published [`TierView`], the outcome channel the request
//! path reports into, the health task that owns member health, the upper tier's replay cache,
//! and the small HTTP/1.1 exchange used for probes and cross-tier purges.
//!
//! Decisions stay in `stratus-tiering`; this module does the waiting and the sockets. The
//! request path never blocks on health: it `try_send`s outcomes to a bounded queue (a full
//! queue drops the report, which only delays a verdict), and loads the view from one
//! `ArcSwap`, so membership and health are always read together.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use parking_lot::Mutex;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use stratus_tiering::{
    ContextError, ControlContext, FleetSecret, HealthBook, Member, MemberId, Outcome, Ring,
    TierView,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::config::{Config, TierConfig};
use crate::metrics::Metrics;

/// The health endpoint every node answers on its data listener.
pub const HEALTH_PATH: &str = "/.well-known/stratus/health";
/// Outcome reports buffered between the request path and the health task.
const OUTCOME_QUEUE: usize = 4096;
/// Request ids remembered by an upper node to refuse replays (bounded memory).
const REPLAY_CACHE_ENTRIES: u64 = 1_000_000;
/// Upper members a lower tries for one request before `on_all_upper_down` decides.
pub const MAX_UPPER_ATTEMPTS: usize = 3;
/// Largest response the inter-tier exchange reads (probe and purge answers are tiny).
const MAX_EXCHANGE_RESPONSE: usize = 64 * 1024;

/// Something the health task folds.
#[derive(Debug, Clone, Copy)]
enum HealthEvent {
    Outcome(MemberId, Outcome, Instant),
    Probe(MemberId, bool, Instant),
}

/// Tier state shared by the proxy, the admin API and the health task.
pub struct Tier {
    /// The fleet secret for control contexts.
    pub secret: FleetSecret,
    /// Settings from `[tier]`.
    pub settings: TierConfig,
    view: ArcSwap<TierView>,
    events: mpsc::Sender<HealthEvent>,
    /// The health task takes the book and the receiver when it starts and alone owns them.
    receiver: Mutex<Option<(HealthBook, mpsc::Receiver<HealthEvent>)>>,
    replays: moka::sync::Cache<String, ()>,
}

impl Tier {
    /// Tier state for `config`, or `None` for a standalone node.
    pub fn from_config(config: &Config) -> anyhow::Result<Option<Arc<Tier>>> {
        let Some(settings) = config.tier.clone() else {
            return Ok(None);
        };
        let members = settings
            .upper
            .iter()
            .map(|m| Member {
                addr: m.addr,
                weight: m.weight,
            })
            .collect();
        let ring = Ring::new(members)?;
        let book = HealthBook::new(ring, settings.failure_threshold);
        let (events, receiver) = mpsc::channel(OUTCOME_QUEUE);
        let replays = moka::sync::Cache::builder()
            .max_capacity(REPLAY_CACHE_ENTRIES)
            .time_to_live(stratus_tiering::context::MAX_AGE + stratus_tiering::context::MAX_SKEW)
            .build();
        Ok(Some(Arc::new(Tier {
            secret: FleetSecret::new(settings.secret.clone()),
            view: ArcSwap::from_pointee(book.view()),
            settings,
            events,
            receiver: Mutex::new(Some((book, receiver))),
            replays,
        })))
    }

    /// Whether this lower node routes misses to upper members.
    pub fn has_upper(&self) -> bool {
        !self.settings.upper.is_empty()
    }

    /// The current membership + health snapshot.
    pub fn view(&self) -> Arc<TierView> {
        self.view.load_full()
    }

    /// Reports one attempt's outcome without waiting.
    pub fn report(&self, member: MemberId, outcome: Outcome) {
        let _ = self
            .events
            .try_send(HealthEvent::Outcome(member, outcome, Instant::now()));
    }

    /// Verifies a received context and refuses a request id seen before (a replay).
    pub fn accept(
        &self,
        value: Option<&str>,
        method: &str,
        target: &str,
    ) -> Result<ControlContext, ContextError> {
        let value = value.ok_or(ContextError::Missing)?;
        let line = stratus_tiering::RequestLine { method, target };
        let ctx = ControlContext::decode(value, &self.secret, line, SystemTime::now())?;
        let fresh = self
            .replays
            .entry(format!("{}/{}", ctx.sender(), ctx.request_id()))
            .or_insert(())
            .is_fresh();
        if fresh {
            Ok(ctx)
        } else {
            Err(ContextError::Replayed)
        }
    }
}

/// The health task: folds outcomes and probe results, publishes views. One per lower node.
pub struct HealthTask {
    tier: Arc<Tier>,
    metrics: Arc<Metrics>,
}

impl HealthTask {
    /// The task for `tier`.
    pub fn new(tier: Arc<Tier>, metrics: Arc<Metrics>) -> HealthTask {
        HealthTask { tier, metrics }
    }

    fn spawn_probes(&self, members: &[Member]) {
        let timeout = self.tier.settings.connect_timeout + self.tier.settings.read_timeout;
        for (id, member) in members.iter().enumerate() {
            let events = self.tier.events.clone();
            let addr = member.addr;
            tokio::spawn(async move {
                let request = format!(
                    "GET {HEALTH_PATH} HTTP/1.1\r\nHost: stratus\r\nConnection: close\r\n\r\n"
                );
                let ok = matches!(
                    exchange(addr, request.as_bytes(), timeout).await,
                    Ok((200, _))
                );
                let _ = events
                    .send(HealthEvent::Probe(id, ok, Instant::now()))
                    .await;
            });
        }
    }
}

#[async_trait]
impl BackgroundService for HealthTask {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some((mut book, mut events)) = self.tier.receiver.lock().take() else {
            tracing::error!("health task started twice; the first one owns member health");
            return;
        };
        let members: Vec<Member> = book.view().members().to_vec();
        let mut ticks = tokio::time::interval(self.tier.settings.probe_interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let changed = tokio::select! {
                _ = shutdown.changed() => return,
                _ = ticks.tick() => {
                    self.spawn_probes(&members);
                    false
                }
                event = events.recv() => match event {
                    None => return,
                    Some(HealthEvent::Outcome(id, outcome, at)) => book.observe(id, outcome, at),
                    Some(HealthEvent::Probe(id, ok, at)) => book.probed(id, ok, at),
                },
            };
            if changed {
                let view = book.view();
                for (id, m) in view.members().iter().enumerate() {
                    let up = view.is_up(id);
                    tracing::warn!(
                        "upper member {} is now {}",
                        m.addr,
                        if up { "up" } else { "down" }
                    );
                    self.metrics
                        .upper_up
                        .with_label_values(&[m.addr.to_string().as_str()])
                        .set(i64::from(up));
                }
                self.tier.view.store(Arc::new(view));
            }
        }
    }
}

/// One HTTP/1.1 exchange with `Connection: close`: returns the status and body. Used for
/// probes and cross-tier purges, where a full client would add nothing.
pub async fn exchange(
    addr: SocketAddr,
    request: &[u8],
    timeout: Duration,
) -> anyhow::Result<(u16, Vec<u8>)> {
    tokio::time::timeout(timeout, async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(request).await?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
            anyhow::ensure!(buf.len() <= MAX_EXCHANGE_RESPONSE, "response too large");
        }
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        match resp.parse(&buf)? {
            httparse::Status::Complete(n) => Ok((resp.code.unwrap_or(0), buf[n..].to_vec())),
            httparse::Status::Partial => anyhow::bail!("incomplete response"),
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("{addr}: no answer within {timeout:?}"))?
}
