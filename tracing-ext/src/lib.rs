//! stratus-tracing observes requests: W3C trace context, the span model, and export.
//!
//! **The rule: observers cannot change a request.** Every function here takes shared
//! references (`&`) to read-only facts the node has already decided — [`RequestFacts`],
//! [`AttemptFacts`], [`ResponseFacts`], an `&http::HeaderMap` of the incoming request — and
//! never a Pingora header map, a `&mut` anything, or a value with interior mutability that
//! belongs to a request. There is no `&mut` in this crate's API. The only thing tracing
//! contributes to an outgoing request is a list of `(name, value)` pairs for `traceparent` /
//! `tracestate` ([`AttemptTrace::headers`]), which the node's single header-writing function
//! applies; with tracing off that list is empty. Property tests in the node check that
//! responses and upstream requests are identical with tracing off, on, unsampled, and with a
//! collector that refuses or blackholes.
//!
//! Export never waits: spans go through a bounded queue; when it is full they are dropped and
//! counted ([`Telemetry::dropped_spans`]).

pub mod background;
pub mod export;
pub mod facts;
pub mod propagation;
pub mod spans;

pub use background::BACKGROUND_TARGET;
pub use export::{ExportSettings, Telemetry, TelemetryError};
pub use facts::{AttemptFacts, RequestFacts, ResponseFacts, UpstreamKind};
pub use spans::{AttemptTrace, FillLink, RequestTrace};

#[cfg(test)]
mod tests;
