//! This node's `Cache-Status` entry (RFC 9211), built from what the cache did.
//!
//! Entries from caches nearer the origin come first; ours is appended last. The vocabulary is
//! the RFC's: `hit`, `fwd` (`bypass`, `method`, `uri-miss`, `vary-miss`, `stale`, …),
//! `fwd-status`, `ttl`, `stored`, `collapsed`, `key`, `detail`.

use std::fmt::Write;

use pingora_cache::{CachePhase, NoCacheReason};

use crate::errors::Generated;

/// What the cache did for one response, gathered by the proxy when the response leaves.
#[derive(Debug, Clone, Copy)]
pub struct CacheOutcome<'a> {
    /// pingora's cache phase at response time.
    pub phase: CachePhase,
    /// Whether the request method could use the cache at all.
    pub method_cacheable: bool,
    /// The request waited on another request's fill.
    pub collapsed: bool,
    /// Seconds of freshness left (negative when stale), when an object is involved.
    pub ttl: Option<i64>,
    /// Status the upstream answered, when this node forwarded.
    pub fwd_status: Option<u16>,
    /// A miss for a new variant of a URL that has others stored (`Vary`).
    pub vary_miss: bool,
    /// The cache key's primary string, when the request used the cache: what one key stands
    /// for, so an operator can tell which requests share an object.
    pub key: Option<&'a str>,
}

/// The entry for a proxied or cached response.
pub fn entry(node: &str, o: &CacheOutcome) -> String {
    let mut s = String::from(node);
    let stored = matches!(
        o.phase,
        CachePhase::Miss | CachePhase::Expired | CachePhase::Revalidated
    );
    match o.phase {
        CachePhase::Hit if o.collapsed => s.push_str("; fwd=uri-miss; collapsed"),
        CachePhase::Hit => s.push_str("; hit"),
        CachePhase::StaleUpdating => s.push_str("; hit"),
        CachePhase::Stale => s.push_str("; fwd=stale"),
        CachePhase::Miss if o.vary_miss => s.push_str("; fwd=vary-miss"),
        CachePhase::Miss => s.push_str("; fwd=uri-miss"),
        CachePhase::Expired | CachePhase::Revalidated | CachePhase::RevalidatedNoCache(_) => {
            s.push_str("; fwd=stale")
        }
        CachePhase::Bypass => s.push_str("; fwd=bypass"),
        CachePhase::Disabled(_) if !o.method_cacheable => s.push_str("; fwd=method"),
        CachePhase::Disabled(reason) => s.push_str(match reason {
            NoCacheReason::Deferred | NoCacheReason::PredictedResponseTooLarge => "; fwd=bypass",
            _ => "; fwd=uri-miss",
        }),
        CachePhase::Uninit | CachePhase::CacheKey => s.push_str("; fwd=request"),
    }
    if let Some(code) = o.fwd_status {
        if !matches!(o.phase, CachePhase::Hit | CachePhase::StaleUpdating) {
            let _ = write!(s, "; fwd-status={code}");
        }
    }
    if let Some(ttl) = o.ttl {
        if matches!(
            o.phase,
            CachePhase::Hit | CachePhase::StaleUpdating | CachePhase::Stale
        ) || stored
        {
            let _ = write!(s, "; ttl={ttl}");
        }
    }
    if stored {
        s.push_str("; stored");
    }
    if let Some(key) = o.key {
        s.push_str("; key=");
        push_sf_string(&mut s, key);
    }
    match o.phase {
        CachePhase::StaleUpdating => s.push_str("; detail=stale-while-revalidate"),
        CachePhase::Stale => s.push_str("; detail=stale-if-error"),
        CachePhase::Disabled(reason) if o.method_cacheable => {
            if let Some(d) = no_cache_detail(reason) {
                let _ = write!(s, "; detail={d}");
            }
        }
        _ => {}
    }
    s
}

/// Appends `value` as a structured-field string (RFC 8941 §3.3.3) that never needs escaping
/// and never confuses a naive reader of the field: `"`, `\\`, `%`, the `,` and `;` that
/// separate entries and parameters, and any byte a string may not hold are percent-encoded.
fn push_sf_string(s: &mut String, value: &str) {
    s.push('"');
    for b in value.bytes() {
        match b {
            0x21..=0x7e if !matches!(b, b'"' | b'\\' | b'%' | b',' | b';') => s.push(char::from(b)),
            _ => {
                let _ = write!(s, "%{b:02X}");
            }
        }
    }
    s.push('"');
}

/// Whether the response body came from this node's cache (so upstream entries stored with the
/// object describe its fill, not this response).
pub fn served_from_cache(phase: CachePhase) -> bool {
    matches!(
        phase,
        CachePhase::Hit
            | CachePhase::StaleUpdating
            | CachePhase::Stale
            | CachePhase::Revalidated
            | CachePhase::RevalidatedNoCache(_)
    )
}

fn no_cache_detail(reason: NoCacheReason) -> Option<&'static str> {
    Some(match reason {
        NoCacheReason::OriginNotCache => "uncacheable",
        NoCacheReason::ResponseTooLarge | NoCacheReason::PredictedResponseTooLarge => "too-large",
        NoCacheReason::UpstreamError => "upstream-error",
        NoCacheReason::CacheLockTimeout => "lock-timeout",
        NoCacheReason::CacheLockGiveUp => "uncacheable",
        NoCacheReason::Custom(c) => c,
        NoCacheReason::NeverEnabled => return None,
        _ => "not-stored",
    })
}

/// The entry for a response stratus generated itself.
pub fn generated(node: &str, g: Generated) -> String {
    let fwd = match g {
        Generated::BadGateway(_) | Generated::GatewayTimeout(_) => "uri-miss",
        _ => "request",
    };
    format!("{node}; fwd={fwd}; detail={}", g.detail())
}

/// Joins upstream entries (nearest the origin first) with ours, as one field value.
pub fn append(existing: Option<&str>, ours: &str) -> String {
    match existing.map(str::trim).filter(|e| !e.is_empty()) {
        Some(e) => format!("{e}, {ours}"),
        None => ours.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(phase: CachePhase) -> CacheOutcome<'static> {
        CacheOutcome {
            phase,
            method_cacheable: true,
            collapsed: false,
            ttl: Some(297),
            fwd_status: Some(200),
            vary_miss: false,
            key: None,
        }
    }

    #[test]
    fn entries_read_like_the_rfc() {
        assert_eq!(entry("edge-2", &o(CachePhase::Hit)), "edge-2; hit; ttl=297");
        assert_eq!(
            entry("edge-2", &o(CachePhase::Miss)),
            "edge-2; fwd=uri-miss; fwd-status=200; ttl=297; stored"
        );
        let mut variant = o(CachePhase::Miss);
        variant.vary_miss = true;
        assert_eq!(
            entry("e", &variant),
            "e; fwd=vary-miss; fwd-status=200; ttl=297; stored"
        );
        let mut keyed = o(CachePhase::Hit);
        keyed.key = Some("12:example.test/a\"b\\c\u{e9};d,e%f g");
        assert_eq!(
            entry("e", &keyed),
            r#"e; hit; ttl=297; key="12:example.test/a%22b%5Cc%C3%A9%3Bd%2Ce%25f%20g""#
        );
        let mut collapsed = o(CachePhase::Hit);
        collapsed.collapsed = true;
        assert_eq!(
            entry("e", &collapsed),
            "e; fwd=uri-miss; collapsed; ttl=297"
        );
        let mut post = o(CachePhase::Disabled(NoCacheReason::NeverEnabled));
        post.method_cacheable = false;
        post.ttl = None;
        assert_eq!(entry("e", &post), "e; fwd=method; fwd-status=200");
        let mut nostore = o(CachePhase::Disabled(NoCacheReason::OriginNotCache));
        nostore.ttl = None;
        assert_eq!(
            entry("e", &nostore),
            "e; fwd=uri-miss; fwd-status=200; detail=uncacheable"
        );
        assert_eq!(
            generated("e", Generated::UnknownHost),
            "e; fwd=request; detail=unknown-host"
        );
        assert_eq!(append(Some("up-1; hit"), "e; hit"), "up-1; hit, e; hit");
        assert_eq!(append(None, "e; hit"), "e; hit");
    }
}
