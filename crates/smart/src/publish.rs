//! Stage 3: convert in the output's slot ([`cache::OutputSlot`]: its lock, temporary, record and
//! atomic publish), verifying the temporary before it is published.
//!
//! The output's digest is computed from the bytes as they are written (no second read) and
//! handed to the slot, which records it in the output record ([`cache::record`]) before the
//! rename; see [`cache::OutputSlot`] for why no crash can serve a file against a record of other
//! bytes. This module owns what is written and when to stop: room for the output (free space,
//! the size budget, eviction to make room) and the file-size limit, the placeholder source
//! digest, cancellation while writing, writeback, verification; and the observer's events from
//! planning to publishing.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use cache::journal::{Checkpoint, ConversionIdentity, Journal};
use cache::{
    Cache, CacheError, KnownDigest, Lookup, LookupOptions, LookupStatus, OutputSlot, Provenance,
    Removed, Room, RoomRequest, digest,
};
use detect::{Detection, Precision};

use crate::{
    Backend, BackendOptions, ConversionReport, Job, Options, Pair, PlannedConversion, SmartError,
    Stage, Status,
};

/// How many times the lock is re-taken when the output path moves under us (another source
/// claimed the plain name meanwhile). More would mean a livelock, not progress.
const MAX_LOCK_ATTEMPTS: usize = 4;

/// Write buffer between the converter and the temporary file.
const WRITE_BUFFER: usize = 1 << 20;

pub(crate) struct Convert<'a> {
    pub cache: &'a Cache,
    pub source: &'a Path,
    pub detection: &'a Detection,
    pub target: Precision,
    pub backend: &'a dyn Backend,
    pub backend_options: BackendOptions,
    pub lookup_options: &'a LookupOptions,
    pub options: &'a Options<'a>,
}

pub(crate) struct Done {
    pub status: Status,
    pub path: PathBuf,
    pub report: Option<ConversionReport>,
    pub replaced: Option<String>,
    pub note: Option<String>,
    pub removed: Vec<Removed>,
    pub known_digest: Option<KnownDigest>,
    pub resumed_from: Option<u64>,
}

/// The source digest a lookup knows for the source as it found it: a hit's provenance digest
/// (its facts matched, or its digest was computed), or the digest the lookup computed.
pub(crate) fn known_digest(lookup: &Lookup) -> Option<KnownDigest> {
    let digest = match (&lookup.status, &lookup.provenance) {
        (LookupStatus::Hit, Some(p)) => Some(p.source_digest.clone()),
        _ => lookup.source_digest.clone(),
    }?;
    Some(KnownDigest {
        source: lookup.source.clone(),
        digest,
    })
}

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> SmartError {
    let path = path.to_path_buf();
    move |source| SmartError::Io { path, op, source }
}

/// Written bytes between two requests to start their writeback (see [`Sink::start_writeback`]).
const WRITEBACK_STEP: u64 = 16 << 20;

/// The resume journal kept while writing (see [`cache::journal`]).
struct Checkpoints {
    /// The output the journal is of.
    output: PathBuf,
    /// The temporary written.
    temporary: PathBuf,
    identity: ConversionIdentity,
    /// When resumed: the checkpoint continued from, where the stream must line up.
    resumed: Option<Checkpoint>,
    /// Pieces at the last checkpoint.
    pieces: u64,
    last: Instant,
    /// The least time between two checkpoints ([`Options::checkpoint_every`]).
    every: Duration,
    /// Make the data durable before journaling it.
    sync: bool,
    /// Set when a journal could not be written: no more are (the conversion goes on).
    failed: bool,
}

/// The temporary file's writer: remembers the first I/O error (to tell a full disk from other
/// failures whatever the converter wraps it in), counts and hashes bytes, honours cancellation
/// and, when the output will be fsynced, starts writeback early.
struct Sink<'a> {
    file: &'a File,
    written: u64,
    hasher: digest::StreamDigest,
    error: Option<(io::ErrorKind, Option<i32>)>,
    cancel: Option<&'a AtomicBool>,
    cancelled: bool,
    /// Start writeback while converting (the output is fsynced before publishing).
    early_writeback: bool,
    /// Bytes whose writeback has been started.
    writeback_started: u64,
    /// Bytes still to drop (a resumed conversion's stream before its checkpoint, already in
    /// the temporary).
    discard: u64,
    checkpoints: Checkpoints,
    /// The resumed stream did not line up with its journal's checkpoint.
    resume_mismatch: bool,
    /// Resuming, until the stream's boundary 0: compare the bytes discarded (the header the
    /// converter writes before its stream) with the temporary's.
    check_head: bool,
}

impl Sink<'_> {
    /// Asks the kernel to start writing the bytes written since the last request to the disk,
    /// without waiting. Otherwise nothing reaches the disk until the final fsync (a model is
    /// far below the dirty-page thresholds), which then waits for the whole output; started
    /// early, the disk works while the conversion runs and the fsync waits only for the tail.
    fn start_writeback(&mut self) {
        #[cfg(target_os = "linux")]
        if self.early_writeback && self.written - self.writeback_started >= WRITEBACK_STEP {
            use std::os::fd::AsRawFd;
            let (from, len) = (
                self.writeback_started,
                self.written - self.writeback_started,
            );
            // SAFETY: sync_file_range only reads its integer arguments; the descriptor is open
            // for the lifetime of `self.file`. It is advisory: an error (say, a filesystem that
            // does not support it) only means writeback starts later, at the fsync.
            unsafe {
                libc::sync_file_range(
                    self.file.as_raw_fd(),
                    from as libc::off64_t,
                    len as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
            self.writeback_started = self.written;
        }
    }
}

impl Sink<'_> {
    /// At a boundary the stream can be resumed from, with `pieces` pieces written: checks a
    /// resumed stream lines up with its checkpoint, and journals a checkpoint when one is due.
    fn boundary(&mut self, pieces: u64) -> io::Result<()> {
        if pieces == 0 {
            self.check_head = false;
            return Ok(());
        }
        let cp = &mut self.checkpoints;
        if let Some(resumed) = &cp.resumed
            && pieces <= resumed.pieces
        {
            if pieces != resumed.pieces || self.discard != 0 || self.written != resumed.offset {
                self.resume_mismatch = true;
                return Err(io::Error::other(
                    "the resumed conversion does not line up with its journal",
                ));
            }
            return Ok(());
        }
        if cp.failed || pieces <= cp.pieces || cp.last.elapsed() < cp.every {
            return Ok(());
        }
        if cp.sync {
            // The journal must never promise bytes that are not on the disk.
            self.file.sync_data()?;
        }
        let checkpoint = Checkpoint {
            pieces,
            offset: self.written,
            digest: self.hasher.digest_so_far(),
        };
        let journal = Journal::new(&cp.temporary, cp.identity.clone(), checkpoint);
        // Best effort: a conversion that cannot journal still converts.
        cp.failed = cache::journal::write_journal(&cp.output, &journal, cp.sync).is_err();
        cp.pieces = pieces;
        cp.last = Instant::now();
        Ok(())
    }
}

impl Write for Sink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            self.cancelled = true;
            return Err(io::Error::other("conversion cancelled"));
        }
        if self.discard > 0 {
            let n = self.discard.min(buf.len() as u64);
            if self.check_head {
                // The header depends on more than the journal's identity (the source's
                // metadata, the converter's code): it must be the temporary's, byte for byte.
                let mut on_disk = vec![0u8; n as usize];
                let at = self.written - self.discard;
                let same = std::os::unix::fs::FileExt::read_exact_at(self.file, &mut on_disk, at)
                    .is_ok_and(|()| on_disk == buf[..n as usize]);
                if !same {
                    self.resume_mismatch = true;
                    return Err(io::Error::other(
                        "the resumed conversion's header differs from its temporary's",
                    ));
                }
            }
            self.discard -= n;
            return Ok(n as usize);
        }
        match (&mut self.file).write(buf) {
            Ok(n) => {
                self.written += n as u64;
                self.hasher.update(&buf[..n]);
                self.start_writeback();
                Ok(n)
            }
            Err(e) => {
                self.error.get_or_insert((e.kind(), e.raw_os_error()));
                Err(e)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        (&mut self.file).flush()?;
        match tensorfile::pipeline::at_boundary() {
            Some(pieces) => self.boundary(pieces),
            None => Ok(()),
        }
    }
}

fn is_no_space(raw: Option<i32>, kind: io::ErrorKind) -> bool {
    kind == io::ErrorKind::StorageFull
        || kind == io::ErrorKind::FileTooLarge
        || raw.is_some_and(|r| r == libc::ENOSPC || r == libc::EFBIG || r == libc::EDQUOT)
}

/// A slot's error while taking the lock or publishing `out`: a cancel is this conversion's, and
/// a full disk (ENOSPC/EFBIG at the final sync or the record) is reported as such.
fn slot_error(e: CacheError, out: &Path) -> SmartError {
    match e {
        CacheError::Cancelled(_) => SmartError::Cancelled(out.to_path_buf()),
        CacheError::Io { source, .. } if is_no_space(source.raw_os_error(), source.kind()) => {
            SmartError::DiskFull {
                path: out.to_path_buf(),
                source,
            }
        }
        e => SmartError::Cache(e),
    }
}

impl Convert<'_> {
    fn pair(&self) -> Pair<'_> {
        Pair {
            source: self.source,
            target: self.target,
        }
    }

    fn stage(&self, stage: Stage) {
        if let Some(o) = self.options.observer {
            o.stage(self.pair(), stage);
        }
    }

    fn bytes(&self, stage: Stage, done: u64, total: u64) {
        if let Some(o) = self.options.observer {
            o.bytes(self.pair(), stage, done, total);
        }
    }

    fn tensor(&self, index: u64, count: u64) {
        if let Some(o) = self.options.observer {
            o.tensor(self.pair(), index, count);
        }
    }

    pub(crate) fn run(&self, first: Lookup) -> Result<Done, SmartError> {
        let mut lookup = first;
        for _ in 0..MAX_LOCK_ATTEMPTS {
            let out = lookup.path.clone();
            let slot = OutputSlot::acquire(&out, self.options.cancel.as_deref())
                .map_err(|e| slot_error(e, &out))?;

            // Another process may have finished while we waited, or the source changed.
            let again =
                self.cache
                    .lookup_again(self.source, self.target, self.lookup_options, &lookup)?;
            if again.path != out {
                lookup = again;
                continue;
            }
            match again.status {
                LookupStatus::Hit | LookupStatus::Unverified => {
                    slot.record_hit(&again);
                    let status = if again.status == LookupStatus::Hit {
                        Status::Cached
                    } else {
                        Status::CachedUnverified
                    };
                    return Ok(Done {
                        status,
                        path: out,
                        report: None,
                        replaced: None,
                        removed: Vec::new(),
                        known_digest: known_digest(&again),
                        note: again.note,
                        resumed_from: None,
                    });
                }
                // `again` carries the first lookup's digest only if the source's size and
                // mtime are unchanged since; a digest of older content must not be recorded.
                _ => return self.convert_locked(&slot, again),
            }
            // The slot's lock is released here, on drop.
        }
        Err(SmartError::Io {
            path: lookup.path,
            op: "settle on an output path (it kept changing)",
            source: io::Error::other("too many attempts"),
        })
    }

    /// Converts into `lookup.path`, whose slot the caller holds.
    fn convert_locked(&self, slot: &OutputSlot, lookup: Lookup) -> Result<Done, SmartError> {
        let out = lookup.path.clone();
        if cache::same_file(&out, self.source) {
            return Err(SmartError::SourceIsOutput(self.source.to_path_buf()));
        }
        // Other outputs' leftovers: best effort, a failure here is not this conversion's.
        let _ = self.cache.sweep_temporaries();

        let mut digest = lookup.source_digest.clone();
        let mut removed = Vec::new();
        if self.options.resume
            && let Some(planned) = self.plan_resumed(slot, &lookup)?
        {
            // A digest hashed for the resume serves a start over too.
            if planned.hashed.is_some() {
                digest.clone_from(&planned.hashed);
            }
            match self.write_temporary(slot, &lookup, planned, &mut removed, true)? {
                Written::Published(report, digest, resumed_from) => {
                    let done = self.published(slot, &lookup, out, report, digest);
                    return Ok(Done {
                        removed,
                        resumed_from,
                        ..done
                    });
                }
                Written::Retry(computed) => digest = Some(computed),
                Written::StartOver => {}
            }
        }
        // At most twice: the second time with the digest the first pass computed, when its
        // placeholder could not be patched (see `write_temporary`).
        for _ in 0..2 {
            let planned = self.plan(&lookup, digest.as_deref())?;
            match self.write_temporary(slot, &lookup, planned, &mut removed, false)? {
                Written::Published(report, digest, _) => {
                    let done = self.published(slot, &lookup, out, report, digest);
                    return Ok(Done { removed, ..done });
                }
                Written::Retry(computed) => digest = Some(computed),
                Written::StartOver => {}
            }
        }
        Err(SmartError::Verify {
            path: out,
            problem: "the source digest could not be written into the output's header".into(),
        })
    }

    /// Plans the conversion with its provenance. Without a known source digest, a converter
    /// that reads the whole source in order is planned with a placeholder digest, to be
    /// replaced by the digest of the bytes it reads; any other converter waits for a hashing
    /// pass over the source first.
    fn plan(&self, lookup: &Lookup, known_digest: Option<&str>) -> Result<Planned, SmartError> {
        let plan_with = |digest: String| self.plan_with(lookup, digest);
        let planned = |(provenance, conversion), placeholder| Planned {
            provenance,
            conversion,
            placeholder,
            hashed: None,
        };
        if let Some(d) = known_digest {
            return Ok(planned(plan_with(d.to_owned())?, None));
        }
        // A shared read hashes the source as it reads it, for every converter.
        if self.backend.observes_source(self.detection, self.target)
            || self.options.shared_read.is_some()
        {
            let placeholder = placeholder_digest();
            let plan = plan_with(placeholder.clone())?;
            return Ok(planned(plan, Some(placeholder)));
        }
        let digest = self.hash_source(lookup)?;
        Ok(planned(plan_with(digest)?, None))
    }

    /// The conversion planned with `digest` as the source digest in its provenance.
    fn plan_with(
        &self,
        lookup: &Lookup,
        digest: String,
    ) -> Result<(Provenance, Box<dyn PlannedConversion>), SmartError> {
        let version = self
            .backend
            .converter_version(self.target, &self.backend_options);
        let provenance = Provenance::new(&lookup.source, digest, self.target, version);
        let planned = self.backend.plan(&Job {
            source_path: self.source,
            source: self.detection,
            target: self.target,
            extra_metadata: &provenance.to_metadata(),
            options: self.backend_options,
            shared_read: self.options.shared_read.as_ref().map(|sr| sr.seat()),
        })?;
        Ok((provenance, planned))
    }

    /// The conversion an interrupted one of this output was, planned again with the source
    /// digest its journal records (the header it wrote), when the source is unchanged since:
    /// same path, size and mtime (the cache's fast identity), and the same digest when the
    /// lookup knows it. With a placeholder in that header, the source is hashed first, in a
    /// separate pass (the converter's own pass no longer reads all of it). `None` when there
    /// is nothing to resume; whether the temporary checks out is for `write_temporary`.
    fn plan_resumed(
        &self,
        slot: &OutputSlot,
        lookup: &Lookup,
    ) -> Result<Option<Planned>, SmartError> {
        let Some(journal) = cache::journal::read_journal(slot.output()) else {
            return Ok(None);
        };
        let id = &journal.identity;
        let src = &lookup.source;
        let same_source = (&id.source_path, id.source_size, id.source_mtime_ns)
            == (&src.path, src.size, src.mtime_ns);
        let same_digest = id.placeholder
            || lookup
                .source_digest
                .as_ref()
                .is_none_or(|d| *d == id.source_digest);
        if !(same_source && same_digest) {
            return Ok(None);
        }
        let hashed = if id.placeholder {
            Some(self.hash_source(lookup)?)
        } else {
            None
        };
        let (provenance, conversion) = self.plan_with(lookup, id.source_digest.clone())?;
        Ok(Some(Planned {
            provenance,
            conversion,
            placeholder: id.placeholder.then(|| id.source_digest.clone()),
            hashed,
        }))
    }

    /// Hashes the source (a pass of its own), reporting it as the hashing stage.
    fn hash_source(&self, lookup: &Lookup) -> Result<String, SmartError> {
        self.stage(Stage::Hashing);
        let mut hashed = 0;
        let digest = digest::digest_file_cancellable(
            self.source,
            &mut |done, total| {
                hashed = done;
                self.bytes(Stage::Hashing, done, total)
            },
            self.options.cancel.as_deref(),
        )?;
        let total = lookup.source.size;
        if hashed != total {
            self.bytes(Stage::Hashing, total, total);
        }
        Ok(digest)
    }

    /// What the resume journal says this conversion is.
    fn identity(&self, planned: &Planned) -> ConversionIdentity {
        let p = &planned.provenance;
        ConversionIdentity {
            source_path: p.source_path.clone(),
            source_size: p.source_size,
            source_mtime_ns: p.source_mtime_ns,
            source_digest: p.source_digest.clone(),
            placeholder: planned.placeholder.is_some(),
            target: self.target.canonical_name().to_string(),
            converter_version: p.converter_version.clone(),
            output_len: planned.conversion.output_len(),
        }
    }

    /// Streams `planned` into the slot's temporary, verifies it and publishes it. With a
    /// placeholder digest in its header, the source is hashed as the converter reads it (or was
    /// hashed before, when resuming) and the placeholder is overwritten in place; if the
    /// placeholder is not found exactly once in the output's first chunk, the temporary is
    /// dropped (which removes it) and [`Written::Retry`] carries the computed digest for a
    /// conversion planned with it. Outputs evicted to make room are added to `removed`.
    ///
    /// `resume`: continue the interrupted conversion's temporary if its journal and bytes check
    /// out ([`OutputSlot::resume`]), else [`Written::StartOver`]. Either way the stream is
    /// resumable ([`tensorfile::pipeline::resumable`]): checkpoints are journaled as it goes,
    /// and a cancel keeps the temporary and its journal for the next run.
    fn write_temporary(
        &self,
        slot: &OutputSlot,
        lookup: &Lookup,
        planned: Planned,
        removed: &mut Vec<Removed>,
        resume: bool,
    ) -> Result<Written, SmartError> {
        let out = slot.output();
        let dir = out.parent().unwrap_or(Path::new("."));
        let identity = self.identity(&planned);
        let Planned {
            mut provenance,
            conversion: planned,
            placeholder: digest_in_pass,
            hashed,
        } = planned;
        let needed = planned.output_len();
        let hold_head = digest_in_pass.is_some();
        let sync = self.options.sync_output;
        let (mut temporary, resumed, hasher) = if resume {
            match slot
                .resume(&identity, hold_head, sync)
                .map_err(|e| slot_error(e, out))?
            {
                Ok(r) => (r.temporary, Some(r.checkpoint), r.digest),
                Err(_why) => return Ok(Written::StartOver),
            }
        } else {
            let hasher = if hold_head {
                digest::StreamDigest::holding_head()
            } else {
                digest::StreamDigest::new()
            };
            let temporary = slot
                .create_temporary(sync)
                .map_err(|e| slot_error(e, out))?;
            (temporary, None, hasher)
        };
        let offset = resumed.as_ref().map_or(0, |c| c.offset);
        // Conversions of one request running at once check for room one at a time, each
        // counting the outputs the others are writing.
        let turn = self
            .options
            .room_in_flight
            .as_deref()
            .map(crate::many::RoomInFlight::enter);
        let others = turn.as_ref().map_or(0, |t| t.others());
        removed.extend(self.fit(dir, out, needed - offset, others)?);
        let tmp = temporary.path().to_path_buf();
        reserve_space(temporary.file(), out, needed)?;
        let _in_flight = turn.map(|t| t.hold(needed));
        let mut writer = BufWriter::with_capacity(
            WRITE_BUFFER,
            Sink {
                file: temporary.file(),
                written: offset,
                hasher,
                error: None,
                cancel: self.options.cancel.as_deref(),
                cancelled: false,
                early_writeback: temporary.is_synced(),
                writeback_started: offset,
                discard: offset,
                checkpoints: Checkpoints {
                    output: out.to_path_buf(),
                    temporary: tmp.clone(),
                    identity,
                    pieces: resumed.as_ref().map_or(0, |c| c.pieces),
                    resumed: resumed.clone(),
                    last: Instant::now(),
                    every: self.options.checkpoint_every,
                    sync: temporary.is_synced(),
                    failed: false,
                },
                resume_mismatch: false,
                check_head: resumed.is_some(),
            },
        );
        let (bytes_total, tensors_total) = planned.totals();
        if let Some(o) = self.options.observer {
            o.planned(self.pair(), needed, bytes_total, tensors_total);
        }
        self.stage(Stage::Converting);
        self.bytes(Stage::Converting, 0, bytes_total);
        // Converters report (bytes done, tensors done); each newly finished tensor is an event
        // of its own, before the bytes that finished it.
        let (mut tensors_reported, mut bytes_reported) = (0, 0);
        let mut progress = |bytes_done: u64, tensors_done: u64| {
            for index in tensors_reported..tensors_done.min(tensors_total) {
                self.tensor(index, tensors_total);
            }
            tensors_reported = tensors_reported.max(tensors_done.min(tensors_total));
            bytes_reported = bytes_reported.max(bytes_done);
            self.bytes(Stage::Converting, bytes_reported, bytes_total);
        };
        let mut source_hasher = digest::StreamDigest::new();
        let shared = self.options.shared_read.as_ref();
        let skip = resumed.as_ref().map_or(0, |c| c.pieces);
        let result = tensorfile::pipeline::resumable(skip, || match (&digest_in_pass, &hashed) {
            (Some(_), None) if shared.is_none() => {
                planned.write_observing_source(&mut writer, &mut progress, &mut |bytes: &[u8]| {
                    source_hasher.update(bytes)
                })
            }
            _ => planned.write(&mut writer, &mut progress),
        })
        .and_then(|report| {
            writer
                .flush()
                .map_err(io_err(&tmp, "write the temporary output"))?;
            Ok(report)
        });
        let sink = writer.get_ref();
        let (cancelled, first_error, written) = (sink.cancelled, sink.error, sink.written);
        let resume_mismatch = sink.resume_mismatch;
        let report = match result {
            Ok(r) => {
                // Written completely: whatever the converter's last report said.
                progress(bytes_total, tensors_total);
                r
            }
            Err(e) => {
                drop(writer);
                if cancelled {
                    // Kept with its journal (if a checkpoint was journaled): the next
                    // conversion of this output continues from there. Otherwise dropping the
                    // temporary removes both.
                    if self.options.keep_on_cancel {
                        temporary.keep_for_resume();
                    }
                    return Err(SmartError::Cancelled(out.to_path_buf()));
                }
                if resume_mismatch || (resumed.is_some() && first_error.is_none()) {
                    // The resumed stream did not line up with its journal, or the converter
                    // failed after a resume: convert from the start (a real fault recurs there
                    // and is reported then).
                    return Ok(Written::StartOver);
                }
                if let Some((kind, raw)) = first_error
                    && is_no_space(raw, kind)
                {
                    let source = raw
                        .map(io::Error::from_raw_os_error)
                        .unwrap_or_else(|| io::Error::from(kind));
                    return Err(SmartError::DiskFull {
                        path: out.to_path_buf(),
                        source,
                    });
                }
                return Err(e);
            }
        };
        let mut sink = writer
            .into_inner()
            .map_err(|e| io_err(&tmp, "write the temporary output")(e.into_error()))?;
        // Done reading: a shared read no longer waits for this conversion.
        drop(planned);
        if let Some(placeholder) = digest_in_pass {
            let digest = match hashed {
                // Resumed: hashed in a pass of its own before converting.
                Some(digest) => digest,
                None => {
                    let (hashed_len, digest) = match shared {
                        Some(s) => s
                            .source_digest()
                            .map_err(io_err(self.source, "read the source"))?,
                        None => (source_hasher.len(), source_hasher.finish()),
                    };
                    if hashed_len != lookup.source.size {
                        return Err(SmartError::Io {
                            path: self.source.to_path_buf(),
                            op: "read the source",
                            source: io::Error::other(format!(
                                "it changed during the conversion ({} bytes read, {} expected)",
                                hashed_len, lookup.source.size
                            )),
                        });
                    }
                    // The digest covers the bytes as they were read. A source rewritten in
                    // place during the read (same size) gives a digest of no real state of the
                    // file, but also a new mtime, so the output is stale at its next lookup,
                    // never a wrong hit.
                    digest
                }
            };
            let Some(at) = only_occurrence(sink.hasher.head(), placeholder.as_bytes()) else {
                return Ok(Written::Retry(digest));
            };
            if !sink.hasher.patch_head(at, digest.as_bytes()) {
                return Ok(Written::Retry(digest));
            }
            // Bytes before the last checkpoint change: no longer resumable.
            temporary.forget_journal();
            write_at(sink.file, digest.as_bytes(), at as u64).map_err(io_err(
                &tmp,
                "write the source digest into the temporary output",
            ))?;
            provenance.source_digest = digest;
        }
        let output_digest = std::mem::take(&mut sink.hasher).finish();
        drop(sink);

        self.stage(Stage::Verifying);
        verify(&tmp, out, self.target, &provenance, needed, written)?;
        self.stage(Stage::Publishing);
        slot.publish(temporary, output_digest, self.options.cancel.as_deref())
            .map_err(|e| slot_error(e, out))?;
        Ok(Written::Published(
            report,
            provenance.source_digest,
            resumed.map(|c| c.offset),
        ))
    }

    /// Fails early, before writing anything, when the output cannot fit: free space in `dir`
    /// and [`Options::max_cache_size`] (with [`Options::make_room`], evicting least recently
    /// used outputs first when that makes it fit; they are returned), and the file-size limit.
    /// `others`: bytes of outputs other conversions of the request are writing (already
    /// reserved on the disk, not yet listed in the cache), which count against the budget.
    fn fit(
        &self,
        dir: &Path,
        out: &Path,
        needed: u64,
        others: u64,
    ) -> Result<Vec<Removed>, SmartError> {
        let available_space =
            || fs4::available_space(dir).map_err(io_err(dir, "read the free space of"));
        let available = available_space()?;
        let mut spare = self.options.spare.clone();
        spare.push(self.source.to_path_buf());
        let request = RoomRequest {
            output: out,
            output_bytes: needed + others,
            // Their blocks are reserved already: not missing from the disk a second time.
            disk_available: available + others,
            max_cache_bytes: self.options.max_cache_size,
            spare: &spare,
        };
        let would = self.cache.make_room(&request, true)?;
        let mut removed = Vec::new();
        if !would.shortfall.is_none() {
            if !(self.options.make_room && would.enough) {
                return Err(self.no_room(out, needed, available, would, false));
            }
            let room = self.cache.make_room(&request, false)?;
            let available = available_space()?;
            if !room.enough || available < needed {
                return Err(self.no_room(out, needed, available, room, true));
            }
            removed = room.removed;
        }
        check_file_size_limit(out, needed)?;
        Ok(removed)
    }

    /// The error for an output that does not fit: no space on the disk, else over the budget.
    fn no_room(
        &self,
        out: &Path,
        needed: u64,
        available: u64,
        room: Room,
        evicted: bool,
    ) -> SmartError {
        let path = out.to_path_buf();
        match (
            room.shortfall.disk > 0 || available < needed,
            self.options.max_cache_size,
        ) {
            (false, Some(max)) => SmartError::OverBudget {
                path,
                needed,
                max,
                over: room.shortfall.budget,
                room,
                evicted,
            },
            _ => SmartError::NoSpace {
                path,
                needed,
                available,
                room,
                evicted,
            },
        }
    }

    /// After a publish: the use stamp, older outputs of this source removed, the answer.
    fn published(
        &self,
        slot: &OutputSlot,
        lookup: &Lookup,
        out: PathBuf,
        report: ConversionReport,
        source_digest: String,
    ) -> Done {
        slot.record_use();
        for old in &lookup.superseded {
            let _ = self.cache.remove_output(old, false);
        }
        let replaced = match &lookup.status {
            LookupStatus::Missing => None,
            LookupStatus::Stale(r) => Some(format!("stale: {r}")),
            LookupStatus::Broken(r) => Some(format!("broken: {r}")),
            LookupStatus::Foreign => Some("a file without provenance (strict)".into()),
            LookupStatus::Hit | LookupStatus::Unverified => None,
        };
        Done {
            status: Status::Converted,
            path: out,
            report: Some(report),
            replaced,
            note: lookup.note.clone(),
            removed: Vec::new(),
            resumed_from: None,
            // The digest recorded in the provenance, of the source as the lookup found it.
            known_digest: Some(KnownDigest {
                source: lookup.source.clone(),
                digest: source_digest,
            }),
        }
    }
}

/// A planned conversion and the provenance written into its header.
struct Planned {
    provenance: Provenance,
    conversion: Box<dyn PlannedConversion>,
    /// The stand-in for the source digest in the header, when the digest is computed in the
    /// conversion's own pass (or, resuming, was computed before).
    placeholder: Option<String>,
    /// The source digest to overwrite the placeholder with, when resuming (the converter's
    /// own pass reads only what is left of the source).
    hashed: Option<String>,
}

/// What [`Convert::write_temporary`] ended with.
enum Written {
    /// Published; the converter's report, the source digest in its provenance, and the byte
    /// it resumed from.
    Published(ConversionReport, String, Option<u64>),
    /// Nothing published: plan again with this source digest.
    Retry(String),
    /// Nothing to resume (or the resumed stream did not line up): convert from the start.
    StartOver,
}

/// A stand-in for the source digest in a header written before the source has been read:
/// 32 hex digits like a real digest (so the header keeps its planned size), unpredictable
/// so that no source metadata contains it by accident.
fn placeholder_digest() -> String {
    use std::sync::atomic::AtomicU64;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let seed = [
        nanos.to_le_bytes().as_slice(),
        &std::process::id().to_le_bytes(),
        &COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes(),
        &(&nanos as *const u128 as usize).to_le_bytes(),
    ]
    .concat();
    digest::digest_bytes(&seed)
}

/// The offset of the one occurrence of `needle` in `hay`, or `None` if it occurs zero or
/// several times.
fn only_occurrence(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, _) = needle.split_first()?;
    // Compare whole windows only where the first byte matches: the head is megabytes of
    // tensor data, where that byte is rare.
    let mut found = hay
        .iter()
        .enumerate()
        .filter(|&(i, &b)| b == first && hay[i..].starts_with(needle))
        .map(|(i, _)| i);
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

/// A positioned write of all of `bytes` at `offset`.
fn write_at(file: &File, bytes: &[u8], offset: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, bytes, offset)
}

/// The soft file-size limit, when `needed` exceeds it: exceeding it would raise SIGXFSZ, which
/// kills by default, so it fails early, before writing anything.
fn check_file_size_limit(out: &Path, needed: u64) -> Result<(), SmartError> {
    match file_size_limit() {
        Some(limit) if needed > limit => Err(SmartError::FileSizeLimit {
            path: out.to_path_buf(),
            needed,
            limit,
        }),
        _ => Ok(()),
    }
}

/// Reserves the output's blocks before anything is written (`fallocate` with
/// `FALLOC_FL_KEEP_SIZE`: the file still grows only as it is written). Another writer can then
/// no longer fill the disk under a running conversion (no space is an error before the first
/// byte), and ext4 writes into reserved blocks without its per-page delayed-allocation work
/// (about 10% less CPU for an f32 -> bf16 cast here). Best effort where the filesystem cannot
/// reserve (`EOPNOTSUPP` and the like): the free-space check before still stands.
fn reserve_space(file: &File, out: &Path, needed: u64) -> Result<(), SmartError> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let Ok(len) = libc::off_t::try_from(needed) else {
            return Ok(());
        };
        if len == 0 {
            return Ok(());
        }
        // SAFETY: fallocate only reads its integer arguments; the descriptor is open for the
        // lifetime of `file`.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, len) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            let raw = e.raw_os_error();
            if is_no_space(raw, e.kind()) {
                return Err(SmartError::DiskFull {
                    path: out.to_path_buf(),
                    source: e,
                });
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (file, out, needed);
    }
    Ok(())
}

/// The soft `RLIMIT_FSIZE`, if limited.
fn file_size_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass, which lives for the call.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_FSIZE, &mut lim) };
    (rc == 0 && lim.rlim_cur != libc::RLIM_INFINITY).then_some(lim.rlim_cur)
}

/// Makes writes beyond the file-size limit fail with EFBIG instead of killing the process with
/// SIGXFSZ, so the conversion can clean up and report it. For programs (the CLI) to call once at
/// start; a library does not change signal dispositions on its own.
pub fn ignore_file_size_signal() {
    // SAFETY: setting SIGXFSZ to SIG_IGN installs no handler code; it is async-signal-safe
    // and affects only how that one signal is delivered.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

/// Re-detects the written temporary: complete, in `target`, of the planned size, carrying the
/// provenance that was written.
fn verify(
    tmp: &Path,
    out: &Path,
    target: Precision,
    provenance: &Provenance,
    needed: u64,
    written: u64,
) -> Result<(), SmartError> {
    let fail = |problem: String| SmartError::Verify {
        path: out.to_path_buf(),
        problem,
    };
    if written != needed {
        return Err(fail(format!("{written} bytes written, {needed} planned")));
    }
    let ex = cache::examine(tmp).ok_or_else(|| fail("the temporary file vanished".into()))?;
    if ex.size != needed {
        return Err(fail(format!("{} bytes on disk, {needed} planned", ex.size)));
    }
    if let Some(defect) = ex.defect_for(target) {
        return Err(fail(defect));
    }
    if ex.provenance.as_ref() != Some(provenance) {
        return Err(fail("its provenance is not the one written".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::only_occurrence;

    #[test]
    fn only_occurrence_finds_exactly_one() {
        assert_eq!(only_occurrence(b"xxabcxx", b"abc"), Some(2));
        assert_eq!(only_occurrence(b"abc", b"abc"), Some(0));
        assert_eq!(only_occurrence(b"xxab", b"abc"), None);
        assert_eq!(only_occurrence(b"abcabc", b"abc"), None);
        assert_eq!(only_occurrence(b"aabc", b"abc"), Some(1));
        assert_eq!(only_occurrence(b"abc", b""), None);
    }
}
