//! The content digest of a source file (and of a published output, see [`crate::record`]).
//!
//! Construction (`xxh3-128/chunked-8MiB`, stable: cached outputs record it):
//! 1. the file is cut into consecutive chunks of exactly [`CHUNK_SIZE`] bytes (the last one
//!    shorter; an empty file has no chunk);
//! 2. each chunk is hashed with XXH3-128 (seed 0) (in parallel, read with positioned reads);
//! 3. the digest is XXH3-128 of `len_le_u64 || CHUNK_SIZE_le_u64 || h_0 || h_1 || ...` where each
//!    `h_i` is the chunk hash as 16 little-endian bytes.
//!
//! Written as 32 lowercase hex digits. Fixed chunk boundaries make the result independent of the
//! number of threads.
//!
//! A sharded source (a shard index, or a folder holding one: [`tensorfile::sharded`]) is
//! digested as XXH3-128 of `"convcache-sharded-1" || d_index || d_1 || ... || d_n`, where
//! `d_index` is the digest above of the index file and `d_i` of shard `i` in serving order,
//! each as its 32 hex digits: any changed byte of the index or of a shard changes it. XXH3 is not cryptographic: the digest tells a changed source from an
//! unchanged one, it does not defend against someone crafting collisions.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use rayon::prelude::*;
use tensorfile::safetensors::ReadBuffer;
use twox_hash::XxHash3_128 as Xxh3;

/// XXH3-128 with seed 0 of `bytes` (AVX2 or SSE2, chosen at run time).
fn xxh3_128(bytes: &[u8]) -> u128 {
    Xxh3::oneshot(bytes)
}

use crate::CacheError;

/// Bytes per independently hashed chunk.
pub const CHUNK_SIZE: usize = 8 << 20;

/// Name of the construction, recorded next to the digest value.
pub const ALGORITHM: &str = "xxh3-128/chunked-8MiB";

/// Hashes `bytes` with the chunked construction.
pub fn digest_bytes(bytes: &[u8]) -> String {
    let chunk_hashes: Vec<u128> = bytes.par_chunks(CHUNK_SIZE).map(xxh3_128).collect();
    combine(bytes.len() as u64, &chunk_hashes)
}

fn combine(len: u64, chunk_hashes: &[u128]) -> String {
    let mut buf = Vec::with_capacity(16 + 16 * chunk_hashes.len());
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&(CHUNK_SIZE as u64).to_le_bytes());
    for h in chunk_hashes {
        buf.extend_from_slice(&h.to_le_bytes());
    }
    format!("{:032x}", xxh3_128(&buf))
}

/// Chunks hashed between two progress reports (512 MiB).
const CHUNKS_PER_REPORT: usize = 64;

/// Files hashed per thread, for tests that assert what a lookup or conversion hashed (nothing on
/// a hit, the source once after a touch). Compiled only with the `test-counters` feature, which
/// only dev-dependencies enable: production builds carry no counter.
#[cfg(feature = "test-counters")]
mod hashed_counter {
    use std::cell::Cell;

    thread_local! {
        static FILES_HASHED: Cell<u64> = const { Cell::new(0) };
    }

    pub(super) fn count_one() {
        FILES_HASHED.with(|c| c.set(c.get() + 1));
    }

    /// How many files [`super::digest_file`] (or its cancellable variant) has hashed on the
    /// calling thread.
    ///
    /// Per thread so that a test can tell whether one lookup hashed anything, whatever other
    /// tests run at the same time.
    pub fn files_hashed_on_this_thread() -> u64 {
        FILES_HASHED.with(Cell::get)
    }
}

#[cfg(feature = "test-counters")]
pub use hashed_counter::files_hashed_on_this_thread;

/// The digest of the file at `path`.
///
/// The file is read with positioned reads into a few reused chunk buffers (one per thread),
/// not through a memory map: a map's touched pages would count against the process's resident
/// memory for the whole run (the size of the model), and a source truncated meanwhile would
/// raise SIGBUS instead of an error.
pub fn digest_file(path: &Path) -> Result<String, CacheError> {
    digest_file_cancellable(path, &mut |_, _| {}, None)
}

/// [`digest_file`], calling `progress(bytes hashed, file size)` as it goes, and stopping with
/// [`CacheError::Cancelled`] soon after `cancel` is set (it is checked between batches of one chunk per thread): hashing a large model
/// takes seconds, and an interrupt should not wait for it.
pub fn digest_file_cancellable(
    path: &Path,
    progress: &mut dyn FnMut(u64, u64),
    cancel: Option<&AtomicBool>,
) -> Result<String, CacheError> {
    #[cfg(feature = "test-counters")]
    hashed_counter::count_one();
    if let Some(index) = tensorfile::sharded::locate_index(path)? {
        return digest_sharded(&index, progress, cancel);
    }
    digest_one_file(path, progress, cancel)
}

/// The digest of a sharded source (see the module documentation), reporting progress over all
/// its files.
fn digest_sharded(
    index: &Path,
    progress: &mut dyn FnMut(u64, u64),
    cancel: Option<&AtomicBool>,
) -> Result<String, CacheError> {
    let index = tensorfile::sharded::ShardIndex::read(index)?;
    let mut sizes = Vec::with_capacity(index.shards.len() + 1);
    for file in index.files() {
        let len = std::fs::metadata(file).map_err(|source| CacheError::Io {
            path: file.to_path_buf(),
            op: "stat the file to hash",
            source,
        })?;
        sizes.push(len.len());
    }
    let total = sizes.iter().fold(0u64, |a, &b| a.saturating_add(b));
    let mut digests = Vec::with_capacity(sizes.len());
    let mut before = 0u64;
    for (file, size) in index.files().zip(sizes) {
        let d = digest_one_file(file, &mut |done, _| progress(before + done, total), cancel)?;
        digests.push(d);
        before = before.saturating_add(size);
    }
    Ok(sharded_digest(&digests))
}

/// The digest of a sharded source from the digests of its files (see the module
/// documentation): the index's first, then each shard's in serving order
/// ([`tensorfile::sharded::ShardIndex::files`]).
pub fn sharded_digest(file_digests: &[String]) -> String {
    let mut combined = b"convcache-sharded-1".to_vec();
    for d in file_digests {
        combined.extend_from_slice(d.as_bytes());
    }
    format!("{:032x}", xxh3_128(&combined))
}

/// [`digest_file_cancellable`] for one regular file.
fn digest_one_file(
    path: &Path,
    progress: &mut dyn FnMut(u64, u64),
    cancel: Option<&AtomicBool>,
) -> Result<String, CacheError> {
    let io = |op, source| CacheError::Io {
        path: path.to_path_buf(),
        op,
        source,
    };
    let file = File::open(path).map_err(|e| io("open the file to hash", e))?;
    let len = file
        .metadata()
        .map_err(|e| io("stat the file to hash", e))?
        .len();
    let chunk = CHUNK_SIZE as u64;
    // Page-aligned: the kernel's copy into a misaligned buffer is several times slower.
    let mut buffers: Vec<ReadBuffer> = (0..rayon::current_num_threads().clamp(1, 8))
        .map(|_| ReadBuffer::new())
        .collect();
    let mut filled_lens = vec![0usize; buffers.len()];
    let mut chunk_hashes = Vec::with_capacity(usize::try_from(len.div_ceil(chunk)).unwrap_or(0));
    let mut offset = 0u64;
    let mut last_report = 0u64;
    progress(0, len);
    while offset < len {
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(CacheError::Cancelled(path.to_path_buf()));
        }
        let mut filled = 0;
        for (buf, filled_len) in buffers.iter_mut().zip(filled_lens.iter_mut()) {
            if offset >= len {
                break;
            }
            // At most CHUNK_SIZE, so the cast cannot truncate.
            let n = chunk.min(len - offset) as usize;
            file.read_exact_at(buf.get(n, CHUNK_SIZE), offset)
                .map_err(|e| io("read the file to hash", e))?;
            tensorfile::read_count::add(n as u64);
            *filled_len = n;
            offset += n as u64;
            filled += 1;
        }
        chunk_hashes.par_extend(
            buffers[..filled]
                .par_iter_mut()
                .zip(&filled_lens[..filled])
                .map(|(b, &n)| xxh3_128(b.get(n, CHUNK_SIZE))),
        );
        if offset - last_report >= chunk * CHUNKS_PER_REPORT as u64 || offset == len {
            last_report = offset;
            progress(offset, len);
        }
    }
    Ok(combine(len, &chunk_hashes))
}

/// The same digest computed from bytes fed in order, in pieces of any size (for hashing an
/// output while it is written, without reading it back).
///
/// [`StreamDigest::holding_head`] keeps the first chunk's bytes instead of hashing them at once,
/// so that they can still be [patched](StreamDigest::patch_head) (a header value written as a
/// placeholder and filled in once the data after it is known) before [`StreamDigest::finish`].
#[derive(Clone)]
pub struct StreamDigest {
    len: u64,
    in_chunk: usize,
    chunk: Xxh3,
    chunk_hashes: Vec<u128>,
    /// The first chunk's bytes, when they are hashed only at `finish`.
    head: Option<Vec<u8>>,
}

impl Default for StreamDigest {
    fn default() -> StreamDigest {
        StreamDigest::new()
    }
}

impl std::fmt::Debug for StreamDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamDigest")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl StreamDigest {
    /// A digest of nothing yet.
    pub fn new() -> StreamDigest {
        StreamDigest {
            len: 0,
            in_chunk: 0,
            chunk: Xxh3::new(),
            chunk_hashes: Vec::new(),
            head: None,
        }
    }

    /// A digest that keeps the first [`CHUNK_SIZE`] bytes (at most) in memory, unhashed until
    /// [`StreamDigest::finish`], so [`StreamDigest::patch_head`] can still change them.
    pub fn holding_head() -> StreamDigest {
        StreamDigest {
            head: Some(Vec::new()),
            ..StreamDigest::new()
        }
    }

    /// Whether the bytes being fed belong to the held first chunk.
    fn in_head(&self) -> bool {
        self.head.is_some() && self.chunk_hashes.is_empty()
    }

    /// Feeds the next bytes.
    pub fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let n = (CHUNK_SIZE - self.in_chunk).min(bytes.len());
            match &mut self.head {
                Some(head) if self.chunk_hashes.is_empty() => head.extend_from_slice(&bytes[..n]),
                _ => self.chunk.write(&bytes[..n]),
            }
            self.in_chunk += n;
            self.len += n as u64;
            bytes = &bytes[n..];
            if self.in_chunk == CHUNK_SIZE {
                self.end_chunk();
            }
        }
    }

    fn end_chunk(&mut self) {
        if self.in_head() {
            // Hashed at `finish`, after any patch.
            self.chunk_hashes.push(0);
        } else {
            self.chunk_hashes.push(self.chunk.finish_128());
            self.chunk = Xxh3::new();
        }
        self.in_chunk = 0;
    }

    /// The held first chunk's bytes so far (empty unless made by [`StreamDigest::holding_head`]).
    pub fn head(&self) -> &[u8] {
        self.head.as_deref().unwrap_or_default()
    }

    /// Overwrites held bytes at `offset` (from the start of the stream) with `bytes`, as a
    /// positioned write of the same bytes to the file does. Returns `false`, changing nothing,
    /// when the range is not entirely within the held head.
    pub fn patch_head(&mut self, offset: usize, bytes: &[u8]) -> bool {
        let Some(head) = &mut self.head else {
            return false;
        };
        match offset
            .checked_add(bytes.len())
            .and_then(|end| head.get_mut(offset..end))
        {
            Some(range) => {
                range.copy_from_slice(bytes);
                true
            }
            None => false,
        }
    }

    /// Bytes fed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was fed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The digest of everything fed so far (held head bytes as they are now), leaving the
    /// digest open for more: a resume journal's checkpoint.
    pub fn digest_so_far(&self) -> String {
        self.clone().finish()
    }

    /// The digest of everything fed, as [`digest_bytes`] would give for the concatenation.
    pub fn finish(mut self) -> String {
        if self.in_chunk > 0 {
            self.end_chunk();
        }
        if let (Some(head), Some(first)) = (&self.head, self.chunk_hashes.first_mut()) {
            *first = xxh3_128(head);
        }
        combine(self.len, &self.chunk_hashes)
    }
}

/// The first 8 hex digits, used to tell apart outputs of same-named sources.
pub fn short(digest: &str) -> &str {
    digest.get(..8).unwrap_or(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sharded_source_digest_covers_the_index_and_every_shard_in_order() {
        use tensorfile::Dtype;
        use tensorfile::safetensors::writer::write_file;
        let t = tempfile::tempdir().unwrap();
        let shard = |name: &str, v: f32| {
            let bytes = v.to_le_bytes().to_vec();
            let path = t.path().join(name);
            write_file(
                &path,
                &[(name, Dtype::F32, vec![1], bytes)],
                &Default::default(),
            )
            .unwrap();
            path
        };
        let (a, b) = (shard("m-1.safetensors", 1.0), shard("m-2.safetensors", 2.0));
        let index = t.path().join("m.safetensors.index.json");
        let map = r#"{"weight_map": {"m-1.safetensors": "m-1.safetensors", "m-2.safetensors": "m-2.safetensors"}}"#;
        std::fs::write(&index, map).unwrap();
        let d = digest_file(t.path()).unwrap();
        assert_eq!(digest_file(&index).unwrap(), d);
        // (The index's own digest: `digest_file` of the index is the whole source's.)
        let mut expected = b"convcache-sharded-1".to_vec();
        expected.extend_from_slice(digest_bytes(&std::fs::read(&index).unwrap()).as_bytes());
        for f in [&a, &b] {
            expected.extend_from_slice(digest_file(f).unwrap().as_bytes());
        }
        assert_eq!(d, format!("{:032x}", xxh3_128(&expected)));
        let mut last = (0, 0);
        digest_file_cancellable(t.path(), &mut |done, total| last = (done, total), None).unwrap();
        let total = [&index, &a, &b]
            .iter()
            .map(|f| f.metadata().unwrap().len())
            .sum();
        assert_eq!(last, (total, total));
        shard("m-2.safetensors", 3.0);
        assert_ne!(digest_file(t.path()).unwrap(), d);
    }

    #[test]
    fn file_and_bytes_agree_and_content_matters() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        let data: Vec<u8> = (0..(CHUNK_SIZE * 2 + 1000))
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::write(&p, &data).unwrap();
        let d = digest_file(&p).unwrap();
        assert_eq!(d, digest_bytes(&data));
        let mut last = (0, 0);
        let with = digest_file_cancellable(&p, &mut |a, b| last = (a, b), None).unwrap();
        assert_eq!(with, d);
        assert_eq!(last, (data.len() as u64, data.len() as u64));
        assert_eq!(d.len(), 32);
        let mut changed = data.clone();
        changed[CHUNK_SIZE + 5] ^= 1;
        assert_ne!(d, digest_bytes(&changed));
        // A shorter file with the same prefix differs (length is in the digest).
        assert_ne!(
            digest_bytes(&data[..CHUNK_SIZE]),
            digest_bytes(&data[..CHUNK_SIZE + 1])
        );
        std::fs::write(&p, b"").unwrap();
        assert_eq!(digest_file(&p).unwrap(), digest_bytes(&[]));
    }

    #[test]
    fn streaming_matches_whole_file_for_any_split() {
        let data: Vec<u8> = (0..(CHUNK_SIZE * 2 + 77))
            .map(|i| (i * 7 % 253) as u8)
            .collect();
        let whole = digest_bytes(&data);
        for piece in [1usize << 20, CHUNK_SIZE, CHUNK_SIZE - 1, 3_000_001] {
            let mut s = StreamDigest::new();
            for c in data.chunks(piece) {
                s.update(c);
            }
            assert_eq!(s.len(), data.len() as u64);
            assert_eq!(s.finish(), whole, "pieces of {piece}");
        }
        assert_eq!(StreamDigest::new().finish(), digest_bytes(&[]));
        let mut s = StreamDigest::new();
        s.update(&data[..CHUNK_SIZE]);
        assert_eq!(s.finish(), digest_bytes(&data[..CHUNK_SIZE]));
    }

    #[test]
    fn a_held_head_can_be_patched_before_finishing() {
        let data: Vec<u8> = (0..(CHUNK_SIZE + 4000)).map(|i| (i % 241) as u8).collect();
        for size in [10usize, CHUNK_SIZE, CHUNK_SIZE + 4000] {
            let mut s = StreamDigest::holding_head();
            for c in data[..size].chunks(3_000_001) {
                s.update(c);
            }
            assert_eq!(s.head(), &data[..size.min(CHUNK_SIZE)]);
            // Outside the head: refused, nothing changes.
            assert!(!s.patch_head(size.min(CHUNK_SIZE) - 1, b"xy"));
            assert!(s.patch_head(3, b"PATCH"));
            let mut patched = data[..size].to_vec();
            patched[3..8].copy_from_slice(b"PATCH");
            assert_eq!(s.finish(), digest_bytes(&patched), "size {size}");
        }
        // Unpatched, it is the plain digest; a plain digest refuses patches.
        let mut s = StreamDigest::holding_head();
        s.update(&data);
        assert_eq!(s.finish(), digest_bytes(&data));
        assert_eq!(StreamDigest::holding_head().finish(), digest_bytes(&[]));
        let mut plain = StreamDigest::new();
        plain.update(&data);
        assert!(!plain.patch_head(0, b"x"));
    }

    /// XXH3-128 (seed 0) known answers, across the short, mid and long-input code paths, as
    /// computed by the independent `xxhash-rust` 0.8.21 implementation (the empty-input value
    /// is also the one in xxHash's own documentation): the digest of every recorded output
    /// depends on this function never changing.
    #[test]
    fn xxh3_128_known_answers() {
        let cases: [(usize, u128); 6] = [
            (0, 0x99aa06d3014798d86001c324468d497f),
            (1, 0xa6cd5e9392000f6ac44bdff4074eecdb),
            (240, 0x69d89a449f44e9c0a1bf676f3e2ef478),
            (241, 0x1065d9a8ed9c140d9d8d6c8fbcc09ef6),
            (1000, 0xb7fd482b40450726ce3deb9a83f6a69d),
            (8 << 20, 0x7bf337ae0fc8ac4aad3b3cfce81a9ee8),
        ];
        for (n, expected) in cases {
            let data: Vec<u8> = (0..n).map(|i| (i * 7 % 253) as u8).collect();
            assert_eq!(xxh3_128(&data), expected, "{n} bytes");
            let mut streamed = Xxh3::new();
            for piece in data.chunks(777) {
                streamed.write(piece);
            }
            assert_eq!(streamed.finish_128(), expected, "{n} bytes, streamed");
        }
    }

    #[test]
    fn matches_the_documented_construction() {
        // Recompute by hand for a 2-chunk input.
        let data = vec![7u8; CHUNK_SIZE + 3];
        let mut buf = Vec::new();
        buf.extend_from_slice(&(data.len() as u64).to_le_bytes());
        buf.extend_from_slice(&(CHUNK_SIZE as u64).to_le_bytes());
        buf.extend_from_slice(&xxh3_128(&data[..CHUNK_SIZE]).to_le_bytes());
        buf.extend_from_slice(&xxh3_128(&data[CHUNK_SIZE..]).to_le_bytes());
        assert_eq!(digest_bytes(&data), format!("{:032x}", xxh3_128(&buf)));
    }
}
