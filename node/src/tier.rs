//! The node's side of tiering: the one published [`TierView`], the outcome channel the request
//! path reports into, the health task that owns member health, the upper tier's replay cache,
//! and the small HTTP/1.1 exchange used for probes and cross-tier purges.
//!
//! Decisions stay in `stratus-tiering`; this module does the waiting and the sockets. The
//! request path never blocks on health: it `try_send`s outcomes to a bounded queue (a full
//! queue drops the report, which only delays a verdict), and loads the view from one
//! `ArcSwap`, so membership and health are always read together.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use parking_lot::Mutex;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use stratus_tiering::{
    Acceptor, ContextError, ControlContext, FleetSecret, Health, HealthBook, Keyring, Member,
    Outcome, Probe, ProbeFailure, RequestIdentity, RequestLine, Ring, TierView,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::tls::FleetTls;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::config::{Config, Role, TierConfig, UpperMember};
use crate::metrics::Metrics;
use stratus_tracing::BACKGROUND_TARGET;

/// The health endpoint every node answers on its data listener.
pub const HEALTH_PATH: &str = "/.well-known/stratus/health";
/// The control-context header between tiers. Never accepted from clients, never forwarded to
/// origins, never sent in a response.
pub const CONTROL_HEADER: &str = "stratus-ctx";
/// Outcome reports buffered between the request path and the health task.
const OUTCOME_QUEUE: usize = 4096;
/// Nonces an upper node remembers to refuse replays. When this many are held, new contexts
/// are refused (fail closed) rather than forgetting one that may still be replayed.
const REPLAY_LIMIT: u64 = 1_000_000;
/// Rough bytes one remembered nonce holds (32-byte key, moka entry overhead).
const REPLAY_ENTRY_BYTES: i64 = 128;
/// Upper members a lower tries for one request before `on_all_upper_down` decides.
pub const MAX_UPPER_ATTEMPTS: usize = 3;
/// While every member is healthy, one probe round in this many is traced.
const TRACED_ROUND_EVERY: u64 = 30;
/// How long a reload waits for the health task to publish new membership.
const RECONFIGURE_WAIT: Duration = Duration::from_secs(5);
/// Largest response the inter-tier exchange reads (probe and purge answers are tiny).
const MAX_EXCHANGE_RESPONSE: usize = 64 * 1024;

/// Something the health task folds. Members are named by address: a report that outlives a
/// membership change still reaches the right member, or none.
#[derive(Debug)]
enum HealthEvent {
    /// An attempt that started at the first instant ended like this at the second.
    Outcome(SocketAddr, Outcome, Instant, Instant),
    Probe(SocketAddr, Probe, Instant),
    /// A reload changed the membership or the thresholds; answered once the new view is
    /// published.
    Reconfigure(Vec<Member>, u32, u32, tokio::sync::oneshot::Sender<()>),
}

/// The keyring `[tier]` describes: `secret` signs, it and every `accept_secrets` entry are
/// accepted.
fn keyring(settings: &TierConfig) -> Keyring {
    let accepted = settings
        .accept_secrets
        .iter()
        .cloned()
        .map(FleetSecret::new);
    Keyring::new(FleetSecret::new(settings.secret.clone()), accepted)
}

/// Tier state shared by the proxy, the admin API and the health task.
pub struct Tier {
    /// The fleet secrets for control contexts: one signs, all are accepted; a reload may
    /// rotate them.
    keys: ArcSwap<Keyring>,
    /// Settings from `[tier]`, replaced whole by a reload.
    settings: ArcSwap<TierConfig>,
    /// Members found through `[tier].upper` DNS names (by the membership task).
    resolved: ArcSwap<Vec<UpperMember>>,
    /// Wakes the membership task when a reload changed the DNS names.
    names_changed: tokio::sync::Notify,
    /// One membership change at a time, so the last published is the latest state.
    publishing: tokio::sync::Mutex<()>,
    view: ArcSwap<TierView>,
    events: mpsc::Sender<HealthEvent>,
    /// The health task takes the book and the receiver when it starts and alone owns them.
    receiver: Mutex<Option<(HealthBook, mpsc::Receiver<HealthEvent>)>>,
    replays: moka::sync::Cache<String, ()>,
    /// Nonces held right now: counted on insert, uncounted by moka's eviction listener (an
    /// expired nonce stays counted until moka evicts it, which errs on the closed side).
    replays_held: Arc<AtomicU64>,
    replay_limit: u64,
    /// An upper's own names as a recipient: its `node.name` and its listen address.
    identities: Vec<String>,
    /// This process's start: an upper refuses contexts issued before it.
    started: SystemTime,
    node_name: String,
    node_role: Role,
    metrics: Arc<Metrics>,
    /// Mutual TLS between the tiers (`[tier.tls]`), when configured.
    tls: Option<Arc<FleetTls>>,
}

impl Tier {
    /// Tier state for `config`, or `None` for a standalone node.
    pub fn from_config(
        config: &Config,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Option<Arc<Tier>>> {
        let ttl = stratus_tiering::context::MAX_AGE + stratus_tiering::context::MAX_SKEW;
        Self::build(config, metrics, REPLAY_LIMIT, ttl)
    }

    /// `replay_ttl`: how long a nonce is remembered, the longest a context stays acceptable.
    fn build(
        config: &Config,
        metrics: Arc<Metrics>,
        replay_limit: u64,
        replay_ttl: Duration,
    ) -> anyhow::Result<Option<Arc<Tier>>> {
        let Some(settings) = config.tier.clone() else {
            return Ok(None);
        };
        let ring = Ring::new(ring_members(&settings, &[]))?;
        let book = HealthBook::new(ring, settings.failure_threshold, settings.rise);
        if config.node.role == Role::Lower {
            metrics
                .upper_members
                .with_label_values(&[])
                .set(i64::try_from(settings.upper.len()).unwrap_or(i64::MAX));
        }
        for m in &settings.upper {
            // Every member has a gauge from the start, not only after its first change.
            metrics
                .upper_up
                .with_label_values(&[m.addr.to_string().as_str()])
                .set(1);
        }
        let (events, receiver) = mpsc::channel(OUTCOME_QUEUE);
        let replays_held = Arc::new(AtomicU64::new(0));
        let held = replays_held.clone();
        // Room beyond the limit, so moka never evicts a nonce that may still be replayed: the
        // limit refuses first.
        let replays = moka::sync::Cache::builder()
            .max_capacity(replay_limit.saturating_mul(2))
            .time_to_live(replay_ttl)
            .eviction_listener(move |_, _, _| {
                let _ =
                    held.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
            })
            .build();
        let identities = match config.node.role {
            Role::Upper => vec![config.node.name.clone(), config.node.listen.to_string()],
            Role::Lower => Vec::new(),
        };
        let tls = settings.tls.as_ref().map(FleetTls::new).transpose()?;
        Ok(Some(Arc::new(Tier {
            tls,
            keys: ArcSwap::from_pointee(keyring(&settings)),
            view: ArcSwap::from_pointee(book.view()),
            settings: ArcSwap::from_pointee(settings),
            resolved: ArcSwap::from_pointee(Vec::new()),
            names_changed: tokio::sync::Notify::new(),
            publishing: tokio::sync::Mutex::new(()),
            events,
            receiver: Mutex::new(Some((book, receiver))),
            replays,
            replays_held,
            replay_limit,
            identities,
            started: SystemTime::now(),
            node_name: config.node.name.clone(),
            node_role: config.node.role,
            metrics,
        })))
    }

    /// Whether this lower node routes misses to upper members (by address or DNS name; a
    /// name that resolves to nothing yet still means "only uppers go to origins").
    pub fn has_upper(&self) -> bool {
        self.settings.load().has_upper()
    }

    /// The secrets in force: the first signs, all are accepted.
    pub fn keys(&self) -> Arc<Keyring> {
        self.keys.load_full()
    }

    /// Mutual TLS between the tiers, when configured.
    pub fn tls(&self) -> Option<&Arc<FleetTls>> {
        self.tls.as_ref()
    }

    /// The TLS server name to ask of the upper at `addr`: its `name` when listed with one
    /// (then verified), else a placeholder (any certificate of the fleet CA).
    pub fn upper_server_name(&self, addr: SocketAddr) -> (String, bool) {
        let settings = self.settings.load();
        match settings
            .upper
            .iter()
            .find(|m| m.addr == addr)
            .and_then(|m| m.name.clone())
        {
            Some(name) => (name, true),
            None => (crate::tls::UNNAMED_UPPER_SNI.to_string(), false),
        }
    }

    /// How this node's own exchanges with the upper at `addr` are secured.
    fn exchange_tls(&self, addr: SocketAddr) -> Option<ExchangeTls> {
        let tls = self.tls.as_ref()?;
        let (name, known) = self.upper_server_name(addr);
        // Never cleartext under mutual TLS: a name that is no DNS name is checked like an
        // unnamed member's (any certificate of the fleet CA).
        match rustls::pki_types::ServerName::try_from(name) {
            Ok(name) => Some((tls.client_config(known), name)),
            // A constant DNS name: always converts.
            Err(_) => rustls::pki_types::ServerName::try_from(crate::tls::UNNAMED_UPPER_SNI)
                .ok()
                .map(|name| (tls.client_config(false), name)),
        }
    }

    /// The `[tier]` settings in force.
    pub fn settings(&self) -> Arc<TierConfig> {
        self.settings.load_full()
    }

    /// Applies a reloaded `[tier]` (a reload already refused a changed secret): new timeouts
    /// and policy at once, new members and thresholds through the health task, which keeps
    /// the health of members that stay. Returns once the new ring routes requests.
    /// `resolved`: what the new DNS names resolve to, looked up by the reload before anything
    /// changed (so a switch to DNS members never publishes an empty ring); `None` keeps the
    /// members found so far. On failure the previous settings and members are put back.
    pub async fn reconfigure(
        &self,
        settings: TierConfig,
        resolved: Option<Vec<UpperMember>>,
    ) -> anyhow::Result<()> {
        let _one = self.publishing.lock().await;
        let resolved = resolved.unwrap_or_else(|| self.resolved.load().to_vec());
        Ring::new(ring_members(&settings, &resolved))?;
        let names_changed = settings.upper_dns != self.settings.load().upper_dns;
        let tls_before = self.settings.load().tls.clone();
        if let (Some(tls), Some(material)) = (&self.tls, &settings.tls) {
            if Some(material) != tls_before.as_ref() {
                tls.reload(material)?;
            }
        }
        let keys_before = self.keys.swap(Arc::new(keyring(&settings)));
        let before = self.settings.swap(Arc::new(settings));
        let found_before = self.resolved.swap(Arc::new(resolved));
        if let Err(e) = self.publish_members().await {
            self.settings.store(before);
            self.resolved.store(found_before);
            self.keys.store(keys_before);
            if let (Some(tls), Some(material)) = (&self.tls, &tls_before) {
                let _ = tls.reload(material);
            }
            return Err(e);
        }
        if names_changed {
            self.names_changed.notify_one();
        }
        Ok(())
    }

    /// The members the DNS names resolve to now (the membership task's finding).
    pub fn resolved(&self) -> Arc<Vec<UpperMember>> {
        self.resolved.load_full()
    }

    /// Replaces the members found through DNS; returns once the new ring routes requests.
    pub async fn set_resolved(&self, members: Vec<UpperMember>) -> anyhow::Result<()> {
        let _one = self.publishing.lock().await;
        Ring::new(ring_members(&self.settings.load(), &members))?;
        self.resolved.store(Arc::new(members));
        self.publish_members().await
    }

    /// Waits until a reload changes the DNS names.
    pub async fn names_changed(&self) {
        self.names_changed.notified().await;
    }

    /// Hands the health task the members of the settings and DNS in force; returns once it
    /// published them. Callers hold `publishing`.
    async fn publish_members(&self) -> anyhow::Result<()> {
        if self.node_role == Role::Upper {
            // An upper has no members and no health task.
            return Ok(());
        }
        let settings = self.settings.load_full();
        let members = ring_members(&settings, &self.resolved.load());
        let (done, published) = tokio::sync::oneshot::channel();
        let event =
            HealthEvent::Reconfigure(members, settings.failure_threshold, settings.rise, done);
        let stopped = || anyhow::anyhow!("the health task is not running");
        self.events.send(event).await.map_err(|_| stopped())?;
        tokio::time::timeout(RECONFIGURE_WAIT, published)
            .await
            .map_err(|_| stopped())?
            .map_err(|_| stopped())
    }

    /// The current membership + health snapshot.
    pub fn view(&self) -> Arc<TierView> {
        self.view.load_full()
    }

    /// Whom contexts for the member at `addr` are addressed to: its configured `name`, else
    /// its address (also for a member a reload removed while an attempt was on its way).
    pub fn recipient(&self, addr: SocketAddr) -> String {
        self.settings
            .load()
            .upper
            .iter()
            .find(|m| m.addr == addr)
            .map_or_else(|| addr.to_string(), |m| m.recipient())
    }

    /// A fresh context for one attempt of `identity` to the member at `addr`.
    pub fn issue(&self, identity: &RequestIdentity, addr: SocketAddr) -> ControlContext {
        identity.issue(&self.recipient(addr), rand::random(), SystemTime::now())
    }

    /// Reports the outcome of an attempt that started at `started`, without waiting.
    pub fn report(&self, member: SocketAddr, outcome: Outcome, started: Instant) {
        let event = HealthEvent::Outcome(member, outcome, started, Instant::now());
        if self.events.try_send(event).is_err() {
            self.metrics.health_reports_dropped.inc();
        }
    }

    /// Verifies a received context and refuses a nonce seen before (a replay). A `refresh` is a
    /// background revalidation this node spawned from a request it already accepted: it
    /// carries the same context, so only the signature is checked again.
    pub fn accept(
        &self,
        value: Option<&str>,
        line: RequestLine<'_>,
        refresh: bool,
        now: SystemTime,
    ) -> Result<ControlContext, ContextError> {
        let accepted = self.check(value, line, refresh, now);
        if let Err(e) = &accepted {
            self.metrics
                .context_refusals
                .with_label_values(&[e.detail()])
                .inc();
        }
        accepted
    }

    fn check(
        &self,
        value: Option<&str>,
        line: RequestLine<'_>,
        refresh: bool,
        now: SystemTime,
    ) -> Result<ControlContext, ContextError> {
        let value = value.ok_or(ContextError::Missing)?;
        if refresh {
            return ControlContext::verify(value, &self.keys.load(), line);
        }
        let keys = self.keys.load();
        let acceptor = Acceptor {
            keys: &keys,
            identities: &self.identities,
            not_before: self.started,
        };
        let ctx = ControlContext::decode(value, &acceptor, line, now)?;
        // Reserve a slot first, so concurrent requests cannot overshoot the limit. At the
        // limit, let moka evict what expired (it has no background thread) and try once more.
        if self.reserve_replay_slot().is_err() {
            self.replays.run_pending_tasks();
            self.reserve_replay_slot()
                .map_err(|_| ContextError::ReplayCacheFull)?;
        }
        let fresh = self
            .replays
            .entry(ctx.nonce().to_string())
            .or_insert(())
            .is_fresh();
        if !fresh {
            self.release_replay_slot();
        }
        let held = self.replays_held.load(Ordering::Relaxed);
        let held = i64::try_from(held).unwrap_or(i64::MAX);
        self.metrics.replay_cache_entries.set(held);
        self.metrics
            .replay_cache_bytes
            .set(held.saturating_mul(REPLAY_ENTRY_BYTES));
        if fresh {
            Ok(ctx)
        } else {
            Err(ContextError::Replayed)
        }
    }

    fn reserve_replay_slot(&self) -> Result<u64, u64> {
        let limit = self.replay_limit;
        self.replays_held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
    }

    fn release_replay_slot(&self) {
        let _ = self
            .replays_held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Purges `host`/`path` on one upper member, authenticated by a control context addressed
    /// to it. The answer names the member as it names itself.
    pub async fn purge_member(
        &self,
        addr: SocketAddr,
        host: &str,
        path: &str,
    ) -> serde_json::Value {
        let span = tracing::info_span!(
            target: BACKGROUND_TARGET,
            "purge at an upper",
            upper = %addr,
            host,
            path,
            outcome = tracing::field::Empty,
        );
        let answer = self
            .purge_member_once(addr, host, path)
            .instrument(span.clone())
            .await;
        if let Some(outcome) = answer.get("outcome") {
            span.record("outcome", tracing::field::display(outcome));
        }
        answer
    }

    async fn purge_member_once(
        &self,
        addr: SocketAddr,
        host: &str,
        path: &str,
    ) -> serde_json::Value {
        use serde_json::json;
        let identity = RequestIdentity::new(
            host,
            crate::policy::key_id(&crate::policy::primary_key(host, path)),
            format!("{:032x}", rand::random::<u128>()),
            self.node_name.clone(),
        );
        let ctx = self.issue(&identity, addr);
        let value = ctx.encode(
            self.keys.load().signing(),
            RequestLine {
                method: "PURGE",
                target: path,
            },
        );
        let request = format!(
            "PURGE {path} HTTP/1.1\r\nHost: {host}\r\n{CONTROL_HEADER}: {value}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        let settings = self.settings();
        let timeout = settings.connect_timeout + settings.probe_timeout;
        let answer = exchange(addr, request.as_bytes(), timeout, self.exchange_tls(addr)).await;
        let reply = answer
            .as_ref()
            .ok()
            .filter(|(status, _)| *status == 200)
            .and_then(|(_, body)| serde_json::from_slice::<serde_json::Value>(body).ok());
        let name = reply
            .as_ref()
            .and_then(|v| v.get("node").cloned())
            .unwrap_or_else(|| json!(self.recipient(addr)));
        let outcome = match (&answer, &reply) {
            (_, Some(v)) => v.get("outcome").cloned().unwrap_or(json!("unknown")),
            (Ok((status, _)), None) => json!(format!("error: upper answered {status}")),
            (Err(e), None) => json!(format!("error: {e}")),
        };
        json!({"node": name, "addr": addr.to_string(), "outcome": outcome})
    }

    /// The readiness probe a lower sends `member`: the health path with a signed context, so
    /// a member with another secret or a skewed clock refuses it as it would a request.
    fn probe_request(&self, member: SocketAddr) -> String {
        let identity = RequestIdentity::new(
            "stratus-probe",
            "probe",
            format!("{:032x}", rand::random::<u128>()),
            self.node_name.clone(),
        );
        let ctx = self.issue(&identity, member);
        let value = ctx.encode(
            self.keys.load().signing(),
            RequestLine {
                method: "GET",
                target: HEALTH_PATH,
            },
        );
        format!(
            "GET {HEALTH_PATH} HTTP/1.1\r\nHost: stratus\r\n{CONTROL_HEADER}: {value}\r\nConnection: close\r\n\r\n"
        )
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

    /// Probes every member, one round at a time: a round ends (each probe bounded by
    /// `probe_timeout`) before the interval to the next begins, so probes never overlap.
    /// Each round probes the members of the view in force when it starts.
    async fn probe_rounds(tier: Arc<Tier>) {
        let mut last_failed = 0;
        for round in 0u64.. {
            tokio::time::sleep(tier.settings().probe_interval).await;
            let view = tier.view();
            let members: Vec<Member> = view.members().to_vec();
            // Traced: the first round, every TRACED_ROUND_EVERY-th, and every round while a
            // probe fails or a member is down — what an SRE looks for, without a span a second
            // per lower drowning the request traces.
            let someone_down = (0..members.len()).any(|id| !view.is_up(id));
            let traced = round % TRACED_ROUND_EVERY == 0 || last_failed > 0 || someone_down;
            let span = if traced {
                tracing::info_span!(
                    target: BACKGROUND_TARGET,
                    "probe round",
                    members = members.len(),
                    failed = tracing::field::Empty,
                )
            } else {
                tracing::Span::none()
            };
            let round = members.into_iter().map(|m| {
                let tier = tier.clone();
                let addr = m.addr;
                let probe_span = if traced {
                    tracing::info_span!(
                        target: BACKGROUND_TARGET,
                        parent: &span,
                        "readiness probe",
                        upper = %addr,
                        result = tracing::field::Empty,
                    )
                } else {
                    tracing::Span::none()
                };
                async move {
                    let request = tier.probe_request(addr);
                    let tls = tier.exchange_tls(addr);
                    let result = probe(addr, &request, tier.settings().probe_timeout, tls).await;
                    let said = match result {
                        Probe::Ready => "ready".to_string(),
                        Probe::Failed(f) => f.to_string(),
                    };
                    tracing::Span::current().record("result", said.as_str());
                    let _ = tier
                        .events
                        .send(HealthEvent::Probe(addr, result, Instant::now()))
                        .await;
                    matches!(result, Probe::Ready)
                }
                .instrument(probe_span)
            });
            let mut set = tokio::task::JoinSet::new();
            for p in round {
                set.spawn(p);
            }
            let mut failed = 0;
            while let Some(ready) = set.join_next().await {
                failed += usize::from(!ready.unwrap_or(false));
            }
            span.record("failed", failed);
            last_failed = failed;
        }
    }

    fn publish(&self, view: TierView) {
        // Reset first: a member a reload removed leaves no gauge behind.
        self.metrics.upper_down_reason.reset();
        self.metrics.upper_up.reset();
        self.metrics
            .upper_members
            .with_label_values(&[])
            .set(i64::try_from(view.members().len()).unwrap_or(i64::MAX));
        for (id, m) in view.members().iter().enumerate() {
            let addr = m.addr.to_string();
            let health = view.health(id);
            let up = health.is_some_and(Health::is_up);
            self.metrics
                .upper_up
                .with_label_values(&[addr.as_str()])
                .set(i64::from(up));
            if let Some(Health::Down { reason, .. }) = health {
                let why = reason.to_string();
                tracing::warn!(upper = %addr, reason = %why, "upper member is down");
                self.metrics
                    .upper_down_reason
                    .with_label_values(&[addr.as_str(), why.as_str()])
                    .set(1);
            }
        }
        self.tier.view.store(Arc::new(view));
    }
}

/// Folds one event into the book; true when the published view must change.
fn fold(book: &mut HealthBook, event: HealthEvent) -> bool {
    match event {
        HealthEvent::Outcome(addr, outcome, started, at) => book
            .member_id(addr)
            .is_some_and(|id| book.observe(id, outcome, started, at)),
        HealthEvent::Probe(addr, result, at) => {
            if let Probe::Failed(f) = result {
                tracing::debug!(member = %addr, failure = %f, "readiness probe failed");
            }
            book.member_id(addr)
                .is_some_and(|id| book.probed(id, result, at))
        }
        // Handled by the task itself, which answers once the view is published.
        HealthEvent::Reconfigure(..) => false,
    }
}

/// The ring members: `[tier].upper` by address in config order, then those found through
/// DNS (an address listed both ways counts once, as configured).
fn ring_members(settings: &TierConfig, resolved: &[UpperMember]) -> Vec<Member> {
    let mut members: Vec<Member> = settings
        .upper
        .iter()
        .map(|m| Member {
            addr: m.addr,
            weight: m.weight,
        })
        .collect();
    for m in resolved {
        if !members.iter().any(|x| x.addr == m.addr) {
            members.push(Member {
                addr: m.addr,
                weight: m.weight,
            });
        }
    }
    members
}

/// One readiness probe: 200 is ready, anything else says how it failed.
async fn probe(
    addr: SocketAddr,
    request: &str,
    timeout: Duration,
    tls: Option<ExchangeTls>,
) -> Probe {
    match tokio::time::timeout(timeout, exchange_once(addr, request.as_bytes(), tls)).await {
        Err(_) => Probe::Failed(ProbeFailure::TimedOut),
        Ok(Err(ExchangeError::Connect)) => Probe::Failed(ProbeFailure::Unreachable),
        Ok(Err(ExchangeError::Broken)) => Probe::Failed(ProbeFailure::Status(0)),
        Ok(Ok((200, _))) => Probe::Ready,
        Ok(Ok((status, _))) => Probe::Failed(ProbeFailure::Status(status)),
    }
}

#[async_trait]
impl BackgroundService for HealthTask {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some((mut book, mut events)) = self.tier.receiver.lock().take() else {
            tracing::error!("health task started twice; the first one owns member health");
            return;
        };
        let prober = tokio::spawn(Self::probe_rounds(self.tier.clone()));
        loop {
            let changed = tokio::select! {
                _ = shutdown.changed() => break,
                event = events.recv() => match event {
                    None => break,
                    Some(HealthEvent::Reconfigure(members, failure_threshold, rise, done)) => {
                        match Ring::new(members) {
                            Ok(ring) => {
                                book.reconfigure(ring, failure_threshold, rise);
                                self.publish(book.view());
                            }
                            // Checked before it was sent: a ring that cannot be built changes
                            // nothing.
                            Err(e) => tracing::error!(error = %e, "membership change refused"),
                        }
                        let _ = done.send(());
                        false
                    }
                    Some(event) => fold(&mut book, event),
                },
            };
            if changed {
                self.publish(book.view());
            }
        }
        prober.abort();
    }
}

/// Why an exchange failed before a status line arrived.
#[derive(Debug)]
enum ExchangeError {
    /// No connection.
    Connect,
    /// The connection broke, or the answer was not HTTP or too large.
    Broken,
}

/// A client config and the server name to verify, for an exchange over TLS.
type ExchangeTls = (
    Arc<rustls::ClientConfig>,
    rustls::pki_types::ServerName<'static>,
);

async fn exchange_once(
    addr: SocketAddr,
    request: &[u8],
    tls: Option<ExchangeTls>,
) -> Result<(u16, Vec<u8>), ExchangeError> {
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|_| ExchangeError::Connect)?;
    let _ = tcp.set_nodelay(true);
    match tls {
        None => exchange_on(tcp, request).await,
        Some((config, name)) => {
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|_| ExchangeError::Broken)?;
            exchange_on(stream, request).await
        }
    }
}

async fn exchange_on<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
    request: &[u8],
) -> Result<(u16, Vec<u8>), ExchangeError> {
    stream
        .write_all(request)
        .await
        .map_err(|_| ExchangeError::Broken)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|_| ExchangeError::Broken)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_EXCHANGE_RESPONSE {
            return Err(ExchangeError::Broken);
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(&buf) {
        Ok(httparse::Status::Complete(n)) => Ok((resp.code.unwrap_or(0), buf[n..].to_vec())),
        _ => Err(ExchangeError::Broken),
    }
}

/// One HTTP/1.1 exchange with `Connection: close`: returns the status and body. Used for
/// cross-tier purges, where a full client would add nothing.
pub async fn exchange(
    addr: SocketAddr,
    request: &[u8],
    timeout: Duration,
    tls: Option<ExchangeTls>,
) -> anyhow::Result<(u16, Vec<u8>)> {
    match tokio::time::timeout(timeout, exchange_once(addr, request, tls)).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(ExchangeError::Connect)) => anyhow::bail!("{addr}: cannot connect"),
        Ok(Err(ExchangeError::Broken)) => anyhow::bail!("{addr}: broken or invalid answer"),
        Err(_) => anyhow::bail!("{addr}: no answer within {timeout:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn upper(limit: u64, ttl: Duration) -> Arc<Tier> {
        let config = Config::parse(
            r#"
[node]
name = "up-1"
role = "upper"
listen = "127.0.0.1:8180"
admin_listen = "127.0.0.1:9180"
[tier]
secret = "0123456789abcdef0123456789abcdef"
[[origin]]
host = "example.test"
address = "127.0.0.1:9000"
"#,
            Path::new("."),
        )
        .expect("valid upper config");
        let metrics = Arc::new(Metrics::new("test").expect("metrics"));
        Tier::build(&config, metrics, limit, ttl)
            .expect("tier")
            .expect("upper has a tier")
    }

    fn context(tier: &Tier, recipient: &str, issued: SystemTime) -> String {
        RequestIdentity::new("example.test", "k", "r", "edge-1")
            .issue(recipient, rand::random(), issued)
            .encode(tier.keys().signing(), line())
    }

    fn line() -> RequestLine<'static> {
        RequestLine {
            method: "GET",
            target: "/a",
        }
    }

    #[test]
    fn the_replay_cache_refuses_replays_and_fails_closed_when_full() {
        let tier = upper(3, Duration::from_secs(12));
        let now = SystemTime::now();
        let first = context(&tier, "up-1", now);
        assert!(tier.accept(Some(&first), line(), false, now).is_ok());
        assert_eq!(
            tier.accept(Some(&first), line(), false, now).err(),
            Some(ContextError::Replayed)
        );
        // A refresh this node spawned re-verifies the signature only.
        assert!(tier.accept(Some(&first), line(), true, now).is_ok());
        for _ in 0..2 {
            let c = context(&tier, "127.0.0.1:8180", now);
            assert!(tier.accept(Some(&c), line(), false, now).is_ok());
        }
        let c = context(&tier, "up-1", now);
        assert_eq!(
            tier.accept(Some(&c), line(), false, now).err(),
            Some(ContextError::ReplayCacheFull),
            "three nonces held: a fourth is refused, not remembered in place of another"
        );
        let refused = tier
            .metrics
            .context_refusals
            .with_label_values(&["replay-cache-full"])
            .get();
        assert_eq!(refused, 1);
        assert_eq!(tier.metrics.replay_cache_entries.get(), 3);
    }

    #[test]
    fn a_full_replay_cache_recovers_as_nonces_expire() {
        let tier = upper(2, Duration::from_millis(100));
        let now = SystemTime::now();
        for _ in 0..2 {
            let c = context(&tier, "up-1", now);
            assert!(tier.accept(Some(&c), line(), false, now).is_ok());
        }
        let c = context(&tier, "up-1", now);
        assert_eq!(
            tier.accept(Some(&c), line(), false, now).err(),
            Some(ContextError::ReplayCacheFull)
        );
        // Once the nonces' time is up the cache takes new ones again (polled, bounded).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut accepted = false;
        while !accepted && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            let c = context(&tier, "up-1", SystemTime::now());
            accepted = tier
                .accept(Some(&c), line(), false, SystemTime::now())
                .is_ok();
        }
        assert!(
            accepted,
            "the replay cache stayed full after its nonces expired"
        );
    }

    #[test]
    fn contexts_for_others_or_from_before_the_start_are_refused() {
        let tier = upper(10, Duration::from_secs(12));
        let now = SystemTime::now();
        let other = context(&tier, "up-2", now);
        assert_eq!(
            tier.accept(Some(&other), line(), false, now).err(),
            Some(ContextError::WrongRecipient)
        );
        let old = context(&tier, "up-1", tier.started - Duration::from_millis(5));
        assert_eq!(
            tier.accept(Some(&old), line(), false, now).err(),
            Some(ContextError::BeforeStart)
        );
    }
}
