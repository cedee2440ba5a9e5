//! A whole fleet of real processes on loopback: upper nodes, lower nodes, one origin, and
//! optionally a [`FaultProxy`] on every link so a scenario can break one link at a time.

use std::net::SocketAddr;
use std::path::Path;

use crate::client;
use crate::fault::FaultProxy;
use crate::node::{free_port, origin_tables_with, NodeProcess, OriginEntry};
use crate::pki::FleetPki;

/// The fleet secret tests use (32+ bytes).
pub const TEST_SECRET: &str = "stratus-test-secret-0123456789abcdef";

/// How to build a fleet.
#[derive(Debug, Clone, Default)]
pub struct FleetSpec {
    /// Lower-tier nodes.
    pub lowers: usize,
    /// Upper-tier nodes.
    pub uppers: usize,
    /// Origins every node serves.
    pub origins: Vec<OriginEntry>,
    /// Extra `[tier]` lines for lower nodes (e.g. `on_all_upper_down = "origin"`). A
    /// `probe_interval` here replaces the fleet's default of 200 ms.
    pub lower_tier_extra: String,
    /// Appended to every node's config (e.g. a `[tracing]` table).
    pub common_extra: String,
}

/// Options beyond [`FleetSpec`], for [`Fleet::start_with`]; the default is what
/// [`Fleet::start`] does.
#[derive(Debug, Clone, Default)]
pub struct FleetOptions {
    /// Put a [`FaultProxy`] on every link: each lower reaches each upper through its own
    /// ([`Fleet::link`]), each upper reaches each origin through its own
    /// ([`Fleet::origin_link`]). Lowers still reach origins directly.
    pub link_proxies: bool,
    /// Extra `[tier]` lines for upper nodes.
    pub upper_extra: String,
    /// Leave `probe_interval`, `connect_timeout` and `read_timeout` out of the lower nodes'
    /// config and the timeouts out of `[[origin]]` so the binary's defaults apply (otherwise
    /// the fleet sets 200 ms / 300 ms / 3 s to uppers and 500 ms / 2 s to origins, nested
    /// like the defaults).
    pub default_timeouts: bool,
    /// Plain HTTP between the tiers instead of mutual TLS (for tests that talk to an upper
    /// themselves, as a lower would, without a certificate).
    pub plain_tiers: bool,
    /// Lines appended to every node's `[node]` table (e.g. `threads = 1`).
    pub node_extra: String,
}

/// Running upper and lower nodes. Every process is killed and every proxy stopped when this
/// drops.
pub struct Fleet {
    /// Upper nodes, `up-1`…
    pub uppers: Vec<NodeProcess>,
    /// Lower nodes, `edge-1`…
    pub lowers: Vec<NodeProcess>,
    upper_names: Vec<String>,
    /// `links[lower][upper]`, empty without `link_proxies`.
    links: Vec<Vec<FaultProxy>>,
    /// `origin_links[upper][origin]`, empty without `link_proxies`.
    origin_links: Vec<Vec<FaultProxy>>,
    /// The fleet CA and each node's certificate files, unless `plain_tiers`.
    pki: Option<(FleetPki, tempfile::TempDir)>,
}

impl Fleet {
    /// Starts uppers first, then lowers pointing at them; returns when all answer `/healthz`.
    pub async fn start(bin: &Path, spec: &FleetSpec) -> anyhow::Result<Fleet> {
        Fleet::start_with(bin, spec, &FleetOptions::default()).await
    }

    /// [`Fleet::start`] with `options`.
    pub async fn start_with(
        bin: &Path,
        spec: &FleetSpec,
        options: &FleetOptions,
    ) -> anyhow::Result<Fleet> {
        let mut upper_addrs: Vec<(SocketAddr, SocketAddr)> = Vec::new();
        for _ in 0..spec.uppers {
            upper_addrs.push((free_port()?, free_port()?));
        }
        let upper_names: Vec<String> = (1..=spec.uppers).map(|i| format!("up-{i}")).collect();
        let pki = if options.plain_tiers {
            None
        } else {
            Some((FleetPki::new()?, tempfile::tempdir()?))
        };
        // Each node's `[tier.tls]` table, its files in a directory of its own.
        let tls_table = |name: &str| -> anyhow::Result<String> {
            let Some((pki, dir)) = &pki else {
                return Ok(String::new());
            };
            let node_dir = dir.path().join(name);
            std::fs::create_dir_all(&node_dir)?;
            Ok(pki.write_node(&node_dir, name)?.1)
        };

        let mut origin_links = Vec::new();
        if options.link_proxies {
            let mut targets = Vec::new();
            for o in &spec.origins {
                targets.push(resolve(&o.address).await?);
            }
            for _ in 0..spec.uppers {
                let proxies = targets
                    .iter()
                    .map(|t| FaultProxy::start(*t))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                origin_links.push(proxies);
            }
        }
        let mut links = Vec::new();
        if options.link_proxies {
            for _ in 0..spec.lowers {
                let proxies = upper_addrs
                    .iter()
                    .map(|(listen, _)| FaultProxy::start(*listen))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                links.push(proxies);
            }
        }

        // Short timeouts keep the defaults' nesting (origin 2 s + 30 s < tier 35 s): an upper
        // gives up on its origin (0.5 s + 2 s) before a lower gives up on the upper (3 s).
        let origin_timeouts = if options.default_timeouts {
            ""
        } else {
            "connect_timeout = \"500ms\"\nread_timeout = \"2s\"\n"
        };
        let mut uppers = Vec::new();
        for (i, (listen, admin)) in upper_addrs.iter().enumerate() {
            let name = &upper_names[i];
            let origins = match origin_links.get(i) {
                Some(proxies) => {
                    let proxied: Vec<OriginEntry> = spec
                        .origins
                        .iter()
                        .zip(proxies)
                        .map(|(o, p)| OriginEntry::new(&o.host, p.addr()))
                        .collect();
                    origin_tables_with(&proxied, origin_timeouts)
                }
                None => origin_tables_with(&spec.origins, origin_timeouts),
            };
            let toml = format!(
                "[node]\nname = \"{name}\"\nrole = \"upper\"\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\ngrace_period = \"1s\"\n{}\n\
                 [tier]\nsecret = \"{TEST_SECRET}\"\n{}\n{}\n{origins}\n{}",
                options.node_extra,
                options.upper_extra,
                tls_table(name)?,
                spec.common_extra
            );
            uppers.push(NodeProcess::start_with(bin, name, *listen, *admin, &toml).await?);
        }

        let timeouts = if options.default_timeouts {
            String::new()
        } else {
            let probe = if spec.lower_tier_extra.contains("probe_interval") {
                ""
            } else {
                "probe_interval = \"200ms\"\n"
            };
            format!("{probe}connect_timeout = \"300ms\"\nread_timeout = \"3s\"\n")
        };
        let origins = origin_tables_with(&spec.origins, origin_timeouts);
        let mut lowers = Vec::new();
        for i in 0..spec.lowers {
            // Through a proxy the address is the proxy's; the name keeps the control context
            // addressed to the upper behind it.
            let members = upper_addrs
                .iter()
                .zip(&upper_names)
                .enumerate()
                .map(|(u, ((listen, _), name))| {
                    let addr = links
                        .get(i)
                        .map_or(*listen, |l: &Vec<FaultProxy>| l[u].addr());
                    format!("{{ addr = \"{addr}\", name = \"{name}\" }}")
                })
                .collect::<Vec<_>>()
                .join(", ");
            let (listen, admin) = (free_port()?, free_port()?);
            let name = format!("edge-{}", i + 1);
            let toml = format!(
                "[node]\nname = \"{name}\"\nrole = \"lower\"\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\ngrace_period = \"1s\"\n{}\n\
                 [tier]\nsecret = \"{TEST_SECRET}\"\nupper = [{members}]\n{timeouts}{}\n{}\n{origins}\n{}",
                options.node_extra,
                spec.lower_tier_extra,
                tls_table(&name)?,
                spec.common_extra
            );
            lowers.push(NodeProcess::start_with(bin, &name, listen, admin, &toml).await?);
        }
        Ok(Fleet {
            uppers,
            lowers,
            upper_names,
            links,
            origin_links,
            pki,
        })
    }

    /// The fleet CA and the directory holding each node's TLS files (`<dir>/<node name>/`:
    /// `ca.pem`, `node.pem`, `node.key`, `fleet.crl`), unless the fleet runs `plain_tiers`.
    pub fn pki(&self) -> Option<(&FleetPki, &Path)> {
        self.pki.as_ref().map(|(p, d)| (p, d.path()))
    }

    /// The upper nodes' names, `up-1`…, in the order of [`Fleet::uppers`].
    pub fn upper_names(&self) -> &[String] {
        &self.upper_names
    }

    /// The proxy between `lowers[lower]` and `uppers[upper]` (0-based). Panics without
    /// [`FleetOptions::link_proxies`] or out of range.
    pub fn link(&self, lower: usize, upper: usize) -> &FaultProxy {
        match self.links.get(lower).and_then(|l| l.get(upper)) {
            Some(proxy) => proxy,
            None => panic!(
                "no link from lower {lower} to upper {upper}: {} lowers × {} uppers with proxies \
                 (set FleetOptions::link_proxies)",
                self.links.len(),
                self.links.first().map_or(0, Vec::len)
            ),
        }
    }

    /// The proxy between `uppers[upper]` and the first origin. Panics without
    /// [`FleetOptions::link_proxies`] or out of range.
    pub fn origin_link(&self, upper: usize) -> &FaultProxy {
        self.origin_link_to(upper, 0)
    }

    /// The proxy between `uppers[upper]` and `spec.origins[origin]`. Panics without
    /// [`FleetOptions::link_proxies`] or out of range.
    pub fn origin_link_to(&self, upper: usize, origin: usize) -> &FaultProxy {
        match self.origin_links.get(upper).and_then(|l| l.get(origin)) {
            Some(proxy) => proxy,
            None => panic!(
                "no link from upper {upper} to origin {origin} (set FleetOptions::link_proxies)"
            ),
        }
    }

    /// `GET /ring` of `lowers[lower]`'s admin API, as JSON.
    pub async fn ring(&self, lower: usize) -> anyhow::Result<serde_json::Value> {
        let node = self
            .lowers
            .get(lower)
            .ok_or_else(|| anyhow::anyhow!("no lower {lower}: {} lowers", self.lowers.len()))?;
        let text = admin_get(node.admin, "/ring").await?;
        Ok(serde_json::from_str(&text)?)
    }

    /// `GET /metrics` of the node whose admin API is at `node_admin`, as Prometheus text.
    pub async fn metrics(&self, node_admin: SocketAddr) -> anyhow::Result<String> {
        admin_get(node_admin, "/metrics").await
    }

    /// Panics, quoting the logs, if any node process of this fleet panicked.
    pub fn assert_no_panics(&self) {
        let panicked: Vec<String> = self
            .uppers
            .iter()
            .chain(&self.lowers)
            .filter(|n| n.panicked())
            .map(|n| format!("--- {} ---\n{}", n.name(), n.log()))
            .collect();
        assert!(
            panicked.is_empty(),
            "node processes panicked:\n{}",
            panicked.join("\n")
        );
    }
}

/// The body of a 200 answer to `GET path` on an admin API.
async fn admin_get(admin: SocketAddr, path: &str) -> anyhow::Result<String> {
    let r = client::get(admin, "admin", path, &[]).await?;
    anyhow::ensure!(r.status == 200, "GET {path} on {admin}: {}", r.status);
    Ok(r.text())
}

/// The first address `address` (`IP:port` or `name:port`) resolves to.
async fn resolve(address: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(address)
        .await?
        .next()
        .ok_or_else(|| anyhow::anyhow!("{address} resolves to nothing"))
}
