//! What one finished request was, said once: to the metrics and to the access log (one line
//! per client request, target `stratus::access`). Reads the session and the context; changes
//! neither.
//!
//! Requests the fleet makes of itself — readiness probes whose context verified, background
//! refreshes, purges admitted with a lower's context — are counted apart
//! (`stratus_internal_requests_total{kind}`) and logged at debug, so client hit ratios and
//! latencies are the clients' alone. Anything a client sends (the health path, a PURGE) is a
//! client request, in the access log.

use pingora_proxy::Session;

use super::context::{Ctx, Hop};
use super::Proxy;

/// Who a request came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// A client (a lower, for an upper).
    Client,
    /// A lower's readiness probe.
    Probe,
    /// This node's own background revalidation (stale-while-revalidate).
    Refresh,
    /// A lower's purge fan-out.
    Purge,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Client => "client",
            Kind::Probe => "probe",
            Kind::Refresh => "refresh",
            Kind::Purge => "purge",
        }
    }
}

impl Proxy {
    /// Counts and logs a finished request: `cache` is its outcome label, `code` its status
    /// (0 when none was sent).
    pub(super) fn account(&self, session: &Session, ctx: &Ctx, cache: &str, code: u16) {
        let kind = self.kind_of(session, ctx);
        let took = ctx
            .in_flight
            .as_ref()
            .map_or(0.0, |f| f.started().elapsed().as_secs_f64());
        let sent = session.as_ref().body_bytes_sent();
        let status = code.to_string();
        if kind == Kind::Client {
            self.metrics
                .requests
                .with_label_values(&[cache, status.as_str()])
                .inc();
            self.metrics
                .request_duration
                .with_label_values(&[cache])
                .observe(took);
            self.metrics.bytes_sent.inc_by(sent as u64);
            self.metrics
                .bytes_received
                .inc_by(session.as_ref().body_bytes_read() as u64);
        } else {
            self.metrics
                .internal_requests
                .with_label_values(&[kind.label()])
                .inc();
        }
        // The line's fields cost allocations: build them only when the line is written.
        let written = match kind {
            Kind::Client => tracing::enabled!(target: "stratus::access", tracing::Level::INFO),
            _ => tracing::enabled!(target: "stratus::access", tracing::Level::DEBUG),
        };
        if !written {
            return;
        }
        let req = session.req_header();
        let (host, path) = match &ctx.request {
            Some(r) => (r.host.as_str(), r.path_and_query.as_str()),
            None => ("-", req.uri.path()),
        };
        let upstream = match ctx.progress.current_hop() {
            Some(Hop::Upper(addr)) => addr.to_string(),
            Some(Hop::Origin) => "origin".to_string(),
            None => "-".to_string(),
        };
        let client = session
            .as_ref()
            .client_addr()
            .map_or_else(|| "-".to_string(), |a| a.to_string());
        let trace_id = ctx.trace.request.trace_id().unwrap_or_default();
        let duration_ms = (took * 1000.0 * 1000.0).round() / 1000.0;
        macro_rules! line {
            ($level:ident) => {
                tracing::$level!(
                    target: "stratus::access",
                    node = %self.config().node.name,
                    kind = kind.label(),
                    client = %client,
                    method = %req.method,
                    host = %host,
                    path = %path,
                    status = code,
                    bytes = sent,
                    duration_ms,
                    cache,
                    upstream = %upstream,
                    attempts = ctx.progress.attempts.len(),
                    trace_id = %trace_id,
                    "request"
                )
            };
        }
        if kind == Kind::Client {
            line!(info);
        } else {
            line!(debug);
        }
    }

    /// Who sent it. Only what the fleet verified is internal: a probe whose context verified,
    /// a PURGE admitted with a lower's context, this node's own refresh. A client asking for
    /// the health path or sending PURGE is a client, logged and counted as one.
    fn kind_of(&self, session: &Session, ctx: &Ctx) -> Kind {
        if session.subrequest_ctx.is_some() {
            Kind::Refresh
        } else if ctx.progress.verified_probe {
            Kind::Probe
        } else if self.is_purge_from_lower(session) && ctx.request.is_some() {
            Kind::Purge
        } else {
            Kind::Client
        }
    }
}
