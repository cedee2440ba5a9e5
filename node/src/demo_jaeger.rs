//! `stratus demo`'s trace viewer: Jaeger's web UI and an in-memory OTLP/HTTP collector, both
//! in this process, so the demo shows traces without a Jaeger server.
//!
//! Built on `otlp-embedded` 0.0.2: its `State` keeps the most recent traces (bounded in count
//! and estimated bytes, least recently used first out), its `ui_app` serves Jaeger UI 2.14.1
//! (embedded with `rust-embed` in release builds) plus the `/api/*` queries that UI makes, and
//! its `TraceServiceImpl` is the only public way in. That way in is gRPC-shaped, but nothing
//! here runs gRPC: stratus nodes export OTLP/HTTP protobuf to `{endpoint}/v1/traces`, so
//! [`otlp_router`] decodes those bodies and hands them to `TraceService::export` directly.
//!
//! The UI lists a trace once its root span (no parent) and every parent it names have arrived;
//! a trace whose root has a remote parent (a client sent `traceparent`) is only reachable by id.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{middleware, Router};
use otlp_embedded::proto::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use otlp_embedded::{Config, StateRef, TraceService as _, TraceServiceImpl};
use prost::Message as _;
use tokio::net::TcpListener;

/// Traces the demo keeps; the least recently updated or viewed go first.
pub const MAX_TRACES: u32 = 1_000;
/// Estimated bytes of span data the demo keeps (the real footprint is somewhat higher).
pub const MAX_TRACE_BYTES: usize = 64 * 1024 * 1024;
/// Largest export body accepted; the nodes send at most 1024 spans a request, far less.
const MAX_EXPORT_BODY: usize = 16 * 1024 * 1024;
/// The only body encoding the receiver takes (OTLP/HTTP binary).
const PROTOBUF: &str = "application/x-protobuf";

/// An empty trace store with the demo's bounds, shared by the UI and the receiver.
pub fn new_store() -> StateRef {
    otlp_embedded::State::new(Config {
        max_length: MAX_TRACES,
        max_memory_usage: MAX_TRACE_BYTES,
    })
}

/// Jaeger's UI and its query API (`/api/services`, `/api/services/{service}/operations`,
/// `/api/traces`, `/api/traces/{id}`) over `store`, to be served at the root of its own port.
///
/// `otlp-embedded` answers the UI's own routes (`/`, `/search`, `/trace/…`) with index.html
/// but status 307 and no `Location`; browsers render that, probes and curl see a redirect. So
/// every path that is not `/api/…` or `/static/…` is rewritten to `/index.html` first, which
/// it answers with 200. The single-page app still routes on the address bar's path.
pub fn ui_router(store: StateRef) -> Router {
    otlp_embedded::ui_app(store, "/").layer(middleware::map_request(spa_entry))
}

/// Rewrites the UI's client-side routes to `/index.html` (see [`ui_router`]).
async fn spa_entry(mut req: Request) -> Request {
    let path = req.uri().path();
    if !path.starts_with("/api/") && !path.starts_with("/static/") && path != "/index.html" {
        *req.uri_mut() = Uri::from_static("/index.html");
    }
    req
}

/// An OTLP/HTTP trace receiver: `POST /v1/traces` with an `application/x-protobuf`
/// `ExportTraceServiceRequest` body, stored into `store`. Answers 200 with an
/// `ExportTraceServiceResponse` (empty unless spans were rejected), 400 on a body that is not
/// that message, 413 over 16 MiB, 415 on another content type or a compressed body.
pub fn otlp_router(store: StateRef) -> Router {
    Router::new()
        .route("/v1/traces", post(receive_traces))
        .layer(DefaultBodyLimit::max(MAX_EXPORT_BODY))
        .with_state(Arc::new(TraceServiceImpl::new(store)))
}

/// Serves the UI on `ui` and the OTLP/HTTP receiver on `otlp`, over one fresh store, until an
/// accept loop fails (axum retries transient accept errors itself) or the task is dropped.
pub async fn serve(ui: TcpListener, otlp: TcpListener) -> std::io::Result<()> {
    let store = new_store();
    let ui = axum::serve(ui, ui_router(store.clone()));
    let otlp = axum::serve(otlp, otlp_router(store));
    tokio::try_join!(async { ui.await }, async { otlp.await })?;
    Ok(())
}

async fn receive_traces(
    State(collector): State<Arc<TraceServiceImpl>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !is_protobuf(&headers) {
        return text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("only {PROTOBUF} is accepted"),
        );
    }
    if headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|e| !e.as_bytes().eq_ignore_ascii_case(b"identity"))
    {
        return text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "compressed bodies are not accepted".to_string(),
        );
    }
    let mut request = match ExportTraceServiceRequest::decode(body) {
        Ok(r) => r,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("not an OTLP ExportTraceServiceRequest: {e}"),
            )
        }
    };
    let rejected = drop_unusable_spans(&mut request);
    match collector.export(tonic::Request::new(request)).await {
        Ok(answer) => {
            let mut answer: ExportTraceServiceResponse = answer.into_inner();
            if rejected > 0 {
                answer.partial_success = Some(ExportTracePartialSuccess {
                    rejected_spans: rejected,
                    error_message: "spans with a missing, zero or self-referencing id".to_string(),
                });
            }
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, PROTOBUF)],
                answer.encode_to_vec(),
            )
                .into_response()
        }
        // `TraceServiceImpl::export` never fails today; keep the contract anyway.
        Err(status) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            status.message().to_string(),
        ),
    }
}

/// True when the body is declared as OTLP protobuf, or not declared at all.
fn is_protobuf(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_none_or(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case(PROTOBUF))
        })
    })
}

/// Removes the spans `otlp-embedded` would mishandle and returns how many: an empty span id
/// leaves an empty trace the UI's search then panics on (`Trace::id`, `service_name().unwrap()`),
/// a span that is its own parent makes a trace "complete" with no root (same panic), and an
/// end before the start underflows the duration. Also clamps such ends to the start.
fn drop_unusable_spans(request: &mut ExportTraceServiceRequest) -> i64 {
    let mut rejected = 0;
    for scope in request
        .resource_spans
        .iter_mut()
        .flat_map(|r| r.scope_spans.iter_mut())
    {
        scope.spans.retain_mut(|span| {
            let usable = is_id(&span.trace_id, 16)
                && is_id(&span.span_id, 8)
                && (span.parent_span_id.is_empty()
                    || (is_id(&span.parent_span_id, 8) && span.parent_span_id != span.span_id));
            if usable {
                span.end_time_unix_nano = span.end_time_unix_nano.max(span.start_time_unix_nano);
            } else {
                rejected += 1;
            }
            usable
        });
    }
    rejected
}

/// A W3C trace (16 bytes) or span (8 bytes) id: the right length and not all zero.
fn is_id(id: &[u8], len: usize) -> bool {
    id.len() == len && id.iter().any(|&b| b != 0)
}

fn text(status: StatusCode, message: String) -> Response {
    (status, message).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use otlp_embedded::proto::common::v1::{any_value, AnyValue, KeyValue};
    use otlp_embedded::proto::resource::v1::Resource;
    use otlp_embedded::proto::trace::v1::{ResourceSpans, ScopeSpans, Span};
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    fn string_kv(key: &str, value: &str) -> KeyValue {
        KeyValue {
            key: key.to_string(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(value.to_string())),
            }),
        }
    }

    fn span(span_id: u8, parent: Option<u8>, name: &str) -> Span {
        Span {
            trace_id: vec![0x11; 16],
            span_id: vec![span_id; 8],
            parent_span_id: parent.map(|p| vec![p; 8]).unwrap_or_default(),
            name: name.to_string(),
            start_time_unix_nano: 1_700_000_000_000_000_000,
            end_time_unix_nano: 1_700_000_000_001_000_000,
            ..Default::default()
        }
    }

    /// An export from node `edge-1` (service `stratus`) carrying `spans`.
    fn export_of(spans: Vec<Span>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![
                        string_kv("service.name", "stratus"),
                        string_kv("service.instance.id", "edge-1"),
                    ],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    /// One HTTP/1.1 exchange on a fresh connection; the whole answer, head and body.
    async fn exchange(addr: SocketAddr, head: String, body: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(head.as_bytes()).await.expect("write head");
        s.write_all(body).await.expect("write body");
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await.expect("read answer");
        String::from_utf8_lossy(&answer).into_owned()
    }

    async fn post(addr: SocketAddr, content_type: &str, body: &[u8]) -> String {
        let head = format!(
            "POST /v1/traces HTTP/1.1\r\nHost: t\r\nContent-Type: {content_type}\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        exchange(addr, head, body).await
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let head = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        exchange(addr, head, b"").await
    }

    #[tokio::test]
    async fn exported_spans_show_up_in_the_ui_api() {
        let ui = TcpListener::bind("127.0.0.1:0").await.expect("bind ui");
        let otlp = TcpListener::bind("127.0.0.1:0").await.expect("bind otlp");
        let (ui_addr, otlp_addr) = (
            ui.local_addr().expect("ui addr"),
            otlp.local_addr().expect("otlp addr"),
        );
        let server = tokio::spawn(serve(ui, otlp));

        let body = export_of(vec![
            span(0x22, None, "GET /hello"),
            span(0x33, Some(0x22), "lookup"),
        ])
        .encode_to_vec();
        assert!(post(otlp_addr, PROTOBUF, &body)
            .await
            .starts_with("HTTP/1.1 200"));
        assert!(post(otlp_addr, PROTOBUF, &[0xff, 0xff, 0xff])
            .await
            .starts_with("HTTP/1.1 400"));
        assert!(post(otlp_addr, "application/json", b"{}")
            .await
            .starts_with("HTTP/1.1 415"));

        let services = get(ui_addr, "/api/services").await;
        assert!(
            services.starts_with("HTTP/1.1 200") && services.contains("\"stratus\""),
            "{services}"
        );
        let traces = get(ui_addr, "/api/traces?service=stratus&limit=20").await;
        assert!(traces.contains(&"11".repeat(16)), "{traces}");
        for page in ["/", "/search"] {
            let html = get(ui_addr, page).await;
            assert!(
                html.starts_with("HTTP/1.1 200") && html.contains("<title>Jaeger UI</title>"),
                "{page}: {html}"
            );
        }
        server.abort();
    }

    #[test]
    fn unusable_spans_are_dropped_and_counted() {
        let mut no_id = span(0x22, None, "no id");
        no_id.span_id.clear();
        let own_parent = span(0x44, Some(0x44), "own parent");
        let mut backwards = span(0x55, None, "ends before it starts");
        backwards.end_time_unix_nano = 0;
        let mut request = export_of(vec![no_id, own_parent, backwards]);
        assert_eq!(drop_unusable_spans(&mut request), 2);
        let kept = &request.resource_spans[0].scope_spans[0].spans;
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].end_time_unix_nano, kept[0].start_time_unix_nano);
    }
}
