//! Encode → decode is the identity; any alteration, wrong secret, truncation, oversize, age
//! outside the window, another recipient or an issue time before the node started is refused;
//! each attempt's context is fresh and a generated mark is bound to its context.

use super::*;
use proptest::prelude::*;

fn secret(b: u8) -> FleetSecret {
    FleetSecret::new(vec![b; 32])
}

fn line<'a>(method: &'a str, target: &'a str) -> RequestLine<'a> {
    RequestLine { method, target }
}

fn at(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

const ME: &str = "up-1";

fn identities() -> Vec<String> {
    vec![ME.to_string(), "127.0.0.1:8180".to_string()]
}

/// Decodes as the upper `up-1`, started at time 0.
fn decode_at(
    v: &str,
    s: &FleetSecret,
    l: RequestLine<'_>,
    now: SystemTime,
) -> Result<ControlContext, ContextError> {
    let ids = identities();
    let keys = Keyring::from(s.clone());
    let acceptor = Acceptor {
        keys: &keys,
        identities: &ids,
        not_before: at(0),
    };
    ControlContext::decode(v, &acceptor, l, now)
}

fn field() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9._:-]{1,60}"
}

fn any_ctx() -> impl Strategy<Value = (ControlContext, u64)> {
    (
        field(),
        "[0-9a-f]{32}",
        "[0-9a-f]{32}",
        field(),
        1_000_000u64..4_000_000_000_000,
        any::<u128>(),
    )
        .prop_map(|(host, key, id, sender, issued, nonce)| {
            (
                RequestIdentity::new(host, key, id, sender).issue(ME, nonce, at(issued)),
                issued,
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn encode_then_decode_is_identity((ctx, issued) in any_ctx(), target in "/[a-z0-9/?=&]{0,40}", delay in 0u64..10_000) {
        let s = secret(7);
        let v = ctx.encode(&s, line("GET", &target));
        prop_assert!(v.len() <= MAX_ENCODED_LEN);
        let back = decode_at(&v, &s, line("GET", &target), at(issued + delay)).map(|mut c| {
            assert_eq!(c.key_id(), s.id(), "verified with the key it was signed with");
            c.key_id.clear();
            c
        });
        prop_assert_eq!(back, Ok(ctx));
    }

    #[test]
    fn a_flipped_bit_is_always_refused((ctx, issued) in any_ctx(), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let s = secret(7);
        let mut bytes = ctx.encode(&s, line("GET", "/x")).into_bytes();
        let i = pos.index(bytes.len());
        bytes[i] ^= 1 << bit;
        let altered = String::from_utf8_lossy(&bytes).into_owned();
        prop_assert!(decode_at(&altered, &s, line("GET", "/x"), at(issued)).is_err());
    }

    #[test]
    fn wrong_secret_or_other_request_line_is_refused((ctx, issued) in any_ctx(), other in 0u8..255) {
        prop_assume!(other != 7);
        let v = ctx.encode(&secret(7), line("GET", "/x"));
        prop_assert_eq!(decode_at(&v, &secret(other), line("GET", "/x"), at(issued)), Err(ContextError::UnknownKey));
        // Another secret presented under this key's id: the tag still does not match.
        let forged = format!("{}{}", secret(7).id(), &ctx.encode(&secret(other), line("GET", "/x"))[KEY_ID_LEN..]);
        prop_assert_eq!(decode_at(&forged, &secret(7), line("GET", "/x"), at(issued)), Err(ContextError::BadSignature));
        prop_assert_eq!(decode_at(&v, &secret(7), line("GET", "/y"), at(issued)), Err(ContextError::BadSignature));
        prop_assert_eq!(decode_at(&v, &secret(7), line("HEAD", "/x"), at(issued)), Err(ContextError::BadSignature));
    }

    #[test]
    fn truncated_is_refused((ctx, issued) in any_ctx(), cut in any::<prop::sample::Index>()) {
        let s = secret(7);
        let v = ctx.encode(&s, line("GET", "/x"));
        let n = cut.index(v.len());
        prop_assert!(decode_at(&v[..n], &s, line("GET", "/x"), at(issued)).is_err());
    }

    #[test]
    fn arbitrary_input_is_refused_never_a_panic(junk in "[ -~]{0,1100}", now in any::<u64>()) {
        let r = decode_at(&junk, &secret(7), line("GET", "/"), at(now % 4_000_000_000_000));
        prop_assert!(r.is_err());
    }

    #[test]
    fn oversized_is_refused(junk in "[A-Za-z0-9_.-]{1025,3000}") {
        prop_assert_eq!(decode_at(&junk, &secret(7), line("GET", "/"), at(0)), Err(ContextError::TooLarge));
    }

    #[test]
    fn outside_the_age_window_is_refused((ctx, issued) in any_ctx(), late in 10_001u64..1_000_000, early in 2_001u64..1_000_000) {
        let s = secret(7);
        let v = ctx.encode(&s, line("GET", "/x"));
        prop_assert_eq!(decode_at(&v, &s, line("GET", "/x"), at(issued + late)), Err(ContextError::Expired));
        prop_assert_eq!(decode_at(&v, &s, line("GET", "/x"), at(issued - early)), Err(ContextError::FromFuture));
    }
}

#[test]
fn debug_never_prints_the_secret() {
    let shown = format!("{:?}", secret(b'z'));
    assert_eq!(shown, format!("FleetSecret({})", secret(b'z').id()));
    assert!(!shown.contains("zzzz"));
}

#[test]
fn key_ids_name_secrets_the_same_everywhere_and_differ_between_them() {
    assert_eq!(secret(1).id(), FleetSecret::new(vec![1; 32]).id());
    assert_ne!(secret(1).id(), secret(2).id());
    assert_eq!(secret(1).id().len(), KEY_ID_LEN);
    assert!(secret(1).id().bytes().all(|b| b.is_ascii_hexdigit()));
}

/// A rotation: while the old secret is still accepted, a node signing with the new one is
/// understood by a node that signs with the old one and accepts the new, and the other way
/// round; once the old one is dropped its contexts are refused by key id.
#[test]
fn a_rotation_keeps_both_directions_working_until_the_old_secret_is_dropped() {
    let (old, new) = (secret(1), secret(2));
    let ids = identities();
    let ctx = RequestIdentity::new("h", "k", "r", "n").issue(ME, 1, at(5_000));
    let by_old = ctx.encode(&old, line("GET", "/"));
    let by_new = ctx.encode(&new, line("GET", "/"));
    let decode = |v: &str, keys: &Keyring| {
        let acceptor = Acceptor {
            keys,
            identities: &ids,
            not_before: at(0),
        };
        ControlContext::decode(v, &acceptor, line("GET", "/"), at(5_000))
    };
    let adding = Keyring::new(old.clone(), [new.clone()]);
    let switched = Keyring::new(new.clone(), [old.clone()]);
    let done = Keyring::from(new.clone());
    for keys in [&adding, &switched] {
        assert!(decode(&by_old, keys).is_ok());
        assert!(decode(&by_new, keys).is_ok());
    }
    assert!(decode(&by_new, &done).is_ok());
    assert_eq!(decode(&by_old, &done), Err(ContextError::UnknownKey));
    // An upper marks with the key the context came with; the sender reads it either way.
    let received = decode(&by_old, &switched).expect("accepted");
    assert_eq!(received.key_id(), old.id());
    let mark = received.mark(&switched, Blame::Origin, "read-timeout");
    assert!(ctx.read_mark(&adding, &mark).is_some());
    assert_eq!(ctx.read_mark(&done, &mark), None);
}

#[test]
fn hops_beyond_the_limit_are_a_loop() {
    let s = secret(1);
    let mut ctx = RequestIdentity::new("h", "k", "r", "n").issue(ME, 1, at(5_000));
    ctx.hops = MAX_HOPS + 1;
    let v = ctx.encode(&s, line("GET", "/"));
    assert_eq!(
        decode_at(&v, &s, line("GET", "/"), at(5_000)),
        Err(ContextError::TooManyHops)
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Each attempt's context is fresh: a new nonce and issue time, the same request.
    #[test]
    fn every_attempt_gets_a_fresh_context(a in any::<u128>(), b in any::<u128>(), t in 1_000u64..1_000_000_000) {
        prop_assume!(a != b);
        let id = RequestIdentity::new("example.test", "abc", "r1", "edge-1");
        let first = id.issue(ME, a, at(t));
        let second = id.issue(ME, b, at(t + 10_000));
        prop_assert_ne!(first.nonce(), second.nonce());
        prop_assert_eq!(first.request_id(), second.request_id());
        prop_assert_eq!(second.issued_at(), at(t + 10_000));
    }

    /// A context addressed to one member is refused by every other, and by this one for an
    /// issue time before it started (a replay across a restart).
    #[test]
    fn bound_to_its_recipient_and_to_the_node_lifetime((ctx, issued) in any_ctx(), other in "up-[2-9]|10\\.0\\.0\\.[0-9]:80") {
        let s = secret(7);
        let v = ctx.encode(&s, line("GET", "/x"));
        let ids = vec![other];
        let keys = Keyring::from(s.clone());
        let elsewhere = Acceptor { keys: &keys, identities: &ids, not_before: at(0) };
        prop_assert_eq!(ControlContext::decode(&v, &elsewhere, line("GET", "/x"), at(issued)), Err(ContextError::WrongRecipient));
        let ids = identities();
        let restarted = Acceptor { keys: &keys, identities: &ids, not_before: at(issued + 1) };
        prop_assert_eq!(ControlContext::decode(&v, &restarted, line("GET", "/x"), at(issued + 2)), Err(ContextError::BeforeStart));
    }

    /// A mark verifies only with the context it answers: another nonce, another blame, another
    /// detail or a made-up tag is not a mark.
    #[test]
    fn marks_are_bound_to_their_context(a in any::<u128>(), b in any::<u128>(), detail in "[a-z-]{1,30}", junk in "[ -~]{0,80}") {
        prop_assume!(a != b);
        let s = Keyring::from(secret(7));
        let id = RequestIdentity::new("example.test", "abc", "r1", "edge-1");
        let (mine, other) = (id.issue(ME, a, at(5)), id.issue(ME, b, at(5)));
        for blame in Blame::ALL {
            let m = mine.mark(&s, blame, &detail);
            prop_assert_eq!(mine.read_mark(&s, &m), Some(GeneratedMark { blame, detail: detail.clone() }));
            prop_assert_eq!(other.read_mark(&s, &m), None);
            prop_assert_eq!(mine.read_mark(&Keyring::from(secret(8)), &m), None);
            let swapped = m.replacen(blame.as_str(), if blame == Blame::Origin { "member" } else { "origin" }, 1);
            prop_assert_eq!(mine.read_mark(&s, &swapped), None);
        }
        prop_assert_eq!(mine.read_mark(&s, &junk), None);
    }
}
