//! Bytes of model files read from the disk by convcache's readers: the safetensors reader's
//! positioned reads, the shared window's fetches ([`crate::shared_read`]) and the digest passes
//! (which report theirs through [`add`]).
//!
//! One process-wide counter, so a caller can tell how many times a conversion read its source
//! (the CLI prints it with `CONVCACHE_READ_STATS=1`; the benchmark checks that several targets
//! of one source read it once). Reads served from the shared window are not counted again.

use std::sync::atomic::{AtomicU64, Ordering};

static BYTES_READ: AtomicU64 = AtomicU64::new(0);

/// Counts `bytes` read from a model file.
pub fn add(bytes: u64) {
    BYTES_READ.fetch_add(bytes, Ordering::Relaxed);
}

/// Bytes read from model files by this process so far.
pub fn bytes_read() -> u64 {
    BYTES_READ.load(Ordering::Relaxed)
}
