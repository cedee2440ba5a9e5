//! Signals as operators send them. SIGHUP reloads the config: validated first, rejected or
//! refused files change nothing (rollback by construction), a good file applies live —
//! origins, upper members and weights — and the cache survives. SIGTERM returns as soon as
//! the requests in flight are done, not after the whole grace period.

use std::path::Path;
use std::time::{Duration, Instant};

use stratus_chaos::{client, Fleet, FleetSpec, NodeProcess, OriginEntry, Reply, TestOrigin};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_stratus"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bad_config_is_rejected_and_a_good_one_applies_live() {
    let origin = TestOrigin::start().await.expect("origin");
    origin.fixed(
        "/kept",
        Reply::ok("cached").header("cache-control", "max-age=600"),
    );
    origin.fixed("/new", Reply::ok("new host"));
    let mut node = NodeProcess::start(
        bin(),
        "reload",
        &[OriginEntry::new("a.test", origin.addr())],
        "",
    )
    .await
    .expect("node");
    let good = node.config_text().expect("config");
    let first = client::get(node.listen, "a.test", "/kept", &[])
        .await
        .expect("exchange");
    assert_eq!(first.status, 200);
    let unknown = client::get(node.listen, "b.test", "/new", &[])
        .await
        .expect("exchange");
    assert_eq!(unknown.status, 421, "b.test is not served yet");

    // Broken TOML, then a config that fails validation: each rejected, the node serves on.
    for broken in [
        format!("{good}\n[cache\n"),
        good.replace("[node]", "[node]\nthreads = 0"),
    ] {
        node.reload(&broken, "rejected").await.expect("rejected");
        let r = client::get(node.listen, "a.test", "/kept", &[])
            .await
            .expect("exchange");
        assert_eq!(r.status, 200, "the running config keeps serving");
    }
    assert!(node.log().contains("reload rejected"), "{}", node.log());

    // A new listen address needs --upgrade: refused whole, even with a new origin beside it.
    let other_port = stratus_chaos::free_port().expect("port");
    let moved = good.replacen(
        &format!("listen = \"{}\"", node.listen),
        &format!("listen = \"{other_port}\""),
        1,
    );
    assert_ne!(moved, good);
    let moved = format!(
        "{moved}\n[[origin]]\nhost = \"b.test\"\naddress = \"{}\"\n",
        origin.addr()
    );
    node.reload(&moved, "refused").await.expect("refused");
    assert!(node.log().contains("node.listen"), "{}", node.log());
    let r = client::get(node.listen, "b.test", "/new", &[])
        .await
        .expect("exchange");
    assert_eq!(r.status, 421, "a refused reload changed nothing");

    // A good one: the new origin serves at once, the cache is still there.
    let added = format!(
        "{good}\n[[origin]]\nhost = \"b.test\"\naddress = \"{}\"\n",
        origin.addr()
    );
    node.reload(&added, "ok").await.expect("ok");
    let r = client::get(node.listen, "b.test", "/new", &[])
        .await
        .expect("exchange");
    assert_eq!(r.status, 200, "{}", r.cache_status());
    let hit = client::get(node.listen, "a.test", "/kept", &[])
        .await
        .expect("exchange");
    assert!(hit.cache_status().contains("hit"), "{}", hit.cache_status());
    assert_eq!(origin.count("/kept"), 1, "the cache survived the reload");
    assert!(node.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upper_members_and_weights_change_live() {
    let origin = TestOrigin::start().await.expect("origin");
    for i in 0..40 {
        origin.fixed(
            &format!("/k/{i}"),
            Reply::ok("v").header("cache-control", "no-store"),
        );
    }
    let spec = FleetSpec {
        lowers: 1,
        uppers: 2,
        origins: vec![OriginEntry::new("example.test", origin.addr())],
        lower_tier_extra: String::new(),
        common_extra: String::new(),
    };
    let mut fleet = Fleet::start(bin(), &spec).await.expect("fleet");
    let lower = &mut fleet.lowers[0];
    let both = lower.config_text().expect("config");
    let members_line = both
        .lines()
        .find(|l| l.starts_with("upper = ["))
        .expect("upper line")
        .to_string();
    let first_member = members_line
        .trim_start_matches("upper = [")
        .split(" }, ")
        .next()
        .expect("a member")
        .trim_end_matches(" }]")
        .to_string();
    let ring_size = |text: &str| text.matches("\"addr\"").count();
    let ring = |lower: &NodeProcess| {
        let admin = lower.admin;
        async move {
            client::get(admin, "admin", "/ring", &[])
                .await
                .expect("ring")
                .text()
        }
    };
    assert_eq!(ring_size(&ring(lower).await), 2);

    // Down to one member: every key goes to it; up to two again with a weight.
    let one = both.replace(&members_line, &format!("upper = [{first_member} }}]"));
    lower.reload(&one, "ok").await.expect("ok");
    assert_eq!(ring_size(&ring(lower).await), 1, "{one}");
    for i in 0..40 {
        let r = client::get(lower.listen, "example.test", &format!("/k/{i}"), &[])
            .await
            .expect("exchange");
        assert_eq!(r.status, 200);
        assert!(
            r.cache_status().starts_with("up-1;"),
            "{}",
            r.cache_status()
        );
    }
    let weighted = both.replace(" }]", ", weight = 3 }]");
    lower.reload(&weighted, "ok").await.expect("ok");
    let text = ring(lower).await;
    assert_eq!(ring_size(&text), 2, "{text}");
    assert!(text.contains("\"weight\": 3"), "{text}");
    let mut served_by_second = 0;
    for i in 0..40 {
        let r = client::get(lower.listen, "example.test", &format!("/k/{i}"), &[])
            .await
            .expect("exchange");
        assert_eq!(r.status, 200);
        served_by_second += usize::from(r.cache_status().starts_with("up-2;"));
    }
    assert!(
        served_by_second > 0,
        "the member a reload brought back takes keys"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_what_is_in_flight_and_returns_without_waiting_out_the_grace() {
    let origin = TestOrigin::start().await.expect("origin");
    origin.fixed(
        "/slow",
        Reply::ok("finished").delay(Duration::from_millis(1500)),
    );
    let (listen, admin) = (
        stratus_chaos::free_port().expect("port"),
        stratus_chaos::free_port().expect("port"),
    );
    // A 30 s grace period: the stop must end long before it.
    let toml = format!(
        "[node]\nname = \"term\"\nrole = \"lower\"\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\ngrace_period = \"30s\"\n\n[[origin]]\nhost = \"a.test\"\naddress = \"{}\"\n",
        origin.addr()
    );
    let mut node = NodeProcess::start_with(bin(), "term", listen, admin, &toml)
        .await
        .expect("node");
    let slow = tokio::spawn(async move { client::get(listen, "a.test", "/slow", &[]).await });
    // Let the request reach the origin, then stop.
    let wait = Instant::now() + Duration::from_secs(5);
    while origin.count("/slow") == 0 && Instant::now() < wait {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let asked = Instant::now();
    let status = node.terminate().await.expect("exits");
    let took = asked.elapsed();
    let r = slow
        .await
        .expect("task")
        .expect("the request in flight is answered");
    assert_eq!((r.status, r.text().as_str()), (200, "finished"));
    assert!(status.success(), "{status}");
    assert!(
        took < Duration::from_secs(15),
        "SIGTERM waited {took:?}, as if for the whole 30 s grace period"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_client_request_is_logged_once_and_measured_apart_from_the_fleets_own() {
    let origin = TestOrigin::start().await.expect("origin");
    origin.fixed(
        "/a",
        Reply::ok("aaaa").header("cache-control", "max-age=600"),
    );
    let spec = FleetSpec {
        lowers: 1,
        uppers: 1,
        origins: vec![OriginEntry::new("example.test", origin.addr())],
        lower_tier_extra: String::new(),
        common_extra: String::new(),
    };
    let mut fleet = Fleet::start(bin(), &spec).await.expect("fleet");
    let (lower, upper) = (&fleet.lowers[0], &fleet.uppers[0]);
    for _ in 0..2 {
        let r = client::get(lower.listen, "example.test", "/a", &[])
            .await
            .expect("exchange");
        assert_eq!(r.status, 200);
    }
    // Probes run every 200 ms in the harness: wait until a few reached the upper.
    let probed = stratus_chaos::eventually(Duration::from_secs(10), || async {
        upper
            .metric("stratus_internal_requests_total{kind=\"probe\"}")
            .await
            .is_ok_and(|n| n >= 2.0)
    })
    .await;
    assert!(probed, "no probes counted at the upper");

    let log = lower.log();
    let access: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("stratus::access"))
        .collect();
    assert_eq!(access.len(), 2, "one line per client request:\n{log}");
    for field in [
        "method=GET",
        "host=example.test",
        "path=/a",
        "status=200",
        "bytes=4",
    ] {
        assert!(access.iter().all(|l| l.contains(field)), "{field}:\n{log}");
    }
    assert!(access[0].contains("cache=\"miss\"") && access[0].contains("upstream=127.0.0.1:"));
    assert!(access[1].contains("cache=\"hit\"") && access[1].contains("upstream=-"));
    assert!(
        log.contains("listening"),
        "a startup line per listener:\n{log}"
    );
    for node in [lower, upper] {
        assert!(!node.log().contains(" ERROR "), "{}", node.log());
    }

    // The upper served one client request (the lower's miss) and many probes, counted apart.
    let upper_requests = upper
        .metric("stratus_requests_total")
        .await
        .expect("metrics");
    assert_eq!(upper_requests, 1.0);
    let durations = lower
        .metric("stratus_request_duration_seconds_count")
        .await
        .expect("metrics");
    assert_eq!(durations, 2.0);
    let upstream = lower
        .metric("stratus_upstream_duration_seconds_count{hop=\"upper\"}")
        .await
        .expect("metrics");
    assert_eq!(upstream, 1.0);
    assert_eq!(
        lower.metric("stratus_bytes_sent_total").await.expect("m"),
        8.0
    );
    let build = format!(
        "stratus_build_info{{node=\"edge-1\",version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(lower.metric(&build).await.expect("m"), 1.0);
    assert_eq!(upper.metric("stratus_upper_up").await.expect("m"), 0.0);
    assert_eq!(lower.metric("stratus_upper_up").await.expect("m"), 1.0);

    // JSON lines, one object each.
    let lower = &mut fleet.lowers[0];
    lower.set_env("STRATUS_LOG_FORMAT", "json");
    lower.restart().await.expect("restart");
    let r = client::get(lower.listen, "example.test", "/a", &[])
        .await
        .expect("exchange");
    assert_eq!(r.status, 200);
    let log = lower.log();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("stratus::access"))
        .expect("an access line");
    let v: serde_json::Value = serde_json::from_str(line).expect("a JSON object");
    assert_eq!(v["target"], "stratus::access");
    assert_eq!(v["fields"]["status"], 200);
    assert_eq!(v["fields"]["path"], "/a");
}

/// An origin that upgrades WebSocket requests (`101`) and then echoes whatever it receives
/// (a WebSocket server as far as a proxy can tell); other requests get a plain 200.
async fn echo_upgrade_origin() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
                    match s.read(&mut byte).await {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                if !String::from_utf8_lossy(&head)
                    .to_ascii_lowercase()
                    .contains("upgrade: websocket")
                {
                    let plain =
                        "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nplain";
                    let _ = s.write_all(plain.as_bytes()).await;
                    return;
                }
                let answer = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
                if s.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_open_websocket_keeps_talking_across_a_zero_downtime_upgrade() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = echo_upgrade_origin().await;
    let (listen, admin) = (
        stratus_chaos::free_port().expect("port"),
        stratus_chaos::free_port().expect("port"),
    );
    let toml = format!(
        "[node]\nname = \"ws\"\nrole = \"lower\"\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\ngrace_period = \"20s\"\n\n[[origin]]\nhost = \"ws.test\"\naddress = \"{echo}\"\n"
    );
    let mut node = NodeProcess::start_with(bin(), "ws", listen, admin, &toml)
        .await
        .expect("node");
    let mut ws = tokio::net::TcpStream::connect(listen)
        .await
        .expect("connect");
    ws.write_all(b"GET /chat HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        .await
        .expect("upgrade request");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        ws.read_exact(&mut byte).await.expect("101 head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("cache-status: ws; hit"),
        "{head}"
    );

    // Hand the sockets over while the connection is open; talk all through it.
    let upgrade = tokio::spawn(async move {
        node.upgrade().await.expect("upgrade");
        node
    });
    let talk_until = Instant::now() + Duration::from_secs(8);
    let mut exchanged = 0;
    while Instant::now() < talk_until {
        let msg = format!("message {exchanged}\n");
        ws.write_all(msg.as_bytes())
            .await
            .expect("send across the hand-over");
        let mut back = vec![0u8; msg.len()];
        ws.read_exact(&mut back)
            .await
            .expect("echo across the hand-over");
        assert_eq!(back, msg.as_bytes());
        exchanged += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !upgrade.is_finished(),
        "the old process must wait for the open connection"
    );
    // New connections meanwhile reach the new process.
    let r = client::get(listen, "ws.test", "/plain", &[])
        .await
        .expect("exchange");
    assert_eq!((r.status, r.text().as_str()), (200, "plain"));
    drop(ws);
    let node = upgrade
        .await
        .expect("the old process exits once the connection ends");
    assert!(exchanged > 50, "{exchanged} messages");
    assert!(node.log().contains("listening"), "{}", node.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lower_reloaded_with_a_new_origin_before_the_uppers_marks_no_upper_down() {
    let origin = TestOrigin::start().await.expect("origin");
    origin.fixed("/n", Reply::ok("new"));
    let spec = FleetSpec {
        lowers: 1,
        uppers: 2,
        origins: vec![OriginEntry::new("example.test", origin.addr())],
        lower_tier_extra: String::new(),
        common_extra: String::new(),
    };
    let mut fleet = Fleet::start(bin(), &spec).await.expect("fleet");
    let lower = &mut fleet.lowers[0];
    // The lower learns new.test first; the uppers do not serve it yet. (Its timeouts are the
    // harness's, within the lower's short tier.read_timeout.)
    let staged = format!(
        "{}\n[[origin]]\nhost = \"new.test\"\naddress = \"{}\"\nconnect_timeout = \"500ms\"\nread_timeout = \"2s\"\n",
        lower.config_text().expect("config"),
        origin.addr()
    );
    lower.reload(&staged, "ok").await.expect("reload");
    // A client asking for it, many times over: the uppers answer 421 each time.
    for _ in 0..20 {
        let r = client::get(lower.listen, "new.test", "/n", &[])
            .await
            .expect("exchange");
        assert_eq!(r.status, 421, "{}", r.cache_status());
    }
    assert_eq!(
        lower.metric("stratus_upper_up").await.expect("metrics"),
        2.0,
        "a Host the uppers do not serve yet marked a member down"
    );
    let r = client::get(lower.listen, "example.test", "/n", &[])
        .await
        .expect("exchange");
    assert_eq!(r.status, 200, "{}", r.cache_status());
}
