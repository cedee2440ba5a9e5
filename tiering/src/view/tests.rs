//! Ring and route properties: live owners, minimal movement, weighted shares, no repeats,
//! and health transitions.

use super::*;
use crate::ring::Member;
use proptest::prelude::*;
use std::net::SocketAddr;
use std::time::Duration;

fn member(i: u16, weight: u32) -> Member {
    Member {
        addr: SocketAddr::from(([10, 0, (i / 200) as u8, (i % 200) as u8 + 1], 8000 + i)),
        weight,
    }
}

fn book(weights: &[u32]) -> HealthBook {
    let members = weights
        .iter()
        .enumerate()
        .map(|(i, &w)| member(i as u16, w))
        .collect();
    HealthBook::new(Ring::new(members).expect("valid ring"), 3)
}

fn keys(n: usize) -> impl Iterator<Item = String> {
    (0..n).map(|i| format!("12:example.test/object/{i}"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// While one member is up, every key routes to a live member, and no route repeats one.
    #[test]
    fn every_key_maps_to_a_live_member(weights in prop::collection::vec(1u32..4, 1..8), down in prop::collection::vec(any::<bool>(), 8)) {
        let mut b = book(&weights);
        let now = Instant::now();
        for (id, &d) in down.iter().enumerate().take(weights.len()) {
            if d { for _ in 0..3 { b.observe(id, Outcome::ConnectFailed, now); } }
        }
        let view = b.view();
        let any_up = (0..weights.len()).any(|id| view.is_up(id));
        for k in keys(200) {
            let r = route(k.as_bytes(), &view, usize::MAX);
            prop_assert_eq!(r.hops.is_empty(), !any_up);
            prop_assert!(r.hops.iter().all(|&id| view.is_up(id)));
            let mut seen = r.hops.clone();
            seen.sort_unstable();
            seen.dedup();
            prop_assert_eq!(seen.len(), r.hops.len(), "a route repeats a member");
        }
    }

    /// Removing a member moves only its keys, about 1/n of them.
    #[test]
    fn removing_a_member_moves_only_its_keys(n in 2usize..8, removed in any::<prop::sample::Index>()) {
        let all: Vec<Member> = (0..n as u16).map(|i| member(i, 1)).collect();
        let gone = removed.index(n);
        let full = Ring::new(all.clone()).expect("ring");
        let rest: Vec<Member> = all.iter().enumerate().filter(|(i, _)| *i != gone).map(|(_, m)| *m).collect();
        let smaller = Ring::new(rest).expect("ring");
        let mut moved = 0usize;
        let total = 2000usize;
        for k in keys(total) {
            let before = full.members()[full.owner(k.as_bytes()).expect("owner")].addr;
            let after = smaller.members()[smaller.owner(k.as_bytes()).expect("owner")].addr;
            if before != after {
                prop_assert_eq!(before, all[gone].addr, "a key not owned by the removed member moved");
                moved += 1;
            }
        }
        let share = moved as f64 / total as f64;
        let expected = 1.0 / n as f64;
        prop_assert!((share - expected).abs() < expected * 0.5 + 0.03, "moved {share:.3}, expected about {expected:.3}");
    }
}

/// Weights shift shares proportionally: within ±30% of the weighted share for 20 000 keys.
#[test]
fn weights_shift_shares_proportionally() {
    for weights in [[1u32, 1, 1], [1, 2, 1], [1, 3, 6], [5, 1, 2]] {
        let ring = Ring::new(
            weights
                .iter()
                .enumerate()
                .map(|(i, &w)| member(i as u16, w))
                .collect(),
        )
        .expect("ring");
        let mut counts = [0usize; 3];
        let total = 20_000;
        for k in keys(total) {
            counts[ring.owner(k.as_bytes()).expect("owner")] += 1;
        }
        let sum: u32 = weights.iter().sum();
        for (i, &w) in weights.iter().enumerate() {
            let want = f64::from(w) / f64::from(sum);
            let got = counts[i] as f64 / total as f64;
            assert!(
                (got - want).abs() <= want * 0.30,
                "weights {weights:?}: member {i} got {got:.3}, want {want:.3}"
            );
        }
    }
}

#[test]
fn health_needs_threshold_failures_and_a_probe_to_return() {
    let mut b = book(&[1, 1]);
    let t0 = Instant::now();
    assert!(!b.observe(0, Outcome::ConnectFailed, t0));
    assert!(
        !b.observe(0, Outcome::Answered, t0),
        "a success resets the count"
    );
    assert!(!b.observe(0, Outcome::TimedOut, t0));
    assert!(!b.observe(0, Outcome::Reset, t0));
    assert!(
        b.observe(0, Outcome::MemberError, t0),
        "third consecutive failure marks it down"
    );
    assert!(!b.view().is_up(0));
    assert!(
        !b.observe(0, Outcome::Answered, t0 + Duration::from_secs(1)),
        "only a probe brings it back"
    );
    assert!(!b.probed(0, false, t0 + Duration::from_secs(2)));
    let before = b.view().version();
    assert!(b.probed(0, true, t0 + Duration::from_secs(3)));
    assert!(b.view().is_up(0));
    assert!(b.view().version() > before);
    assert!(
        !b.observe(9, Outcome::Reset, t0),
        "unknown members are ignored"
    );
}

#[test]
fn bad_rings_are_refused_not_panics() {
    assert!(
        Ring::new(vec![member(0, 0)]).is_err(),
        "weight 0 (pingora #1006)"
    );
    assert!(
        Ring::new(vec![member(0, 1), member(0, 2)]).is_err(),
        "duplicate member"
    );
    let empty = Ring::new(vec![]).expect("empty ring");
    assert_eq!(empty.owner(b"k"), None);
    assert!(empty.successors(b"k").is_empty());
}
