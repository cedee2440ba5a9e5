//! The node's background work in Jaeger: health-probe rounds, purge fan-outs, config reloads
//! and DNS refreshes run inside `tracing` spans on the target [`BACKGROUND_TARGET`]; this
//! layer (tracing-opentelemetry) turns exactly those into OpenTelemetry spans through the same
//! exporter, queue and sampler as request spans. Everything else `tracing` sees — log lines,
//! pingora's records — stays out of the export.

use tracing::Subscriber;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use crate::Telemetry;

/// The `tracing` target whose spans are exported: `tracing::info_span!(target:
/// BACKGROUND_TARGET, "probe round")`.
pub const BACKGROUND_TARGET: &str = "stratus::background";

impl Telemetry {
    /// The layer exporting background spans, or `None` when tracing is off.
    pub fn background_layer<S>(&self) -> Option<impl Layer<S> + Send + Sync + 'static>
    where
        S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
    {
        let tracer = self.tracer()?.clone();
        // `Targets`, not a closure: it answers per callsite once (interest is cached), so the
        // access line and every other event skip this layer without a per-event check. INFO
        // (the level of every background span), not TRACE: the subscriber's maximum level is
        // the loosest of its filters, and TRACE here made every debug and trace callsite in
        // pingora ask the subscriber on each request (~40 checks, 7% of an unsampled hit).
        let only_background = Targets::new().with_target(BACKGROUND_TARGET, LevelFilter::INFO);
        Some(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(only_background),
        )
    }
}
