//! The load generator: keep-alive HTTP/1.1 connections that send GETs as fast as the answers
//! come back, for a bounded time and a bounded count, over hot, Zipf-distributed or
//! once-each keys, with every latency in an HDR histogram.
//!
//! It is written here rather than taken from `wrk` so that the same binary can draw Zipf keys,
//! count distinct keys, and run inside `cargo test` as the benchmark's smoke round.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::Zipf;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Which paths the requests ask for.
#[derive(Debug, Clone)]
pub enum Keys {
    /// Always this one path (a hot object).
    Hot(String),
    /// `{prefix}{k}` with `k` in `1..=n` drawn from a Zipf distribution of exponent `s`.
    Zipf {
        /// Path prefix.
        prefix: String,
        /// Distinct keys.
        n: u64,
        /// Exponent (1.0 is the classic web-cache skew).
        s: f64,
    },
    /// `{prefix}{k}` for `k` in `1..=n`, each exactly once (the count bound is `n`).
    Each {
        /// Path prefix.
        prefix: String,
        /// Keys.
        n: u64,
    },
}

/// One load run.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Where to send (a node's or nginx's listener).
    pub target: SocketAddr,
    /// `Host` of every request.
    pub host: String,
    /// Which paths.
    pub keys: Keys,
    /// Concurrent keep-alive connections.
    pub connections: usize,
    /// Stop sending after this long.
    pub duration: Duration,
    /// Stop sending after this many requests in all.
    pub max_requests: u64,
    /// Seed of the key draws (a run is repeatable).
    pub seed: u64,
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct LoadResult {
    /// Requests answered (any status).
    pub requests: u64,
    /// Requests that got no complete answer (connection error or unparsable reply).
    pub errors: u64,
    /// Answers by status code.
    pub statuses: BTreeMap<u16, u64>,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Latency of answered requests, in microseconds.
    pub latency_us: Histogram<u64>,
    /// Distinct paths asked for.
    pub distinct_keys: u64,
    /// Body bytes received.
    pub body_bytes: u64,
}

impl LoadResult {
    /// Answered requests per second of wall time.
    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The `q` quantile of latency, in milliseconds.
    pub fn latency_ms(&self, q: f64) -> f64 {
        self.latency_us.value_at_quantile(q) as f64 / 1000.0
    }

    /// Answers whose status was `status`.
    pub fn status(&self, status: u16) -> u64 {
        self.statuses.get(&status).copied().unwrap_or(0)
    }
}

/// How long after the run's deadline a request still waits for its answer.
const ANSWER_GRACE: Duration = Duration::from_secs(10);

/// What one connection's task gathered.
struct ConnTally {
    requests: u64,
    errors: u64,
    statuses: BTreeMap<u16, u64>,
    latency_us: Histogram<u64>,
    keys: HashSet<u64>,
    body_bytes: u64,
}

fn histogram() -> Histogram<u64> {
    // 1 µs .. 60 s, three significant digits.
    #[allow(clippy::unwrap_used)] // constant, valid bounds
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()
}

/// Runs `spec` on the current tokio runtime and returns what it measured.
pub async fn run(spec: &LoadSpec) -> anyhow::Result<LoadResult> {
    if spec.connections == 0 {
        bail!("a load run needs at least one connection");
    }
    let issued = Arc::new(AtomicU64::new(0));
    let max = match &spec.keys {
        Keys::Each { n, .. } => spec.max_requests.min(*n),
        _ => spec.max_requests,
    };
    let start = Instant::now();
    let deadline = start + spec.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..spec.connections {
        let spec = spec.clone();
        let issued = issued.clone();
        tasks.spawn(async move { connection(&spec, c as u64, &issued, max, deadline).await });
    }
    let mut result = LoadResult {
        requests: 0,
        errors: 0,
        statuses: BTreeMap::new(),
        elapsed: Duration::ZERO,
        latency_us: histogram(),
        distinct_keys: 0,
        body_bytes: 0,
    };
    let mut keys = HashSet::new();
    while let Some(tally) = tasks.join_next().await {
        let tally = tally.context("a load connection panicked")??;
        result.requests += tally.requests;
        result.errors += tally.errors;
        result.body_bytes += tally.body_bytes;
        for (s, n) in tally.statuses {
            *result.statuses.entry(s).or_default() += n;
        }
        result.latency_us.add(&tally.latency_us)?;
        keys.extend(tally.keys);
    }
    result.elapsed = start.elapsed();
    result.distinct_keys = keys.len() as u64;
    Ok(result)
}

/// One keep-alive connection: send, read the whole answer, repeat; reconnect after an error.
async fn connection(
    spec: &LoadSpec,
    index: u64,
    issued: &AtomicU64,
    max: u64,
    deadline: Instant,
) -> anyhow::Result<ConnTally> {
    let mut rng = SmallRng::seed_from_u64(spec.seed.wrapping_mul(1_000_003).wrapping_add(index));
    let zipf = match &spec.keys {
        Keys::Zipf { n, s, .. } => Some(Zipf::new(*n as f64, *s).context("zipf parameters")?),
        _ => None,
    };
    let mut tally = ConnTally {
        requests: 0,
        errors: 0,
        statuses: BTreeMap::new(),
        latency_us: histogram(),
        keys: HashSet::new(),
        body_bytes: 0,
    };
    let give_up = tokio::time::sleep_until((deadline + ANSWER_GRACE).into());
    tokio::pin!(give_up);
    let mut stream: Option<TcpStream> = None;
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut request = Vec::with_capacity(256);
    while Instant::now() < deadline {
        let n = issued.fetch_add(1, Ordering::Relaxed);
        if n >= max {
            break;
        }
        let (path, key) = match &spec.keys {
            Keys::Hot(path) => (path.clone(), 0),
            Keys::Zipf { prefix, .. } => {
                let k = zipf.as_ref().map_or(1.0, |z| rng.sample(z)) as u64;
                (format!("{prefix}{k}"), k)
            }
            Keys::Each { prefix, .. } => (format!("{prefix}{}", n + 1), n + 1),
        };
        tally.keys.insert(key);
        request.clear();
        request.extend_from_slice(
            format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", spec.host).as_bytes(),
        );
        let sent = Instant::now();
        let attempt = async {
            match stream.as_mut() {
                Some(s) => exchange(s, &request, &mut buf).await,
                None => {
                    let s = TcpStream::connect(spec.target).await?;
                    let _ = s.set_nodelay(true);
                    let s = stream.insert(s);
                    exchange(s, &request, &mut buf).await
                }
            }
        };
        // A server that stalls on an answer costs that request, not the run: it is given up
        // ANSWER_GRACE after the run's deadline (one timer per connection, not per request:
        // a timer per request slowed the generator enough to cap nginx's rate).
        let answer = tokio::select! {
            answer = attempt => answer,
            () = &mut give_up => Err(anyhow::anyhow!("no answer by the end of the run")),
        };
        match answer {
            Ok((status, body, keep)) => {
                let us = sent.elapsed().as_micros().max(1) as u64;
                tally.latency_us.saturating_record(us);
                tally.requests += 1;
                tally.body_bytes += body as u64;
                *tally.statuses.entry(status).or_default() += 1;
                if !keep {
                    stream = None;
                }
            }
            Err(_) => {
                tally.errors += 1;
                stream = None;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    Ok(tally)
}

/// Writes `request` and reads one whole answer: `(status, body length, keep-alive)`.
async fn exchange(
    stream: &mut TcpStream,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> anyhow::Result<(u16, usize, bool)> {
    stream.write_all(request).await?;
    buf.clear();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 48];
        let mut response = httparse::Response::new(&mut headers);
        if let httparse::Status::Complete(head) = response.parse(buf)? {
            let status = response.code.unwrap_or(0);
            let mut length = None;
            let mut keep = true;
            for h in response.headers.iter() {
                if h.name.eq_ignore_ascii_case("content-length") {
                    length = std::str::from_utf8(h.value)?.trim().parse::<usize>().ok();
                } else if h.name.eq_ignore_ascii_case("connection")
                    && h.value.eq_ignore_ascii_case(b"close")
                {
                    keep = false;
                } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                    bail!("chunked answers are not expected from a cached object");
                }
            }
            let Some(length) = length else {
                bail!("an answer without Content-Length");
            };
            let mut have = buf.len() - head;
            while have < length {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    bail!("connection closed mid-body");
                }
                have += n;
            }
            if have > length {
                bail!("bytes after the answer (pipelining is not used)");
            }
            return Ok((status, length, keep));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed before a whole header");
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}
