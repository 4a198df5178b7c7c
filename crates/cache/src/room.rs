//! Room for an output about to be written: how much the disk or the cache's size budget lacks,
//! and least-recently-used eviction of other outputs until it fits ([`Cache::make_room`]).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::CacheError;
use crate::store::{Cache, Kind, Removed};

/// An output about to be written, and what it must fit into.
#[derive(Debug, Clone, Copy)]
pub struct RoomRequest<'a> {
    /// Where the output will be published (its temporary is written beside it).
    pub output: &'a Path,
    /// The output's exact size in bytes.
    pub output_bytes: u64,
    /// Bytes free on the filesystem of the output's dir.
    pub disk_available: u64,
    /// The cache's size budget: its outputs, the new one included, total at most this.
    pub max_cache_bytes: Option<u64>,
    /// Files never removed to make room (the source, outputs the caller already answered with).
    pub spare: &'a [PathBuf],
}

/// Bytes missing for an output to fit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Shortfall {
    /// On the filesystem of the output's dir.
    pub disk: u64,
    /// Over the cache's size budget.
    pub budget: u64,
}

impl Shortfall {
    /// Whether nothing is missing.
    pub fn is_none(&self) -> bool {
        *self == Shortfall::default()
    }
}

/// What [`Cache::make_room`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Room {
    /// What was missing before anything was removed.
    pub shortfall: Shortfall,
    /// The outputs removed (in a dry run: that would be removed), least recently used first.
    pub removed: Vec<Removed>,
    /// Whether the output fits once they are gone.
    pub enough: bool,
}

impl Room {
    /// Bytes of the removed outputs.
    pub fn removed_bytes(&self) -> u64 {
        self.removed.iter().map(|r| r.size).sum()
    }
}

impl Cache {
    /// How much `request`'s output lacks, and, least recently used first, the outputs whose
    /// removal makes it fit: only what [`Cache::remove_output`] may remove (convcache's own
    /// outputs whose lock is free), never a file in `request.spare`, and only as many as needed
    /// (on the disk, only outputs on the output's filesystem count, by the blocks they free).
    /// With `dry_run` nothing is removed: the answer says what would be.
    ///
    /// The budget counts every listed output except the one at the output path, which the new
    /// output replaces.
    pub fn make_room(&self, request: &RoomRequest<'_>, dry_run: bool) -> Result<Room, CacheError> {
        let mut shortfall = Shortfall {
            disk: request.output_bytes.saturating_sub(request.disk_available),
            budget: 0,
        };
        if shortfall.is_none() && request.max_cache_bytes.is_none() {
            return Ok(Room {
                enough: true,
                ..Room::default()
            });
        }
        let mut entries = self.list(Kind::All)?;
        if let Some(max) = request.max_cache_bytes {
            let cached: u64 = entries
                .iter()
                .filter(|e| e.path != request.output)
                .map(|e| e.size)
                .sum();
            shortfall.budget = cached
                .saturating_add(request.output_bytes)
                .saturating_sub(max);
        }
        let mut room = Room {
            shortfall,
            removed: Vec::new(),
            enough: false,
        };
        let dir = request.output.parent().unwrap_or(Path::new("."));
        let device = fs::metadata(dir).map(|m| m.dev()).ok();
        entries.retain(|e| e.provenance.is_some() && e.path != request.output);
        entries.sort_by(|a, b| a.last_used.cmp(&b.last_used).then(a.path.cmp(&b.path)));
        let mut missing = shortfall;
        for e in entries {
            if missing.is_none() {
                break;
            }
            if request.spare.iter().any(|s| same_file(s, &e.path)) {
                continue;
            }
            let Ok(meta) = fs::symlink_metadata(&e.path) else {
                continue;
            };
            // A hard-linked file frees no blocks when this name goes.
            let disk_gain = match Some(meta.dev()) == device && meta.nlink() == 1 {
                true => meta.blocks().saturating_mul(512),
                false => 0,
            };
            if missing.budget == 0 && disk_gain == 0 {
                continue;
            }
            if self.remove_output(&e.path, dry_run)? {
                missing.budget = missing.budget.saturating_sub(e.size);
                missing.disk = missing.disk.saturating_sub(disk_gain);
                room.removed.push(Removed {
                    path: e.path,
                    size: e.size,
                });
            }
        }
        room.enough = missing.is_none();
        Ok(room)
    }
}

/// Whether `a` and `b` are the same file (both exist and share device and inode).
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}
