//! Real `stratus` processes on ephemeral loopback ports, killed when dropped.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::client;

/// How long a node may take to start answering.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// Pause between readiness polls.
const POLL: Duration = Duration::from_millis(50);

/// A free loopback port, found by binding port 0 and releasing it.
pub fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// One origin a node serves.
#[derive(Debug, Clone)]
pub struct OriginEntry {
    /// Host matched against requests.
    pub host: String,
    /// Address the node connects to.
    pub address: String,
}

impl OriginEntry {
    /// `host` served from `address`.
    pub fn new(host: &str, address: impl ToString) -> OriginEntry {
        OriginEntry {
            host: host.to_string(),
            address: address.to_string(),
        }
    }
}

/// `[[origin]]` tables for `origins`.
pub fn origin_tables(origins: &[OriginEntry]) -> String {
    origins
        .iter()
        .map(|o| {
            format!(
                "\n[[origin]]\nhost = \"{}\"\naddress = \"{}\"\n",
                o.host, o.address
            )
        })
        .collect()
}

/// A running node process.
pub struct NodeProcess {
    child: Child,
    /// Data listener.
    pub listen: SocketAddr,
    /// Admin listener.
    pub admin: SocketAddr,
    /// Its config file.
    pub config_path: PathBuf,
    dir: tempfile::TempDir,
}

impl NodeProcess {
    /// Starts a standalone node named `name` serving `origins`; `extra` is appended to the
    /// config (e.g. a `[cache]` table). Returns once its admin API answers `/healthz`.
    pub async fn start(
        bin: &Path,
        name: &str,
        origins: &[OriginEntry],
        extra: &str,
    ) -> anyhow::Result<NodeProcess> {
        let (listen, admin) = (free_port()?, free_port()?);
        let node = format!("[node]\nname = \"{name}\"\nrole = \"lower\"\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\n");
        Self::start_with(
            bin,
            name,
            listen,
            admin,
            &format!("{node}\n{extra}\n{}", origin_tables(origins)),
        )
        .await
    }

    /// Starts a node from a whole config text whose listeners are `listen` and `admin`.
    pub async fn start_with(
        bin: &Path,
        name: &str,
        listen: SocketAddr,
        admin: SocketAddr,
        toml: &str,
    ) -> anyhow::Result<NodeProcess> {
        let dir = tempfile::tempdir()?;
        let config_path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&config_path, toml)?;
        let log = std::fs::File::create(dir.path().join("node.log"))?;
        let child = Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .arg("--upgrade-sock")
            .arg(dir.path().join("upgrade.sock"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        let mut node = NodeProcess {
            child,
            listen,
            admin,
            config_path,
            dir,
        };
        node.wait_ready().await?;
        Ok(node)
    }

    /// SIGKILL: the process vanishes without draining anything.
    pub fn kill_hard(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_DEADLINE;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!("node exited with {status} during start:\n{}", self.log());
            }
            let healthy = client::get(self.admin, "admin", "/healthz", &[])
                .await
                .is_ok_and(|r| r.status == 200);
            if healthy && tokio::net::TcpStream::connect(self.listen).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(POLL).await;
        }
        anyhow::bail!("node not ready within {START_DEADLINE:?}:\n{}", self.log())
    }

    /// What the node wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("node.log")).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
