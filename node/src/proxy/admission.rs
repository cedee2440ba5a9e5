//! Whether a request is served at all, and the frozen [`RequestContext`] it is served with.
//!
//! A lower node trusts the Host header to pick an `[[origin]]`; an upper node trusts nothing
//! but a verified control context. Both refuse what would make one cache key mean two things:
//! a request target that is not origin-form or absolute-form, or not UTF-8.

use std::time::SystemTime;

use http::header;
use pingora_http::RequestHeader;
use stratus_tiering::{ContextError, RequestLine};

use super::context::RequestContext;
use crate::config::{normalize_host, Config, Role};
use crate::errors::Generated;
use crate::policy;
use crate::tier::{Tier, CONTROL_HEADER};

/// Our token in `CDN-Loop` (RFC 8586).
pub const CDN_LOOP_TOKEN: &str = "stratus";
/// A request that has passed through stratus this many times is looping. A lower refuses one
/// whose next hop would reach it, so a loop a client built never reaches a member.
pub const MAX_STRATUS_HOPS: usize = 8;

/// How a request reached this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// From a client or a lower tier.
    Network,
    /// A background revalidation this node spawned from a request it already admitted.
    Refresh,
}

/// Decides whether a request may be served, and builds its frozen context. `peer`: on an upper
/// with mutual TLS, the names of the connection's verified certificate (a context's sender must
/// be one of them); `None` where no certificate is involved.
pub fn admit(
    config: &Config,
    tier: Option<&Tier>,
    req: &RequestHeader,
    now: SystemTime,
    arrival: Arrival,
    peer: Option<&[String]>,
) -> Result<RequestContext, Generated> {
    if header_bytes(req) > config.node.max_request_header_size {
        return Err(Generated::HeadersTooLarge);
    }
    let hops = stratus_hops(req);
    let limit = match config.node.role {
        Role::Lower => MAX_STRATUS_HOPS - 1,
        Role::Upper => MAX_STRATUS_HOPS,
    };
    if hops >= limit {
        return Err(Generated::LoopDetected);
    }
    let Target {
        path_and_query,
        authority,
    } = request_target(req)?;
    let method_cacheable = policy::method_is_cacheable(req);
    match config.node.role {
        Role::Lower => {
            if req.method.as_str() == "PURGE" {
                return Err(Generated::MethodNotAllowed);
            }
            let host = request_host(req, authority.as_deref())?;
            let origin = origin_index(config, &host)?;
            let primary_key = policy::primary_key(&host, &path_and_query);
            let id = format!("{:032x}", rand::random::<u128>());
            let tiered = tier.is_some_and(|t| t.has_upper());
            Ok(RequestContext {
                id,
                host,
                origin,
                path_and_query,
                primary_key,
                method_cacheable,
                tiered,
                received: None,
            })
        }
        Role::Upper => {
            let tier = tier.ok_or(Generated::Forbidden("no-tier"))?;
            let value = control_header(req)?;
            let line = RequestLine {
                method: req.method.as_str(),
                target: &path_and_query,
            };
            let control = tier
                .accept(value, line, arrival == Arrival::Refresh, now)
                .map_err(context_refusal)?;
            // Names compare as DNS names do: ASCII case-insensitively (no wildcards).
            let sender = control.sender();
            if peer.is_some_and(|names| !names.iter().any(|n| n.eq_ignore_ascii_case(sender))) {
                // A fleet member's certificate, but the context claims another sender.
                return Err(Generated::Forbidden("sender-not-peer"));
            }
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
                tiered: false,
                received: Some(control),
            })
        }
    }
}

/// The response to a refused control context.
pub fn context_refusal(e: ContextError) -> Generated {
    match e {
        ContextError::TooManyHops => Generated::LoopDetected,
        e => Generated::Forbidden(e.detail()),
    }
}

/// The single `stratus-ctx` value, if any; several are malformed.
pub fn control_header(req: &RequestHeader) -> Result<Option<&str>, Generated> {
    let mut values = req.headers.get_all(CONTROL_HEADER).iter();
    match (values.next(), values.next()) {
        (_, Some(_)) => Err(Generated::Forbidden(ContextError::Malformed.detail())),
        (v, None) => v
            .map(|v| {
                v.to_str()
                    .map_err(|_| Generated::Forbidden(ContextError::Malformed.detail()))
            })
            .transpose(),
    }
}

/// `stratus` entries in `CDN-Loop`: how many stratus nodes this request has passed.
fn stratus_hops(req: &RequestHeader) -> usize {
    req.headers
        .get_all("cdn-loop")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter(|t| {
            t.split(';')
                .next()
                .is_some_and(|name| name.trim().eq_ignore_ascii_case(CDN_LOOP_TOKEN))
        })
        .count()
}

/// Bytes of the request line and headers as they came in (without formatting anything).
fn header_bytes(req: &RequestHeader) -> usize {
    req.method.as_str().len()
        + req.raw_path().len()
        + req
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>()
}

/// What a request target names: the path and query the key is built from and the upstream
/// request will carry, and the authority of an absolute-form target.
struct Target {
    path_and_query: String,
    authority: Option<String>,
}

/// Only origin-form (`/a?b`) and absolute-form (`http://host/a?b`) targets in UTF-8 are
/// served, and an origin-form target only when what Pingora parsed is exactly what arrived:
/// anything else could be keyed as one URL and fetched as another.
fn request_target(req: &RequestHeader) -> Result<Target, Generated> {
    let bad = Generated::BadRequest("bad-target");
    let raw = std::str::from_utf8(req.raw_path()).map_err(|_| bad)?;
    if raw.starts_with('/') {
        return match req.uri.path_and_query().map(|p| p.as_str()) {
            Some(p) if p == raw => Ok(Target {
                path_and_query: raw.to_string(),
                authority: None,
            }),
            _ => Err(bad),
        };
    }
    let scheme_len = ["http://", "https://"]
        .iter()
        .find(|s| {
            raw.get(..s.len())
                .is_some_and(|h| h.eq_ignore_ascii_case(s))
        })
        .map(|s| s.len())
        .ok_or(bad)?;
    let after = &raw[scheme_len..];
    let (authority, rest) = after.split_at(after.find(['/', '?']).unwrap_or(after.len()));
    if authority.is_empty() || authority.contains('@') {
        return Err(bad);
    }
    let path_and_query = match rest.chars().next() {
        None => "/".to_string(),
        Some('?') => format!("/{rest}"),
        Some(_) => rest.to_string(),
    };
    // It must survive parsing unchanged (a `#fragment` would not): the key, the signature and
    // the request sent upstream all use this string.
    let parsed = http::uri::PathAndQuery::try_from(path_and_query.as_str()).map_err(|_| bad)?;
    if parsed.as_str() != path_and_query {
        return Err(bad);
    }
    Ok(Target {
        path_and_query,
        authority: Some(authority.to_string()),
    })
}

/// Index of the `[[origin]]` serving `host`.
fn origin_index(config: &Config, host: &str) -> Result<usize, Generated> {
    config
        .origins
        .iter()
        .position(|o| o.host == host)
        .ok_or(Generated::UnknownHost)
}

/// The request's host, normalised: an absolute-form target's authority (RFC 9112 §3.2.2:
/// it wins over Host), an HTTP/2 request's `:authority` (RFC 9113 §8.3.1), else the single
/// Host header.
fn request_host(req: &RequestHeader, authority: Option<&str>) -> Result<String, Generated> {
    let h2_authority = (req.version == http::Version::HTTP_2)
        .then(|| req.uri.authority().map(|a| a.as_str()))
        .flatten();
    if let Some(authority) = authority.or(h2_authority) {
        return normalize_host(authority).ok_or(Generated::BadRequest("bad-host"));
    }
    let mut hosts = req.headers.get_all(header::HOST).iter();
    let host_value = match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => return Err(Generated::BadRequest("duplicate-host")),
        (Some(v), None) => v
            .to_str()
            .map_err(|_| Generated::BadRequest("bad-host"))?
            .to_string(),
        (None, _) => return Err(Generated::BadRequest("missing-host")),
    };
    normalize_host(&host_value).ok_or(Generated::BadRequest("bad-host"))
}

#[cfg(test)]
mod tests;
