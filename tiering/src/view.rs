//! Membership and health in one immutable snapshot, and the route a miss takes through it.
//!
//! Readers load one [`TierView`] and decide from it alone, so a route can never mix the
//! membership of one moment with the health of another. The single writer is [`HealthBook`]:
//! it folds outcomes and probe results (time passed in) and hands out the next view.

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
    /// Takes no traffic until a probe succeeds.
    Down {
        /// When it was marked down.
        since: Instant,
    },
}

impl Health {
    /// Whether routing may use the member.
    pub fn is_up(self) -> bool {
        matches!(self, Health::Up { .. })
    }
}

/// What one upstream attempt to a member did, as the request path reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    failure_threshold: u32,
    version: u64,
}

impl HealthBook {
    /// Every member starts up: a fresh lower must not refuse traffic before its first probe.
    pub fn new(ring: Ring, failure_threshold: u32) -> HealthBook {
        let n = ring.members().len();
        HealthBook {
            ring: Arc::new(ring),
            health: vec![Health::Up { failures: 0 }; n],
            failure_threshold: failure_threshold.max(1),
            version: 0,
        }
    }

    /// Folds one request outcome. Returns true if the member's up/down state changed.
    /// Outcomes about a down member are ignored: only a probe brings it back.
    pub fn observe(&mut self, id: MemberId, outcome: Outcome, now: Instant) -> bool {
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
                    *h = Health::Down { since: now };
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

    /// Folds one active probe result. A success brings a down member back; a failure counts
    /// like a request failure. Returns true if the up/down state changed.
    pub fn probed(&mut self, id: MemberId, ok: bool, now: Instant) -> bool {
        match (self.health.get(id).copied(), ok) {
            (Some(Health::Down { .. }), true) => {
                self.health[id] = Health::Up { failures: 0 };
                self.version += 1;
                true
            }
            (Some(Health::Down { .. }), false) | (None, _) => false,
            (Some(Health::Up { .. }), true) => self.observe(id, Outcome::Answered, now),
            (Some(Health::Up { .. }), false) => self.observe(id, Outcome::ConnectFailed, now),
        }
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
