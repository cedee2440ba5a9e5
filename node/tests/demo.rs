//! `stratus demo` as a newcomer runs it: every line it prints names its node, a request
//! through a lower works, its trace shows up in the bundled Jaeger's API, the files holding the
//! fleet secret are private, and Ctrl-C (SIGTERM here) leaves nothing running.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use stratus_chaos::{client, eventually};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_stratus"))
}

/// Kills the demo if the test fails before stopping it.
struct Demo(Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_demo_runs_the_fleet_with_its_jaeger() {
    // 20 consecutive ports below Linux's ephemeral range (32768+), so no outgoing connection of
    // a test running beside it holds one; a base whose ports are taken anyway makes the demo
    // exit at once, and the next base is tried.
    let slot = |i: u32| 20_000 + ((std::process::id() + i * 97) % 600) as u16 * 20;
    let mut attempt = None;
    for base in (0..5).map(slot) {
        let log = tempfile::NamedTempFile::new().expect("stderr file");
        let mut child = Command::new(bin())
            .args([
                "demo",
                "--base-port",
                &base.to_string(),
                "--exit-with-parent",
            ])
            .stdout(Stdio::piped())
            .stderr(log.reopen().expect("stderr"))
            .spawn()
            .expect("demo starts");
        let stdout = child.stdout.take().expect("stdout");
        let demo = Demo(child);
        // Read every line until the demo exits (a closed pipe must not be what stops it);
        // hand over the ones up to "Ctrl-C stops everything."
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = Vec::new();
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let done = line.starts_with("Ctrl-C");
                lines.push(line);
                if done {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(std::mem::take(&mut lines));
                    }
                }
            }
        });
        let lines = tokio::task::spawn_blocking(move || rx.recv().unwrap_or_default());
        let lines = tokio::time::timeout(Duration::from_secs(60), lines)
            .await
            .expect("the demo comes up within a minute")
            .expect("reader");
        if lines.is_empty() {
            let why = std::fs::read_to_string(log.path()).unwrap_or_default();
            eprintln!("demo on base port {base} did not start: {why}");
            continue;
        }
        attempt = Some((base, demo, lines));
        break;
    }
    let (base, mut demo, lines) = attempt.expect("the demo starts on one of five port ranges");
    let text = lines.join("\n");
    let clients: Vec<&String> = lines.iter().filter(|l| l.starts_with("client: ")).collect();
    let admins: Vec<&String> = lines.iter().filter(|l| l.starts_with("admin: ")).collect();
    assert_eq!(clients.len(), 3, "{text}");
    assert_eq!(admins.len(), 5, "{text}");
    for (i, c) in clients.iter().enumerate() {
        assert!(
            c.starts_with(&format!("client: edge-{} http://", i + 1)),
            "{c}"
        );
    }
    assert!(
        admins.iter().any(|a| a.starts_with("admin: up-1 http://")),
        "{text}"
    );
    let jaeger = lines
        .iter()
        .find_map(|l| l.strip_prefix("jaeger: "))
        .and_then(|l| l.split_whitespace().next())
        .expect("a jaeger: line");
    let jaeger: std::net::SocketAddr = jaeger
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .expect("jaeger address");

    // A request through the first lower, traced.
    let lower: std::net::SocketAddr = clients[0]
        .split_whitespace()
        .nth(2)
        .and_then(|u| {
            u.trim_start_matches("http://")
                .trim_end_matches('/')
                .parse()
                .ok()
        })
        .expect("client address");
    let r = client::get(lower, "demo.test", "/hello", &[])
        .await
        .expect("exchange");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello from the origin\n");
    let traced = eventually(Duration::from_secs(20), || async move {
        client::get(
            jaeger,
            "jaeger",
            "/api/traces?service=stratus&limit=20",
            &[],
        )
        .await
        .is_ok_and(|r| r.status == 200 && r.text().contains("GET"))
    })
    .await;
    assert!(
        traced,
        "the request's trace never reached the bundled Jaeger"
    );
    let ui = client::get(jaeger, "jaeger", "/", &[]).await.expect("ui");
    assert_eq!(ui.status, 200);
    assert!(ui.text().contains("Jaeger UI"));

    // The configs hold the fleet secret: the owner's alone.
    let dir = std::env::temp_dir().join(format!("stratus-demo-{base}"));
    for entry in std::fs::read_dir(&dir).expect("demo dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", path.display());
        }
    }

    // Ctrl-C: every node stops, then the demo.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(demo.0.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("signal");
    let deadline = Instant::now() + Duration::from_secs(30);
    while demo.0.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "the demo did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        demo.0.wait().expect("status").success(),
        "the demo stops cleanly"
    );
    // Its nodes were stopped before it returned.
    assert!(
        std::net::TcpStream::connect(lower).is_err(),
        "a node outlived the demo"
    );
}
