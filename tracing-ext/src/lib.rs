//! stratus-tracing observes requests: W3C trace context, the span model and exporter setup.
//! It receives only shared references to frozen request data and never changes a request.
//!
//! Not built yet: tracing follows tiering. The crate exists so the dependency direction
//! (`node → tracing-ext`, never back) is fixed from the start.
