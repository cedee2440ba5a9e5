//! The control context: what a lower node tells an upper node about a request, as one typed,
//! immutable, authenticated value carried in the `stratus-ctx` header.
//!
//! Fields are private and have no setters: code that needs a different context builds a new
//! value ([`ControlContext::new`]). The wire form is `base64url(payload) "." base64url(tag)`,
//! where `tag = HMAC-SHA256(secret, "stratus-ctx/1\n" method " " target "\n" payload)`, so the
//! tag binds the fields to the request line they travel with. Decoding checks the size first,
//! then the tag (constant-time, by the `hmac` crate) and only then parses the payload, so no
//! unauthenticated bytes reach the JSON parser. Age is bounded against replay; exact replays
//! inside that window are caught by the upper node's replay cache (it keys on the request id).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::error::ContextError;

/// Longest `stratus-ctx` value accepted; real ones are about 300 bytes.
pub const MAX_ENCODED_LEN: usize = 1024;
/// Oldest context accepted (INTERFACE.md: rejected when older than 10 s).
pub const MAX_AGE: Duration = Duration::from_secs(10);
/// How far in the future an issue time may be, for clock skew between nodes.
pub const MAX_SKEW: Duration = Duration::from_secs(2);
/// Hops a request may take between stratus nodes: lower → upper is one.
pub const MAX_HOPS: u8 = 2;

const DOMAIN: &[u8] = b"stratus-ctx/1\n";
const TAG_LEN: usize = 32;
const MAX_FIELD: usize = 253;

/// The fleet secret: at least 32 bytes, never printed.
#[derive(Clone)]
pub struct FleetSecret(Vec<u8>);

impl FleetSecret {
    /// Wraps the secret bytes (length is validated by config).
    pub fn new(bytes: Vec<u8>) -> FleetSecret {
        FleetSecret(bytes)
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC accepts keys of any length; this cannot fail.
        <Hmac<Sha256> as Mac>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!())
    }
}

impl std::fmt::Debug for FleetSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FleetSecret(..)")
    }
}

/// The request line a context is bound to: method and request target (path and query).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLine<'a> {
    /// e.g. `GET`.
    pub method: &'a str,
    /// e.g. `/a/b?c=d`.
    pub target: &'a str,
}

/// The control context of one request between tiers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlContext {
    #[serde(rename = "o")]
    origin_host: String,
    #[serde(rename = "k")]
    cache_key: String,
    #[serde(rename = "h")]
    hops: u8,
    #[serde(rename = "r")]
    request_id: String,
    #[serde(rename = "s")]
    sender: String,
    #[serde(rename = "t")]
    issued_at_ms: u64,
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl ControlContext {
    /// A context for a request a lower node forwards for the first time (one hop).
    pub fn new(
        origin_host: impl Into<String>,
        cache_key: impl Into<String>,
        request_id: impl Into<String>,
        sender: impl Into<String>,
        issued_at: SystemTime,
    ) -> ControlContext {
        ControlContext {
            origin_host: origin_host.into(),
            cache_key: cache_key.into(),
            hops: 1,
            request_id: request_id.into(),
            sender: sender.into(),
            issued_at_ms: millis(issued_at),
        }
    }

    /// The host whose `[[origin]]` the upper node must use.
    pub fn origin_host(&self) -> &str {
        &self.origin_host
    }

    /// The cache key's identity (hex of its primary hash).
    pub fn cache_key(&self) -> &str {
        &self.cache_key
    }

    /// How many stratus hops this request has taken.
    pub fn hops(&self) -> u8 {
        self.hops
    }

    /// The request id the lower node assigned.
    pub fn request_id(&self) -> &str {
        &self.request_id
    }

    /// The `node.name` of the sender.
    pub fn sender(&self) -> &str {
        &self.sender
    }

    /// When the sender issued it.
    pub fn issued_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.issued_at_ms)
    }

    fn tag(secret: &FleetSecret, line: RequestLine<'_>, payload: &[u8]) -> Hmac<Sha256> {
        let mut mac = secret.mac();
        mac.update(DOMAIN);
        mac.update(line.method.as_bytes());
        mac.update(b" ");
        mac.update(line.target.as_bytes());
        mac.update(b"\n");
        mac.update(payload);
        mac
    }

    /// The `stratus-ctx` header value binding this context to `line`.
    pub fn encode(&self, secret: &FleetSecret, line: RequestLine<'_>) -> String {
        // Serializing plain strings and integers cannot fail.
        let payload = serde_json::to_vec(self).unwrap_or_default();
        let tag = Self::tag(secret, line, &payload).finalize().into_bytes();
        format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&payload),
            URL_SAFE_NO_PAD.encode(tag)
        )
    }

    /// Verifies and reads a `stratus-ctx` value received with `line` at time `now`.
    pub fn decode(
        value: &str,
        secret: &FleetSecret,
        line: RequestLine<'_>,
        now: SystemTime,
    ) -> Result<ControlContext, ContextError> {
        if value.len() > MAX_ENCODED_LEN {
            return Err(ContextError::TooLarge);
        }
        let (payload_b64, tag_b64) = value.split_once('.').ok_or(ContextError::Malformed)?;
        let payload = URL_SAFE_NO_PAD
            .decode(payload_b64)
            .map_err(|_| ContextError::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag_b64)
            .map_err(|_| ContextError::Malformed)?;
        if tag.len() != TAG_LEN {
            return Err(ContextError::Malformed);
        }
        Self::tag(secret, line, &payload)
            .verify_slice(&tag)
            .map_err(|_| ContextError::BadSignature)?;
        let ctx: ControlContext =
            serde_json::from_slice(&payload).map_err(|_| ContextError::Malformed)?;
        let fields = [
            &ctx.origin_host,
            &ctx.cache_key,
            &ctx.request_id,
            &ctx.sender,
        ];
        if fields.iter().any(|f| f.is_empty() || f.len() > MAX_FIELD) {
            return Err(ContextError::Malformed);
        }
        if ctx.hops == 0 || ctx.hops > MAX_HOPS {
            return Err(ContextError::TooManyHops);
        }
        let now_ms = millis(now);
        let max_age = u64::try_from(MAX_AGE.as_millis()).unwrap_or(u64::MAX);
        let max_skew = u64::try_from(MAX_SKEW.as_millis()).unwrap_or(u64::MAX);
        if ctx.issued_at_ms > now_ms.saturating_add(max_skew) {
            return Err(ContextError::FromFuture);
        }
        if now_ms.saturating_sub(ctx.issued_at_ms) > max_age {
            return Err(ContextError::Expired);
        }
        Ok(ctx)
    }
}

#[cfg(test)]
mod tests;
