//! The consistent-hash ring over upper-tier members.
//!
//! Built on `pingora-ketama`: Pingora's own ring crate, the algorithm of nginx's
//! `hash … consistent` (crc32 points, 160 per unit of weight), tested upstream against a real
//! nginx log. Choosing it means a stratus fleet places keys the way an nginx tier with the same
//! `IP:port` list would, and that placement is pinned by our golden test. The ring ignores
//! health on purpose: a down member's keys go to ring successors while every other key stays.

use std::net::SocketAddr;

use pingora_ketama::{Bucket, Continuum};

use crate::error::TierError;

/// Index of a member in the ring's member list.
pub type MemberId = usize;

/// Points per unit of weight (pingora-ketama's default, nginx's value).
const POINTS_PER_WEIGHT: usize = 160;
/// Bound on weights so the ring stays small (160 points per unit).
pub const MAX_WEIGHT: u32 = 1000;

/// One upper-tier member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    /// Data-listener address.
    pub addr: SocketAddr,
    /// Relative share of keys, 1..=[`MAX_WEIGHT`].
    pub weight: u32,
}

/// The ring: members and their points.
pub struct Ring {
    members: Vec<Member>,
    continuum: Continuum,
    points: usize,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("members", &self.members)
            .finish()
    }
}

impl Ring {
    /// Builds the ring. Weights must be 1..=[`MAX_WEIGHT`] and addresses distinct (pingora-ketama
    /// panics on weight 0, pingora issue #1006, so we refuse it first).
    pub fn new(members: Vec<Member>) -> Result<Ring, TierError> {
        for (i, m) in members.iter().enumerate() {
            if m.weight == 0 || m.weight > MAX_WEIGHT {
                return Err(TierError::BadWeight {
                    addr: m.addr,
                    weight: m.weight,
                });
            }
            if members[..i].iter().any(|o| o.addr == m.addr) {
                return Err(TierError::DuplicateMember(m.addr));
            }
        }
        let buckets: Vec<Bucket> = members
            .iter()
            .map(|m| Bucket::new(m.addr, m.weight))
            .collect();
        let points = members
            .iter()
            .map(|m| m.weight as usize * POINTS_PER_WEIGHT)
            .sum();
        Ok(Ring {
            continuum: Continuum::new(&buckets),
            members,
            points,
        })
    }

    /// The members, in configuration order; a [`MemberId`] indexes this slice.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The member that owns `key`, if the ring has any member.
    pub fn owner(&self, key: &[u8]) -> Option<MemberId> {
        self.continuum.node(key).and_then(|addr| self.id_of(addr))
    }

    /// Every member once, in ring order starting at `key`'s owner: the order failover walks.
    pub fn successors(&self, key: &[u8]) -> Vec<MemberId> {
        let mut order: Vec<MemberId> = Vec::with_capacity(self.members.len());
        // node_iter wraps forever; one lap of the ring visits every member that has a point.
        for addr in self.continuum.node_iter(key).take(self.points) {
            if let Some(id) = self.id_of(*addr) {
                if !order.contains(&id) {
                    order.push(id);
                    if order.len() == self.members.len() {
                        break;
                    }
                }
            }
        }
        order
    }

    fn id_of(&self, addr: SocketAddr) -> Option<MemberId> {
        self.members.iter().position(|m| m.addr == addr)
    }
}
