//! Assembles one node from a validated [`Config`]: the proxy service, the admin service and
//! pingora's server process (signals, graceful shutdown, socket hand-over on `--upgrade`).

use std::sync::Arc;

use arc_swap::ArcSwap;

use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::{RunArgs, Server};
use pingora_core::services::listening::Service;
use std::time::Duration;
use stratus_tracing::{ExportSettings, Telemetry};

use crate::admin::Admin;
use crate::config::{Config, Live, Role};
use crate::dns::Dns;
use crate::membership::DnsMembership;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::reload::Reloader;
use crate::store::Store;
use crate::tier::{HealthTask, Tier};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::{background_service, BackgroundService};

/// How a node process starts.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Take the listening sockets over from a running old process.
    pub upgrade: bool,
    /// Unix socket the old and new process hand sockets over on.
    pub upgrade_sock: Option<String>,
    /// The config file SIGHUP reloads; `None`: SIGHUP is ignored.
    pub config_path: Option<std::path::PathBuf>,
}

/// A built node: the pingora server and the telemetry to flush when it stops.
pub struct Node {
    /// The pingora server.
    pub server: Server,
    /// Span export, flushed after the server stops.
    pub telemetry: Telemetry,
    /// The config it started with, for its startup lines.
    config: Arc<Config>,
}

impl Node {
    /// Runs until SIGTERM (graceful) or SIGINT, then flushes spans within a bounded time.
    pub fn run(self) {
        let c = &self.config;
        for (service, addr) in [("proxy", c.node.listen), ("admin", c.node.admin_listen)] {
            tracing::info!(node = %c.node.name, role = c.node.role.as_str(), service, %addr, "listening");
        }
        self.server.run(RunArgs::default());
        self.telemetry.shutdown(SHUTDOWN_FLUSH);
    }
}

/// How long shutdown waits for the last spans to export.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(3);
/// How often a graceful stop looks at the requests still in flight.
const DRAIN_POLL: Duration = Duration::from_millis(50);
/// Polls in a row that must find nothing in flight: a connection accepted just before the
/// stop gets the time to start its request.
const DRAIN_IDLE_POLLS: u32 = 3;

/// Ends a graceful stop (SIGTERM, or SIGQUIT once the sockets are handed over) as soon as no
/// request is in flight. Pingora alone always sleeps the whole grace period; at its end it
/// shuts this task down with the rest, so the wait is bounded by `grace_period` either way.
struct Drain {
    in_flight: prometheus::IntGauge,
    telemetry: Telemetry,
}

#[async_trait::async_trait]
impl BackgroundService for Drain {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // Fires with pingora's graceful-shutdown broadcast, after which nothing is accepted.
        if shutdown.changed().await.is_err() {
            return;
        }
        let mut idle = 0;
        while idle < DRAIN_IDLE_POLLS {
            idle = if self.in_flight.get() <= 0 {
                idle + 1
            } else {
                0
            };
            tokio::time::sleep(DRAIN_POLL).await;
        }
        tracing::info!("graceful stop: no request in flight, exiting before the grace period ends");
        let telemetry = self.telemetry.clone();
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown(SHUTDOWN_FLUSH)).await;
        std::process::exit(0);
    }
}

/// The node's telemetry from `[tracing]`: off without an endpoint.
pub fn telemetry(config: &Config) -> anyhow::Result<Telemetry> {
    let Some(endpoint) = &config.tracing.otlp_endpoint else {
        return Ok(Telemetry::disabled());
    };
    let mut settings = ExportSettings::new(
        endpoint.clone(),
        config.tracing.sample_ratio,
        config.node.name.clone(),
    );
    settings.queue_size = config.tracing.queue_size;
    settings.export_timeout = config.tracing.export_timeout;
    Ok(Telemetry::otlp(&settings)?)
}

/// Builds the node for `config`, exporting spans through `telemetry` (see [`telemetry`]).
/// Binds nothing until it runs.
pub fn build(config: Config, telemetry: Telemetry, opts: &RunOptions) -> anyhow::Result<Node> {
    let config = Arc::new(config);
    let conf = ServerConf {
        threads: config.node.threads,
        grace_period_seconds: Some(config.node.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(5),
        upgrade_sock: opts
            .upgrade_sock
            .clone()
            .unwrap_or_else(|| format!("/tmp/stratus-{}-upgrade.sock", config.node.name)),
        pid_file: format!("/tmp/stratus-{}.pid", config.node.name),
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade: opts.upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(opt), conf);
    server.bootstrap();

    let store = Store::new(config.cache.capacity)
        .with_max_object_size(config.cache.max_object_size)
        .leak();
    let metrics = Arc::new(Metrics::new(&config.node.name)?);

    let tier = Tier::from_config(&config, metrics.clone())?;
    metrics.watch_spans(telemetry.clone());
    let dns = Arc::new(ArcSwap::from_pointee(
        Dns::new(&config.dns).map_err(|e| anyhow::anyhow!(e))?,
    ));
    let live: Live = Arc::new(ArcSwap::new(config.clone()));
    let proxy = Proxy::new(
        live.clone(),
        store,
        metrics.clone(),
        tier.clone(),
        telemetry.clone(),
        dns.clone(),
    );
    let mut proxy_app = pingora_proxy::http_proxy(&server.configuration, proxy);
    proxy_app.server_options = Some(crate::limits::server_options(&config.node));
    proxy_app.h2_options = Some(crate::limits::h2_options());
    let mut proxy_service = Service::new(
        "stratus-proxy".to_string(),
        crate::limits::Capped::new(proxy_app, live.clone(), metrics.clone()),
    );
    let listen = config.node.listen.to_string();
    match tier.as_ref().and_then(|t| t.tls()) {
        // An upper serves lowers only: mutual TLS on its data port.
        Some(tls) if config.node.role == Role::Upper => {
            proxy_service.add_tls_with_settings(&listen, None, tls.listener_settings()?);
        }
        _ => proxy_service.add_tcp(&listen),
    }
    if let Some(tls) = &config.tls {
        let settings = crate::tls::client_listener_settings(live.clone())?;
        proxy_service.add_tls_with_settings(&tls.listen.to_string(), None, settings);
    }

    let admin = Admin::new(live.clone(), store, metrics.clone(), tier.clone());
    let mut admin_service = Service::new("stratus-admin".to_string(), admin);
    admin_service.add_tcp(&config.node.admin_listen.to_string());

    server.add_service(proxy_service);
    server.add_service(admin_service);
    // Every tiered lower runs the health task, members or not: a reload may add some.
    if let Some(tier) = tier.clone().filter(|_| config.node.role == Role::Lower) {
        server.add_service(background_service(
            "stratus-health",
            HealthTask::new(tier.clone(), metrics.clone()),
        ));
        server.add_service(background_service(
            "stratus-membership",
            DnsMembership::new(tier, dns.clone()),
        ));
    }
    server.add_service(background_service(
        "stratus-drain",
        Drain {
            in_flight: metrics.in_flight.clone(),
            telemetry: telemetry.clone(),
        },
    ));
    if let Some(path) = opts.config_path.clone() {
        let reloader = Reloader::new(path, live, tier, dns, store, metrics);
        server.add_service(background_service("stratus-reload", reloader));
    }
    Ok(Node {
        server,
        telemetry,
        config,
    })
}
