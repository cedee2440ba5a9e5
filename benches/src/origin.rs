//! The benchmark's origin: answers every GET with a cacheable body of a fixed size and counts
//! the requests for each path, so a run can report origin requests per distinct key.
//!
//! The chaos harness's `TestOrigin` keeps every request it saw (and scans them to count), which
//! suits fault scenarios of a few hundred requests, not a fill of 100 000 objects.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// A running origin; stops when dropped.
pub struct BenchOrigin {
    addr: SocketAddr,
    counts: Arc<Mutex<HashMap<String, u64>>>,
    tasks: Arc<Mutex<JoinSet<()>>>,
    head_len: usize,
    body_len: usize,
}

impl BenchOrigin {
    /// Starts on an ephemeral loopback port, on the current tokio runtime; every answer has a
    /// `body_len`-byte body and is fresh for an hour.
    pub async fn start(body_len: usize) -> anyhow::Result<BenchOrigin> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nCache-Control: public, max-age=3600\r\nContent-Length: {body_len}\r\n\r\n"
        );
        let head_len = head.len();
        let mut answer = head.into_bytes();
        answer.resize(head_len + body_len, b'x');
        let answer: Arc<[u8]> = answer.into();
        let counts: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
        let tasks: Arc<Mutex<JoinSet<()>>> = Arc::default();
        let (c, t) = (counts.clone(), tasks.clone());
        tasks.lock().spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                t.lock().spawn(serve(stream, answer.clone(), c.clone()));
            }
        });
        Ok(BenchOrigin {
            addr,
            counts,
            tasks,
            head_len,
            body_len,
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Requests received, in all.
    pub fn total(&self) -> u64 {
        self.counts.lock().values().sum()
    }

    /// Distinct paths requested.
    pub fn distinct(&self) -> u64 {
        self.counts.lock().len() as u64
    }

    /// Requests received for `path`.
    pub fn count(&self, path: &str) -> u64 {
        self.counts.lock().get(path).copied().unwrap_or(0)
    }

    /// Forgets every count (between runs).
    pub fn reset(&self) {
        self.counts.lock().clear();
    }

    /// Bytes of the status line and header fields of every answer.
    pub fn head_len(&self) -> usize {
        self.head_len
    }

    /// Bytes of every answer's body.
    pub fn body_len(&self) -> usize {
        self.body_len
    }
}

impl Drop for BenchOrigin {
    fn drop(&mut self) {
        self.tasks.lock().abort_all();
    }
}

/// Answers the requests of one connection until it closes or sends something unparsable.
async fn serve(mut stream: TcpStream, answer: Arc<[u8]>, counts: Arc<Mutex<HashMap<String, u64>>>) {
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        let parsed = {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut request = httparse::Request::new(&mut headers);
            match request.parse(&buf) {
                Ok(httparse::Status::Complete(n)) => {
                    Some((n, request.path.unwrap_or("").to_string()))
                }
                Ok(httparse::Status::Partial) => None,
                Err(_) => return,
            }
        };
        match parsed {
            Some((n, path)) => {
                buf.drain(..n);
                *counts.lock().entry(path).or_default() += 1;
                if stream.write_all(&answer).await.is_err() {
                    return;
                }
            }
            None => match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            },
        }
    }
}
