//! Tracing changes nothing, by differential property test on the real pipeline: the same
//! generated request sequences go to five identical fleets (1 lower + 1 upper + scripted
//! origin) that differ only in tracing — off; on and sampled; on and unsampled; exporting to a
//! refused port; exporting to a collector that never answers. Everything observable must be
//! identical to the tracing-off fleet: the response (status, headers, body), and the requests
//! the origin received (method, target, headers) — apart from `traceparent`/`tracestate`.
//! Route and control context are computed by functions that never receive telemetry
//! (`tiering::route`, `proxy::admit`); their effects show in `Cache-Status` (which upper served)
//! and in what reached the origin.

use std::path::Path;
use std::sync::LazyLock;

use proptest::prelude::*;
use stratus_chaos::{
    client, CollectorMode, Fleet, FleetSpec, OriginEntry, Reply, SeenRequest, TestCollector,
    TestOrigin,
};

const HOST: &str = "example.test";
const KINDS: [&str; 8] = [
    "cache", "nostore", "private", "vary", "cookie", "notfound", "error", "etag",
];

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_stratus"))
}

struct Variant {
    name: &'static str,
    origin: TestOrigin,
    fleet: Fleet,
    _collector: Option<TestCollector>,
}

struct World {
    variants: Vec<Variant>,
}

static RT: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime")
});

/// The origin: what it answers is a function of the path and of how often it was asked.
fn script(origin: &TestOrigin) {
    origin.fallback(|req, nth| {
        let mut parts = req.path.trim_start_matches('/').split('/');
        let kind = parts.nth(1).unwrap_or("");
        let body = format!("{kind} {} #{nth} {}", req.path, req.method);
        match kind {
            "cache" => Reply::ok(body).header("cache-control", "max-age=600"),
            "nostore" => Reply::ok(body).header("cache-control", "no-store"),
            "private" => Reply::ok(body).header("cache-control", "private, max-age=60"),
            "vary" => {
                let enc = req.header("accept-encoding").unwrap_or("none").to_string();
                Reply::ok(format!("{body} {enc}"))
                    .header("cache-control", "max-age=600")
                    .header("vary", "Accept-Encoding")
            }
            "cookie" => Reply::ok(body)
                .header("cache-control", "max-age=600")
                .header("set-cookie", "s=1"),
            "notfound" => Reply::ok(body)
                .status(404)
                .header("cache-control", "max-age=60"),
            "error" => Reply::ok(body).status(500),
            "etag" => {
                if req.header("if-none-match") == Some("\"v1\"") {
                    Reply::ok("")
                        .status(304)
                        .header("etag", "\"v1\"")
                        .header("cache-control", "max-age=600")
                } else {
                    Reply::ok(body)
                        .header("etag", "\"v1\"")
                        .header("cache-control", "max-age=600")
                }
            }
            _ => Reply::ok(body).status(404),
        }
    });
}

fn tracing_table(endpoint: &str, ratio: f64) -> String {
    format!("\n[tracing]\notlp_endpoint = \"{endpoint}\"\nsample_ratio = {ratio:.1}\nqueue_size = 64\nexport_timeout = \"300ms\"\n")
}

static WORLD: LazyLock<World> = LazyLock::new(|| {
    RT.block_on(async {
        let mut variants = Vec::new();
        for name in ["off", "sampled", "unsampled", "refused", "blackhole"] {
            let origin = TestOrigin::start().await.expect("origin");
            script(&origin);
            let (collector, extra) = match name {
                "off" => (None, String::new()),
                "sampled" | "unsampled" => {
                    let c = TestCollector::start(CollectorMode::Receive)
                        .await
                        .expect("collector");
                    let t = tracing_table(&c.endpoint(), if name == "sampled" { 1.0 } else { 0.0 });
                    (Some(c), t)
                }
                "refused" => (
                    None,
                    tracing_table(
                        &format!("http://{}", stratus_chaos::free_port().expect("port")),
                        1.0,
                    ),
                ),
                _ => {
                    let c = TestCollector::start(CollectorMode::BlackHole)
                        .await
                        .expect("collector");
                    let t = tracing_table(&c.endpoint(), 1.0);
                    (Some(c), t)
                }
            };
            let spec = FleetSpec {
                lowers: 1,
                uppers: 1,
                origins: vec![OriginEntry::new(HOST, origin.addr())],
                lower_tier_extra: String::new(),
                common_extra: extra,
            };
            let fleet = Fleet::start(bin(), &spec).await.expect("fleet");
            variants.push(Variant {
                name,
                origin,
                fleet,
                _collector: collector,
            });
        }
        World { variants }
    })
});

#[derive(Debug, Clone)]
struct Req {
    method: &'static str,
    path: String,
    headers: Vec<(String, String)>,
}

fn traceparent() -> impl Strategy<Value = Vec<(String, String)>> {
    prop_oneof![
        Just(vec![]),
        "[0-9a-f]{32}"
            .prop_map(|t| vec![("traceparent".into(), format!("00-{t}-00f067aa0ba902b7-01"))]),
        "[0-9a-f]{32}"
            .prop_map(|t| vec![("traceparent".into(), format!("00-{t}-00f067aa0ba902b7-00"))]),
        "[ -~]{0,60}".prop_map(|junk| vec![("traceparent".into(), junk)]),
        Just(vec![
            (
                "traceparent".into(),
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()
            ),
            (
                "traceparent".into(),
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()
            ),
        ]),
        Just(vec![
            (
                "traceparent".into(),
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()
            ),
            ("tracestate".into(), "vendor=abc,other=1".into()),
        ]),
    ]
}

fn extra_headers() -> impl Strategy<Value = Vec<(String, String)>> {
    let one = prop_oneof![
        prop_oneof![Just("gzip"), Just("br"), Just("identity")]
            .prop_map(|v| ("accept-encoding".to_string(), v.to_string())),
        Just(("authorization".to_string(), "Bearer t0ken".to_string())),
        prop_oneof![Just("\"v1\""), Just("\"zz\"")]
            .prop_map(|v| ("if-none-match".to_string(), v.to_string())),
        prop_oneof![Just("bytes=0-3"), Just("bytes=500-600"), Just("bytes=x")]
            .prop_map(|v| ("range".to_string(), v.to_string())),
        Just(("cache-control".to_string(), "no-cache".to_string())),
        Just(("x-dup".to_string(), "a".to_string())),
        (1usize..6000).prop_map(|n| ("x-long".to_string(), "L".repeat(n))),
        Just(("x-huge".to_string(), "H".repeat(40 * 1024))),
        Just(("stratus-ctx".to_string(), "forged.value".to_string())),
        Just(("cdn-loop".to_string(), "other-cdn".to_string())),
        "[ -~]{0,40}".prop_map(|v| ("user-agent".to_string(), v)),
    ];
    prop::collection::vec(one, 0..5)
}

fn request() -> impl Strategy<Value = Req> {
    (
        prop_oneof![4 => Just("GET"), 2 => Just("HEAD"), 1 => Just("POST"), 1 => Just("DELETE")],
        0..KINDS.len(),
        0u8..4,
        extra_headers(),
        traceparent(),
    )
        .prop_map(|(method, kind, n, mut headers, tp)| {
            headers.extend(tp);
            Req {
                method,
                path: format!("/k/{}/{n}", KINDS[kind]),
                headers,
            }
        })
}

/// What a client sees, with values that legitimately differ between runs blanked:
/// `Date`, the `Age` value, and `ttl` values (entries cut up to a second apart).
fn observed_response(r: &client::Response) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let headers = r
        .headers
        .iter()
        .filter(|(k, _)| k != "date")
        .map(|(k, v)| match k.as_str() {
            "age" => (k.clone(), "*".to_string()),
            "cache-status" => (
                k.clone(),
                v.split(';')
                    .map(|p| {
                        if p.trim().starts_with("ttl=") {
                            " ttl=*"
                        } else {
                            p
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(";"),
            ),
            _ => (k.clone(), v.clone()),
        })
        .collect();
    (r.status, headers, r.body.clone())
}

/// One request as the origin received it: method, target, headers.
type Upstream = (String, String, Vec<(String, String)>);

/// What the origin received, minus the trace headers themselves.
fn observed_upstream(seen: &[SeenRequest]) -> Vec<Upstream> {
    seen.iter()
        .map(|r| {
            let headers = r
                .headers
                .iter()
                .filter(|(k, _)| k != "traceparent" && k != "tracestate")
                .cloned()
                .collect();
            (r.method.clone(), r.path.clone(), headers)
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn tracing_never_changes_what_a_request_does(sequence in prop::collection::vec(request(), 1..4)) {
        let world = &*WORLD;
        RT.block_on(async {
            for req in &sequence {
                let before: Vec<usize> = world.variants.iter().map(|v| v.origin.all_requests().len()).collect();
                let headers: Vec<(&str, &str)> = req.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                let mut answers = Vec::new();
                for v in &world.variants {
                    let r = client::request(v.fleet.lowers[0].listen, req.method, HOST, &req.path, &headers).await;
                    let r = r.map_err(|e| TestCaseError::fail(format!("{}: {e}", v.name)))?;
                    answers.push(observed_response(&r));
                }
                let upstream: Vec<_> = world.variants.iter().zip(&before)
                    .map(|(v, &b)| observed_upstream(&v.origin.all_requests()[b..]))
                    .collect();
                for (i, v) in world.variants.iter().enumerate().skip(1) {
                    prop_assert_eq!(&answers[i], &answers[0], "response differs with tracing {} for {:?}", v.name, req);
                    prop_assert_eq!(&upstream[i], &upstream[0], "origin request differs with tracing {} for {:?}", v.name, req);
                }
            }
            Ok(())
        })?;
    }
}
