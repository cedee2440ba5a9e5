//! HTTPS for clients on a lower (`[tls]`): HTTP/2 and HTTP/1.1 offered by ALPN on the same
//! port, the plain listener beside it, and the certificate swapped by a reload.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName};
use stratus_chaos::{FleetPki, NodeProcess, OriginEntry, Reply, TestOrigin};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HOST: &str = "example.test";

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_stratus"))
}

/// A lower with `[tls]` on its own port, its certificate for `example.test` from `pki`.
async fn https_node(pki: &FleetPki, dir: &Path) -> (TestOrigin, NodeProcess, std::net::SocketAddr) {
    let origin = TestOrigin::start().await.expect("origin");
    origin.fallback(|req, _| {
        Reply::ok(format!("at {}", req.path)).header("cache-control", "max-age=60")
    });
    write_cert(pki, dir);
    let tls_listen = stratus_chaos::free_port().expect("port");
    let extra = format!(
        "[tls]\nlisten = \"{tls_listen}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        dir.join("site.pem").display(),
        dir.join("site.key").display()
    );
    let node = NodeProcess::start(
        bin(),
        "edge-1",
        &[OriginEntry::new(HOST, origin.addr())],
        &extra,
    )
    .await
    .expect("node starts");
    (origin, node, tls_listen)
}

fn write_cert(pki: &FleetPki, dir: &Path) -> Vec<u8> {
    let cert = pki.issue(HOST).expect("cert");
    stratus_chaos::pki::write_private(&dir.join("site.key"), &cert.key).expect("key");
    std::fs::write(dir.join("site.pem"), &cert.cert).expect("cert");
    let der = rustls_pemfile::certs(&mut cert.cert.as_bytes())
        .next()
        .expect("a cert")
        .expect("parses");
    der.to_vec()
}

async fn connect(
    pki: &FleetPki,
    addr: std::net::SocketAddr,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut pki.ca_pem().as_bytes()) {
        roots.add(c.expect("ca")).expect("root");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await.expect("connect");
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from(HOST).expect("name"), tcp)
        .await
        .expect("handshake")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_get_http2_or_http1_by_alpn_and_a_reloaded_certificate() {
    let pki = FleetPki::new().expect("CA");
    let dir = tempfile::tempdir().expect("dir");
    let (origin, mut node, tls_listen) = https_node(&pki, dir.path()).await;

    // HTTP/2, chosen by ALPN.
    let tls = connect(&pki, tls_listen, &[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut h2, conn) = h2::client::handshake(tls).await.expect("h2 handshake");
    tokio::spawn(conn);
    for round in ["miss", "hit"] {
        let req = http::Request::builder()
            .uri(format!("https://{HOST}/two"))
            .body(())
            .expect("request");
        let (answer, _) = h2.send_request(req, true).expect("send");
        let answer = answer.await.expect("response");
        assert_eq!(answer.status(), 200, "{round}: {:?}", answer.headers());
        let status = answer
            .headers()
            .get("cache-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        assert!(
            status.contains(if round == "hit" {
                "hit"
            } else {
                "fwd=uri-miss"
            }),
            "{status}"
        );
        let mut body = answer.into_body();
        let mut bytes = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.expect("data");
            let _ = body.flow_control().release_capacity(chunk.len());
            bytes.extend_from_slice(&chunk);
        }
        assert_eq!(bytes, b"at /two");
    }
    assert_eq!(origin.count("/two"), 1, "one fetch for both");
    let seen = origin.requests("/two");
    // The scheme is not keyed, so it is not sent: one key, one meaning.
    assert_eq!(seen[0].header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen[0].header("host"), Some(HOST), "from :authority");

    // HTTP/1.1, when that is all the client offers.
    let mut tls = connect(&pki, tls_listen, &[b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    tls.write_all(
        format!("GET /one HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let mut buf = Vec::new();
    let _ = tls.read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("at /one"), "{text}");

    // The plain listener still serves.
    let plain = stratus_chaos::client::get(node.listen, HOST, "/plain", &[])
        .await
        .expect("plain");
    assert_eq!(plain.status, 200);

    // A new certificate, applied by SIGHUP: new handshakes present it.
    let renewed = write_cert(&pki, dir.path());
    let toml = node.config_text().expect("config");
    node.reload(&toml, "ok").await.expect("reload");
    let tls = connect(&pki, tls_listen, &[b"h2"]).await;
    let presented: Vec<CertificateDer<'static>> = tls
        .get_ref()
        .1
        .peer_certificates()
        .expect("a certificate")
        .to_vec();
    assert_eq!(
        presented[0].as_ref(),
        renewed.as_slice(),
        "the renewed certificate"
    );
}
