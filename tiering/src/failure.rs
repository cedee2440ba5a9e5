//! Who failed, and what follows from it: the one decision for every upstream failure.
//!
//! The lesson stratus exists for is that control state changes only for reasons the fleet
//! controls. Member health is control state, so a failure counts against an upper member only
//! when that member caused it: a client that aborts, stalls its body or builds a loop, and an
//! origin that is slow or broken, never do. [`decide`] is a plain function over what the proxy
//! observed; the proxy phases call it and do what it says.

use crate::context::Blame;
use crate::view::Outcome;

/// Where an attempt went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HopKind {
    /// An upper-tier member.
    Upper,
    /// The origin itself.
    Origin,
}

/// How far the attempt had got when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Opening the connection: nothing was sent.
    Connect,
    /// The client's request body was still being relayed upstream.
    RelayRequestBody,
    /// The whole request was sent; waiting for response headers.
    AwaitHeaders,
    /// Response headers arrived; reading the body.
    ReadBody,
}

/// What was observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Symptom {
    /// Connect refused, unreachable, or handshake failure.
    ConnectFailed,
    /// A connect, read or write timeout on the upstream side.
    TimedOut,
    /// The upstream connection was reset or closed early.
    Reset,
    /// The upstream sent something that is not HTTP.
    InvalidResponse,
    /// The client went away or failed (its read or write side errored).
    ClientGone,
    /// This node failed on its own (an internal error).
    Internal,
    /// An upper answered with an error carrying a verified mark that names who failed.
    Marked(Blame),
}

/// One failed upstream attempt, as the proxy saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Failure {
    /// Where the attempt went.
    pub hop: HopKind,
    /// How far it got.
    pub stage: Stage,
    /// What happened.
    pub symptom: Symptom,
    /// Whether response headers already reached the client.
    pub headers_sent: bool,
    /// Whether the attempt used a pooled keep-alive connection.
    pub reused_connection: bool,
    /// Whether the request may be sent again (idempotent, body still buffered).
    pub replayable: bool,
    /// Whether another hop is left to try.
    pub hops_left: bool,
}

/// The party a failure is attributed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Party {
    /// The client: it went away, stalled its body, or sent a request that cannot be served.
    Client,
    /// This node (an internal error, or a pooled connection that went stale while idle).
    Node,
    /// The upper member the attempt went to.
    Member,
    /// The origin (directly, or as its upper member reported with a verified mark).
    Origin,
    /// Cannot be told apart from here (a body cut short: the member or its origin). Blames
    /// nobody; active probes still find a dead member.
    Undetermined,
}

/// What follows from a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Verdict {
    /// Who caused it.
    pub blame: Party,
    /// What the member's health hears: `Some` only when the member itself failed.
    pub health: Option<Outcome>,
    /// Whether to try the next hop.
    pub retry: bool,
}

/// Who caused `f`.
pub fn blame(f: &Failure) -> Party {
    use HopKind::{Origin, Upper};
    use Stage::{AwaitHeaders, Connect, ReadBody, RelayRequestBody};
    match (f.symptom, f.hop, f.stage) {
        (Symptom::ClientGone, _, _) => Party::Client,
        (Symptom::Internal, _, _) => Party::Node,
        (Symptom::Marked(Blame::Member), Upper, _) => Party::Member,
        // A mark can only come from an upper; anything else claiming one is the origin's.
        (Symptom::Marked(Blame::Member), Origin, _) => Party::Origin,
        (Symptom::Marked(Blame::Origin), _, _) => Party::Origin,
        (Symptom::Marked(Blame::Request), _, _) => Party::Client,
        (_, Upper, Connect) => Party::Member,
        (_, Origin, Connect) => Party::Origin,
        // Waiting on a client that stopped sending its body looks like a silent upstream.
        (Symptom::TimedOut, _, RelayRequestBody) => Party::Client,
        (_, Upper, RelayRequestBody) => Party::Undetermined,
        (_, Origin, RelayRequestBody) => Party::Origin,
        // A pooled keep-alive connection the peer closed while it idled: nobody's failure.
        (Symptom::Reset, _, AwaitHeaders) if f.reused_connection => Party::Node,
        (_, Upper, AwaitHeaders) => Party::Member,
        (_, Origin, AwaitHeaders) => Party::Origin,
        (_, Upper, ReadBody) => Party::Undetermined,
        (_, Origin, ReadBody) => Party::Origin,
    }
}

/// The one decision for an upstream failure: who is blamed, what health hears, whether to
/// try the next hop.
pub fn decide(f: &Failure) -> Verdict {
    let blame = blame(f);
    let outcome = match f.symptom {
        Symptom::ConnectFailed => Outcome::ConnectFailed,
        Symptom::TimedOut => Outcome::TimedOut,
        Symptom::Reset => Outcome::Reset,
        _ => Outcome::MemberError,
    };
    let health = (blame == Party::Member && f.hop == HopKind::Upper).then_some(outcome);
    // Failover only before anything reached the client, only past a failure of the hop
    // itself (a stale pooled connection included), and only with a request we can send again.
    let hop_failed = matches!(blame, Party::Member | Party::Node) && f.symptom != Symptom::Internal;
    let resendable = f.stage == Stage::Connect || f.replayable;
    let retry =
        hop_failed && !f.headers_sent && f.hops_left && resendable && f.stage != Stage::ReadBody;
    Verdict {
        blame,
        health,
        retry,
    }
}

#[cfg(test)]
mod tests;
