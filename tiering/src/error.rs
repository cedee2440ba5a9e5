//! Errors of tier decisions: a ring that cannot be built, a control context that is refused.

use std::net::SocketAddr;

/// Why a ring or view could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TierError {
    /// A member weight outside 1..=1000.
    #[error("{addr}: weight must be 1..=1000, found {weight}")]
    BadWeight {
        /// The member.
        addr: SocketAddr,
        /// Its weight.
        weight: u32,
    },
    /// The same address listed twice.
    #[error("{0} is listed twice")]
    DuplicateMember(SocketAddr),
}

/// Why a `stratus-ctx` value was refused. Every variant means: 403, no origin contact.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    /// No context on a request that needs one.
    #[error("missing control context")]
    Missing,
    /// Longer than the parser accepts.
    #[error("control context too large")]
    TooLarge,
    /// Not `key_id.payload.tag` in base64url, or an unreadable payload.
    #[error("malformed control context")]
    Malformed,
    /// Signed with a key id this node does not hold (a retired or a future secret).
    #[error("control context signed with an unknown key")]
    UnknownKey,
    /// The HMAC does not match: forged, altered, other secret, or another request line.
    #[error("control context signature mismatch")]
    BadSignature,
    /// Issued longer ago than the accepted age.
    #[error("control context expired")]
    Expired,
    /// Issued further in the future than clock skew explains.
    #[error("control context issued in the future")]
    FromFuture,
    /// Already seen: a replay.
    #[error("control context replayed")]
    Replayed,
    /// More hops than a fleet has tiers: a loop.
    #[error("too many hops")]
    TooManyHops,
    /// Addressed to another member.
    #[error("control context addressed to another member")]
    WrongRecipient,
    /// Issued before this node started: a replay across a restart.
    #[error("control context issued before this node started")]
    BeforeStart,
    /// The replay cache is full; refusing is the only safe answer (fail closed).
    #[error("replay cache full")]
    ReplayCacheFull,
}

impl ContextError {
    /// A short token for `Cache-Status` `detail` and metrics.
    pub fn detail(self) -> &'static str {
        match self {
            ContextError::Missing => "missing-context",
            ContextError::TooLarge => "context-too-large",
            ContextError::Malformed => "malformed-context",
            ContextError::BadSignature => "bad-context-signature",
            ContextError::UnknownKey => "unknown-context-key",
            ContextError::Expired => "expired-context",
            ContextError::FromFuture => "future-context",
            ContextError::Replayed => "replayed-context",
            ContextError::TooManyHops => "loop",
            ContextError::WrongRecipient => "misdirected-context",
            ContextError::BeforeStart => "context-before-start",
            ContextError::ReplayCacheFull => "replay-cache-full",
        }
    }
}
