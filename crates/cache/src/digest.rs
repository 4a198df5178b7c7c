//! The content digest of a source file.
//!
//! Construction (`xxh3-128/chunked-8MiB`, stable: cached outputs record it):
//! 1. the file is cut into consecutive chunks of exactly [`CHUNK_SIZE`] bytes (the last one
//!    shorter; an empty file has no chunk);
//! 2. each chunk is hashed with XXH3-128 (seed 0), in parallel over a read-only memory map;
//! 3. the digest is XXH3-128 of `len_le_u64 || CHUNK_SIZE_le_u64 || h_0 || h_1 || ...` where each
//!    `h_i` is the chunk hash as 16 little-endian bytes.
//!
//! Written as 32 lowercase hex digits. Fixed chunk boundaries make the result independent of the
//! number of threads. XXH3 is not cryptographic: the digest tells a changed source from an
//! unchanged one, it does not defend against someone crafting collisions.

use std::fs::File;
use std::path::Path;

use rayon::prelude::*;
use xxhash_rust::xxh3::xxh3_128;

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

/// The digest of the file at `path`, read through a memory map.
///
/// The source must not be truncated while it is hashed (convcache never writes sources; another
/// program truncating a model mid-run would also break the conversion itself).
pub fn digest_file(path: &Path) -> Result<String, CacheError> {
    digest_file_with_progress(path, &mut |_, _| {})
}

/// [`digest_file`], calling `progress(bytes hashed, file size)` as it goes.
pub fn digest_file_with_progress(
    path: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<String, CacheError> {
    let io = |op, source| CacheError::Io {
        path: path.to_path_buf(),
        op,
        source,
    };
    let file = File::open(path).map_err(|e| io("open the source", e))?;
    let len = file.metadata().map_err(|e| io("stat the source", e))?.len();
    if len == 0 {
        return Ok(combine(0, &[]));
    }
    // SAFETY: the map is read-only and private to this function; convcache never writes the
    // file, and the documented precondition is that nobody truncates it meanwhile.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io("memory-map the source", e))?;
    #[cfg(unix)]
    let _ = map.advise(memmap2::Advice::Sequential);
    let bytes: &[u8] = &map;
    let mut chunk_hashes = Vec::with_capacity(bytes.len().div_ceil(CHUNK_SIZE));
    let mut done = 0u64;
    progress(0, len);
    for batch in bytes.chunks(CHUNK_SIZE * CHUNKS_PER_REPORT) {
        chunk_hashes.par_extend(batch.par_chunks(CHUNK_SIZE).map(xxh3_128));
        done += batch.len() as u64;
        progress(done, len);
    }
    Ok(combine(len, &chunk_hashes))
}

/// The first 8 hex digits, used to tell apart outputs of same-named sources.
pub fn short(digest: &str) -> &str {
    digest.get(..8).unwrap_or(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let with = digest_file_with_progress(&p, &mut |a, b| last = (a, b)).unwrap();
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
