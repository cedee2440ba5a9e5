//! W3C Trace Context in and out, through the opentelemetry propagator (no hand parser).

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::Context;
use opentelemetry_sdk::propagation::TraceContextPropagator;

/// Reads `traceparent` / `tracestate` from the incoming headers. Never fails: an invalid or
/// absent `traceparent` gives a context with no parent.
pub fn extract(headers: &http::HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&Reader(headers))
}

/// The `traceparent` / `tracestate` pairs that carry `cx` to the next hop. Empty when `cx` has
/// no valid span context.
pub fn inject(cx: &Context) -> Vec<(String, String)> {
    let mut out = Collected(Vec::new());
    TraceContextPropagator::new().inject_context(cx, &mut out);
    out.0
}

struct Reader<'a>(&'a http::HeaderMap);

impl Extractor for Reader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        // Only a single field is meaningful; several traceparent fields are invalid.
        let mut values = self.0.get_all(key).iter();
        let first = values.next()?;
        if values.next().is_some() && key == "traceparent" {
            return None;
        }
        first.to_str().ok()
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct Collected(Vec<(String, String)>);

impl Injector for Collected {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_string(), value));
    }
}
