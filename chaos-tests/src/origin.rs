//! A scriptable origin that counts what it is asked: routes map a path to a [`Reply`] builder.
//!
//! Hand-written on tokio rather than on an HTTP server crate because tests need to misbehave on
//! purpose (truncate a body after its headers promised more, reset mid-body, stall, send
//! malformed framing byte for byte, hold a response until released, vanish mid-run), which
//! well-behaved server libraries refuse to do.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// A request as the origin saw it.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Header fields in order, names lowercased.
    pub headers: Vec<(String, String)>,
}

impl SeenRequest {
    /// The first value of a header, by lowercase name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A latch a reply waits on before it is sent; open it with [`Gate::open`].
#[derive(Clone)]
pub struct Gate {
    tx: Arc<watch::Sender<bool>>,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            tx: Arc::new(watch::Sender::new(false)),
        }
    }
}

impl Gate {
    /// Lets every waiting and future reply through.
    pub fn open(&self) {
        self.tx.send_replace(true);
    }

    async fn wait(&self) {
        let mut rx = self.tx.subscribe();
        // The sender lives in self, so wait_for cannot fail while we hold it.
        let _ = rx.wait_for(|open| *open).await;
    }
}

/// How a reply's body is delimited on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Framing {
    /// `Content-Length` set from the body; the connection stays open for the next request.
    ContentLength,
    /// `Transfer-Encoding: chunked`, one chunk per length listed (empty chunks are skipped,
    /// since a zero-size chunk ends the body); the connection stays open.
    Chunked(Vec<usize>),
    /// No length at all: `Connection: close`, the body, then FIN.
    CloseDelimited,
    /// These exact bytes are the whole response (status, headers, body ignored), then FIN.
    Raw(Vec<u8>),
}

/// What the origin answers.
#[derive(Clone)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Extra header fields.
    pub headers: Vec<(String, String)>,
    /// Body; framed as [`Reply::framing`] says.
    pub body: Vec<u8>,
    /// Close the connection (FIN) after this many body bytes, although more were promised.
    pub truncate_at: Option<usize>,
    /// Hold the whole reply until this gate opens.
    pub hold: Option<Gate>,
    /// Wait this long before answering.
    pub delay: Duration,
    /// How the body is delimited.
    pub framing: Framing,
    /// Reset the connection (RST) after this many body bytes.
    pub reset_at: Option<usize>,
    /// Send this many body bytes, pause this long, then send the rest.
    pub stall: Option<(usize, Duration)>,
}

impl Reply {
    /// A 200 with this body and no extra headers.
    pub fn ok(body: impl Into<Vec<u8>>) -> Reply {
        Reply {
            status: 200,
            headers: Vec::new(),
            body: body.into(),
            truncate_at: None,
            hold: None,
            delay: Duration::ZERO,
            framing: Framing::ContentLength,
            reset_at: None,
            stall: None,
        }
    }

    /// A 200 whose body is sent with `Transfer-Encoding: chunked`, one chunk per element.
    pub fn chunked(chunks: Vec<Vec<u8>>) -> Reply {
        let sizes = chunks.iter().map(Vec::len).collect();
        Reply {
            framing: Framing::Chunked(sizes),
            ..Reply::ok(chunks.concat())
        }
    }

    /// Sends no `Content-Length`: the body ends when the origin closes the connection.
    pub fn close_delimited(mut self) -> Reply {
        self.framing = Framing::CloseDelimited;
        self
    }

    /// Sends exactly `bytes` as the whole response, then closes: for malformed framing
    /// (a wrong or duplicate `Content-Length`, broken chunking, bad header bytes). Status,
    /// headers and body of this reply are ignored; the other faults count raw bytes.
    pub fn raw(mut self, bytes: impl Into<Vec<u8>>) -> Reply {
        self.framing = Framing::Raw(bytes.into());
        self
    }

    /// Resets the connection (RST instead of FIN) after `n` body bytes.
    pub fn reset_at(mut self, n: usize) -> Reply {
        self.reset_at = Some(n);
        self
    }

    /// Sends `n` body bytes, pauses for `pause`, then sends the rest.
    pub fn stall_body_after(mut self, n: usize, pause: Duration) -> Reply {
        self.stall = Some((n, pause));
        self
    }

    /// Sets the status.
    pub fn status(mut self, status: u16) -> Reply {
        self.status = status;
        self
    }

    /// Adds a header field.
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Closes the connection (FIN) after `n` body bytes, although more were promised.
    pub fn truncate_at(mut self, n: usize) -> Reply {
        self.truncate_at = Some(n);
        self
    }

    /// Holds the reply until `gate` opens.
    pub fn hold(mut self, gate: &Gate) -> Reply {
        self.hold = Some(gate.clone());
        self
    }

    /// Waits before answering.
    pub fn delay(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }
}

/// Builds the reply for a request; the `usize` is how many requests this path had before.
pub type Route = Arc<dyn Fn(&SeenRequest, usize) -> Reply + Send + Sync>;

/// A running test origin. Stops when dropped.
pub struct TestOrigin {
    addr: SocketAddr,
    routes: Arc<Mutex<HashMap<String, Route>>>,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
    tasks: Arc<Mutex<JoinSet<()>>>,
}

impl TestOrigin {
    /// Starts an origin on an ephemeral loopback port, on the current tokio runtime.
    pub async fn start() -> anyhow::Result<TestOrigin> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let routes: Arc<Mutex<HashMap<String, Route>>> = Arc::default();
        let seen: Arc<Mutex<Vec<SeenRequest>>> = Arc::default();
        let tasks: Arc<Mutex<JoinSet<()>>> = Arc::default();
        let (r, s, t) = (routes.clone(), seen.clone(), tasks.clone());
        tasks.lock().spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (r, s) = (r.clone(), s.clone());
                t.lock().spawn(serve(stream, r, s));
            }
        });
        Ok(TestOrigin {
            addr,
            routes,
            seen,
            tasks,
        })
    }

    /// `IP:port` to put in an `[[origin]]` table.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answers `path` (exact path and query) with `f`.
    pub fn route(
        &self,
        path: &str,
        f: impl Fn(&SeenRequest, usize) -> Reply + Send + Sync + 'static,
    ) {
        self.routes.lock().insert(path.to_string(), Arc::new(f));
    }

    /// Answers every path without a route of its own with `f`.
    pub fn fallback(&self, f: impl Fn(&SeenRequest, usize) -> Reply + Send + Sync + 'static) {
        self.routes.lock().insert(FALLBACK.to_string(), Arc::new(f));
    }

    /// Every request that arrived, in order.
    pub fn all_requests(&self) -> Vec<SeenRequest> {
        self.seen.lock().clone()
    }

    /// Answers `path` with the same reply every time.
    pub fn fixed(&self, path: &str, reply: Reply) {
        self.route(path, move |_, _| reply.clone());
    }

    /// How many requests arrived for `path`.
    pub fn count(&self, path: &str) -> usize {
        self.seen.lock().iter().filter(|r| r.path == path).count()
    }

    /// How many requests arrived, for any path.
    pub fn total(&self) -> usize {
        self.seen.lock().len()
    }

    /// Every request that arrived for `path`, in order.
    pub fn requests(&self, path: &str) -> Vec<SeenRequest> {
        self.seen
            .lock()
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    /// Stops listening and drops every open connection: the origin is down.
    pub fn stop(&self) {
        self.tasks.lock().abort_all();
    }
}

impl Drop for TestOrigin {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The route key of the fallback handler (not a valid request path).
const FALLBACK: &str = "*fallback*";

async fn serve(
    mut stream: TcpStream,
    routes: Arc<Mutex<HashMap<String, Route>>>,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
) {
    let mut buf = Vec::with_capacity(4096);
    while let Some((req, _body)) = crate::wire::read_request(&mut stream, &mut buf).await {
        let route = {
            let routes = routes.lock();
            routes
                .get(&req.path)
                .or_else(|| routes.get(FALLBACK))
                .cloned()
        };
        let nth = {
            let mut seen = seen.lock();
            let nth = seen.iter().filter(|r| r.path == req.path).count();
            seen.push(req.clone());
            nth
        };
        let reply = match route {
            Some(f) => f(&req, nth),
            None => Reply::ok("no such route\n").status(404),
        };
        if let Some(gate) = &reply.hold {
            gate.wait().await;
        }
        if !reply.delay.is_zero() {
            tokio::time::sleep(reply.delay).await;
        }
        let wire = Wire::encode(&reply, req.method == "HEAD");
        // The first cut (FIN or RST) decides where the reply stops and how it ends.
        let cut = match (reply.truncate_at, reply.reset_at) {
            (Some(t), Some(r)) if r < t => Some((r, Ending::Reset)),
            (Some(t), _) => Some((t, Ending::Fin)),
            (None, Some(r)) => Some((r, Ending::Reset)),
            (None, None) => None,
        };
        let stop = cut.map_or(wire.bytes.len(), |(n, _)| wire.offset(n));
        let resume = reply.stall.map_or(stop, |(n, _)| wire.offset(n).min(stop));
        if stream.write_all(&wire.bytes[..resume]).await.is_err() {
            return;
        }
        if let Some((_, pause)) = reply.stall {
            let _ = stream.flush().await;
            tokio::time::sleep(pause).await;
        }
        if stream.write_all(&wire.bytes[resume..stop]).await.is_err() {
            return;
        }
        match cut.map(|(_, ending)| ending) {
            Some(Ending::Reset) => {
                let _ = stream.set_zero_linger();
                return;
            }
            Some(Ending::Fin) => {
                let _ = stream.flush().await;
                return; // the promised rest never comes
            }
            // A request that asked for `Connection: close` gets it (RFC 9112 §9.6).
            None if wire.closes || wants_close(&req) => {
                close_cleanly(stream).await;
                return;
            }
            None => {}
        }
    }
}

/// Whether the request's `Connection` header has the `close` option.
fn wants_close(req: &SeenRequest) -> bool {
    req.headers
        .iter()
        .filter(|(k, _)| k == "connection")
        .flat_map(|(_, v)| v.split(','))
        .any(|option| option.trim().eq_ignore_ascii_case("close"))
}

/// How a reply that stops early ends.
#[derive(Clone, Copy)]
enum Ending {
    Fin,
    Reset,
}

/// The longest a closing connection is drained so that its close stays a FIN.
const DRAIN_DEADLINE: Duration = Duration::from_secs(2);

/// FIN, then discard what the peer still sends (unread bytes would turn the close into RST).
async fn close_cleanly(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let drain = async {
        let mut sink = [0u8; 4096];
        while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
    };
    let _ = tokio::time::timeout(DRAIN_DEADLINE, drain).await;
}

/// A reply as bytes on the wire, with where its body bytes sit.
struct Wire {
    bytes: Vec<u8>,
    /// Runs of body bytes as (offset in the body, offset on the wire, length), in order.
    runs: Vec<(usize, usize, usize)>,
    body_len: usize,
    /// The connection closes after this reply.
    closes: bool,
}

impl Wire {
    fn encode(reply: &Reply, head_only: bool) -> Wire {
        let mut head = format!("HTTP/1.1 {} X\r\n", reply.status);
        for (k, v) in &reply.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        let body: &[u8] = if head_only { &[] } else { &reply.body };
        let mut wire = Wire {
            bytes: Vec::new(),
            runs: Vec::new(),
            body_len: body.len(),
            closes: false,
        };
        match &reply.framing {
            Framing::ContentLength => {
                head.push_str(&format!("Content-Length: {}\r\n\r\n", reply.body.len()));
                wire.bytes.extend_from_slice(head.as_bytes());
                wire.runs.push((0, wire.bytes.len(), body.len()));
                wire.bytes.extend_from_slice(body);
            }
            Framing::CloseDelimited => {
                head.push_str("Connection: close\r\n\r\n");
                wire.bytes.extend_from_slice(head.as_bytes());
                wire.runs.push((0, wire.bytes.len(), body.len()));
                wire.bytes.extend_from_slice(body);
                wire.closes = true;
            }
            Framing::Chunked(sizes) => {
                head.push_str("Transfer-Encoding: chunked\r\n\r\n");
                wire.bytes.extend_from_slice(head.as_bytes());
                if !head_only {
                    let mut at = 0;
                    for &size in sizes.iter().filter(|&&s| s > 0) {
                        let end = (at + size).min(body.len());
                        wire.bytes
                            .extend_from_slice(format!("{:x}\r\n", end - at).as_bytes());
                        wire.runs.push((at, wire.bytes.len(), end - at));
                        wire.bytes.extend_from_slice(&body[at..end]);
                        wire.bytes.extend_from_slice(b"\r\n");
                        at = end;
                    }
                    wire.bytes.extend_from_slice(b"0\r\n\r\n");
                }
            }
            Framing::Raw(raw) => {
                wire.bytes.extend_from_slice(raw);
                wire.runs.push((0, 0, raw.len()));
                wire.body_len = raw.len();
                wire.closes = true;
            }
        }
        wire
    }

    /// The wire offset just after `n` body bytes; the whole reply once `n` covers the body.
    fn offset(&self, n: usize) -> usize {
        if n >= self.body_len {
            return self.bytes.len();
        }
        self.runs
            .iter()
            .find(|(start, _, len)| n < start + len)
            .map_or(self.bytes.len(), |(start, wire_at, _)| {
                wire_at + (n - start)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client;

    /// Every exchange in these tests ends well within this.
    const DEADLINE: Duration = Duration::from_secs(10);

    /// Sends a GET for `path` and returns every byte until the connection ends, and how it
    /// ended (`None` for a clean close).
    async fn exchange(addr: SocketAddr, path: &str) -> (Vec<u8>, Option<std::io::ErrorKind>) {
        let mut stream = TcpStream::connect(addr).await.expect("connect to origin");
        let request = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("send request");
        let mut got = Vec::new();
        let read = tokio::time::timeout(DEADLINE, async {
            let mut chunk = [0u8; 8192];
            loop {
                match stream.read(&mut chunk).await {
                    Ok(0) => return None,
                    Ok(n) => got.extend_from_slice(&chunk[..n]),
                    Err(e) => return Some(e.kind()),
                }
            }
        })
        .await
        .expect("exchange within deadline");
        (got, read)
    }

    #[tokio::test]
    async fn chunked_replies_are_chunked() {
        let origin = TestOrigin::start().await.expect("origin");
        origin.fixed(
            "/c",
            Reply::chunked(vec![b"hello ".to_vec(), Vec::new(), b"world".to_vec()]),
        );
        let r = client::get(origin.addr(), "t", "/c", &[])
            .await
            .expect("response");
        assert_eq!(r.header("transfer-encoding"), Some("chunked"));
        assert_eq!(r.header("content-length"), None);
        assert!(r.complete);
        assert_eq!(r.text(), "hello world");
        let (raw, ending) = exchange(origin.addr(), "/c").await;
        assert_eq!(ending, None);
        assert!(raw.ends_with(b"6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n"));
    }

    #[tokio::test]
    async fn close_delimited_replies_have_no_length() {
        let origin = TestOrigin::start().await.expect("origin");
        origin.fixed("/d", Reply::ok("until close").close_delimited());
        let (raw, ending) = exchange(origin.addr(), "/d").await;
        assert_eq!(ending, None);
        let r = client::parse(&raw, false).expect("parse");
        assert_eq!(r.header("content-length"), None);
        assert_eq!(r.header("transfer-encoding"), None);
        assert_eq!(r.text(), "until close");
    }

    #[tokio::test]
    async fn raw_replies_are_sent_byte_for_byte() {
        let origin = TestOrigin::start().await.expect("origin");
        let bytes =
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabc".to_vec();
        origin.fixed("/r", Reply::ok("ignored").raw(bytes.clone()));
        let (raw, ending) = exchange(origin.addr(), "/r").await;
        assert_eq!(ending, None);
        assert_eq!(raw, bytes);
    }

    #[tokio::test]
    async fn reset_at_resets_after_that_many_body_bytes() {
        let origin = TestOrigin::start().await.expect("origin");
        origin.fixed("/x", Reply::ok(vec![b'x'; 10_000]).reset_at(1000));
        let (raw, ending) = exchange(origin.addr(), "/x").await;
        assert_eq!(ending, Some(std::io::ErrorKind::ConnectionReset));
        let r = client::parse(&raw, false).expect("parse");
        assert_eq!(r.body.len(), 1000);
        assert!(!r.complete);
        // In a chunked body the count is of payload bytes, not framing.
        origin.fixed(
            "/xc",
            Reply::chunked(vec![vec![b'a'; 600], vec![b'b'; 600]]).reset_at(700),
        );
        let (raw, ending) = exchange(origin.addr(), "/xc").await;
        assert_eq!(ending, Some(std::io::ErrorKind::ConnectionReset));
        let r = client::parse(&raw, false).expect("parse");
        assert_eq!(r.body.len(), 700);
        assert!(!r.complete);
    }

    #[tokio::test]
    async fn truncate_at_closes_cleanly_mid_body() {
        let origin = TestOrigin::start().await.expect("origin");
        origin.fixed("/t", Reply::ok(vec![b't'; 5000]).truncate_at(100));
        let (raw, ending) = exchange(origin.addr(), "/t").await;
        assert_eq!(ending, None);
        let r = client::parse(&raw, false).expect("parse");
        assert_eq!(r.body.len(), 100);
        assert!(!r.complete);
    }

    #[tokio::test]
    async fn stalled_bodies_arrive_in_two_parts() {
        let origin = TestOrigin::start().await.expect("origin");
        let pause = Duration::from_millis(300);
        origin.fixed(
            "/s",
            Reply::ok(vec![b's'; 2000]).stall_body_after(500, pause),
        );
        let mut stream = TcpStream::connect(origin.addr()).await.expect("connect");
        stream
            .write_all(b"GET /s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .expect("send");
        let mut got = Vec::new();
        let mut chunk = [0u8; 8192];
        // Read until the head and the first 500 body bytes are in.
        let first = tokio::time::timeout(DEADLINE, async {
            for _ in 0..100 {
                if let Ok(r) = client::parse(&got, false) {
                    if r.body.len() >= 500 {
                        return;
                    }
                }
                match stream.read(&mut chunk).await {
                    Ok(n) if n > 0 => got.extend_from_slice(&chunk[..n]),
                    _ => return,
                }
            }
        });
        first.await.expect("first part within deadline");
        let r = client::parse(&got, false).expect("parse first part");
        assert_eq!(r.body.len(), 500, "exactly the bytes before the stall");
        let stalled_at = std::time::Instant::now();
        let _ = tokio::time::timeout(DEADLINE, stream.read_to_end(&mut got))
            .await
            .expect("rest within deadline");
        assert!(stalled_at.elapsed() >= pause - Duration::from_millis(50));
        let r = client::parse(&got, false).expect("parse");
        assert!(r.complete);
        assert_eq!(r.body.len(), 2000);
    }

    #[tokio::test]
    async fn total_counts_every_request() {
        let origin = TestOrigin::start().await.expect("origin");
        origin.fixed("/a", Reply::ok("a"));
        for path in ["/a", "/a", "/missing"] {
            client::get(origin.addr(), "t", path, &[])
                .await
                .expect("response");
        }
        assert_eq!(origin.count("/a"), 2);
        assert_eq!(origin.total(), 3);
    }
}
