//! Encode → decode is the identity; any alteration, wrong secret, truncation, oversize or age
//! outside the window is refused.

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
    )
        .prop_map(|(host, key, id, sender, issued)| {
            (
                ControlContext::new(host, key, id, sender, at(issued)),
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
        let back = ControlContext::decode(&v, &s, line("GET", &target), at(issued + delay));
        prop_assert_eq!(back, Ok(ctx));
    }

    #[test]
    fn a_flipped_bit_is_always_refused((ctx, issued) in any_ctx(), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let s = secret(7);
        let mut bytes = ctx.encode(&s, line("GET", "/x")).into_bytes();
        let i = pos.index(bytes.len());
        bytes[i] ^= 1 << bit;
        let altered = String::from_utf8_lossy(&bytes).into_owned();
        prop_assert!(ControlContext::decode(&altered, &s, line("GET", "/x"), at(issued)).is_err());
    }

    #[test]
    fn wrong_secret_or_other_request_line_is_refused((ctx, issued) in any_ctx(), other in 0u8..255) {
        prop_assume!(other != 7);
        let v = ctx.encode(&secret(7), line("GET", "/x"));
        prop_assert_eq!(ControlContext::decode(&v, &secret(other), line("GET", "/x"), at(issued)), Err(ContextError::BadSignature));
        prop_assert_eq!(ControlContext::decode(&v, &secret(7), line("GET", "/y"), at(issued)), Err(ContextError::BadSignature));
        prop_assert_eq!(ControlContext::decode(&v, &secret(7), line("HEAD", "/x"), at(issued)), Err(ContextError::BadSignature));
    }

    #[test]
    fn truncated_is_refused((ctx, issued) in any_ctx(), cut in any::<prop::sample::Index>()) {
        let s = secret(7);
        let v = ctx.encode(&s, line("GET", "/x"));
        let n = cut.index(v.len());
        prop_assert!(ControlContext::decode(&v[..n], &s, line("GET", "/x"), at(issued)).is_err());
    }

    #[test]
    fn arbitrary_input_is_refused_never_a_panic(junk in "[ -~]{0,1100}", now in any::<u64>()) {
        let r = ControlContext::decode(&junk, &secret(7), line("GET", "/"), at(now % 4_000_000_000_000));
        prop_assert!(r.is_err());
    }

    #[test]
    fn oversized_is_refused(junk in "[A-Za-z0-9_.-]{1025,3000}") {
        prop_assert_eq!(ControlContext::decode(&junk, &secret(7), line("GET", "/"), at(0)), Err(ContextError::TooLarge));
    }

    #[test]
    fn outside_the_age_window_is_refused((ctx, issued) in any_ctx(), late in 10_001u64..1_000_000, early in 2_001u64..1_000_000) {
        let s = secret(7);
        let v = ctx.encode(&s, line("GET", "/x"));
        prop_assert_eq!(ControlContext::decode(&v, &s, line("GET", "/x"), at(issued + late)), Err(ContextError::Expired));
        prop_assert_eq!(ControlContext::decode(&v, &s, line("GET", "/x"), at(issued - early)), Err(ContextError::FromFuture));
    }
}

#[test]
fn debug_never_prints_the_secret() {
    assert_eq!(format!("{:?}", secret(b'z')), "FleetSecret(..)");
}

#[test]
fn hops_beyond_the_limit_are_a_loop() {
    let s = secret(1);
    let mut ctx = ControlContext::new("h", "k", "r", "n", at(5_000));
    ctx.hops = MAX_HOPS + 1;
    let v = ctx.encode(&s, line("GET", "/"));
    assert_eq!(
        ControlContext::decode(&v, &s, line("GET", "/"), at(5_000)),
        Err(ContextError::TooManyHops)
    );
}
