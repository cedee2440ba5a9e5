//! Limits on what one client may hold: a per-client cap on open connections, wrapped around
//! the proxy application so the cap holds for a connection's whole life (every keep-alive
//! request on it included).
//!
//! The two timeouts that bound slow clients — a total deadline for a request header and an
//! idle timeout between keep-alive requests — live in the HTTP/1 session itself (pingora's,
//! with the small patch in `patches/pingora-core`: pingora bounds each read, not the whole
//! header), set through [`server_options`]; they are counted in pingora-core's statics and
//! exported as metrics.
//!
//! Written here because pingora has no per-client connection limit (its connection filter
//! decides at accept time only, without a close to count down on). On a TLS listener the cap
//! counts connections from the end of their handshake (which pingora bounds by its own
//! timeout); HTTP/2 connections are bounded to [`H2_MAX_STREAMS`] streams each.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use async_trait::async_trait;
use pingora_core::apps::{HttpServerOptions, ServerApp};
use pingora_core::protocols::Stream;
use pingora_core::server::ShutdownWatch;
use tokio::io::AsyncWriteExt;

use crate::config::{Live, NodeConfig};
use crate::metrics::Metrics;

/// Streams one HTTP/2 connection may have open at once: with the per-client connection cap,
/// what bounds one client's concurrent requests.
pub const H2_MAX_STREAMS: u32 = 64;

/// The HTTP server options carrying the node's client timeouts (HTTP/2 connections get the
/// idle timeout too).
pub fn server_options(node: &NodeConfig) -> HttpServerOptions {
    let mut options = HttpServerOptions::default();
    options.h1_header_timeout = Some(node.header_timeout);
    options.h1_idle_timeout_secs = Some(node.idle_timeout.as_secs().max(1));
    options.h2_idle_timeout = Some(node.idle_timeout);
    options
}

/// HTTP/2 settings: pingora's bounded defaults with at most [`H2_MAX_STREAMS`] streams.
pub fn h2_options() -> pingora_core::protocols::http::v2::server::H2Options {
    let mut options = pingora_core::protocols::http::v2::server::default_h2_options();
    options.max_concurrent_streams(H2_MAX_STREAMS);
    options
}

/// Open connections per client address, counted up on accept and down on close.
#[derive(Default)]
struct Open {
    by_client: parking_lot::Mutex<HashMap<IpAddr, u32>>,
}

/// One connection's place in the count; gives it back when the connection ends.
struct Slot {
    open: Arc<Open>,
    client: IpAddr,
}

impl Open {
    fn acquire(self: &Arc<Self>, client: IpAddr, cap: u32) -> Option<Slot> {
        let mut by_client = self.by_client.lock();
        let n = by_client.entry(client).or_insert(0);
        if cap != 0 && *n >= cap {
            return None;
        }
        *n += 1;
        Some(Slot {
            open: self.clone(),
            client,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut by_client = self.open.by_client.lock();
        if let Some(n) = by_client.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                by_client.remove(&self.client);
            }
        }
    }
}

/// The answer to a connection over the cap (nginx's `limit_conn` answers 503 too).
const OVER_CAP: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 39\r\nRetry-After: 1\r\nConnection: close\r\n\r\ntoo many connections from this client.\n";

/// The proxy application behind a per-client connection cap (`node.max_client_connections`,
/// read live from the config).
pub struct Capped<A> {
    inner: Arc<A>,
    open: Arc<Open>,
    config: Live,
    metrics: Arc<Metrics>,
}

impl<A> Capped<A> {
    /// Wraps `inner`.
    pub fn new(inner: A, config: Live, metrics: Arc<Metrics>) -> Capped<A> {
        Capped {
            inner: Arc::new(inner),
            open: Arc::new(Open::default()),
            config,
            metrics,
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Capped<A> {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let client = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet().map(|a| a.ip())));
        let cap = self.config.load().node.max_client_connections;
        let _slot = match client {
            None => None,
            Some(ip) => match self.open.acquire(ip, cap) {
                Some(slot) => Some(slot),
                None => {
                    self.metrics
                        .client_limits
                        .with_label_values(&["connections"])
                        .inc();
                    // An HTTP/1 answer says why; an HTTP/2 client gets a closed connection.
                    let h2 = matches!(
                        stream.selected_alpn_proto(),
                        Some(pingora_core::protocols::ALPN::H2)
                    );
                    if !h2 {
                        let _ = stream.write_all(OVER_CAP).await;
                        let _ = stream.flush().await;
                    }
                    return None;
                }
            },
        };
        // Serves every request of the connection (pingora's HTTP app loops over keep-alive
        // itself), so the slot is held until the connection ends.
        let mut next = self.inner.process_new(stream, shutdown).await;
        while let Some(stream) = next {
            next = self.inner.process_new(stream, shutdown).await;
        }
        None
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_counts_each_client_apart_and_frees_on_close() {
        let open = Arc::new(Open::default());
        let (a, b): (IpAddr, IpAddr) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        let first = open.acquire(a, 2).expect("first");
        let second = open.acquire(a, 2).expect("second");
        assert!(open.acquire(a, 2).is_none(), "a third from one client");
        assert!(
            open.acquire(b, 2).is_some(),
            "another client is not affected"
        );
        drop(first);
        let third = open.acquire(a, 2).expect("a freed slot is reused");
        drop((second, third));
        assert!(
            open.by_client.lock().get(&a).is_none(),
            "no entry left behind"
        );
        let unlimited: Vec<_> = (0..1000).filter_map(|_| open.acquire(a, 0)).collect();
        assert_eq!(unlimited.len(), 1000, "0 means no cap");
    }
}
