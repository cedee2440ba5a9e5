//! The tracing glue: read-only facts handed to `stratus-tracing`, which owns the spans.
//!
//! Nothing here can change a request: the observer gets `&` facts and `&` headers, and its
//! only output into a request (trace headers) is written by `write_upstream_request`.

use pingora_error::Error;
use pingora_proxy::Session;
use stratus_tracing::{AttemptFacts, RequestFacts, RequestTrace, ResponseFacts, UpstreamKind};

use super::context::{Ctx, Hop, RequestContext};
use super::{error_type, Proxy};
use crate::cache_status;
use crate::errors::Generated;

impl Proxy {
    /// Starts the SERVER span from read-only facts about the request.
    pub(super) fn start_trace(
        &self,
        session: &Session,
        request: Option<&RequestContext>,
    ) -> RequestTrace {
        if !self.telemetry.is_enabled() {
            return RequestTrace::disabled();
        }
        let req = session.req_header();
        let header = |name: &str| req.headers.get(name).and_then(|v| v.to_str().ok());
        let facts = RequestFacts {
            node: &self.config().node.name,
            tier: self.config().node.role.as_str(),
            method: req.method.as_str(),
            path: req.uri.path(),
            query: req.uri.query(),
            host: request.map(|r| r.host.as_str()).or_else(|| header("host")),
            request_id: request.map(|r| r.id.as_str()),
        };
        self.telemetry.start_request(&req.headers, &facts)
    }

    /// Starts the CLIENT span of the attempt just recorded in `ctx.progress.attempts`.
    pub(super) fn start_attempt(
        &self,
        ctx: &mut Ctx,
        kind: UpstreamKind,
        address: &str,
        port: u16,
    ) {
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
    pub(super) fn trace_failed_attempt(&self, ctx: &mut Ctx, error_type: &str, retrying: bool) {
        if let Some(attempt) = ctx.trace.attempt.take() {
            attempt.failed(error_type);
        }
        if retrying {
            let from = match ctx.progress.current_hop() {
                Some(Hop::Upper(addr)) => addr.to_string(),
                _ => "origin".to_string(),
            };
            ctx.trace.request.failover(&from, error_type);
            ctx.trace.request.log_span().in_scope(|| {
                tracing::warn!(upstream = %from, error = error_type, "upstream attempt failed; trying the next hop");
            });
        }
    }

    /// Ends the SERVER span: links a coalesced request to its fill, records the outcome.
    pub(super) fn finish_trace(
        &self,
        session: &Session,
        e: Option<&Error>,
        ctx: &mut Ctx,
        code: u16,
    ) {
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
                generated_entry = cache_status::generated(&self.config().node.name, g);
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
    }

    /// Remembers the span of a request that fills a key, for requests coalesced onto it.
    pub(super) fn note_fill(&self, session: &Session, ctx: &Ctx) {
        let first_miss = ctx.progress.attempts.is_empty()
            && matches!(session.cache.phase(), pingora_cache::CachePhase::Miss);
        if let (true, Some(r)) = (first_miss, ctx.request.as_ref()) {
            if let Some(link) = ctx.trace.request.fill_link() {
                self.fills.insert(r.primary_key.clone(), link);
            }
        }
    }
}
