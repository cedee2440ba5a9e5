//! Reading one HTTP/1.1 request off a connection, shared by the test origin and the test
//! collector (both must see exactly what arrived, including duplicates).

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::origin::SeenRequest;

/// Upper bound on a request head.
const MAX_HEAD: usize = 64 * 1024;
/// Upper bound on a request body (OTLP batches are far smaller).
const MAX_BODY: usize = 16 * 1024 * 1024;

/// Header fields in order, names lowercased, values as (lossy) text: what a test compares.
pub(crate) fn lowercase_headers(headers: &[httparse::Header<'_>]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect()
}

/// Reads one request (head, then a `Content-Length` body) from `stream`, keeping what follows
/// in `buf`. `None` when the peer closed or sent something malformed or oversized.
pub(crate) async fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Option<(SeenRequest, Vec<u8>)> {
    let (req, head_len, body_len) = loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(buf) {
            Ok(httparse::Status::Complete(n)) => {
                let headers = lowercase_headers(parsed.headers);
                let body_len = headers
                    .iter()
                    .find(|(k, _)| k == "content-length")
                    .and_then(|(_, v)| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                let req = SeenRequest {
                    method: parsed.method.unwrap_or("").to_string(),
                    path: parsed.path.unwrap_or("").to_string(),
                    headers,
                };
                break (req, n, body_len.min(MAX_BODY));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            _ => return None,
        }
        let mut chunk = [0u8; 8192];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    while buf.len() < head_len + body_len {
        let mut chunk = [0u8; 65536];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body = buf.drain(..head_len + body_len).skip(head_len).collect();
    Some((req, body))
}
