//! The admin API on `admin_listen`: health, metrics, ring view and purge.
//!
//! A separate listener so operators can firewall it apart from client traffic. Served by
//! pingora's `ServeHttp` app; every answer is built whole (they are small).

use std::sync::Arc;

use async_trait::async_trait;
use bytes::BytesMut;
use http::{Method, Response, StatusCode};
use pingora_cache::key::CacheHashKey;
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use serde_json::json;

use crate::config::{Config, Live};
use crate::metrics::Metrics;
use crate::policy;
use crate::store::Store;
use crate::tier::Tier;
use stratus_tiering::Health;

/// Purge bodies are one small JSON object.
const MAX_ADMIN_BODY: usize = 64 * 1024;

/// The admin application.
pub struct Admin {
    config: Live,
    store: &'static Store,
    metrics: Arc<Metrics>,
    tier: Option<Arc<Tier>>,
}

impl Admin {
    /// The admin API of one node.
    pub fn new(
        config: Live,
        store: &'static Store,
        metrics: Arc<Metrics>,
        tier: Option<Arc<Tier>>,
    ) -> Admin {
        Admin {
            config,
            store,
            metrics,
            tier,
        }
    }

    /// The configuration in force.
    fn config(&self) -> arc_swap::Guard<Arc<Config>> {
        self.config.load()
    }

    fn authorized(&self, session: &ServerSession) -> bool {
        let Some(token) = &self.config().admin.token else {
            return true;
        };
        let presented = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        constant_time_eq(presented.as_bytes(), token.as_bytes())
    }

    fn ring(&self) -> Response<Vec<u8>> {
        let upper: Vec<_> = match &self.tier {
            Some(tier) => {
                let view = tier.view();
                view.members()
                    .iter()
                    .enumerate()
                    .map(|(id, m)| {
                        let health = match view.health(id) {
                            Some(Health::Up { failures }) => json!({"state": "up", "recent_failures": failures}),
                            Some(Health::Down { since, reason, successes }) => json!({
                                "state": "down",
                                "down_for_ms": since.elapsed().as_millis() as u64,
                                "reason": reason.to_string(),
                                "ready_probes": successes,
                            }),
                            None => json!({"state": "unknown"}),
                        };
                        json!({"addr": m.addr.to_string(), "name": tier.recipient(m.addr), "weight": m.weight, "health": health})
                    })
                    .collect()
            }
            None => Vec::new(),
        };
        json_response(
            StatusCode::OK,
            &json!({
                "node": self.config().node.name,
                "role": self.config().node.role.as_str(),
                "upper": upper,
            }),
        )
    }

    /// Removes every variant of one URL from every node that may hold it: on a lower node,
    /// every upper member first (failover copies too, down members included), then this node,
    /// so no lower refills from an upper that still holds the old copy.
    async fn purge(&self, body: &[u8]) -> Response<Vec<u8>> {
        let url = match serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get("url").and_then(|u| u.as_str()).map(str::to_string))
        {
            Some(url) => url,
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "body must be {\"url\": \"http://host/path\"}",
                )
            }
        };
        let Some((host, path)) = split_url(&url) else {
            return error(
                StatusCode::BAD_REQUEST,
                "url must be absolute: http://host/path",
            );
        };
        let mut results = Vec::new();
        if let Some(tier) = self.tier.as_deref().filter(|t| t.has_upper()) {
            let view = tier.view();
            let purges = view
                .members()
                .iter()
                .map(|m| tier.purge_member(m.addr, &host, &path));
            results = futures::future::join_all(purges).await;
        }
        let primary = policy::cache_key(&host, &path).primary_bin();
        let purged = self.store.purge_primary(primary);
        results.push(json!({
            "node": self.config().node.name,
            "outcome": if purged { "purged" } else { "not_found" },
        }));
        json_response(StatusCode::OK, &json!({ "url": url, "results": results }))
    }
}

use crate::policy::split_url;

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn response(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut r = Response::new(body);
    *r.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    let len = r.body().len();
    r.headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    r
}

fn json_response(status: StatusCode, v: &serde_json::Value) -> Response<Vec<u8>> {
    let mut body = serde_json::to_vec_pretty(v).unwrap_or_default();
    body.push(b'\n');
    response(status, "application/json", body)
}

fn error(status: StatusCode, message: &str) -> Response<Vec<u8>> {
    json_response(status, &json!({ "error": message }))
}

async fn read_body(session: &mut ServerSession) -> Result<Vec<u8>, &'static str> {
    let mut body = BytesMut::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_ADMIN_BODY {
                    return Err("body too large");
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body.to_vec()),
            Err(_) => return Err("could not read body"),
        }
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        match (method, path.as_str()) {
            (Method::GET, "/healthz") => response(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            (Method::GET, "/metrics" | "/ring")
                if self.config().admin.guard_reads && !self.authorized(session) =>
            {
                error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token")
            }
            (Method::GET, "/metrics") => response(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                self.metrics.render(self.store).into_bytes(),
            ),
            (Method::GET, "/ring") => self.ring(),
            (Method::POST, "/purge") => {
                if !self.authorized(session) {
                    return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
                }
                match read_body(session).await {
                    Ok(body) => self.purge(&body).await,
                    Err(why) => error(StatusCode::BAD_REQUEST, why),
                }
            }
            (_, "/healthz" | "/metrics" | "/ring" | "/purge") => {
                error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
            }
            _ => error(StatusCode::NOT_FOUND, "no such endpoint"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purge_urls_normalise_like_requests() {
        assert_eq!(
            split_url("http://Example.test:8080/a?b"),
            Some(("example.test".into(), "/a?b".into()))
        );
        assert_eq!(split_url("example.test/a"), None);
        assert_eq!(split_url("ftp://example.test/a"), None);
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
