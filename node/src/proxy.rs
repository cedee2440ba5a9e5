//! The request path: pingora's `ProxyHttp` phases as thin adapters over our decisions.
//!
//! Read top to bottom, this file tells the story of a request:
//! admit it ([`admit`]: size, loop, Host, origin) → enable the cache for GET/HEAD → key →
//! lookup (pingora-cache with our [`Store`], lock and predictor) → on a miss, the origin named
//! by our own `[[origin]]` table → decide storability ([`policy`]) → add our `Cache-Status`.
//! Failures become responses in one place ([`Generated`]).
//!
//! The part of the per-request context that describes the request ([`RequestContext`]) is
//! built once in `request_filter` and never changed; only [`Progress`] moves.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use http::header;
use pingora_cache::key::CacheHashKey;
use pingora_cache::lock::{CacheKeyLockImpl, CacheLock};
use pingora_cache::predictor::Predictor;
use pingora_cache::{CacheKey, CacheMeta, CacheOptionOverrides, CachePhase, RespCacheable};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result, RetryType};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use stratus_tiering::{route, ContextError, ControlContext, MemberId, Outcome, RequestLine, Route};

use stratus_tracing::{
    AttemptFacts, AttemptTrace, FillLink, RequestFacts, RequestTrace, ResponseFacts, Telemetry,
    UpstreamKind,
};

use crate::cache_status::{self, CacheOutcome};
use crate::config::{normalize_host, AllUpperDown, Config, Role};
use crate::errors::{
    blames_member, Generated, ALL_UPPER_DOWN, DNS_FAILED, GENERATED_HEADER, UPPER_REFUSED,
};
use crate::metrics::Metrics;
use crate::policy;
use crate::store::Store;
use crate::tier::{Tier, HEALTH_PATH, MAX_UPPER_ATTEMPTS};

/// The control-context header between tiers. Never accepted from clients, never forwarded to
/// origins, never sent in a response.
pub const CONTROL_HEADER: &str = "stratus-ctx";
/// Our token in `CDN-Loop` (RFC 8586).
const CDN_LOOP_TOKEN: &str = "stratus";
/// A request that has passed through stratus this many times is looping.
const MAX_STRATUS_HOPS: usize = 8;
/// Fills whose span is remembered for linking coalesced requests.
const FILL_LINKS: u64 = 65_536;
/// Uncacheable keys remembered per predictor shard (16 shards).
const PREDICTOR_SHARD_CAPACITY: usize = 4096;

/// Everything that describes a request, decided once in `request_filter` and then frozen.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// Fleet-unique request id (128 random bits, hex).
    pub id: String,
    /// The origin's host, lowercased, without port: from Host (lower) or the context (upper).
    pub host: String,
    /// Index into `config.origins` of the origin serving `host`.
    pub origin: usize,
    /// The exact path and query the cache key is built from.
    pub path_and_query: String,
    /// The cache key's primary string; lower nodes hash these bytes onto the ring.
    pub primary_key: String,
    /// GET or HEAD: the cache may be used.
    pub method_cacheable: bool,
    /// Lower: the context sent to upper members. Upper: the verified context received.
    pub control: Option<ControlContext>,
}

/// One upstream attempt's target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// An upper-tier member.
    Upper(MemberId, SocketAddr),
    /// The origin of the request's `[[origin]]`.
    Origin,
}

/// What changes while a request is served. Observers read it; only phases write it.
#[derive(Debug, Default)]
pub struct Progress {
    /// A response stratus wrote itself.
    pub generated: Option<Generated>,
    /// Status of the current attempt's response, when one arrived.
    pub upstream_status: Option<u16>,
    /// The route, fixed at the first upstream attempt (lower nodes with upper members).
    pub route: Option<Route>,
    /// Every upstream attempt, in order.
    pub attempts: Vec<Hop>,
}

impl Progress {
    /// How many attempts went to upper members so far.
    pub fn upper_attempts(&self) -> usize {
        self.attempts
            .iter()
            .filter(|h| matches!(h, Hop::Upper(..)))
            .count()
    }
}

/// Pingora's per-request `CTX`.
#[derive(Debug, Default)]
pub struct Ctx {
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

/// Shared state of one node's proxy.
pub struct Proxy {
    config: Arc<Config>,
    store: &'static Store,
    metrics: Arc<Metrics>,
    tier: Option<Arc<Tier>>,
    telemetry: Telemetry,
    /// The SERVER span of the request filling each key, so requests coalesced onto that fill
    /// can link to it. Bounded, and entries live no longer than a fill may hold the lock.
    fills: moka::sync::Cache<String, FillLink>,
    predictor: &'static Predictor<16>,
    lock: &'static CacheKeyLockImpl,
}

impl Proxy {
    /// A proxy serving `config` from `store`.
    pub fn new(
        config: Arc<Config>,
        store: &'static Store,
        metrics: Arc<Metrics>,
        tier: Option<Arc<Tier>>,
        telemetry: Telemetry,
    ) -> Proxy {
        let predictor: &'static Predictor<16> =
            Box::leak(Box::new(Predictor::new(PREDICTOR_SHARD_CAPACITY, None)));
        let lock: &'static CacheKeyLockImpl =
            Box::leak(CacheLock::new_boxed(config.cache.lock_age_timeout));
        let fills = moka::sync::Cache::builder()
            .max_capacity(FILL_LINKS)
            .time_to_live(config.cache.lock_age_timeout)
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
        }
    }

    /// Starts the SERVER span from read-only facts about the request.
    fn start_trace(&self, session: &Session, request: Option<&RequestContext>) -> RequestTrace {
        if !self.telemetry.is_enabled() {
            return RequestTrace::disabled();
        }
        let req = session.req_header();
        let header = |name: &str| req.headers.get(name).and_then(|v| v.to_str().ok());
        let facts = RequestFacts {
            node: &self.config.node.name,
            tier: self.config.node.role.as_str(),
            method: req.method.as_str(),
            path: req.uri.path(),
            query: req.uri.query(),
            host: request.map(|r| r.host.as_str()).or_else(|| header("host")),
            request_id: request.map(|r| r.id.as_str()),
        };
        self.telemetry.start_request(&req.headers, &facts)
    }

    /// Starts the CLIENT span of the attempt just recorded in `ctx.progress.attempts`.
    fn start_attempt(&self, ctx: &mut Ctx, kind: UpstreamKind, address: &str, port: u16) {
        if !self.telemetry.is_enabled() {
            return;
        }
        let Some(r) = ctx.request.as_ref() else {
            return;
        };
        let url = format!("http://{}{}", r.host, r.path_and_query);
        let facts = AttemptFacts {
            kind,
            attempt: u32::try_from(ctx.progress.attempts.len()).unwrap_or(u32::MAX),
            method: if r.method_cacheable { "GET" } else { "HTTP" },
            server_address: address,
            server_port: port,
            url_full: &url,
        };
        ctx.trace.attempt = Some(ctx.trace.request.start_attempt(&self.telemetry, &facts));
    }

    /// Ends the current attempt's CLIENT span as failed and notes the failover, if any.
    fn trace_failed_attempt(&self, ctx: &mut Ctx, error_type: &str, retrying: bool) {
        if let Some(attempt) = ctx.trace.attempt.take() {
            attempt.failed(error_type);
        }
        if retrying {
            let from = match ctx.progress.attempts.last() {
                Some(Hop::Upper(_, addr)) => addr.to_string(),
                _ => "origin".to_string(),
            };
            ctx.trace.request.failover(&from, error_type);
            ctx.trace.request.log_span().in_scope(|| {
                tracing::warn!(upstream = %from, error = error_type, "upstream attempt failed; trying the next hop");
            });
        }
    }

    /// The tier of a lower node that routes misses to upper members.
    fn lower_tier(&self) -> Option<&Tier> {
        self.tier
            .as_deref()
            .filter(|t| self.config.node.role == Role::Lower && t.has_upper())
    }

    /// Whether another upstream attempt is possible after the current one.
    fn has_next_hop(&self, ctx: &Ctx) -> bool {
        let Some(tier) = self.lower_tier() else {
            return false;
        };
        let tried_upper = ctx.progress.upper_attempts();
        let tried_origin = ctx.progress.attempts.contains(&Hop::Origin);
        let route_left = ctx
            .progress
            .route
            .as_ref()
            .is_some_and(|r| r.hops.len() > tried_upper);
        route_left || (tier.settings.on_all_upper_down == AllUpperDown::Origin && !tried_origin)
    }

    /// Reports the current attempt's outcome if it went to an upper member.
    fn report(&self, ctx: &Ctx, outcome: Outcome) {
        if let (Some(tier), Some(Hop::Upper(id, addr))) = (&self.tier, ctx.progress.attempts.last())
        {
            tier.report(*id, outcome);
            self.metrics
                .upper_requests
                .with_label_values(&[addr.to_string().as_str(), outcome.label()])
                .inc();
        }
    }

    /// Answers `PURGE` from a lower node (already authenticated by its context).
    async fn purge_from_lower(&self, session: &mut Session, r: &RequestContext) -> Result<()> {
        let purged = self
            .store
            .purge_primary(policy::cache_key(&r.host, &r.path_and_query).primary_bin());
        let body = Bytes::from(format!(
            "{{\"node\": \"{}\", \"outcome\": \"{}\"}}\n",
            self.config.node.name,
            if purged { "purged" } else { "not_found" }
        ));
        write_local(session, 200, "application/json", body, &[]).await
    }

    /// Answers the data-listener health check; no origin is contacted.
    async fn health(&self, session: &mut Session) -> Result<()> {
        write_local(session, 200, "text/plain", Bytes::from_static(b"ok\n"), &[]).await
    }

    /// Writes a generated response with its short body and `Cache-Status` detail.
    async fn respond(&self, session: &mut Session, g: Generated) -> Result<()> {
        let mut extra = vec![(
            "cache-status",
            cache_status::generated(&self.config.node.name, g),
        )];
        if self.config.node.role == Role::Upper {
            extra.push((GENERATED_HEADER, g.detail().to_string()));
        }
        if g.status() == 400 || g.status() == 431 {
            // The framing of what follows on this connection cannot be trusted.
            session.set_keepalive(None);
        }
        let body = Bytes::from(g.body());
        write_local(
            session,
            g.status(),
            "text/plain; charset=utf-8",
            body,
            &extra,
        )
        .await
    }

    fn outcome(&self, session: &Session, ctx: &Ctx) -> CacheOutcome {
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
        }
    }
}

/// Decides whether a request may be served at all, and builds its frozen context.
///
/// A lower node trusts the Host header to pick an `[[origin]]` and builds the control context
/// it will send upward. An upper node trusts nothing but a verified control context: the
/// origin comes from the context's host through this node's own `[[origin]]` table.
pub fn admit(
    config: &Config,
    tier: Option<&Tier>,
    req: &RequestHeader,
    now: SystemTime,
) -> Result<RequestContext, Generated> {
    let header_bytes = req.method.as_str().len()
        + uri_len(&req.uri)
        + req
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>();
    if header_bytes > config.node.max_request_header_size {
        return Err(Generated::HeadersTooLarge);
    }
    let hops = req
        .headers
        .get_all("cdn-loop")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter(|t| {
            t.split(';')
                .next()
                .is_some_and(|name| name.trim().eq_ignore_ascii_case(CDN_LOOP_TOKEN))
        })
        .count();
    if hops >= MAX_STRATUS_HOPS {
        return Err(Generated::LoopDetected);
    }
    let path_and_query = req
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let method_cacheable = policy::method_is_cacheable(req);
    let id = format!("{:032x}", rand::random::<u128>());
    match config.node.role {
        Role::Lower => {
            if req.method.as_str() == "PURGE" {
                return Err(Generated::MethodNotAllowed);
            }
            let host = request_host(req)?;
            let origin = origin_index(config, &host)?;
            let primary_key = policy::primary_key(&host, &path_and_query);
            let control = tier.filter(|t| t.has_upper()).map(|_| {
                let key_id = policy::key_id(&primary_key);
                ControlContext::new(
                    host.clone(),
                    key_id,
                    id.clone(),
                    config.node.name.clone(),
                    now,
                )
            });
            Ok(RequestContext {
                id,
                host,
                origin,
                path_and_query,
                primary_key,
                method_cacheable,
                control,
            })
        }
        Role::Upper => {
            let tier = tier.ok_or(Generated::Forbidden("no-tier"))?;
            let mut values = req.headers.get_all(CONTROL_HEADER).iter();
            let value = match (values.next(), values.next()) {
                (_, Some(_)) => return Err(Generated::Forbidden(ContextError::Malformed.detail())),
                (v, None) => v
                    .map(|v| {
                        v.to_str()
                            .map_err(|_| Generated::Forbidden(ContextError::Malformed.detail()))
                    })
                    .transpose()?,
            };
            let control = tier
                .accept(value, req.method.as_str(), &path_and_query)
                .map_err(|e| match e {
                    ContextError::TooManyHops => Generated::LoopDetected,
                    e => Generated::Forbidden(e.detail()),
                })?;
            let host = control.origin_host().to_string();
            let origin = origin_index(config, &host)?;
            let primary_key = policy::primary_key(&host, &path_and_query);
            if policy::key_id(&primary_key) != control.cache_key() {
                return Err(Generated::Forbidden("context-key-mismatch"));
            }
            Ok(RequestContext {
                id: control.request_id().to_string(),
                primary_key,
                host,
                origin,
                path_and_query,
                method_cacheable,
                control: Some(control),
            })
        }
    }
}

/// Writes a small, complete response stratus answers itself: exact length, never stored.
async fn write_local(
    session: &mut Session,
    status: u16,
    content_type: &str,
    body: Bytes,
    extra: &[(&'static str, String)],
) -> Result<()> {
    let mut h = ResponseHeader::build(status, Some(4 + extra.len()))?;
    h.insert_header(header::CONTENT_TYPE, content_type)?;
    h.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    h.insert_header(header::CACHE_CONTROL, "no-store")?;
    for (name, value) in extra {
        h.insert_header(*name, value.as_str())?;
    }
    let head_only = session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(h), head_only)
        .await?;
    if !head_only {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

/// Length of the request target as it appears on the wire (`Uri`'s `Display`), without
/// formatting it: this runs for every request.
fn uri_len(uri: &http::Uri) -> usize {
    uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path().len()
        + uri.query().map_or(0, |q| q.len() + 1)
}

/// Index of the `[[origin]]` serving `host`.
fn origin_index(config: &Config, host: &str) -> Result<usize, Generated> {
    config
        .origins
        .iter()
        .position(|o| o.host == host)
        .ok_or(Generated::UnknownHost)
}

/// The request's Host (header, else absolute-form authority), normalised.
fn request_host(req: &RequestHeader) -> Result<String, Generated> {
    let mut hosts = req.headers.get_all(header::HOST).iter();
    let host_value = match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => return Err(Generated::BadRequest("duplicate-host")),
        (Some(v), None) => v
            .to_str()
            .map_err(|_| Generated::BadRequest("bad-host"))?
            .to_string(),
        (None, _) => req
            .uri
            .authority()
            .map(|a| a.as_str().to_string())
            .ok_or(Generated::BadRequest("missing-host"))?,
    };
    normalize_host(&host_value).ok_or(Generated::BadRequest("bad-host"))
}

fn upstream_error(kind: &'static str, context: String, retry: bool) -> Box<Error> {
    let mut e = Error::create(
        ErrorType::Custom(kind),
        ErrorSource::Upstream,
        Some(context.into()),
        None,
    );
    e.set_retry(retry);
    e
}

async fn resolve(address: &str) -> Result<SocketAddr> {
    if let Ok(addr) = address.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let dns_error = |why: String| {
        Error::create(
            ErrorType::Custom(DNS_FAILED),
            ErrorSource::Upstream,
            Some(format!("resolving {address}: {why}").into()),
            None,
        )
    };
    let mut addrs = tokio::net::lookup_host(address)
        .await
        .map_err(|e| dns_error(e.to_string()))?;
    addrs.next().ok_or_else(|| dns_error("no addresses".into()))
}

/// The `error.type` of a failure, named like the `Cache-Status` details.
fn error_type(e: &Error) -> &'static str {
    Generated::from_proxy_error(e).map_or("client-gone", Generated::detail)
}

fn internal(what: &'static str) -> Box<Error> {
    Error::explain(ErrorType::InternalError, what)
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx::default()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let req = session.req_header();
        if req.uri.path() == HEALTH_PATH
            && matches!(req.method, http::Method::GET | http::Method::HEAD)
        {
            self.health(session).await?;
            return Ok(true);
        }
        let admitted = admit(
            &self.config,
            self.tier.as_deref(),
            session.req_header(),
            SystemTime::now(),
        );
        ctx.trace.request = self.start_trace(session, admitted.as_ref().ok());
        match admitted {
            Ok(request) => {
                if self.config.node.role == Role::Upper
                    && session.req_header().method.as_str() == "PURGE"
                {
                    self.purge_from_lower(session, &request).await?;
                    ctx.request = Some(request);
                    return Ok(true);
                }
                ctx.request = Some(request);
                Ok(false)
            }
            Err(g) => {
                ctx.progress.generated = Some(g);
                self.respond(session, g).await?;
                Ok(true)
            }
        }
    }

    fn request_cache_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        if !ctx.request.as_ref().is_some_and(|r| r.method_cacheable) {
            return Ok(());
        }
        let mut overrides = CacheOptionOverrides::default();
        overrides.wait_timeout = Some(self.config.cache.lock_wait_timeout);
        session.cache.enable(
            self.store,
            None,
            Some(self.predictor),
            Some(self.lock),
            Some(overrides),
        );
        let max = usize::try_from(self.config.cache.max_object_size).unwrap_or(usize::MAX);
        session.cache.set_max_file_size_bytes(max);
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
        _ctx: &mut Ctx,
    ) -> Result<RespCacheable> {
        Ok(policy::response_cacheability(
            session.req_header(),
            resp,
            SystemTime::now(),
        ))
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
        let r = ctx
            .request
            .as_ref()
            .ok_or_else(|| internal("upstream without context"))?;
        ctx.progress.upstream_status = None;
        if ctx.progress.attempts.is_empty() && matches!(session.cache.phase(), CachePhase::Miss) {
            // This request fills the key; requests coalesced onto it will link to its span.
            if let Some(link) = ctx.trace.request.fill_link() {
                self.fills.insert(r.primary_key.clone(), link);
            }
        }
        if let Some(tier) = self.lower_tier() {
            let tried = ctx.progress.upper_attempts();
            let route = ctx.progress.route.get_or_insert_with(|| {
                route(r.primary_key.as_bytes(), &tier.view(), MAX_UPPER_ATTEMPTS)
            });
            if let Some(&id) = route.hops.get(tried) {
                let view = tier.view();
                let addr = view
                    .members()
                    .get(id)
                    .map(|m| m.addr)
                    .ok_or_else(|| internal("route names an unknown member"))?;
                ctx.progress.attempts.push(Hop::Upper(id, addr));
                self.start_attempt(
                    ctx,
                    UpstreamKind::Upper,
                    &addr.ip().to_string(),
                    addr.port(),
                );
                let mut peer = HttpPeer::new(addr, false, String::new());
                peer.options.connection_timeout = Some(tier.settings.connect_timeout);
                peer.options.read_timeout = Some(tier.settings.read_timeout);
                return Ok(Box::new(peer));
            }
            let go_direct = tier.settings.on_all_upper_down == AllUpperDown::Origin
                && !ctx.progress.attempts.contains(&Hop::Origin);
            if !go_direct {
                return Err(upstream_error(
                    ALL_UPPER_DOWN,
                    format!("no upper member left after {tried} attempts"),
                    false,
                ));
            }
        }
        ctx.progress.attempts.push(Hop::Origin);
        let r = ctx
            .request
            .as_ref()
            .ok_or_else(|| internal("upstream without context"))?;
        let origin = self
            .config
            .origins
            .get(r.origin)
            .ok_or_else(|| internal("origin index out of range"))?;
        let (tls, host, address) = (origin.tls, r.host.clone(), origin.address.clone());
        let (connect_timeout, read_timeout) = (origin.connect_timeout, origin.read_timeout);
        let port = address
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or(80);
        self.start_attempt(ctx, UpstreamKind::Origin, &host, port);
        let addr = match resolve(&address).await {
            Ok(addr) => addr,
            Err(e) => {
                self.trace_failed_attempt(ctx, "dns", false);
                return Err(e);
            }
        };
        let mut peer = HttpPeer::new(addr, tls, host);
        peer.options.connection_timeout = Some(connect_timeout);
        peer.options.read_timeout = Some(read_timeout);
        self.metrics.origin_requests.inc();
        Ok(Box::new(peer))
    }

    /// The one place outgoing control headers are written, from the frozen context.
    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        upstream.remove_header(CONTROL_HEADER);
        upstream.append_header("cdn-loop", CDN_LOOP_TOKEN)?;
        let to_upper = matches!(ctx.progress.attempts.last(), Some(Hop::Upper(..)));
        if let (true, Some(tier), Some(control)) = (
            to_upper,
            &self.tier,
            ctx.request.as_ref().and_then(|r| r.control.as_ref()),
        ) {
            let target = upstream
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string();
            let line = RequestLine {
                method: upstream.method.as_str(),
                target: &target,
            };
            let value = control.encode(&tier.secret, line);
            upstream.insert_header(CONTROL_HEADER, value)?;
        }
        // Tracing contributes only these pairs (none when it is off); they replace the
        // caller's traceparent/tracestate so the next hop's parent is our CLIENT span.
        if let Some(attempt) = &ctx.trace.attempt {
            for (name, value) in attempt.headers() {
                upstream.insert_header(name, value)?;
            }
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // Runs before the cache write, so what we store is already clean.
        upstream.remove_header(CONTROL_HEADER);
        let status = upstream.status.as_u16();
        if matches!(ctx.progress.attempts.last(), Some(Hop::Upper(..))) {
            let member_generated = upstream.headers.contains_key(GENERATED_HEADER);
            upstream.remove_header(GENERATED_HEADER);
            if member_generated && blames_member(status) {
                self.report(ctx, Outcome::MemberError);
                let retry = self.has_next_hop(ctx);
                self.trace_failed_attempt(ctx, "member_error", retry);
                return Err(upstream_error(
                    UPPER_REFUSED,
                    format!("upper member answered {status} about itself"),
                    retry,
                ));
            }
            self.report(ctx, Outcome::Answered);
        }
        ctx.progress.upstream_status = Some(status);
        if let Some(attempt) = ctx.trace.attempt.take() {
            attempt.answered(status);
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        resp.remove_header(CONTROL_HEADER);
        let outcome = self.outcome(session, ctx);
        if matches!(outcome.phase, CachePhase::Miss | CachePhase::Expired) {
            // The stored header drops the upstream's Age (pingora derives Age from the meta on
            // hits); a fill must still pass on the age the object already has.
            if let Some(meta) = session.cache.maybe_cache_meta() {
                let age = meta.age().as_secs();
                if age > 0 {
                    resp.insert_header(header::AGE, age.to_string())?;
                }
            }
        }
        let ours = cache_status::entry(&self.config.node.name, &outcome);
        if self.telemetry.is_enabled() {
            ctx.trace.cache_status.clone_from(&ours);
        }
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
            ours,
        );
        resp.insert_header("cache-status", joined)?;
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if matches!(ctx.progress.attempts.last(), Some(Hop::Upper(..))) {
            let outcome = match e.etype() {
                ErrorType::ConnectTimedout => Outcome::TimedOut,
                _ => Outcome::ConnectFailed,
            };
            self.report(ctx, outcome);
            e.set_retry(self.has_next_hop(ctx));
        }
        let retrying = e.retry();
        self.trace_failed_attempt(ctx, error_type(&e), retrying);
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
        // A stale pooled connection is not the member's fault (pingora marks it ReusedOnly).
        let stale_pooled = client_reused && matches!(e.retry, RetryType::ReusedOnly);
        e.retry.decide_reuse(client_reused);
        let before_headers =
            ctx.progress.upstream_status.is_none() && session.response_written().is_none();
        if matches!(ctx.progress.attempts.last(), Some(Hop::Upper(..))) {
            let already_reported = matches!(e.etype(), ErrorType::Custom(UPPER_REFUSED));
            if !already_reported && !stale_pooled {
                let outcome = match e.etype() {
                    ErrorType::ReadTimedout | ErrorType::WriteTimedout => Outcome::TimedOut,
                    _ => Outcome::Reset,
                };
                self.report(ctx, outcome);
            }
            // Failover only before response headers: after them the client already has a
            // status line, and the only honest signal left is to abort its connection.
            e.set_retry(before_headers && self.has_next_hop(ctx));
        }
        let idempotent = session.req_header().method.is_idempotent();
        if !idempotent || session.as_ref().retry_buffer_truncated() {
            e.set_retry(false);
        }
        let retrying = e.retry();
        self.trace_failed_attempt(ctx, error_type(&e), retrying);
        e
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
        let generated = Generated::from_proxy_error(e);
        let mut code = 0;
        // Once response headers left, the only honest signal is to abort the connection:
        // a short body must never look complete.
        if let (Some(g), None) = (generated, session.response_written()) {
            ctx.progress.generated = Some(g);
            code = g.status();
            if let Err(write_err) = self.respond(session, g).await {
                ctx.trace.request.log_span().in_scope(|| {
                    tracing::debug!(%write_err, "could not send {code} to the client");
                });
                code = 0;
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let code = session.response_written().map_or(0, |r| r.status.as_u16());
        let cache = match (ctx.progress.generated, session.cache.phase()) {
            (Some(_), _) => "generated",
            (None, phase) => phase.as_str(),
        };
        if let Some(attempt) = ctx.trace.attempt.take() {
            // The attempt ended without a response (e.g. the client went away).
            attempt.failed(e.map_or("aborted", error_type));
        }
        if session.cache.lock_duration().is_some() {
            let fill = ctx
                .request
                .as_ref()
                .and_then(|r| self.fills.get(&r.primary_key));
            if let Some(fill) = fill {
                ctx.trace.request.link_fill(&fill);
            }
        }
        let generated_entry;
        let cache_status = match ctx.progress.generated {
            Some(g) if ctx.trace.cache_status.is_empty() => {
                generated_entry = cache_status::generated(&self.config.node.name, g);
                generated_entry.as_str()
            }
            _ => ctx.trace.cache_status.as_str(),
        };
        ctx.trace.request.finish(&ResponseFacts {
            status: code,
            cache_status,
            lock_wait: session.cache.lock_duration(),
            error: ctx
                .progress
                .generated
                .map(Generated::detail)
                .or(e.map(error_type)),
        });
        let code = code.to_string();
        self.metrics
            .requests
            .with_label_values(&[cache, code.as_str()])
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config() -> Config {
        Config::parse(
            r#"
[node]
name = "edge-1"
role = "lower"
listen = "127.0.0.1:1"
admin_listen = "127.0.0.1:2"
max_request_header_size = "1KiB"
[[origin]]
host = "example.test"
address = "127.0.0.1:3"
"#,
            Path::new("."),
        )
        .expect("valid test config")
    }

    fn req(headers: &[(&'static str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/a?b=1", None).expect("request");
        for (k, v) in headers {
            r.append_header(*k, *v).expect("header");
        }
        r
    }

    fn admit(c: &Config, r: &RequestHeader, _id: u64) -> Result<RequestContext, Generated> {
        super::admit(c, None, r, SystemTime::now())
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Whatever a client sends, admission answers (admitted or a documented 4xx/508) and
        /// never panics; an admitted request always names a configured origin.
        #[test]
        fn admission_never_panics(
            method in "(GET|HEAD|POST|PURGE|[A-Z]{1,12})",
            path in "/[ -~]{0,200}",
            headers in proptest::collection::vec(("[a-z][a-z0-9-]{0,20}", proptest::collection::vec(32u8..127, 0..300)), 0..12),
        ) {
            let c = config();
            let Ok(mut r) = RequestHeader::build(method.as_str(), path.as_bytes(), None) else {
                return Ok(());
            };
            for (k, v) in headers {
                if let Ok(value) = http::HeaderValue::from_bytes(&v) {
                    let _ = r.append_header(k, value);
                }
            }
            match admit(&c, &r, 1) {
                Ok(ctx) => proptest::prop_assert!(ctx.origin < c.origins.len()),
                Err(g) => proptest::prop_assert!(matches!(g.status(), 400 | 405 | 421 | 431 | 508)),
            }
        }
    }

    #[test]
    fn admission() {
        let c = config();
        let ok = admit(&c, &req(&[("host", "Example.test:8080")]), 1).expect("admitted");
        assert_eq!(
            (ok.host.as_str(), ok.origin, ok.path_and_query.as_str()),
            ("example.test", 0, "/a?b=1")
        );
        assert_eq!(
            admit(&c, &req(&[("host", "other.test")]), 1).err(),
            Some(Generated::UnknownHost)
        );
        assert_eq!(
            admit(&c, &req(&[]), 1).err(),
            Some(Generated::BadRequest("missing-host"))
        );
        assert_eq!(
            admit(
                &c,
                &req(&[("host", "example.test"), ("host", "example.test")]),
                1
            )
            .err(),
            Some(Generated::BadRequest("duplicate-host"))
        );
        assert_eq!(
            admit(&c, &req(&[("host", "bad host")]), 1).err(),
            Some(Generated::BadRequest("bad-host"))
        );
        let big = "x".repeat(2000);
        assert_eq!(
            admit(
                &c,
                &req(&[("host", "example.test"), ("cookie", big.as_str())]),
                1
            )
            .err(),
            Some(Generated::HeadersTooLarge)
        );
        let looped = ["stratus"; MAX_STRATUS_HOPS].join(", ");
        assert_eq!(
            admit(
                &c,
                &req(&[("host", "example.test"), ("cdn-loop", looped.as_str())]),
                1
            )
            .err(),
            Some(Generated::LoopDetected)
        );
    }
}
