//! `stratus demo`: the system on one machine in one command (a demo origin, 2 upper-tier and
//! 3 lower-tier nodes), and the built-in demo origin.
//!
//! The demo starts a demo origin in this process and every node as a real child process of
//! this same binary (`stratus run --config …`), so what you poke at is what operators run.
//! Ctrl-C (or SIGTERM) sends SIGTERM to every node, waits for them, and exits.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The host the demo origin serves.
pub const DEMO_HOST: &str = "demo.test";
/// Lower-tier nodes in the demo fleet.
const LOWER_NODES: u16 = 3;
/// How long a node may take to come up.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// Upper bound on a request head the demo servers read.
const MAX_HEAD: usize = 16 * 1024;
/// Upper bound on a request body the demo servers read (OTLP batches are far smaller).
const MAX_BODY: usize = 16 * 1024 * 1024;

/// Options of `stratus demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// First of the 20 ports the demo uses.
    pub base_port: u16,
    /// Send spans to this OTLP/HTTP collector instead of the local one.
    pub otlp: Option<String>,
}

/// One demo route: path → (status, headers, body).
fn demo_response(path: &str) -> (u16, Vec<(&'static str, String)>, Vec<u8>) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    match path {
        "/" => (
            200,
            vec![
                ("cache-control", "max-age=60".into()),
                ("content-type", "text/plain".into()),
            ],
            b"stratus demo origin: try /hello, /time, /nocache, /big, /vary\n".to_vec(),
        ),
        "/hello" => (
            200,
            vec![
                ("cache-control", "max-age=300".into()),
                ("etag", "\"hello-v1\"".into()),
                ("content-type", "text/plain".into()),
            ],
            b"hello from the origin\n".to_vec(),
        ),
        "/time" => (
            200,
            vec![
                (
                    "cache-control",
                    "max-age=5, stale-while-revalidate=30, stale-if-error=300".into(),
                ),
                ("content-type", "text/plain".into()),
            ],
            format!("origin time {now}\n").into_bytes(),
        ),
        "/nocache" => (
            200,
            vec![
                ("cache-control", "no-store".into()),
                ("content-type", "text/plain".into()),
            ],
            format!("never cached, generated at {now}\n").into_bytes(),
        ),
        "/big" => (
            200,
            vec![
                ("cache-control", "max-age=600".into()),
                ("content-type", "application/octet-stream".into()),
            ],
            vec![b'x'; 1024 * 1024],
        ),
        "/vary" => (
            200,
            vec![
                ("cache-control", "max-age=60".into()),
                ("vary", "Accept-Language".into()),
                ("content-type", "text/plain".into()),
            ],
            b"varies by Accept-Language\n".to_vec(),
        ),
        _ => (
            404,
            vec![("content-type", "text/plain".into())],
            b"not found\n".to_vec(),
        ),
    }
}

/// Serves the demo origin on `listener` until the task is dropped.
pub async fn serve_origin(listener: TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        // Each answer is one write; without this, Nagle's algorithm held the next answer on a
        // reused connection until the peer's delayed ACK (~40 ms per miss).
        let _ = stream.set_nodelay(true);
        tokio::spawn(origin_connection(stream));
    }
}

/// One request read off a connection: its method and path; the body is consumed.
struct Incoming {
    method: String,
    path: String,
}

/// Reads one request (head, then a `Content-Length` body) from `stream`, keeping what follows
/// in `buf`. `None` when the peer closed, or sent something malformed or oversized.
async fn read_request(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Incoming> {
    let (incoming, head, body) = loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(n)) => {
                let len = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| {
                        std::str::from_utf8(h.value)
                            .ok()?
                            .trim()
                            .parse::<usize>()
                            .ok()
                    })
                    .unwrap_or(0);
                let incoming = Incoming {
                    method: req.method.unwrap_or("GET").to_string(),
                    path: req.path.unwrap_or("/").to_string(),
                };
                break (incoming, n, len.min(MAX_BODY));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            _ => return None,
        }
        let mut chunk = [0u8; 8192];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    while buf.len() < head + body {
        let mut chunk = [0u8; 65536];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    buf.drain(..head + body);
    Some(incoming)
}

async fn origin_connection(mut stream: TcpStream) {
    let mut buf = Vec::with_capacity(2048);
    while let Some(req) = read_request(&mut stream, &mut buf).await {
        let path = req.path.split('?').next().unwrap_or("/");
        let (status, headers, body) = demo_response(path);
        let reason = if status == 200 { "OK" } else { "Not Found" };
        let mut head = format!("HTTP/1.1 {status} {reason}\r\n");
        for (k, v) in &headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
        let mut answer = head.into_bytes();
        if req.method != "HEAD" {
            answer.extend_from_slice(&body);
        }
        if stream.write_all(&answer).await.is_err() {
            return;
        }
    }
}

/// Accepts OTLP/HTTP exports (`POST /v1/traces`) and discards them with a 200: a stand-in
/// collector for load benchmarks of the export path. It reads bodies fully, like a collector.
pub async fn serve_otlp_sink(listener: TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        let _ = stream.set_nodelay(true);
        tokio::spawn(sink_connection(stream));
    }
}

async fn sink_connection(mut stream: TcpStream) {
    let mut buf = Vec::with_capacity(64 * 1024);
    while read_request(&mut stream, &mut buf).await.is_some() {
        let answer =
            b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
        if stream.write_all(answer).await.is_err() {
            return;
        }
    }
}

/// Writes `text` to a new file only its owner may read (`0600`), replacing any old one.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())
}

/// A node the demo started.
struct DemoNode {
    name: String,
    child: Child,
    listen: SocketAddr,
    admin: SocketAddr,
}

/// Ports, as offsets from `--base-port`: origin 0, lower data 1-3, upper data 4-5,
/// lower admin 11-13, upper admin 14-15, trace receiver 18, trace UI 19.
const UPPER_NODES: u16 = 2;

fn node_config(
    name: &str,
    role: &str,
    listen: SocketAddr,
    admin: SocketAddr,
    origin: SocketAddr,
    tier: &str,
) -> String {
    format!(
        "[node]\nname = \"{name}\"\nrole = \"{role}\"\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\ngrace_period = \"1s\"\n\n\
         [cache]\ncapacity = \"64MiB\"\nmax_object_size = \"8MiB\"\n\n{tier}\n\
         [[origin]]\nhost = \"{DEMO_HOST}\"\naddress = \"{origin}\"\n"
    )
}

fn spawn_node(
    exe: &Path,
    dir: &Path,
    name: &str,
    listen: SocketAddr,
    admin: SocketAddr,
    config_text: &str,
) -> anyhow::Result<DemoNode> {
    let config = dir.join(format!("{name}.toml"));
    write_private(&config, config_text)?;
    let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
    let child = Command::new(exe)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .arg("--upgrade-sock")
        .arg(dir.join(format!("{name}.sock")))
        // A demo killed without Ctrl-C must not leave its nodes behind.
        .arg("--exit-with-parent")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    Ok(DemoNode {
        name: name.to_string(),
        child,
        listen,
        admin,
    })
}

async fn wait_healthy(node: &mut DemoNode, dir: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_DEADLINE;
    while Instant::now() < deadline {
        if let Some(status) = node.child.try_wait()? {
            let log =
                std::fs::read_to_string(dir.join(format!("{}.log", node.name))).unwrap_or_default();
            anyhow::bail!("{} exited with {status}:\n{log}", node.name);
        }
        if let Ok(mut s) = TcpStream::connect(node.admin).await {
            let probe = b"GET /healthz HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n";
            let mut answer = Vec::new();
            if s.write_all(probe).await.is_ok()
                && s.read_to_end(&mut answer).await.is_ok()
                && answer.starts_with(b"HTTP/1.1 200")
            {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!(
        "{} did not become healthy within {START_DEADLINE:?}",
        node.name
    )
}

fn terminate(nodes: &mut [DemoNode]) {
    for n in nodes.iter() {
        if let Ok(pid) = i32::try_from(n.child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    for n in nodes.iter_mut() {
        let _ = n.child.wait();
    }
}

/// Runs the demo until Ctrl-C or SIGTERM.
pub async fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let base = opts.base_port;
    anyhow::ensure!(
        base <= u16::MAX - 20,
        "--base-port must leave room for 20 ports"
    );
    let at = |offset: u16| SocketAddr::from(([127, 0, 0, 1], base + offset));
    let exe: PathBuf = std::env::current_exe().context("locating the stratus binary")?;
    let dir = std::env::temp_dir().join(format!("stratus-demo-{base}"));
    std::fs::create_dir_all(&dir)?;
    // The configs hold the fleet secret: the directory and its files are the user's alone.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;

    let origin_addr = at(0);
    let listener = TcpListener::bind(origin_addr)
        .await
        .with_context(|| format!("demo origin: cannot bind {origin_addr}"))?;
    let origin = tokio::spawn(serve_origin(listener));

    let secret = format!(
        "{:032x}{:032x}",
        rand::random::<u128>(),
        rand::random::<u128>()
    );
    // Tracing is on: every node exports to the bundled Jaeger (an OTLP/HTTP receiver at
    // offset 18, its UI at 19), unless --otlp points them at a collector of the user's.
    let (otlp_url, trace_ui) = match &opts.otlp {
        Some(url) => (url.clone(), None),
        None => {
            let ui = TcpListener::bind(at(19))
                .await
                .with_context(|| format!("trace UI: cannot bind {}", at(19)))?;
            let receiver = TcpListener::bind(at(18))
                .await
                .with_context(|| format!("trace receiver: cannot bind {}", at(18)))?;
            let task = tokio::spawn(crate::demo_jaeger::serve(ui, receiver));
            (format!("http://{}", at(18)), Some(task))
        }
    };
    // [tracing] is a table of its own, so it can follow the [tier] lines.
    let tracing = format!("\n[tracing]\notlp_endpoint = \"{otlp_url}\"\nsample_ratio = 1.0\n");
    let upper_tier = format!("[tier]\nsecret = \"{secret}\"\n{tracing}");
    let members: Vec<String> = (0..UPPER_NODES)
        .map(|i| format!("\"{}\"", at(4 + i)))
        .collect();
    let lower_tier = format!(
        "[tier]\nsecret = \"{secret}\"\nupper = [{}]\n{tracing}",
        members.join(", ")
    );
    let mut plan = Vec::new();
    for i in 0..UPPER_NODES {
        let name = format!("up-{}", i + 1);
        let text = node_config(
            &name,
            "upper",
            at(4 + i),
            at(14 + i),
            origin_addr,
            &upper_tier,
        );
        plan.push((name, at(4 + i), at(14 + i), text));
    }
    for i in 0..LOWER_NODES {
        let name = format!("edge-{}", i + 1);
        let text = node_config(
            &name,
            "lower",
            at(1 + i),
            at(11 + i),
            origin_addr,
            &lower_tier,
        );
        plan.push((name, at(1 + i), at(11 + i), text));
    }
    let mut nodes = Vec::new();
    for (name, listen, admin, text) in &plan {
        match spawn_node(&exe, &dir, name, *listen, *admin, text) {
            Ok(n) => nodes.push(n),
            Err(e) => {
                terminate(&mut nodes);
                return Err(e);
            }
        }
    }
    for i in 0..nodes.len() {
        if let Err(e) = wait_healthy(&mut nodes[i], &dir).await {
            terminate(&mut nodes);
            return Err(e);
        }
    }

    // Listen for Ctrl-C and SIGTERM before saying how to stop: a signal sent right after the
    // last line must find the handler, not the default action (which would orphan the nodes).
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    println!(
        "stratus demo: origin {DEMO_HOST} at http://{origin_addr}/ (logs and configs in {})",
        dir.display()
    );
    for n in nodes.iter().filter(|n| n.name.starts_with("edge-")) {
        println!("client: {} http://{}/", n.name, n.listen);
    }
    for n in &nodes {
        println!(
            "admin: {} http://{}/ (/metrics, /ring, /healthz)",
            n.name, n.admin
        );
    }
    match &trace_ui {
        Some(_) => println!(
            "jaeger: http://{}/ (traces of service \"stratus\"; every node exports to {otlp_url})",
            at(19)
        ),
        None => {
            println!("traces: every node exports to {otlp_url} (OTLP/HTTP, service \"stratus\")")
        }
    }
    let first_lower = nodes
        .iter()
        .find(|n| n.name.starts_with("edge-"))
        .map_or(at(1), |n| n.listen);
    println!("curl -si -H 'Host: {DEMO_HOST}' http://{first_lower}/hello");
    println!("Ctrl-C stops everything.");

    tokio::select! {
        _ = interrupt.recv() => {}
        _ = term.recv() => {}
    }
    // stderr: stdout may be a pipe its reader closed already.
    eprintln!("stopping…");
    terminate(&mut nodes);
    origin.abort();
    if let Some(task) = trace_ui {
        task.abort();
    }
    Ok(())
}
