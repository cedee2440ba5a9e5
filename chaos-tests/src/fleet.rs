//! A whole fleet of real processes on loopback: upper nodes, lower nodes, one origin.

use std::net::SocketAddr;
use std::path::Path;

use crate::node::{free_port, origin_tables, NodeProcess, OriginEntry};

/// The fleet secret tests use (32+ bytes).
pub const TEST_SECRET: &str = "stratus-test-secret-0123456789abcdef";

/// How to build a fleet.
#[derive(Debug, Clone)]
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

/// Running upper and lower nodes. Every process is killed when this drops.
pub struct Fleet {
    /// Upper nodes, `up-1`…
    pub uppers: Vec<NodeProcess>,
    /// Lower nodes, `edge-1`…
    pub lowers: Vec<NodeProcess>,
}

impl Fleet {
    /// Starts uppers first, then lowers pointing at them; returns when all answer `/healthz`.
    pub async fn start(bin: &Path, spec: &FleetSpec) -> anyhow::Result<Fleet> {
        let origins = origin_tables(&spec.origins);
        let mut upper_addrs: Vec<(SocketAddr, SocketAddr)> = Vec::new();
        for _ in 0..spec.uppers {
            upper_addrs.push((free_port()?, free_port()?));
        }
        let mut uppers = Vec::new();
        for (i, (listen, admin)) in upper_addrs.iter().enumerate() {
            let name = format!("up-{}", i + 1);
            let toml = format!(
                "[node]\nname = \"{name}\"\nrole = \"upper\"\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\ngrace_period = \"1s\"\n\n\
                 [tier]\nsecret = \"{TEST_SECRET}\"\n\n{origins}\n{}",
                spec.common_extra
            );
            uppers.push(NodeProcess::start_with(bin, &name, *listen, *admin, &toml).await?);
        }
        let members = upper_addrs
            .iter()
            .map(|(l, _)| format!("\"{l}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let probe = if spec.lower_tier_extra.contains("probe_interval") {
            ""
        } else {
            "probe_interval = \"200ms\"\n"
        };
        let mut lowers = Vec::new();
        for i in 0..spec.lowers {
            let (listen, admin) = (free_port()?, free_port()?);
            let name = format!("edge-{}", i + 1);
            let toml = format!(
                "[node]\nname = \"{name}\"\nrole = \"lower\"\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\ngrace_period = \"1s\"\n\n\
                 [tier]\nsecret = \"{TEST_SECRET}\"\nupper = [{members}]\n{probe}connect_timeout = \"300ms\"\nread_timeout = \"3s\"\n{}\n\n{origins}\n{}",
                spec.lower_tier_extra,
                spec.common_extra
            );
            lowers.push(NodeProcess::start_with(bin, &name, listen, admin, &toml).await?);
        }
        Ok(Fleet { uppers, lowers })
    }
}
