//! Prometheus metrics with the names INTERFACE.md promises, in one registry per node.
//!
//! Counters are lock-free atomics, so the request path pays an increment and never waits.
//! Store gauges are read from the store when `/metrics` is scraped, not kept twice.

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

use crate::store::Store;

/// The node's metrics.
pub struct Metrics {
    registry: Registry,
    /// `stratus_requests_total{cache, code}`: client requests by cache outcome and status.
    pub requests: IntCounterVec,
    /// `stratus_origin_requests_total`: requests this node sent to an origin.
    pub origin_requests: IntCounter,
    /// `stratus_upper_requests_total{upper, outcome}`: requests sent to upper nodes.
    pub upper_requests: IntCounterVec,
    /// `stratus_upper_up{upper}`: 1 while an upper member takes traffic, 0 while down.
    pub upper_up: prometheus::IntGaugeVec,
    /// `stratus_spans_dropped_total`: spans dropped because the export queue was full.
    pub spans_dropped: IntCounter,
    /// `stratus_upper_down_reason{upper, reason}`: 1 for each down member, labelled with why.
    pub upper_down_reason: prometheus::IntGaugeVec,
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
    /// `stratus_requests_in_flight`: requests (and upgraded connections) being served now;
    /// a graceful stop ends as soon as it reaches zero.
    pub in_flight: IntGauge,
    cache_objects: IntGauge,
    cache_bytes: IntGauge,
    telemetry: parking_lot::Mutex<Option<stratus_tracing::Telemetry>>,
}

impl Metrics {
    /// Registers every metric. Fails only if two metrics share a name, which is a bug.
    pub fn new() -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "stratus_requests_total",
                "Client requests by cache outcome and status code",
            ),
            &["cache", "code"],
        )?;
        let origin_requests = IntCounter::new(
            "stratus_origin_requests_total",
            "Requests this node sent to an origin",
        )?;
        let upper_requests = IntCounterVec::new(
            Opts::new(
                "stratus_upper_requests_total",
                "Requests sent to upper-tier nodes by outcome",
            ),
            &["upper", "outcome"],
        )?;
        let upper_up = prometheus::IntGaugeVec::new(
            Opts::new(
                "stratus_upper_up",
                "1 while an upper member takes traffic, 0 while down",
            ),
            &["upper"],
        )?;
        let spans_dropped = IntCounter::new(
            "stratus_spans_dropped_total",
            "Spans dropped because the export queue was full",
        )?;
        let upper_down_reason = prometheus::IntGaugeVec::new(
            Opts::new(
                "stratus_upper_down_reason",
                "1 for each down upper member, labelled with why it is down",
            ),
            &["upper", "reason"],
        )?;
        let context_refusals = IntCounterVec::new(
            Opts::new(
                "stratus_context_refusals_total",
                "Control contexts this upper refused, by reason",
            ),
            &["reason"],
        )?;
        let health_reports_dropped = IntCounter::new(
            "stratus_health_reports_dropped_total",
            "Upstream outcome reports dropped because the health task's queue was full",
        )?;
        let replay_cache_entries = IntGauge::new(
            "stratus_replay_cache_entries",
            "Context nonces remembered to refuse replays",
        )?;
        let replay_cache_bytes = IntGauge::new(
            "stratus_replay_cache_bytes",
            "Estimated bytes held by the replay cache",
        )?;
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "stratus_config_reloads_total",
                "Config reloads by result: ok, rejected (invalid) or refused (needs a restart)",
            ),
            &["result"],
        )?;
        for result in ["ok", "rejected", "refused"] {
            config_reloads.with_label_values(&[result]);
        }
        let in_flight = IntGauge::new(
            "stratus_requests_in_flight",
            "Requests and upgraded connections being served now",
        )?;
        let cache_objects = IntGauge::new("stratus_cache_objects", "Objects in the cache")?;
        let cache_bytes = IntGauge::new(
            "stratus_cache_bytes",
            "Bytes held by the cache, as weighed against its capacity",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(origin_requests.clone()))?;
        registry.register(Box::new(upper_requests.clone()))?;
        registry.register(Box::new(upper_up.clone()))?;
        registry.register(Box::new(spans_dropped.clone()))?;
        registry.register(Box::new(upper_down_reason.clone()))?;
        registry.register(Box::new(context_refusals.clone()))?;
        registry.register(Box::new(health_reports_dropped.clone()))?;
        registry.register(Box::new(replay_cache_entries.clone()))?;
        registry.register(Box::new(replay_cache_bytes.clone()))?;
        registry.register(Box::new(config_reloads.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(cache_objects.clone()))?;
        registry.register(Box::new(cache_bytes.clone()))?;
        Ok(Metrics {
            registry,
            requests,
            origin_requests,
            upper_requests,
            upper_up,
            spans_dropped,
            upper_down_reason,
            context_refusals,
            health_reports_dropped,
            replay_cache_entries,
            replay_cache_bytes,
            config_reloads,
            in_flight,
            cache_objects,
            cache_bytes,
            telemetry: parking_lot::Mutex::new(None),
        })
    }

    /// Reports the span-drop count of `telemetry` as `stratus_spans_dropped_total`.
    pub fn watch_spans(&self, telemetry: stratus_tracing::Telemetry) {
        *self.telemetry.lock() = Some(telemetry);
    }

    /// The Prometheus text exposition, with store gauges and the span-drop count read now.
    pub fn render(&self, store: &Store) -> String {
        if let Some(t) = self.telemetry.lock().as_ref() {
            let dropped = t.dropped_spans();
            let seen = self.spans_dropped.get();
            if dropped > seen {
                self.spans_dropped.inc_by(dropped - seen);
            }
        }
        let usage = store.usage();
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
