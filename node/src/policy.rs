//! RFC 9111 shared-cache decisions over header values: the cache key, whether and how long a
//! response may be stored, its `Vary` variant, and the age an upstream already spent.
//!
//! These are plain functions over pingora's header types so they can be tested without a
//! socket; `proxy` calls them from the matching phases. pingora-cache parses Cache-Control and
//! computes freshness; what it leaves to us (see `notes/pingora-0.9.md` §4) lives here.

use std::time::{Duration, SystemTime};

use http::header;
use pingora_cache::cache_control::CacheControl;
use pingora_cache::filters::resp_cacheable;
use pingora_cache::key::{CacheHashKey, HashBinary};
use pingora_cache::VarianceBuilder;
use pingora_cache::{CacheKey, CacheMeta, CacheMetaDefaults, NoCacheReason, RespCacheable};
use pingora_http::{RequestHeader, ResponseHeader};

use crate::config::SetCookie;

/// No heuristic freshness: a response without explicit freshness (`max-age`, `s-maxage`,
/// `Expires`) is not stored. Stale windows come only from the response's own directives.
const DEFAULTS: CacheMetaDefaults = CacheMetaDefaults::new(|_| None, 0, 0);

/// The primary cache key of a request: the host (lowercased, no port) and the exact path and
/// query. The host is length-prefixed so no two (host, path) pairs frame to the same bytes.
pub fn primary_key(host: &str, path_and_query: &str) -> String {
    format!("{}:{host}{path_and_query}", host.len())
}

/// The pingora cache key for [`primary_key`].
pub fn cache_key(host: &str, path_and_query: &str) -> CacheKey {
    CacheKey::new(primary_key(host, path_and_query), "")
}

/// The identity of a cache key carried in the control context: the hex of its primary hash.
pub fn key_id(primary_key: &str) -> String {
    CacheKey::new(primary_key, "").primary()
}

/// Whether the cache may be used at all for this request method.
pub fn method_is_cacheable(req: &RequestHeader) -> bool {
    matches!(req.method, http::Method::GET | http::Method::HEAD)
}

/// Whether the response's `Content-Length` says its body exceeds `max` bytes.
pub fn declared_length_over(resp: &ResponseHeader, max: u64) -> bool {
    resp.headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|len| len > max)
}

/// Decides whether `resp` (the answer to `req`) may be stored, and with which freshness.
///
/// Beyond pingora's `resp_cacheable` (no-store, private, Authorization rules, max-age,
/// s-maxage, Expires, stale-* windows) this refuses `Vary: *`, partial content, responses that
/// set cookies (never handed to another client from cache, as nginx and Varnish do; with
/// [`SetCookie::Strip`] stored without them instead), and
/// `must-understand` responses whose status code stratus does not implement (RFC 9111
/// §5.2.2.3); and it subtracts the `Age` an upstream cache already spent from the freshness we
/// store (§5.1: the first value counts; one that is not a non-negative integer makes the
/// response stale rather than being trusted).
pub fn response_cacheability(
    req: &RequestHeader,
    resp: &ResponseHeader,
    now: SystemTime,
    set_cookie: SetCookie,
) -> RespCacheable {
    if resp.status == http::StatusCode::PARTIAL_CONTENT {
        return RespCacheable::Uncacheable(NoCacheReason::Custom("partial-content"));
    }
    if vary_names(resp).any(|n| n == "*") {
        return RespCacheable::Uncacheable(NoCacheReason::Custom("vary-star"));
    }
    let (cc, governing) = governing_cache_control(resp);
    if sets_cookie(resp) && set_cookie == SetCookie::Bypass {
        return RespCacheable::Uncacheable(NoCacheReason::Custom("set-cookie"));
    }
    let must_understand = cc.as_ref().is_some_and(|cc| cc.has_key("must-understand"));
    if must_understand && !status_understood(resp.status.as_u16()) {
        return RespCacheable::Uncacheable(NoCacheReason::Custom("must-understand"));
    }
    let authorization = req.headers.contains_key(header::AUTHORIZATION);
    // A targeted field replaces Cache-Control *and* Expires for us (RFC 9213 §2.2); the stored
    // header keeps Expires for the clients, so only the copy we decide on loses it.
    let mut decide_on = resp.clone();
    if governing != "cache-control" {
        decide_on.remove_header(&header::EXPIRES);
    }
    let decided = resp_cacheable(cc.as_ref(), decide_on, authorization, &DEFAULTS);
    let decided = match decided {
        RespCacheable::Cacheable(meta) if governing != "cache-control" => {
            RespCacheable::Cacheable(restore_header(meta, resp))
        }
        other => other,
    };
    match decided {
        RespCacheable::Cacheable(mut meta) => {
            match upstream_age(resp) {
                UpstreamAge::Absent => {}
                UpstreamAge::Valid(age) => apply_upstream_age(&mut meta, age, now),
                // Not to be trusted: count the whole freshness lifetime as spent, so this
                // node and every cache below it (which sees the Age we pass on) holds it stale.
                UpstreamAge::Invalid => {
                    let lifetime = meta.fresh_until().duration_since(now).unwrap_or_default();
                    apply_upstream_age(&mut meta, lifetime, now);
                }
            }
            // The stored header must not carry the upstream's Age: pingora computes Age on
            // every hit from the meta's epoch, which now includes it.
            meta.response_header_mut().remove_header(&header::AGE);
            // Connection-scoped fields of the fill's connection must not be replayed on hits.
            remove_hop_by_hop(meta.response_header_mut(), &[]);
            // Only reached with `SetCookie::Strip` when the response sets cookies.
            for name in SET_COOKIE_FIELDS {
                meta.response_header_mut().remove_header(name);
            }
            RespCacheable::Cacheable(meta)
        }
        uncacheable => uncacheable,
    }
}

/// The fields that set cookies: never part of a stored response.
pub const SET_COOKIE_FIELDS: [&str; 2] = ["set-cookie", "set-cookie2"];

/// Whether `resp` sets cookies.
pub fn sets_cookie(resp: &ResponseHeader) -> bool {
    SET_COOKIE_FIELDS
        .iter()
        .any(|name| resp.headers.contains_key(*name))
}

/// The cookie-setting fields of `resp`, in order.
pub fn cookies_of(resp: &ResponseHeader) -> Vec<(http::HeaderName, http::HeaderValue)> {
    resp.headers
        .iter()
        .filter(|(name, _)| SET_COOKIE_FIELDS.contains(&name.as_str()))
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect()
}

/// Gives a response served from a fill stored without cookies the cookies its own upstream
/// response set (they are this request's, never another client's).
pub fn restore_cookies(
    resp: &mut ResponseHeader,
    cookies: &[(http::HeaderName, http::HeaderValue)],
) {
    for (name, value) in cookies {
        if !resp.headers.get_all(name).iter().any(|v| v == value) {
            // Names and values came from a parsed header: appending them cannot fail.
            let _ = resp.append_header(name.clone(), value.clone());
        }
    }
}

/// Fields that govern a shared cache's handling of a response, most specific first: our own
/// targeted field, then the CDN-targeted one (RFC 9213), then `Surrogate-Control` (Edge
/// Architecture 1.0). Any of them present replaces `Cache-Control` and `Expires` for stratus;
/// clients and browsers keep following `Cache-Control`.
pub const TARGETED_CACHE_CONTROL: [&str; 3] = [
    "stratus-cache-control",
    "cdn-cache-control",
    "surrogate-control",
];

/// Fields only stratus reads, removed before a response reaches a client (`CDN-Cache-Control`
/// passes on: it targets every CDN on the way).
pub const STRATUS_ONLY_FIELDS: [&str; 2] = ["stratus-cache-control", "surrogate-control"];

/// The cache-control directives that govern stratus for `resp`, and the field they came from.
pub fn governing_cache_control(resp: &ResponseHeader) -> (Option<CacheControl>, &'static str) {
    for name in TARGETED_CACHE_CONTROL {
        // One that does not parse is passed over for the next, not taken as "no caching".
        if let Some(cc) = CacheControl::from_resp_headers_named(name, resp) {
            return (Some(cc), name);
        }
    }
    (CacheControl::from_resp_headers(resp), "cache-control")
}

/// `meta` with the response's `Expires` back: only the copy decided on went without it.
fn restore_header(mut meta: CacheMeta, resp: &ResponseHeader) -> CacheMeta {
    for value in resp.headers.get_all(header::EXPIRES) {
        // A value taken from a parsed header: appending it cannot fail.
        let _ = meta
            .response_header_mut()
            .append_header(header::EXPIRES, value.clone());
    }
    meta
}

/// Hop-by-hop fields every proxy treats so (RFC 9110 §7.6.1); the fields a message's
/// `Connection` names are hop-by-hop too. They describe one connection: never stored, and (but
/// for the framing and upgrade fields pingora manages itself) never forwarded.
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
];

/// The further fields `Connection` names, lowercased (no allocation when it names none).
fn connection_named(headers: &http::HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty() && n != "close" && !HOP_BY_HOP.contains(&n.as_str()))
        .collect()
}

/// Removes the hop-by-hop fields of `header`, but those in `keep`.
fn remove_hop_by_hop(header: &mut ResponseHeader, keep: &[&str]) {
    let named = connection_named(&header.headers);
    let fields = HOP_BY_HOP
        .iter()
        .copied()
        .chain(named.iter().map(String::as_str));
    for name in fields.filter(|n| !keep.contains(n)) {
        header.remove_header(name);
    }
}

/// The hop-by-hop fields a proxy removes before passing a response on: all of them except
/// those pingora itself manages on each connection (`Connection`, framing, `Upgrade`).
pub fn strip_hop_by_hop(resp: &mut ResponseHeader) {
    remove_hop_by_hop(resp, &["connection", "transfer-encoding", "upgrade"]);
}

/// Request fields that say where a request came from or what it was before a proxy: a client
/// may send any of them, and an origin that reflects one into its answer would poison the
/// cache for everyone (they are not part of the key). A lower removes them all and writes its
/// own (RFC 7239 `Forwarded` and the `X-Forwarded-*` trio); an upper keeps what its lower,
/// authenticated by the control context, wrote.
pub const FORWARDING_FIELDS: [&str; 9] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-server",
    "x-real-ip",
    "x-original-url",
    "x-rewrite-url",
];

/// The forwarding fields a lower writes for a request from `client` (unknown for its own
/// background refreshes) for `host`: RFC 7239 `Forwarded` and the de-facto trio.
pub fn forwarding_fields(
    client: Option<std::net::IpAddr>,
    host: &str,
) -> [(&'static str, String); 4] {
    // The scheme a client used is not part of the key, so it is not sent on either: what
    // an origin answers may not depend on it (one key, one meaning).
    let proto = "http";
    let (node, xff) = match client {
        Some(std::net::IpAddr::V6(ip)) => (format!("\"[{ip}]\""), ip.to_string()),
        Some(ip) => (ip.to_string(), ip.to_string()),
        None => ("unknown".to_string(), "unknown".to_string()),
    };
    [
        (
            "forwarded",
            format!("for={node};host=\"{host}\";proto={proto}"),
        ),
        ("x-forwarded-for", xff),
        ("x-forwarded-host", host.to_string()),
        ("x-forwarded-proto", proto.to_string()),
    ]
}

/// Gives a received response without `Date` the time it arrived (RFC 9110 §6.6.1: a recipient
/// with a clock records it before caching or forwarding), so a stored copy keeps that time
/// rather than each hit getting a new one. A `Date` it carries is kept as it is.
pub fn ensure_date(resp: &mut ResponseHeader) {
    if !resp.headers.contains_key(header::DATE) {
        // pingora's once-a-second cached HTTP-date: always a valid value.
        let _ = resp.insert_header(
            header::DATE,
            pingora_core::protocols::http::date::get_cached_date(),
        );
    }
}

/// The fields of a 304 that replace the stored response's (RFC 9111 §4.3.4): every field but
/// framing and coding (the stored body's), `Vary` (the stored variance), hop-by-hop fields, our
/// per-hop `Cache-Status` and `Age`, and `Set-Cookie` (never stored), in order.
pub fn freshening_fields(
    not_modified: &ResponseHeader,
) -> Vec<(http::HeaderName, http::HeaderValue)> {
    const KEEP_STORED: [&str; 8] = [
        "content-length",
        "content-range",
        "content-encoding",
        "vary",
        "cache-status",
        "age",
        SET_COOKIE_FIELDS[0],
        SET_COOKIE_FIELDS[1],
    ];
    let named = connection_named(&not_modified.headers);
    not_modified
        .headers
        .iter()
        .filter(|(name, _)| {
            let name = name.as_str();
            !KEEP_STORED.contains(&name)
                && !HOP_BY_HOP.contains(&name)
                && !named.iter().any(|n| n == name)
        })
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect()
}

/// Replaces the fields of a stored `header` with those a 304 carried. Pingora's own merge
/// copies only a fixed list (Cache-Control, Expires, ETag, …); every other field, extensions
/// included, must be updated as well.
pub fn freshen(header: &mut ResponseHeader, fields: &[(http::HeaderName, http::HeaderValue)]) {
    for (name, _) in fields {
        header.remove_header(name);
    }
    for (name, value) in fields {
        // Names and values came from a parsed header: appending them cannot fail.
        let _ = header.append_header(name.clone(), value.clone());
    }
}

/// `http://Host:port/path?q` → (`host`, `/path?q`), with the host normalised as for requests.
pub fn split_url(url: &str) -> Option<(String, String)> {
    let uri: http::Uri = url.parse().ok()?;
    if !matches!(uri.scheme_str(), Some("http") | Some("https")) {
        return None;
    }
    let host = crate::config::normalize_host(uri.authority()?.as_str())?;
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    Some((host, path))
}

/// The paths on `host` a response to `method` on `target` invalidates (RFC 9111 §4.4): for a
/// non-error response to an unsafe method, the target and the same-host URIs in `Location` and
/// `Content-Location` (absolute, or absolute paths; other relative references are ignored).
pub fn invalidated_paths(
    method: &http::Method,
    status: u16,
    host: &str,
    target: &str,
    resp: &ResponseHeader,
) -> Vec<String> {
    // A 1xx is not the response: only a final 2xx/3xx invalidates.
    if method.is_safe() || !(200..400).contains(&status) {
        return Vec::new();
    }
    let mut paths = vec![target.to_string()];
    for name in [header::LOCATION, header::CONTENT_LOCATION] {
        let Some(value) = resp.headers.get(&name).and_then(|v| v.to_str().ok()) else {
            continue;
        };
        let path = if value.starts_with('/') && !value.starts_with("//") {
            http::uri::PathAndQuery::try_from(value)
                .ok()
                .map(|p| p.as_str().to_string())
        } else {
            split_url(value).filter(|(h, _)| h == host).map(|(_, p)| p)
        };
        if let Some(p) = path.filter(|p| !paths.contains(p)) {
            paths.push(p);
        }
    }
    paths
}

/// Status codes whose semantics stratus implements, for `must-understand` (RFC 9111
/// §5.2.2.3): the final codes RFC 9110 defines as cacheable or that stratus caches by explicit
/// freshness, and 304.
pub fn status_understood(status: u16) -> bool {
    matches!(
        status,
        200 | 203 | 204 | 300 | 301 | 302 | 303 | 304 | 307 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// What an upstream's `Age` says (RFC 9111 §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamAge {
    /// No `Age` field.
    Absent,
    /// The first value, a non-negative integer (capped at 2^31 as §1.2.2 allows).
    Valid(Duration),
    /// The first value is not a non-negative integer: the response must not be trusted fresh.
    Invalid,
}

/// The `Age` an upstream reported: of several values (in one field or several) the first.
pub fn upstream_age(resp: &ResponseHeader) -> UpstreamAge {
    const MAX_DELTA: u64 = 1 << 31;
    let Some(field) = resp.headers.get_all(header::AGE).iter().next() else {
        return UpstreamAge::Absent;
    };
    let Ok(text) = field.to_str() else {
        return UpstreamAge::Invalid;
    };
    let first = text.split(',').next().unwrap_or("").trim();
    if first.is_empty() || !first.bytes().all(|b| b.is_ascii_digit()) {
        return UpstreamAge::Invalid;
    }
    // All digits: only overflow can fail, and an overflowing age is past the cap anyway.
    let secs = first.parse::<u64>().unwrap_or(MAX_DELTA).min(MAX_DELTA);
    UpstreamAge::Valid(Duration::from_secs(secs))
}

/// Makes `meta` count `age` as already spent: freshness ends `age` earlier and the age we
/// report downstream starts at `age` (pingora ignores an upstream's Age by default).
pub fn apply_upstream_age(meta: &mut CacheMeta, age: Duration, now: SystemTime) {
    let born = now.checked_sub(age).unwrap_or(SystemTime::UNIX_EPOCH);
    let fresh_until = meta
        .fresh_until()
        .checked_sub(age)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    meta.expire_at(fresh_until);
    meta.set_epoch_override(born);
}

/// Field names listed in the response's `Vary`, lowercased.
pub fn vary_names(resp: &ResponseHeader) -> impl Iterator<Item = String> + '_ {
    resp.headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
}

/// The variant hash of `req` for a stored response's `Vary`, or `None` when it has no `Vary`.
/// Values are compared after trimming; several fields of one name are joined in order.
pub fn variance(meta: &CacheMeta, req: &RequestHeader) -> Option<HashBinary> {
    let mut names: Vec<String> = vary_names(meta.response_header()).collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        return None;
    }
    let mut builder = VarianceBuilder::new();
    for name in names {
        let value: Vec<u8> = req
            .headers
            .get_all(name.as_str())
            .iter()
            .map(|v| v.as_bytes().trim_ascii())
            .collect::<Vec<_>>()
            .join(&b","[..]);
        builder.add_owned_name_value(name, value);
    }
    builder.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The decision with the default cookie rule.
    fn decide(req: &RequestHeader, resp: &ResponseHeader, now: SystemTime) -> RespCacheable {
        response_cacheability(req, resp, now, SetCookie::Bypass)
    }

    fn req() -> RequestHeader {
        RequestHeader::build("GET", b"/", None).expect("static request")
    }

    fn resp(headers: &[(&'static str, &str)]) -> ResponseHeader {
        let mut r = ResponseHeader::build(200, None).expect("static response");
        for (k, v) in headers {
            r.append_header(*k, *v).expect("valid header");
        }
        r
    }

    fn ttl(c: &RespCacheable, now: SystemTime) -> Option<i64> {
        match c {
            RespCacheable::Cacheable(m) => Some(match m.fresh_until().duration_since(now) {
                Ok(d) => d.as_secs_f64().round() as i64,
                Err(e) => -(e.duration().as_secs_f64().round() as i64),
            }),
            RespCacheable::Uncacheable(_) => None,
        }
    }

    #[test]
    fn keys_frame_host_and_path() {
        assert_ne!(primary_key("a.b", "/c"), primary_key("a", ".b/c"));
        assert_eq!(primary_key("example.test", "/x?y"), "12:example.test/x?y");
    }

    #[test]
    fn storable_and_not() {
        let now = SystemTime::now();
        let r = req();
        assert_eq!(
            ttl(
                &decide(&r, &resp(&[("cache-control", "max-age=60")]), now),
                now
            ),
            Some(60)
        );
        assert_eq!(
            ttl(
                &decide(&r, &resp(&[("cache-control", "no-store, max-age=60")]), now),
                now
            ),
            None
        );
        assert_eq!(
            ttl(
                &decide(&r, &resp(&[("cache-control", "private, max-age=60")]), now),
                now
            ),
            None
        );
        assert_eq!(
            ttl(&decide(&r, &resp(&[]), now), now),
            None,
            "no heuristic freshness"
        );
        assert_eq!(
            ttl(
                &decide(
                    &r,
                    &resp(&[("cache-control", "max-age=60"), ("vary", "*")]),
                    now
                ),
                now
            ),
            None
        );
        assert_eq!(
            ttl(
                &decide(
                    &r,
                    &resp(&[("cache-control", "max-age=60"), ("set-cookie", "a=b")]),
                    now
                ),
                now
            ),
            None
        );
        assert_eq!(
            ttl(
                &decide(
                    &r,
                    &resp(&[
                        ("cache-control", "public, s-maxage=60"),
                        ("set-cookie", "a=b")
                    ]),
                    now
                ),
                now
            ),
            None,
            "a Set-Cookie is never handed to another client, public or not"
        );
        // With `set_cookie = "strip"` the response is stored, without its cookies.
        let cookies = resp(&[
            ("cache-control", "max-age=60"),
            ("set-cookie", "a=b"),
            ("set-cookie2", "c=d"),
            ("x-other", "kept"),
        ]);
        match response_cacheability(&r, &cookies, now, SetCookie::Strip) {
            RespCacheable::Cacheable(meta) => {
                let stored = &meta.response_header().headers;
                assert!(!stored.contains_key("set-cookie"));
                assert!(!stored.contains_key("set-cookie2"));
                assert_eq!(
                    stored.get("x-other").map(|v| v.as_bytes()),
                    Some(&b"kept"[..])
                );
            }
            RespCacheable::Uncacheable(reason) => panic!("strip must store: {reason:?}"),
        }
        // must-understand: stored only for a status code whose semantics stratus implements.
        let mu = |status: u16| {
            let mut r = ResponseHeader::build(status, None).expect("status");
            r.append_header("cache-control", "max-age=60, must-understand")
                .expect("header");
            ttl(&decide(&req(), &r, now), now)
        };
        assert_eq!(mu(200), Some(60));
        // Only a final non-error response to an unsafe method invalidates.
        let post = http::Method::POST;
        let created = resp(&[("location", "/new")]);
        assert!(invalidated_paths(&post, 100, "h", "/t", &created).is_empty());
        assert!(invalidated_paths(&post, 500, "h", "/t", &created).is_empty());
        assert!(invalidated_paths(&http::Method::GET, 200, "h", "/t", &created).is_empty());
        assert_eq!(
            invalidated_paths(&post, 201, "h", "/t", &created),
            ["/t", "/new"]
        );
        assert_eq!(mu(299), None);
        assert_eq!(mu(418), None);
    }

    #[test]
    fn authorization_needs_explicit_permission() {
        let now = SystemTime::now();
        let mut r = req();
        r.insert_header("authorization", "Bearer x")
            .expect("header");
        assert_eq!(
            ttl(
                &decide(&r, &resp(&[("cache-control", "max-age=60")]), now),
                now
            ),
            None
        );
        assert_eq!(
            ttl(
                &decide(&r, &resp(&[("cache-control", "s-maxage=60")]), now),
                now
            ),
            Some(60)
        );
    }

    #[test]
    fn upstream_age_reduces_freshness_and_is_not_stored() {
        let now = SystemTime::now();
        let c = decide(
            &req(),
            &resp(&[("cache-control", "max-age=60"), ("age", "45")]),
            now,
        );
        assert_eq!(ttl(&c, now), Some(15));
        let RespCacheable::Cacheable(meta) = c else {
            panic!("cacheable")
        };
        assert!(meta.response_header().headers.get("age").is_none());
        assert!(meta.age() >= Duration::from_secs(45));
        let stale = decide(
            &req(),
            &resp(&[("cache-control", "max-age=10"), ("age", "20")]),
            now,
        );
        assert_eq!(ttl(&stale, now), Some(-10));
        let d = |s| UpstreamAge::Valid(Duration::from_secs(s));
        assert_eq!(upstream_age(&resp(&[("age", "1"), ("age", "2")])), d(1));
        assert_eq!(upstream_age(&resp(&[("age", "3, 4")])), d(3));
        assert_eq!(
            upstream_age(&resp(&[("age", "99999999999999999999")])),
            d(1 << 31)
        );
        for bad in ["-1", "1.5", "5s", "x5", "5;q=1", "", " , 2"] {
            assert_eq!(
                upstream_age(&resp(&[("age", bad)])),
                UpstreamAge::Invalid,
                "{bad:?}"
            );
        }
        assert_eq!(upstream_age(&resp(&[])), UpstreamAge::Absent);
        // An invalid Age makes the response stale, and says so downstream.
        let invalid = decide(
            &req(),
            &resp(&[("cache-control", "max-age=60"), ("age", "1.5")]),
            now,
        );
        assert!(
            ttl(&invalid, now).is_some_and(|t| t <= 0),
            "{:?}",
            ttl(&invalid, now)
        );
        let RespCacheable::Cacheable(meta) = invalid else {
            panic!("still storable, for revalidation")
        };
        assert!(meta.age() >= Duration::from_secs(59));
    }

    #[test]
    fn variance_follows_vary() {
        let now = SystemTime::now();
        let RespCacheable::Cacheable(meta) = decide(
            &req(),
            &resp(&[("cache-control", "max-age=60"), ("vary", "Accept-Encoding")]),
            now,
        ) else {
            panic!("cacheable")
        };
        let mut gzip = req();
        gzip.insert_header("accept-encoding", "gzip")
            .expect("header");
        let mut br = req();
        br.insert_header("accept-encoding", "br").expect("header");
        assert_ne!(variance(&meta, &gzip), variance(&meta, &br));
        assert!(variance(&meta, &gzip).is_some());
        let RespCacheable::Cacheable(plain) =
            decide(&req(), &resp(&[("cache-control", "max-age=60")]), now)
        else {
            panic!("cacheable")
        };
        assert_eq!(variance(&plain, &gzip), None);
    }
}
