//! Upper members from DNS: `[tier].upper = [{ dns = "name:port" }]` stands for every address
//! the name resolves to — a Kubernetes headless service lists its ready pods that way.
//!
//! One task per lower node re-resolves each name every `refresh`, or when its answer's TTL runs
//! out (at least every [`MIN_REFRESH`], at most every [`MAX_REFRESH`]), and when a reload
//! changes the names,
//! and hands a changed set to the tier, which keeps the health of members that stay. Only the
//! name servers the operator configured decide membership; a failed or silent lookup keeps the
//! members that name had (a DNS outage must not empty the ring), and a name that now answers
//! with nothing loses its members.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use stratus_tracing::BACKGROUND_TARGET;
use tracing::Instrument;

use crate::config::{DnsMember, UpperMember};
use crate::dns::{Dns, DnsError};
use crate::tier::Tier;

/// The shortest wait between two resolutions of the names (a TTL of 0 included).
pub const MIN_REFRESH: Duration = Duration::from_secs(1);
/// The longest: a long TTL still gets checked this often.
pub const MAX_REFRESH: Duration = Duration::from_secs(60);
/// Wait after a failed lookup before trying again.
const RETRY: Duration = Duration::from_secs(5);
/// Bound on one lookup.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The membership task of one lower node.
pub struct DnsMembership {
    tier: Arc<Tier>,
    dns: Arc<ArcSwap<Dns>>,
}

impl DnsMembership {
    /// The task feeding `tier` from the names in its settings, resolved with `dns`.
    pub fn new(tier: Arc<Tier>, dns: Arc<ArcSwap<Dns>>) -> DnsMembership {
        DnsMembership { tier, dns }
    }

    /// Resolves every name once; returns the members and when to look again. `known` holds
    /// each name's last answer, kept when a lookup fails.
    async fn resolve(
        &self,
        names: &[DnsMember],
        known: &mut HashMap<(String, u16), Vec<UpperMember>>,
    ) -> (Vec<UpperMember>, Duration) {
        let dns = self.dns.load_full();
        let mut next = MAX_REFRESH;
        known.retain(|(name, port), _| names.iter().any(|d| &d.name == name && d.port == *port));
        for d in names {
            let key = (d.name.clone(), d.port);
            match dns.lookup_all(&d.name, LOOKUP_TIMEOUT).await {
                Ok((ips, valid)) => {
                    let mut members = members_of(d, ips);
                    members.sort_by_key(|m| m.addr);
                    members.dedup_by_key(|m| m.addr);
                    known.insert(key, members);
                    next = next.min(d.refresh.unwrap_or(valid));
                }
                Err(e) => {
                    if matches!(e, DnsError::NoAddress(..)) {
                        // An answer: the name stands for no member now.
                        known.insert(key, Vec::new());
                    } else {
                        tracing::warn!(name = %d.name, error = %e, "upper members: lookup failed; keeping the last answer");
                    }
                    next = next.min(RETRY);
                }
            }
        }
        let mut members: Vec<UpperMember> = Vec::new();
        for d in names {
            for m in known.get(&(d.name.clone(), d.port)).into_iter().flatten() {
                if !members.iter().any(|x| x.addr == m.addr) {
                    members.push(m.clone());
                }
            }
        }
        (members, next.clamp(MIN_REFRESH, MAX_REFRESH))
    }
}

/// The members a DNS entry stands for, one per address it resolved to.
fn members_of(d: &DnsMember, ips: Vec<std::net::IpAddr>) -> Vec<UpperMember> {
    ips.into_iter()
        .map(|ip| UpperMember {
            addr: SocketAddr::new(ip, d.port),
            weight: d.weight,
            name: None,
        })
        .collect()
}

/// What `names` resolve to now through `dns`, for a reload that is about to apply them: every
/// address found, plus — when a lookup fails — the members in `current` (a failed lookup
/// never removes a member; the membership task sorts it out on its next round).
pub async fn resolve_for_reload(
    dns: &Dns,
    names: &[DnsMember],
    current: &[UpperMember],
) -> Vec<UpperMember> {
    let mut members: Vec<UpperMember> = Vec::new();
    let mut failed = false;
    for d in names {
        match dns.lookup_all(&d.name, LOOKUP_TIMEOUT).await {
            Ok((ips, _)) => members.extend(members_of(d, ips)),
            Err(DnsError::NoAddress(..)) => {}
            Err(e) => {
                tracing::warn!(name = %d.name, error = %e, "reload: lookup failed; keeping the members found so far");
                failed = true;
            }
        }
    }
    if failed {
        members.extend(current.iter().cloned());
    }
    members.sort_by_key(|m| m.addr);
    members.dedup_by_key(|m| m.addr);
    members
}

#[async_trait]
impl BackgroundService for DnsMembership {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut known = HashMap::new();
        loop {
            let names = self.tier.settings().upper_dns.clone();
            let wait = if names.is_empty() {
                if !self.tier.resolved().is_empty() {
                    let _ = self.tier.set_resolved(Vec::new()).await;
                }
                MAX_REFRESH
            } else {
                let span = tracing::info_span!(
                    target: BACKGROUND_TARGET,
                    "upper members from DNS",
                    names = names.len(),
                    members = tracing::field::Empty,
                );
                let (members, wait) = self
                    .resolve(&names, &mut known)
                    .instrument(span.clone())
                    .await;
                span.record("members", members.len());
                if members != *self.tier.resolved() {
                    let addrs: Vec<String> = members.iter().map(|m| m.addr.to_string()).collect();
                    match self.tier.set_resolved(members).await {
                        Ok(()) => {
                            tracing::info!(members = ?addrs, "upper members from DNS changed")
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "upper members from DNS: not applied")
                        }
                    }
                }
                wait
            };
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = self.tier.names_changed() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}
