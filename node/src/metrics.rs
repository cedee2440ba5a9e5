//! Prometheus metrics with the names INTERFACE.md promises, in one registry per node.
//!
//! Counters are lock-free atomics, so the request path pays an increment and never waits.
//! Store gauges are read from the store when `/metrics` is scraped, not kept twice.

use prometheus::core::Collector;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::store::Store;

/// Latency buckets in seconds: a hot hit (sub-millisecond) to the longest origin wait.
const LATENCY_BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The node's metrics.
pub struct Metrics {
    registry: Registry,
    /// `stratus_requests_total{cache, code}`: client requests by cache outcome and status.
    pub requests: IntCounterVec,
    /// `stratus_request_duration_seconds{cache}`: client request durations.
    pub request_duration: HistogramVec,
    /// `stratus_upstream_duration_seconds{hop}`: upstream attempts, to headers or failure.
    pub upstream_duration: HistogramVec,
    /// `stratus_bytes_sent_total`: response body bytes sent to clients.
    pub bytes_sent: IntCounter,
    /// `stratus_bytes_received_total`: request body bytes received from clients.
    pub bytes_received: IntCounter,
    /// `stratus_internal_requests_total{kind}`: probes, refreshes, purges from lowers.
    pub internal_requests: IntCounterVec,
    /// `stratus_origin_requests_total`: requests this node sent to an origin.
    pub origin_requests: IntCounter,
    /// `stratus_upper_requests_total{upper, outcome}`: requests sent to upper nodes.
    pub upper_requests: IntCounterVec,
    /// `stratus_upper_up{upper}`: 1 while an upper member takes traffic, 0 while down.
    pub upper_up: IntGaugeVec,
    /// `stratus_upper_members`: members on a tiered lower's ring now, up or down (0 when its
    /// DNS names resolve to none); absent on other nodes.
    pub upper_members: IntGaugeVec,
    /// `stratus_spans_dropped_total`: spans dropped because the export queue was full.
    pub spans_dropped: IntCounter,
    /// `stratus_span_exports_failed_total`: export calls that failed.
    pub span_exports_failed: IntCounter,
    /// `stratus_upper_down_reason{upper, reason}`: 1 for each down member, labelled with why.
    pub upper_down_reason: IntGaugeVec,
    /// `stratus_context_refusals_total{reason}`: control contexts an upper refused.
    pub context_refusals: IntCounterVec,
    /// `stratus_health_reports_dropped_total`: outcome reports lost to a full health queue.
    pub health_reports_dropped: IntCounter,
    /// `stratus_replay_cache_entries`: nonces an upper remembers to refuse replays.
    pub replay_cache_entries: IntGauge,
    /// `stratus_replay_cache_bytes`: estimated memory those nonces hold.
    pub replay_cache_bytes: IntGauge,
    /// `stratus_config_reloads_total{result}`: SIGHUP reloads: `ok`, `rejected` (invalid
    /// file) or `refused` (a change that needs a restart); the running config kept on both.
    pub config_reloads: IntCounterVec,
    /// `stratus_client_limits_total{limit}`: connections a client limit ended: `connections`
    /// (over `max_client_connections`, answered 503), `header_timeout` (a request header not
    /// whole within `header_timeout`), `idle_timeout` (no next request within `idle_timeout`).
    pub client_limits: IntCounterVec,
    /// `stratus_requests_in_flight`: requests (and upgraded connections) being served now;
    /// a graceful stop ends as soon as it reaches zero.
    pub in_flight: IntGauge,
    cache_objects: IntGauge,
    cache_bytes: IntGauge,
    cache_evictions: IntCounter,
    /// Every metric's name, whether it has a sample yet or not.
    names: Vec<String>,
    telemetry: parking_lot::Mutex<Option<stratus_tracing::Telemetry>>,
}

/// Registers `metric`, notes its name, and hands it back.
fn register<M: Collector + Clone + 'static>(
    registry: &Registry,
    names: &mut Vec<String>,
    metric: M,
) -> prometheus::Result<M> {
    names.extend(metric.desc().iter().map(|d| d.fq_name.clone()));
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}

/// Raises a counter to a total kept elsewhere (the store, the exporter).
fn catch_up(counter: &IntCounter, total: u64) {
    let seen = counter.get();
    if total > seen {
        counter.inc_by(total - seen);
    }
}

impl Metrics {
    /// Registers every metric for node `node`. Fails only if two metrics share a name, which
    /// is a bug.
    pub fn new(node: &str) -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let r = &registry;
        let mut names = Vec::new();
        let requests = register(
            r,
            &mut names,
            IntCounterVec::new(
                Opts::new(
                    "stratus_requests_total",
                    "Client requests by cache outcome and status code (probes, refreshes and purges from lowers are counted in stratus_internal_requests_total)",
                ),
                &["cache", "code"],
            )?,
        )?;
        let request_duration = register(
            r,
            &mut names,
            HistogramVec::new(
                HistogramOpts::new(
                    "stratus_request_duration_seconds",
                    "Client request duration, from its header to the last byte sent, by cache outcome",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["cache"],
            )?,
        )?;
        let upstream_duration = register(
            r,
            &mut names,
            HistogramVec::new(
                HistogramOpts::new(
                    "stratus_upstream_duration_seconds",
                    "Upstream attempts, from the attempt's start to its response header or its failure, by hop kind (upper, origin)",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["hop"],
            )?,
        )?;
        let bytes_sent = register(
            r,
            &mut names,
            IntCounter::new(
                "stratus_bytes_sent_total",
                "Response body bytes sent to clients",
            )?,
        )?;
        let bytes_received = register(
            r,
            &mut names,
            IntCounter::new(
                "stratus_bytes_received_total",
                "Request body bytes received from clients",
            )?,
        )?;
        let internal_requests = register(
            r,
            &mut names,
            IntCounterVec::new(
                Opts::new(
                    "stratus_internal_requests_total",
                    "Requests the fleet makes of itself, by kind: probe (readiness), refresh (background revalidation), purge (from a lower)",
                ),
                &["kind"],
            )?,
        )?;
        for kind in ["probe", "refresh", "purge"] {
            internal_requests.with_label_values(&[kind]);
        }
        let origin_requests = register(
            r,
            &mut names,
            IntCounter::new(
                "stratus_origin_requests_total",
                "Requests this node sent to an origin",
            )?,
        )?;
        let upper_requests = register(
            r,
            &mut names,
            IntCounterVec::new(
                Opts::new(
                    "stratus_upper_requests_total",
                    "Requests sent to upper-tier nodes by outcome",
                ),
                &["upper", "outcome"],
            )?,
        )?;
        let upper_up = register(
            r,
            &mut names,
            IntGaugeVec::new(
                Opts::new(
                    "stratus_upper_up",
                    "1 while an upper member takes traffic, 0 while down",
                ),
                &["upper"],
            )?,
        )?;
        let upper_members = register(
            r,
            &mut names,
            IntGaugeVec::new(
                Opts::new(
                    "stratus_upper_members",
                    "Upper members on this lower's ring now, up or down (tiered lowers only)",
                ),
                &[],
            )?,
        )?;
        let spans_dropped = register(
            r,
            &mut names,
            IntCounter::new(
                "stratus_spans_dropped_total",
                "Spans dropped because the export queue was full",
            )?,
        )?;
        let span_exports_failed = register(
            r,
            &mut names,
            IntCounter::new(
                "stratus_span_exports_failed_total",
                "Span export calls that failed (their spans are lost)",
            )?,
        )?;
        let upper_down_reason = register(
            r,
            &mut names,
            IntGaugeVec::new(
                Opts::new(
                    "stratus_upper_down_reason",
                    "1 for each down upper member, labelled with why it is down",
                ),
                &["upper", "reason"],
            )?,
        )?;
        let context_refusals = register(
            r,
            &mut names,
            IntCounterVec::new(
                Opts::new(
                    "stratus_context_refusals_total",
                    "Control contexts this upper refused, by reason",
                ),
                &["reason"],
            )?,
        )?;
        let health_reports_dropped = register(
            r,
            &mut names,
            IntCounter::new(
                "stratus_health_reports_dropped_total",
                "Upstream outcome reports dropped because the health task's queue was full",
            )?,
        )?;
        let replay_cache_entries = register(
            r,
            &mut names,
            IntGauge::new(
                "stratus_replay_cache_entries",
                "Context nonces remembered to refuse replays",
            )?,
        )?;
        let replay_cache_bytes = register(
            r,
            &mut names,
            IntGauge::new(
                "stratus_replay_cache_bytes",
                "Estimated bytes held by the replay cache",
            )?,
        )?;
        let client_limits = register(
            r,
            &mut names,
            IntCounterVec::new(
                Opts::new(
                    "stratus_client_limits_total",
                    "Client connections a limit ended: connections (over the per-client cap, answered 503), header_timeout, idle_timeout",
                ),
                &["limit"],
            )?,
        )?;
        for limit in ["connections", "header_timeout", "idle_timeout"] {
            client_limits.with_label_values(&[limit]);
        }
        let config_reloads = register(
            r,
            &mut names,
            IntCounterVec::new(
                Opts::new(
                    "stratus_config_reloads_total",
                    "Config reloads by result: ok, rejected (invalid) or refused (needs a restart)",
                ),
                &["result"],
            )?,
        )?;
        for result in ["ok", "rejected", "refused"] {
            config_reloads.with_label_values(&[result]);
        }
        let in_flight = register(
            r,
            &mut names,
            IntGauge::new(
                "stratus_requests_in_flight",
                "Requests and upgraded connections being served now",
            )?,
        )?;
        let build_info = register(
            r,
            &mut names,
            IntGaugeVec::new(
                Opts::new(
                    "stratus_build_info",
                    "Always 1; the labels say which build runs as which node",
                ),
                &["version", "node"],
            )?,
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), node])
            .set(1);
        let cache_objects = register(
            r,
            &mut names,
            IntGauge::new("stratus_cache_objects", "Objects in the cache")?,
        )?;
        let cache_bytes = register(
            r,
            &mut names,
            IntGauge::new(
                "stratus_cache_bytes",
                "Bytes held by the cache, as weighed against its capacity",
            )?,
        )?;
        let cache_evictions = register(
            r,
            &mut names,
            IntCounter::new(
                "stratus_cache_evictions_total",
                "Objects evicted to stay within capacity (expiry and purges not counted)",
            )?,
        )?;
        Ok(Metrics {
            registry,
            requests,
            request_duration,
            upstream_duration,
            bytes_sent,
            bytes_received,
            internal_requests,
            origin_requests,
            upper_requests,
            upper_up,
            upper_members,
            spans_dropped,
            span_exports_failed,
            upper_down_reason,
            context_refusals,
            health_reports_dropped,
            replay_cache_entries,
            replay_cache_bytes,
            config_reloads,
            client_limits,
            in_flight,
            cache_objects,
            cache_bytes,
            cache_evictions,
            names,
            telemetry: parking_lot::Mutex::new(None),
        })
    }

    /// Reports the span-drop count of `telemetry` as `stratus_spans_dropped_total`.
    pub fn watch_spans(&self, telemetry: stratus_tracing::Telemetry) {
        *self.telemetry.lock() = Some(telemetry);
    }

    /// The name of every metric this node exports, samples or not.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The Prometheus text exposition, with store gauges and exporter counts read now.
    pub fn render(&self, store: &Store) -> String {
        if let Some(t) = self.telemetry.lock().as_ref() {
            catch_up(&self.spans_dropped, t.dropped_spans());
            catch_up(&self.span_exports_failed, t.failed_exports());
        }
        {
            use pingora_core::protocols::http::v1::server::{HEADER_TIMEOUTS, IDLE_TIMEOUTS};
            use std::sync::atomic::Ordering::Relaxed;
            let limit = |l: &str| self.client_limits.with_label_values(&[l]);
            catch_up(&limit("header_timeout"), HEADER_TIMEOUTS.load(Relaxed));
            catch_up(&limit("idle_timeout"), IDLE_TIMEOUTS.load(Relaxed));
        }
        let usage = store.usage();
        catch_up(&self.cache_evictions, usage.evictions);
        self.cache_objects
            .set(i64::try_from(usage.objects).unwrap_or(i64::MAX));
        self.cache_bytes
            .set(i64::try_from(usage.bytes).unwrap_or(i64::MAX));
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}
