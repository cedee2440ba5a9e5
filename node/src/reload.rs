//! SIGHUP reloads the config file, as nginx, Varnish and systemd's `ExecReload` expect.
//!
//! Rollback by construction: the new file is parsed and validated whole, then compared with
//! the running config ([`Config::reload_refusals`]); only when both pass is anything
//! changed, and then everything at once — the config every new request loads, the tier's
//! members and timeouts (the health task keeps the health of members that stay), the DNS
//! resolver when `[dns]` changed, the store's `max_object_size`. A rejected or refused file
//! is logged with every problem, counted in `stratus_config_reloads_total{result}`, and the
//! running config keeps serving. The cache survives every reload.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use stratus_tracing::BACKGROUND_TARGET;
use tokio::signal::unix::{signal, SignalKind};
use tracing::Instrument;

use crate::config::{Config, ConfigError, Live};
use crate::dns::Dns;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::tier::Tier;

/// How one reload ended (the `result` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reloaded {
    /// The new config is in force.
    Ok,
    /// The file could not be read or is invalid; nothing changed.
    Rejected,
    /// It changes something only a restart or `--upgrade` can; nothing changed.
    Refused,
}

impl Reloaded {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Reloaded::Ok => "ok",
            Reloaded::Rejected => "rejected",
            Reloaded::Refused => "refused",
        }
    }
}

/// Everything a reload replaces, and the file it reads.
pub struct Reloader {
    path: PathBuf,
    live: Live,
    tier: Option<Arc<Tier>>,
    dns: Arc<ArcSwap<Dns>>,
    store: &'static Store,
    metrics: Arc<Metrics>,
}

impl Reloader {
    /// A reloader of `path` into the running node's parts.
    pub fn new(
        path: PathBuf,
        live: Live,
        tier: Option<Arc<Tier>>,
        dns: Arc<ArcSwap<Dns>>,
        store: &'static Store,
        metrics: Arc<Metrics>,
    ) -> Reloader {
        Reloader {
            path,
            live,
            tier,
            dns,
            store,
            metrics,
        }
    }

    /// Reads, checks and applies the file once; logs and counts the result.
    pub async fn reload(&self) -> Reloaded {
        let span = tracing::info_span!(
            target: BACKGROUND_TARGET,
            "config reload",
            config = %self.path.display(),
            result = tracing::field::Empty,
        );
        let result = self.try_reload().instrument(span.clone()).await;
        span.record("result", result.as_str());
        self.metrics
            .config_reloads
            .with_label_values(&[result.as_str()])
            .inc();
        result
    }

    async fn try_reload(&self) -> Reloaded {
        let file = self.path.display();
        let next = match Config::load(&self.path) {
            Ok(next) => next,
            Err(e) => {
                let problems = match &e {
                    ConfigError::Invalid { problems, .. } => problems.len(),
                    ConfigError::Read { .. } => 1,
                };
                for line in e.lines() {
                    tracing::error!(config = %file, "{line}");
                }
                tracing::error!(config = %file, problems, "reload rejected; the running config keeps serving");
                return Reloaded::Rejected;
            }
        };
        let running = self.live.load_full();
        let refusals = running.reload_refusals(&next);
        if !refusals.is_empty() {
            for p in &refusals {
                tracing::error!(config = %file, "{file}: {p}");
            }
            tracing::error!(config = %file, "reload refused; the running config keeps serving");
            return Reloaded::Refused;
        }
        // Build what can fail before changing anything.
        let dns = if next.dns != running.dns {
            match Dns::new(&next.dns) {
                Ok(dns) => Some(dns),
                Err(e) => {
                    tracing::error!(config = %file, "dns: {e}; reload rejected");
                    return Reloaded::Rejected;
                }
            }
        } else {
            None
        };
        // The new resolver first (put back if the tier refuses), so the names of upper
        // members that changed are looked up with it — before the new ring is published, so
        // it is whole the moment it routes — and the membership task uses it from now on.
        let previous_dns = dns.map(|dns| self.dns.swap(Arc::new(dns)));
        if let (Some(tier), Some(settings)) = (&self.tier, next.tier.clone()) {
            let resolved = if settings.upper_dns != tier.settings().upper_dns {
                let dns = self.dns.load_full();
                Some(
                    crate::membership::resolve_for_reload(
                        &dns,
                        &settings.upper_dns,
                        &tier.resolved(),
                    )
                    .await,
                )
            } else {
                None
            };
            if let Err(e) = tier.reconfigure(settings, resolved).await {
                if let Some(previous) = previous_dns {
                    self.dns.store(previous);
                }
                tracing::error!(config = %file, "tier.upper: {e}; reload rejected");
                return Reloaded::Rejected;
            }
        }
        self.store.set_max_object_size(next.cache.max_object_size);
        let origins = next.origins.len();
        let uppers = next.tier.as_ref().map_or(0, |t| t.upper.len());
        self.live.store(Arc::new(next));
        tracing::info!(config = %file, origins, uppers, "config reloaded");
        Reloaded::Ok
    }
}

#[async_trait]
impl BackgroundService for Reloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP; reloads are off");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                got = hangups.recv() => {
                    if got.is_none() {
                        break;
                    }
                    tracing::info!(config = %self.path.display(), "SIGHUP: reloading");
                    self.reload().await;
                }
            }
        }
    }
}
