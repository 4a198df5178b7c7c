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
use std::os::unix::fs::FileExt;
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

/// The digest of the file at `path`.
///
/// The file is read with positioned reads into a few reused chunk buffers (one per thread),
/// not through a memory map: a map's touched pages would count against the process's resident
/// memory for the whole run (the size of the model), and a source truncated meanwhile would
/// raise SIGBUS instead of an error.
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
    let chunk = CHUNK_SIZE as u64;
    let mut buffers: Vec<Vec<u8>> = vec![Vec::new(); rayon::current_num_threads().clamp(1, 8)];
    let mut chunk_hashes = Vec::with_capacity(usize::try_from(len.div_ceil(chunk)).unwrap_or(0));
    let mut offset = 0u64;
    let mut last_report = 0u64;
    progress(0, len);
    while offset < len {
        let mut filled = 0;
        for buf in buffers.iter_mut() {
            if offset >= len {
                break;
            }
            // At most CHUNK_SIZE, so the cast cannot truncate.
            let n = chunk.min(len - offset) as usize;
            buf.resize(n, 0);
            file.read_exact_at(buf, offset)
                .map_err(|e| io("read the source", e))?;
            offset += n as u64;
            filled += 1;
        }
        chunk_hashes.par_extend(buffers[..filled].par_iter().map(|b| xxh3_128(b)));
        if offset - last_report >= chunk * CHUNKS_PER_REPORT as u64 || offset == len {
            last_report = offset;
            progress(offset, len);
        }
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
