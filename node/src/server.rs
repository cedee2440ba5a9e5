//! Assembles one node from a validated [`Config`]: the proxy service, the admin service and
//! pingora's server process (signals, graceful shutdown, socket hand-over on `--upgrade`).

use std::sync::Arc;

use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::{RunArgs, Server};
use pingora_core::services::listening::Service;
use std::time::Duration;
use stratus_tracing::{ExportSettings, Telemetry};

use crate::admin::Admin;
use crate::config::Config;
use crate::config::Role;
use crate::dns::Dns;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::store::Store;
use crate::tier::{HealthTask, Tier};
use pingora_core::services::background::background_service;

/// How a node process starts.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Take the listening sockets over from a running old process.
    pub upgrade: bool,
    /// Unix socket the old and new process hand sockets over on.
    pub upgrade_sock: Option<String>,
}

/// A built node: the pingora server and the telemetry to flush when it stops.
pub struct Node {
    /// The pingora server.
    pub server: Server,
    /// Span export, flushed after the server stops.
    pub telemetry: Telemetry,
}

impl Node {
    /// Runs until SIGTERM (graceful) or SIGINT, then flushes spans within a bounded time.
    pub fn run(self) {
        self.server.run(RunArgs::default());
        self.telemetry.shutdown(SHUTDOWN_FLUSH);
    }
}

/// How long shutdown waits for the last spans to export.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(3);

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

/// Builds the node for `config`. Binds nothing until it runs.
pub fn build(config: Config, opts: &RunOptions) -> anyhow::Result<Node> {
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
    let metrics = Arc::new(Metrics::new()?);

    let tier = Tier::from_config(&config, metrics.clone())?;
    // Built after bootstrap; stratus never daemonizes, so the export thread survives.
    let telemetry = telemetry(&config)?;
    metrics.watch_spans(telemetry.clone());
    let dns = Dns::new(&config.dns).map_err(|e| anyhow::anyhow!(e))?;
    let proxy = Proxy::new(
        config.clone(),
        store,
        metrics.clone(),
        tier.clone(),
        telemetry.clone(),
        dns,
    );
    let mut proxy_service =
        pingora_proxy::http_proxy_service_with_name(&server.configuration, proxy, "stratus-proxy");
    proxy_service.add_tcp(&config.node.listen.to_string());

    let admin = Admin::new(config.clone(), store, metrics.clone(), tier.clone());
    let mut admin_service = Service::new("stratus-admin".to_string(), admin);
    admin_service.add_tcp(&config.node.admin_listen.to_string());

    server.add_service(proxy_service);
    server.add_service(admin_service);
    if let Some(tier) = tier.filter(|t| config.node.role == Role::Lower && t.has_upper()) {
        server.add_service(background_service(
            "stratus-health",
            HealthTask::new(tier, metrics),
        ));
    }
    Ok(Node { server, telemetry })
}
