//! An in-test OTLP/HTTP trace receiver: accepts `POST /v1/traces`, decodes the real protobuf
//! (`opentelemetry-proto`), and keeps every span. It can also refuse to answer (a black hole)
//! or answer slowly, to test what a broken collector does to a node.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use parking_lot::Mutex;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// How the collector behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CollectorMode {
    /// Decode and answer 200.
    Receive,
    /// Accept connections, read, never answer.
    BlackHole,
    /// Answer 200 after this delay.
    Slow(Duration),
}

/// One received span, flattened with its resource's `service.instance.id`.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// `service.name` of its resource.
    pub service: String,
    /// `service.instance.id` of its resource (the node name).
    pub instance: String,
    /// Trace id, hex.
    pub trace_id: String,
    /// Span id, hex.
    pub span_id: String,
    /// Parent span id, hex (empty for a root).
    pub parent_span_id: String,
    /// Span name.
    pub name: String,
    /// OTLP kind: 2 server, 3 client.
    pub kind: i32,
    /// String forms of every attribute.
    pub attributes: Vec<(String, String)>,
    /// Event names.
    pub events: Vec<String>,
    /// Links as (trace id, span id), hex.
    pub links: Vec<(String, String)>,
    /// OTLP status code: 0 unset, 1 ok, 2 error.
    pub status: i32,
}

impl ReceivedSpan {
    /// An attribute's value as a string.
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// A running receiver; stops when dropped.
pub struct TestCollector {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    requests: Arc<Mutex<usize>>,
    tasks: Arc<Mutex<JoinSet<()>>>,
}

fn value_string(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attrs(kvs: &[KeyValue]) -> Vec<(String, String)> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), value_string(&kv.value)))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl TestCollector {
    /// Starts a collector on an ephemeral loopback port.
    pub async fn start(mode: CollectorMode) -> anyhow::Result<TestCollector> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let spans: Arc<Mutex<Vec<ReceivedSpan>>> = Arc::default();
        let requests: Arc<Mutex<usize>> = Arc::default();
        let tasks: Arc<Mutex<JoinSet<()>>> = Arc::default();
        let (s, r, t) = (spans.clone(), requests.clone(), tasks.clone());
        tasks.lock().spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (s, r) = (s.clone(), r.clone());
                t.lock().spawn(serve(stream, mode, s, r));
            }
        });
        Ok(TestCollector {
            addr,
            spans,
            requests,
            tasks,
        })
    }

    /// `http://IP:port`, the value for `[tracing] otlp_endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.spans.lock().clone()
    }

    /// Export requests received so far (answered or not).
    pub fn requests(&self) -> usize {
        *self.requests.lock()
    }
}

impl Drop for TestCollector {
    fn drop(&mut self) {
        self.tasks.lock().abort_all();
    }
}

async fn serve(
    mut stream: TcpStream,
    mode: CollectorMode,
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    requests: Arc<Mutex<usize>>,
) {
    let mut buf = Vec::new();
    while let Some((_, body)) = crate::wire::read_request(&mut stream, &mut buf).await {
        *requests.lock() += 1;
        match mode {
            CollectorMode::BlackHole => {
                // Hold the connection open and never answer.
                let mut sink = [0u8; 1024];
                while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
                return;
            }
            CollectorMode::Slow(d) => tokio::time::sleep(d).await,
            CollectorMode::Receive => {}
        }
        if let Ok(export) = ExportTraceServiceRequest::decode(body.as_slice()) {
            let mut out = spans.lock();
            for rs in export.resource_spans {
                let resource = rs
                    .resource
                    .map(|r| attrs(&r.attributes))
                    .unwrap_or_default();
                let find = |k: &str| {
                    resource
                        .iter()
                        .find(|(key, _)| key == k)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default()
                };
                let (service, instance) = (find("service.name"), find("service.instance.id"));
                for ss in rs.scope_spans {
                    for span in ss.spans {
                        out.push(ReceivedSpan {
                            service: service.clone(),
                            instance: instance.clone(),
                            trace_id: hex(&span.trace_id),
                            span_id: hex(&span.span_id),
                            parent_span_id: hex(&span.parent_span_id),
                            name: span.name.clone(),
                            kind: span.kind,
                            attributes: attrs(&span.attributes),
                            events: span.events.iter().map(|e| e.name.clone()).collect(),
                            links: span
                                .links
                                .iter()
                                .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                                .collect(),
                            status: span.status.map_or(0, |s| s.code),
                        });
                    }
                }
            }
        }
        let answer =
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n";
        if stream.write_all(answer).await.is_err() {
            return;
        }
    }
}
