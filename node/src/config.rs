//! The node's TOML configuration: parsed, typed and validated before any port is bound.
//!
//! Serde's derive stops at the first error; an operator fixing a config wants every problem
//! at once (linkerd2-proxy habit: list them all, exit 64). So the file is parsed into a
//! `toml::Table` and each section is read by a [`Section`] reader that records problems as
//! `dotted.key: message` and keeps going. Unknown keys are problems too.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use toml::{Table, Value};

/// Which side of the fleet a node faces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Faces clients; on a miss asks an upper node (or the origin when standalone).
    Lower,
    /// Faces origins; serves only lower nodes carrying a control context.
    Upper,
}

impl Role {
    /// The name used in config, metrics and traces.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Lower => "lower",
            Role::Upper => "upper",
        }
    }
}

/// What a lower node does when no upper node is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllUpperDown {
    /// Serve stale if allowed, else 502.
    Error,
    /// Go to the origin directly.
    Origin,
}

/// `[node]`.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Unique name in the fleet; shown in `Cache-Status`, metrics and traces.
    pub name: String,
    /// Lower or upper tier.
    pub role: Role,
    /// Data listener for clients and lower tiers.
    pub listen: SocketAddr,
    /// Admin API listener.
    pub admin_listen: SocketAddr,
    /// Worker threads of the proxy service.
    pub threads: usize,
    /// Bound on the request line plus headers; larger requests get 431.
    pub max_request_header_size: usize,
    /// Total time a client's request header may take from its first byte to its end.
    pub header_timeout: Duration,
    /// How long a client's keep-alive connection may wait for its next request (whole
    /// seconds).
    pub idle_timeout: Duration,
    /// Open connections one client address may hold at once; 0 = no cap.
    pub max_client_connections: u32,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub grace_period: Duration,
}

/// `[cache]`.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    /// Bound on stored bytes (bodies, metadata and per-entry overhead).
    pub capacity: u64,
    /// Larger responses stream through uncached.
    pub max_object_size: u64,
    /// How long one fill may hold the coalescing lock before waiters compete to fetch.
    pub lock_age_timeout: Duration,
    /// How long a request waits, in total, on another request's fill before going upstream.
    pub lock_wait_timeout: Duration,
    /// What a response that sets cookies does to the cache.
    pub set_cookie: SetCookie,
}

/// `[cache] set_cookie`: responses carrying `Set-Cookie` (or `Set-Cookie2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SetCookie {
    /// Not stored at all (nginx's and Varnish's default): a cookie is never handed to another
    /// client from cache.
    #[default]
    Bypass,
    /// Stored without its cookies: the request that filled the cache gets them, every later
    /// hit gets the response without them (Varnish's `unset beresp.http.Set-Cookie`, but the
    /// client that caused the cookie still receives it).
    Strip,
}

/// One `[tier].upper` member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpperMember {
    /// `IP:port` of the member's data listener.
    pub addr: SocketAddr,
    /// Share of keys relative to the others; at least 1.
    pub weight: u32,
    /// The member's `node.name`, when given: control contexts are addressed to it (needed
    /// when `addr` is not the member's own listen address, e.g. behind a proxy or NAT).
    pub name: Option<String>,
}

impl TierConfig {
    /// Whether upper members are configured, by address or by DNS name.
    pub fn has_upper(&self) -> bool {
        !self.upper.is_empty() || !self.upper_dns.is_empty()
    }
}

impl UpperMember {
    /// The recipient named in control contexts sent to this member.
    pub fn recipient(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.addr.to_string())
    }
}

/// One `[tier].upper` entry `{ dns = "name:port", weight }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsMember {
    /// The name whose A/AAAA records are the members' addresses.
    pub name: String,
    /// The members' data-listener port.
    pub port: u16,
    /// Share of keys of each member it resolves to.
    pub weight: u32,
    /// How often the name is looked up again; unset, when its answer's TTL runs out. An
    /// answer is reused while its TTL lasts either way.
    pub refresh: Option<Duration>,
}

/// `[tier]`.
#[derive(Debug, Clone)]
pub struct TierConfig {
    /// Fleet secret this node signs control contexts with, at least 32 bytes.
    pub secret: Vec<u8>,
    /// `[tier.tls]`: mutual TLS between the tiers (every node of a fleet has it, or none).
    pub tls: Option<crate::tls::TlsMaterial>,
    /// Further secrets accepted from other nodes during a rotation (`accept_secrets`,
    /// `accept_secret_files`); never used to sign.
    pub accept_secrets: Vec<Vec<u8>>,
    /// Upper members given by address (lower nodes only).
    pub upper: Vec<UpperMember>,
    /// Upper members given by a DNS name: every address it resolves to is a member (a
    /// Kubernetes headless service), re-resolved when the answer's TTL runs out.
    pub upper_dns: Vec<DnsMember>,
    /// Policy when every upper member is down.
    pub on_all_upper_down: AllUpperDown,
    /// Connect timeout to an upper node.
    pub connect_timeout: Duration,
    /// Timeout for each read from an upper node (response headers, then between body
    /// reads). Longer than the uppers' wait for their origins, so an upper answers 504 about
    /// its origin before a lower gives up on the upper.
    pub read_timeout: Duration,
    /// Whether `read_timeout` was derived from the `[[origin]]` timeouts (not set).
    pub read_timeout_derived: bool,
    /// Consecutive failures that mark a member down.
    pub failure_threshold: u32,
    /// Consecutive ready probes that bring a down member back (hysteresis).
    pub rise: u32,
    /// How often members are probed; a round finishes before the next starts.
    pub probe_interval: Duration,
    /// How long one readiness probe may take.
    pub probe_timeout: Duration,
}

/// One `[[origin]]`.
#[derive(Debug, Clone)]
pub struct OriginConfig {
    /// Host this origin serves, lowercased, without port.
    pub host: String,
    /// `IP:port` or `name:port`; only ever taken from this file.
    pub address: String,
    /// Connect with TLS (SNI = `host`).
    pub tls: bool,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Timeout for response headers and between body reads.
    pub read_timeout: Duration,
}

/// `[tracing]`.
#[derive(Debug, Clone, PartialEq)]
pub struct TracingConfig {
    /// Base URL of an OTLP/HTTP receiver; `None` = no export.
    pub otlp_endpoint: Option<String>,
    /// Parent-based sampling ratio in `[0, 1]`.
    pub sample_ratio: f64,
    /// Spans waiting for export before new ones are dropped (and counted).
    pub queue_size: usize,
    /// Total time one export may take, retries included.
    pub export_timeout: Duration,
}

/// `[dns]`: how origins given by name are resolved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsConfig {
    /// Name servers to ask (`IP` or `IP:port`); empty = those of `/etc/resolv.conf`.
    pub nameservers: Vec<SocketAddr>,
}

/// `[admin]`.
#[derive(Debug, Clone, Default)]
pub struct AdminConfig {
    /// Bearer token required by POST endpoints, when set (`token` or `token_file`).
    pub token: Option<String>,
    /// Whether `GET /ring` and `GET /metrics` need the token too (`/healthz` never does).
    pub guard_reads: bool,
}

/// The configuration in force, replaced whole (and atomically) by a reload. Readers load it
/// once per decision: one request never sees half of two configs.
pub type Live = Arc<arc_swap::ArcSwap<Config>>;

/// A whole, validated node configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `[node]`.
    pub node: NodeConfig,
    /// `[cache]`.
    pub cache: CacheConfig,
    /// `[tier]`, absent on a standalone node.
    pub tier: Option<TierConfig>,
    /// `[[origin]]` tables.
    pub origins: Vec<OriginConfig>,
    /// `[tracing]`.
    pub tracing: TracingConfig,
    /// `[admin]`.
    pub admin: AdminConfig,
    /// `[dns]`.
    pub dns: DnsConfig,
    /// `[tls]`: HTTPS for clients (lower nodes).
    pub tls: Option<ClientTlsConfig>,
}

/// `[tls]`: a lower's HTTPS listener for clients, beside its plain `listen`.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientTlsConfig {
    /// Where clients connect with TLS (HTTP/2 or HTTP/1.1 by ALPN).
    pub listen: SocketAddr,
    /// The certificate served, reloaded with the config.
    pub cert: crate::tls::SiteCert,
}

/// One thing wrong with a config, at a dotted key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key, e.g. `node.role` or `origin[1].address`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Why a config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is read but invalid; every problem is listed.
    #[error("{} problem(s)", problems.len())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem found.
        problems: Vec<Problem>,
        /// The file's text, to point each problem at its line.
        text: String,
    },
}

impl ConfigError {
    /// One line per problem, `FILE: dotted.key: message`, as `stratus check` prints them.
    pub fn lines(&self) -> Vec<String> {
        match self {
            ConfigError::Read { .. } => vec![self.to_string()],
            ConfigError::Invalid {
                path,
                problems,
                text,
            } => problems
                .iter()
                .map(|p| match syntax_position(&p.key) {
                    // A syntax error: `FILE:LINE:COLUMN: message`.
                    Some(at) => format!("{}:{at}: {}", path.display(), p.message),
                    None => match line_of(text, &p.key) {
                        Some(line) => format!("{}:{line}: {p}", path.display()),
                        None => format!("{}: {p}", path.display()),
                    },
                })
                .collect(),
        }
    }
}

/// The problem with a size written as a bare number `n`.
fn unit_needed(n: &str) -> String {
    format!("must name its unit: \"{n}MiB\", or \"{n}B\" if {n} bytes is meant (B, KiB, MiB, GiB)")
}

/// `"line L, column C"` (a syntax error's key) as `L:C`.
fn syntax_position(key: &str) -> Option<String> {
    let rest = key.strip_prefix("line ")?;
    let (line, column) = rest.split_once(", column ")?;
    Some(format!("{line}:{column}"))
}

/// The line (1-based) a problem's dotted key points at: the key's own line inside its
/// section (`cache.capacity`, `origin[1].host`, `tier.upper[0]`), else the section's header.
/// `None` when the key is not written in the file (a missing required key of a missing
/// section).
pub fn line_of(text: &str, key: &str) -> Option<usize> {
    let mut parts = key.split('.');
    let first = parts.next()?;
    let (section, nth) = match first.split_once('[') {
        Some((name, index)) => (name, index.trim_end_matches(']').parse::<usize>().ok()),
        None => (first, None),
    };
    let leaf = parts.next().map(|l| l.split('[').next().unwrap_or(l));
    let mut current: Option<(&str, usize)> = None;
    let mut seen: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut header_line = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            let name = t
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim();
            let count = seen.entry(name).or_insert(0);
            current = Some((name, *count));
            *count += 1;
            if name == section && nth.is_none_or(|n| n + 1 == *count) {
                header_line.get_or_insert(i + 1);
            }
            continue;
        }
        let here = match current {
            Some((name, count)) => name == section && nth.is_none_or(|n| n == count),
            None => leaf.is_none(),
        };
        let wanted = if current.is_none() {
            Some(section)
        } else {
            leaf
        };
        if let (true, Some(want)) = (here, wanted) {
            let assigned = t
                .strip_prefix(want)
                .is_some_and(|rest| rest.trim_start().starts_with('='));
            if assigned {
                return Some(i + 1);
            }
        }
    }
    header_line
}

/// The known name closest to an unknown one, if one is close enough to be a typo.
fn did_you_mean<'k>(unknown: &str, known: impl IntoIterator<Item = &'k str>) -> Option<&'k str> {
    known
        .into_iter()
        .map(|k| (strsim::jaro_winkler(unknown, k), k))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, k)| k)
}

// Defaults. Each says why.
/// Two workers keep one node responsive on small machines; operators raise it per core.
const DEFAULT_THREADS: usize = 2;
/// Matches nginx's `large_client_header_buffers 4 8k`: enough for real cookies, small enough
/// that a header flood cannot pin memory.
const DEFAULT_MAX_REQUEST_HEADER: u64 = 32 * 1024;
/// Long enough for slow downloads to finish on deploy, short enough for a rolling restart.
const DEFAULT_GRACE_PERIOD: Duration = Duration::from_secs(30);
/// 256 MiB: a useful hot set without surprising a small host.
const DEFAULT_CAPACITY: u64 = 256 * 1024 * 1024;
/// 32 MiB: bigger objects stream through so one video cannot flush the hot set.
const DEFAULT_MAX_OBJECT: u64 = 32 * 1024 * 1024;
/// A fill that holds the lock longer than this is presumed stuck; waiters compete to fetch.
const DEFAULT_LOCK_AGE: Duration = Duration::from_secs(30);
/// A waiter gives up on someone else's fill after this and fetches uncached itself.
const DEFAULT_LOCK_WAIT: Duration = Duration::from_secs(10);
/// Loopback or same-datacenter upper nodes connect in well under this.
const DEFAULT_TIER_CONNECT: Duration = Duration::from_millis(500);
/// An upper node answers headers from cache at once; it waits on origins up to their own timeout.
const TIER_NEST_MARGIN: Duration = Duration::from_secs(3);
/// Three strikes: one lost packet does not move a member's keys.
const DEFAULT_FAILURE_THRESHOLD: u64 = 3;
/// Probed every second, so a recovered member returns within about a second.
const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// A probe is one small request on loopback or a LAN: a second is generous.
const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Two ready probes in a row bring a member back, so one lucky probe does not make it flap.
const DEFAULT_RISE: u64 = 2;
/// Origins across the internet get two seconds to accept.
const DEFAULT_ORIGIN_CONNECT: Duration = Duration::from_secs(2);
/// Origins may compute responses; thirty seconds matches common CDN defaults.
const DEFAULT_ORIGIN_READ: Duration = Duration::from_secs(30);
/// About a second of spans at 4 000 requests/s with two spans each: rides out a slow collector.
const DEFAULT_SPAN_QUEUE: u64 = 8192;
/// A collector that takes longer than this is treated as down; spans queue meanwhile.
const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default total time for a request header (nginx's `client_header_timeout` is 60 s; a
/// header that takes more than a few seconds on a live connection is a slow-loris).
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default wait for a keep-alive connection's next request (nginx 75 s, Varnish 5 s).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// Default cap on one client address's open connections (an upper sees each lower as one
/// client: keep it above the lowers' upstream pool).
pub const DEFAULT_MAX_CLIENT_CONNECTIONS: u32 = 512;

/// Where the admin API listens when `node.admin_listen` is not set: this host only.
pub const DEFAULT_ADMIN_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9080);

/// HMAC-SHA256 keys shorter than its output weaken it.
const MIN_SECRET_LEN: usize = 32;

/// A file holding a secret: refused when other users may read or write it (a group may read
/// it, as a Kubernetes `fsGroup` mount needs); trailing whitespace is not part of the secret.
pub fn read_private_file(path: &Path) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display();
    let mode = std::fs::metadata(path)
        .map_err(|e| format!("cannot read {shown}: {e}"))?
        .permissions()
        .mode();
    if mode & 0o007 != 0 {
        return Err(format!(
            "{shown} is open to other users (mode {:04o}); a secret must not be: chmod o-rwx it (0600 or 0640)",
            mode & 0o7777
        ));
    }
    let mut bytes = std::fs::read(path).map_err(|e| format!("cannot read {shown}: {e}"))?;
    while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
        bytes.pop();
    }
    Ok(bytes)
}

/// Reads one table's keys, recording problems under a dotted prefix.
struct Section<'a> {
    prefix: String,
    table: Option<&'a Table>,
    seen: BTreeSet<&'static str>,
    problems: &'a mut Vec<Problem>,
}

impl<'a> Section<'a> {
    fn new(
        prefix: impl Into<String>,
        table: Option<&'a Table>,
        problems: &'a mut Vec<Problem>,
    ) -> Self {
        Section {
            prefix: prefix.into(),
            table,
            seen: BTreeSet::new(),
            problems,
        }
    }

    fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    fn problem(&mut self, name: &str, message: impl Into<String>) {
        let key = self.key(name);
        self.problems.push(Problem {
            key,
            message: message.into(),
        });
    }

    fn raw(&mut self, name: &'static str) -> Option<&'a Value> {
        self.seen.insert(name);
        self.table.and_then(|t| t.get(name))
    }

    fn string(&mut self, name: &'static str) -> Option<String> {
        match self.raw(name)? {
            Value::String(s) => Some(s.clone()),
            other => {
                self.problem(
                    name,
                    format!("must be a string, found {}", other.type_str()),
                );
                None
            }
        }
    }

    /// A list of strings; absent is empty.
    fn strings(&mut self, name: &'static str) -> Vec<String> {
        match self.raw(name) {
            None => Vec::new(),
            Some(Value::Array(items)) if items.iter().all(Value::is_str) => items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            Some(other) => {
                let found = other.type_str();
                self.problem(name, format!("must be a list of strings, found {found}"));
                Vec::new()
            }
        }
    }

    /// The secret in file `f` (relative to the config's directory), reported under `key`.
    fn secret_file(&mut self, key: &str, base_dir: &Path, f: &str) -> Vec<u8> {
        match read_private_file(&base_dir.join(f)) {
            Ok(bytes) => bytes,
            Err(message) => {
                self.problem(key, message);
                Vec::new()
            }
        }
    }

    /// A secret must be long enough for HMAC-SHA256 (an unreadable one was reported already).
    fn check_secret(&mut self, key: &str, secret: &[u8]) {
        if !secret.is_empty() && secret.len() < MIN_SECRET_LEN {
            let found = secret.len();
            self.problem(
                key,
                format!("must be at least {MIN_SECRET_LEN} bytes, found {found}"),
            );
        }
    }

    fn required_string(&mut self, name: &'static str) -> Option<String> {
        let value = self.string(name);
        if value.is_none() && self.table.is_some_and(|t| !t.contains_key(name)) {
            self.problem(name, "is required");
        }
        value
    }

    fn boolean(&mut self, name: &'static str, default: bool) -> bool {
        match self.raw(name) {
            None => default,
            Some(Value::Boolean(b)) => *b,
            Some(other) => {
                let found = other.type_str();
                self.problem(name, format!("must be true or false, found {found}"));
                default
            }
        }
    }

    fn integer(&mut self, name: &'static str, min: i64, max: i64, default: i64) -> i64 {
        match self.raw(name) {
            None => default,
            Some(Value::Integer(n)) if (min..=max).contains(n) => *n,
            Some(Value::Integer(n)) => {
                self.problem(name, format!("must be between {min} and {max}, found {n}"));
                default
            }
            Some(other) => {
                let found = other.type_str();
                self.problem(name, format!("must be an integer, found {found}"));
                default
            }
        }
    }

    fn float(&mut self, name: &'static str, default: f64) -> f64 {
        match self.raw(name) {
            None => default,
            Some(Value::Float(f)) => *f,
            Some(Value::Integer(n)) => *n as f64,
            Some(other) => {
                let found = other.type_str();
                self.problem(name, format!("must be a number, found {found}"));
                default
            }
        }
    }

    fn addr(&mut self, name: &'static str) -> Option<SocketAddr> {
        let s = self.required_string(name)?;
        match s.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.problem(name, format!("must be IP:port, found {s:?}"));
                None
            }
        }
    }

    fn size(&mut self, name: &'static str, default: u64) -> u64 {
        match self.raw(name) {
            None => default,
            // `capacity = 256` would silently be 256 bytes: a size always names its unit.
            Some(bare @ Value::Integer(_)) => {
                self.problem(name, unit_needed(&bare.to_string()));
                default
            }
            Some(Value::String(s)) if s.trim().ends_with(|c: char| c.is_ascii_digit()) => {
                self.problem(name, unit_needed(s.trim()));
                default
            }
            Some(Value::String(s)) => match parse_size(s) {
                Some(n) if n > 0 => n,
                _ => {
                    let msg =
                        format!("must be a size like \"64MiB\" (B, KiB, MiB, GiB), found {s:?}");
                    self.problem(name, msg);
                    default
                }
            },
            Some(other) => {
                let msg = format!("must be a size like \"64MiB\", found {other}");
                self.problem(name, msg);
                default
            }
        }
    }

    fn duration(&mut self, name: &'static str, default: Duration) -> Duration {
        match self.raw(name) {
            None => default,
            Some(Value::String(s)) => match parse_duration(s) {
                Some(d) if !d.is_zero() => d,
                _ => {
                    let msg =
                        format!("must be a duration like \"500ms\", \"2s\" or \"1m\", found {s:?}");
                    self.problem(name, msg);
                    default
                }
            },
            Some(other) => {
                let msg = format!("must be a duration string like \"2s\", found {other}");
                self.problem(name, msg);
                default
            }
        }
    }

    /// Reports keys that no reader asked for.
    fn finish(self) {
        let Some(table) = self.table else { return };
        let unknown: Vec<String> = table
            .keys()
            .filter(|k| !self.seen.contains(k.as_str()))
            .cloned()
            .collect();
        for k in unknown {
            let key = self.key(&k);
            let message = match did_you_mean(&k, self.seen.iter().copied()) {
                Some(known) => format!("unknown key; did you mean {known:?}?"),
                None => "unknown key".into(),
            };
            self.problems.push(Problem { key, message });
        }
    }
}

/// Parses `"64MiB"`, `"512KiB"`, `"1GiB"`, `"100B"` or a bare number of bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Parses `"250ms"`, `"2s"`, `"1m"` or `"1h"`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        _ => None,
    }
}

fn table_of<'a>(
    root: &'a Table,
    name: &'static str,
    seen: &mut BTreeSet<&'static str>,
    problems: &mut Vec<Problem>,
) -> Option<&'a Table> {
    seen.insert(name);
    match root.get(name)? {
        Value::Table(t) => Some(t),
        other => {
            problems.push(Problem {
                key: name.into(),
                message: format!("must be a table, found {}", other.type_str()),
            });
            None
        }
    }
}

impl Config {
    /// Reads and validates a config file. `secret_file` paths are relative to the config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, base).map_err(|problems| ConfigError::Invalid {
            path: path.to_path_buf(),
            problems,
            text: text.clone(),
        })
    }

    /// Parses and validates config text; on failure returns every problem found.
    pub fn parse(text: &str, base_dir: &Path) -> Result<Config, Vec<Problem>> {
        let root: Table = match text.parse::<Table>() {
            Ok(t) => t,
            Err(e) => {
                // One line per problem, like every other: the parser's hint joins its message.
                let message = e
                    .message()
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .collect::<Vec<_>>()
                    .join("; ");
                let key = match e.span() {
                    Some(span) => {
                        let before = &text[..span.start.min(text.len())];
                        let line = before.matches('\n').count() + 1;
                        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                        format!("line {line}, column {column}")
                    }
                    None => "toml".into(),
                };
                return Err(vec![Problem { key, message }]);
            }
        };
        let mut problems = Vec::new();
        let mut seen = BTreeSet::new();

        let node_t = table_of(&root, "node", &mut seen, &mut problems);
        if node_t.is_none() && !root.contains_key("node") {
            problems.push(Problem {
                key: "node".into(),
                message: "is required".into(),
            });
        }
        let node = read_node(node_t, &mut problems);
        let cache_t = table_of(&root, "cache", &mut seen, &mut problems);
        let cache = read_cache(cache_t, &mut problems);
        let tier_t = table_of(&root, "tier", &mut seen, &mut problems);
        let name = node.as_ref().map_or("", |n| n.name.as_str());
        let tier = tier_t.map(|t| read_tier(t, base_dir, name, &mut problems));
        let tracing_t = table_of(&root, "tracing", &mut seen, &mut problems);
        let tracing = read_tracing(tracing_t, &mut problems);
        let admin_t = table_of(&root, "admin", &mut seen, &mut problems);
        let admin = read_admin(admin_t, base_dir, &mut problems);
        let dns_t = table_of(&root, "dns", &mut seen, &mut problems);
        let dns = read_dns(dns_t, &mut problems);
        let tls_t = table_of(&root, "tls", &mut seen, &mut problems);
        let tls = tls_t.and_then(|t| read_client_tls(t, base_dir, &mut problems));
        seen.insert("origin");
        let origins = read_origins(root.get("origin"), &mut problems);

        for k in root.keys().filter(|k| !seen.contains(k.as_str())) {
            let message = match did_you_mean(k, seen.iter().copied()) {
                Some(known) => format!("unknown section; did you mean [{known}]?"),
                None => "unknown section".into(),
            };
            problems.push(Problem {
                key: k.clone(),
                message,
            });
        }

        // Cross-section rules.
        if origins.is_empty() && !problems.iter().any(|p| p.key.starts_with("origin")) {
            problems.push(Problem {
                key: "origin".into(),
                message: "at least one [[origin]] is needed: every request's Host is matched against them (without any, every request gets 421)".into(),
            });
        }
        if let Some(node) = &node {
            if node.listen == node.admin_listen {
                problems.push(Problem {
                    key: "node.admin_listen".into(),
                    message: "must differ from node.listen".into(),
                });
            }
            if let Some(t) = &tls {
                if node.role == Role::Upper {
                    problems.push(Problem {
                        key: "tls".into(),
                        message: "only lower nodes serve clients; the tiers use [tier.tls]".into(),
                    });
                }
                if t.listen == node.listen || t.listen == node.admin_listen {
                    problems.push(Problem {
                        key: "tls.listen".into(),
                        message: "must differ from node.listen and node.admin_listen".into(),
                    });
                }
            }
            if !node.admin_listen.ip().is_loopback() && admin.token.is_none() {
                problems.push(Problem {
                    key: "node.admin_listen".into(),
                    message: format!(
                        "{} is reachable from other hosts: set [admin] token_file (or token) so purges need it, or bind a loopback address",
                        node.admin_listen
                    ),
                });
            }
            match (node.role, &tier) {
                (Role::Upper, None) => problems.push(Problem {
                    key: "tier".into(),
                    message: "is required for role \"upper\"".into(),
                }),
                (Role::Upper, Some(t)) if t.has_upper() => problems.push(Problem {
                    key: "tier.upper".into(),
                    message: "only lower nodes list upper members".into(),
                }),
                _ => {}
            }
        }
        let mut tier = tier;
        if let Some(t) = tier.as_mut() {
            nest_tier_timeouts(t, &origins, &mut problems);
        }
        if cache.max_object_size > cache.capacity / 4 {
            problems.push(Problem {
                key: "cache.max_object_size".into(),
                message: "must not exceed a quarter of cache.capacity (the share fills in progress may hold)".into(),
            });
        }

        match (node, problems.is_empty()) {
            (Some(node), true) => Ok(Config {
                node,
                cache,
                tier,
                origins,
                tracing,
                admin,
                dns,
                tls,
            }),
            _ => Err(problems),
        }
    }

    /// What a reload from this config to `next` cannot change while the process runs: each
    /// a problem at its key. Empty means every difference applies live (upper members and
    /// weights, origins, timeouts, cache limits but `capacity`, admin token, DNS). A reload
    /// with any refusal changes nothing: the running config stays whole.
    pub fn reload_refusals(&self, next: &Config) -> Vec<Problem> {
        let (a, b) = (&self.node, &next.node);
        let fixed = [
            ("node.name", a.name != b.name),
            ("node.role", a.role != b.role),
            ("node.listen", a.listen != b.listen),
            ("node.admin_listen", a.admin_listen != b.admin_listen),
            ("node.threads", a.threads != b.threads),
            ("node.grace_period", a.grace_period != b.grace_period),
            ("node.header_timeout", a.header_timeout != b.header_timeout),
            ("node.idle_timeout", a.idle_timeout != b.idle_timeout),
            ("cache.capacity", self.cache.capacity != next.cache.capacity),
            (
                "cache.lock_age_timeout",
                self.cache.lock_age_timeout != next.cache.lock_age_timeout,
            ),
            ("tier", self.tier.is_some() != next.tier.is_some()),
            (
                "tier.tls",
                matches!((&self.tier, &next.tier), (Some(x), Some(y)) if x.tls.is_some() != y.tls.is_some()),
            ),
            ("tracing", self.tracing != next.tracing),
            (
                "tls.listen",
                self.tls.as_ref().map(|t| t.listen) != next.tls.as_ref().map(|t| t.listen),
            ),
        ];
        fixed
            .into_iter()
            .filter(|(_, changed)| *changed)
            .map(|(key, _)| Problem {
                key: key.into(),
                message: "changes only with a restart or `stratus run --upgrade`; the running config is kept".into(),
            })
            .collect()
    }

    /// What `stratus check` explains beyond "ok": defaults it derived.
    pub fn notes(&self) -> Vec<String> {
        let mut notes = Vec::new();
        if self.node.role == Role::Upper && self.node.listen.ip().is_unspecified() {
            notes.push(format!(
                "node.listen: {} accepts contexts addressed to \"{}\" or \"{}\" only; lowers must list this member with name = \"{}\"",
                self.node.listen, self.node.name, self.node.listen, self.node.name
            ));
        }
        notes.extend(self.derived_notes());
        notes
    }

    fn derived_notes(&self) -> Vec<String> {
        match &self.tier {
            Some(t) if t.read_timeout_derived && t.has_upper() => vec![format!(
                "tier.read_timeout: not set; derived {:?} = the longest [[origin]] connect_timeout + read_timeout ({:?}) + {:?}, so an upper answers about a slow origin before this node gives up on the upper",
                t.read_timeout,
                origin_wait(&self.origins),
                TIER_NEST_MARGIN
            )],
            _ => Vec::new(),
        }
    }

    /// The origin serving `host` (case-insensitive, port ignored), if any.
    pub fn origin_for(&self, host: &str) -> Option<&OriginConfig> {
        let host = normalize_host(host)?;
        self.origins.iter().find(|o| o.host == host)
    }

    /// Checks that both listeners can be bound right now, so a taken port is one clear line.
    pub fn check_ports(&self) -> Result<(), String> {
        for (key, addr) in [
            ("node.listen", self.node.listen),
            ("node.admin_listen", self.node.admin_listen),
        ] {
            TcpListener::bind(addr).map_err(|e| format!("{key}: cannot bind {addr}: {e}"))?;
        }
        Ok(())
    }
}

/// The longest an upper may wait on one of these origins before it answers itself.
fn origin_wait(origins: &[OriginConfig]) -> Duration {
    origins
        .iter()
        .map(|o| o.connect_timeout + o.read_timeout)
        .max()
        .unwrap_or(DEFAULT_ORIGIN_CONNECT + DEFAULT_ORIGIN_READ)
}

/// Timeouts nest: a lower waits on an upper longer than the upper waits on its origin (the
/// fleet's nodes carry the same `[[origin]]` list), so a slow origin gets a 504 from the upper
/// that names the origin, and the member is not blamed. Derives the value when it is not set.
fn nest_tier_timeouts(t: &mut TierConfig, origins: &[OriginConfig], problems: &mut Vec<Problem>) {
    let wait = origin_wait(origins);
    if t.read_timeout_derived {
        t.read_timeout = wait + TIER_NEST_MARGIN;
    } else if t.has_upper() && t.read_timeout <= wait {
        problems.push(Problem {
            key: "tier.read_timeout".into(),
            message: format!(
                "must exceed the longest [[origin]] connect_timeout + read_timeout ({wait:?}), so uppers answer about slow origins before this node gives up on them; leave it out to derive {:?}",
                wait + TIER_NEST_MARGIN
            ),
        });
    }
}

/// Lowercases a Host value and strips its port; `None` if it is not a plausible host name.
pub fn normalize_host(host: &str) -> Option<String> {
    let host = host.trim();
    let port_ok = |p: &str| p.chars().all(|c| c.is_ascii_digit());
    if let Some(rest) = host.strip_prefix('[') {
        // An IPv6 literal keeps its brackets: it is sent as `Host: [::1]` and keyed so.
        let (inner, after) = rest.split_once(']')?;
        let port = after.is_empty() || after.strip_prefix(':').is_some_and(port_ok);
        let literal = !inner.is_empty()
            && inner.len() <= 45
            && inner.contains(':')
            && inner
                .chars()
                .all(|c| c.is_ascii_hexdigit() || matches!(c, ':' | '.'));
        return (port && literal).then(|| format!("[{}]", inner.to_ascii_lowercase()));
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port_ok(port) => name,
        Some(_) => return None,
        None => host,
    };
    // A ':' left outside brackets is not a host (an unbracketed IPv6 address is ambiguous).
    let valid = !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    valid.then(|| name.to_ascii_lowercase())
}

/// A node name: it appears in headers, metrics and control contexts.
fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn read_node(t: Option<&Table>, problems: &mut Vec<Problem>) -> Option<NodeConfig> {
    let t = t?;
    let mut s = Section::new("node", Some(t), problems);
    let name = s.required_string("name");
    if let Some(n) = &name {
        if !valid_name(n) {
            s.problem(
                "name",
                "must be 1-64 characters of letters, digits, '-', '_' or '.' (it appears in headers)",
            );
        }
    }
    let role = match s.required_string("role").as_deref() {
        Some("lower") => Some(Role::Lower),
        Some("upper") => Some(Role::Upper),
        Some(_) => {
            s.problem("role", "must be \"lower\" or \"upper\"");
            None
        }
        None => None,
    };
    let listen = s.addr("listen");
    // Loopback unless configured: the admin API purges and discloses the topology.
    let admin_listen = match s.raw("admin_listen") {
        None => Some(DEFAULT_ADMIN_LISTEN),
        Some(_) => s.addr("admin_listen"),
    };
    let threads = s.integer("threads", 1, 256, DEFAULT_THREADS as i64) as usize;
    let max_request_header_size = s.size("max_request_header_size", DEFAULT_MAX_REQUEST_HEADER);
    let grace_period = s.duration("grace_period", DEFAULT_GRACE_PERIOD);
    let header_timeout = s.duration("header_timeout", DEFAULT_HEADER_TIMEOUT);
    let idle_timeout = s.duration("idle_timeout", DEFAULT_IDLE_TIMEOUT);
    if idle_timeout.subsec_nanos() != 0 || idle_timeout < Duration::from_secs(1) {
        s.problem("idle_timeout", "must be whole seconds, at least \"1s\"");
    }
    let max_client_connections = s.integer(
        "max_client_connections",
        0,
        1_000_000,
        i64::from(DEFAULT_MAX_CLIENT_CONNECTIONS),
    ) as u32;
    s.finish();
    Some(NodeConfig {
        name: name?,
        role: role?,
        listen: listen?,
        admin_listen: admin_listen?,
        threads,
        max_request_header_size: usize::try_from(max_request_header_size).unwrap_or(usize::MAX),
        grace_period,
        header_timeout,
        idle_timeout,
        max_client_connections,
    })
}

fn read_cache(t: Option<&Table>, problems: &mut Vec<Problem>) -> CacheConfig {
    let mut s = Section::new("cache", t, problems);
    let capacity = s.size("capacity", DEFAULT_CAPACITY);
    // Unset, it defaults to 32 MiB or the quarter of capacity fills may hold, if smaller.
    let mut max_object_size = s.size("max_object_size", DEFAULT_MAX_OBJECT.min(capacity / 4));
    if max_object_size > u64::from(u32::MAX) / 2 {
        s.problem("max_object_size", "must be at most 2GiB");
        max_object_size = DEFAULT_MAX_OBJECT;
    }
    let lock_age_timeout = s.duration("lock_age_timeout", DEFAULT_LOCK_AGE);
    let lock_wait_timeout = s.duration("lock_wait_timeout", DEFAULT_LOCK_WAIT);
    let set_cookie = match s.string("set_cookie").as_deref() {
        None | Some("bypass") => SetCookie::Bypass,
        Some("strip") => SetCookie::Strip,
        Some(_) => {
            s.problem("set_cookie", "must be \"bypass\" or \"strip\"");
            SetCookie::Bypass
        }
    };
    s.finish();
    CacheConfig {
        capacity,
        max_object_size,
        lock_age_timeout,
        lock_wait_timeout,
        set_cookie,
    }
}

/// `[tier.tls]`: every file named relative to the config; the material loaded and checked as a
/// whole, so `stratus check` and a reload refuse what would fail a handshake.
fn read_tier_tls(
    v: Option<&Value>,
    base_dir: &Path,
    node_name: &str,
    problems: &mut Vec<Problem>,
) -> Option<crate::tls::TlsMaterial> {
    let table = match v? {
        Value::Table(t) => t,
        other => {
            let found = other.type_str();
            problems.push(Problem {
                key: "tier.tls".into(),
                message: format!("must be a table, found {found}"),
            });
            return None;
        }
    };
    let mut s = Section::new("tier.tls", Some(table), problems);
    let ca = s.required_string("ca");
    let cert = s.required_string("cert");
    let key = s.required_string("key");
    let crl = s.string("crl");
    s.finish();
    let (ca, cert, key) = (
        base_dir.join(ca?),
        base_dir.join(cert?),
        base_dir.join(key?),
    );
    let crl = crl.map(|c| base_dir.join(c));
    let files = crate::tls::TlsFiles {
        ca: &ca,
        cert: &cert,
        key: &key,
        crl: crl.as_deref(),
    };
    match crate::tls::TlsMaterial::load(&files, node_name) {
        Ok(m) => Some(m),
        Err((k, message)) => {
            problems.push(Problem {
                key: format!("tier.tls.{k}"),
                message,
            });
            None
        }
    }
}

fn read_tier(
    t: &Table,
    base_dir: &Path,
    node_name: &str,
    problems: &mut Vec<Problem>,
) -> TierConfig {
    let mut s = Section::new("tier", Some(t), problems);
    // Read after the section; marked as known here.
    let _ = s.raw("tls");
    let tls_value = t.get("tls");
    let inline = s.string("secret");
    let file = s.string("secret_file");
    let secret = match (inline, file) {
        (Some(_), Some(_)) => {
            s.problem("secret_file", "give either secret or secret_file, not both");
            Vec::new()
        }
        (Some(secret), None) => secret.into_bytes(),
        (None, Some(f)) => s.secret_file("secret_file", base_dir, &f),
        (None, None) => {
            s.problem("secret", "is required (or secret_file)");
            Vec::new()
        }
    };
    s.check_secret("secret", &secret);
    let mut accept_secrets = Vec::new();
    for (i, inline) in s.strings("accept_secrets").into_iter().enumerate() {
        let key = format!("accept_secrets[{i}]");
        s.check_secret(&key, inline.as_bytes());
        accept_secrets.push(inline.into_bytes());
    }
    for (i, f) in s.strings("accept_secret_files").into_iter().enumerate() {
        let key = format!("accept_secret_files[{i}]");
        let bytes = s.secret_file(&key, base_dir, &f);
        s.check_secret(&key, &bytes);
        accept_secrets.push(bytes);
    }
    let mut upper = Vec::new();
    let mut upper_dns: Vec<DnsMember> = Vec::new();
    // `upper = { dns = "…" }` is one member entry, as `upper = [{ dns = "…" }]`.
    let one;
    let members = match s.raw("upper") {
        Some(Value::Table(t)) => {
            one = vec![Value::Table(t.clone())];
            Some(&one)
        }
        Some(Value::Array(items)) => Some(items),
        _ => None,
    };
    match (s.raw("upper"), members) {
        (None, _) => {}
        (Some(_), Some(items)) => {
            for (i, item) in items.iter().enumerate() {
                match read_member(item) {
                    Ok(Listed::Addr(m)) if upper.iter().any(|u: &UpperMember| u.addr == m.addr) => {
                        s.problem(
                            &format!("upper[{i}]"),
                            format!("{} is listed twice", m.addr),
                        )
                    }
                    Ok(Listed::Addr(m)) => upper.push(m),
                    Ok(Listed::Dns(d))
                        if upper_dns
                            .iter()
                            .any(|u| u.name == d.name && u.port == d.port) =>
                    {
                        s.problem(
                            &format!("upper[{i}]"),
                            format!("{}:{} is listed twice", d.name, d.port),
                        )
                    }
                    Ok(Listed::Dns(d)) => upper_dns.push(d),
                    Err(msg) => s.problem(&format!("upper[{i}]"), msg),
                }
            }
        }
        (Some(other), None) => {
            let found = other.type_str();
            s.problem("upper", format!("must be an array, found {found}"));
        }
    }
    let on_all_upper_down = match s.string("on_all_upper_down").as_deref() {
        None | Some("error") => AllUpperDown::Error,
        Some("origin") => AllUpperDown::Origin,
        Some(_) => {
            s.problem("on_all_upper_down", "must be \"error\" or \"origin\"");
            AllUpperDown::Error
        }
    };
    let connect_timeout = s.duration("connect_timeout", DEFAULT_TIER_CONNECT);
    // Zero until the cross-section rule derives it from the [[origin]] timeouts.
    let read_timeout_derived = s.raw("read_timeout").is_none();
    let read_timeout = s.duration("read_timeout", Duration::ZERO);
    let failure_threshold = s.integer(
        "failure_threshold",
        1,
        1000,
        DEFAULT_FAILURE_THRESHOLD as i64,
    ) as u32;
    let rise = s.integer("rise", 1, 100, DEFAULT_RISE as i64) as u32;
    let probe_interval = s.duration("probe_interval", DEFAULT_PROBE_INTERVAL);
    let probe_timeout = s.duration("probe_timeout", DEFAULT_PROBE_TIMEOUT);
    s.finish();
    let tls = read_tier_tls(tls_value, base_dir, node_name, problems);
    TierConfig {
        secret,
        accept_secrets,
        tls,
        upper,
        upper_dns,
        on_all_upper_down,
        connect_timeout,
        read_timeout,
        read_timeout_derived,
        failure_threshold,
        rise,
        probe_interval,
        probe_timeout,
    }
}

/// One `[tier].upper` entry: a member by address, or a DNS name standing for several.
enum Listed {
    Addr(UpperMember),
    Dns(DnsMember),
}

fn read_member(item: &Value) -> Result<Listed, String> {
    let parse = |s: &str| {
        s.parse::<SocketAddr>()
            .map_err(|_| format!("must be IP:port, found {s:?}"))
    };
    match item {
        Value::String(s) => Ok(Listed::Addr(UpperMember {
            addr: parse(s)?,
            weight: 1,
            name: None,
        })),
        Value::Table(t) => {
            if let Some(k) = t
                .keys()
                .find(|k| !matches!(k.as_str(), "addr" | "dns" | "weight" | "name" | "refresh"))
            {
                return Err(format!("unknown key {k:?}"));
            }
            let weight = match t.get("weight") {
                None => 1,
                Some(Value::Integer(w)) if (1..=1000).contains(w) => *w as u32,
                Some(_) => return Err("weight must be an integer from 1 to 1000".into()),
            };
            let name = match t.get("name") {
                None => None,
                Some(Value::String(n)) if valid_name(n) => Some(n.clone()),
                Some(_) => return Err("name must match [A-Za-z0-9._-]{1,64}".into()),
            };
            let refresh = match t.get("refresh") {
                None => None,
                Some(Value::String(r)) => match parse_duration(r) {
                    Some(d) if d >= Duration::from_secs(1) => Some(d),
                    _ => {
                        return Err(format!(
                            "refresh must be a duration of 1s or more, found {r:?}"
                        ))
                    }
                },
                Some(other) => {
                    return Err(format!(
                        "refresh must be a duration like \"5s\", found {other}"
                    ))
                }
            };
            match (t.get("addr"), t.get("dns")) {
                (Some(Value::String(_)), None) if refresh.is_some() => {
                    Err("refresh applies to dns members only".into())
                }
                (Some(Value::String(s)), None) => Ok(Listed::Addr(UpperMember {
                    addr: parse(s)?,
                    weight,
                    name,
                })),
                (None, Some(Value::String(d))) if name.is_none() => {
                    let (host, port) = d
                        .rsplit_once(':')
                        .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
                        .filter(|(h, p)| *p > 0 && valid_dns_name(h))
                        .ok_or_else(|| format!("dns must be \"name:port\", found {d:?}"))?;
                    Ok(Listed::Dns(DnsMember {
                        name: host.to_ascii_lowercase(),
                        port,
                        weight,
                        refresh,
                    }))
                }
                (None, Some(Value::String(_))) => Err(
                    "a dns member takes no name: contexts go to each address it resolves to".into(),
                ),
                _ => Err("needs addr = \"IP:port\" or dns = \"name:port\"".into()),
            }
        }
        other => Err(format!(
            "must be \"IP:port\", {{ addr, weight, name }} or {{ dns, weight }}, found {}",
            other.type_str()
        )),
    }
}

/// A host name (not an IP address): dot-separated labels of letters, digits and hyphens.
fn valid_dns_name(host: &str) -> bool {
    host.parse::<IpAddr>().is_err()
        && host.len() <= 253
        && host.trim_end_matches('.').split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn read_origins(v: Option<&Value>, problems: &mut Vec<Problem>) -> Vec<OriginConfig> {
    let items = match v {
        None => return Vec::new(),
        Some(Value::Array(items)) => items,
        Some(other) => {
            problems.push(Problem {
                key: "origin".into(),
                message: format!("must be [[origin]] tables, found {}", other.type_str()),
            });
            return Vec::new();
        }
    };
    let mut origins: Vec<OriginConfig> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let prefix = format!("origin[{i}]");
        let Value::Table(t) = item else {
            problems.push(Problem {
                key: prefix,
                message: "must be a table".into(),
            });
            continue;
        };
        let mut s = Section::new(prefix, Some(t), problems);
        let host = s.required_string("host").and_then(|h| {
            let normalized = normalize_host(&h).filter(|n| n == &h.to_ascii_lowercase());
            if normalized.is_none() {
                s.problem(
                    "host",
                    format!("must be a host name without port, found {h:?}"),
                );
            }
            normalized
        });
        if let Some(h) = &host {
            if origins.iter().any(|o| &o.host == h) {
                s.problem("host", format!("{h:?} is served by an earlier [[origin]]"));
            }
        }
        let address = s.required_string("address").and_then(|a| {
            let ok = match a.rsplit_once(':') {
                Some((name, port)) => !name.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0),
                None => false,
            };
            if !ok {
                s.problem(
                    "address",
                    format!("must be IP:port or name:port, found {a:?}"),
                );
            }
            ok.then_some(a)
        });
        let tls = s.boolean("tls", false);
        let connect_timeout = s.duration("connect_timeout", DEFAULT_ORIGIN_CONNECT);
        let read_timeout = s.duration("read_timeout", DEFAULT_ORIGIN_READ);
        s.finish();
        if let (Some(host), Some(address)) = (host, address) {
            origins.push(OriginConfig {
                host,
                address,
                tls,
                connect_timeout,
                read_timeout,
            });
        }
    }
    origins
}

fn read_tracing(t: Option<&Table>, problems: &mut Vec<Problem>) -> TracingConfig {
    let mut s = Section::new("tracing", t, problems);
    let otlp_endpoint = s.string("otlp_endpoint");
    if let Some(e) = &otlp_endpoint {
        if !e.starts_with("http://") || e.len() <= "http://".len() {
            s.problem(
                "otlp_endpoint",
                format!("must be an http:// URL of an OTLP/HTTP receiver (no TLS in this build), found {e:?}"),
            );
        }
    }
    let sample_ratio = s.float("sample_ratio", 1.0);
    if !(0.0..=1.0).contains(&sample_ratio) {
        s.problem(
            "sample_ratio",
            format!("must be between 0 and 1, found {sample_ratio}"),
        );
    }
    let queue_size = s.integer("queue_size", 64, 1_000_000, DEFAULT_SPAN_QUEUE as i64) as usize;
    let export_timeout = s.duration("export_timeout", DEFAULT_EXPORT_TIMEOUT);
    s.finish();
    TracingConfig {
        otlp_endpoint,
        sample_ratio,
        queue_size,
        export_timeout,
    }
}

fn read_client_tls(
    t: &Table,
    base_dir: &Path,
    problems: &mut Vec<Problem>,
) -> Option<ClientTlsConfig> {
    let mut s = Section::new("tls", Some(t), problems);
    let listen = s.addr("listen");
    let cert = s.required_string("cert");
    let key = s.required_string("key");
    s.finish();
    let (cert, key) = (base_dir.join(cert?), base_dir.join(key?));
    match crate::tls::SiteCert::load(&cert, &key) {
        Ok(cert) => Some(ClientTlsConfig {
            listen: listen?,
            cert,
        }),
        Err((k, message)) => {
            problems.push(Problem {
                key: format!("tls.{k}"),
                message,
            });
            None
        }
    }
}

fn read_admin(t: Option<&Table>, base_dir: &Path, problems: &mut Vec<Problem>) -> AdminConfig {
    let mut s = Section::new("admin", t, problems);
    let inline = s.string("token");
    let token = match (inline, s.string("token_file")) {
        (Some(_), Some(_)) => {
            s.problem("token_file", "give either token or token_file, not both");
            None
        }
        (Some(token), None) => Some(token),
        (None, Some(f)) => {
            let reported = s.problems.len();
            let bytes = s.secret_file("token_file", base_dir, &f);
            match String::from_utf8(bytes) {
                Ok(token) if !token.is_empty() => Some(token),
                // An empty file must not quietly mean "no token".
                Ok(_) if s.problems.len() == reported => {
                    s.problem("token_file", "is empty");
                    None
                }
                Ok(_) => None,
                Err(_) => {
                    s.problem("token_file", "must hold text (a bearer token)");
                    None
                }
            }
        }
        (None, None) => None,
    };
    if token.as_ref().is_some_and(|t| t.len() < 16) {
        s.problem("token", "must be at least 16 characters");
    }
    let guard_reads = s.boolean("guard_reads", false);
    if guard_reads && token.is_none() {
        s.problem("guard_reads", "needs a token (or token_file) to guard with");
    }
    s.finish();
    AdminConfig { token, guard_reads }
}

fn read_dns(t: Option<&Table>, problems: &mut Vec<Problem>) -> DnsConfig {
    let mut s = Section::new("dns", t, problems);
    let mut nameservers = Vec::new();
    match s.raw("nameservers") {
        None => {}
        Some(Value::Array(items)) => {
            for item in items {
                let parsed = item.as_str().and_then(|v| {
                    v.parse::<SocketAddr>()
                        .ok()
                        .or_else(|| v.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)))
                });
                match parsed {
                    Some(addr) => nameservers.push(addr),
                    None => s.problem(
                        "nameservers",
                        format!("{item} is not an IP address or IP:port"),
                    ),
                }
            }
        }
        Some(_) => s.problem("nameservers", "must be an array of \"IP\" or \"IP:port\""),
    }
    s.finish();
    DnsConfig { nameservers }
}

#[cfg(test)]
mod tests;
