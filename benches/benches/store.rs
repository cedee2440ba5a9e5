//! Criterion benchmarks of the object store's hot path: a lookup that hits (decode the stored
//! metadata, slice the body) and one that misses, on a store holding 10 000 objects.

// criterion's macros generate public fns that cannot carry docs.
#![allow(missing_docs)]

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use pingora_cache::trace::Span;
use pingora_cache::{CacheKey, CacheMeta, Storage};
use pingora_http::ResponseHeader;
use stratus_node::store::Store;

const OBJECTS: usize = 10_000;
const BODY: usize = 4096;

fn key(i: usize) -> CacheKey {
    CacheKey::new(format!("11:example.test/object/{i}"), "")
}

fn meta() -> CacheMeta {
    let now = SystemTime::now();
    let mut h = ResponseHeader::build(200, None).expect("static header");
    h.insert_header("content-type", "application/octet-stream")
        .expect("header");
    h.insert_header("cache-control", "max-age=3600")
        .expect("header");
    h.insert_header("etag", "\"abcdef\"").expect("header");
    CacheMeta::new(now + Duration::from_secs(3600), now, 0, 0, h)
}

fn filled(rt: &tokio::runtime::Runtime) -> &'static Store {
    let store = Store::leaked(1 << 30);
    let span = Span::inactive().handle();
    rt.block_on(async {
        for i in 0..OBJECTS {
            let mut miss = store
                .get_miss_handler(&key(i), &meta(), &span)
                .await
                .expect("miss");
            miss.write_body(Bytes::from(vec![b'x'; BODY]), true)
                .await
                .expect("write");
            miss.finish().await.expect("finish");
        }
    });
    store
}

fn lookup(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let store = filled(&rt);
    let span = Span::inactive().handle();
    let keys: Vec<CacheKey> = (0..OBJECTS).map(key).collect();
    let mut group = c.benchmark_group("store");
    group.throughput(Throughput::Elements(1));
    let mut i = 0;
    group.bench_function("lookup_hit_and_read_4KiB", |b| {
        b.iter(|| {
            i = (i + 7919) % OBJECTS;
            rt.block_on(async {
                let (_, mut hit) = store
                    .lookup(&keys[i], &span)
                    .await
                    .expect("lookup")
                    .expect("hit");
                let body = hit.read_body().await.expect("read").expect("body");
                assert_eq!(body.len(), BODY);
            })
        })
    });
    let missing = key(OBJECTS + 1);
    group.bench_function("lookup_miss", |b| {
        b.iter(|| {
            rt.block_on(async {
                assert!(store
                    .lookup(&missing, &span)
                    .await
                    .expect("lookup")
                    .is_none())
            })
        })
    });
    group.bench_function("fill_4KiB", |b| {
        let mut n = OBJECTS * 2;
        b.iter_batched(
            || {
                n += 1;
                key(n)
            },
            |k| {
                rt.block_on(async {
                    let mut miss = store
                        .get_miss_handler(&k, &meta(), &span)
                        .await
                        .expect("miss");
                    miss.write_body(Bytes::from_static(&[b'y'; BODY]), true)
                        .await
                        .expect("write");
                    miss.finish().await.expect("finish");
                })
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, lookup);
criterion_main!(benches);
