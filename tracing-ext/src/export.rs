//! Exporter setup: OTLP over HTTP/protobuf (what Jaeger's port 4318 ingests), the SDK's batch
//! processor behind a counting gate, parent-based ratio sampling, and a bounded shutdown.
//!
//! The SDK's `BatchSpanProcessor` already drops instead of blocking when its queue is full,
//! but its drop counter is private (it only logs it at shutdown). So a thin gate in front of it
//! caps the spans in flight (ended but not yet exported) at `queue_size` and counts what it
//! drops; the processor's own queue is twice as large, so it never drops first.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, Span, SpanData,
    SpanExporter, SpanProcessor,
};
use opentelemetry_sdk::Resource;

/// How spans are exported.
#[derive(Debug, Clone)]
pub struct ExportSettings {
    /// Base URL of an OTLP/HTTP receiver; `/v1/traces` is appended.
    pub endpoint: String,
    /// Parent-based sampling ratio for new traces.
    pub sample_ratio: f64,
    /// `service.instance.id`: the node name.
    pub instance: String,
    /// Spans in flight (ended, not yet exported) before new ones are dropped.
    pub queue_size: usize,
    /// Spans per export request.
    pub batch_size: usize,
    /// How often a partial batch is sent.
    pub scheduled_delay: Duration,
    /// Total time one export may take, retries included.
    pub export_timeout: Duration,
}

impl ExportSettings {
    /// Defaults for `endpoint`: 8192 spans in flight, batches of 1024 every second, 2 s export
    /// timeout.
    pub fn new(
        endpoint: impl Into<String>,
        sample_ratio: f64,
        instance: impl Into<String>,
    ) -> ExportSettings {
        ExportSettings {
            endpoint: endpoint.into(),
            sample_ratio,
            instance: instance.into(),
            queue_size: 8192,
            batch_size: 1024,
            scheduled_delay: Duration::from_secs(1),
            export_timeout: Duration::from_secs(2),
        }
    }
}

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter refused its configuration.
    #[error("OTLP exporter: {0}")]
    Exporter(String),
}

#[derive(Debug, Default)]
struct Counters {
    in_flight: AtomicU64,
    dropped: AtomicU64,
    /// Export calls that failed (collector down, refused, timed out); their spans are lost.
    failed_exports: AtomicU64,
}

/// The node's telemetry: a tracer (or none, when tracing is off) and the drop counter.
#[derive(Clone, Debug)]
pub struct Telemetry {
    /// `stratus.node` and `stratus.tier` of the first facts seen (a node's never change), kept
    /// as shared strings so a span costs a reference-count bump for them, not two allocations.
    node_attrs: Arc<std::sync::OnceLock<(String, String, [KeyValue; 2])>>,
    tracer: Option<SdkTracer>,
    provider: Option<SdkTracerProvider>,
    counters: Arc<Counters>,
}

impl Telemetry {
    /// Tracing off: every trace records nothing and adds no header.
    pub fn disabled() -> Telemetry {
        Telemetry {
            node_attrs: Arc::default(),
            tracer: None,
            provider: None,
            counters: Arc::default(),
        }
    }

    /// Tracing on, exporting over OTLP/HTTP. Build it after any fork: the batch processor runs
    /// on its own thread.
    pub fn otlp(settings: &ExportSettings) -> Result<Telemetry, TelemetryError> {
        let endpoint = format!("{}/v1/traces", settings.endpoint.trim_end_matches('/'));
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(endpoint)
            .with_timeout(settings.export_timeout)
            .build()
            .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
        Ok(Self::with_exporter(exporter, settings))
    }

    /// Tracing on with any exporter (tests use in-memory, failing and blocking ones).
    pub fn with_exporter<E: SpanExporter + 'static>(
        exporter: E,
        settings: &ExportSettings,
    ) -> Telemetry {
        let counters = Arc::new(Counters::default());
        let counted = CountedExporter {
            inner: exporter,
            counters: counters.clone(),
        };
        let batch = BatchSpanProcessor::builder(counted)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_max_queue_size(settings.queue_size.saturating_mul(2).max(2))
                    .with_max_export_batch_size(settings.batch_size.max(1))
                    .with_scheduled_delay(settings.scheduled_delay)
                    .build(),
            )
            .build();
        let gate = Gate {
            next: batch,
            counters: counters.clone(),
            cap: settings.queue_size as u64,
        };
        let ratio = settings.sample_ratio.clamp(0.0, 1.0);
        let provider = SdkTracerProvider::builder()
            .with_span_processor(gate)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                ratio,
            ))))
            .with_resource(
                Resource::builder()
                    .with_service_name("stratus")
                    .with_attribute(KeyValue::new(
                        "service.instance.id",
                        settings.instance.clone(),
                    ))
                    .build(),
            )
            .build();
        Telemetry {
            node_attrs: Arc::default(),
            tracer: Some(provider.tracer("stratus")),
            provider: Some(provider),
            counters,
        }
    }

    /// `stratus.node` / `stratus.tier` for `facts`, reusing shared strings when unchanged.
    pub(crate) fn node_attributes(&self, facts: &crate::RequestFacts<'_>) -> [KeyValue; 2] {
        let build = || {
            [
                KeyValue::new(
                    "stratus.node",
                    opentelemetry::StringValue::from(Arc::<str>::from(facts.node)),
                ),
                KeyValue::new(
                    "stratus.tier",
                    opentelemetry::StringValue::from(Arc::<str>::from(facts.tier)),
                ),
            ]
        };
        let (node, tier, kvs) = self
            .node_attrs
            .get_or_init(|| (facts.node.to_string(), facts.tier.to_string(), build()));
        if node == facts.node && tier == facts.tier {
            kvs.clone()
        } else {
            build()
        }
    }

    pub(crate) fn tracer(&self) -> Option<&SdkTracer> {
        self.tracer.as_ref()
    }

    /// Whether spans are recorded at all.
    pub fn is_enabled(&self) -> bool {
        self.tracer.is_some()
    }

    /// Spans dropped because the export queue was full, since start.
    pub fn dropped_spans(&self) -> u64 {
        self.counters.dropped.load(Ordering::Relaxed)
    }

    /// Export calls that failed since start (each lost its batch of spans).
    pub fn failed_exports(&self) -> u64 {
        self.counters.failed_exports.load(Ordering::Relaxed)
    }

    /// Spans ended but not yet handed to the exporter.
    pub fn spans_in_flight(&self) -> u64 {
        self.counters.in_flight.load(Ordering::Relaxed)
    }

    /// Exports what is queued, waiting at most about the export timeout.
    pub fn flush(&self) {
        if let Some(p) = &self.provider {
            let _ = p.force_flush();
        }
    }

    /// Flushes and stops the exporter thread, bounded by `timeout`. Call it from `main` after
    /// the server stopped, never on a worker runtime (it blocks).
    pub fn shutdown(&self, timeout: Duration) {
        if let Some(p) = &self.provider {
            let _ = p.shutdown_with_timeout(timeout);
        }
    }
}

/// Caps the spans in flight and counts what it drops.
#[derive(Debug)]
struct Gate<P> {
    next: P,
    counters: Arc<Counters>,
    cap: u64,
}

impl<P: SpanProcessor> SpanProcessor for Gate<P> {
    fn on_start(&self, span: &mut Span, cx: &Context) {
        self.next.on_start(span, cx);
    }

    fn on_end(&self, span: SpanData) {
        let admitted = self
            .counters
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.cap).then_some(n + 1)
            })
            .is_ok();
        if admitted {
            self.next.on_end(span);
        } else {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.next.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.next.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.next.set_resource(resource);
    }
}

/// Releases in-flight slots once a batch has been exported (or failed to be).
#[derive(Debug)]
struct CountedExporter<E> {
    inner: E,
    counters: Arc<Counters>,
}

impl<E: SpanExporter> SpanExporter for CountedExporter<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len() as u64;
        let result = self.inner.export(batch).await;
        if result.is_err() {
            self.counters.failed_exports.fetch_add(1, Ordering::Relaxed);
        }
        let _ = self
            .counters
            .in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some(v.saturating_sub(n))
            });
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}
