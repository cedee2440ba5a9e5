//! The per-request state Pingora hands every phase: the frozen [`RequestContext`], the
//! [`Progress`] that moves as the request is served, and the observer's [`TraceState`].

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use stratus_tiering::{Blame, ControlContext, Failure, Party, RequestIdentity, Verdict};
use stratus_tracing::{AttemptTrace, RequestTrace};

use crate::config::Config;
use crate::errors::Generated;

/// Everything that describes a request, decided once in `request_filter` and then frozen.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// Fleet-unique request id (128 random bits, hex).
    pub id: String,
    /// The origin's host, lowercased, without port: from Host (lower) or the context (upper).
    /// It is also the Host sent upstream, so the key names exactly what is fetched.
    pub host: String,
    /// Index into `config.origins` of the origin serving `host`.
    pub origin: usize,
    /// The exact path and query the cache key is built from, and the target sent upstream.
    pub path_and_query: String,
    /// The cache key's primary string; lower nodes hash these bytes onto the ring.
    pub primary_key: String,
    /// GET or HEAD: the cache may be used.
    pub method_cacheable: bool,
    /// Lower with upper members: each upstream attempt carries a fresh control context
    /// ([`RequestContext::identity`]).
    pub tiered: bool,
    /// Upper: the verified control context the request arrived with.
    pub received: Option<ControlContext>,
}

impl RequestContext {
    /// What a control context from node `node` says about this request, when it is tiered.
    /// Built per upstream attempt, not at admission: its key id is a hash a hit never needs
    /// (it was 8% of a fleet lower's hot hit, benches/results/profile.md).
    pub fn identity(&self, node: &str) -> Option<RequestIdentity> {
        self.tiered.then(|| {
            RequestIdentity::new(
                self.host.clone(),
                crate::policy::key_id(&self.primary_key),
                self.id.clone(),
                node.to_string(),
            )
        })
    }
}

/// One upstream attempt's target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// An upper-tier member.
    Upper(SocketAddr),
    /// The origin of the request's `[[origin]]`.
    Origin,
}

/// One upstream attempt.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// Where it went.
    pub hop: Hop,
    /// When it began: health ignores failures of attempts older than a member's return.
    pub started: Instant,
    /// To an upper: the fresh context issued for this attempt alone.
    pub context: Option<ControlContext>,
}

/// What changes while a request is served. Observers read it; only phases write it.
#[derive(Debug, Default)]
pub struct Progress {
    /// A response stratus wrote itself.
    pub generated: Option<Generated>,
    /// Status of the current attempt's response, when one arrived.
    pub upstream_status: Option<u16>,
    /// The route's members by address, fixed at the first upstream attempt (lower nodes
    /// with upper members); addresses, so a reload meanwhile cannot shift what they name.
    pub route: Option<Vec<SocketAddr>>,
    /// Every upstream attempt, in order.
    pub attempts: Vec<Attempt>,
    /// An upper's verified account of an error it generated for the current attempt.
    pub marked: Option<Blame>,
    /// The header fields of a 304 that revalidated the stored response, to freshen it with.
    pub not_modified: Option<Vec<(http::HeaderName, http::HeaderValue)>>,
    /// The last upstream failure and its verdict: what a generated error says and marks.
    pub failure: Option<(Failure, Verdict)>,
    /// The last attempt's pooled connection had gone stale: send to the same member again,
    /// once, on a fresh connection.
    pub resend_same: bool,
    /// Attempts that were such resends (they try no new member).
    pub resends: usize,
    /// A readiness probe whose control context verified (a lower's, counted apart).
    pub verified_probe: bool,
    /// The cookies of a response stored without them (`set_cookie = "strip"`), given back to
    /// this request alone.
    pub own_cookies: Vec<(http::HeaderName, http::HeaderValue)>,
}

impl Progress {
    /// How many attempts went to upper members so far.
    pub fn upper_attempts(&self) -> usize {
        self.attempts
            .iter()
            .filter(|a| matches!(a.hop, Hop::Upper(..)))
            .count()
    }

    /// How many distinct upper members were tried so far: the position on the route.
    pub fn members_tried(&self) -> usize {
        self.upper_attempts() - self.resends
    }

    /// How many attempts went to the origin so far.
    pub fn origin_attempts(&self) -> usize {
        self.attempts.len() - self.upper_attempts()
    }

    /// Who the last upstream failure was blamed on.
    pub fn blame(&self) -> Option<Party> {
        self.failure.map(|(_, v)| v.blame)
    }

    /// The current attempt's target.
    pub fn current_hop(&self) -> Option<Hop> {
        self.attempts.last().map(|a| a.hop)
    }
}

/// Pingora's per-request `CTX`.
#[derive(Debug, Default)]
pub struct Ctx {
    /// Counts the request in `stratus_requests_in_flight` for as long as it lives.
    pub in_flight: Option<InFlight>,
    /// The configuration the request was admitted under: its origin index and timeouts
    /// keep meaning the same thing if a reload lands while it is in flight.
    pub config: Option<Arc<Config>>,
    /// Set by `request_filter` for every admitted request; `None` for refused ones.
    pub request: Option<RequestContext>,
    /// Mutable progress.
    pub progress: Progress,
    /// The observer's own state: spans. Fed `&` facts only; it never sees `request`.
    pub trace: TraceState,
}

/// Spans of one request, owned by the node and fed read-only facts.
#[derive(Debug)]
pub struct TraceState {
    /// The SERVER span.
    pub request: RequestTrace,
    /// The CLIENT span of the current upstream attempt.
    pub attempt: Option<AttemptTrace>,
    /// This node's `Cache-Status` entry, once the response is known.
    pub cache_status: String,
}

impl Default for TraceState {
    fn default() -> Self {
        TraceState {
            request: RequestTrace::disabled(),
            attempt: None,
            cache_status: String::new(),
        }
    }
}

/// One request counted in flight: the gauge goes up when it is made and down when the
/// request's context is dropped (after logging, or when an upgraded connection ends).
pub struct InFlight {
    gauge: prometheus::IntGauge,
    started: Instant,
}

impl InFlight {
    /// Counts a request in `gauge`, from now.
    pub fn enter(gauge: &prometheus::IntGauge) -> InFlight {
        gauge.inc();
        InFlight {
            gauge: gauge.clone(),
            started: Instant::now(),
        }
    }

    /// When the request's header had been read and its context was made.
    pub fn started(&self) -> Instant {
        self.started
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InFlight")
    }
}
