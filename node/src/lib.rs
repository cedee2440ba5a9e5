//! stratus-node: one stratus CDN node, and every socket, task and Pingora type stratus has.
//!
//! It owns I/O: listeners, upstream connections, the cache store, the admin API. It decides
//! nothing about tier placement (that is `stratus-tiering`) and observes nothing on its own
//! (that is `stratus-tracing`). Control data between tiers never travels as editable headers.

pub mod admin;
pub mod cache_status;
pub mod config;
pub mod demo;
pub mod demo_jaeger;
pub mod dns;
pub mod errors;
pub mod fuzzing;
pub mod limits;
pub mod membership;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod reload;
pub mod server;
pub mod store;
pub mod tier;
pub mod tls;
