//! Mutual TLS between the tiers, tried as an attacker holding (or having held) a fleet
//! certificate would: a certificate revoked after its session began gets no service when the
//! session resumes — by session ID or by ticket, TLS 1.2 or 1.3 — or is simply kept alive; a
//! full handshake with it, without a certificate or with another CA's fails; and a context whose
//! sender is not the certificate's name is refused.

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::client::Resumption;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use stratus_chaos::{
    Fleet, FleetOptions, FleetPki, FleetSpec, OriginEntry, Reply, TestOrigin, TEST_SECRET,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

#[path = "support/mod.rs"]
mod support;
use support::signed_context;

const HOST: &str = "example.test";

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_stratus"))
}

async fn fleet() -> (TestOrigin, Fleet) {
    fleet_of(1).await
}

async fn fleet_of(uppers: usize) -> (TestOrigin, Fleet) {
    let origin = TestOrigin::start().await.expect("origin starts");
    origin.fallback(|req, _| Reply::ok(format!("at {}", req.path)));
    let spec = FleetSpec {
        lowers: 1,
        uppers,
        origins: vec![OriginEntry::new(HOST, origin.addr())],
        lower_tier_extra: String::new(),
        common_extra: String::new(),
    };
    let fleet = Fleet::start_with(bin(), &spec, &FleetOptions::default())
        .await
        .expect("fleet starts");
    (origin, fleet)
}

/// How a test client resumes sessions.
#[derive(Debug, Clone, Copy)]
enum Resume {
    /// TLS 1.2, session IDs only (the server's session cache).
    Tls12Id,
    /// TLS 1.2 session tickets.
    Tls12Ticket,
    /// TLS 1.3 (tickets).
    Tls13,
}

/// A client presenting `cert` (issued by `pki`), resuming as `resume` says.
fn client(
    pki: &FleetPki,
    cert: &stratus_chaos::NodeCert,
    resume: Resume,
) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let ca = rustls_pemfile::certs(&mut pki.ca_pem().as_bytes())
        .next()
        .expect("a CA")
        .expect("CA parses");
    roots.add(ca).expect("root");
    let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert.cert.as_bytes())
        .collect::<Result<_, _>>()
        .expect("chain");
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut cert.key.as_bytes())
        .expect("key")
        .expect("a key");
    let versions: &[&rustls::SupportedProtocolVersion] = match resume {
        Resume::Tls13 => &[&rustls::version::TLS13],
        _ => &[&rustls::version::TLS12],
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .expect("versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client cert");
    config.resumption = match resume {
        Resume::Tls12Id => Resumption::in_memory_sessions(16)
            .tls12_resumption(rustls::client::Tls12Resumption::SessionIdOnly),
        _ => Resumption::in_memory_sessions(16),
    };
    Arc::new(config)
}

async fn connect(
    config: &Arc<rustls::ClientConfig>,
    addr: std::net::SocketAddr,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("up-1").expect("name");
    tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
}

/// Sends a GET as a lower would (with a context from `edge-x`) and reads the answer's status
/// and `Cache-Status`; `None` when the connection gives no answer.
async fn get(stream: &mut TlsStream<TcpStream>, path: &str) -> Option<(u16, String)> {
    let ctx = signed_context(HOST, path, "up-1", TEST_SECRET, SystemTime::now());
    let req = format!("GET {path} HTTP/1.1\r\nHost: {HOST}\r\nstratus-ctx: {ctx}\r\n\r\n");
    stream.write_all(req.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut chunk))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(head)) = resp.parse(&buf) {
            let len: usize = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
                .unwrap_or(0);
            let status = resp
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("cache-status"))
                .map(|h| String::from_utf8_lossy(h.value).into_owned())
                .unwrap_or_default();
            let code = resp.code.unwrap_or(0);
            if buf.len() >= head + len {
                return Some((code, status));
            }
        }
    }
}

fn kind(stream: &TlsStream<TcpStream>) -> Option<rustls::HandshakeKind> {
    stream.get_ref().1.handshake_kind()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_revoked_certificate_gets_no_service_on_resumed_or_kept_sessions() {
    let (origin, mut fleet) = fleet().await;
    let upper = fleet.uppers[0].listen;
    let (pki, dir) = fleet.pki().expect("mutual TLS");
    let attacker = pki.issue("edge-x").expect("cert");
    let crl_path = dir.join("up-1").join("fleet.crl");
    let revoked_crl = pki.crl(&[attacker.serial]).expect("crl");
    let modes = [Resume::Tls12Id, Resume::Tls12Ticket, Resume::Tls13];
    let configs: Vec<_> = modes.iter().map(|m| client(pki, &attacker, *m)).collect();
    let fresh = client(pki, &attacker, Resume::Tls13);

    // Before the revocation: served, each session established with a full handshake.
    for (mode, config) in modes.iter().zip(&configs) {
        let mut s = connect(config, upper).await.expect("handshake");
        assert_eq!(kind(&s), Some(rustls::HandshakeKind::Full), "{mode:?}");
        let (code, status) = get(&mut s, &format!("/before/{mode:?}"))
            .await
            .expect("answer");
        assert_eq!(code, 200, "{mode:?}: {status}");
        let _ = s.shutdown().await;
    }
    // A connection kept alive across the revocation.
    let mut kept = connect(&configs[2], upper).await.expect("handshake");
    assert_eq!(get(&mut kept, "/kept/1").await.map(|a| a.0), Some(200));

    std::fs::write(&crl_path, revoked_crl).expect("write crl");
    let toml = fleet.uppers[0].config_text().expect("config");
    fleet.uppers[0]
        .reload(&toml, "ok")
        .await
        .expect("CRL reloaded");
    let fetched = origin.count("/after");

    for (mode, config) in modes.iter().zip(&configs) {
        let mut s = connect(config, upper).await.expect("a resumed handshake");
        assert_eq!(
            kind(&s),
            Some(rustls::HandshakeKind::Resumed),
            "{mode:?}: the session resumed (rustls checks no certificate then)"
        );
        let (code, status) = get(&mut s, "/after").await.expect("answer");
        assert_eq!(code, 403, "{mode:?}: {status}");
        assert!(status.contains("revoked-certificate"), "{mode:?}: {status}");
    }
    let (code, status) = get(&mut kept, "/after").await.expect("answer");
    assert_eq!(
        (code, status.contains("revoked-certificate")),
        (403, true),
        "{status}"
    );
    // A full handshake with the revoked certificate fails outright.
    match connect(&fresh, upper).await {
        Err(_) => {}
        Ok(mut s) => assert_eq!(
            get(&mut s, "/after").await,
            None,
            "refused at the handshake"
        ),
    }
    assert_eq!(
        origin.count("/after"),
        fetched,
        "nothing reached the origin"
    );
    // The fleet's own lower still gets through.
    let r = stratus_chaos::client::get(fleet.lowers[0].listen, HOST, "/lower", &[])
        .await
        .expect("exchange");
    assert_eq!(r.status, 200, "{}", r.cache_status());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_the_certificates_owner_may_send_its_contexts() {
    let (origin, fleet) = fleet().await;
    let upper = fleet.uppers[0].listen;
    let (pki, _) = fleet.pki().expect("mutual TLS");
    // A fleet certificate, but for another node than the context's sender (`edge-x`).
    let other = pki.issue("edge-y").expect("cert");
    let mut s = connect(&client(pki, &other, Resume::Tls13), upper)
        .await
        .expect("a fleet certificate is accepted");
    let (code, status) = get(&mut s, "/mismatch").await.expect("answer");
    assert_eq!(code, 403, "{status}");
    assert!(status.contains("sender-not-peer"), "{status}");
    // The same context from the certificate's owner is served.
    let owner = pki.issue("edge-x").expect("cert");
    let mut s = connect(&client(pki, &owner, Resume::Tls13), upper)
        .await
        .expect("handshake");
    assert_eq!(get(&mut s, "/owner").await.map(|a| a.0), Some(200));
    // Another CA's certificate, or none, gets no service at all.
    let foreign = FleetPki::new().expect("another CA");
    let outsider = foreign.issue("edge-x").expect("cert");
    let mut config = (*client(pki, &outsider, Resume::Tls13)).clone();
    config.resumption = Resumption::disabled();
    match connect(&Arc::new(config), upper).await {
        Err(_) => {}
        Ok(mut s) => assert_eq!(get(&mut s, "/foreign").await, None),
    }
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut pki.ca_pem().as_bytes()) {
        roots.add(c.expect("ca")).expect("root");
    }
    let anonymous = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    match connect(&Arc::new(anonymous), upper).await {
        Err(_) => {}
        Ok(mut s) => assert_eq!(get(&mut s, "/anonymous").await, None),
    }
    assert_eq!(
        origin.count("/mismatch") + origin.count("/foreign") + origin.count("/anonymous"),
        0
    );
}

/// The serial of the certificate in `pem` (the harness's CA numbers them 1, 2, …).
fn serial_of(pem: &str) -> u64 {
    let der = rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .expect("a cert")
        .expect("parses");
    let (_, cert) = x509_parser::parse_x509_certificate(&der).expect("x509");
    cert.raw_serial()
        .iter()
        .fold(0u64, |n, b| (n << 8) | u64::from(*b))
}

/// A lower stops using an upper whose certificate its CRL revokes: requests fail over (no
/// client error), probes keep the member down, and no later request is served through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lower_stops_using_an_upper_whose_certificate_is_revoked() {
    let (_origin, mut fleet) = fleet_of(2).await;
    let lower = fleet.lowers[0].listen;
    let (pki, dir) = fleet.pki().expect("mutual TLS");
    let up1 = std::fs::read_to_string(dir.join("up-1").join("node.pem")).expect("cert");
    let crl = pki.crl(&[serial_of(&up1)]).expect("crl");
    std::fs::write(dir.join("edge-1").join("fleet.crl"), crl).expect("write");
    let toml = fleet.lowers[0].config_text().expect("config");
    fleet.lowers[0].reload(&toml, "ok").await.expect("reload");
    for i in 0..30 {
        let r = stratus_chaos::client::get(lower, HOST, &format!("/rev/{i}"), &[])
            .await
            .expect("exchange");
        assert_eq!(r.status, 200, "{}", r.cache_status());
    }
    let down = stratus_chaos::eventually(std::time::Duration::from_secs(10), || async {
        let ring = fleet.ring(0).await.expect("ring");
        ring.to_string().contains("\"down\"")
    })
    .await;
    assert!(down, "up-1 marked down");
    for i in 0..20 {
        let r = stratus_chaos::client::get(lower, HOST, &format!("/after-rev/{i}"), &[])
            .await
            .expect("exchange");
        assert_eq!(r.status, 200);
        assert!(r.cache_status().starts_with("up-2"), "{}", r.cache_status());
    }
}
