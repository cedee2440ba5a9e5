//! The node's object store: pingora-cache's [`Storage`] over a bytes-weighted moka cache.
//!
//! Pingora ships only `MemCache`, which its authors mark "for testing only": it has no size
//! bound, copies every body, panics on a missing `update_meta`, and reports an abandoned fill
//! as a clean end of body (pingora issue #932). This store fixes those four things:
//!
//! - **Bounded.** Finished objects live in a moka cache whose weigher counts body and metadata
//!   bytes; fills in progress are counted too. `capacity` bounds both: three quarters for
//!   finished objects, a quarter for fills in progress — a fill that would exceed that share
//!   streams through to its own request instead of being stored. Each entry expires when no one can use it any more:
//!   after its freshness *plus* its stale-while-revalidate / stale-if-error windows, because
//!   pingora decides staleness itself and needs the stale body to revalidate or to serve on error.
//! - **Zero-copy hits.** Bodies are [`Bytes`]; a hit or a range slices them.
//! - **Streaming fills.** A fill in progress is visible to readers (`support_streaming_partial_write`),
//!   so requests that arrive during a fill stream that fill instead of fetching again.
//! - **Abandoned fills are errors.** A miss handler dropped before `finish` marks its fill
//!   `Failed`; readers streaming it get `Err`, so the proxy aborts their connections instead of
//!   ending a short body as if it were complete.
//! - **Over-limit bodies stream through whole.** Pingora's own size limit aborts a fill of
//!   unknown length mid-stream, and with it the client that asked (its response is served from
//!   the fill). So the limit lives here instead: a fill that outgrows `max_object_size` becomes
//!   private to the request that fetches it — other readers get a clean error, new lookups no
//!   longer find it, the chunks its own reader has passed on are released, and it is never
//!   committed — and that request's client gets the whole body.

use std::any::Any;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use pingora_cache::key::{CacheHashKey, CompactCacheKey, HashBinary};
use pingora_cache::storage::streaming_write::U64WriteId;
use pingora_cache::storage::{
    HandleHit, HandleMiss, MissFinishType, PurgeOutcome, PurgeTarget, PurgeType,
};
use pingora_cache::trace::SpanHandle;
use pingora_cache::{CacheKey, CacheMeta, HitHandler, MissHandler, Storage};
use pingora_error::{Error, ErrorType, Result};
use pingora_http::ResponseHeader;
use tokio::sync::watch;

/// Variants (`Vary`) one URL may have stored at once; further ones are served, not stored
/// (Traffic Server's `max_alts` idea; a client varying a header cannot fill the cache with one
/// URL).
pub const MAX_VARIANTS: usize = 32;

/// Bytes charged per entry on top of body and metadata: key, moka's entry, its deques and
/// timer node, the variant index, `Arc`s and the allocator's share. Measured, not estimated:
/// 100 000 objects of 1 KiB grow the RSS by ~1.1 KB each beyond body and header bytes
/// (benches/results/README.md), so `capacity` bounds the RSS, not only the payload.
const ENTRY_OVERHEAD: u64 = 1024;

/// How long an entry outlives its last usable moment. Covers clock rounding between pingora's
/// freshness checks (whole seconds) and moka's timer wheel.
const EXPIRY_GRACE: Duration = Duration::from_secs(2);

/// A stored object's [`CacheMeta`]: pingora's internal part serialized (a few dozen bytes) and
/// the response header's fields in HTTP/1 wire form, uncompressed.
///
/// `CacheMeta` is not `Clone` and its provenance fields are crate-private, so the internal part
/// is kept serialized and decoded on each lookup rather than rebuilt lossily (pingora's
/// deserialize needs a header too: a bare placeholder, a few dozen bytes to decompress). The
/// stored header is not kept the way pingora serializes it (zstd-compressed, decoded through a
/// 256-slot parse buffer): decompressing and parsing that on every hit was 86% of a hit's
/// lookup (callgrind, benches/results/profile.md). Nor is it kept decoded: a `ResponseHeader`
/// with its two header maps costs over a kilobyte per object. Wire bytes cost what the header
/// is, and parse fast.
struct MetaParts {
    internal: Box<[u8]>,
    status: u16,
    /// `name: value\r\n` for each field, names in the case the origin sent, then `\r\n`.
    fields: Box<[u8]>,
}

/// Shared by a fill and the object it becomes.
type MetaBlobs = Arc<MetaParts>;

/// Header fields parsed on the stack; more (pingora allows 256) take a heap buffer.
const STACK_FIELDS: usize = 48;

/// Pingora's limit on response header fields.
const MAX_FIELDS: usize = 256;

impl MetaParts {
    fn new(meta: &CacheMeta) -> Result<MetaBlobs> {
        let (internal, _) = meta.serialize()?;
        let header = meta.response_header();
        let mut fields = Vec::with_capacity(128);
        header.header_to_h1_wire(&mut fields);
        fields.extend_from_slice(b"\r\n");
        Ok(Arc::new(MetaParts {
            internal: internal.into_boxed_slice(),
            status: header.status.as_u16(),
            fields: fields.into_boxed_slice(),
        }))
    }

    /// A `CacheMeta` for one lookup: the internal part decoded, the header parsed.
    fn to_meta(&self) -> Result<CacheMeta> {
        let mut meta = CacheMeta::deserialize(&self.internal, placeholder_header()?)?;
        *meta.response_header_mut() = self.header()?;
        Ok(meta)
    }

    /// The stored response header, as pingora's own decoding builds it.
    fn header(&self) -> Result<ResponseHeader> {
        let mut stack = [httparse::EMPTY_HEADER; STACK_FIELDS];
        match httparse::parse_headers(&self.fields, &mut stack) {
            Ok(httparse::Status::Complete((_, parsed))) => self.build(parsed),
            Err(httparse::Error::TooManyHeaders) => {
                let mut heap = vec![httparse::EMPTY_HEADER; MAX_FIELDS];
                match httparse::parse_headers(&self.fields, &mut heap) {
                    Ok(httparse::Status::Complete((_, parsed))) => self.build(parsed),
                    other => Err(Self::unparsable(other.err())),
                }
            }
            other => Err(Self::unparsable(other.err())),
        }
    }

    fn build(&self, parsed: &[httparse::Header<'_>]) -> Result<ResponseHeader> {
        let mut header = ResponseHeader::build(self.status, Some(parsed.len()))?;
        for field in parsed {
            let value = pingora_http::header_value_from_slice(field.value);
            header.append_header(field.name.to_string(), value)?;
        }
        Ok(header)
    }

    fn unparsable(e: Option<httparse::Error>) -> Box<Error> {
        storage_error(
            "lookup",
            format!("stored header fields do not parse: {e:?}"),
        )
    }

    /// What the weigher charges for the metadata.
    fn weight(&self) -> u64 {
        (self.internal.len() + self.fields.len()) as u64
    }
}

/// A serialized minimal header for [`CacheMeta::deserialize`], replaced by the stored one.
fn placeholder_header() -> Result<&'static [u8]> {
    static BLOB: std::sync::OnceLock<Option<Vec<u8>>> = std::sync::OnceLock::new();
    BLOB.get_or_init(|| {
        let header = ResponseHeader::build(200, Some(0)).ok()?;
        let now = SystemTime::UNIX_EPOCH;
        let (_, blob) = CacheMeta::new(now, now, 0, 0, header).serialize().ok()?;
        Some(blob)
    })
    .as_deref()
    .ok_or_else(|| storage_error("lookup", "cannot serialize a placeholder header".into()))
}

/// One finished object.
#[derive(Clone)]
struct Stored {
    /// The primary hash, so a purge can remove every `Vary` variant of a URL.
    primary: HashBinary,
    meta: MetaBlobs,
    body: Body,
    /// After this instant no request may use the object, not even stale.
    keep_until: SystemTime,
}

/// A finished body: the chunks as the fill wrote them, shared, never copied into one buffer.
#[derive(Clone, Default)]
struct Body {
    chunks: Arc<[Bytes]>,
    len: usize,
}

/// Chunks smaller than this are joined on commit: an origin that sends a body in tiny chunks
/// must not cost a `Bytes` per byte (memory, and a read call per chunk on every hit). Larger
/// chunks are kept as they are, never copied.
const MIN_PIECE: usize = 16 * 1024;
/// Bytes charged per stored chunk (the `Bytes` handle and its share of the allocation).
const CHUNK_OVERHEAD: u64 = 64;

impl Body {
    fn new(chunks: &[Bytes]) -> Body {
        let mut pieces: Vec<Bytes> = Vec::new();
        let mut small: Vec<u8> = Vec::new();
        for c in chunks.iter().filter(|c| !c.is_empty()) {
            if c.len() >= MIN_PIECE && small.is_empty() {
                pieces.push(c.clone());
                continue;
            }
            small.extend_from_slice(c);
            if small.len() >= MIN_PIECE {
                pieces.push(Bytes::from(std::mem::take(&mut small)));
            }
        }
        if !small.is_empty() {
            pieces.push(Bytes::from(small));
        }
        Body {
            len: pieces.iter().map(Bytes::len).sum(),
            chunks: pieces.into(),
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    /// The index and start offset of the chunk holding byte `pos`.
    fn locate(&self, pos: usize) -> Option<(usize, usize)> {
        let mut offset = 0;
        for (i, c) in self.chunks.iter().enumerate() {
            if pos < offset + c.len() {
                return Some((i, offset));
            }
            offset += c.len();
        }
        None
    }
}

impl Stored {
    fn weight(&self) -> u32 {
        let bytes = self.body.len() as u64
            + self.body.chunks.len() as u64 * CHUNK_OVERHEAD
            + self.meta.weight()
            + ENTRY_OVERHEAD;
        u32::try_from(bytes).unwrap_or(u32::MAX)
    }
}

/// How far a fill in progress has got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FillState {
    /// This many chunks are readable; more may come.
    Writing(usize),
    /// All chunks are written and the object was committed.
    Done(usize),
    /// The writer gave up: the body is incomplete and must not be served as complete.
    Failed,
}

/// A fill in progress, shared by its writer and the readers streaming it.
#[derive(Clone)]
struct Fill {
    meta: MetaBlobs,
    chunks: Arc<RwLock<Vec<Bytes>>>,
    state: Arc<watch::Sender<FillState>>,
    /// Set when the body outgrew the object limit: only the fetching request reads on.
    private: Arc<AtomicBool>,
}

/// What the store holds right now, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreUsage {
    /// Number of finished objects (all variants).
    pub objects: u64,
    /// Weighted bytes of finished objects plus bytes of fills in progress, as counted against
    /// `capacity`.
    pub bytes: u64,
    /// Objects evicted to stay within `capacity` since start (expiry and purges not counted).
    pub evictions: u64,
}

/// The bytes-bounded object store. Create one per process and leak it: pingora wants `&'static`.
pub struct Store {
    done: moka::sync::Cache<HashBinary, Stored>,
    fills: Mutex<HashMap<HashBinary, HashMap<u64, Fill>>>,
    /// Every live fill by id, untouched by purges: a fill's own request always reads its own
    /// fill, never another object under its headers.
    fills_by_id: Mutex<HashMap<u64, Fill>>,
    next_fill_id: AtomicU64,
    capacity: u64,
    /// Largest body stored; a fill growing past it is streamed through, not stored.
    max_object: AtomicUsize,
    /// Bytes held by fills in progress that may still be stored, and their share of capacity.
    filling: AtomicU64,
    /// Objects moka evicted for size.
    evictions: Arc<AtomicU64>,
    fill_budget: u64,
    /// The stored keys (variants) of each URL (primary key): added on insert, removed by
    /// moka's eviction listener (expiry, eviction, purge; a replacement keeps its key). It
    /// bounds variants per URL and lets a purge remove exactly a URL's keys.
    variants: Arc<Mutex<HashMap<HashBinary, HashSet<HashBinary>>>>,
}

/// moka expiry policy: an entry lives until its `keep_until`.
struct KeepUntil;

impl moka::Expiry<HashBinary, Stored> for KeepUntil {
    fn expire_after_create(
        &self,
        _key: &HashBinary,
        value: &Stored,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(remaining(value.keep_until))
    }

    fn expire_after_update(
        &self,
        _key: &HashBinary,
        value: &Stored,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(remaining(value.keep_until))
    }
}

fn remaining(until: SystemTime) -> Duration {
    until
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO)
}

/// How long a stale object with a validator (`ETag` / `Last-Modified`) is kept after it was
/// stored, so it can be revalidated with a cheap 304 instead of refetched (nginx's
/// `proxy_cache_path … inactive=10m` habit). Capacity eviction still applies.
const REVALIDATION_RETENTION: Duration = Duration::from_secs(600);

/// The last moment any request may use an object with this metadata: the end of its stale
/// windows, or later if it can still be revalidated.
fn keep_until(meta: &CacheMeta) -> SystemTime {
    let stale = meta
        .stale_while_revalidate_sec()
        .max(meta.stale_if_error_sec());
    let usable = meta
        .fresh_until()
        .checked_add(Duration::from_secs(u64::from(stale)) + EXPIRY_GRACE)
        .unwrap_or(meta.fresh_until());
    let headers = meta.headers();
    let revalidatable = headers.contains_key(http::header::ETAG)
        || headers.contains_key(http::header::LAST_MODIFIED);
    if revalidatable {
        usable.max(SystemTime::now() + REVALIDATION_RETENTION)
    } else {
        usable
    }
}

fn storage_error(context: &'static str, detail: String) -> Box<Error> {
    Error::explain(ErrorType::InternalError, format!("{context}: {detail}"))
}

impl Store {
    /// A store that keeps at most `capacity` weighted bytes of finished objects.
    pub fn new(capacity: u64) -> Self {
        let fill_budget = capacity / 4;
        let variants: Arc<Mutex<HashMap<HashBinary, HashSet<HashBinary>>>> = Arc::default();
        let index = variants.clone();
        let evictions: Arc<AtomicU64> = Arc::default();
        let evicted = evictions.clone();
        let done = moka::sync::Cache::builder()
            .max_capacity(capacity - fill_budget)
            .weigher(|_k: &HashBinary, v: &Stored| v.weight())
            .eviction_listener(move |k: Arc<HashBinary>, v: Stored, cause| {
                use moka::notification::RemovalCause;
                match cause {
                    RemovalCause::Replaced => return, // the key is stored still, with a new value
                    RemovalCause::Size => {
                        evicted.fetch_add(1, Ordering::Relaxed);
                    }
                    RemovalCause::Expired | RemovalCause::Explicit => {}
                }
                let mut index = index.lock();
                if let Some(keys) = index.get_mut(&v.primary) {
                    keys.remove(&*k);
                    if keys.is_empty() {
                        index.remove(&v.primary);
                    }
                }
            })
            .expire_after(KeepUntil)
            .build();
        Store {
            done,
            fills: Mutex::new(HashMap::new()),
            fills_by_id: Mutex::new(HashMap::new()),
            next_fill_id: AtomicU64::new(1),
            capacity,
            max_object: AtomicUsize::new(usize::try_from(capacity).unwrap_or(usize::MAX)),
            filling: AtomicU64::new(0),
            fill_budget,
            variants,
            evictions,
        }
    }

    /// A store leaked to `'static`, as pingora's cache phases require.
    pub fn leaked(capacity: u64) -> &'static Self {
        Self::new(capacity).leak()
    }

    /// The same store, storing no body larger than `max` bytes (default: `capacity`).
    pub fn with_max_object_size(self, max: u64) -> Self {
        self.set_max_object_size(max);
        self
    }

    /// Changes the limit for fills that start from now on (a reload).
    pub fn set_max_object_size(&self, max: u64) {
        let max = usize::try_from(max).unwrap_or(usize::MAX);
        self.max_object.store(max, Ordering::Relaxed);
    }

    /// Leaks the store: pingora wants `&'static`.
    pub fn leak(self) -> &'static Self {
        Box::leak(Box::new(self))
    }

    /// The configured bound on weighted bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Finished objects and their weighted bytes (after applying pending evictions).
    pub fn usage(&self) -> StoreUsage {
        self.done.run_pending_tasks();
        StoreUsage {
            objects: self.done.entry_count(),
            bytes: self.done.weighted_size() + self.filling.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
        }
    }

    /// Remove every variant stored under `primary`, and abandon any fill of it.
    /// Returns whether anything was removed.
    pub fn purge_primary(&self, primary: HashBinary) -> bool {
        let filling = self.fills.lock().remove(&primary).is_some();
        // Exactly this URL's keys: no walk over the cache, whatever a client makes us purge.
        let keys = self.variants.lock().remove(&primary).unwrap_or_default();
        for key in &keys {
            self.done.invalidate(key);
        }
        filling || !keys.is_empty()
    }

    /// A reader of `fill`; `owner` is the fetching request's own reader.
    fn hit_from_fill(fill: &Fill, owner: bool) -> Result<(CacheMeta, HitHandler)> {
        let meta = fill.meta.to_meta()?;
        let reader = StreamingHit {
            chunks: fill.chunks.clone(),
            state: fill.state.subscribe(),
            next_chunk: 0,
            private: fill.private.clone(),
            owner,
        };
        Ok((meta, Box::new(reader)))
    }

    /// Whether the URL `primary` has a stored variant other than `key`: a miss for `key` is
    /// then a `Vary` miss.
    pub fn has_variant_other_than(&self, primary: &HashBinary, key: &HashBinary) -> bool {
        self.variants
            .lock()
            .get(primary)
            .is_some_and(|keys| keys.iter().any(|k| k != key))
    }

    /// Whether an object under `key` may be stored: a replacement always, a new variant only
    /// while its URL has fewer than [`MAX_VARIANTS`]. Counts it when admitted.
    fn admit_variant(&self, key: &HashBinary, primary: &HashBinary) -> bool {
        let mut index = self.variants.lock();
        let keys = index.entry(*primary).or_default();
        if keys.contains(key) {
            return true;
        }
        if keys.len() >= MAX_VARIANTS {
            return false;
        }
        keys.insert(*key);
        true
    }

    fn remove_fill(&self, key: &HashBinary, id: u64) {
        let mut fills = self.fills.lock();
        if let Some(per_key) = fills.get_mut(key) {
            per_key.remove(&id);
            if per_key.is_empty() {
                fills.remove(key);
            }
        }
    }
}

#[async_trait]
impl Storage for Store {
    async fn lookup(
        &'static self,
        key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        let hash = key.combined_bin();
        // A fill in progress wins over a stored object: it is the newer response, and readers
        // released by the cache lock at header time must stream it rather than fetch again.
        let fill = self
            .fills
            .lock()
            .get(&hash)
            .and_then(|per_key| per_key.values().next().cloned());
        if let Some(fill) = fill {
            return Self::hit_from_fill(&fill, false).map(Some);
        }
        let Some(stored) = self.done.get(&hash) else {
            return Ok(None);
        };
        let meta = stored.meta.to_meta()?;
        let len = stored.body.len();
        let hit = CompleteHit {
            body: stored.body,
            pos: 0,
            end: len,
            chunk: Some((0, 0)),
        };
        Ok(Some((meta, Box::new(hit))))
    }

    async fn lookup_streaming_write(
        &'static self,
        key: &CacheKey,
        tag: Option<&[u8]>,
        trace: &SpanHandle,
    ) -> Result<Option<(CacheMeta, HitHandler)>> {
        let Some(tag) = tag else {
            return self.lookup(key, trace).await;
        };
        let id: u64 = U64WriteId::try_from(tag)
            .map_err(|_| storage_error("lookup_streaming_write", "bad write tag".into()))?
            .into();
        let _ = trace;
        let fill = self.fills_by_id.lock().get(&id).cloned();
        match fill {
            Some(fill) => Self::hit_from_fill(&fill, true).map(Some),
            // Its own fill is gone (finished or dropped before its reader): never fall back to
            // whatever else is stored under the key.
            None => Err(storage_error(
                "lookup_streaming_write",
                format!("fill {id} is no longer in progress"),
            )),
        }
    }

    async fn get_miss_handler(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<MissHandler> {
        let hash = key.combined_bin();
        let blobs = MetaParts::new(meta)?;
        let id = self.next_fill_id.fetch_add(1, Ordering::Relaxed);
        let fill = Fill {
            meta: blobs.clone(),
            chunks: Arc::new(RwLock::new(Vec::new())),
            state: Arc::new(watch::Sender::new(FillState::Writing(0))),
            private: Arc::default(),
        };
        self.fills
            .lock()
            .entry(hash)
            .or_default()
            .insert(id, fill.clone());
        self.fills_by_id.lock().insert(id, fill.clone());
        Ok(Box::new(StoreMiss {
            store: self,
            key: hash,
            primary: key.primary_bin(),
            id,
            tag: U64WriteId::from(id),
            keep_until: keep_until(meta),
            fill,
            bytes: 0,
            finished: false,
            max_object: self.max_object.load(Ordering::Relaxed),
            charged: 0,
        }))
    }

    async fn purge(
        &'static self,
        target: PurgeTarget<'_>,
        _purge_type: PurgeType,
        _trace: &SpanHandle,
    ) -> Result<PurgeOutcome> {
        // We assign no entry ids, so an identified exact target is never ours.
        if matches!(
            target,
            PurgeTarget::Exact(pingora_cache::eviction::CacheEntryKey::Identified { .. })
        ) {
            return Ok(PurgeOutcome::NotFound);
        }
        let key: &CompactCacheKey = target.key();
        let hash = key.combined_bin();
        let filling = self.fills.lock().remove(&hash).is_some();
        let stored = self.done.remove(&hash).is_some();
        Ok(if filling || stored {
            PurgeOutcome::Purged(None)
        } else {
            PurgeOutcome::NotFound
        })
    }

    async fn update_meta(
        &'static self,
        key: &CacheKey,
        meta: &CacheMeta,
        _trace: &SpanHandle,
    ) -> Result<bool> {
        let hash = key.combined_bin();
        let Some(old) = self.done.get(&hash) else {
            return Ok(false);
        };
        let updated = Stored {
            primary: old.primary,
            meta: MetaParts::new(meta)?,
            body: old.body,
            keep_until: keep_until(meta),
        };
        self.done.insert(hash, updated);
        Ok(true)
    }

    fn support_streaming_partial_write(&self) -> bool {
        true
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync + 'static) {
        self
    }
}

/// A hit on a finished object: its body chunk by chunk (slices, no copies), seekable for
/// ranges.
struct CompleteHit {
    body: Body,
    /// Next byte to read, and the byte after the last one to read.
    pos: usize,
    end: usize,
    /// The chunk holding `pos` and that chunk's start offset.
    chunk: Option<(usize, usize)>,
}

#[async_trait]
impl HandleHit for CompleteHit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        let Some((i, offset)) = self.chunk.filter(|_| self.pos < self.end) else {
            return Ok(None);
        };
        let Some(c) = self.body.chunks.get(i) else {
            return Ok(None);
        };
        let from = self.pos - offset;
        let to = (self.end - offset).min(c.len());
        let piece = c.slice(from..to);
        self.pos = offset + to;
        self.chunk = (to == c.len())
            .then_some((i + 1, offset + c.len()))
            .or(self.chunk);
        Ok(Some(piece))
    }

    async fn finish(
        self: Box<Self>,
        _storage: &'static (dyn Storage + Sync),
        _key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<()> {
        Ok(())
    }

    fn can_seek(&self) -> bool {
        true
    }

    fn seek(&mut self, start: usize, end: Option<usize>) -> Result<()> {
        let len = self.body.len();
        if start >= len {
            return Err(storage_error(
                "seek",
                format!("start {start} beyond body length {len}"),
            ));
        }
        // A seek restarts reading so one handler can serve several ranges.
        self.pos = start;
        self.end = end.map_or(len, |e| e.min(len));
        self.chunk = self.body.locate(start);
        Ok(())
    }

    fn get_eviction_weight(&self) -> usize {
        self.body.len()
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
}

/// A reader of a fill in progress: yields chunks as the writer adds them.
struct StreamingHit {
    chunks: Arc<RwLock<Vec<Bytes>>>,
    state: watch::Receiver<FillState>,
    next_chunk: usize,
    private: Arc<AtomicBool>,
    /// The fetching request's own reader: the only one that reads on past the object limit.
    owner: bool,
}

#[async_trait]
impl HandleHit for StreamingHit {
    async fn read_body(&mut self) -> Result<Option<Bytes>> {
        loop {
            let state = *self.state.borrow_and_update();
            let private = self.private.load(Ordering::Acquire);
            if private && !self.owner {
                return Err(storage_error(
                    "read_body",
                    "the fill this response streams outgrew max_object_size".into(),
                ));
            }
            let available = match state {
                FillState::Failed => {
                    return Err(storage_error(
                        "read_body",
                        "the fill this response streams was abandoned".into(),
                    ))
                }
                FillState::Writing(n) | FillState::Done(n) => n,
            };
            if available > self.next_chunk {
                let chunk = if private {
                    // Nobody else reads this fill: release each chunk once passed on.
                    self.chunks
                        .write()
                        .get_mut(self.next_chunk)
                        .map(std::mem::take)
                } else {
                    self.chunks.read().get(self.next_chunk).cloned()
                };
                if let Some(chunk) = chunk {
                    self.next_chunk += 1;
                    return Ok(Some(chunk));
                }
            }
            if matches!(state, FillState::Done(_)) {
                return Ok(None);
            }
            if self.state.changed().await.is_err() {
                // The writer vanished without saying Done: treat it as abandoned.
                if matches!(*self.state.borrow(), FillState::Done(_)) {
                    continue;
                }
                return Err(storage_error(
                    "read_body",
                    "the fill this response streams ended without finishing".into(),
                ));
            }
        }
    }

    async fn finish(
        self: Box<Self>,
        _storage: &'static (dyn Storage + Sync),
        _key: &CacheKey,
        _trace: &SpanHandle,
    ) -> Result<()> {
        Ok(())
    }

    fn should_count_access(&self) -> bool {
        false
    }

    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        self
    }

    fn as_any_mut(&mut self) -> &mut (dyn Any + Send + Sync) {
        self
    }
}

/// The writer of one fill. Dropped without [`HandleMiss::finish`], it marks the fill failed.
struct StoreMiss {
    store: &'static Store,
    key: HashBinary,
    primary: HashBinary,
    id: u64,
    tag: U64WriteId,
    keep_until: SystemTime,
    fill: Fill,
    bytes: usize,
    finished: bool,
    max_object: usize,
    /// Bytes this fill holds against the fills' share of capacity.
    charged: u64,
}

impl StoreMiss {
    fn release_charge(&mut self) {
        let charged = std::mem::take(&mut self.charged);
        let _ = self
            .store
            .filling
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                Some(held.saturating_sub(charged))
            });
    }
}

#[async_trait]
impl HandleMiss for StoreMiss {
    async fn write_body(&mut self, data: Bytes, eof: bool) -> Result<()> {
        if !self.fill.private.load(Ordering::Acquire) {
            let len = data.len() as u64;
            let too_large = self.bytes + data.len() > self.max_object;
            // Reserve this chunk within the fills' share of capacity, or give up storing.
            let reserved = !too_large
                && self
                    .store
                    .filling
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                        (held + len <= self.store.fill_budget).then_some(held + len)
                    })
                    .is_ok();
            if reserved {
                self.charged += len;
            } else {
                // Too large, or too much in flight: stream it through to its own request only.
                // The object it would have replaced is superseded all the same.
                self.fill.private.store(true, Ordering::Release);
                self.store.remove_fill(&self.key, self.id);
                self.store.done.invalidate(&self.key);
                self.release_charge();
            }
        }
        let n = {
            let mut chunks = self.fill.chunks.write();
            if !data.is_empty() {
                self.bytes += data.len();
                chunks.push(data);
            }
            chunks.len()
        };
        let _ = eof; // completion is signalled by finish(), after the object is committed
        self.fill.state.send_replace(FillState::Writing(n));
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<MissFinishType> {
        if self.fill.private.load(Ordering::Acquire) {
            // Streamed through to its own client; nothing to store.
            let chunks = self.fill.chunks.read().len();
            self.fill.state.send_replace(FillState::Done(chunks));
            self.finished = true;
            self.store.remove_fill(&self.key, self.id);
            return Ok(MissFinishType::Created(self.bytes));
        }
        // The chunks are shared, not joined: a finished fill is never copied a second time.
        let body = Body::new(&self.fill.chunks.read());
        let size = body.len();
        let stored = Stored {
            primary: self.primary,
            meta: self.fill.meta.clone(),
            body,
            keep_until: self.keep_until,
        };
        // Only commit if this fill was not purged meanwhile.
        let still_current = self
            .store
            .fills
            .lock()
            .get(&self.key)
            .is_some_and(|per_key| per_key.contains_key(&self.id));
        if still_current && self.store.admit_variant(&self.key, &self.primary) {
            self.store.done.insert(self.key, stored);
        }
        let chunks = self.fill.chunks.read().len();
        self.fill.state.send_replace(FillState::Done(chunks));
        self.finished = true;
        self.store.remove_fill(&self.key, self.id);
        Ok(MissFinishType::Created(size))
    }

    fn streaming_write_tag(&self) -> Option<&[u8]> {
        Some(self.tag.as_bytes())
    }
}

impl Drop for StoreMiss {
    fn drop(&mut self) {
        // Committed or abandoned, the fill no longer holds in-flight bytes.
        self.release_charge();
        // Readers hold the fill itself; the id only served to find it.
        self.store.fills_by_id.lock().remove(&self.id);
        if !self.finished {
            self.fill.state.send_replace(FillState::Failed);
            self.store.remove_fill(&self.key, self.id);
        }
    }
}

#[cfg(test)]
mod tests;
