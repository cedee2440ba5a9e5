//! The store against a model: what a lookup may return, capacity, and abandoned fills.

use super::*;
use pingora_http::ResponseHeader;
use proptest::prelude::*;
use std::collections::HashMap;

fn meta(fresh_for: Duration) -> CacheMeta {
    let now = SystemTime::now();
    let header = ResponseHeader::build(200, None).expect("static header");
    CacheMeta::new(now + fresh_for, now, 0, 0, header)
}

fn key(k: u8) -> CacheKey {
    CacheKey::new(format!("key-{k}"), "")
}

/// A body that names its key and version, so a wrong body is recognisable.
fn body(k: u8, version: u32, len: usize) -> Bytes {
    let stamp = format!("[{k}:{version}]");
    Bytes::from(
        stamp
            .bytes()
            .cycle()
            .take(len.max(stamp.len()))
            .collect::<Vec<u8>>(),
    )
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("test runtime")
}

async fn read_all(hit: &mut HitHandler) -> Result<Bytes> {
    let mut out = Vec::new();
    while let Some(chunk) = hit.read_body().await? {
        out.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(out))
}

async fn fill(store: &'static Store, k: u8, b: &Bytes, chunk: usize, finish: bool) {
    let span = pingora_cache::trace::Span::inactive().handle();
    let mut miss = store
        .get_miss_handler(&key(k), &meta(Duration::from_secs(600)), &span)
        .await
        .expect("miss handler");
    for part in b.chunks(chunk.max(1)) {
        miss.write_body(b.slice_ref(part), false)
            .await
            .expect("write");
    }
    if finish {
        miss.finish().await.expect("finish");
    }
}

#[derive(Debug, Clone)]
enum Op {
    Fill { key: u8, len: usize, chunk: usize },
    AbandonedFill { key: u8, len: usize },
    Lookup { key: u8 },
    Purge { key: u8 },
    UpdateMeta { key: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..8, 0usize..6000, 1usize..3000).prop_map(|(key, len, chunk)| Op::Fill {
            key,
            len,
            chunk
        }),
        (0u8..8, 0usize..3000).prop_map(|(key, len)| Op::AbandonedFill { key, len }),
        (0u8..8).prop_map(|key| Op::Lookup { key }),
        (0u8..8).prop_map(|key| Op::Purge { key }),
        (0u8..8).prop_map(|key| Op::UpdateMeta { key }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random fill / lookup / purge / update_meta sequences never exceed capacity and never
    /// return a body other than the last one stored for that key.
    #[test]
    fn store_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        let capacity = 16 * 1024;
        let store = Store::leaked(capacity);
        let rt = rt();
        let span = pingora_cache::trace::Span::inactive().handle();
        // The model: the last committed body per key. Eviction may drop it; nothing may change it.
        let mut model: HashMap<u8, Bytes> = HashMap::new();
        let mut version = 0u32;
        rt.block_on(async {
            for op in ops {
                match op {
                    Op::Fill { key: k, len, chunk } => {
                        version += 1;
                        let b = body(k, version, len);
                        fill(store, k, &b, chunk, true).await;
                        model.insert(k, b);
                    }
                    Op::AbandonedFill { key: k, len } => {
                        version += 1;
                        fill(store, k, &body(k, version, len), 512, false).await;
                    }
                    Op::Lookup { key: k } => {
                        if let Some((_, mut hit)) = store.lookup(&key(k), &span).await.expect("lookup") {
                            let got = read_all(&mut hit).await.expect("complete hit reads");
                            let want = model.get(&k);
                            prop_assert_eq!(Some(&got), want, "key {} returned a body never stored last", k);
                        }
                    }
                    Op::Purge { key: k } => {
                        let compact = key(k).to_compact();
                        store.purge(PurgeTarget::Active(&compact), PurgeType::Invalidation, &span).await.expect("purge");
                        model.remove(&k);
                        prop_assert!(store.lookup(&key(k), &span).await.expect("lookup").is_none());
                    }
                    Op::UpdateMeta { key: k } => {
                        let updated = store.update_meta(&key(k), &meta(Duration::from_secs(30)), &span).await.expect("update_meta");
                        if !updated {
                            // Missing entries are reported, never a panic; the model agrees
                            // unless moka evicted the entry.
                            prop_assert!(store.lookup(&key(k), &span).await.expect("lookup").is_none());
                        }
                    }
                }
                let usage = store.usage();
                prop_assert!(usage.bytes <= capacity, "{} bytes stored, capacity {}", usage.bytes, capacity);
            }
            Ok(())
        })?;
    }
}

#[test]
fn abandoned_fill_is_an_error_for_streaming_readers() {
    let store = Store::leaked(1 << 20);
    rt().block_on(async {
        let span = pingora_cache::trace::Span::inactive().handle();
        let mut miss = store
            .get_miss_handler(&key(1), &meta(Duration::from_secs(60)), &span)
            .await
            .expect("miss handler");
        miss.write_body(Bytes::from_static(b"half of it"), false)
            .await
            .expect("write");
        let (_, mut reader) = store
            .lookup(&key(1), &span)
            .await
            .expect("lookup")
            .expect("the fill in progress is visible");
        assert_eq!(
            reader.read_body().await.expect("first chunk"),
            Some(Bytes::from_static(b"half of it"))
        );
        drop(miss);
        assert!(
            reader.read_body().await.is_err(),
            "an abandoned fill must not end like a complete body"
        );
        assert!(store
            .lookup(&key(1), &span)
            .await
            .expect("lookup")
            .is_none());
    });
}

#[test]
fn streaming_reader_sees_the_whole_fill() {
    let store = Store::leaked(1 << 20);
    rt().block_on(async {
        let span = pingora_cache::trace::Span::inactive().handle();
        let mut miss = store
            .get_miss_handler(&key(2), &meta(Duration::from_secs(60)), &span)
            .await
            .expect("miss handler");
        miss.write_body(Bytes::from_static(b"abc"), false)
            .await
            .expect("write");
        let (_, mut reader) = store
            .lookup(&key(2), &span)
            .await
            .expect("lookup")
            .expect("visible");
        miss.write_body(Bytes::from_static(b"def"), true)
            .await
            .expect("write");
        miss.finish().await.expect("finish");
        assert_eq!(read_all(&mut reader).await.expect("complete"), "abcdef");
        let (_, mut hit) = store
            .lookup(&key(2), &span)
            .await
            .expect("lookup")
            .expect("stored");
        assert!(hit.can_seek());
        hit.seek(2, Some(4)).expect("seek");
        assert_eq!(read_all(&mut hit).await.expect("range"), "cd");
        assert!(hit.seek(6, None).is_err(), "seek past the end is refused");
    });
}

#[test]
fn purge_primary_removes_every_variant() {
    let store = Store::leaked(1 << 20);
    rt().block_on(async {
        let span = pingora_cache::trace::Span::inactive().handle();
        let mut variants = Vec::new();
        for v in 0u8..3 {
            let mut k = key(3);
            k.set_variance_key([v; 16]);
            let mut miss = store
                .get_miss_handler(&k, &meta(Duration::from_secs(60)), &span)
                .await
                .expect("miss handler");
            miss.write_body(Bytes::from(vec![v; 10]), true)
                .await
                .expect("write");
            miss.finish().await.expect("finish");
            variants.push(k);
        }
        assert!(store.purge_primary(key(3).primary_bin()));
        for k in &variants {
            assert!(store.lookup(k, &span).await.expect("lookup").is_none());
        }
        assert!(!store.purge_primary(key(3).primary_bin()));
    });
}

#[test]
fn update_meta_on_a_missing_entry_is_false_not_a_panic() {
    let store = Store::leaked(1 << 20);
    rt().block_on(async {
        let span = pingora_cache::trace::Span::inactive().handle();
        let updated = store
            .update_meta(&key(9), &meta(Duration::from_secs(1)), &span)
            .await
            .expect("update_meta");
        assert!(!updated);
    });
}

#[test]
fn an_over_limit_fill_streams_whole_to_its_own_reader_and_is_not_stored() {
    let store = Store::new(1 << 20).with_max_object_size(8).leak();
    rt().block_on(async {
        let span = pingora_cache::trace::Span::inactive().handle();
        let mut miss = store
            .get_miss_handler(&key(7), &meta(Duration::from_secs(60)), &span)
            .await
            .expect("miss handler");
        let tag = miss.streaming_write_tag().expect("streaming tag").to_vec();
        miss.write_body(Bytes::from_static(b"12345"), false)
            .await
            .expect("write");
        let (_, mut own) = store
            .lookup_streaming_write(&key(7), Some(&tag), &span)
            .await
            .expect("lookup")
            .expect("own fill");
        let (_, mut other) = store
            .lookup(&key(7), &span)
            .await
            .expect("lookup")
            .expect("fill in progress");
        assert_eq!(
            other.read_body().await.expect("first chunk"),
            Some(Bytes::from_static(b"12345"))
        );
        // Past 8 bytes the fill becomes private to the request that fetches it.
        miss.write_body(Bytes::from_static(b"67890"), false)
            .await
            .expect("an over-limit write is not an error");
        assert!(
            other.read_body().await.is_err(),
            "another reader gets a clean error, never a short end"
        );
        assert!(
            store
                .lookup(&key(7), &span)
                .await
                .expect("lookup")
                .is_none(),
            "new lookups no longer find the fill"
        );
        miss.write_body(Bytes::from_static(b"abc"), true)
            .await
            .expect("write");
        miss.finish().await.expect("finish");
        assert_eq!(read_all(&mut own).await.expect("whole"), "1234567890abc");
        assert!(
            store
                .lookup(&key(7), &span)
                .await
                .expect("lookup")
                .is_none(),
            "an over-limit body is never stored"
        );
    });
}

#[test]
fn variants_per_url_are_bounded() {
    let store = Store::leaked(1 << 24);
    rt().block_on(async {
        let span = pingora_cache::trace::Span::inactive().handle();
        let variant = |v: u16| {
            let mut k = CacheKey::new("one-url", "");
            let mut hash = [0u8; 16];
            hash[..2].copy_from_slice(&v.to_be_bytes());
            k.set_variance_key(hash);
            k
        };
        for v in 0..(MAX_VARIANTS as u16 + 8) {
            let mut miss = store
                .get_miss_handler(&variant(v), &meta(Duration::from_secs(600)), &span)
                .await
                .expect("miss handler");
            miss.write_body(Bytes::from_static(b"variant"), true)
                .await
                .expect("write");
            miss.finish().await.expect("finish");
        }
        let mut stored = 0;
        for v in 0..(MAX_VARIANTS as u16 + 8) {
            if store
                .lookup(&variant(v), &span)
                .await
                .expect("lookup")
                .is_some()
            {
                stored += 1;
            }
        }
        assert_eq!(
            stored, MAX_VARIANTS,
            "one URL holds at most MAX_VARIANTS variants"
        );
        // Another URL is unaffected, and replacing a stored variant is always allowed.
        let mut miss = store
            .get_miss_handler(&key(9), &meta(Duration::from_secs(600)), &span)
            .await
            .expect("miss handler");
        miss.write_body(Bytes::from_static(b"other"), true)
            .await
            .expect("write");
        miss.finish().await.expect("finish");
        assert!(store
            .lookup(&key(9), &span)
            .await
            .expect("lookup")
            .is_some());
        let mut again = store
            .get_miss_handler(&variant(0), &meta(Duration::from_secs(600)), &span)
            .await
            .expect("miss handler");
        again
            .write_body(Bytes::from_static(b"newer"), true)
            .await
            .expect("write");
        again.finish().await.expect("finish");
        let (_, mut hit) = store
            .lookup(&variant(0), &span)
            .await
            .expect("lookup")
            .expect("replaced variant stored");
        assert_eq!(read_all(&mut hit).await.expect("body"), "newer");
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A finished object kept as its fill's chunks reads back whole and serves every range
    /// exactly, across chunk boundaries.
    #[test]
    fn chunked_bodies_serve_every_range(len in 1usize..400, chunk in 1usize..64, ranges in prop::collection::vec((0usize..400, 0usize..400), 1..6)) {
        let store = Store::leaked(1 << 20);
        let b = body(5, 1, len);
        rt().block_on(async {
            fill(store, 5, &b, chunk, true).await;
            let span = pingora_cache::trace::Span::inactive().handle();
            let (_, mut hit) = store.lookup(&key(5), &span).await.expect("lookup").expect("stored");
            prop_assert_eq!(read_all(&mut hit).await.expect("whole"), b.clone());
            for (a, z) in ranges {
                let (start, end) = (a.min(z) % b.len(), a.max(z).min(b.len()));
                if start >= end {
                    continue;
                }
                hit.seek(start, Some(end)).expect("seek");
                prop_assert_eq!(read_all(&mut hit).await.expect("range"), b.slice(start..end));
            }
            Ok(())
        })?;
    }
}

#[test]
fn a_purge_between_a_fills_start_and_its_first_chunk_mixes_nothing() {
    let store = Store::leaked(1 << 20);
    rt().block_on(async {
        let span = pingora_cache::trace::Span::inactive().handle();
        let mut old = store
            .get_miss_handler(&key(3), &meta(Duration::from_secs(60)), &span)
            .await
            .expect("miss handler");
        let (_, mut early_reader) = store
            .lookup(&key(3), &span)
            .await
            .expect("lookup")
            .expect("fill visible");
        assert!(
            store.purge_primary(key(3).primary_bin()),
            "the fill is purged"
        );
        // A new fill of the same key starts after the purge.
        let mut new = store
            .get_miss_handler(&key(3), &meta(Duration::from_secs(60)), &span)
            .await
            .expect("miss handler");
        old.write_body(Bytes::from_static(b"old body"), true)
            .await
            .expect("write");
        new.write_body(Bytes::from_static(b"new body"), true)
            .await
            .expect("write");
        new.finish().await.expect("finish");
        old.finish().await.expect("finish");
        // The purged fill never lands over the newer one; its early reader gets its own body.
        let (_, mut hit) = store
            .lookup(&key(3), &span)
            .await
            .expect("lookup")
            .expect("the newer fill is stored");
        assert_eq!(read_all(&mut hit).await.expect("body"), "new body");
        assert_eq!(read_all(&mut early_reader).await.expect("body"), "old body");
    });
}

#[test]
fn revalidating_a_variant_does_not_free_a_variant_slot() {
    let store = Store::leaked(1 << 24);
    rt().block_on(async {
        let span = pingora_cache::trace::Span::inactive().handle();
        let variant = |v: u16| {
            let mut k = CacheKey::new("revalidated-url", "");
            let mut hash = [0u8; 16];
            hash[..2].copy_from_slice(&v.to_be_bytes());
            k.set_variance_key(hash);
            k
        };
        for v in 0..MAX_VARIANTS as u16 {
            let mut miss = store
                .get_miss_handler(&variant(v), &meta(Duration::from_secs(600)), &span)
                .await
                .expect("miss handler");
            miss.write_body(Bytes::from_static(b"v"), true)
                .await
                .expect("write");
            miss.finish().await.expect("finish");
        }
        for _ in 0..5 {
            assert!(store
                .update_meta(&variant(0), &meta(Duration::from_secs(600)), &span)
                .await
                .expect("update"));
        }
        let extra = variant(MAX_VARIANTS as u16);
        let mut miss = store
            .get_miss_handler(&extra, &meta(Duration::from_secs(600)), &span)
            .await
            .expect("miss handler");
        miss.write_body(Bytes::from_static(b"v"), true)
            .await
            .expect("write");
        miss.finish().await.expect("finish");
        assert!(
            store.lookup(&extra, &span).await.expect("lookup").is_none(),
            "a 304 (update_meta) must not make room for another variant"
        );
        assert!(store.purge_primary(variant(0).primary_bin()));
        for v in 0..MAX_VARIANTS as u16 {
            assert!(store
                .lookup(&variant(v), &span)
                .await
                .expect("lookup")
                .is_none());
        }
    });
}

#[test]
fn large_chunks_are_stored_without_a_copy_and_tiny_ones_joined() {
    let store = Store::leaked(1 << 24);
    rt().block_on(async {
        let span = pingora_cache::trace::Span::inactive().handle();
        let big = Bytes::from(vec![7u8; 64 * 1024]);
        let mut miss = store
            .get_miss_handler(&key(11), &meta(Duration::from_secs(600)), &span)
            .await
            .expect("miss handler");
        miss.write_body(big.clone(), false).await.expect("write");
        for _ in 0..100 {
            miss.write_body(Bytes::from_static(b"x"), false)
                .await
                .expect("write");
        }
        miss.write_body(Bytes::new(), true).await.expect("write");
        miss.finish().await.expect("finish");
        let (_, mut hit) = store
            .lookup(&key(11), &span)
            .await
            .expect("lookup")
            .expect("stored");
        let first = hit.read_body().await.expect("read").expect("a piece");
        assert_eq!(
            first.as_ptr(),
            big.as_ptr(),
            "the large chunk is shared, not copied"
        );
        let second = hit.read_body().await.expect("read").expect("a piece");
        assert_eq!(second.len(), 100, "100 one-byte chunks are one piece");
        assert!(hit.read_body().await.expect("read").is_none());
    });
}

#[test]
fn concurrent_fills_count_against_capacity() {
    // 1 MiB of capacity, objects up to 512 KiB, twenty fills of 192 KiB in progress at once:
    // uncounted, they would hold 3.75 MiB (the figure before this rule); counted, the store's
    // bytes never exceed capacity and the fills past the in-flight share stream through.
    let capacity = 1 << 20;
    let store = Store::new(capacity).with_max_object_size(512 << 10).leak();
    rt().block_on(async {
        let span = pingora_cache::trace::Span::inactive().handle();
        let mut fills = Vec::new();
        for k in 0..20u8 {
            let mut miss = store
                .get_miss_handler(&key(100 + k), &meta(Duration::from_secs(600)), &span)
                .await
                .expect("miss handler");
            for _ in 0..12 {
                miss.write_body(Bytes::from(vec![k; 16 << 10]), false)
                    .await
                    .expect("write");
                let usage = store.usage();
                assert!(
                    usage.bytes <= capacity,
                    "{} bytes held with fills in progress, capacity {capacity}",
                    usage.bytes
                );
            }
            fills.push(miss);
        }
        let mut stored = 0;
        for (k, miss) in fills.into_iter().enumerate() {
            miss.finish().await.expect("finish");
            if store
                .lookup(&key(100 + k as u8), &span)
                .await
                .expect("lookup")
                .is_some()
            {
                stored += 1;
            }
        }
        assert!(stored >= 1, "fills within the in-flight share are stored");
        assert!(stored < 20, "fills past the in-flight share stream through");
        assert!(store.usage().bytes <= capacity);
    });
}

/// A lookup gives back the header the fill stored, exactly as pingora's own metadata
/// round trip would: the names in the origin's case, repeated fields in order, the status, and
/// more fields than the parse array on the stack holds; the internal part (freshness) too.
#[test]
fn a_stored_header_comes_back_as_pingora_would_decode_it() {
    rt().block_on(async {
        let store = Store::leaked(1 << 20);
        let now = SystemTime::now();
        let mut header = ResponseHeader::build(203, None).expect("header");
        header.append_header("X-Mixed-Case", "one").expect("field");
        header.append_header("set-cookie", "a=1").expect("field");
        header
            .append_header("Set-Cookie", "b=2; Path=/")
            .expect("field");
        header
            .append_header("Cache-Control", "public, max-age=60")
            .expect("field");
        for i in 0..(STACK_FIELDS + 5) {
            header
                .append_header(format!("X-Extra-{i}"), format!("v{i}"))
                .expect("field");
        }
        let meta = CacheMeta::new(now + Duration::from_secs(60), now, 7, 9, header);
        let (internal, blob) = meta.serialize().expect("serialize");
        let pingora = CacheMeta::deserialize(&internal, &blob).expect("pingora's decode");
        let span = pingora_cache::trace::Span::inactive().handle();
        let mut miss = store
            .get_miss_handler(&key(1), &meta, &span)
            .await
            .expect("miss handler");
        miss.write_body(Bytes::from_static(b"body"), false)
            .await
            .expect("write");
        miss.finish().await.expect("finish");
        let (ours, _) = store
            .lookup(&key(1), &span)
            .await
            .expect("lookup")
            .expect("a hit");
        let wire = |m: &CacheMeta| {
            let mut buf = Vec::new();
            m.response_header().header_to_h1_wire(&mut buf);
            String::from_utf8(buf).expect("ascii header")
        };
        assert_eq!(wire(&ours), wire(&pingora));
        assert!(wire(&ours)
            .contains("X-Mixed-Case: one\r\nset-cookie: a=1\r\nSet-Cookie: b=2; Path=/\r\n"));
        assert_eq!(
            ours.response_header().status,
            pingora.response_header().status
        );
        assert_eq!(
            ours.response_header().version,
            pingora.response_header().version
        );
        assert_eq!(ours.fresh_until(), pingora.fresh_until());
        assert_eq!(ours.created(), pingora.created());
        assert_eq!(ours.stale_while_revalidate_sec(), 7);
        assert_eq!(ours.stale_if_error_sec(), 9);
    });
}
