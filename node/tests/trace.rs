//! Traces across the tiers, checked on the wire: an in-test OTLP/HTTP receiver decodes the
//! real protobuf the nodes export. And a broken collector changes nothing a client sees.

use std::path::Path;
use std::time::Duration;

use stratus_chaos::{
    client, eventually, CollectorMode, Fleet, FleetSpec, NodeProcess, OriginEntry, ReceivedSpan,
    Reply, TestCollector, TestOrigin,
};

const HOST: &str = "example.test";
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_stratus"))
}

fn tracing_table(endpoint: &str, ratio: f64, queue: usize) -> String {
    format!("\n[tracing]\notlp_endpoint = \"{endpoint}\"\nsample_ratio = {ratio:.1}\nqueue_size = {queue}\nexport_timeout = \"500ms\"\n")
}

fn by_node<'a>(spans: &'a [ReceivedSpan], node: &str, kind: i32) -> Vec<&'a ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.instance == node && s.kind == kind)
        .collect()
}

const SERVER: i32 = 2;
const CLIENT: i32 = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_request_is_one_trace_across_lower_upper_and_origin() {
    let collector = TestCollector::start(CollectorMode::Receive)
        .await
        .expect("collector");
    let origin = TestOrigin::start().await.expect("origin");
    origin.fixed(
        "/t",
        Reply::ok("traced").header("cache-control", "max-age=600"),
    );
    let spec = FleetSpec {
        lowers: 1,
        uppers: 1,
        origins: vec![OriginEntry::new(HOST, origin.addr())],
        lower_tier_extra: String::new(),
        common_extra: tracing_table(&collector.endpoint(), 1.0, 8192),
    };
    let fleet = Fleet::start(bin(), &spec).await.expect("fleet");
    let traceparent = format!("00-{TRACE}-{CLIENT_SPAN}-01");
    let r = client::get(
        fleet.lowers[0].listen,
        HOST,
        "/t",
        &[("traceparent", &traceparent)],
    )
    .await
    .expect("exchange");
    assert_eq!((r.status, r.text().as_str()), (200, "traced"));

    let complete = eventually(Duration::from_secs(15), || async {
        collector
            .spans()
            .iter()
            .filter(|s| s.trace_id == TRACE)
            .count()
            >= 4
    })
    .await;
    let spans: Vec<ReceivedSpan> = collector
        .spans()
        .into_iter()
        .filter(|s| s.trace_id == TRACE)
        .collect();
    assert!(
        complete,
        "expected 4 spans of trace {TRACE}, got {spans:#?}"
    );
    assert_eq!(spans.len(), 4, "{spans:#?}");
    assert!(spans.iter().all(|s| s.service == "stratus"));

    let lower_server = by_node(&spans, "edge-1", SERVER);
    let lower_client = by_node(&spans, "edge-1", CLIENT);
    let upper_server = by_node(&spans, "up-1", SERVER);
    let upper_client = by_node(&spans, "up-1", CLIENT);
    assert_eq!(
        (
            lower_server.len(),
            lower_client.len(),
            upper_server.len(),
            upper_client.len()
        ),
        (1, 1, 1, 1)
    );
    let (ls, lc, us, uc) = (
        lower_server[0],
        lower_client[0],
        upper_server[0],
        upper_client[0],
    );

    // Parent links: client → lower SERVER → lower CLIENT → upper SERVER → upper CLIENT.
    assert_eq!(ls.parent_span_id, CLIENT_SPAN);
    assert_eq!(lc.parent_span_id, ls.span_id);
    assert_eq!(us.parent_span_id, lc.span_id);
    assert_eq!(uc.parent_span_id, us.span_id);

    for s in &spans {
        assert_eq!(s.name, "GET");
        assert_eq!(s.attr("http.request.method"), Some("GET"));
    }
    assert_eq!(ls.attr("stratus.tier"), Some("lower"));
    assert_eq!(us.attr("stratus.tier"), Some("upper"));
    assert_eq!(ls.attr("stratus.node"), Some("edge-1"));
    assert_eq!(ls.attr("http.response.status_code"), Some("200"));
    assert_eq!(ls.attr("url.path"), Some("/t"));
    assert!(
        ls.attr("stratus.cache_status")
            .is_some_and(|c| c.starts_with("edge-1; fwd=uri-miss")),
        "{ls:?}"
    );
    assert!(
        us.attr("stratus.cache_status")
            .is_some_and(|c| c.starts_with("up-1; fwd=uri-miss")),
        "{us:?}"
    );
    assert_eq!(lc.attr("stratus.upstream.kind"), Some("upper"));
    assert_eq!(lc.attr("stratus.upstream.attempt"), Some("1"));
    assert_eq!(uc.attr("stratus.upstream.kind"), Some("origin"));
    assert_eq!(uc.attr("server.address"), Some(HOST));
    assert!(lc
        .attr("url.full")
        .is_some_and(|u| u == "http://example.test/t"));

    // The origin's parent is the upper's CLIENT span.
    let seen = origin.requests("/t");
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].header("traceparent"),
        Some(format!("00-{TRACE}-{}-01", uc.span_id).as_str())
    );
    assert!(seen[0].header("stratus-ctx").is_none());
}

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

async fn metric(node: &NodeProcess, name: &str) -> u64 {
    let text = client::get(node.admin, "admin", "/metrics", &[])
        .await
        .expect("metrics")
        .text();
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// `Cache-Status` with its ttl values blanked: two nodes cut their entries up to a second apart.
fn without_ttl(cache_status: &str) -> String {
    cache_status
        .split(';')
        .map(|p| {
            if p.trim().starts_with("ttl=") {
                " ttl=*"
            } else {
                p
            }
        })
        .collect::<Vec<_>>()
        .join(";")
}

async fn scripted_origin() -> TestOrigin {
    let origin = TestOrigin::start().await.expect("origin");
    origin.route("/c", |_, nth| {
        Reply::ok(format!("n{nth}")).header("cache-control", "max-age=600")
    });
    origin.route("/u", |_, nth| {
        Reply::ok(format!("u{nth}")).header("cache-control", "no-store")
    });
    origin
}

/// A refused, blackholed or slow collector changes no response, keeps memory bounded and
/// counts the spans it had to drop.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broken_collector_changes_no_response() {
    let blackhole = TestCollector::start(CollectorMode::BlackHole)
        .await
        .expect("collector");
    let slow = TestCollector::start(CollectorMode::Slow(Duration::from_secs(2)))
        .await
        .expect("collector");
    let refused = format!("http://{}", stratus_chaos::free_port().expect("port"));
    let reference_origin = scripted_origin().await;
    let reference = NodeProcess::start(
        bin(),
        "edge-1",
        &[OriginEntry::new(HOST, reference_origin.addr())],
        "",
    )
    .await
    .expect("node");
    let mut broken = Vec::new();
    for endpoint in [refused, blackhole.endpoint(), slow.endpoint()] {
        let origin = scripted_origin().await;
        let origins = [OriginEntry::new(HOST, origin.addr())];
        let node = NodeProcess::start(
            bin(),
            "edge-1",
            &origins,
            &tracing_table(&endpoint, 1.0, 64),
        )
        .await
        .expect("node");
        broken.push((endpoint, node, origin));
    }
    let rss_before: Vec<u64> = broken.iter().map(|(_, n, _)| rss_kib(n.pid())).collect();
    let paths = ["/c", "/u", "/c", "/missing"];
    let rounds = 600usize;
    for i in 0..rounds {
        let path = paths[i % paths.len()];
        let want = client::get(reference.listen, HOST, path, &[])
            .await
            .expect("reference");
        for (endpoint, node, _) in &broken {
            let got = client::get(node.listen, HOST, path, &[])
                .await
                .expect("exchange");
            assert_eq!(
                (got.status, &got.body),
                (want.status, &want.body),
                "{endpoint} {path}"
            );
            assert_eq!(
                without_ttl(&got.cache_status()),
                without_ttl(&want.cache_status()),
                "{endpoint} {path}"
            );
        }
    }
    for (i, (endpoint, node, origin)) in broken.iter().enumerate() {
        assert_eq!(origin.count("/c"), reference_origin.count("/c"));
        assert_eq!(origin.count("/u"), reference_origin.count("/u"));
        let dropped = metric(node, "stratus_spans_dropped_total").await;
        let grew = rss_kib(node.pid()).saturating_sub(rss_before[i]);
        println!("collector {endpoint}: {dropped} spans dropped, RSS grew {grew} KiB over {rounds} requests");
        assert!(grew < 64 * 1024, "{endpoint}: memory grew {grew} KiB");
        if i < 2 {
            // Refused and blackholed: spans pile up to the queue bound and are counted.
            assert!(dropped > 0, "{endpoint}: no dropped spans counted");
        }
    }
}

/// A failover shows in the trace (two CLIENT spans, the first an error, and a `failover` event)
/// and in the lower node's log, whose line names the trace.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failover_is_visible_in_the_trace_and_the_log() {
    let collector = TestCollector::start(CollectorMode::Receive)
        .await
        .expect("collector");
    let origin = TestOrigin::start().await.expect("origin");
    origin.fallback(|req, _| {
        Reply::ok(format!("body of {}", req.path)).header("cache-control", "max-age=600")
    });
    let spec = FleetSpec {
        lowers: 1,
        uppers: 2,
        origins: vec![OriginEntry::new(HOST, origin.addr())],
        lower_tier_extra: "probe_interval = \"1h\"".to_string(),
        common_extra: tracing_table(&collector.endpoint(), 1.0, 8192),
    };
    let mut fleet = Fleet::start(bin(), &spec).await.expect("fleet");
    fleet.uppers[0].kill_hard();
    let mut failed_over = None;
    for i in 0..40u32 {
        let trace = format!("{:032x}", 0xfa11_0000_u64 + u64::from(i));
        let tp = format!("00-{trace}-{CLIENT_SPAN}-01");
        let r = client::get(
            fleet.lowers[0].listen,
            HOST,
            &format!("/k{i}"),
            &[("traceparent", &tp)],
        )
        .await
        .expect("exchange");
        assert_eq!(r.status, 200, "failover must hide the dead member");
        // Every request's access line names its trace; a failover also has its own line.
        let failover_logged = fleet.lowers[0]
            .log()
            .lines()
            .any(|l| l.contains(&trace) && l.contains("trying the next hop"));
        if r.cache_status().starts_with("up-2") && failover_logged {
            failed_over = Some(trace);
            break;
        }
    }
    let trace = failed_over.expect("some key owned by the killed upper failed over");
    let log = fleet.lowers[0].log();
    let ours = log
        .lines()
        .find(|l| l.contains(&format!("trace_id={trace}")) && l.contains("trying the next hop"));
    assert!(
        ours.is_some_and(|l| l.contains("span_id=")),
        "no failover line naming the trace in:\n{log}"
    );
    let pingoras = log
        .lines()
        .find(|l| l.contains("Fail to proxy") && l.contains(&format!("trace_id: {trace}")));
    assert!(
        pingoras.is_some(),
        "pingora's error line names the trace too:\n{log}"
    );

    let found = eventually(Duration::from_secs(15), || async {
        collector
            .spans()
            .iter()
            .filter(|s| s.trace_id == trace && s.instance == "edge-1")
            .count()
            >= 3
    })
    .await;
    let spans: Vec<ReceivedSpan> = collector
        .spans()
        .into_iter()
        .filter(|s| s.trace_id == trace && s.instance == "edge-1")
        .collect();
    assert!(found, "{spans:#?}");
    let server = by_node(&spans, "edge-1", SERVER)[0];
    let mut clients = by_node(&spans, "edge-1", CLIENT);
    clients.sort_by_key(|c| c.attr("stratus.upstream.attempt").map(str::to_string));
    assert_eq!(clients.len(), 2);
    assert_eq!(clients[0].status, 2, "the failed attempt is an error");
    assert_eq!(clients[0].attr("error.type"), Some("connection-refused"));
    assert_eq!(clients[1].attr("stratus.upstream.attempt"), Some("2"));
    assert_eq!(clients[1].attr("http.request.resend_count"), Some("1"));
    assert!(server.events.iter().any(|e| e == "failover"), "{server:?}");
}

/// Requests coalesced onto another request's fill record the wait and link to the fill's span.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coalesced_requests_link_to_the_fill() {
    let collector = TestCollector::start(CollectorMode::Receive)
        .await
        .expect("collector");
    let origin = TestOrigin::start().await.expect("origin");
    let gate = stratus_chaos::Gate::default();
    origin.fixed(
        "/hot",
        Reply::ok("hot")
            .header("cache-control", "max-age=600")
            .hold(&gate),
    );
    let node = NodeProcess::start(
        bin(),
        "edge-1",
        &[OriginEntry::new(HOST, origin.addr())],
        &tracing_table(&collector.endpoint(), 1.0, 8192),
    )
    .await
    .expect("node");
    let listen = node.listen;
    let first = tokio::spawn(async move { client::get(listen, HOST, "/hot", &[]).await });
    assert!(
        eventually(Duration::from_secs(10), || async {
            origin.count("/hot") == 1
        })
        .await
    );
    let waiters: Vec<_> = (0..4)
        .map(|_| tokio::spawn(async move { client::get(listen, HOST, "/hot", &[]).await }))
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await; // ok: no signal says a waiter reached the lock; a late one is a plain hit and is simply not among `linked`
    gate.open();
    assert_eq!(first.await.expect("task").expect("exchange").status, 200);
    for w in waiters {
        assert_eq!(w.await.expect("task").expect("exchange").text(), "hot");
    }
    assert_eq!(origin.count("/hot"), 1);
    let all = eventually(Duration::from_secs(15), || async {
        collector
            .spans()
            .iter()
            .filter(|s| s.kind == SERVER)
            .count()
            >= 5
    })
    .await;
    assert!(all, "{:#?}", collector.spans());
    let spans = collector.spans();
    let filler = spans
        .iter()
        .find(|s| {
            s.kind == SERVER
                && s.attr("stratus.cache_status")
                    .is_some_and(|c| c.contains("stored"))
        })
        .expect("the filling request's span");
    let linked: Vec<_> = spans
        .iter()
        .filter(|s| s.kind == SERVER && s.attr("stratus.cache.lock_wait_ms").is_some())
        .collect();
    assert!(!linked.is_empty(), "waiters record their wait: {spans:#?}");
    for s in &linked {
        assert!(s.events.iter().any(|e| e == "waited on a coalesced fill"));
        assert_eq!(
            s.links,
            vec![(filler.trace_id.clone(), filler.span_id.clone())],
            "{s:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn background_work_is_traced_too() {
    let collector = TestCollector::start(CollectorMode::Receive)
        .await
        .expect("collector");
    let origin = scripted_origin().await;
    let spec = FleetSpec {
        lowers: 1,
        uppers: 1,
        origins: vec![OriginEntry::new(HOST, origin.addr())],
        lower_tier_extra: String::new(),
        common_extra: tracing_table(&collector.endpoint(), 1.0, 8192),
    };
    let mut fleet = Fleet::start(bin(), &spec).await.expect("fleet");
    let lower = &mut fleet.lowers[0];
    let same = lower.config_text().expect("config");
    lower.reload(&same, "ok").await.expect("reload");
    let body = format!("{{\"url\": \"http://{HOST}/gone\"}}");
    let raw = format!(
        "POST /purge HTTP/1.1\r\nHost: admin\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let purge = client::send_raw(lower.admin, raw.as_bytes(), false)
        .await
        .expect("purge");
    assert_eq!(purge.status, 200, "{}", purge.text());
    let named = |name: &'static str| {
        let spans = collector.spans();
        spans
            .iter()
            .filter(|s| s.instance == "edge-1" && s.service == "stratus" && s.name == name)
            .cloned()
            .collect::<Vec<_>>()
    };
    let all_seen = eventually(Duration::from_secs(15), || async {
        [
            "probe round",
            "readiness probe",
            "config reload",
            "purge at an upper",
        ]
        .iter()
        .all(|n| !named(n).is_empty())
    })
    .await;
    assert!(
        all_seen,
        "background spans missing; got {:?}",
        collector
            .spans()
            .iter()
            .map(|s| (&s.instance, &s.name))
            .collect::<Vec<_>>()
    );
    let reload = &named("config reload")[0];
    assert!(
        reload
            .attributes
            .iter()
            .any(|(k, v)| k == "result" && v == "ok"),
        "{reload:?}"
    );
    let probe = &named("readiness probe")[0];
    let round = named("probe round");
    assert!(
        round.iter().any(|r| r.span_id == probe.parent_span_id),
        "a probe is a child of its round"
    );
    // Log lines and pingora's records stay out of the export: only these names appear
    // besides request spans.
    for s in collector.spans().iter().filter(|s| s.instance == "edge-1") {
        assert!(
            s.kind == SERVER
                || s.kind == CLIENT
                || [
                    "probe round",
                    "readiness probe",
                    "config reload",
                    "purge at an upper"
                ]
                .contains(&s.name.as_str()),
            "unexpected span {:?}",
            s.name
        );
    }
}
