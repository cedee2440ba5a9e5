//! Read-only facts about a request that observers may see. Plain borrowed data: no header
//! maps, no interior mutability, nothing that can reach back into the request.

use std::time::Duration;

/// What kind of upstream an attempt went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamKind {
    /// An upper-tier stratus node.
    Upper,
    /// The origin.
    Origin,
}

impl UpstreamKind {
    /// The `stratus.upstream.kind` value.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamKind::Upper => "upper",
            UpstreamKind::Origin => "origin",
        }
    }
}

/// What a SERVER span describes: the request as this node received it.
#[derive(Debug, Clone, Copy)]
pub struct RequestFacts<'a> {
    /// `node.name`.
    pub node: &'a str,
    /// `lower` or `upper`.
    pub tier: &'a str,
    /// Request method.
    pub method: &'a str,
    /// Path without query.
    pub path: &'a str,
    /// Query without `?`, if any.
    pub query: Option<&'a str>,
    /// Host the request is for.
    pub host: Option<&'a str>,
    /// The request id stratus assigned (or received in the control context).
    pub request_id: Option<&'a str>,
}

/// What a CLIENT span describes: one upstream attempt.
#[derive(Debug, Clone, Copy)]
pub struct AttemptFacts<'a> {
    /// Upper node or origin.
    pub kind: UpstreamKind,
    /// 1 for the first attempt of a request, 2 for the first failover, …
    pub attempt: u32,
    /// Request method sent upstream.
    pub method: &'a str,
    /// Host or address the attempt connects to.
    pub server_address: &'a str,
    /// Port it connects to.
    pub server_port: u16,
    /// `http://host/path?query` as sent.
    pub url_full: &'a str,
}

/// What ends a SERVER span: the response as it left this node.
#[derive(Debug, Clone, Copy)]
pub struct ResponseFacts<'a> {
    /// Status sent to the client (0: the connection was aborted).
    pub status: u16,
    /// This node's `Cache-Status` entry.
    pub cache_status: &'a str,
    /// How long the request waited on another request's fill.
    pub lock_wait: Option<Duration>,
    /// Error type when stratus generated the response or the connection failed.
    pub error: Option<&'a str>,
}
