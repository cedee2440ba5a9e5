//! Membership and health in one immutable snapshot, and the route a miss takes through it.
//!
//! Readers load one [`TierView`] and decide from it alone, so a route can never mix the
//! membership of one moment with the health of another. The single writer is [`HealthBook`]:
//! it folds outcomes and probe results (time passed in) and hands out the next view.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::ring::{Member, MemberId, Ring};

/// A member's health as routing sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Takes traffic. Counts consecutive failures toward the threshold.
    Up {
        /// Consecutive failures so far.
        failures: u32,
    },
    /// Takes no traffic until enough readiness probes succeed in a row.
    Down {
        /// When it was marked down.
        since: Instant,
        /// Why.
        reason: DownReason,
        /// Consecutive successful probes since (hysteresis: `rise` bring it back).
        successes: u32,
    },
}

impl Health {
    /// Whether routing may use the member.
    pub fn is_up(self) -> bool {
        matches!(self, Health::Up { .. })
    }
}

/// Why a member is down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownReason {
    /// Requests failed `failure_threshold` times in a row; the last one like this.
    Requests(Outcome),
    /// The last readiness probe failed like this.
    Probe(ProbeFailure),
}

impl std::fmt::Display for DownReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DownReason::Requests(o) => write!(f, "requests failed: {}", o.label()),
            DownReason::Probe(p) => write!(f, "probe failed: {p}"),
        }
    }
}

/// How a readiness probe failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeFailure {
    /// No connection.
    Unreachable,
    /// No answer within the probe timeout.
    TimedOut,
    /// An answer other than 200, e.g. 403 when the member refuses our signed context (a wrong
    /// secret or a skewed clock).
    Status(u16),
}

impl std::fmt::Display for ProbeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProbeFailure::Unreachable => f.write_str("unreachable"),
            ProbeFailure::TimedOut => f.write_str("timeout"),
            ProbeFailure::Status(s) => write!(f, "status {s}"),
        }
    }
}

/// What one readiness probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// 200: the member accepted a signed context like a real request's.
    Ready,
    /// Anything else.
    Failed(ProbeFailure),
}

/// What one upstream attempt to a member did, as the request path reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The member answered (an origin's own 5xx passed through counts as an answer).
    Answered,
    /// Connect refused or failed.
    ConnectFailed,
    /// Connect or response-header timeout.
    TimedOut,
    /// Connection reset or closed before a response.
    Reset,
    /// The member generated an error about itself (e.g. refused our context).
    MemberError,
}

impl Outcome {
    /// Whether this outcome counts against the member's health.
    pub fn is_failure(self) -> bool {
        !matches!(self, Outcome::Answered)
    }

    /// A short label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Answered => "ok",
            Outcome::ConnectFailed => "connect_error",
            Outcome::TimedOut => "timeout",
            Outcome::Reset => "reset",
            Outcome::MemberError => "member_error",
        }
    }
}

/// Membership plus health at one moment. Cheap to clone (the ring is shared).
#[derive(Debug, Clone)]
pub struct TierView {
    ring: Arc<Ring>,
    health: Arc<[Health]>,
    version: u64,
}

impl TierView {
    /// Members of the ring, in configuration order.
    pub fn members(&self) -> &[Member] {
        self.ring.members()
    }

    /// Health of one member.
    pub fn health(&self, id: MemberId) -> Option<Health> {
        self.health.get(id).copied()
    }

    /// Whether routing may use the member.
    pub fn is_up(&self, id: MemberId) -> bool {
        self.health(id).is_some_and(Health::is_up)
    }

    /// The ring this view routes over.
    pub fn ring(&self) -> &Ring {
        &self.ring
    }

    /// Increases with every published change; lets readers tell views apart.
    pub fn version(&self) -> u64 {
        self.version
    }
}

/// Where a miss goes: upper members to try in order. Empty: no upper member is up, and the
/// node's `on_all_upper_down` policy decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Distinct live members in ring order from the key's owner.
    pub hops: Vec<MemberId>,
}

/// Routes `key` through `view`: the live members in ring order starting at the key's owner,
/// at most `max_hops` of them, never one twice.
pub fn route(key: &[u8], view: &TierView, max_hops: usize) -> Route {
    let hops = view
        .ring
        .successors(key)
        .into_iter()
        .filter(|&id| view.is_up(id))
        .take(max_hops)
        .collect();
    Route { hops }
}

/// The health task's state: the single writer of member health.
#[derive(Debug)]
pub struct HealthBook {
    ring: Arc<Ring>,
    health: Vec<Health>,
    /// When each member last came back up: failures of attempts that started earlier were
    /// about the old episode and must not eject it again.
    returned: Vec<Option<Instant>>,
    failure_threshold: u32,
    rise: u32,
    version: u64,
}

impl HealthBook {
    /// Every member starts up: a fresh lower must not refuse traffic before its first probe.
    /// `failure_threshold` consecutive failures mark a member down; `rise` consecutive ready
    /// probes bring it back.
    pub fn new(ring: Ring, failure_threshold: u32, rise: u32) -> HealthBook {
        let n = ring.members().len();
        HealthBook {
            ring: Arc::new(ring),
            health: vec![Health::Up { failures: 0 }; n],
            returned: vec![None; n],
            failure_threshold: failure_threshold.max(1),
            rise: rise.max(1),
            version: 0,
        }
    }

    /// Folds the outcome of an attempt that started at `started`. Returns true if the
    /// member's up/down state changed. Outcomes about a down member are ignored (only probes
    /// bring it back), and so are failures of attempts older than the member's return.
    pub fn observe(
        &mut self,
        id: MemberId,
        outcome: Outcome,
        started: Instant,
        now: Instant,
    ) -> bool {
        if outcome.is_failure()
            && self
                .returned
                .get(id)
                .copied()
                .flatten()
                .is_some_and(|r| started < r)
        {
            return false;
        }
        self.fold(id, outcome, DownReason::Requests(outcome), now)
    }

    fn fold(&mut self, id: MemberId, outcome: Outcome, reason: DownReason, now: Instant) -> bool {
        let threshold = self.failure_threshold;
        let Some(h) = self.health.get_mut(id) else {
            return false;
        };
        match (*h, outcome.is_failure()) {
            (Health::Up { .. }, false) => {
                *h = Health::Up { failures: 0 };
                false
            }
            (Health::Up { failures }, true) => {
                let failures = failures.saturating_add(1);
                if failures >= threshold {
                    *h = Health::Down {
                        since: now,
                        reason,
                        successes: 0,
                    };
                    self.version += 1;
                    true
                } else {
                    *h = Health::Up { failures };
                    false
                }
            }
            (Health::Down { .. }, _) => false,
        }
    }

    /// Folds one readiness probe. `rise` ready probes in a row bring a down member back; a
    /// failed probe counts like a request failure. Returns true if the up/down state changed.
    pub fn probed(&mut self, id: MemberId, probe: Probe, now: Instant) -> bool {
        let rise = self.rise;
        let Some(h) = self.health.get_mut(id) else {
            return false;
        };
        match (*h, probe) {
            (
                Health::Down {
                    since,
                    reason,
                    successes,
                },
                Probe::Ready,
            ) => {
                let successes = successes + 1;
                if successes >= rise {
                    *h = Health::Up { failures: 0 };
                    self.returned[id] = Some(now);
                    self.version += 1;
                    true
                } else {
                    *h = Health::Down {
                        since,
                        reason,
                        successes,
                    };
                    false
                }
            }
            (Health::Down { since, .. }, Probe::Failed(f)) => {
                *h = Health::Down {
                    since,
                    reason: DownReason::Probe(f),
                    successes: 0,
                };
                false
            }
            (Health::Up { .. }, Probe::Ready) => self.fold(
                id,
                Outcome::Answered,
                DownReason::Requests(Outcome::Answered),
                now,
            ),
            (Health::Up { .. }, Probe::Failed(f)) => {
                let outcome = match f {
                    ProbeFailure::Unreachable => Outcome::ConnectFailed,
                    ProbeFailure::TimedOut => Outcome::TimedOut,
                    ProbeFailure::Status(_) => Outcome::MemberError,
                };
                self.fold(id, outcome, DownReason::Probe(f), now)
            }
        }
    }

    /// The member at `addr` in the current ring. Reports name members by address, so one
    /// that outlives a membership change still reaches the right member (or none).
    pub fn member_id(&self, addr: SocketAddr) -> Option<MemberId> {
        self.ring.members().iter().position(|m| m.addr == addr)
    }

    /// Replaces the membership (a config reload): a member that stays keeps its health and
    /// its return time, whatever its new position or weight; a new member starts up, as
    /// every member does at start. Publishes a new version.
    pub fn reconfigure(&mut self, ring: Ring, failure_threshold: u32, rise: u32) {
        let kept = |addr: SocketAddr| self.member_id(addr);
        let (health, returned) = ring
            .members()
            .iter()
            .map(|m| match kept(m.addr) {
                Some(old) => (self.health[old], self.returned[old]),
                None => (Health::Up { failures: 0 }, None),
            })
            .unzip();
        self.ring = Arc::new(ring);
        self.health = health;
        self.returned = returned;
        self.failure_threshold = failure_threshold.max(1);
        self.rise = rise.max(1);
        self.version += 1;
    }

    /// The snapshot to publish.
    pub fn view(&self) -> TierView {
        TierView {
            ring: self.ring.clone(),
            health: self.health.clone().into(),
            version: self.version,
        }
    }
}

#[cfg(test)]
mod tests;
