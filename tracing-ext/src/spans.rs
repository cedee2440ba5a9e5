//! The span model: a SERVER span per node a request touches, a CLIENT span per upstream
//! attempt, named and attributed after the OpenTelemetry HTTP semantic conventions, plus the
//! `stratus.*` attributes.
//!
//! Both trace types hold an `opentelemetry::Context` and act through `SpanRef` with `&self`,
//! so nothing here needs `&mut` access to anything.

use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue};

use crate::export::Telemetry;
use crate::facts::{AttemptFacts, RequestFacts, ResponseFacts};
use crate::propagation;

/// The trace of one request at this node: its SERVER span.
#[derive(Debug, Clone)]
pub struct RequestTrace {
    cx: Context,
    enabled: bool,
}

/// The span of a request that fills the cache, as requests coalesced onto it link to it.
#[derive(Debug, Clone)]
pub struct FillLink(opentelemetry::trace::SpanContext);

/// One upstream attempt: a CLIENT span, child of the request's SERVER span.
#[derive(Debug, Clone)]
pub struct AttemptTrace {
    cx: Context,
    enabled: bool,
}

/// The method as an attribute value; known methods need no allocation.
fn method_value(method: &str) -> opentelemetry::Value {
    match span_name(method) {
        "HTTP" => opentelemetry::Value::from(method.to_string()),
        known => opentelemetry::Value::from(known),
    }
}

/// Span name per the HTTP conventions: the method, or `HTTP` for unknown methods (a CDN has no
/// routes, and raw paths would explode cardinality).
fn span_name(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "OPTIONS" => "OPTIONS",
        "CONNECT" => "CONNECT",
        "TRACE" => "TRACE",
        "PURGE" => "PURGE",
        _ => "HTTP",
    }
}

impl Telemetry {
    /// Starts the SERVER span for a request, continuing the caller's trace when `incoming`
    /// carries a valid `traceparent`.
    pub fn start_request(
        &self,
        incoming: &http::HeaderMap,
        facts: &RequestFacts<'_>,
    ) -> RequestTrace {
        let Some(tracer) = self.tracer() else {
            return RequestTrace::disabled();
        };
        let parent = propagation::extract(incoming);
        // Start first, describe after: an unsampled span records nothing, so the attributes
        // (and their string copies) are built only for a span that will be exported. The
        // sampler (parent-based trace-id ratio) does not look at attributes.
        let mut span = tracer
            .span_builder(span_name(facts.method))
            .with_kind(SpanKind::Server)
            .start_with_context(tracer, &parent);
        if !span.is_recording() {
            return RequestTrace {
                cx: parent.with_span(span),
                enabled: true,
            };
        }
        let mut attrs = Vec::with_capacity(12);
        attrs.push(KeyValue::new(
            "http.request.method",
            method_value(facts.method),
        ));
        attrs.push(KeyValue::new("url.path", facts.path.to_string()));
        attrs.push(KeyValue::new("url.scheme", "http"));
        attrs.extend(self.node_attributes(facts));
        if let Some(q) = facts.query {
            attrs.push(KeyValue::new("url.query", q.to_string()));
        }
        if let Some(h) = facts.host {
            attrs.push(KeyValue::new("server.address", h.to_string()));
        }
        // user_agent.original and network.peer.address (semconv "recommended") are left out:
        // every attribute costs a conversion and an encoding per exported span, and these two
        // were a tenth of the hot-hit export cost. The facts carry them for a future opt-in.
        if let Some(id) = facts.request_id {
            attrs.push(KeyValue::new("stratus.request_id", id.to_string()));
        }
        span.set_attributes(attrs);
        RequestTrace {
            cx: parent.with_span(span),
            enabled: true,
        }
    }
}

impl RequestTrace {
    /// A trace that records nothing (tracing off).
    pub fn disabled() -> RequestTrace {
        RequestTrace {
            cx: Context::new(),
            enabled: false,
        }
    }

    /// A `tracing` span to write this request's log lines in; its fields are the trace and
    /// SERVER span ids, so every line logged in its scope names the trace to open in Jaeger.
    /// Made on demand: requests that log nothing pay nothing.
    pub fn log_span(&self) -> tracing::Span {
        let sc = self.cx.span().span_context().clone();
        if !(self.enabled && sc.is_valid()) {
            return tracing::Span::none();
        }
        // At ERROR level so every log filter short of `off` keeps it (a span's level only
        // decides whether it is recorded, and an unrecorded span would drop the ids).
        tracing::error_span!(
            target: "stratus::request",
            "request",
            trace_id = %sc.trace_id(),
            span_id = %sc.span_id(),
        )
    }

    /// Starts the CLIENT span for one upstream attempt.
    pub fn start_attempt(&self, telemetry: &Telemetry, facts: &AttemptFacts<'_>) -> AttemptTrace {
        let Some(tracer) = telemetry.tracer().filter(|_| self.enabled) else {
            return AttemptTrace {
                cx: Context::new(),
                enabled: false,
            };
        };
        let mut attrs = vec![
            KeyValue::new("http.request.method", method_value(facts.method)),
            KeyValue::new("server.address", facts.server_address.to_string()),
            KeyValue::new("server.port", i64::from(facts.server_port)),
            KeyValue::new("url.full", facts.url_full.to_string()),
            KeyValue::new("stratus.upstream.kind", facts.kind.as_str()),
            KeyValue::new("stratus.upstream.attempt", i64::from(facts.attempt)),
        ];
        if facts.attempt > 1 {
            attrs.push(KeyValue::new(
                "http.request.resend_count",
                i64::from(facts.attempt - 1),
            ));
        }
        let span = tracer
            .span_builder(span_name(facts.method))
            .with_kind(SpanKind::Client)
            .with_attributes(attrs)
            .start_with_context(tracer, &self.cx);
        AttemptTrace {
            cx: self.cx.with_span(span),
            enabled: true,
        }
    }

    /// A reference to this request's SERVER span, for requests that will wait on the fill it
    /// is about to make (`None` when tracing is off or the span is not sampled).
    pub fn fill_link(&self) -> Option<FillLink> {
        let sc = self.cx.span().span_context().clone();
        (self.enabled && sc.is_valid() && sc.is_sampled()).then_some(FillLink(sc))
    }

    /// Links this SERVER span to the span of the fill it waited on.
    pub fn link_fill(&self, fill: &FillLink) {
        if self.enabled {
            self.cx.span().add_link(
                fill.0.clone(),
                vec![KeyValue::new("stratus.link", "coalesced-fill")],
            );
        }
    }

    /// Records a failover: the attempt to `from` failed with `reason`, the next one follows.
    pub fn failover(&self, from: &str, reason: &str) {
        if self.enabled {
            self.cx.span().add_event(
                "failover",
                vec![
                    KeyValue::new("stratus.failover.from", from.to_string()),
                    KeyValue::new("error.type", reason.to_string()),
                ],
            );
        }
    }

    /// Ends the SERVER span with what the client got.
    pub fn finish(&self, facts: &ResponseFacts<'_>) {
        if !self.enabled {
            return;
        }
        let span = self.cx.span();
        if facts.status > 0 {
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(facts.status),
            ));
        }
        span.set_attribute(KeyValue::new(
            "stratus.cache_status",
            facts.cache_status.to_string(),
        ));
        if let Some(wait) = facts.lock_wait {
            let ms = i64::try_from(wait.as_millis()).unwrap_or(i64::MAX);
            span.set_attribute(KeyValue::new("stratus.cache.lock_wait_ms", ms));
            span.add_event(
                "waited on a coalesced fill",
                vec![KeyValue::new("stratus.cache.lock_wait_ms", ms)],
            );
        }
        // Server spans: 5xx and aborted connections are errors, 4xx are the client's.
        if facts.status >= 500 || facts.status == 0 {
            let error = facts.error.unwrap_or("aborted").to_string();
            span.set_attribute(KeyValue::new("error.type", error));
            span.set_status(Status::error(""));
        }
        span.end();
    }

    /// The trace id in hex, for log lines (`None` when tracing is off).
    pub fn trace_id(&self) -> Option<String> {
        let sc = self.cx.span().span_context().clone();
        (self.enabled && sc.is_valid()).then(|| sc.trace_id().to_string())
    }

    /// The SERVER span id in hex, for log lines.
    pub fn span_id(&self) -> Option<String> {
        let sc = self.cx.span().span_context().clone();
        (self.enabled && sc.is_valid()).then(|| sc.span_id().to_string())
    }
}

impl AttemptTrace {
    /// A trace that records nothing.
    pub fn disabled() -> AttemptTrace {
        AttemptTrace {
            cx: Context::new(),
            enabled: false,
        }
    }

    /// `traceparent` / `tracestate` to send with this attempt, whose parent is this CLIENT
    /// span. Empty when tracing is off: the request then goes out exactly as it would have.
    pub fn headers(&self) -> Vec<(String, String)> {
        if self.enabled {
            propagation::inject(&self.cx)
        } else {
            Vec::new()
        }
    }

    /// Ends the CLIENT span with the upstream's status.
    pub fn answered(&self, status: u16) {
        if !self.enabled {
            return;
        }
        let span = self.cx.span();
        span.set_attribute(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        // Client spans: 4xx and 5xx are errors.
        if status >= 400 {
            span.set_attribute(KeyValue::new("error.type", status.to_string()));
            span.set_status(Status::error(""));
        }
        span.end();
    }

    /// Ends the CLIENT span as failed before a response.
    pub fn failed(&self, error_type: &str) {
        if !self.enabled {
            return;
        }
        let span = self.cx.span();
        span.set_attribute(KeyValue::new("error.type", error_type.to_string()));
        span.set_status(Status::error(""));
        span.end();
    }
}
