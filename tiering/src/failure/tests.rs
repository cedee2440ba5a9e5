//! Every combination of hop, stage, symptom and flags: who is blamed, what health hears,
//! and whether a retry follows.

use super::*;
use proptest::prelude::*;

const HOPS: [HopKind; 2] = [HopKind::Upper, HopKind::Origin];
const STAGES: [Stage; 4] = [
    Stage::Connect,
    Stage::RelayRequestBody,
    Stage::AwaitHeaders,
    Stage::ReadBody,
];
const SYMPTOMS: [Symptom; 9] = [
    Symptom::ConnectFailed,
    Symptom::TimedOut,
    Symptom::Reset,
    Symptom::InvalidResponse,
    Symptom::ClientGone,
    Symptom::Internal,
    Symptom::Marked(Blame::Member),
    Symptom::Marked(Blame::Origin),
    Symptom::Marked(Blame::Request),
];

fn failure() -> impl Strategy<Value = Failure> {
    (
        prop::sample::select(HOPS.to_vec()),
        prop::sample::select(STAGES.to_vec()),
        prop::sample::select(SYMPTOMS.to_vec()),
        any::<[bool; 4]>(),
    )
        .prop_map(|(hop, stage, symptom, [h, r, p, l])| Failure {
            hop,
            stage,
            symptom,
            headers_sent: h,
            reused_connection: r,
            replayable: p,
            hops_left: l,
        })
}

/// Every one of the 2 × 4 × 9 × 16 inputs.
fn every_failure() -> Vec<Failure> {
    let mut all = Vec::new();
    for hop in HOPS {
        for stage in STAGES {
            for symptom in SYMPTOMS {
                for bits in 0u8..16 {
                    all.push(Failure {
                        hop,
                        stage,
                        symptom,
                        headers_sent: bits & 1 != 0,
                        reused_connection: bits & 2 != 0,
                        replayable: bits & 4 != 0,
                        hops_left: bits & 8 != 0,
                    });
                }
            }
        }
    }
    all
}

fn check(f: &Failure) -> Result<(), TestCaseError> {
    let v = decide(f);
    // Health hears only about a member that failed by itself.
    prop_assert_eq!(
        v.health.is_some(),
        v.blame == Party::Member && f.hop == HopKind::Upper
    );
    // A client's abort, stalled body or bad request never counts and never fails over.
    if f.symptom == Symptom::ClientGone || f.symptom == Symptom::Marked(Blame::Request) {
        prop_assert_eq!(v.blame, Party::Client);
        prop_assert!(v.health.is_none() && !v.retry);
    }
    if f.hop == HopKind::Upper
        && f.stage == Stage::RelayRequestBody
        && f.symptom == Symptom::TimedOut
    {
        prop_assert_eq!(v.blame, Party::Client);
    }
    // What the origin did never reaches member health, and never moves the request to
    // another member (the next one has the same origin).
    if f.symptom == Symptom::Marked(Blame::Origin) || f.hop == HopKind::Origin {
        prop_assert!(v.health.is_none());
    }
    if v.blame == Party::Origin || v.blame == Party::Undetermined {
        prop_assert!(!v.retry);
    }
    // Only a failed hop (or a stale pooled connection) is retried.
    if v.retry {
        prop_assert!(matches!(v.blame, Party::Member | Party::Node));
    }
    // Never a retry once the client has headers, or with nothing left, or mid-body.
    if f.headers_sent || !f.hops_left || f.stage == Stage::ReadBody {
        prop_assert!(!v.retry);
    }
    // A request that cannot be resent is retried only when nothing was sent.
    if v.retry && !f.replayable {
        prop_assert_eq!(f.stage, Stage::Connect);
    }
    // A member that cannot be reached always counts, whatever the client does.
    if f.hop == HopKind::Upper
        && f.stage == Stage::Connect
        && matches!(f.symptom, Symptom::ConnectFailed | Symptom::TimedOut)
    {
        prop_assert_eq!(v.blame, Party::Member);
        prop_assert!(v.health.is_some());
        prop_assert_eq!(v.retry, !f.headers_sent && f.hops_left);
    }
    // A body cut short blames nobody: it may be the member's origin.
    if f.stage == Stage::ReadBody
        && f.hop == HopKind::Upper
        && matches!(f.symptom, Symptom::Reset | Symptom::TimedOut)
    {
        prop_assert!(v.health.is_none());
    }
    Ok(())
}

#[test]
fn every_combination_obeys_the_rules() {
    let all = every_failure();
    assert_eq!(all.len(), 2 * 4 * 9 * 16);
    for f in &all {
        if let Err(e) = check(f) {
            panic!("{f:?}: {e}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn decisions_obey_the_rules(f in failure()) {
        check(&f)?;
    }

    /// The decision depends on its inputs only: the same failure, the same verdict.
    #[test]
    fn decisions_are_deterministic(f in failure()) {
        prop_assert_eq!(decide(&f), decide(&f));
    }
}

#[test]
fn the_integrity_table() {
    let base = Failure {
        hop: HopKind::Upper,
        stage: Stage::AwaitHeaders,
        symptom: Symptom::TimedOut,
        headers_sent: false,
        reused_connection: false,
        replayable: true,
        hops_left: true,
    };
    // A hung member: blamed, next member tried.
    let v = decide(&base);
    assert_eq!(
        (v.blame, v.health, v.retry),
        (Party::Member, Some(Outcome::TimedOut), true)
    );
    // A client that stalls its POST body: not the member.
    let stalled = Failure {
        stage: Stage::RelayRequestBody,
        replayable: false,
        ..base
    };
    assert_eq!(decide(&stalled).blame, Party::Client);
    assert_eq!(decide(&stalled).health, None);
    // An upper's signed 504 about its origin: the member worked.
    let origin_slow = Failure {
        symptom: Symptom::Marked(Blame::Origin),
        ..base
    };
    assert_eq!(decide(&origin_slow).health, None);
    assert!(!decide(&origin_slow).retry);
    // A stale pooled connection: retried elsewhere, nobody blamed.
    let pooled = Failure {
        symptom: Symptom::Reset,
        reused_connection: true,
        ..base
    };
    assert_eq!(
        (decide(&pooled).blame, decide(&pooled).retry),
        (Party::Node, true)
    );
}
