//! The two systems under test, each in the two topologies the benchmark compares: one node in
//! front of the origin, and a two-tier fleet (one lower, two uppers, consistent hashing of the
//! URL between them). stratus runs as real `stratus run` processes; nginx from Debian runs
//! `proxy_cache` with `proxy_cache_lock` and `proxy_cache_use_stale`, its lower choosing an
//! upper by `hash $request_uri consistent`.
//!
//! Every process dies with the benchmark: stratus nodes by `--exit-with-parent`, nginx by
//! `setpriv --pdeathsig KILL` (nginx runs `master_process off`, one process doing the work of
//! one worker, because an nginx worker outlives a killed master).

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use stratus_chaos::node::{free_port, NodeProcess, OriginEntry};
use stratus_chaos::{Fleet, FleetOptions, FleetSpec};

/// The `Host` every benchmark request carries.
pub const HOST: &str = "bench.test";

/// Which implementation a deployment runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    /// This repository's node.
    Stratus,
    /// nginx with `proxy_cache`.
    Nginx,
    /// Another stratus build (`--baseline`): the same node before a change.
    Baseline,
}

impl System {
    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            System::Stratus => "stratus",
            System::Nginx => "nginx",
            System::Baseline => "stratus-before",
        }
    }
}

/// A running deployment: where clients connect and which processes do the work.
pub struct Deployment {
    /// What runs.
    pub system: System,
    /// The client-facing listener (the lower's in a fleet).
    pub front: SocketAddr,
    /// The client-facing process (measured for CPU and memory).
    pub front_pid: u32,
    /// The admin API of the front node (stratus only).
    pub admin: Option<SocketAddr>,
    /// Keeps the processes alive; dropping the deployment stops them.
    _processes: Processes,
}

/// What a deployment holds only so that its processes live until it drops.
enum Processes {
    Node { _node: Box<NodeProcess> },
    Fleet { _fleet: Box<Fleet> },
    Nginx { _nodes: Vec<NginxProcess> },
}

/// The `[[origin]]` table naming the benchmark host.
fn origin_entry(origin: SocketAddr) -> Vec<OriginEntry> {
    vec![OriginEntry::new(HOST, origin)]
}

/// One stratus node with one worker thread in front of `origin`; `extra` is appended to its
/// config (a `[cache]` or `[tracing]` table).
pub async fn stratus_node(
    bin: &Path,
    origin: SocketAddr,
    extra: &str,
) -> anyhow::Result<Deployment> {
    let (listen, admin) = (free_port()?, free_port()?);
    let toml = format!(
        "[node]\nname = \"bench-1\"\nrole = \"lower\"\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\nthreads = 1\ngrace_period = \"1s\"\n\n{extra}\n{}",
        stratus_chaos::node::origin_tables(&origin_entry(origin))
    );
    let node = NodeProcess::start_with(bin, "bench-1", listen, admin, &toml).await?;
    Ok(Deployment {
        system: System::Stratus,
        front: listen,
        front_pid: node.pid(),
        admin: Some(admin),
        _processes: Processes::Node {
            _node: Box::new(node),
        },
    })
}

/// A stratus fleet: one lower and two uppers, one worker thread each, plain HTTP between the
/// tiers (as nginx's are), in front of `origin`.
pub async fn stratus_fleet(bin: &Path, origin: SocketAddr) -> anyhow::Result<Deployment> {
    let spec = FleetSpec {
        lowers: 1,
        uppers: 2,
        origins: origin_entry(origin),
        ..FleetSpec::default()
    };
    let options = FleetOptions {
        plain_tiers: true,
        node_extra: "threads = 1".into(),
        ..FleetOptions::default()
    };
    let fleet = Fleet::start_with(bin, &spec, &options).await?;
    let lower = &fleet.lowers[0];
    Ok(Deployment {
        system: System::Stratus,
        front: lower.listen,
        front_pid: lower.pid(),
        admin: Some(lower.admin),
        _processes: Processes::Fleet {
            _fleet: Box::new(fleet),
        },
    })
}

/// One nginx process in front of `origin`, caching.
pub fn nginx_node(origin: SocketAddr) -> anyhow::Result<Deployment> {
    let node = NginxProcess::start(&format!("server {origin};"))?;
    Ok(Deployment {
        system: System::Nginx,
        front: node.listen,
        front_pid: node.pid(),
        admin: None,
        _processes: Processes::Nginx { _nodes: vec![node] },
    })
}

/// An nginx fleet: a caching lower choosing one of two caching uppers by
/// `hash $request_uri consistent`, the uppers in front of `origin`.
pub fn nginx_fleet(origin: SocketAddr) -> anyhow::Result<Deployment> {
    let up1 = NginxProcess::start(&format!("server {origin};"))?;
    let up2 = NginxProcess::start(&format!("server {origin};"))?;
    let lower = NginxProcess::start(&format!(
        "hash $request_uri consistent;\n    server {};\n    server {};",
        up1.listen, up2.listen
    ))?;
    Ok(Deployment {
        system: System::Nginx,
        front: lower.listen,
        front_pid: lower.pid(),
        admin: None,
        _processes: Processes::Nginx {
            _nodes: vec![lower, up1, up2],
        },
    })
}

/// A running `nginx` (one process, `master_process off`), killed when dropped.
struct NginxProcess {
    child: Child,
    listen: SocketAddr,
    _dir: tempfile::TempDir,
}

impl NginxProcess {
    /// Starts nginx caching in front of the upstream whose body is `upstream`; returns once it
    /// accepts connections.
    fn start(upstream: &str) -> anyhow::Result<NginxProcess> {
        let nginx = nginx_binary()?;
        let dir = tempfile::tempdir()?;
        let listen = free_port()?;
        let conf = nginx_conf(dir.path(), listen, upstream);
        std::fs::write(dir.path().join("nginx.conf"), conf)?;
        let mut command = if which("setpriv").is_some() {
            let mut c = Command::new("setpriv");
            c.arg("--pdeathsig").arg("KILL").arg(&nginx);
            c
        } else {
            Command::new(&nginx)
        };
        command
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = command.spawn().context("starting nginx")?;
        let mut node = NginxProcess {
            child,
            listen,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(listen).is_err() {
            if let Some(status) = node.child.try_wait()? {
                let log =
                    std::fs::read_to_string(node._dir.path().join("error.log")).unwrap_or_default();
                bail!("nginx exited with {status}: {log}");
            }
            if Instant::now() > deadline {
                bail!("nginx did not listen on {listen} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(node)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for NginxProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The configuration of one caching nginx: one process, the cache in `dir`, the upstream
/// block's body `upstream`.
fn nginx_conf(dir: &Path, listen: SocketAddr, upstream: &str) -> String {
    let d = dir.display();
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  # Both systems log every request, as an operator runs them (stratus: its access log on stderr).
  access_log {d}/access.log combined buffer=64k flush=1s;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  proxy_cache_path {d}/cache levels=1:2 keys_zone=bench:64m max_size=4g inactive=1h use_temp_path=off;
  upstream next {{
    {upstream}
    keepalive 64;
  }}
  server {{
    listen {listen};
    location / {{
      proxy_pass http://next;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_cache bench;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 10s;
      proxy_cache_use_stale error timeout updating http_500 http_502 http_503 http_504;
      proxy_cache_background_update on;
      proxy_next_upstream error timeout;
    }}
  }}
}}
"#
    )
}

/// The nginx binary: `NGINX` from the environment, else `nginx` on `PATH` or in `/usr/sbin`.
pub fn nginx_binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("NGINX") {
        return Ok(PathBuf::from(p));
    }
    which("nginx")
        .or_else(|| {
            let p = PathBuf::from("/usr/sbin/nginx");
            p.exists().then_some(p)
        })
        .context("nginx is not installed (benches/fleet.sh installs it)")
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}
