//! Fuzz entry points: the parsers and decisions that take bytes from outside — the control
//! context, the config file, request admission and cache-key derivation — each driven with
//! arbitrary input and checked for the property that must hold on any input.
//!
//! One function per target, shared by the cargo-fuzz targets in `fuzz/` (nightly, coverage
//! guided) and by `node/tests/fuzz_corpus.rs`, which replays the committed corpus on stable
//! in every CI run. A property that fails panics, which is what both harnesses report.

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pingora_http::RequestHeader;
use stratus_tiering::{
    Acceptor, ControlContext, FleetSecret, Keyring, RequestIdentity, RequestLine,
};

use crate::config::Config;
use crate::proxy::{admit, Arrival};
use crate::tier::Tier;

const SECRET: &[u8] = b"stratus-fuzz-secret-0123456789abcdef";

fn keyring() -> &'static Keyring {
    static KEYS: OnceLock<Keyring> = OnceLock::new();
    KEYS.get_or_init(|| Keyring::from(FleetSecret::new(SECRET.to_vec())))
}

/// Splits fuzz input into up to `N` byte strings at `0xff` bytes (absent parts are empty).
fn parts<const N: usize>(data: &[u8]) -> [&[u8]; N] {
    let mut out = [&[][..]; N];
    for (slot, part) in out.iter_mut().zip(data.splitn(N, |b| *b == 0xff)) {
        *slot = part;
    }
    out
}

/// The control-context parser: arbitrary `stratus-ctx` values (with an arbitrary request line
/// and clock) are refused — without the secret no input verifies — and never panic; a context
/// this node signs itself round-trips for the same line and is refused for any other.
pub fn control_context(data: &[u8]) {
    let [value, method, target, clock] = parts::<4>(data);
    let value = String::from_utf8_lossy(value);
    let method = String::from_utf8_lossy(method);
    let target = String::from_utf8_lossy(target);
    let line = RequestLine {
        method: &method,
        target: &target,
    };
    let now_ms = clock
        .iter()
        .take(8)
        .fold(0u64, |n, b| (n << 8) | u64::from(*b))
        % 4_000_000_000_000;
    let now = UNIX_EPOCH + Duration::from_millis(now_ms);
    let identities = ["up-1".to_string()];
    let acceptor = Acceptor {
        keys: keyring(),
        identities: &identities,
        not_before: UNIX_EPOCH,
    };
    assert!(
        ControlContext::decode(&value, &acceptor, line, now).is_err(),
        "an unsigned input verified: {value:?}"
    );
    assert!(ControlContext::verify(&value, keyring(), line).is_err());
    // Fields from the input, signed for real: accepted for its line only.
    let host = String::from_utf8_lossy(&value.as_bytes()[..value.len().min(60)]).into_owned();
    if host.is_empty() {
        return;
    }
    let ctx = RequestIdentity::new(host.clone(), "k", "r", "edge-1").issue("up-1", 7, now);
    let signed = ctx.encode(keyring().signing(), line);
    match ControlContext::decode(&signed, &acceptor, line, now) {
        Ok(back) => assert_eq!(back.origin_host(), host),
        // Oversized after encoding (long fields) is the only refusal of a genuine context.
        Err(e) => assert_eq!(e, stratus_tiering::ContextError::TooLarge, "{signed}"),
    }
    let other = RequestLine {
        method: &method,
        target: if target == "/" { "/x" } else { "/" },
    };
    assert!(ControlContext::decode(&signed, &acceptor, other, now).is_err());
}

/// The config parser: any text parses or yields problems, never a panic; a config that
/// parses has a problem-free reload to itself.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(c) = Config::parse(&text, Path::new("/nonexistent-fuzz-dir")) {
        assert!(c.reload_refusals(&c).is_empty());
    }
}

fn nodes() -> &'static (Config, Config, Arc<Tier>) {
    static NODES: OnceLock<(Config, Config, Arc<Tier>)> = OnceLock::new();
    NODES.get_or_init(|| {
        let origin = "[[origin]]\nhost = \"example.test\"\naddress = \"127.0.0.1:9\"\n";
        let lower = format!(
            "[node]\nname = \"edge-1\"\nrole = \"lower\"\nlisten = \"127.0.0.1:1\"\n{origin}"
        );
        let upper = format!(
            "[node]\nname = \"up-1\"\nrole = \"upper\"\nlisten = \"127.0.0.1:3\"\nadmin_listen = \"127.0.0.1:4\"\n[tier]\nsecret = \"{}\"\n{origin}",
            String::from_utf8_lossy(SECRET)
        );
        let parse = |t: &str| Config::parse(t, Path::new(".")).unwrap_or_else(|p| panic!("{p:?}"));
        let (lower, upper) = (parse(&lower), parse(&upper));
        let metrics = Arc::new(crate::metrics::Metrics::new("up-1").unwrap_or_else(|e| panic!("{e}")));
        let tier = Tier::from_config(&upper, metrics)
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("an upper has a tier"));
        (lower, upper, tier)
    })
}

/// Request admission: any request line and headers are admitted or refused with a documented
/// status, never a panic, on a lower and on an upper (which admits nothing without a genuine
/// context); an admitted request's key depends on Host and target only, not on other headers.
pub fn admission(data: &[u8]) {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    if !matches!(req.parse(data), Ok(httparse::Status::Complete(_))) {
        return;
    }
    let (Some(method), Some(path)) = (req.method, req.path) else {
        return;
    };
    let Ok(mut header) = RequestHeader::build(method, path.as_bytes(), None) else {
        return;
    };
    for h in req.headers.iter() {
        let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(h.name.as_bytes()),
            http::HeaderValue::from_bytes(h.value),
        ) else {
            return;
        };
        let _ = header.append_header(name, value);
    }
    let (lower, upper, tier) = nodes();
    let now = SystemTime::now();
    let admitted = admit(lower, None, &header, now, Arrival::Network, None);
    let upper_admitted = admit(upper, Some(tier), &header, now, Arrival::Network, None);
    assert!(
        upper_admitted.is_err(),
        "an upper admitted a request without a genuine context"
    );
    if let Ok(r) = admitted {
        let mut more = header.clone();
        let _ = more.append_header("x-forwarded-host", "evil.test");
        let _ = more.append_header("x-original-url", "/evil");
        let again = admit(lower, None, &more, now, Arrival::Network, None);
        match again {
            Ok(r2) => assert_eq!(r.primary_key, r2.primary_key),
            // Only the size limit may now refuse it.
            Err(g) => assert_eq!(g, crate::errors::Generated::HeadersTooLarge),
        }
    }
}

/// Cache-key derivation: one key per (host, target), and different pairs never share a key (a
/// key cannot mean two things), whatever bytes the two contain.
pub fn cache_key(data: &[u8]) {
    let [h1, p1, h2, p2] = parts::<4>(data);
    let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let (h1, p1, h2, p2) = (s(h1), s(p1), s(h2), s(p2));
    let k1 = crate::policy::primary_key(&h1, &p1);
    assert_eq!(k1, crate::policy::primary_key(&h1, &p1));
    let k2 = crate::policy::primary_key(&h2, &p2);
    if (h1.as_str(), p1.as_str()) != (h2.as_str(), p2.as_str()) {
        assert_ne!(k1, k2, "{h1:?} {p1:?} and {h2:?} {p2:?} share a key");
    }
    // Moving bytes between host and target changes the key too.
    if let Some(first) = p1.chars().next() {
        let moved = format!("{h1}{first}");
        let rest = &p1[first.len_utf8()..];
        assert_ne!(k1, crate::policy::primary_key(&moved, rest));
    }
}
