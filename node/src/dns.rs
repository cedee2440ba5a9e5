//! Origins by name: every lookup is asynchronous, answers are cached for their TTL, and a
//! lookup never outlasts the origin's connect timeout.
//!
//! `[[origin]] address = "name:port"` used to cost a blocking `getaddrinfo` on a thread pool
//! per request, with no cache and no bound. hickory's resolver (the well-kept pure-Rust stub
//! resolver) caches positive and negative answers by their TTLs, reads `/etc/resolv.conf` and
//! `/etc/hosts` like libc, and runs on the proxy's own runtime. The address only ever comes
//! from the config file, never from a request.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;

use crate::config::DnsConfig;

/// Answers kept in the resolver's cache (names × record types).
const CACHE_SIZE: u64 = 4096;

/// Why an origin's address could not be had.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DnsError {
    /// `address` is neither `IP:port` nor `name:port`.
    #[error("{0}: not IP:port or name:port")]
    BadAddress(String),
    /// No answer within the time allowed (the origin's connect timeout).
    #[error("resolving {0}: no answer within {1:?}")]
    TimedOut(String, Duration),
    /// The name servers answered: no such name, or no address for it.
    #[error("resolving {0}: no address ({1})")]
    NoAddress(String, String),
    /// No usable answer (the servers failed or refused).
    #[error("resolving {0}: {1}")]
    Failed(String, String),
}

/// The node's resolver for origin addresses.
pub struct Dns {
    resolver: TokioResolver,
}

impl Dns {
    /// A resolver asking `config.nameservers`, or the system's when none are given.
    pub fn new(config: &DnsConfig) -> Result<Dns, String> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = if config.nameservers.is_empty() {
            TokioResolver::builder(provider)
                .map_err(|e| format!("reading /etc/resolv.conf: {e}"))?
        } else {
            let servers = config
                .nameservers
                .iter()
                .map(|addr| {
                    let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                    for connection in &mut server.connections {
                        connection.port = addr.port();
                    }
                    server
                })
                .collect();
            TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), provider)
                .with_options(ResolverOpts::default())
        };
        let options = builder.options_mut();
        options.cache_size = CACHE_SIZE;
        // A first, AAAA only for a name without one: a cached A answer is the whole lookup
        // (asking both at once would re-ask for an absent AAAA whose "no data" has no TTL).
        options.ip_strategy = LookupIpStrategy::Ipv4thenIpv6;
        let resolver = builder.build().map_err(|e| format!("DNS resolver: {e}"))?;
        Ok(Dns { resolver })
    }

    async fn lookup(
        &self,
        name: &str,
        budget: Duration,
    ) -> Result<hickory_resolver::lookup_ip::LookupIp, DnsError> {
        tokio::time::timeout(budget, self.resolver.lookup_ip(name))
            .await
            .map_err(|_| DnsError::TimedOut(name.to_string(), budget))?
            .map_err(|e| {
                if e.is_nx_domain() || e.is_no_records_found() {
                    DnsError::NoAddress(name.to_string(), e.to_string())
                } else {
                    DnsError::Failed(name.to_string(), e.to_string())
                }
            })
    }

    /// Every address `name` resolves to, and how long the answer stays valid (its TTL, or
    /// what is left of it when it came from the cache), within `budget`.
    pub async fn lookup_all(
        &self,
        name: &str,
        budget: Duration,
    ) -> Result<(Vec<IpAddr>, Duration), DnsError> {
        let answer = self.lookup(name, budget).await?;
        let valid = answer
            .valid_until()
            .saturating_duration_since(Instant::now());
        Ok((answer.iter().collect(), valid))
    }

    /// The socket address of `address` (`IP:port` at once, `name:port` through the cache or
    /// the name servers), within `budget`; also returns what is left of the budget.
    pub async fn resolve(
        &self,
        address: &str,
        budget: Duration,
    ) -> Result<(SocketAddr, Duration), DnsError> {
        if let Ok(addr) = address.parse::<SocketAddr>() {
            return Ok((addr, budget));
        }
        let (name, port) = address
            .rsplit_once(':')
            .and_then(|(name, port)| Some((name, port.parse::<u16>().ok()?)))
            .filter(|(name, _)| !name.is_empty())
            .ok_or_else(|| DnsError::BadAddress(address.to_string()))?;
        let started = Instant::now();
        let answer = self.lookup(name, budget).await?;
        let ip = answer
            .iter()
            .next()
            .ok_or_else(|| DnsError::NoAddress(name.to_string(), "empty answer".into()))?;
        Ok((
            SocketAddr::new(ip, port),
            budget.saturating_sub(started.elapsed()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn literal_addresses_need_no_lookup_and_bad_ones_are_named() {
        // A name server nobody answers on: a literal must never reach it.
        let dns = Dns::new(&DnsConfig {
            nameservers: vec!["127.0.0.1:9".parse().expect("addr")],
        })
        .expect("resolver");
        let budget = Duration::from_secs(1);
        for (address, expected) in [
            ("127.0.0.1:8080", "127.0.0.1:8080"),
            ("[::1]:80", "[::1]:80"),
        ] {
            let (addr, left) = dns.resolve(address, budget).await.expect("literal");
            assert_eq!(addr, expected.parse().expect("addr"));
            assert_eq!(left, budget);
        }
        for bad in ["no-port", "name:", ":80", "name:99999"] {
            assert_eq!(
                dns.resolve(bad, budget).await,
                Err(DnsError::BadAddress(bad.to_string()))
            );
        }
    }
}
