//! Criterion benchmarks of the per-request control plane: the ring lookup and the route with
//! failed members (a lower's miss), the control context encode and verify (every tiered
//! miss, both sides), `traceparent` extract/inject (every traced request), and the
//! `Cache-Status` entry (every response).

// criterion's macros generate public fns that cannot carry docs.
#![allow(missing_docs)]

use std::net::SocketAddr;
use std::time::{Instant, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion};
use pingora_cache::CachePhase;
use stratus_node::cache_status::{entry, CacheOutcome};
use stratus_tiering::{
    route, Acceptor, ControlContext, FleetSecret, HealthBook, Keyring, Member, Outcome,
    RequestIdentity, RequestLine, Ring,
};

fn members(n: u16) -> Vec<Member> {
    (0..n)
        .map(|i| Member {
            addr: SocketAddr::from(([10, 0, 0, 1], 8000 + i)),
            weight: 1 + u32::from(i % 3),
        })
        .collect()
}

fn ring_and_route(c: &mut Criterion) {
    let ring = Ring::new(members(8)).expect("ring");
    let keys: Vec<String> = (0..1024)
        .map(|i| format!("12:example.test/object/{i}"))
        .collect();
    let mut i = 0;
    c.bench_function("ring owner (8 members)", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            ring.owner(keys[i].as_bytes())
        })
    });
    // Two of eight members down: the route skips them.
    let mut book = HealthBook::new(Ring::new(members(8)).expect("ring"), 1, 2);
    let now = Instant::now();
    for id in [1, 5] {
        book.observe(id, Outcome::ConnectFailed, now, now);
    }
    let view = book.view();
    c.bench_function("route, 2 of 8 members down, 3 hops", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            route(keys[i].as_bytes(), &view, 3)
        })
    });
}

fn control_context(c: &mut Criterion) {
    let secret = FleetSecret::new(b"stratus-bench-secret-0123456789abcdef".to_vec());
    let keys = Keyring::from(secret.clone());
    let identity = RequestIdentity::new(
        "example.test",
        "4f6c0e3d2a1b00998877665544332211",
        "0123456789abcdef0123456789abcdef",
        "edge-1",
    );
    let line = RequestLine {
        method: "GET",
        target: "/object/42?v=1",
    };
    c.bench_function("context issue + encode", |b| {
        b.iter(|| {
            identity
                .issue("up-1", 7, SystemTime::now())
                .encode(&secret, line)
        })
    });
    let value = identity
        .issue("up-1", 7, SystemTime::now())
        .encode(&secret, line);
    let ids = vec!["up-1".to_string()];
    let acceptor = Acceptor {
        keys: &keys,
        identities: &ids,
        not_before: SystemTime::UNIX_EPOCH,
    };
    c.bench_function("context decode + verify", |b| {
        b.iter(|| ControlContext::decode(&value, &acceptor, line, SystemTime::now()))
    });
}

fn tracing_headers(c: &mut Criterion) {
    let mut headers = http::HeaderMap::new();
    headers.insert(
        "traceparent",
        http::HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    );
    headers.insert("tracestate", http::HeaderValue::from_static("vendor=abc"));
    c.bench_function("traceparent extract", |b| {
        b.iter(|| stratus_tracing::propagation::extract(&headers))
    });
    let cx = stratus_tracing::propagation::extract(&headers);
    c.bench_function("traceparent inject", |b| {
        b.iter(|| stratus_tracing::propagation::inject(&cx))
    });
}

fn cache_status(c: &mut Criterion) {
    let hit = CacheOutcome {
        phase: CachePhase::Hit,
        method_cacheable: true,
        collapsed: false,
        ttl: Some(297),
        fwd_status: None,
        vary_miss: false,
        key: Some("12:example.test/object/42"),
    };
    c.bench_function("Cache-Status entry (hit)", |b| {
        b.iter(|| entry("edge-1", &hit))
    });
}

criterion_group!(
    benches,
    ring_and_route,
    control_context,
    tracing_headers,
    cache_status
);
criterion_main!(benches);
