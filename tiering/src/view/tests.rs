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
    HealthBook::new(Ring::new(members).expect("valid ring"), 3, 2)
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
            if d { for _ in 0..3 { b.observe(id, Outcome::ConnectFailed, now, now); } }
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
fn health_needs_threshold_failures_and_ready_probes_to_return() {
    let mut b = book(&[1, 1]);
    let t0 = Instant::now();
    let s = |secs: u64| t0 + Duration::from_secs(secs);
    assert!(!b.observe(0, Outcome::ConnectFailed, t0, t0));
    assert!(
        !b.observe(0, Outcome::Answered, t0, t0),
        "a success resets the count"
    );
    assert!(!b.observe(0, Outcome::TimedOut, t0, t0));
    assert!(!b.observe(0, Outcome::Reset, t0, t0));
    assert!(
        b.observe(0, Outcome::MemberError, t0, t0),
        "third consecutive failure marks it down"
    );
    assert!(!b.view().is_up(0));
    assert!(matches!(
        b.view().health(0),
        Some(Health::Down {
            reason: DownReason::Requests(Outcome::MemberError),
            ..
        })
    ));
    assert!(
        !b.observe(0, Outcome::Answered, s(1), s(1)),
        "only a probe brings it back"
    );
    let refused = Probe::Failed(ProbeFailure::Status(403));
    assert!(!b.probed(0, refused, s(2)));
    assert_eq!(
        b.view().health(0).map(|h| match h {
            Health::Down { reason, .. } => reason.to_string(),
            Health::Up { .. } => "up".into(),
        }),
        Some("probe failed: status 403".to_string()),
        "/ring says why"
    );
    let before = b.view().version();
    assert!(
        !b.probed(0, Probe::Ready, s(3)),
        "one ready probe is not enough (rise 2)"
    );
    assert!(!b.probed(0, refused, s(4)), "a failure restarts the count");
    assert!(!b.probed(0, Probe::Ready, s(5)));
    assert!(b.probed(0, Probe::Ready, s(6)));
    assert!(b.view().is_up(0));
    assert!(b.view().version() > before);
    for _ in 0..3 {
        assert!(
            !b.observe(0, Outcome::TimedOut, s(4), s(7)),
            "failures of attempts that began before the return do not eject it again"
        );
    }
    assert!(b.view().is_up(0));
    assert!(
        !b.observe(9, Outcome::Reset, t0, t0),
        "unknown members are ignored"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Whatever sequence of outcomes and probes arrives, a member goes down only after
    /// `threshold` consecutive failures and comes back only after `rise` ready probes in a row.
    #[test]
    fn transitions_follow_threshold_and_rise(events in prop::collection::vec((any::<bool>(), any::<bool>()), 1..200)) {
        let mut b = book(&[1]);
        let t0 = Instant::now();
        let (mut fails, mut readies) = (0u32, 0u32);
        for (i, (is_probe, ok)) in events.into_iter().enumerate() {
            let now = t0 + Duration::from_millis(i as u64 * 10);
            let was_up = b.view().is_up(0);
            let changed = if is_probe {
                b.probed(0, if ok { Probe::Ready } else { Probe::Failed(ProbeFailure::TimedOut) }, now)
            } else {
                b.observe(0, if ok { Outcome::Answered } else { Outcome::Reset }, now, now)
            };
            if was_up {
                fails = if ok { 0 } else { fails + 1 };
                prop_assert_eq!(changed, fails >= 3);
                if changed { fails = 0; readies = 0; }
            } else if is_probe {
                readies = if ok { readies + 1 } else { 0 };
                prop_assert_eq!(changed, readies >= 2);
                if changed { readies = 0; }
            } else {
                prop_assert!(!changed, "requests never bring a member back");
            }
        }
    }
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

#[test]
fn a_reload_keeps_the_health_of_members_that_stay() {
    let mut b = book(&[1, 1, 1]);
    let t0 = Instant::now();
    for _ in 0..3 {
        b.observe(1, Outcome::ConnectFailed, t0, t0);
    }
    assert!(!b.view().is_up(1));
    let before = b.view().version();
    // Member 1 moves to the front with a new weight, member 0 leaves, member 7 joins.
    let ring = Ring::new(vec![member(1, 3), member(7, 1), member(2, 1)]).expect("ring");
    b.reconfigure(ring, 5, 4);
    let v = b.view();
    assert!(v.version() > before, "a reload publishes a new version");
    assert_eq!(v.members().len(), 3);
    assert!(
        !v.is_up(0),
        "a down member stays down across a reload, wherever it moved"
    );
    assert!(v.is_up(1), "a new member starts up");
    assert!(v.is_up(2));
    assert_eq!(b.member_id(member(1, 1).addr), Some(0));
    assert_eq!(
        b.member_id(member(0, 1).addr),
        None,
        "a removed member is gone"
    );
    // The new thresholds apply: 4 ready probes bring the kept member back, not 2.
    for i in 0..3 {
        assert!(!b.probed(0, Probe::Ready, t0 + Duration::from_secs(i)));
    }
    assert!(b.probed(0, Probe::Ready, t0 + Duration::from_secs(4)));
    // And 5 failures mark one down, not 3.
    for _ in 0..4 {
        assert!(!b.observe(2, Outcome::ConnectFailed, t0, t0));
    }
    assert!(b.observe(2, Outcome::ConnectFailed, t0, t0));
}
