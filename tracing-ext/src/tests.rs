//! The span model and export behaviour, checked with the SDK's in-memory exporter.

use std::time::Duration;

use opentelemetry::trace::{SpanKind, Status};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SpanData, SpanExporter};

use crate::{AttemptFacts, ExportSettings, RequestFacts, ResponseFacts, Telemetry, UpstreamKind};

const CLIENT_TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

fn settings(ratio: f64) -> ExportSettings {
    let mut s = ExportSettings::new("http://127.0.0.1:1", ratio, "edge-1");
    s.scheduled_delay = Duration::from_millis(10);
    s
}

fn request() -> RequestFacts<'static> {
    RequestFacts {
        node: "edge-1",
        tier: "lower",
        method: "GET",
        path: "/a",
        query: Some("b=1"),
        host: Some("example.test"),
        request_id: Some("r1"),
    }
}

fn attempt(kind: UpstreamKind, n: u32) -> AttemptFacts<'static> {
    AttemptFacts {
        kind,
        attempt: n,
        method: "GET",
        server_address: "127.0.0.1",
        server_port: 8180,
        url_full: "http://example.test/a?b=1",
    }
}

fn response(status: u16) -> ResponseFacts<'static> {
    ResponseFacts {
        status,
        cache_status: "edge-1; fwd=uri-miss; stored",
        lock_wait: Some(Duration::from_millis(3)),
        error: None,
    }
}

fn headers(traceparent: Option<&str>) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    if let Some(tp) = traceparent {
        h.insert("traceparent", tp.parse().expect("ascii"));
    }
    h
}

fn attr<'a>(span: &'a SpanData, key: &str) -> Option<&'a opentelemetry::Value> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

#[test]
fn one_server_span_and_one_client_span_per_attempt() {
    let mem = InMemorySpanExporter::default();
    let t = Telemetry::with_exporter(mem.clone(), &settings(1.0));
    let incoming = headers(Some(CLIENT_TRACEPARENT));
    let before = incoming.clone();
    let req = t.start_request(&incoming, &request());
    let first = req.start_attempt(&t, &attempt(UpstreamKind::Upper, 1));
    first.failed("connect_error");
    req.failover("127.0.0.1:8180", "connect_error");
    let second = req.start_attempt(&t, &attempt(UpstreamKind::Upper, 2));
    let sent = second.headers();
    second.answered(200);
    req.finish(&response(200));
    t.flush();
    assert_eq!(
        incoming, before,
        "observing a request never changes its headers"
    );

    let spans = mem.get_finished_spans().expect("spans");
    assert_eq!(spans.len(), 3);
    let server = spans
        .iter()
        .find(|s| s.span_kind == SpanKind::Server)
        .expect("server span");
    let clients: Vec<_> = spans
        .iter()
        .filter(|s| s.span_kind == SpanKind::Client)
        .collect();
    assert_eq!(clients.len(), 2);
    assert_eq!(server.name, "GET");
    assert_eq!(
        server.span_context.trace_id().to_string(),
        "0af7651916cd43dd8448eb211c80319c"
    );
    assert_eq!(server.parent_span_id.to_string(), "b7ad6b7169203331");
    assert!(server.parent_span_is_remote);
    for c in &clients {
        assert_eq!(c.parent_span_id, server.span_context.span_id());
        assert_eq!(c.span_context.trace_id(), server.span_context.trace_id());
        assert_eq!(
            attr(c, "stratus.upstream.kind").map(|v| v.as_str().into_owned()),
            Some("upper".into())
        );
    }
    assert!(matches!(clients[0].status, Status::Error { .. }));
    assert_eq!(
        attr(server, "stratus.cache_status").map(|v| v.as_str().into_owned()),
        Some("edge-1; fwd=uri-miss; stored".into())
    );
    assert_eq!(
        attr(server, "http.response.status_code"),
        Some(&opentelemetry::Value::I64(200))
    );
    assert_eq!(
        attr(server, "stratus.node").map(|v| v.as_str().into_owned()),
        Some("edge-1".into())
    );
    assert_eq!(server.events.len(), 2, "failover and lock-wait events");
    // The next hop's parent is the second CLIENT span.
    let second_span = clients
        .iter()
        .find(|c| attr(c, "stratus.upstream.attempt") == Some(&opentelemetry::Value::I64(2)))
        .expect("second");
    let tp = sent
        .iter()
        .find(|(k, _)| k == "traceparent")
        .map(|(_, v)| v.clone())
        .expect("traceparent sent");
    assert_eq!(
        tp,
        format!(
            "00-{}-{}-01",
            second_span.span_context.trace_id(),
            second_span.span_context.span_id()
        )
    );
}

#[test]
fn tracing_off_records_nothing_and_adds_no_header() {
    let t = Telemetry::disabled();
    let req = t.start_request(&headers(Some(CLIENT_TRACEPARENT)), &request());
    let a = req.start_attempt(&t, &attempt(UpstreamKind::Origin, 1));
    assert!(a.headers().is_empty());
    a.answered(200);
    req.finish(&response(200));
    assert_eq!(req.trace_id(), None);
}

#[test]
fn unsampled_traces_export_nothing_but_still_propagate() {
    let mem = InMemorySpanExporter::default();
    let t = Telemetry::with_exporter(mem.clone(), &settings(0.0));
    let req = t.start_request(&headers(None), &request());
    let a = req.start_attempt(&t, &attempt(UpstreamKind::Origin, 1));
    let sent = a.headers();
    a.answered(200);
    req.finish(&response(200));
    t.flush();
    assert!(mem.get_finished_spans().expect("spans").is_empty());
    let tp = sent
        .iter()
        .find(|(k, _)| k == "traceparent")
        .map(|(_, v)| v.clone())
        .expect("traceparent");
    assert!(tp.ends_with("-00"), "unsampled flag propagates: {tp}");
}

#[test]
fn invalid_traceparent_starts_a_new_trace() {
    let mem = InMemorySpanExporter::default();
    let t = Telemetry::with_exporter(mem.clone(), &settings(1.0));
    for bad in [
        "garbage",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    ] {
        let req = t.start_request(&headers(Some(bad)), &request());
        req.finish(&response(200));
    }
    t.flush();
    let spans = mem.get_finished_spans().expect("spans");
    assert_eq!(spans.len(), 3);
    assert!(spans.iter().all(|s| !s.parent_span_is_remote));
}

/// An exporter that never finishes: the collector is a black hole.
#[derive(Debug)]
struct Blocking;

impl SpanExporter for Blocking {
    async fn export(&self, _batch: Vec<SpanData>) -> OTelSdkResult {
        std::thread::sleep(Duration::from_secs(3600));
        Ok(())
    }
}

#[test]
fn a_blocked_exporter_drops_and_counts_instead_of_growing() {
    let mut s = settings(1.0);
    s.queue_size = 64;
    s.batch_size = 16;
    let t = Telemetry::with_exporter(Blocking, &s);
    for _ in 0..1000 {
        let req = t.start_request(&headers(None), &request());
        req.finish(&response(200));
    }
    assert!(
        t.spans_in_flight() <= 64,
        "in flight {}",
        t.spans_in_flight()
    );
    assert!(
        t.dropped_spans() >= 1000 - 64,
        "dropped {}",
        t.dropped_spans()
    );
    t.shutdown(Duration::from_millis(100));
}
