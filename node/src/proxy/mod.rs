//! The request path: pingora's `ProxyHttp` phases, each a few lines calling one named
//! decision. Read top to bottom, the impl below tells the story of a request:
//!
//! admit it ([`admission`]: size, loop, target, Host or control context) → enable the cache
//! for GET/HEAD → key → lookup (pingora-cache with our [`Store`], lock and predictor) → on a
//! miss, the next hop ([`hop`]: an upper member with a fresh context, or the origin from our
//! own `[[origin]]` table) → write the upstream request in one place → on a failure, the one
//! decision of who is to blame → storability ([`policy`]) → our `Cache-Status`.
//!
//! The files beside this one: [`context`] (the frozen request context and what moves),
//! [`admission`], [`hop`] (next hop and failures), [`local`] (responses we write ourselves)
//! and [`trace`] (read-only facts for the observer).

mod account;
mod admission;
mod context;
mod hop;
mod local;
mod trace;

pub use admission::{admit, Arrival, CDN_LOOP_TOKEN, MAX_STRATUS_HOPS};
pub use context::{Attempt, Ctx, Hop, InFlight, Progress, RequestContext, TraceState};

use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::header;
use pingora_cache::key::CacheHashKey;
use pingora_cache::lock::{CacheKeyLockImpl, CacheLock};
use pingora_cache::predictor::{CacheablePredictor, Predictor};
use pingora_cache::{
    CacheKey, CacheMeta, CacheOptionOverrides, CachePhase, NoCacheReason, RespCacheable,
};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result, RetryType};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};
use stratus_tiering::{Party, Stage};
use stratus_tracing::{FillLink, Telemetry};

use crate::cache_status::{self, CacheOutcome};
use crate::config::{Config, Live, Role};
use crate::dns::Dns;
use crate::errors::Generated;
use crate::metrics::Metrics;
use crate::policy;
use crate::store::Store;
use crate::tier::{Tier, CONTROL_HEADER, HEALTH_PATH};

/// Fills whose span is remembered for linking coalesced requests.
const FILL_LINKS: u64 = 65_536;
/// Uncacheable keys remembered per predictor shard (16 shards).
const PREDICTOR_SHARD_CAPACITY: usize = 4096;

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            in_flight: Some(InFlight::enter(&self.metrics.in_flight)),
            ..Ctx::default()
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        // A client that half-closes after its request still gets the answer (RFC 9112 §9.6);
        // a real disconnect shows when the response is written.
        session.downstream_session.set_abort_on_close(false);
        let arrival = match session.subrequest_ctx {
            Some(_) => Arrival::Refresh,
            None => Arrival::Network,
        };
        let peer = match self.peer_names(session, arrival) {
            Ok(peer) => peer,
            Err(g) => {
                ctx.progress.generated = Some(g);
                self.respond(session, ctx, g).await?;
                return Ok(true);
            }
        };
        if is_health_check(session.req_header()) {
            self.answer_health(session, ctx).await?;
            return Ok(true);
        }
        let config = self.config.load_full();
        let admitted = admit(
            &config,
            self.tier.as_deref(),
            session.req_header(),
            SystemTime::now(),
            arrival,
            peer.as_deref().map(Vec::as_slice),
        );
        ctx.config = Some(config);
        ctx.trace.request = self.start_trace(session, admitted.as_ref().ok());
        match admitted {
            Ok(request) if self.is_purge_from_lower(session) => {
                self.purge_from_lower(session, &request).await?;
                ctx.request = Some(request);
                Ok(true)
            }
            Ok(request) => {
                ctx.request = Some(request);
                Ok(false)
            }
            Err(g) => {
                if g == Generated::Forbidden("sender-not-peer") {
                    let refusals = &self.metrics.context_refusals;
                    refusals.with_label_values(&["sender-not-peer"]).inc();
                }
                ctx.progress.generated = Some(g);
                self.respond(session, ctx, g).await?;
                Ok(true)
            }
        }
    }

    fn request_cache_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        if ctx.request.as_ref().is_some_and(|r| r.method_cacheable) {
            self.enable_cache(session);
        }
        Ok(())
    }

    fn cache_key_callback(&self, _session: &Session, ctx: &mut Ctx) -> Result<CacheKey> {
        let r = ctx
            .request
            .as_ref()
            .ok_or_else(|| internal("cache key without context"))?;
        Ok(CacheKey::new(r.primary_key.clone(), ""))
    }

    fn response_cache_filter(
        &self,
        session: &Session,
        resp: &ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<RespCacheable> {
        if policy::declared_length_over(resp, self.config().cache.max_object_size) {
            return Ok(RespCacheable::Uncacheable(NoCacheReason::ResponseTooLarge));
        }
        // After a 304, `resp` is pingora's partial merge: freshen it with every 304 field
        // first, so the decision sees what will be stored.
        let freshened = ctx.progress.not_modified.as_deref().map(|fields| {
            let mut header = resp.clone();
            policy::freshen(&mut header, fields);
            header
        });
        let resp = freshened.as_ref().unwrap_or(resp);
        let set_cookie = self.config().cache.set_cookie;
        let decided = policy::response_cacheability(
            session.req_header(),
            resp,
            SystemTime::now(),
            set_cookie,
        );
        if matches!(decided, RespCacheable::Cacheable(_)) && policy::sets_cookie(resp) {
            // Stored without them: only the request that caused the cookies receives them.
            ctx.progress.own_cookies = policy::cookies_of(resp);
        }
        Ok(decided)
    }

    fn cache_vary_filter(
        &self,
        meta: &CacheMeta,
        _ctx: &mut Ctx,
        req: &RequestHeader,
    ) -> Option<pingora_cache::key::HashBinary> {
        policy::variance(meta, req)
    }

    fn should_serve_stale(
        &self,
        _session: &mut Session,
        _ctx: &mut Ctx,
        error: Option<&Error>,
    ) -> bool {
        // `None` asks about stale-while-revalidate: pingora only asks when the object's own
        // window allows it, so say yes. With an error, serve stale only for upstream failures
        // (stale-if-error, again within the object's window).
        error.is_none_or(|e| e.esource() == &ErrorSource::Upstream)
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        self.note_fill(session, ctx);
        let hop = self.next_hop(ctx)?;
        self.peer_for(hop, ctx).await
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let client = session
            .as_ref()
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        self.write_upstream_request(upstream, ctx, client)
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // Runs before the cache write, so what we store is already clean.
        self.upstream_answered(upstream, ctx)
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        resp.remove_header(CONTROL_HEADER);
        if self.config().node.role == Role::Lower {
            // Directives meant for stratus alone never reach a client.
            for name in policy::STRATUS_ONLY_FIELDS {
                resp.remove_header(name);
            }
        }
        self.guide_lower_update(session, resp)?;
        if matches!(
            session.cache.phase(),
            CachePhase::Miss | CachePhase::Expired
        ) {
            policy::restore_cookies(resp, &ctx.progress.own_cookies);
        }
        self.invalidate_after_unsafe(session, resp, ctx).await;
        let ours = self.add_cache_status(session, resp, &self.outcome(session, ctx))?;
        if self.telemetry.is_enabled() {
            ctx.trace.cache_status = ours;
        }
        Ok(())
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        _reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        #[cfg(windows)] _sock: std::os::windows::io::RawSocket,
        digest: Option<&pingora_core::protocols::Digest>,
        ctx: &mut Ctx,
    ) -> Result<()> {
        self.check_upper_certificate(digest, ctx)
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        let verdict = self.upstream_failed(session, ctx, &e, Stage::Connect, false);
        e.set_retry(verdict.retry);
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        // pingora marks a failure on a reused pooled connection ReusedOnly: it went stale.
        let stale_pooled = client_reused && matches!(e.retry, RetryType::ReusedOnly);
        let stage = hop::stage_of(session, ctx);
        let verdict = self.upstream_failed(session, ctx, &e, stage, stale_pooled);
        e.set_retry(verdict.retry);
        e
    }

    fn suppress_error_log(&self, _session: &Session, _ctx: &Ctx, error: &Error) -> bool {
        // A client that went away is routine, not an error to page on: the access log has it.
        error.esource() == &ErrorSource::Downstream
    }

    fn request_summary(&self, session: &Session, ctx: &Ctx) -> String {
        // Pingora's per-request error lines carry this: add the trace to find them in Jaeger.
        let base = session.as_ref().request_summary();
        match (ctx.trace.request.trace_id(), ctx.trace.request.span_id()) {
            (Some(t), Some(s)) => format!("{base}, trace_id: {t}, span_id: {s}"),
            _ => base,
        }
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        FailToProxy {
            error_code: self.answer_failure(session, e, ctx).await,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let code = session.response_written().map_or(0, |r| r.status.as_u16());
        let cache = match (ctx.progress.generated, session.cache.phase()) {
            (Some(_), _) => "generated",
            (None, phase) => phase.as_str(),
        };
        self.finish_trace(session, e, ctx, code);
        self.remember_too_large(session);
        self.account(session, ctx, cache, code);
    }
}

/// Shared state of one node's proxy.
pub struct Proxy {
    config: Live,
    store: &'static Store,
    metrics: Arc<Metrics>,
    tier: Option<Arc<Tier>>,
    telemetry: Telemetry,
    /// The SERVER span of the request filling each key, so requests coalesced onto that fill
    /// can link to it. Bounded, and entries live no longer than a fill may hold the lock.
    fills: moka::sync::Cache<String, FillLink>,
    predictor: &'static Predictor<16>,
    lock: &'static CacheKeyLockImpl,
    /// Resolves origins given by name; a reload may replace it.
    dns: Arc<ArcSwap<Dns>>,
}

impl Proxy {
    /// A proxy serving `config` from `store`.
    pub fn new(
        config: Live,
        store: &'static Store,
        metrics: Arc<Metrics>,
        tier: Option<Arc<Tier>>,
        telemetry: Telemetry,
        dns: Arc<ArcSwap<Dns>>,
    ) -> Proxy {
        let predictor: &'static Predictor<16> =
            Box::leak(Box::new(Predictor::new(PREDICTOR_SHARD_CAPACITY, None)));
        let lock: &'static CacheKeyLockImpl =
            Box::leak(CacheLock::new_boxed(config.load().cache.lock_age_timeout));
        let fills = moka::sync::Cache::builder()
            .max_capacity(FILL_LINKS)
            .time_to_live(config.load().cache.lock_age_timeout)
            .build();
        Proxy {
            config,
            store,
            metrics,
            fills,
            tier,
            telemetry,
            predictor,
            lock,
            dns,
        }
    }

    /// The configuration in force: loaded once per decision.
    fn config(&self) -> arc_swap::Guard<Arc<Config>> {
        self.config.load()
    }

    /// On an upper with mutual TLS, the names of this connection's peer certificate, verified
    /// against the trust material in force now (so a certificate revoked since its session
    /// began, resumed or kept alive, is refused here); `Ok(None)` where no certificate is
    /// involved (no mutual TLS, or a refresh this node spawned itself).
    fn peer_names(
        &self,
        session: &Session,
        arrival: Arrival,
    ) -> std::result::Result<Option<Arc<Vec<String>>>, Generated> {
        let Some(tls) = self.tier.as_deref().and_then(|t| t.tls()) else {
            return Ok(None);
        };
        if arrival == Arrival::Refresh || self.config().node.role != crate::config::Role::Upper {
            return Ok(None);
        }
        let chain = session
            .digest()
            .and_then(|d| d.ssl_digest.as_ref())
            .and_then(|ssl| ssl.extension.get::<crate::tls::PeerChain>());
        let refused = |detail: &'static str| {
            self.metrics
                .context_refusals
                .with_label_values(&[detail])
                .inc();
            Generated::Forbidden(detail)
        };
        let chain = chain.ok_or_else(|| refused("no-client-certificate"))?;
        tls.peer_names(chain).map(Some).map_err(refused)
    }

    /// An upper answers `PURGE` only from a lower (admission verified its context).
    fn is_purge_from_lower(&self, session: &Session) -> bool {
        self.config().node.role == Role::Upper && session.req_header().method.as_str() == "PURGE"
    }

    /// Our store, no eviction manager (moka bounds itself), the predictor (known-uncacheable
    /// keys skip the lock) and the coalescing lock.
    fn enable_cache(&self, session: &mut Session) {
        let mut overrides = CacheOptionOverrides::default();
        overrides.wait_timeout = Some(self.config().cache.lock_wait_timeout);
        session.cache.enable(
            self.store,
            None,
            Some(self.predictor),
            Some(self.lock),
            Some(overrides),
        );
        // No pingora max_file_size: it aborts an over-limit fill of unknown length mid-stream,
        // and the client with it. The store enforces `max_object_size` instead (streaming such
        // a body through whole), and a declared length over it is refused up front.
    }

    /// Appends this node's `Cache-Status` entry after the upstream's (and passes on a fill's
    /// age, which the stored header drops). Returns our entry.
    fn add_cache_status(
        &self,
        session: &Session,
        resp: &mut ResponseHeader,
        outcome: &CacheOutcome<'_>,
    ) -> Result<String> {
        if matches!(outcome.phase, CachePhase::Miss | CachePhase::Expired) {
            if let Some(meta) = session.cache.maybe_cache_meta() {
                let age = meta.age().as_secs();
                if age > 0 {
                    resp.insert_header(header::AGE, age.to_string())?;
                }
            }
        }
        let ours = cache_status::entry(&self.config().node.name, outcome);
        if cache_status::served_from_cache(outcome.phase) {
            // Upstream entries stored with the object describe its fill, not this response.
            resp.remove_header("cache-status");
        }
        let existing: Vec<String> = resp
            .headers
            .get_all("cache-status")
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_string))
            .collect();
        let joined = cache_status::append(
            (!existing.is_empty())
                .then(|| existing.join(", "))
                .as_deref(),
            &ours,
        );
        resp.insert_header("cache-status", joined)?;
        Ok(ours)
    }

    /// A fill that outgrew `max_object_size` streamed through and was not stored (the store
    /// enforces the limit); tell the predictor, so the next requests for the key skip the
    /// cache lock and go straight upstream, as pingora's own limit would have had them do.
    fn remember_too_large(&self, session: &Session) {
        let limit = usize::try_from(self.config().cache.max_object_size).unwrap_or(usize::MAX);
        if matches!(session.cache.phase(), CachePhase::Miss)
            && session.as_ref().body_bytes_sent() > limit
        {
            self.predictor
                .mark_uncacheable(session.cache.cache_key(), NoCacheReason::ResponseTooLarge);
        }
    }

    /// A non-error response to an unsafe method invalidates the target and its same-host
    /// `Location`/`Content-Location` at every upper member and then here (the upper that
    /// served the request invalidates its own copy the same way). The response waits for the
    /// purges of live members (concurrent, each bounded by the tier's connect + probe
    /// timeouts), so no later request refills from a copy not yet invalidated.
    async fn invalidate_after_unsafe(&self, session: &Session, resp: &ResponseHeader, ctx: &Ctx) {
        let Some(r) = ctx.request.as_ref() else {
            return;
        };
        let req = session.req_header();
        if req.method.as_str() == "PURGE" {
            return;
        }
        let paths = policy::invalidated_paths(
            &req.method,
            resp.status.as_u16(),
            &r.host,
            &r.path_and_query,
            resp,
        );
        // Uppers first (every member: failover copies too), then here, so a request in
        // between cannot refill this node from an upper's old copy. Down members are purged
        // in the background: nobody routes to them, and the response does not wait for them.
        if let (Some(tier), Some(shared)) = (self.lower_tier(), self.tier.clone()) {
            let view = tier.view();
            let mut up = Vec::new();
            for path in &paths {
                for (id, member) in view.members().iter().enumerate() {
                    let addr = member.addr;
                    if view.is_up(id) {
                        up.push(tier.purge_member(addr, &r.host, path));
                    } else {
                        let (tier, host, path) = (shared.clone(), r.host.clone(), path.clone());
                        tokio::spawn(async move {
                            let _ = tier.purge_member(addr, &host, &path).await;
                        });
                    }
                }
            }
            for outcome in futures::future::join_all(up).await {
                tracing::debug!(%outcome, "invalidated at an upper");
            }
        }
        for path in &paths {
            self.store
                .purge_primary(policy::cache_key(&r.host, path).primary_bin());
        }
    }

    /// An upper's 304 to a lower carries the stored `Content-Type` too: pingora's 304 drops
    /// representation metadata, and the lower freshens its copy from what the 304 carries
    /// (RFC 9110 §15.4.5 allows metadata that guides a cache update).
    fn guide_lower_update(&self, session: &Session, resp: &mut ResponseHeader) -> Result<()> {
        if self.config().node.role != Role::Upper || resp.status != http::StatusCode::NOT_MODIFIED {
            return Ok(());
        }
        let stored = session.cache.maybe_cache_meta().and_then(|m| {
            m.response_header()
                .headers
                .get(header::CONTENT_TYPE)
                .cloned()
        });
        if let (Some(value), false) = (stored, resp.headers.contains_key(header::CONTENT_TYPE)) {
            resp.insert_header(header::CONTENT_TYPE, value)?;
        }
        Ok(())
    }

    /// Writes the generated response for a failed request and returns its status, or 0 when
    /// headers already left: then the only honest signal is to abort the connection, since a
    /// short body must never look complete.
    async fn answer_failure(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> u16 {
        let (Some(g), None) = (Generated::from_proxy_error(e), session.response_written()) else {
            return 0;
        };
        // A timeout while the client still owed its body is the client's (nginx: 408).
        let g = match (g, ctx.progress.blame()) {
            (Generated::GatewayTimeout(_), Some(Party::Client)) => Generated::ClientTimeout,
            (g, _) => g,
        };
        ctx.progress.generated = Some(g);
        match self.respond(session, ctx, g).await {
            Ok(()) => g.status(),
            Err(write_err) => {
                ctx.trace.request.log_span().in_scope(|| {
                    tracing::debug!(%write_err, "could not send {} to the client", g.status());
                });
                0
            }
        }
    }

    fn outcome<'a>(&self, session: &Session, ctx: &'a Ctx) -> CacheOutcome<'a> {
        let now = SystemTime::now();
        let meta: Option<&CacheMeta> = match session.cache.phase() {
            CachePhase::Disabled(_)
            | CachePhase::Bypass
            | CachePhase::Uninit
            | CachePhase::CacheKey => None,
            _ => session.cache.maybe_cache_meta(),
        };
        let ttl = meta.map(|m| match m.fresh_until().duration_since(now) {
            Ok(d) => d.as_secs() as i64,
            Err(e) => -(e.duration().as_secs_f64().ceil() as i64),
        });
        CacheOutcome {
            phase: session.cache.phase(),
            method_cacheable: ctx.request.as_ref().is_some_and(|r| r.method_cacheable),
            collapsed: session.cache.lock_duration().is_some(),
            ttl,
            fwd_status: ctx.progress.upstream_status,
            vary_miss: matches!(session.cache.phase(), CachePhase::Miss) && {
                let key = session.cache.cache_key();
                self.store
                    .has_variant_other_than(&key.primary_bin(), &key.combined_bin())
            },
            key: ctx
                .request
                .as_ref()
                .filter(|r| r.method_cacheable)
                .map(|r| r.primary_key.as_str()),
        }
    }
}

/// `GET`/`HEAD` of the health path, answered before admission.
fn is_health_check(req: &RequestHeader) -> bool {
    req.uri.path() == HEALTH_PATH && matches!(req.method, http::Method::GET | http::Method::HEAD)
}

/// The `error.type` of a failure, named like the `Cache-Status` details.
fn error_type(e: &Error) -> &'static str {
    Generated::from_proxy_error(e).map_or("client-gone", Generated::detail)
}

fn internal(what: &'static str) -> Box<Error> {
    Error::explain(ErrorType::InternalError, what)
}
