//! Real `stratus` processes on ephemeral loopback ports, killed when dropped.
//!
//! A node is a child process so that tests can do to it what production does: freeze it
//! (SIGSTOP), kill it without warning, terminate it gracefully, hand its sockets to a new
//! binary (Pingora's SIGQUIT upgrade). Every node is started with `--exit-with-parent`, so a
//! test runner that dies without running `Drop` leaves no node behind.

use std::fs::OpenOptions;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::client;

/// How long a node may take to start answering.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// How long a graceful terminate may take: the grace period (the binary's default is 30 s;
/// harness nodes use 1 s) plus Pingora's 5 s runtime shutdown, with room to spare.
const TERM_DEADLINE: Duration = Duration::from_secs(60);
/// How long an upgrade may take: the new process waits for the sockets (Pingora retries 5 s),
/// the old one sends them, sleeps Pingora's 5 s close timeout, then its grace period and
/// runtime shutdown.
const UPGRADE_DEADLINE: Duration = Duration::from_secs(90);
/// How often SIGQUIT is repeated while the old process of an upgrade is still running.
const QUIT_REPEAT: Duration = Duration::from_secs(2);
/// Pause between readiness polls.
const POLL: Duration = Duration::from_millis(50);

/// First of the ports [`free_port`] hands out: below Linux's ephemeral range (32768–60999), so
/// no outgoing connection — of a load generator, a node, anything — can take one between the
/// moment it is chosen and the moment a node binds it (an ephemeral port from `bind(:0)` could).
const PORTS_FROM: u32 = 10_000;
/// How many ports [`free_port`] cycles through (10000–19999; the demo test uses 20000 up).
const PORTS: u32 = 10_000;

/// A free loopback port for a node to bind: each call in a process gets the next port of a
/// range outside the ephemeral one (starting where the process id points, so test processes
/// running side by side start apart), skipping ports something else holds.
pub fn free_port() -> anyhow::Result<SocketAddr> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7919) % PORTS;
    for _ in 0..PORTS {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = PORTS_FROM + (start + n) % PORTS;
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
            return Ok(listener.local_addr()?);
        }
    }
    anyhow::bail!("no free port in {PORTS_FROM}..{}", PORTS_FROM + PORTS)
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
    origin_tables_with(origins, "")
}

/// `[[origin]]` tables for `origins`, each with `lines` (e.g. timeouts) added.
pub fn origin_tables_with(origins: &[OriginEntry], lines: &str) -> String {
    origins
        .iter()
        .map(|o| {
            format!(
                "\n[[origin]]\nhost = \"{}\"\naddress = \"{}\"\n{lines}",
                o.host, o.address
            )
        })
        .collect()
}

/// A running node process.
pub struct NodeProcess {
    child: Child,
    /// The old process during an upgrade, until it has exited and been reaped.
    retiring: Option<Child>,
    /// Data listener.
    pub listen: SocketAddr,
    /// Admin listener.
    pub admin: SocketAddr,
    /// Its config file.
    pub config_path: PathBuf,
    bin: PathBuf,
    name: String,
    dir: tempfile::TempDir,
    /// Extra environment for the process (and its restarts and upgrades).
    env: Vec<(String, String)>,
}

impl NodeProcess {
    /// Starts a standalone node named `name` serving `origins`; `extra` is appended to the
    /// config (e.g. a `[cache]` table). Like fleet nodes it has a 1 s grace period, so that
    /// [`NodeProcess::terminate`] and [`NodeProcess::upgrade`] finish in seconds. Returns once
    /// its admin API answers `/healthz`.
    pub async fn start(
        bin: &Path,
        name: &str,
        origins: &[OriginEntry],
        extra: &str,
    ) -> anyhow::Result<NodeProcess> {
        let (listen, admin) = (free_port()?, free_port()?);
        let node = format!("[node]\nname = \"{name}\"\nrole = \"lower\"\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\ngrace_period = \"1s\"\n");
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
        std::fs::File::create(dir.path().join("node.log"))?;
        let child = spawn(bin, &config_path, dir.path(), false, &[])?;
        let mut node = NodeProcess {
            child,
            retiring: None,
            listen,
            admin,
            config_path,
            bin: bin.to_path_buf(),
            name: name.to_string(),
            dir,
            env: Vec::new(),
        };
        node.wait_ready().await?;
        Ok(node)
    }

    /// SIGKILL: the process vanishes without draining anything (a retiring one as well).
    pub fn kill_hard(&mut self) {
        for child in std::iter::once(&mut self.child).chain(self.retiring.as_mut()) {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.retiring = None;
    }

    /// Sends `sig` to the current process. An error if it has already exited (its pid may
    /// belong to someone else by now) or the signal cannot be sent.
    pub fn signal(&mut self, sig: Signal) -> anyhow::Result<()> {
        signal_child(&mut self.child, sig)
            .map_err(|e| anyhow::anyhow!("node {}: {sig}: {e}", self.name))
    }

    /// SIGSTOP: the process freezes; its sockets stay open and connects still complete, but
    /// nothing is answered. Undo with [`NodeProcess::cont`].
    pub fn stop(&mut self) -> anyhow::Result<()> {
        self.signal(Signal::SIGSTOP)
    }

    /// SIGCONT: a stopped process runs again.
    pub fn cont(&mut self) -> anyhow::Result<()> {
        self.signal(Signal::SIGCONT)
    }

    /// SIGKILL and reap, then starts the same binary again with the same ports and the same
    /// config file (rewritten or not); returns once it is ready.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill_hard();
        self.child = spawn(
            &self.bin,
            &self.config_path,
            self.dir.path(),
            false,
            &self.env,
        )?;
        self.wait_ready().await
    }

    /// SIGTERM (Pingora's graceful shutdown), then waits for the exit and returns its status.
    /// An error if it is still running after the deadline (dropping the handle kills it).
    pub async fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        self.signal(Signal::SIGTERM)?;
        let deadline = Instant::now() + TERM_DEADLINE;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            tokio::time::sleep(POLL).await;
        }
        anyhow::bail!(
            "node {} still running {TERM_DEADLINE:?} after SIGTERM:\n{}",
            self.name,
            self.log()
        )
    }

    /// Pingora's zero-downtime upgrade: starts a new process with the same arguments plus
    /// `--upgrade`, waits until it listens on the hand-over socket, sends the old one SIGQUIT
    /// (repeated until it exits) so it passes its listeners over and drains, and returns once
    /// the old process has exited and the new one answers `/healthz`. From then on this handle
    /// is the new process.
    pub async fn upgrade(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + UPGRADE_DEADLINE;
        let sock = self.upgrade_sock();
        // A socket file left by an earlier upgrade would look like the new process listening.
        match std::fs::remove_file(&sock) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        let new = spawn(
            &self.bin,
            &self.config_path,
            self.dir.path(),
            true,
            &self.env,
        )?;
        self.retiring = Some(std::mem::replace(&mut self.child, new));
        while !sock.exists() {
            self.check_upgrade(deadline, "listen on the upgrade socket")?;
            tokio::time::sleep(POLL).await;
        }
        let mut next_quit = Instant::now();
        loop {
            self.check_upgrade(deadline, "see the old process exit")?;
            let Some(old) = self.retiring.as_mut() else {
                break;
            };
            if old.try_wait()?.is_some() {
                self.retiring = None;
                break;
            }
            if Instant::now() >= next_quit {
                // Only fails if the old process exited just now; the next round sees that.
                let _ = signal_child(old, Signal::SIGQUIT);
                next_quit = Instant::now() + QUIT_REPEAT;
            }
            tokio::time::sleep(POLL).await;
        }
        self.wait_ready().await
    }

    /// An error (with the log) if the new process of an upgrade died or time ran out.
    fn check_upgrade(&mut self, deadline: Instant, waiting_to: &str) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!(
                "upgrade of {}: new process exited with {status}:\n{}",
                self.name,
                self.log()
            );
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "upgrade of {}: did not {waiting_to} within {UPGRADE_DEADLINE:?}:\n{}",
                self.name,
                self.log()
            );
        }
        Ok(())
    }

    /// Replaces the config file (atomically, by rename) for reload and restart tests.
    pub fn rewrite_config(&self, toml: &str) -> anyhow::Result<()> {
        let staged = self.dir.path().join("config.staged");
        std::fs::write(&staged, toml)?;
        std::fs::rename(&staged, &self.config_path)?;
        Ok(())
    }

    /// The config file's current text.
    pub fn config_text(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(&self.config_path)?)
    }

    /// The sum of every `/metrics` sample whose series starts with `series` (a name, or a
    /// name with the start of its labels: `stratus_config_reloads_total{result="ok"}`).
    pub async fn metric(&self, series: &str) -> anyhow::Result<f64> {
        let text = client::get(self.admin, "admin", "/metrics", &[])
            .await?
            .text();
        Ok(text
            .lines()
            .filter(|l| l.starts_with(series))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    /// Replaces the config with `toml`, sends SIGHUP and waits (at most [`START_DEADLINE`])
    /// until the node counts a reload with `result` (`ok`, `rejected` or `refused`).
    pub async fn reload(&mut self, toml: &str, result: &str) -> anyhow::Result<()> {
        let series = format!("stratus_config_reloads_total{{result=\"{result}\"}}");
        let before = self.metric(&series).await?;
        self.rewrite_config(toml)?;
        self.signal(Signal::SIGHUP)?;
        let deadline = Instant::now() + START_DEADLINE;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!("node exited with {status} on SIGHUP:\n{}", self.log());
            }
            if self.metric(&series).await.unwrap_or(before) > before {
                return Ok(());
            }
            tokio::time::sleep(POLL).await;
        }
        anyhow::bail!(
            "no {result} reload counted within {START_DEADLINE:?}:\n{}",
            self.log()
        )
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

    /// What the node wrote to stderr so far (every process this handle started, in order).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("node.log")).unwrap_or_default()
    }

    /// Whether any process of this node panicked (its log says "panicked").
    pub fn panicked(&self) -> bool {
        self.log().contains("panicked")
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sets an environment variable for the next start of this node ([`NodeProcess::restart`],
    /// [`NodeProcess::upgrade`]), e.g. `LD_PRELOAD` of libfaketime to skew its clock.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.push((key.to_string(), value.to_string()));
    }

    /// The node's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The hand-over socket passed as `--upgrade-sock`.
    pub fn upgrade_sock(&self) -> PathBuf {
        self.dir.path().join("upgrade.sock")
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill_hard();
    }
}

/// Starts `stratus run` for `config` with `env`, appending stderr to `dir/node.log`.
fn spawn(
    bin: &Path,
    config: &Path,
    dir: &Path,
    upgrade: bool,
    env: &[(String, String)],
) -> anyhow::Result<Child> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("node.log"))?;
    let mut command = Command::new(bin);
    command
        .arg("run")
        .arg("--config")
        .arg(config)
        .arg("--upgrade-sock")
        .arg(dir.join("upgrade.sock"))
        .arg("--exit-with-parent");
    if upgrade {
        command.arg("--upgrade");
    }
    command.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    Ok(command.stdout(Stdio::null()).stderr(log).spawn()?)
}

/// Signals `child` unless it has been reaped (then its pid may be reused).
fn signal_child(child: &mut Child, sig: Signal) -> anyhow::Result<()> {
    if let Some(status) = child.try_wait()? {
        anyhow::bail!("already exited with {status}");
    }
    kill(Pid::from_raw(i32::try_from(child.id())?), sig)?;
    Ok(())
}
