//! Slow and greedy clients, tried as one: a header dripped a byte at a time is cut at the
//! header deadline, an idle keep-alive connection is closed at the idle timeout, one address
//! cannot hold more connections than its cap (the next is answered 503 and a freed slot is
//! reused) — each counted in `stratus_client_limits_total` — while a slow upload after a whole
//! header is not cut by the header deadline.

use std::path::Path;
use std::time::{Duration, Instant};

use stratus_chaos::{NodeProcess, OriginEntry, Reply, TestOrigin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HOST: &str = "example.test";

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_stratus"))
}

async fn node(extra: &str) -> (TestOrigin, NodeProcess) {
    let origin = TestOrigin::start().await.expect("origin");
    origin.fallback(|_, _| Reply::ok("ok").header("cache-control", "max-age=60"));
    let node = NodeProcess::start(
        bin(),
        "edge-1",
        &[OriginEntry::new(HOST, origin.addr())],
        extra,
    )
    .await
    .expect("node starts");
    (origin, node)
}

/// Reads until the peer closes (or 10 s pass); returns what arrived and when it closed.
async fn until_closed(stream: &mut TcpStream) -> (Vec<u8>, Option<Instant>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (buf, Some(Instant::now())),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => {}
        }
    }
    (buf, None)
}

async fn limit(node: &NodeProcess, which: &str) -> f64 {
    node.metric(&format!("stratus_client_limits_total{{limit=\"{which}\"}}"))
        .await
        .expect("metrics")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dripped_header_is_cut_at_the_header_deadline() {
    let (_origin, node) = node("header_timeout = \"1s\"").await;
    let mut s = TcpStream::connect(node.listen).await.expect("connect");
    let started = Instant::now();
    let request =
        format!("GET /drip HTTP/1.1\r\nHost: {HOST}\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n");
    let mut closed_at = None;
    for b in request.bytes() {
        if s.write_all(&[b]).await.is_err() {
            closed_at = Some(Instant::now());
            break;
        }
        let mut one = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(250), s.read(&mut one)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed_at = Some(Instant::now());
                break;
            }
            Ok(Ok(_)) => panic!("an answer to a header that never ended"),
            Err(_) => {}
        }
    }
    let closed_at = closed_at.expect("closed before the header ended");
    // Each byte came within pingora's per-read timeout; only the total deadline can cut it.
    assert!(
        closed_at - started < Duration::from_secs(5),
        "{:?}",
        closed_at - started
    );
    assert!(limit(&node, "header_timeout").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_keep_alive_connection_is_closed_at_the_idle_timeout() {
    let (_origin, node) = node("idle_timeout = \"1s\"").await;
    let mut s = TcpStream::connect(node.listen).await.expect("connect");
    let request = format!("GET /idle HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
    s.write_all(request.as_bytes()).await.expect("write");
    let answered = Instant::now();
    let (buf, closed) = until_closed(&mut s).await;
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"));
    let closed = closed.expect("the idle connection was closed");
    assert!(
        closed - answered < Duration::from_secs(5),
        "{:?}",
        closed - answered
    );
    assert!(limit(&node, "idle_timeout").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_client_cannot_hold_more_connections_than_its_cap() {
    let (_origin, node) = node("max_client_connections = 4").await;
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(node.listen).await.expect("connect");
        // A request answered, the connection kept: it holds its slot.
        let request = format!("GET /held HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
        s.write_all(request.as_bytes()).await.expect("write");
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).await.expect("answer");
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        held.push(s);
    }
    let mut extra = TcpStream::connect(node.listen).await.expect("connect");
    let (buf, closed) = until_closed(&mut extra).await;
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("too many connections"), "{text}");
    assert!(closed.is_some());
    assert!(limit(&node, "connections").await >= 1.0);
    // A freed slot is someone's again.
    drop(held.pop());
    let served = stratus_chaos::client::get(node.listen, HOST, "/after", &[]).await;
    let mut ok = served.is_ok_and(|r| r.status == 200);
    for _ in 0..20 {
        if ok {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        ok = stratus_chaos::client::get(node.listen, HOST, "/after", &[])
            .await
            .is_ok_and(|r| r.status == 200);
    }
    assert!(ok, "a freed slot serves a new connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_upload_after_a_whole_header_is_not_cut_by_the_header_deadline() {
    let (origin, node) = node("header_timeout = \"1s\"").await;
    origin.fixed("/upload", Reply::ok("stored").status(201));
    let mut s = TcpStream::connect(node.listen).await.expect("connect");
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 6\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.expect("header");
    for b in b"abcdef" {
        tokio::time::sleep(Duration::from_millis(400)).await;
        s.write_all(&[*b]).await.expect("body byte");
    }
    let (buf, _) = until_closed(&mut s).await;
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 201"), "{text}");
    assert_eq!(limit(&node, "header_timeout").await, 0.0);
}
