//! Assembles one node from a validated [`Config`]: the proxy service, the admin service and
//! pingora's server process (signals, graceful shutdown, socket hand-over on `--upgrade`).

use std::sync::Arc;

use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::Server;
use pingora_core::services::listening::Service;

use crate::admin::Admin;
use crate::config::Config;
use crate::config::Role;
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

/// Builds the pingora server for `config`. Binds nothing until it runs.
pub fn build(config: Config, opts: &RunOptions) -> anyhow::Result<Server> {
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

    let store = Store::leaked(config.cache.capacity);
    let metrics = Arc::new(Metrics::new()?);

    let tier = Tier::from_config(&config)?;
    let proxy = Proxy::new(config.clone(), store, metrics.clone(), tier.clone());
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
    Ok(server)
}
