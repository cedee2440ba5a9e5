//! The control context: what a lower node tells an upper node about a request, as one typed,
//! immutable, authenticated value carried in the `stratus-ctx` header.
//!
//! Two parts with two lifetimes. A [`RequestIdentity`] (origin host, cache key id, hop count,
//! request id, sender) is frozen once per request. Each upstream attempt — a failover, a
//! background refresh, a fetch after a lock wait — [`issues`](RequestIdentity::issue) a fresh
//! [`ControlContext`] from it: a new issue time and nonce, addressed to one recipient member, so
//! another upper refuses it and a replay is caught by the nonce.
//!
//! Fields are private and have no setters: code that needs a different context builds a new
//! value. The wire form is `key_id "." base64url(payload) "." base64url(tag)`, where
//! `tag = HMAC-SHA256(secret, "stratus-ctx/3\n" key_id "\n" method " " target "\n" payload)`,
//! so the tag binds the fields to the request line they travel with. Decoding checks the size
//! first, then the key id against the node's [`Keyring`], then the tag (constant-time, by the
//! `hmac` crate) and only then parses the payload, so no unauthenticated bytes reach the JSON
//! parser.
//!
//! Secrets rotate without downtime: a node signs with one secret and accepts every secret of
//! its keyring, each named by a key id derived from the secret itself (so two nodes can never
//! disagree about what an id means). A fleet first adds the new secret as accepted everywhere,
//! then signs with it everywhere, then drops the old one.
//!
//! An upper node answers errors it generated itself with a [`GeneratedMark`] bound to the
//! context's nonce: the lower learns who failed (the member, its origin, or the request), and
//! an origin — which never sees the context — cannot forge one.

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

const DOMAIN: &[u8] = b"stratus-ctx/3\n";
const KEY_ID_DOMAIN: &[u8] = b"stratus-key-id/1\n";
/// Length of a key id: hex of the first 8 bytes of a SHA-256 over the secret.
pub const KEY_ID_LEN: usize = 16;
const MARK_DOMAIN: &[u8] = b"stratus-generated/1\n";
const TAG_LEN: usize = 32;
const MAX_FIELD: usize = 253;

/// A fleet secret: at least 32 bytes, never printed; named by a key id derived from it.
#[derive(Clone)]
pub struct FleetSecret {
    bytes: Vec<u8>,
    id: String,
}

impl FleetSecret {
    /// Wraps the secret bytes (length is validated by config).
    pub fn new(bytes: Vec<u8>) -> FleetSecret {
        use sha2::Digest;
        let digest = Sha256::new()
            .chain_update(KEY_ID_DOMAIN)
            .chain_update(&bytes)
            .finalize();
        let id = hex_lower(&digest[..KEY_ID_LEN / 2]);
        FleetSecret { bytes, id }
    }

    /// The key id that names this secret on the wire: public, and the same on every node.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn mac(&self) -> Hmac<Sha256> {
        // HMAC accepts keys of any length; this cannot fail.
        <Hmac<Sha256> as Mac>::new_from_slice(&self.bytes).unwrap_or_else(|_| unreachable!())
    }
}

impl PartialEq for FleetSecret {
    fn eq(&self, other: &FleetSecret) -> bool {
        self.id == other.id && self.bytes == other.bytes
    }
}

impl Eq for FleetSecret {}

impl std::fmt::Debug for FleetSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FleetSecret({})", self.id)
    }
}

fn hex_lower(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The secrets a node holds: the first signs what it sends, every one is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keyring {
    keys: Vec<FleetSecret>,
}

impl Keyring {
    /// A keyring signing with `signing` and also accepting `accepted` (duplicates dropped).
    pub fn new(signing: FleetSecret, accepted: impl IntoIterator<Item = FleetSecret>) -> Keyring {
        let mut keys = vec![signing];
        for k in accepted {
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        Keyring { keys }
    }

    /// The secret this node signs with.
    pub fn signing(&self) -> &FleetSecret {
        &self.keys[0]
    }

    /// The accepted secret named `id`.
    pub fn find(&self, id: &str) -> Option<&FleetSecret> {
        self.keys.iter().find(|k| k.id == id)
    }

    /// Every accepted key id, the signing one first.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.id.as_str())
    }
}

impl From<FleetSecret> for Keyring {
    fn from(secret: FleetSecret) -> Keyring {
        Keyring::new(secret, [])
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

/// What a request is, independent of any attempt: frozen once when the request is admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestIdentity {
    origin_host: String,
    cache_key: String,
    hops: u8,
    request_id: String,
    sender: String,
}

impl RequestIdentity {
    /// The identity of a request a lower node forwards for the first time (one hop).
    pub fn new(
        origin_host: impl Into<String>,
        cache_key: impl Into<String>,
        request_id: impl Into<String>,
        sender: impl Into<String>,
    ) -> RequestIdentity {
        RequestIdentity {
            origin_host: origin_host.into(),
            cache_key: cache_key.into(),
            hops: 1,
            request_id: request_id.into(),
            sender: sender.into(),
        }
    }

    /// A fresh context for one attempt to `recipient` (the member's name or address).
    pub fn issue(&self, recipient: &str, nonce: u128, now: SystemTime) -> ControlContext {
        ControlContext {
            origin_host: self.origin_host.clone(),
            cache_key: self.cache_key.clone(),
            hops: self.hops,
            request_id: self.request_id.clone(),
            sender: self.sender.clone(),
            issued_at_ms: millis(now),
            nonce: format!("{nonce:032x}"),
            recipient: recipient.to_string(),
            key_id: String::new(),
        }
    }
}

/// The control context of one attempt between tiers.
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
    #[serde(rename = "n")]
    nonce: String,
    #[serde(rename = "to")]
    recipient: String,
    /// The key id a received context was verified with (not part of the payload: the wire
    /// form carries it in front), so a mark answers with the same secret.
    #[serde(skip)]
    key_id: String,
}

/// What an upper node checks a received context against, besides the secret.
#[derive(Debug, Clone, Copy)]
pub struct Acceptor<'a> {
    /// The secrets accepted.
    pub keys: &'a Keyring,
    /// Names this node answers to as a recipient (its `node.name` and its listen address).
    pub identities: &'a [String],
    /// When this node started: contexts issued earlier are refused, so a replay does not
    /// survive a restart (which empties the replay cache).
    pub not_before: SystemTime,
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl ControlContext {
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

    /// This attempt's nonce: what the replay cache remembers.
    pub fn nonce(&self) -> &str {
        &self.nonce
    }

    /// The one member this context is addressed to.
    pub fn recipient(&self) -> &str {
        &self.recipient
    }

    /// When the sender issued it.
    pub fn issued_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.issued_at_ms)
    }

    /// The id of the key a received context was verified with (empty on one issued here).
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    fn tag(secret: &FleetSecret, line: RequestLine<'_>, payload: &[u8]) -> Hmac<Sha256> {
        let mut mac = secret.mac();
        mac.update(DOMAIN);
        mac.update(secret.id.as_bytes());
        mac.update(b"\n");
        mac.update(line.method.as_bytes());
        mac.update(b" ");
        mac.update(line.target.as_bytes());
        mac.update(b"\n");
        mac.update(payload);
        mac
    }

    /// The `stratus-ctx` header value binding this context to `line`, signed with `secret`.
    pub fn encode(&self, secret: &FleetSecret, line: RequestLine<'_>) -> String {
        // Serializing plain strings and integers cannot fail.
        let payload = serde_json::to_vec(self).unwrap_or_default();
        let tag = Self::tag(secret, line, &payload).finalize().into_bytes();
        format!(
            "{}.{}.{}",
            secret.id,
            URL_SAFE_NO_PAD.encode(&payload),
            URL_SAFE_NO_PAD.encode(tag)
        )
    }

    /// Checks the tag and the fields of a `stratus-ctx` value, but neither its time nor its
    /// recipient: for a refresh this node spawned itself from a request it already accepted.
    pub fn verify(
        value: &str,
        keys: &Keyring,
        line: RequestLine<'_>,
    ) -> Result<ControlContext, ContextError> {
        if value.len() > MAX_ENCODED_LEN {
            return Err(ContextError::TooLarge);
        }
        let (key_id, rest) = value.split_once('.').ok_or(ContextError::Malformed)?;
        if key_id.len() != KEY_ID_LEN {
            return Err(ContextError::Malformed);
        }
        let secret = keys.find(key_id).ok_or(ContextError::UnknownKey)?;
        let (payload_b64, tag_b64) = rest.split_once('.').ok_or(ContextError::Malformed)?;
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
        let mut ctx: ControlContext =
            serde_json::from_slice(&payload).map_err(|_| ContextError::Malformed)?;
        ctx.key_id = secret.id.clone();
        let fields = [
            &ctx.origin_host,
            &ctx.cache_key,
            &ctx.request_id,
            &ctx.sender,
            &ctx.nonce,
            &ctx.recipient,
        ];
        if fields.iter().any(|f| f.is_empty() || f.len() > MAX_FIELD) {
            return Err(ContextError::Malformed);
        }
        if ctx.hops == 0 || ctx.hops > MAX_HOPS {
            return Err(ContextError::TooManyHops);
        }
        Ok(ctx)
    }

    /// Verifies and reads a `stratus-ctx` value received with `line` at time `now`: the tag,
    /// the recipient, the issue time against this node's start, and the age window.
    pub fn decode(
        value: &str,
        acceptor: &Acceptor<'_>,
        line: RequestLine<'_>,
        now: SystemTime,
    ) -> Result<ControlContext, ContextError> {
        let ctx = Self::verify(value, acceptor.keys, line)?;
        if !acceptor.identities.contains(&ctx.recipient) {
            return Err(ContextError::WrongRecipient);
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
        if ctx.issued_at_ms < millis(acceptor.not_before) {
            return Err(ContextError::BeforeStart);
        }
        Ok(ctx)
    }

    fn mark_tag(&self, secret: &FleetSecret, blame: Blame, detail: &str) -> Hmac<Sha256> {
        let mut mac = secret.mac();
        mac.update(MARK_DOMAIN);
        mac.update(self.nonce.as_bytes());
        mac.update(b"\n");
        mac.update(blame.as_str().as_bytes());
        mac.update(b" ");
        mac.update(detail.as_bytes());
        mac
    }

    /// The `stratus-generated` value an upper puts on an error it generated while serving
    /// this context: who failed, why, and a tag only a holder of the secret who saw this
    /// context's nonce can make. Signed with the key the context came with.
    pub fn mark(&self, keys: &Keyring, blame: Blame, detail: &str) -> String {
        let secret = keys.find(&self.key_id).unwrap_or(keys.signing());
        let tag = self.mark_tag(secret, blame, detail).finalize().into_bytes();
        format!(
            "{}; {}; {}",
            blame.as_str(),
            detail,
            URL_SAFE_NO_PAD.encode(tag)
        )
    }

    /// Reads a `stratus-generated` value received in answer to this context. `None` when it
    /// is not a valid mark for this context (an origin's header, a forgery, another nonce).
    pub fn read_mark(&self, keys: &Keyring, value: &str) -> Option<GeneratedMark> {
        let mut parts = value.splitn(3, ';').map(str::trim);
        let blame = Blame::parse(parts.next()?)?;
        let detail = parts.next()?;
        let tag = URL_SAFE_NO_PAD.decode(parts.next()?).ok()?;
        if detail.len() > MAX_FIELD || tag.len() != TAG_LEN {
            return None;
        }
        // Any accepted key: a reload may have rotated the signing key since this was sent.
        keys.keys
            .iter()
            .find(|k| self.mark_tag(k, blame, detail).verify_slice(&tag).is_ok())?;
        Some(GeneratedMark {
            blame,
            detail: detail.to_string(),
        })
    }
}

/// Who an upper node says caused an error it generated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Blame {
    /// The member itself: it refused the context, lacks the origin, or broke.
    Member,
    /// The origin behind the member: unreachable, timed out, or answered nonsense.
    Origin,
    /// The request: a loop or a malformed request, whoever forwards it.
    Request,
}

impl Blame {
    /// Every variant, for exhaustive tests.
    pub const ALL: [Blame; 3] = [Blame::Member, Blame::Origin, Blame::Request];

    /// The wire token.
    pub fn as_str(self) -> &'static str {
        match self {
            Blame::Member => "member",
            Blame::Origin => "origin",
            Blame::Request => "request",
        }
    }

    fn parse(s: &str) -> Option<Blame> {
        Blame::ALL.into_iter().find(|b| b.as_str() == s)
    }
}

/// A verified `stratus-generated` mark.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedMark {
    /// Who failed.
    pub blame: Blame,
    /// The upper's `Cache-Status` detail, e.g. `read-timeout`.
    pub detail: String,
}

#[cfg(test)]
mod tests;
