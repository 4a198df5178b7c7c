#![warn(missing_docs)]
//! Where converted models live, and whether a cached one can be trusted.
//!
//! - [`ModelsDir`]: finding the models dir (flag, `CONVCACHE_MODELS_DIR`, a ComfyUI install
//!   above the current dir, `./models`) and the output dirs inside it.
//! - [`naming`]: `{basename}_{precision}.{ext}` output names and parsing them back exactly.
//! - [`digest`]: the chunked XXH3-128 content digest of a source.
//! - [`provenance`]: the `convcache.*` key-values every output carries.
//! - [`record`]: the output record (size, mtime, digest of a published output) that lets a
//!   lookup tell an output whose data changed since it was published, without hashing on a hit.
//! - [`Cache`]: validated [`Cache::lookup`], [`Cache::list`], [`Cache::stats`],
//!   [`Cache::cleanup`], [`Cache::evict_to`]. Lookups and listings write nothing (`check`,
//!   `list` and `stats` leave the cache as they found it); what a lookup learned is written
//!   when its answer is used ([`Cache::record_hit`]).
//! - [`Cache::make_room`]: what an output about to be written lacks on the disk or under a size
//!   budget, and least-recently-used eviction of other outputs until it fits.
//! - [`OutputSlot`]: one output's lock, held by a converter (crate `smart`) while it looks
//!   again, writes a [`Temporary`] and publishes it with its output record.
//!
//! # Files in an output dir
//! - `flux_bf16.safetensors`: an output (published only by atomic rename).
//! - `.flux_bf16.safetensors.<pid>.tmp`: an output being written by process `<pid>`.
//! - `.convcache/flux_bf16.safetensors.lock`: the output's lock (locked while it is written
//!   or removed; never deleted, so every process locks the same inode).
//! - `.convcache/flux_bf16.safetensors.used`: its use stamp; the stamp's mtime is the last
//!   time the output was produced or served from the cache (least-recently-used eviction).
//! - `.convcache/flux_bf16.safetensors.digest`: its output record ([`record`]), written by the
//!   converter before it publishes the output; `.digest.tmp` while being replaced.
//! - `.convcache/flux_bf16.safetensors.journal`: the resume journal of a conversion being
//!   written or interrupted ([`journal`]): its temporary is kept and resumed by the next
//!   conversion of the same output while the journal checks out; `.journal.tmp` while being
//!   replaced.
//!
//! # What may be deleted
//! [`Cache::cleanup`], [`Cache::evict_to`] and [`Cache::make_room`] only remove regular files (never symlinks, never
//! directories) found directly in the output dirs, whose names parse as output names and whose
//! contents carry convcache provenance, and only while holding their lock (so never an output
//! that is being written).

pub mod digest;
mod examine;
pub mod journal;
mod models_dir;
pub mod naming;
pub mod provenance;
pub mod record;
mod room;
mod slot;
mod store;

use std::path::PathBuf;

pub use detect::arch::ModelKind;
pub use examine::{Examined, examine};
pub use models_dir::{MODELS_DIR_ENV, ModelsDir};
pub use naming::{basename_of, output_file_name, parse_output_name};
pub use provenance::{Provenance, SourceStat};
pub use record::{
    OutputRecord, SourceSeen, current_boot_id, output_record_path, read_output_record,
    write_output_record,
};
pub use room::{Room, RoomRequest, Shortfall, same_file};
pub use slot::{OutputSlot, STATE_DIR, Temporary, temp_path, use_stamp_path};
pub use store::{
    Cache, Entry, Eviction, Kind, KnownDigest, Lookup, LookupOptions, LookupStatus,
    PrecisionTotals, Removed, Stats,
};

/// Why a cache operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A filesystem operation failed.
    #[error("{path}: cannot {op}: {source}")]
    Io {
        /// The file or directory operated on.
        path: PathBuf,
        /// What could not be done, as the message's verb phrase (`stat the source`).
        op: &'static str,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The source is not a regular file.
    #[error("{0}: not a regular file")]
    NotAFile(PathBuf),
    /// Stopped through a cancel flag (an interrupt): hashing the file
    /// ([`LookupOptions::cancel`]), or waiting for the lock of the output at the path, or
    /// publishing it ([`OutputSlot`]).
    #[error("{0}: cancelled")]
    Cancelled(PathBuf),
    /// A sharded source's index or shards are invalid or unreadable.
    #[error(transparent)]
    Sharded(#[from] tensorfile::sharded::ShardError),
}
