//! Helpers shared by the fleet test binaries (included with `#[path]`; not a test of its own).

use std::time::SystemTime;

use stratus_tiering::{FleetSecret, RequestIdentity, RequestLine};

/// A `stratus-ctx` value as a lower (or a leak) would send it: for `GET path` on `host`,
/// addressed to `recipient`, issued at `issued`, signed with `secret`, with a fresh nonce.
pub fn signed_context(
    host: &str,
    path: &str,
    recipient: &str,
    secret: &str,
    issued: SystemTime,
) -> String {
    let key =
        pingora_cache::key::CacheHashKey::primary(&stratus_node::policy::cache_key(host, path));
    RequestIdentity::new(
        host,
        key,
        format!("{:032x}", rand::random::<u128>()),
        "edge-x",
    )
    .issue(recipient, rand::random(), issued)
    .encode(
        &FleetSecret::new(secret.as_bytes().to_vec()),
        RequestLine {
            method: "GET",
            target: path,
        },
    )
}
