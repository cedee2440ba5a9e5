//! A recorded history of client requests for fault scenarios (Jepsen-style): run load while a
//! fault happens, keep every request's outcome with its timing, then judge the whole history
//! instead of a few hand-picked requests, and print one table row per scenario.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::task::JoinSet;

use crate::client;

/// One client request and what became of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// When it started, from the history's start.
    pub started: Duration,
    /// How long it took until the response was read or the request failed.
    pub took: Duration,
    /// The path asked for.
    pub key: String,
    /// Index of the lower node it was sent to.
    pub lower: usize,
    /// Status code, if a response head arrived.
    pub status: Option<u16>,
    /// The `Cache-Status` header (all entries), or empty.
    pub cache_status: String,
    /// Whether the body was complete per its framing.
    pub complete: bool,
    /// Why no response arrived.
    pub error: Option<String>,
}

impl Record {
    /// Whether a client would call this a failure: no response, a 5xx, or a cut body.
    pub fn is_error(&self) -> bool {
        self.status.is_none_or(|s| s >= 500) || !self.complete
    }
}

/// A thread-safe, append-only list of [`Record`]s with a common start time. Clones share it.
#[derive(Clone)]
pub struct History {
    start: Instant,
    records: Arc<Mutex<Vec<Record>>>,
}

impl Default for History {
    fn default() -> Self {
        History::new()
    }
}

impl History {
    /// An empty history starting now.
    pub fn new() -> History {
        History {
            start: Instant::now(),
            records: Arc::default(),
        }
    }

    /// Time since the history started (the clock of [`Record::started`]).
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Appends a record.
    pub fn push(&self, record: Record) {
        self.records.lock().push(record);
    }

    /// Every record so far, in the order they finished.
    pub fn records(&self) -> Vec<Record> {
        self.records.lock().clone()
    }

    /// The records that failed by [`Record::is_error`].
    pub fn errors(&self) -> Vec<Record> {
        self.records
            .lock()
            .iter()
            .filter(|r| r.is_error())
            .cloned()
            .collect()
    }

    /// How many records there are.
    pub fn len(&self) -> usize {
        self.records.lock().len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.records.lock().is_empty()
    }

    /// Records one client request to lower `lower` for `key` that started `started` into the
    /// run and took `took`, whatever its outcome.
    pub fn record(
        &self,
        lower: usize,
        key: &str,
        started: Duration,
        took: Duration,
        outcome: &anyhow::Result<crate::Response>,
    ) {
        self.push(match outcome {
            Ok(r) => Record {
                started,
                took,
                key: key.to_string(),
                lower,
                status: Some(r.status),
                cache_status: r.cache_status(),
                complete: r.complete,
                error: None,
            },
            Err(e) => Record {
                started,
                took,
                key: key.to_string(),
                lower,
                status: None,
                cache_status: String::new(),
                complete: false,
                error: Some(format!("{e:#}")),
            },
        });
    }

    /// Sends `GET key` for `host` to `lowers[lower]` and records the outcome.
    pub async fn get(&self, lowers: &[SocketAddr], lower: usize, host: &str, key: &str) {
        let started = self.elapsed();
        let at = Instant::now();
        let outcome = match lowers.get(lower) {
            Some(addr) => client::get(*addr, host, key, &[]).await,
            None => Err(anyhow::anyhow!("no lower {lower}")),
        };
        self.record(lower, key, started, at.elapsed(), &outcome);
    }
}

/// Sends `requests` GETs for `host`, at most `concurrency` at a time, spread over `lowers`
/// (round robin) and `keys` (a fixed scramble, the same every run), recording each in
/// `history`. Each request is bounded by the client's deadline, so this ends. Does nothing
/// when `lowers` or `keys` is empty.
pub async fn load(
    lowers: &[SocketAddr],
    host: &str,
    keys: &[String],
    requests: usize,
    concurrency: usize,
    history: &History,
) {
    if lowers.is_empty() || keys.is_empty() {
        return;
    }
    let lowers: Arc<[SocketAddr]> = lowers.into();
    let keys: Arc<[String]> = keys.into();
    let host: Arc<str> = host.into();
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..concurrency.clamp(1, requests.max(1)) {
        let (lowers, keys, host, next, history) = (
            lowers.clone(),
            keys.clone(),
            host.clone(),
            next.clone(),
            history.clone(),
        );
        workers.spawn(async move {
            // Each round takes a distinct index below `requests`, so at most `requests` rounds.
            for _ in 0..requests {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= requests {
                    return;
                }
                let key = &keys[scramble(i) % keys.len()];
                history.get(&lowers, i % lowers.len(), &host, key).await;
            }
        });
    }
    while workers.join_next().await.is_some() {}
}

/// SplitMix64's finaliser: request `i`'s key index, spread evenly and the same every run.
fn scramble(i: usize) -> usize {
    let mut z = (i as u64).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) as usize
}

/// The verdict text that marks a scenario as known-unmet rather than failed: use
/// `verdict: pending("reason")`, printed as `PENDING: reason`.
pub const PENDING: &str = "PENDING: ";

/// A pending verdict: the behaviour is known not to be there yet.
pub fn pending(reason: &str) -> Result<(), String> {
    Err(format!("{PENDING}{reason}"))
}

/// One scenario's outcome, a row of [`table`].
#[derive(Debug, Clone)]
pub struct Summary {
    /// Scenario name.
    pub scenario: String,
    /// Client requests sent.
    pub requests: usize,
    /// Client requests that failed ([`Record::is_error`]).
    pub client_errors: usize,
    /// Requests that reached the origin.
    pub origin_fetches: usize,
    /// How long until requests were served around the fault, if it was measured.
    pub failover: Option<Duration>,
    /// `Ok` passes; `Err(reason)` fails, unless made with [`pending`].
    pub verdict: Result<(), String>,
}

impl Summary {
    /// `PASS`, `FAIL: reason` or `PENDING: reason`.
    pub fn verdict_text(&self) -> String {
        match &self.verdict {
            Ok(()) => "PASS".to_string(),
            Err(reason) if reason.starts_with(PENDING) => reason.clone(),
            Err(reason) => format!("FAIL: {reason}"),
        }
    }
}

/// An aligned text table of `rows`: scenario, requests, client errors, origin fetches, time
/// to failover, verdict.
pub fn table(rows: &[Summary]) -> String {
    let header = [
        "scenario",
        "requests",
        "client errors",
        "origin fetches",
        "time to failover",
        "verdict",
    ];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            [
                r.scenario.clone(),
                r.requests.to_string(),
                r.client_errors.to_string(),
                r.origin_fetches.to_string(),
                r.failover.map_or_else(|| "-".to_string(), duration_text),
                r.verdict_text(),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |row: &[String]| {
        let mut out = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            // Text columns align left, counts right; the last column is not padded.
            let padded = match i {
                0 => format!("{cell:<w$}"),
                5 => cell.clone(),
                _ => format!("{cell:>w$}"),
            };
            if i > 0 {
                out.push_str("  ");
            }
            out.push_str(&padded);
        }
        out.push('\n');
        out
    };
    let mut out = line(&header.map(str::to_string));
    let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
    out.push_str(&line(&rule));
    for row in &cells {
        out.push_str(&line(row));
    }
    out
}

/// `850 ms` below a second, `1.25 s` above.
fn duration_text(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.2} s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::origin::{Reply, TestOrigin};

    fn record(status: Option<u16>, complete: bool) -> Record {
        Record {
            started: Duration::ZERO,
            took: Duration::from_millis(1),
            key: "/k".to_string(),
            lower: 0,
            status,
            cache_status: String::new(),
            complete,
            error: status.is_none().then(|| "refused".to_string()),
        }
    }

    #[test]
    fn errors_are_missing_responses_5xx_and_cut_bodies() {
        let h = History::new();
        h.push(record(Some(200), true));
        h.push(record(Some(404), true));
        h.push(record(None, false));
        h.push(record(Some(502), true));
        h.push(record(Some(200), false));
        assert_eq!(h.len(), 5);
        let errors = h.errors();
        assert_eq!(errors.len(), 3);
        assert!(errors.iter().all(Record::is_error));
    }

    #[test]
    fn the_table_is_aligned() {
        let rows = [
            Summary {
                scenario: "upper killed".to_string(),
                requests: 1200,
                client_errors: 0,
                origin_fetches: 40,
                failover: Some(Duration::from_millis(850)),
                verdict: Ok(()),
            },
            Summary {
                scenario: "link blackholed".to_string(),
                requests: 30,
                client_errors: 3,
                origin_fetches: 7,
                failover: None,
                verdict: Err("3 errors".to_string()),
            },
            Summary {
                scenario: "upgrade".to_string(),
                requests: 5,
                client_errors: 0,
                origin_fetches: 1,
                failover: Some(Duration::from_millis(1250)),
                verdict: pending("needs --upgrade support"),
            },
        ];
        let text = table(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5);
        assert!(lines[0].starts_with("scenario "));
        assert!(lines[0].contains("time to failover"));
        let verdict_at = lines[0].find("verdict").expect("verdict column");
        assert_eq!(lines[2][verdict_at..].trim_end(), "PASS");
        assert_eq!(lines[3][verdict_at..].trim_end(), "FAIL: 3 errors");
        assert_eq!(
            lines[4][verdict_at..].trim_end(),
            "PENDING: needs --upgrade support"
        );
        assert!(lines[2].contains("850 ms"));
        assert!(lines[4].contains("1.25 s"));
        assert!(lines[3].contains(" - "));
    }

    #[tokio::test]
    async fn load_sends_every_request_and_records_it() {
        let origin = TestOrigin::start().await.expect("origin");
        origin.fallback(|req, _| Reply::ok(format!("body of {}", req.path)));
        let keys: Vec<String> = (0..5).map(|i| format!("/k{i}")).collect();
        let history = History::new();
        // Two "lowers" that are the same origin: load only needs something that answers.
        let lowers = [origin.addr(), origin.addr()];
        load(&lowers, "t", &keys, 40, 4, &history).await;
        let records = history.records();
        assert_eq!(records.len(), 40);
        assert_eq!(origin.total(), 40);
        assert!(history.errors().is_empty());
        assert!(records.iter().all(|r| keys.contains(&r.key)));
        assert_eq!(records.iter().filter(|r| r.lower == 1).count(), 20);
        assert!(keys.iter().all(|k| origin.count(k) > 0), "keys spread");
    }

    #[tokio::test]
    async fn failed_requests_are_recorded_with_their_error() {
        let gone = crate::node::free_port().expect("port");
        let history = History::new();
        load(&[gone], "t", &["/k".to_string()], 3, 8, &history).await;
        let errors = history.errors();
        assert_eq!(errors.len(), 3);
        assert!(errors
            .iter()
            .all(|r| r.error.is_some() && r.status.is_none()));
    }
}
