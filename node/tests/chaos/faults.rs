//! Scenarios about parties outside the tiers misbehaving: an origin that is slow or sends
//! broken or oversized responses, clients that stall, abort or half-close, and a trace
//! collector that refuses, swallows or delays exports.
//!
//! Fleets use the harness's short timeouts unless a scenario says otherwise. They keep the
//! defaults' nesting and ratios: lower→upper connect 300 ms / read 3 s, upper→origin connect
//! 500 ms / read 2 s, probes every 200 ms, 3 consecutive failures mark a member down.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use stratus_chaos::{client, CollectorMode, Fleet, Reply, Response, Summary, TestCollector};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use super::common::{check, end_checks, keys, Run, Shape, HOST};

/// Fresh for ten minutes: anything stored stays stored for the whole scenario.
const CACHEABLE: &str = "max-age=600";

/// `GET key` on `addr`, recorded in the run's history as sent to lower `lower`; returns the
/// response and how long it took.
async fn get(
    run: &Run,
    addr: SocketAddr,
    lower: usize,
    key: &str,
) -> (anyhow::Result<Response>, Duration) {
    let started = run.history.elapsed();
    let at = Instant::now();
    let outcome = client::get(addr, HOST, key, &[]).await;
    let took = at.elapsed();
    run.history.record(lower, key, started, took, &outcome);
    (outcome, took)
}

/// How reading an answer off a raw connection ended.
#[derive(Debug, PartialEq, Eq)]
enum Ending {
    /// A whole response (by its Content-Length or final chunk) arrived.
    Complete,
    /// The peer closed (FIN) or reset the connection.
    Closed,
    /// Nothing more within the deadline; the connection was still open.
    Deadline,
}

/// Reads from `stream` until one whole framed response is in, the peer closes, or `deadline`
/// passes; returns the bytes and how it ended.
async fn read_answer(stream: &mut TcpStream, deadline: Duration) -> (Vec<u8>, Ending) {
    let end = tokio::time::Instant::now() + deadline;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Ok(r) = client::parse(&buf, false) {
            let framed =
                r.header("content-length").is_some() || r.header("transfer-encoding").is_some();
            if framed && r.complete {
                return (buf, Ending::Complete);
            }
        }
        match tokio::time::timeout_at(end, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            Ok(_) => return (buf, Ending::Closed),
            Err(_) => return (buf, Ending::Deadline),
        }
    }
}

/// The first `Cache-Status` entry (the node nearest the origin).
fn first_entry(cache_status: &str) -> &str {
    cache_status.split(',').next().unwrap_or("").trim()
}

/// Health state of every member in `lower`'s `/ring`, as `(name, state)`.
async fn ring_states(fleet: &Fleet, lower: usize) -> anyhow::Result<Vec<(String, String)>> {
    let ring = fleet.ring(lower).await?;
    let members = ring["upper"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("no upper list in /ring: {ring}"))?;
    Ok(members
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap_or("?").to_string(),
                m["health"]["state"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect())
}

/// Members any lower's `/ring` does not show as up (or why the ring could not be read).
async fn not_up(fleet: &Fleet) -> Vec<String> {
    let mut out = Vec::new();
    for lower in 0..fleet.lowers.len() {
        match ring_states(fleet, lower).await {
            Ok(states) if states.is_empty() => out.push(format!("edge-{}: no members", lower + 1)),
            Ok(states) => out.extend(
                states
                    .into_iter()
                    .filter(|(_, state)| state != "up")
                    .map(|(name, state)| format!("edge-{}: {name} {state}", lower + 1)),
            ),
            Err(e) => out.push(format!("edge-{}: /ring: {e:#}", lower + 1)),
        }
    }
    out
}

/// `stratus_upper_requests_total` samples as `(outcome, upper, value)`.
fn upper_outcomes(metrics: &str) -> Vec<(String, String, f64)> {
    let label = |line: &str, name: &str| {
        let start = line.find(&format!("{name}=\""))? + name.len() + 2;
        let len = line[start..].find('"')?;
        Some(line[start..start + len].to_string())
    };
    metrics
        .lines()
        .filter(|l| l.starts_with("stratus_upper_requests_total{"))
        .filter_map(|l| {
            let value = l.split_whitespace().last()?.parse().ok()?;
            Some((label(l, "outcome")?, label(l, "upper")?, value))
        })
        .collect()
}

/// The sum of every sample of metric `name` (with or without labels).
fn metric_sum(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

/// Resident memory of process `pid`, in KiB (0 if it cannot be read).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// `len` bytes of a pattern that differs per `salt`, so a shifted or mixed body shows.
fn pattern(len: usize, salt: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + salt * 7) % 251) as u8)
        .collect()
}

/// What became of one request, for a verdict: status, completeness, body length.
fn describe(outcome: &anyhow::Result<Response>) -> String {
    match outcome {
        Ok(r) => format!(
            "{} {} {} B [{}]",
            r.status,
            if r.complete { "complete" } else { "cut" },
            r.body.len(),
            r.cache_status()
        ),
        Err(e) => format!("no response ({e:#})"),
    }
}

/// [`describe`] without `Cache-Status`, for verdicts.
fn short(outcome: &anyhow::Result<Response>) -> String {
    match outcome {
        Ok(r) if r.complete => format!("{} {} B", r.status, r.body.len()),
        Ok(r) => format!("{} cut at {} B", r.status, r.body.len()),
        Err(_) => "no response".to_string(),
    }
}

/// How long the slow origin waits before answering: longer than every tier timeout.
const SLOW_ORIGIN: Duration = Duration::from_secs(6);
/// A cached key must be served within this while the faults run (a tier timeout is 2 s+).
const FAST: Duration = Duration::from_secs(1);
/// How long a stalled or half-closed client waits for its answer.
const CLIENT_PATIENCE: Duration = Duration::from_secs(15);

/// Scenario 8, a slow origin and slow clients, with the harness's default short timeouts
/// (their ratios are the defaults'): the origin answers two keys only after 6 s (beyond the
/// upper's 2 s origin read timeout and the lower's 3 s tier read timeout), three clients stall
/// their POST bodies (Content-Length 100, 10 bytes sent, then nothing), four abort half-way
/// through a request line, and three half-close after a full GET (a hit at the lower, a miss at
/// the lower that the upper has, a miss everywhere). Meanwhile cached keys are requested in
/// concurrent waves through both lowers.
///
/// Pass: the slow origin's clients get a 504 generated by the upper (`up-…; detail=read-timeout`
/// first), stalled bodies get 408 or a closed connection (never a 5xx), half-closed GETs get
/// their whole 200, every cached request is a fast (< 1 s), complete 200, no lower's `/ring`
/// shows a member other than up during or after the faults, `stratus_upper_requests_total` has
/// no outcome other than `ok`, and every node is alive without panics.
pub async fn slow_origin_and_clients(run: Run) -> Summary {
    let (origin, mut fleet) = Shape::new(2, 2).start().await;
    let hot = keys("hot", 8);
    for k in &hot {
        origin.fixed(
            k,
            Reply::ok(format!("body of {k}")).header("cache-control", CACHEABLE),
        );
    }
    let slow = keys("slow", 2);
    for k in &slow {
        origin.fixed(
            k,
            Reply::ok("too late")
                .header("cache-control", CACHEABLE)
                .delay(SLOW_ORIGIN),
        );
    }
    let posts = keys("post", 3);
    for k in &posts {
        origin.fixed(k, Reply::ok("posted"));
    }
    let half_miss = "/half/miss";
    origin.fixed(
        half_miss,
        Reply::ok("half-closed miss")
            .header("cache-control", CACHEABLE)
            .delay(Duration::from_millis(300)),
    );
    let addrs: Vec<SocketAddr> = fleet.lowers.iter().map(|n| n.listen).collect();

    // Warm the hot keys through edge-1 only: edge-1 then serves them itself, edge-2 from the
    // owning upper.
    let mut warm = JoinSet::new();
    for k in hot.clone() {
        let (run, addr) = (run.clone(), addrs[0]);
        warm.spawn(async move {
            let (r, _) = get(&run, addr, 0, &k).await;
            r.is_ok_and(|r| r.status == 200 && r.complete)
        });
    }
    let warmed = warm.join_all().await.into_iter().filter(|ok| *ok).count();
    run.note(format!("warmed {warmed}/{} keys through edge-1", hot.len()));

    let faults_done = AtomicBool::new(false);
    let fault_started = Instant::now();
    run.note(format!(
        "faults: {} GETs to an origin answering after {SLOW_ORIGIN:?}, {} stalled POST bodies, \
         4 aborted requests, 3 half-closed GETs",
        slow.len(),
        posts.len()
    ));
    // Each fault task answers Ok(what happened) or Err(what went wrong).
    let faults = async {
        let mut set: JoinSet<Result<String, String>> = JoinSet::new();
        for (i, k) in slow.iter().cloned().enumerate() {
            let (run, lower) = (run.clone(), i % addrs.len());
            let addr = addrs[lower];
            set.spawn(async move {
                let (r, took) = get(&run, addr, lower, &k).await;
                let r = r.map_err(|e| format!("slow origin {k}: no response: {e:#}"))?;
                let cs = r.cache_status();
                let first = first_entry(&cs);
                if r.status == 504
                    && first.starts_with("up-")
                    && first.contains("detail=read-timeout")
                {
                    Ok(format!("slow origin {k}: 504 after {took:?} [{cs}]"))
                } else {
                    Err(format!(
                        "slow origin {k}: {} after {took:?} [{cs}], want 504 from an upper with \
                         detail=read-timeout",
                        r.status
                    ))
                }
            });
        }
        for (i, k) in posts.iter().cloned().enumerate() {
            let (history, lower) = (run.history.clone(), i % addrs.len());
            let addr = addrs[lower];
            set.spawn(async move {
                let started = history.elapsed();
                let at = Instant::now();
                let mut stream = TcpStream::connect(addr)
                    .await
                    .map_err(|e| format!("stalled POST {k}: connect: {e}"))?;
                let head = format!(
                    "POST {k} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: 100\r\n\r\n0123456789"
                );
                stream
                    .write_all(head.as_bytes())
                    .await
                    .map_err(|e| format!("stalled POST {k}: send: {e}"))?;
                let (bytes, ending) = read_answer(&mut stream, CLIENT_PATIENCE).await;
                let took = at.elapsed();
                let parsed = client::parse(&bytes, false);
                let outcome = match &parsed {
                    Ok(r) => Ok(r.clone()),
                    Err(e) => Err(anyhow::anyhow!("{e:#}; connection {ending:?}")),
                };
                history.record(lower, &k, started, took, &outcome);
                match (parsed, ending) {
                    (Ok(r), _) if r.status == 408 => Ok(format!(
                        "stalled POST {k}: 408 after {took:?} [{}]",
                        r.cache_status()
                    )),
                    (Ok(r), _) => Err(format!(
                        "stalled POST {k}: {} after {took:?} [{}], want 408 or a closed \
                         connection",
                        r.status,
                        r.cache_status()
                    )),
                    (Err(_), Ending::Closed) if bytes.is_empty() => {
                        Ok(format!("stalled POST {k}: closed after {took:?}"))
                    }
                    (Err(e), ending) => Err(format!(
                        "stalled POST {k}: {} bytes then {ending:?} after {took:?}: {e:#}",
                        bytes.len()
                    )),
                }
            });
        }
        for i in 0..4 {
            let addr = addrs[i % addrs.len()];
            let k = hot[i].clone();
            set.spawn(async move {
                let mut stream = TcpStream::connect(addr)
                    .await
                    .map_err(|e| format!("abort {k}: connect: {e}"))?;
                let line = format!("GET {k} HTTP/1.1\r\nHo");
                stream
                    .write_all(line.as_bytes())
                    .await
                    .map_err(|e| format!("abort {k}: send: {e}"))?;
                drop(stream);
                Ok(format!("aborted a request for {k} half-way"))
            });
        }
        // A hit at edge-1, a miss at edge-2 that the upper has, a miss everywhere.
        let half = [
            (hot[3].clone(), 0usize),
            (hot[3].clone(), 1),
            (half_miss.to_string(), 0),
        ];
        for (k, lower) in half {
            let history = run.history.clone();
            let addr = addrs[lower];
            let want = if k == half_miss {
                "half-closed miss".to_string()
            } else {
                format!("body of {k}")
            };
            set.spawn(async move {
                let started = history.elapsed();
                let at = Instant::now();
                let mut stream = TcpStream::connect(addr)
                    .await
                    .map_err(|e| format!("half-close {k}: connect: {e}"))?;
                let req = format!("GET {k} HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
                stream
                    .write_all(req.as_bytes())
                    .await
                    .map_err(|e| format!("half-close {k}: send: {e}"))?;
                stream
                    .shutdown()
                    .await
                    .map_err(|e| format!("half-close {k}: shutdown: {e}"))?;
                let (bytes, ending) = read_answer(&mut stream, CLIENT_PATIENCE).await;
                let took = at.elapsed();
                let outcome = client::parse(&bytes, false)
                    .map_err(|e| anyhow::anyhow!("{e:#}; connection {ending:?}"));
                history.record(lower, &k, started, took, &outcome);
                let what = describe(&outcome);
                match outcome {
                    Ok(r) if r.status == 200 && r.complete && r.body == want.as_bytes() => {
                        Ok(format!(
                            "half-closed GET {k} at edge-{}: {what} after {took:?}",
                            lower + 1
                        ))
                    }
                    _ => Err(format!(
                        "half-closed GET {k} at edge-{}: {} after {took:?}, want the whole 200",
                        lower + 1,
                        short(&outcome)
                    )),
                }
            });
        }
        let mut seen = Vec::new();
        while let Some(joined) = set.join_next().await {
            seen.push(joined.unwrap_or_else(|e| Err(format!("fault task failed: {e}"))));
        }
        faults_done.store(true, Ordering::SeqCst);
        seen
    };
    // Every lower's ring, polled while the faults run.
    let watch = async {
        let mut downs = Vec::new();
        let mut polls = 0;
        while !faults_done.load(Ordering::SeqCst) && polls < 300 {
            for d in not_up(&fleet).await {
                downs.push(format!("{:?}: {d}", fault_started.elapsed()));
            }
            polls += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        (downs, polls)
    };
    // Waves of cached-key requests through both lowers until the faults are over.
    let traffic = async {
        let mut slowest = Duration::ZERO;
        let mut bad = Vec::new();
        let mut waves = 0;
        while waves == 0 || (!faults_done.load(Ordering::SeqCst) && waves < 12) {
            let mut set = JoinSet::new();
            for (lower, addr) in addrs.iter().copied().enumerate() {
                for k in hot.iter().cloned() {
                    let run = run.clone();
                    set.spawn(async move {
                        let (r, took) = get(&run, addr, lower, &k).await;
                        let ok = r.as_ref().is_ok_and(|r| {
                            r.status == 200
                                && r.complete
                                && r.body == format!("body of {k}").as_bytes()
                        });
                        (k, lower, took, ok, describe(&r))
                    });
                }
            }
            for (k, lower, took, ok, what) in set.join_all().await {
                slowest = slowest.max(took);
                if !ok || took >= FAST {
                    bad.push(format!("edge-{} {k}: {what} in {took:?}", lower + 1));
                }
            }
            waves += 1;
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
        (waves, slowest, bad)
    };
    let (seen, (downs, polls), (waves, slowest, bad)) = tokio::join!(faults, watch, traffic);
    run.note(format!(
        "faults over after {:?}; {polls} ring polls; {waves} waves of {} cached requests, \
         slowest {slowest:?}",
        fault_started.elapsed(),
        hot.len() * addrs.len()
    ));
    for s in &seen {
        match s {
            Ok(what) => run.note(what.clone()),
            Err(why) => run.note(format!("VIOLATION {why}")),
        }
    }
    for node in &fleet.lowers {
        let premature = node
            .log()
            .lines()
            .filter(|l| l.contains("Prematurely before response header is sent"))
            .count();
        if premature > 0 {
            run.note(format!(
                "{}: {premature} log lines 'Downstream Error ignored during caching: \
                 ConnectionClosed ... Prematurely before response header is sent'",
                node.name()
            ));
        }
    }
    let downs_after = not_up(&fleet).await;
    let mut outcomes = Vec::new();
    for node in &fleet.lowers {
        let text = fleet.metrics(node.admin).await.unwrap_or_default();
        outcomes.extend(
            upper_outcomes(&text)
                .into_iter()
                .map(|(outcome, upper, n)| (node.name().to_string(), outcome, upper, n)),
        );
    }
    run.note(format!("upper request outcomes: {outcomes:?}"));

    let verdict = async {
        check(warmed == hot.len(), || {
            format!("only {warmed}/{} keys warmed", hot.len())
        })?;
        let violations: Vec<&String> = seen.iter().filter_map(|s| s.as_ref().err()).collect();
        check(violations.is_empty(), || {
            format!("{} fault outcomes wrong: {violations:?}", violations.len())
        })?;
        check(bad.is_empty(), || {
            format!(
                "{} cached requests not a fast whole 200 during the faults: {:?}",
                bad.len(),
                &bad[..bad.len().min(4)]
            )
        })?;
        check(downs.is_empty(), || {
            format!(
                "a member left up during the faults: {:?}",
                &downs[..downs.len().min(4)]
            )
        })?;
        check(downs_after.is_empty(), || {
            format!("a member not up after the faults: {downs_after:?}")
        })?;
        let blamed: Vec<_> = outcomes
            .iter()
            .filter(|(_, outcome, _, n)| outcome != "ok" && *n > 0.0)
            .collect();
        check(blamed.is_empty(), || {
            format!("uppers blamed for others' faults: {blamed:?}")
        })?;
        check(
            outcomes.iter().any(|(_, o, _, n)| o == "ok" && *n > 0.0),
            || format!("no upper request counted at all: {outcomes:?}"),
        )?;
        end_checks(&mut fleet, &[])
    }
    .await;
    run.summary(origin.total(), None, verdict)
}

/// The limit scenario 9's nodes store objects up to.
const OBJECT_LIMIT: usize = 64 * 1024;
/// An over-limit body: a bit over three times the limit.
const OVER_LIMIT: usize = 200_000;
const _: () = assert!(OVER_LIMIT > OBJECT_LIMIT);

/// What a scenario-9 case is and what it may answer.
enum Case {
    /// A broken response. `whole` is the one body a lenient but correct reading could give
    /// (a complete 200 with any other body is a short or mangled body served as whole).
    Broken { whole: Option<Vec<u8>> },
    /// A well-formed response over the object limit: streams through whole and is not stored.
    /// `known_issue`: pingora may cut these on the first request (owned by another issue).
    OverLimit { body: Vec<u8>, known_issue: bool },
    /// A small cacheable response: stored, so the second request is a hit.
    Control { body: Vec<u8> },
}

/// Scenario 9, malformed and oversized origin responses through a 1-lower/1-upper fleet with
/// a 64 KiB object limit (harness short timeouts, their ratios the defaults'). The origin
/// sends, all marked fresh for 10 minutes: a body shorter than its Content-Length then FIN, two
/// differing Content-Lengths, a bad chunk size, a header line without a colon, a header value
/// with a NUL, a reset mid-body (Content-Length and chunked), and 200 KB bodies framed by
/// Content-Length, chunked and close-delimited; plus small good objects (Content-Length,
/// chunked, close-delimited) as controls. Every key is asked twice, over-limit ones three
/// times, one request after the other; the keys concurrently.
///
/// Pass: both nodes survive without panics; no broken response is ever a clean complete 200
/// with a short or wrong body; nothing broken or over the limit is stored (every request
/// reaches the origin again); the controls are stored (only the first request reaches it).
/// The 200 KB bodies must stream through whole (200, complete, the right bytes) every time,
/// the first time too, whatever their framing.
pub async fn malformed_origin(run: Run) -> Summary {
    let mut shape = Shape::new(1, 1);
    shape.common_extra = "\n[cache]\nmax_object_size = \"64KiB\"\ncapacity = \"16MiB\"\n".into();
    let (origin, mut fleet) = shape.start().await;
    let head = |extra: &str| {
        format!("HTTP/1.1 200 OK\r\nCache-Control: {CACHEABLE}\r\n{extra}\r\n").into_bytes()
    };
    let raw = |bytes: Vec<u8>| Reply::ok("").raw(bytes);
    let big = |salt| pattern(OVER_LIMIT, salt);
    let cases: Vec<(&'static str, Reply, Case)> = vec![
        (
            "/bad/short-content-length",
            Reply::ok(pattern(4000, 1))
                .header("cache-control", CACHEABLE)
                .truncate_at(1000),
            Case::Broken { whole: None },
        ),
        (
            "/bad/duplicate-content-length",
            raw([
                head("Content-Length: 5\r\nContent-Length: 10\r\n"),
                b"abcdefghij".to_vec(),
            ]
            .concat()),
            Case::Broken { whole: None },
        ),
        (
            "/bad/chunk-size",
            raw([
                head("Transfer-Encoding: chunked\r\n"),
                b"5\r\nhello\r\nzz\r\nworld\r\n0\r\n\r\n".to_vec(),
            ]
            .concat()),
            Case::Broken { whole: None },
        ),
        (
            "/bad/header-without-colon",
            raw([
                head("This line has no colon\r\nContent-Length: 5\r\n"),
                b"hello".to_vec(),
            ]
            .concat()),
            Case::Broken {
                whole: Some(b"hello".to_vec()),
            },
        ),
        (
            "/bad/header-with-nul",
            raw([
                head("X-Bad: a\0b\r\nContent-Length: 5\r\n"),
                b"hello".to_vec(),
            ]
            .concat()),
            Case::Broken {
                whole: Some(b"hello".to_vec()),
            },
        ),
        (
            "/bad/reset-mid-body",
            Reply::ok(pattern(20_000, 2))
                .header("cache-control", CACHEABLE)
                .reset_at(5000),
            Case::Broken { whole: None },
        ),
        (
            "/bad/reset-mid-chunked",
            Reply::chunked(
                pattern(20_000, 3)
                    .chunks(4096)
                    .map(<[u8]>::to_vec)
                    .collect(),
            )
            .header("cache-control", CACHEABLE)
            .reset_at(9000),
            Case::Broken { whole: None },
        ),
        (
            "/big/content-length",
            Reply::ok(big(4)).header("cache-control", CACHEABLE),
            Case::OverLimit {
                body: big(4),
                known_issue: false,
            },
        ),
        (
            "/big/chunked",
            Reply::chunked(big(5).chunks(16 * 1024).map(<[u8]>::to_vec).collect())
                .header("cache-control", CACHEABLE),
            Case::OverLimit {
                body: big(5),
                known_issue: true,
            },
        ),
        (
            "/big/close-delimited",
            Reply::ok(big(6))
                .header("cache-control", CACHEABLE)
                .close_delimited(),
            Case::OverLimit {
                body: big(6),
                known_issue: true,
            },
        ),
        (
            "/good/close-delimited",
            Reply::ok(pattern(3000, 8))
                .header("cache-control", CACHEABLE)
                .close_delimited(),
            Case::Control {
                body: pattern(3000, 8),
            },
        ),
        (
            "/good/chunked",
            Reply::chunked(pattern(30000, 9).chunks(4096).map(<[u8]>::to_vec).collect())
                .header("cache-control", CACHEABLE),
            Case::Control {
                body: pattern(30000, 9),
            },
        ),
        (
            "/good/control",
            Reply::ok(pattern(3000, 7)).header("cache-control", CACHEABLE),
            Case::Control {
                body: pattern(3000, 7),
            },
        ),
    ];
    for (path, reply, _) in &cases {
        origin.fixed(path, reply.clone());
    }
    run.note(format!(
        "{} keys, each asked twice (over-limit ones three times) through edge-1: {:?}",
        cases.len(),
        cases.iter().map(|(p, _, _)| *p).collect::<Vec<_>>()
    ));

    // Each case's two requests one after the other; the cases concurrently. The origin counts
    // are read after each request.
    let addr = fleet.lowers[0].listen;
    let asks = cases.iter().map(|(path, _, case)| {
        let run = &run;
        let origin = &origin;
        // Over-limit keys a third time: each tier learns "too large" on its own first fill.
        let times = if matches!(case, Case::OverLimit { .. }) {
            3
        } else {
            2
        };
        async move {
            let mut responses = Vec::new();
            let mut counts = Vec::new();
            for _ in 0..times {
                responses.push(get(run, addr, 0, path).await.0);
                counts.push(origin.count(path));
            }
            (responses, counts)
        }
    });
    let answers = futures::future::join_all(asks).await;

    let mut hard = Vec::new();
    let mut soft = Vec::new();
    for ((path, _, case), (responses, counts)) in cases.iter().zip(&answers) {
        let what: Vec<String> = responses.iter().map(describe).collect();
        run.note(format!(
            "{path}: origin count after each {counts:?}; {what:?}"
        ));
        // Every request reached the origin: nothing was served from a stored copy.
        let refetched =
            counts.first().is_some_and(|c| *c >= 1) && counts.windows(2).all(|w| w[1] > w[0]);
        let clean_200 = |r: &anyhow::Result<Response>| {
            r.as_ref()
                .ok()
                .filter(|r| r.status == 200 && r.complete)
                .map(|r| r.body.clone())
        };
        match case {
            Case::Broken { whole } => {
                for (nth, r) in responses.iter().enumerate() {
                    if let Some(body) = clean_200(r) {
                        if whole.as_ref() != Some(&body) {
                            hard.push(format!(
                                "{path} request {}: a clean complete 200 with a wrong body: {}",
                                nth + 1,
                                what[nth]
                            ));
                        }
                    }
                }
                if !refetched {
                    hard.push(format!(
                        "{path}: broken response cached (origin count after each request \
                         {counts:?})"
                    ));
                }
            }
            Case::OverLimit { body, known_issue } => {
                for (nth, r) in responses.iter().enumerate() {
                    match clean_200(r) {
                        Some(got) if got == *body => {}
                        Some(_) => hard.push(format!(
                            "{path} request {}: a clean complete 200 with a wrong body: {}",
                            nth + 1,
                            what[nth]
                        )),
                        None if *known_issue => {
                            soft.push(format!("{path} #{} {}", nth + 1, short(r)))
                        }
                        None => hard.push(format!(
                            "{path} request {}: not streamed whole: {}",
                            nth + 1,
                            what[nth]
                        )),
                    }
                }
                if !refetched {
                    hard.push(format!(
                        "{path}: over-limit body stored (origin count after each request \
                         {counts:?})"
                    ));
                }
            }
            Case::Control { body } => {
                let whole = responses
                    .iter()
                    .all(|r| clean_200(r).as_ref() == Some(body));
                if !whole || counts.iter().any(|c| *c != 1) {
                    hard.push(format!(
                        "{path}: control not served whole and stored: {what:?}, origin count \
                         after each request {counts:?}"
                    ));
                }
            }
        }
    }
    for node in fleet.uppers.iter().chain(&fleet.lowers) {
        let text = fleet.metrics(node.admin).await.unwrap_or_default();
        run.note(format!(
            "{}: stratus_cache_objects {}; upper outcomes {:?}",
            node.name(),
            metric_sum(&text, "stratus_cache_objects"),
            upper_outcomes(&text)
        ));
    }
    let verdict = async {
        end_checks(&mut fleet, &[])?;
        check(hard.is_empty(), || hard.join("; "))?;
        // Over-limit bodies of unknown length once failed their first fill at each tier
        // (pingora's max_file_size aborts the fill and the client reading it); the store now
        // enforces the limit and streams them through whole, so this is a hard criterion.
        check(soft.is_empty(), || {
            format!("over-limit bodies not streamed whole: {}", soft.join(", "))
        })
    }
    .await;
    let paths: Vec<String> = cases.iter().map(|(p, _, _)| p.to_string()).collect();
    run.summary(super::common::fetches(&origin, &paths), None, verdict)
}

/// Requests per fleet in scenario 10.
const TRACED_STEPS: usize = 600;
/// Allowed RSS growth of a node over scenario 10's run.
const RSS_BUDGET_KIB: u64 = 64 * 1024;

/// The path of step `i` of scenario 10's request sequence: cacheable keys (misses, then hits),
/// uncacheable keys whose bodies count the origin's requests, and a 404.
fn traced_path(i: usize) -> String {
    match i % 4 {
        0 | 1 => format!("/c/{}", (i / 2) % 24),
        2 => format!("/u/{}", (i / 4) % 5),
        _ => "/missing".to_string(),
    }
}

/// Scenario 10, the trace collector refused (nothing listens), blackholed (reads, never
/// answers) or slow (answers after 2 s, past the 500 ms export timeout), each in front of its
/// own 1-lower/1-upper fleet with sampling 1.0 and the smallest span queue (64), next to a
/// tracing-off control fleet (harness short timeouts, their ratios the defaults'). All four get
/// the same 600-request sequence, step by step.
///
/// Pass: every response's status and body equal the control's, each origin saw the same
/// requests per path as the control's, no node's RSS grows by 64 MiB or more, the lowers
/// behind the blackholed and slow collectors count dropped spans
/// (`stratus_spans_dropped_total` > 0), and every node is alive without panics. Failed exports
/// are not counted by any metric yet (another issue), so they are not checked.
pub async fn collector_down(run: Run) -> Summary {
    let blackhole = TestCollector::start(CollectorMode::BlackHole)
        .await
        .expect("collector");
    let slow = TestCollector::start(CollectorMode::Slow(Duration::from_secs(2)))
        .await
        .expect("collector");
    let refused = format!(
        "http://{}",
        stratus_chaos::free_port().expect("a free port")
    );
    let tracing = |endpoint: &str| {
        format!(
            "\n[tracing]\notlp_endpoint = \"{endpoint}\"\nsample_ratio = 1.0\nqueue_size = 64\n\
             export_timeout = \"500ms\"\n"
        )
    };
    let shapes: Vec<(&str, String)> = vec![
        ("control", String::new()),
        ("refused", tracing(&refused)),
        ("blackhole", tracing(&blackhole.endpoint())),
        ("slow", tracing(&slow.endpoint())),
    ];
    let starts = shapes.iter().map(|(_, extra)| {
        let mut shape = Shape::new(1, 1);
        shape.common_extra.clone_from(extra);
        shape.start()
    });
    let mut fleets = futures::future::join_all(starts).await;
    for (origin, _) in &fleets {
        for c in 0..24 {
            let k = format!("/c/{c}");
            origin.route(&k, move |_, nth| {
                Reply::ok(format!("c{c} n{nth}")).header("cache-control", CACHEABLE)
            });
        }
        for u in 0..5 {
            let k = format!("/u/{u}");
            origin.route(&k, move |_, nth| {
                Reply::ok(format!("u{u} n{nth}")).header("cache-control", "no-store")
            });
        }
    }
    let rss = |fleet: &Fleet| [&fleet.lowers[0], &fleet.uppers[0]].map(|n| rss_kib(n.pid()));
    let rss_before: Vec<[u64; 2]> = fleets.iter().map(|(_, f)| rss(f)).collect();
    run.note(format!(
        "4 fleets up (control, refused, blackhole, slow collector); {TRACED_STEPS} steps each"
    ));

    let started = Instant::now();
    let mut mismatches = Vec::new();
    let mut mismatch_count = 0usize;
    for step in 0..TRACED_STEPS {
        let path = traced_path(step);
        let sends = fleets.iter().enumerate().map(|(i, (_, fleet))| {
            // The record's `lower` is the fleet's index in `shapes`.
            get(&run, fleet.lowers[0].listen, i, &path)
        });
        let got = futures::future::join_all(sends).await;
        let key = |r: &anyhow::Result<Response>| {
            r.as_ref()
                .map(|r| (r.status, r.body.clone(), r.complete))
                .map_err(|e| format!("{e:#}"))
        };
        let want = key(&got[0].0);
        for (i, (r, _)) in got.iter().enumerate().skip(1) {
            if key(r) != want {
                mismatch_count += 1;
                if mismatches.len() < 4 {
                    mismatches.push(format!(
                        "step {step} {path}: {} got {}, control {}",
                        shapes[i].0,
                        describe(r),
                        describe(&got[0].0)
                    ));
                }
            }
        }
    }
    run.note(format!(
        "{} requests in {:?}, {mismatch_count} differing from the control",
        TRACED_STEPS * fleets.len(),
        started.elapsed()
    ));

    let mut problems = Vec::new();
    let control_counts: Vec<usize> = (0..TRACED_STEPS.min(40))
        .map(|i| fleets[0].0.count(&traced_path(i)))
        .collect();
    for (i, (origin, fleet)) in fleets.iter().enumerate() {
        let name = shapes[i].0;
        let counts: Vec<usize> = (0..TRACED_STEPS.min(40))
            .map(|i| origin.count(&traced_path(i)))
            .collect();
        if counts != control_counts || origin.total() != fleets[0].0.total() {
            problems.push(format!(
                "{name}: origin requests {} (per path {counts:?}) differ from the control's {} \
                 ({control_counts:?})",
                origin.total(),
                fleets[0].0.total()
            ));
        }
        let after = rss(fleet);
        let grew = [0, 1].map(|n| after[n].saturating_sub(rss_before[i][n]));
        let lower_metrics = fleet
            .metrics(fleet.lowers[0].admin)
            .await
            .unwrap_or_default();
        let upper_metrics = fleet
            .metrics(fleet.uppers[0].admin)
            .await
            .unwrap_or_default();
        let dropped =
            [&lower_metrics, &upper_metrics].map(|m| metric_sum(m, "stratus_spans_dropped_total"));
        run.note(format!(
            "{name}: RSS lower {} -> {} KiB, upper {} -> {} KiB; spans dropped lower {} upper {}",
            rss_before[i][0], after[0], rss_before[i][1], after[1], dropped[0], dropped[1]
        ));
        if grew.iter().any(|g| *g >= RSS_BUDGET_KIB) || after.contains(&0) {
            problems.push(format!("{name}: RSS grew {grew:?} KiB (lower, upper)"));
        }
        if matches!(name, "blackhole" | "slow") && dropped[0] <= 0.0 {
            problems.push(format!("{name}: lower counted no dropped spans"));
        }
    }
    run.note(format!(
        "collector export requests: blackhole {}, slow {}",
        blackhole.requests(),
        slow.requests()
    ));

    let verdict = async {
        check(mismatch_count == 0, || {
            format!("{mismatch_count} responses differ from the control: {mismatches:?}")
        })?;
        check(problems.is_empty(), || problems.join("; "))?;
        for (_, fleet) in fleets.iter_mut() {
            end_checks(fleet, &[])?;
        }
        Ok(())
    }
    .await;
    let origin_fetches = fleets.iter().map(|(o, _)| o.total()).sum();
    run.summary(origin_fetches, None, verdict)
}
