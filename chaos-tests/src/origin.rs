//! A scriptable origin that counts what it is asked: routes map a path to a [`Reply`] builder.
//!
//! Hand-written on tokio rather than on an HTTP server crate because tests need to misbehave on
//! purpose (truncate a body after its headers promised more, hold a response until released,
//! vanish mid-run), which well-behaved server libraries refuse to do.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::io::AsyncWriteExt;
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

/// What the origin answers.
#[derive(Clone)]
pub struct Reply {
    /// Status code.
    pub status: u16,
    /// Extra header fields.
    pub headers: Vec<(String, String)>,
    /// Body; `Content-Length` is set from it.
    pub body: Vec<u8>,
    /// Close the connection after this many body bytes, although more were promised.
    pub truncate_at: Option<usize>,
    /// Hold the whole reply until this gate opens.
    pub hold: Option<Gate>,
    /// Wait this long before answering.
    pub delay: Duration,
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
        }
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

    /// Closes the connection after `n` body bytes.
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
        let mut head = format!("HTTP/1.1 {} X\r\n", reply.status);
        for (k, v) in &reply.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", reply.body.len()));
        if stream.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let send = if req.method == "HEAD" {
            0
        } else {
            reply
                .truncate_at
                .unwrap_or(reply.body.len())
                .min(reply.body.len())
        };
        if stream.write_all(&reply.body[..send]).await.is_err() {
            return;
        }
        if reply.truncate_at.is_some() {
            let _ = stream.flush().await;
            return; // the promised rest never comes
        }
    }
}
