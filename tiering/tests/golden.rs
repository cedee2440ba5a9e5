//! Pins key → owner for a fixed member list, so an upgrade (of pingora-ketama, of our key
//! bytes, of anything) cannot silently reshuffle a fleet's cache. If this fails, placement
//! changed: that is a cold cache for the whole fleet. Regenerate only on purpose, with
//! `STRATUS_BLESS=1 cargo test -p stratus-tiering --test golden`, and say so in the release notes.

use std::fmt::Write;
use std::net::SocketAddr;

use stratus_tiering::{Member, Ring};

const GOLDEN: &str = "tests/golden/owners.txt";

fn members() -> Vec<Member> {
    let m = |a: &str, weight| Member {
        addr: a.parse::<SocketAddr>().expect("literal"),
        weight,
    };
    vec![
        m("10.0.0.1:8180", 1),
        m("10.0.0.2:8180", 2),
        m("10.0.0.3:8180", 1),
        m("10.0.0.4:8181", 3),
    ]
}

fn table() -> String {
    let ring = Ring::new(members()).expect("ring");
    let mut out = String::new();
    for i in 0..500 {
        // The bytes a lower node hashes: the cache key's primary string (host-framed + path).
        let key = format!("12:example.test/assets/{i}.js");
        let owner = ring.members()[ring.owner(key.as_bytes()).expect("owner")].addr;
        let _ = writeln!(out, "{key} {owner}");
    }
    out
}

#[test]
fn key_placement_is_pinned() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(GOLDEN);
    let now = table();
    if std::env::var_os("STRATUS_BLESS").is_some() {
        std::fs::write(&path, &now).expect("write golden table");
        return;
    }
    let pinned = std::fs::read_to_string(&path).expect("golden table is checked in");
    let moved: Vec<_> = pinned
        .lines()
        .zip(now.lines())
        .filter(|(a, b)| a != b)
        .take(5)
        .collect();
    assert!(
        moved.is_empty() && pinned.lines().count() == 500,
        "key placement changed: {moved:?}"
    );
}
