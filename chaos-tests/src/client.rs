//! A small HTTP/1.1 client that reports exactly what came over the wire.
//!
//! Tests must tell a complete body from a truncated one and must be able to send malformed
//! requests; general-purpose clients hide the first and refuse the second.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Upper bound on how long one exchange may take; a hung node fails the test instead of it.
const EXCHANGE_DEADLINE: Duration = Duration::from_secs(20);

/// A response as received.
#[derive(Debug, Clone)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header fields in order, names lowercased.
    pub headers: Vec<(String, String)>,
    /// Body bytes received (decoded if chunked).
    pub body: Vec<u8>,
    /// Whether the body was complete per its framing (Content-Length or final chunk).
    pub complete: bool,
}

impl Response {
    /// The first value of a header, by lowercase name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every line of a header, in order (`Set-Cookie` lines cannot be joined).
    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// Every value of a header joined by ", ".
    pub fn header_all(&self, name: &str) -> String {
        self.headers_named(name).join(", ")
    }

    /// `Cache-Status`, or an empty string.
    pub fn cache_status(&self) -> String {
        self.header_all("cache-status")
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends `GET path` for `host` with extra headers and reads the response.
pub async fn get(
    addr: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<Response> {
    request(addr, "GET", host, path, headers).await
}

/// Sends one request with `Connection: close` and reads the whole response.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<Response> {
    let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        raw.push_str(&format!("{k}: {v}\r\n"));
    }
    raw.push_str("\r\n");
    send_raw(addr, raw.as_bytes(), method == "HEAD").await
}

/// Sends raw bytes and parses whatever comes back until the connection closes.
pub async fn send_raw(addr: SocketAddr, raw: &[u8], head: bool) -> anyhow::Result<Response> {
    tokio::time::timeout(EXCHANGE_DEADLINE, async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(raw).await?;
        let mut buf = Vec::new();
        // A reset after a full response is still a response; keep what arrived.
        let _ = stream.read_to_end(&mut buf).await;
        parse(&buf, head)
    })
    .await
    .map_err(|_| anyhow::anyhow!("no complete exchange with {addr} within {EXCHANGE_DEADLINE:?}"))?
}

/// Parses one response from `buf`.
pub fn parse(buf: &[u8], head: bool) -> anyhow::Result<Response> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Response::new(&mut headers);
    let n = match parsed.parse(buf)? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => {
            anyhow::bail!("incomplete response head ({} bytes)", buf.len())
        }
    };
    let status = parsed.code.unwrap_or(0);
    let headers = crate::wire::lowercase_headers(parsed.headers);
    let rest = &buf[n..];
    let find = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let no_body = head || status == 204 || status == 304 || (100..200).contains(&status);
    let (body, complete) = if no_body {
        (Vec::new(), true)
    } else if find("transfer-encoding").is_some_and(|t| t.to_ascii_lowercase().contains("chunked"))
    {
        dechunk(rest)
    } else if let Some(len) = find("content-length").and_then(|v| v.trim().parse::<usize>().ok()) {
        let got = rest.len().min(len);
        (rest[..got].to_vec(), rest.len() >= len)
    } else {
        (rest.to_vec(), true)
    };
    Ok(Response {
        status,
        headers,
        body,
        complete,
    })
}

fn dechunk(mut rest: &[u8]) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    loop {
        let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
            return (out, false);
        };
        let size_text = String::from_utf8_lossy(&rest[..eol]);
        let Ok(size) = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
        else {
            return (out, false);
        };
        rest = &rest[eol + 2..];
        if size == 0 {
            return (out, true);
        }
        if rest.len() < size + 2 {
            out.extend_from_slice(&rest[..rest.len().min(size)]);
            return (out, false);
        }
        out.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}
