//! Several sources and several targets in one request: every (source, target) pair planned
//! first, answers from the source or the cache given at once, the rest converted with each
//! source read once for all of its targets.
//!
//! [`convert_many`]:
//! 1. **Plan.** For each source, [`crate::check`] says which targets are answered without
//!    converting (the source is the target, a valid cached output); those pairs are answered
//!    right away with [`crate::smart_convert`] (which records the use), in order, the source
//!    digest one of them learned handed to the next ([`Options::known_digest`]). A source whose
//!    check fails (unreadable, unknown precision) is answered pair by pair the same way, so
//!    every pair gets [`crate::smart_convert`]'s own error. Every output path planned for the
//!    request is spared from eviction ([`Options::spare`]).
//! 2. **Convert.** The remaining pairs of a source form a group. A group of several targets
//!    shares one read of the source ([`tensorfile::shared_read`]; a safetensors file, each shard
//!    of a sharded source in turn, or a GGUF file): one thread per pair, each in a rayon pool
//!    of its own (a converter that runs ahead waits inside its reads for the others, which
//!    must not hold the threads they need), each reading through its [`SharedSeat`]; the
//!    shared read also hashes the source (a sharded source's shards, combined with its index
//!    as the cache's digest combines them), so no converter needs a hashing pass of its own,
//!    and a thread reads ahead of the converters while they compute. A group of one target
//!    converts as a single call would.
//! 3. **Jobs.** At most `jobs` conversions run at once; a shared group counts as
//!    `min(targets, jobs)` (its targets start together, or the source would be read again).
//!    Groups start in request order.
//!
//! A failed pair does not stop the others; each pair's result is its own.

use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use cache::KnownDigest;
use cache::digest::StreamDigest;
use detect::Precision;
use detect::detection::Format;
use tensorfile::shared_read::{Seat, SharedFiles, SharedRead, WindowConfig};

use crate::{Options, Outcome, SmartError};

/// One (source, target) pair of [`convert_many`] and its answer.
#[derive(Debug)]
pub struct PairResult {
    /// The source, as given.
    pub source: PathBuf,
    /// The requested precision.
    pub target: Precision,
    /// What [`crate::smart_convert`] answered for the pair.
    pub result: Result<Outcome, SmartError>,
    /// Time from the pair's start to its answer.
    pub elapsed: Duration,
}

/// The default number of conversions at once: the machine's available parallelism.
pub fn default_jobs() -> usize {
    std::thread::available_parallelism().map_or(1, NonZeroUsize::get)
}

/// One conversion's seat at a read of its source shared with the other conversions of the same
/// source ([`Options::shared_read`]).
#[derive(Clone)]
pub struct SharedSeat {
    source: Arc<SharedSource>,
    seat: Seat,
}

impl std::fmt::Debug for SharedSeat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedSeat")
            .field(
                "source",
                &self.source.files.files().first().map(|r| r.path()),
            )
            .finish_non_exhaustive()
    }
}

impl SharedSeat {
    /// The seat converters open the source with.
    pub(crate) fn seat(&self) -> &Seat {
        &self.seat
    }

    /// The source's size and digest as the shared read read it (reading what no converter
    /// needed, once every converter is past it); a sharded source's as
    /// [`cache::digest::sharded_digest`] makes it from its files' digests.
    pub(crate) fn source_digest(&self) -> std::io::Result<(u64, String)> {
        let source = &*self.source;
        let mut len = source.files.read_to_end()?;
        let digest = source.digest.get_or_init(|| {
            let mut digests: Vec<String> = source
                .hashers
                .iter()
                .map(|h| std::mem::take(&mut *h.lock().unwrap_or_else(|p| p.into_inner())).finish())
                .collect();
            match &source.index {
                Some((_, index_digest)) => {
                    digests.insert(0, index_digest.clone());
                    cache::digest::sharded_digest(&digests)
                }
                None => digests.pop().unwrap_or_default(),
            }
        });
        if let Some((index_len, _)) = &source.index {
            len = len.saturating_add(*index_len);
        }
        Ok((len, digest.clone()))
    }
}

/// A source read once for several conversions, hashed as it is read: one file (safetensors or
/// GGUF), or a sharded source's shards, each hashed as its window fetches it (the index, a
/// small file, is hashed when the source is opened).
struct SharedSource {
    files: SharedFiles,
    hashers: Vec<Arc<Mutex<StreamDigest>>>,
    /// A sharded source's index: its size and digest.
    index: Option<(u64, String)>,
    digest: OnceLock<String>,
}

impl SharedSource {
    /// Opens every file of `source` for `seats` conversions. A failure here only means the
    /// group converts without sharing (each conversion then reports what is wrong).
    fn open(source: &Path, seats: usize) -> std::io::Result<Arc<SharedSource>> {
        let resolved = tensorfile::diffusers::resolve_source(source);
        let (files, index) =
            match tensorfile::sharded::locate_index(&resolved).map_err(std::io::Error::other)? {
                Some(index_path) => {
                    let index = tensorfile::sharded::ShardIndex::read(&index_path)
                        .map_err(std::io::Error::other)?;
                    let bytes = std::fs::read(&index_path)?;
                    let index_digest = (bytes.len() as u64, cache::digest::digest_bytes(&bytes));
                    (index.shards, Some(index_digest))
                }
                None => (vec![resolved], None),
            };
        let mut reads = Vec::with_capacity(files.len());
        let mut hashers = Vec::with_capacity(files.len());
        for file in &files {
            let hasher = Arc::new(Mutex::new(StreamDigest::new()));
            let sink = Arc::clone(&hasher);
            let read = SharedRead::open(file, seats, WindowConfig::default(), move |bytes| {
                sink.lock().unwrap_or_else(|p| p.into_inner()).update(bytes)
            })?;
            reads.push(read);
            hashers.push(hasher);
        }
        Ok(Arc::new(SharedSource {
            files: SharedFiles::new(reads),
            hashers,
            index,
            digest: OnceLock::new(),
        }))
    }
}

/// The pairs of one source still to convert after planning.
struct Group<'s> {
    source: &'s Path,
    /// (row index, target)
    pairs: Vec<(usize, Precision)>,
    known_digest: Option<KnownDigest>,
}

/// Converts every source to every target (see the module documentation), at most `jobs`
/// conversions at once. Returns one result per pair, sources in order, each source's targets in
/// order.
pub fn convert_many(
    sources: &[PathBuf],
    targets: &[Precision],
    options: &Options<'_>,
    jobs: usize,
) -> Vec<PairResult> {
    let jobs = jobs.max(1);
    let options = &Options {
        room_in_flight: Some(options.room_in_flight.clone().unwrap_or_default()),
        ..options.clone()
    };
    let mut rows: Vec<Option<PairResult>> = Vec::new();
    rows.resize_with(sources.len() * targets.len(), || None);
    let mut spare = options.spare.clone();
    let mut groups = Vec::new();

    // 1. Plan every pair; answer what needs no conversion.
    for (si, source) in sources.iter().enumerate() {
        let checks = crate::check(source, targets, options).ok();
        for c in checks.iter().flatten() {
            spare.push(c.path.clone());
        }
        let mut known = options.known_digest.clone();
        let mut pairs = Vec::new();
        for (ti, &target) in targets.iter().enumerate() {
            let row = si * targets.len() + ti;
            if checks.as_ref().is_some_and(|c| !c[ti].valid) {
                pairs.push((row, target));
                continue;
            }
            let request = Options {
                known_digest: known.clone(),
                spare: spare.clone(),
                ..options.clone()
            };
            let answered = convert_pair(source, target, &request);
            if let Ok(o) = &answered.result {
                spare.push(o.path.clone());
                if o.known_digest.is_some() {
                    known.clone_from(&o.known_digest);
                }
            }
            rows[row] = Some(answered);
        }
        if !pairs.is_empty() {
            groups.push(Group {
                source,
                pairs,
                known_digest: known,
            });
        }
    }

    // 2. Convert the rest, group by group, at most `jobs` conversions at once.
    let converted = Mutex::new(Vec::new());
    let budget = Budget::new(jobs);
    std::thread::scope(|scope| {
        for group in &groups {
            let shared = group.pairs.len() > 1 && reads_shared(group.source);
            let weight = if shared {
                group.pairs.len().min(jobs)
            } else {
                1
            };
            budget.take(weight);
            let (budget, converted, spare) = (&budget, &converted, &spare);
            scope.spawn(move || {
                let results = match shared {
                    true => convert_shared(group, options, spare),
                    false => convert_in_turn(group, options, spare),
                };
                converted
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(results);
                budget.give(weight);
            });
        }
    });
    for (row, result) in converted.into_inner().unwrap_or_else(|p| p.into_inner()) {
        rows[row] = Some(result);
    }
    rows.into_iter()
        .map(|r| r.expect("every pair is answered in one of the two phases"))
        .collect()
}

/// [`crate::smart_convert`] of one pair, timed.
fn convert_pair(source: &Path, target: Precision, options: &Options<'_>) -> PairResult {
    let started = Instant::now();
    let result = crate::smart_convert(source, target, options);
    PairResult {
        source: source.to_path_buf(),
        target,
        result,
        elapsed: started.elapsed(),
    }
}

/// Whether `source` is what a shared read serves: a safetensors file, a sharded safetensors
/// source, or a GGUF file.
fn reads_shared(source: &Path) -> bool {
    detect::detect(source).is_ok_and(|d| matches!(d.format, Format::Safetensors | Format::Gguf))
}

/// The group's pairs one after another, each handing the source digest to the next.
fn convert_in_turn(
    group: &Group<'_>,
    options: &Options<'_>,
    spare: &[PathBuf],
) -> Vec<(usize, PairResult)> {
    let mut known = group.known_digest.clone();
    let mut out = Vec::new();
    for &(row, target) in &group.pairs {
        let request = Options {
            known_digest: known.clone(),
            spare: spare.to_vec(),
            ..options.clone()
        };
        let result = convert_pair(group.source, target, &request);
        if let Ok(o) = &result.result
            && o.known_digest.is_some()
        {
            known.clone_from(&o.known_digest);
        }
        out.push((row, result));
    }
    out
}

/// The group's pairs at once, reading the source once (see the module documentation). Falls
/// back to [`convert_in_turn`] when the source cannot be opened for sharing.
fn convert_shared(
    group: &Group<'_>,
    options: &Options<'_>,
    spare: &[PathBuf],
) -> Vec<(usize, PairResult)> {
    let Ok(shared) = SharedSource::open(group.source, group.pairs.len()) else {
        return convert_in_turn(group, options, spare);
    };
    let threads = default_jobs();
    let out = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        scope.spawn(|| shared.files.read_ahead());
        for (seat_index, &(row, target)) in group.pairs.iter().enumerate() {
            let seat = SharedSeat {
                source: Arc::clone(&shared),
                seat: shared.files.seat(seat_index),
            };
            let out = &out;
            scope.spawn(move || {
                let request = Options {
                    known_digest: group.known_digest.clone(),
                    spare: spare.to_vec(),
                    shared_read: Some(seat.clone()),
                    ..options.clone()
                };
                // A pool of its own: this conversion's reads may wait for the others.
                let result = match rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(move |i| format!("convcache-{seat_index}-{i}"))
                    .build()
                {
                    Ok(pool) => pool.install(|| convert_pair(group.source, target, &request)),
                    Err(_) => {
                        // Without a pool of its own it must not wait for the others: it
                        // leaves the shared read and reads on its own.
                        seat.seat.done();
                        let request = Options {
                            shared_read: None,
                            ..request
                        };
                        convert_pair(group.source, target, &request)
                    }
                };
                seat.seat.done();
                out.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((row, result));
            });
        }
    });
    out.into_inner().unwrap_or_else(|p| p.into_inner())
}

/// The outputs the conversions of one request are writing at once (planned bytes, reserved on
/// the disk, not yet listed in the cache) ([`Options::room_in_flight`]).
#[derive(Debug, Default)]
pub struct RoomInFlight {
    bytes: Mutex<u64>,
}

impl RoomInFlight {
    /// One conversion's turn to check for room: the others wait until it has reserved its
    /// output (or failed).
    pub(crate) fn enter(&self) -> RoomTurn<'_> {
        RoomTurn {
            owner: self,
            bytes: self.bytes.lock().unwrap_or_else(|p| p.into_inner()),
        }
    }
}

/// A conversion's turn at [`RoomInFlight`].
pub(crate) struct RoomTurn<'a> {
    owner: &'a RoomInFlight,
    bytes: MutexGuard<'a, u64>,
}

impl<'a> RoomTurn<'a> {
    /// Bytes the other conversions are writing.
    pub(crate) fn others(&self) -> u64 {
        *self.bytes
    }

    /// Counts `needed` bytes as being written until the returned guard is dropped, and ends
    /// the turn.
    pub(crate) fn hold(mut self, needed: u64) -> InFlightOutput<'a> {
        *self.bytes += needed;
        InFlightOutput {
            owner: self.owner,
            bytes: needed,
        }
    }
}

/// An output being written, counted in its [`RoomInFlight`] until dropped.
pub(crate) struct InFlightOutput<'a> {
    owner: &'a RoomInFlight,
    bytes: u64,
}

impl Drop for InFlightOutput<'_> {
    fn drop(&mut self) {
        let mut bytes = self.owner.bytes.lock().unwrap_or_else(|p| p.into_inner());
        *bytes = bytes.saturating_sub(self.bytes);
    }
}

/// Counts conversions running at once.
struct Budget {
    free: Mutex<usize>,
    freed: Condvar,
}

impl Budget {
    fn new(jobs: usize) -> Budget {
        Budget {
            free: Mutex::new(jobs),
            freed: Condvar::new(),
        }
    }

    /// Waits until `n` conversions may start, then counts them.
    fn take(&self, n: usize) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free < n {
            free = self.freed.wait(free).unwrap_or_else(|p| p.into_inner());
        }
        *free -= n;
    }

    /// `n` conversions ended.
    fn give(&self, n: usize) {
        *self.free.lock().unwrap_or_else(|p| p.into_inner()) += n;
        self.freed.notify_all();
    }
}
