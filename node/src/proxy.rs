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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use http::header;
use pingora_cache::lock::{CacheKeyLockImpl, CacheLock};
use pingora_cache::predictor::Predictor;
use pingora_cache::{CacheKey, CacheMeta, CacheOptionOverrides, CachePhase, RespCacheable};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::cache_status::{self, CacheOutcome};
use crate::config::{normalize_host, Config};
use crate::errors::{Generated, DNS_FAILED};
use crate::metrics::Metrics;
use crate::policy;
use crate::store::Store;

/// The control-context header between tiers. Never accepted from clients, never forwarded to
/// origins, never sent in a response.
pub const CONTROL_HEADER: &str = "stratus-ctx";
/// Our token in `CDN-Loop` (RFC 8586).
const CDN_LOOP_TOKEN: &str = "stratus";
/// A request that has passed through stratus this many times is looping.
const MAX_STRATUS_HOPS: usize = 8;
/// Uncacheable keys remembered per predictor shard (16 shards).
const PREDICTOR_SHARD_CAPACITY: usize = 4096;

/// Everything that describes a request, decided once in `request_filter` and then frozen.
#[derive(Debug, Clone)]
pub struct RequestContext {
    /// Process-unique request number, for logs.
    pub id: u64,
    /// The Host, lowercased, without port.
    pub host: String,
    /// Index into `config.origins` of the origin serving `host`.
    pub origin: usize,
    /// The exact path and query the cache key is built from.
    pub path_and_query: String,
    /// GET or HEAD: the cache may be used.
    pub method_cacheable: bool,
}

/// What changes while a request is served. Observers read it; only phases write it.
#[derive(Debug, Default)]
pub struct Progress {
    /// A response stratus wrote itself.
    pub generated: Option<Generated>,
    /// Status of the upstream's response, when one arrived.
    pub upstream_status: Option<u16>,
}

/// Pingora's per-request `CTX`.
#[derive(Debug, Default)]
pub struct Ctx {
    /// Set by `request_filter` for every admitted request; `None` for refused ones.
    pub request: Option<RequestContext>,
    /// Mutable progress.
    pub progress: Progress,
}

/// Shared state of one node's proxy.
pub struct Proxy {
    config: Arc<Config>,
    store: &'static Store,
    metrics: Arc<Metrics>,
    predictor: &'static Predictor<16>,
    lock: &'static CacheKeyLockImpl,
    next_request_id: AtomicU64,
}

impl Proxy {
    /// A proxy serving `config` from `store`.
    pub fn new(config: Arc<Config>, store: &'static Store, metrics: Arc<Metrics>) -> Proxy {
        let predictor: &'static Predictor<16> =
            Box::leak(Box::new(Predictor::new(PREDICTOR_SHARD_CAPACITY, None)));
        let lock: &'static CacheKeyLockImpl =
            Box::leak(CacheLock::new_boxed(config.cache.lock_age_timeout));
        Proxy {
            config,
            store,
            metrics,
            predictor,
            lock,
            next_request_id: AtomicU64::new(1),
        }
    }

    /// Writes a generated response with its short body and `Cache-Status` detail.
    async fn respond(&self, session: &mut Session, g: Generated) -> Result<()> {
        let body = Bytes::from(g.body());
        let mut h = ResponseHeader::build(g.status(), Some(5))?;
        h.insert_header(header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
        h.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
        h.insert_header(header::CACHE_CONTROL, "no-store")?;
        h.insert_header(
            "cache-status",
            cache_status::generated(&self.config.node.name, g),
        )?;
        if g.status() == 400 || g.status() == 431 {
            // The framing of what follows on this connection cannot be trusted.
            session.set_keepalive(None);
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
pub fn admit(config: &Config, req: &RequestHeader, id: u64) -> Result<RequestContext, Generated> {
    let header_bytes = req.method.as_str().len()
        + req.uri.to_string().len()
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
    let host = normalize_host(&host_value).ok_or(Generated::BadRequest("bad-host"))?;
    let origin = config
        .origins
        .iter()
        .position(|o| o.host == host)
        .ok_or(Generated::UnknownHost)?;
    let path_and_query = req
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    Ok(RequestContext {
        id,
        host,
        origin,
        path_and_query,
        method_cacheable: policy::method_is_cacheable(req),
    })
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
        let id = self.next_request_id.fetch_add(1, Ordering::Relaxed);
        match admit(&self.config, session.req_header(), id) {
            Ok(request) => {
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
        Ok(policy::cache_key(&r.host, &r.path_and_query))
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

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let r = ctx
            .request
            .as_ref()
            .ok_or_else(|| internal("upstream without context"))?;
        let origin = self
            .config
            .origins
            .get(r.origin)
            .ok_or_else(|| internal("origin index out of range"))?;
        let addr = resolve(&origin.address).await?;
        let mut peer = HttpPeer::new(addr, origin.tls, r.host.clone());
        peer.options.connection_timeout = Some(origin.connect_timeout);
        peer.options.read_timeout = Some(origin.read_timeout);
        self.metrics.origin_requests.inc();
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream: &mut RequestHeader,
        _ctx: &mut Ctx,
    ) -> Result<()> {
        upstream.remove_header(CONTROL_HEADER);
        upstream.append_header("cdn-loop", CDN_LOOP_TOKEN)?;
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
        ctx.progress.upstream_status = Some(upstream.status.as_u16());
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        resp.remove_header(CONTROL_HEADER);
        let ours = cache_status::entry(&self.config.node.name, &self.outcome(session, ctx));
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
        Ok(())
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
                log::debug!("could not send {code} to the client: {write_err}");
                code = 0;
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
        let code = session.response_written().map_or(0, |r| r.status.as_u16());
        let cache = match (ctx.progress.generated, session.cache.phase()) {
            (Some(_), _) => "generated",
            (None, phase) => phase.as_str(),
        };
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
