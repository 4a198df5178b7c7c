//! One read of a source file for several conversions running at once.
//!
//! [`SharedRead`] reads the file once, front to back, into a bounded window of recent chunks;
//! every conversion of the same source reads through it (a [`SafetensorsFile`] opened with
//! [`SafetensorsFile::open_shared`] routes its positioned reads here), so the disk serves each
//! byte once whatever the number of targets.
//!
//! - The window only moves forward: a chunk is fetched from the disk by the first reader that
//!   needs it (in file order, so every byte of the file is handed to the `observe` callback
//!   exactly once and in order: the caller hashes the source in the same pass).
//! - The oldest chunk is dropped once every reader has passed it (each reader's mark is the
//!   position it read last, less a slack covering the parallel tasks of one piece that still
//!   read behind it). A reader that runs ahead of a full window waits for the others;
//!   the reader furthest behind never waits (the window is larger than a chunk plus the slack
//!   plus one chunk it needs), so readers in the same order go in lockstep.
//! - A reader that needs bytes the window has already dropped (a converter that reads tensors
//!   in another order than the file, a conversion that joined late, a second pass) reads them
//!   from the disk itself: never wrong, only one more read of those bytes. While it reads
//!   behind the window it does not hold the window back (the others would wait for it to
//!   catch up, reading nothing).
//! - Each planned conversion is a [`Seat`]. Until every seat has joined (opened the file) or is
//!   done, or a grace period has passed, nothing is dropped, so conversions that start a few
//!   milliseconds apart still share the whole read. The grace period bounds the wait for a
//!   conversion that is itself waiting (for another process's lock on its output).
//!
//! Waiting happens inside the readers' reads, which converters make from their thread pool:
//! conversions that share a window must each run in a thread pool of their own, or a reader
//! waiting for the others could hold the very threads they need.
//!
//! [`SharedRead::read_ahead`], run on a thread of its own, keeps the window full ahead of the
//! readers, so a cold source is read while the converters compute.
//!
//! A source of several files (a sharded model's shards) is a [`SharedFiles`]: one window per
//! file, one [`Seat`] per conversion at all of them. A conversion that reads a file beyond the
//! slack is past the earlier files; a file's window is emptied once every conversion is past
//! it, so shards read one after another hold at most two windows (the last shard's, like a
//! single file's, until the conversions end).
//!
//! Memory is the window (a few chunks), never the model.

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::read_count;
use crate::safetensors::SafetensorsFile;

/// Sizes of a [`SharedRead`]'s window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowConfig {
    /// Bytes fetched from the disk at a time.
    pub chunk: usize,
    /// Bytes a reader may still read behind its furthest position (parallel tasks of one
    /// piece): chunks within it are kept.
    pub slack: u64,
    /// The window's capacity in bytes (at least `2 * chunk + slack`, raised to it).
    pub capacity: u64,
    /// How long the window waits for every seat to join before dropping chunks anyway.
    pub grace: Duration,
}

impl Default for WindowConfig {
    /// 4 MiB chunks, 16 MiB slack (a converter's piece reads at most 8 MiB of a bf16 source),
    /// a 64 MiB window, one second of grace.
    fn default() -> WindowConfig {
        WindowConfig {
            chunk: 4 << 20,
            slack: 16 << 20,
            capacity: 64 << 20,
            grace: Duration::from_secs(1),
        }
    }
}

/// How often a waiting reader looks again without being woken (for the grace period).
const TICK: Duration = Duration::from_millis(50);

/// The callback that is handed every byte of the file once, in order.
type Observe = Box<dyn FnMut(&[u8]) + Send>;

/// A source file read once for several readers; see the module documentation. Cloning gives
/// another handle to the same window.
#[derive(Clone)]
pub struct SharedRead {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SharedRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedRead")
            .field("path", &self.inner.path)
            .field("len", &self.inner.len)
            .finish_non_exhaustive()
    }
}

struct Inner {
    path: PathBuf,
    file: File,
    len: u64,
    identity: (u64, u64),
    config: WindowConfig,
    created: Instant,
    state: Mutex<State>,
    moved: Condvar,
    /// Taken only by the one fetcher at a time, so calls are in file order.
    observe: Mutex<Observe>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SeatState {
    Waiting,
    Joined,
    Done,
}

struct State {
    /// The window covers `lo..hi` of the file, `chunks` in order.
    lo: u64,
    hi: u64,
    chunks: VecDeque<Arc<Vec<u8>>>,
    /// Buffers of dropped chunks, reused.
    spare: Vec<Vec<u8>>,
    /// A reader is fetching the chunk at `hi`.
    fetching: bool,
    /// A fetch failed: every later fetch fails the same way.
    failed: Option<(io::ErrorKind, String)>,
    seats: Vec<SeatState>,
    /// Bytes fetched into the window, and bytes readers read from the disk themselves.
    fetched: u64,
    direct: u64,
    /// Live readers' marks (the position each read last), by reader id; `None`: gone.
    marks: Vec<Option<u64>>,
}

impl SharedRead {
    /// Opens `path` for `seats` conversions; `observe` is handed every byte of the file once,
    /// in order, as the window fetches it.
    pub fn open(
        path: &Path,
        seats: usize,
        config: WindowConfig,
        observe: impl FnMut(&[u8]) + Send + 'static,
    ) -> io::Result<SharedRead> {
        let file = File::open(path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::other("not a regular file"));
        }
        let chunk = config.chunk.max(1);
        let config = WindowConfig {
            chunk,
            capacity: config.capacity.max(2 * chunk as u64 + config.slack),
            ..config
        };
        Ok(SharedRead {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                file,
                len: meta.len(),
                identity: (meta.dev(), meta.ino()),
                config,
                created: Instant::now(),
                state: Mutex::new(State {
                    lo: 0,
                    hi: 0,
                    chunks: VecDeque::new(),
                    spare: Vec::new(),
                    fetching: false,
                    failed: None,
                    seats: vec![SeatState::Waiting; seats],
                    fetched: 0,
                    direct: 0,
                    marks: Vec::new(),
                }),
                moved: Condvar::new(),
                observe: Mutex::new(Box::new(observe)),
            }),
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The file's size when it was opened.
    pub fn len(&self) -> u64 {
        self.inner.len
    }

    /// Whether the file was empty.
    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }

    /// (bytes fetched into the window, bytes its readers read from the disk themselves because
    /// the window had dropped them) so far: together, what this source cost the disk.
    pub fn bytes_read(&self) -> (u64, u64) {
        let state = self.inner.lock();
        (state.fetched, state.direct)
    }

    /// Seat `index` (one per planned conversion) at this file alone.
    pub fn seat(&self, index: usize) -> Seat {
        SharedFiles::new(vec![self.clone()]).seat(index)
    }

    /// Reads ahead of the readers for as long as one of them may still read: fetches the next
    /// chunk whenever the window has room, so the disk works while the converters compute
    /// (otherwise each chunk is read when the first converter needs it, and it waits). Returns
    /// at the end of the file, on a read error (which the readers then get), or once every
    /// seat is done. For a thread of its own, started with the conversions.
    pub fn read_ahead(&self) {
        let inner = &*self.inner;
        let mut state = inner.lock();
        while state.hi < inner.len && state.seats.iter().any(|s| *s != SeatState::Done) {
            let at = state.hi;
            state = match inner.fetch_through(state, at) {
                Ok(state) => state,
                Err(_) => return,
            };
        }
    }

    /// Fetches whatever the window has not fetched yet, to the end of the file (waiting for
    /// the readers to make room), so that `observe` has seen the whole file. Returns the file's
    /// size as it was read.
    pub fn read_to_end(&self) -> io::Result<u64> {
        let inner = &*self.inner;
        let mut state = inner.lock();
        while state.hi < inner.len {
            let at = state.hi;
            state = inner.fetch_through(state, at)?;
        }
        Ok(state.hi)
    }
}

/// The files of one source, each read once for the same conversions through a window of its
/// own: one file, or a sharded source's shards, which converters read one after another (see
/// the module documentation). Cloning gives another handle to the same windows.
#[derive(Debug, Clone)]
pub struct SharedFiles {
    reads: Arc<[SharedRead]>,
}

impl SharedFiles {
    /// The shared reads of a source's files, in the order converters read them.
    pub fn new(reads: Vec<SharedRead>) -> SharedFiles {
        SharedFiles {
            reads: reads.into(),
        }
    }

    /// The files' shared reads, in order.
    pub fn files(&self) -> &[SharedRead] {
        &self.reads
    }

    /// Seat `index` (one per planned conversion) at every file.
    pub fn seat(&self, index: usize) -> Seat {
        Seat {
            files: self.clone(),
            index,
            joined: Arc::default(),
        }
    }

    /// [`SharedRead::read_ahead`] of each file in turn (a file's readers are served ahead
    /// while the next file waits for them): for a thread of its own.
    pub fn read_ahead(&self) {
        for read in self.reads.iter() {
            read.read_ahead();
        }
    }

    /// [`SharedRead::read_to_end`] of every file; returns their sizes added.
    pub fn read_to_end(&self) -> io::Result<u64> {
        self.reads
            .iter()
            .try_fold(0u64, |total, r| Ok(total.saturating_add(r.read_to_end()?)))
    }

    /// [`SharedRead::bytes_read`] of every file, added.
    pub fn bytes_read(&self) -> (u64, u64) {
        self.reads.iter().fold((0, 0), |(f, d), r| {
            let (rf, rd) = r.bytes_read();
            (f + rf, d + rd)
        })
    }
}

/// A reader a seat opened: its file's position in the [`SharedFiles`], the file's window, and
/// the reader's id there.
type JoinedReader = (usize, Arc<Inner>, usize);

/// One conversion's place at a [`SharedFiles`]: files it opens with it read through their
/// window.
#[derive(Clone)]
pub struct Seat {
    files: SharedFiles,
    index: usize,
    /// The readers this seat's conversion opened: (file's position in `files`, its window,
    /// reader id there).
    joined: Arc<Mutex<Vec<JoinedReader>>>,
}

impl std::fmt::Debug for Seat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Seat")
            .field("files", &self.files)
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Seat {
    /// The shared files this seat belongs to.
    pub fn files(&self) -> &SharedFiles {
        &self.files
    }

    /// This conversion will read no more (it finished, failed or was answered without reading):
    /// no window waits for it to join any longer.
    pub fn done(&self) {
        for read in self.files.reads.iter() {
            let inner = &*read.inner;
            let mut state = inner.lock();
            if let Some(s) = state.seats.get_mut(self.index) {
                *s = SeatState::Done;
            }
            drop(state);
            inner.moved.notify_all();
        }
    }

    /// A reader of `file` through its window, if `file` is one of the files read (same
    /// device, inode and size); `None` otherwise (it then reads on its own).
    pub fn join(&self, file: &File) -> Option<Reader> {
        let meta = file.metadata().ok()?;
        let (position, read) = self.files.reads.iter().enumerate().find(|(_, r)| {
            (meta.dev(), meta.ino()) == r.inner.identity && meta.len() == r.inner.len
        })?;
        let inner = &read.inner;
        let mut state = inner.lock();
        if let Some(s) = state.seats.get_mut(self.index)
            && *s == SeatState::Waiting
        {
            *s = SeatState::Joined;
        }
        let lo = state.lo;
        let id = state.marks.len();
        state.marks.push(Some(lo));
        drop(state);
        inner.moved.notify_all();
        let mut joined = self.joined.lock().unwrap_or_else(|p| p.into_inner());
        let earlier = joined
            .iter()
            .filter(|(p, _, _)| *p < position)
            .map(|(_, inner, id)| (Arc::clone(inner), *id))
            .collect();
        joined.push((position, Arc::clone(inner), id));
        Some(Reader {
            inner: Arc::clone(inner),
            id,
            earlier: Mutex::new(earlier),
        })
    }
}

/// A registered reader of a [`SharedRead`] (held by a [`SafetensorsFile`] or another source's
/// reader); leaves the window when dropped.
pub struct Reader {
    inner: Arc<Inner>,
    id: usize,
    /// The same conversion's readers of earlier files of a [`SharedFiles`], until it is past
    /// them: reading this file beyond the slack (the parallel pieces still reading behind)
    /// means it will not read them again, so their windows need not wait for it.
    earlier: Mutex<Vec<(Arc<Inner>, usize)>>,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader").field("id", &self.id).finish()
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let mut state = self.inner.lock();
        if let Some(m) = state.marks.get_mut(self.id) {
            *m = None;
        }
        drop(state);
        self.inner.moved.notify_all();
    }
}

impl Reader {
    /// Fills `buf` with the file's bytes at `at`: from the window, fetching forward as needed,
    /// or from the disk for bytes the window has dropped. Reading beyond the slack into a file
    /// marks the conversion as past its earlier files: once every reader is past a file, its
    /// window is emptied.
    pub fn read_exact_at(&self, buf: &mut [u8], at: u64) -> io::Result<()> {
        let inner = &*self.inner;
        let end = at
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= inner.len)
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end"))?;
        let mut pos = at;
        while pos < end {
            let done = (pos - at) as usize;
            let mut state = inner.lock();
            if let Some(m) = state.marks.get_mut(self.id).and_then(Option::as_mut) {
                let chunk = inner.config.chunk as u64;
                let moved_on = *m / chunk < pos / chunk;
                *m = pos;
                if moved_on {
                    inner.moved.notify_all();
                }
            }
            if pos < state.lo {
                // Dropped already: read it ourselves.
                let upto = end.min(state.lo);
                drop(state);
                let part = &mut buf[done..done + (upto - pos) as usize];
                inner.file.read_exact_at(part, pos)?;
                read_count::add(part.len() as u64);
                inner.lock().direct += part.len() as u64;
                pos = upto;
                continue;
            }
            if pos >= state.hi {
                state = inner.fetch_through(state, pos)?;
            }
            let chunk_size = inner.config.chunk as u64;
            let index = ((pos - state.lo) / chunk_size) as usize;
            let chunk_start = state.lo + index as u64 * chunk_size;
            let chunk = Arc::clone(&state.chunks[index]);
            drop(state);
            let from = (pos - chunk_start) as usize;
            let n = (chunk.len() - from).min((end - pos) as usize);
            buf[done..done + n].copy_from_slice(&chunk[from..from + n]);
            pos += n as u64;
        }
        if at > inner.config.slack {
            let earlier =
                std::mem::take(&mut *self.earlier.lock().unwrap_or_else(|p| p.into_inner()));
            for (file, id) in earlier {
                let mut state = file.lock();
                if let Some(m) = state.marks.get_mut(id).and_then(Option::as_mut) {
                    *m = u64::MAX;
                }
                file.release_passed(&mut state);
            }
        }
        Ok(())
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent state (every update is a single
        // assignment or push), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the oldest chunk may be dropped: every seat has joined or is done (or the
    /// grace period is over), and every live reader is past it by the slack.
    fn may_drop_front(&self, state: &State) -> bool {
        let Some(front) = state.chunks.front() else {
            return false;
        };
        let all_seated = state.seats.iter().all(|s| *s != SeatState::Waiting);
        if !all_seated && self.created.elapsed() < self.config.grace {
            return false;
        }
        let passed = state.lo + front.len() as u64 + self.config.slack;
        state
            .marks
            .iter()
            .flatten()
            .filter(|&&m| m >= state.lo)
            .all(|&m| m >= passed)
    }

    /// Fetches until the window holds `pos` (`pos < hi`), dropping passed chunks to make room
    /// and waiting when none can be dropped (a reader's own mark is already at `pos`).
    fn fetch_through<'a>(
        &'a self,
        mut state: MutexGuard<'a, State>,
        pos: u64,
    ) -> io::Result<MutexGuard<'a, State>> {
        let chunk_size = self.config.chunk as u64;
        while pos >= state.hi {
            if let Some((kind, message)) = &state.failed {
                return Err(io::Error::new(*kind, message.clone()));
            }
            if state.fetching {
                state = self.wait(state);
                continue;
            }
            let held = state.hi - state.lo;
            if held + chunk_size > self.config.capacity {
                if self.may_drop_front(&state) {
                    let front = state.chunks.pop_front().expect("may_drop_front saw one");
                    state.lo += front.len() as u64;
                    if let Ok(buffer) = Arc::try_unwrap(front) {
                        state.spare.push(buffer);
                    }
                    self.moved.notify_all();
                } else {
                    state = self.wait(state);
                }
                continue;
            }
            // Fetch the chunk at `hi`, without the lock (only one fetcher at a time).
            state.fetching = true;
            let at = state.hi;
            let len = chunk_size.min(self.len - at) as usize;
            let mut buffer = state.spare.pop().unwrap_or_default();
            drop(state);
            buffer.resize(len, 0);
            let read = self.file.read_exact_at(&mut buffer, at);
            if read.is_ok() {
                read_count::add(len as u64);
                let mut observe = self.observe.lock().unwrap_or_else(|p| p.into_inner());
                observe(&buffer);
            }
            state = self.lock();
            state.fetching = false;
            match read {
                Ok(()) => {
                    state.chunks.push_back(Arc::new(buffer));
                    state.hi += len as u64;
                    state.fetched += len as u64;
                }
                Err(e) => {
                    state.failed = Some((e.kind(), format!("{e}")));
                    self.moved.notify_all();
                    return Err(e);
                }
            }
            self.moved.notify_all();
        }
        Ok(state)
    }

    /// Drops every chunk all readers are past once the whole file is fetched, spare buffers
    /// too: nothing will be fetched again (a sharded source's readers have moved on to the
    /// next shard, whose window fills meanwhile).
    fn release_passed(&self, state: &mut State) {
        if state.hi < self.len {
            return;
        }
        while self.may_drop_front(state) {
            let front = state.chunks.pop_front().expect("may_drop_front saw one");
            state.lo += front.len() as u64;
        }
        if state.chunks.is_empty() {
            state.spare = Vec::new();
        }
        self.moved.notify_all();
    }

    fn wait<'a>(&'a self, state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        match self.moved.wait_timeout(state, TICK) {
            Ok((s, _)) => s,
            Err(p) => p.into_inner().0,
        }
    }
}

impl SafetensorsFile {
    /// [`SafetensorsFile::open`], reading through `seat`'s window when `seat` reads this very
    /// file (else on its own, as `open` does).
    pub fn open_shared(
        path: &Path,
        seat: Option<&Seat>,
    ) -> Result<SafetensorsFile, crate::safetensors::SafetensorsError> {
        let mut file = SafetensorsFile::open(path)?;
        if let Some(seat) = seat {
            file.attach(seat);
        }
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_of(len: usize) -> (tempfile::NamedTempFile, Vec<u8>) {
        let bytes: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&bytes).unwrap();
        f.flush().unwrap();
        (f, bytes)
    }

    fn small() -> WindowConfig {
        WindowConfig {
            chunk: 1000,
            slack: 3000,
            capacity: 6000,
            grace: Duration::from_secs(5),
        }
    }

    /// Readers in file order at different speeds share one read; every byte is observed once,
    /// in order; each reader gets the right bytes.
    #[test]
    fn readers_in_file_order_read_the_file_once() {
        let (f, bytes) = file_of(100_003);
        let observed = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&observed);
        let shared = SharedRead::open(f.path(), 3, small(), move |b: &[u8]| {
            sink.lock().unwrap().extend_from_slice(b)
        })
        .unwrap();
        std::thread::scope(|s| {
            for (seat, step) in [(0, 700usize), (1, 1300), (2, 257)] {
                let (shared, bytes, path) = (&shared, &bytes, f.path());
                s.spawn(move || {
                    let seat = shared.seat(seat);
                    let file = File::open(path).unwrap();
                    let reader = seat.join(&file).unwrap();
                    let mut pos = 0;
                    while pos < bytes.len() {
                        let n = step.min(bytes.len() - pos);
                        let mut buf = vec![0u8; n];
                        reader.read_exact_at(&mut buf, pos as u64).unwrap();
                        assert_eq!(buf, bytes[pos..pos + n]);
                        pos += n;
                        if step == 257 {
                            std::thread::sleep(Duration::from_micros(50));
                        }
                    }
                    drop(reader);
                    seat.done();
                });
            }
        });
        assert_eq!(shared.read_to_end().unwrap(), bytes.len() as u64);
        assert_eq!(*observed.lock().unwrap(), bytes);
        assert_eq!(shared.bytes_read(), (bytes.len() as u64, 0));
    }

    /// Reading ahead on a thread of its own changes nothing the readers see, and stops once
    /// every seat is done.
    #[test]
    fn reading_ahead_serves_the_same_bytes_and_stops_when_the_seats_are_done() {
        let (f, bytes) = file_of(80_000);
        let shared = SharedRead::open(f.path(), 2, small(), |_: &[u8]| {}).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| shared.read_ahead());
            for seat in 0..2 {
                let (shared, bytes, path) = (&shared, &bytes, f.path());
                s.spawn(move || {
                    let seat = shared.seat(seat);
                    let reader = seat.join(&File::open(path).unwrap()).unwrap();
                    let half = bytes.len() / 2;
                    for pos in (0..half).step_by(1000) {
                        let mut buf = vec![0u8; 1000];
                        reader.read_exact_at(&mut buf, pos as u64).unwrap();
                        assert_eq!(buf, bytes[pos..pos + 1000]);
                    }
                    // Done while still a reader: nothing is fetched for nobody in between.
                    seat.done();
                    drop(reader);
                });
            }
        });
        let (fetched, direct) = shared.bytes_read();
        assert_eq!(direct, 0);
        assert!(
            fetched < bytes.len() as u64,
            "stopped before the end: {fetched}"
        );
    }

    /// A reader going backwards gets correct bytes (from the disk when they were dropped), and
    /// nobody waits forever.
    #[test]
    fn a_reader_out_of_order_is_served_correctly() {
        let (f, bytes) = file_of(50_000);
        let shared = SharedRead::open(f.path(), 2, small(), |_: &[u8]| {}).unwrap();
        std::thread::scope(|s| {
            let forward = shared.seat(0);
            let backward = shared.seat(1);
            let (fp, b1, b2) = (f.path(), &bytes, &bytes);
            s.spawn(move || {
                let reader = forward.join(&File::open(fp).unwrap()).unwrap();
                for pos in (0..b1.len()).step_by(500) {
                    let mut buf = vec![0u8; 500];
                    reader.read_exact_at(&mut buf, pos as u64).unwrap();
                    assert_eq!(buf, b1[pos..pos + 500]);
                }
            });
            s.spawn(move || {
                let reader = backward.join(&File::open(fp).unwrap()).unwrap();
                for pos in (0..b2.len()).step_by(900).rev() {
                    let n = 900.min(b2.len() - pos);
                    let mut buf = vec![0u8; n];
                    reader.read_exact_at(&mut buf, pos as u64).unwrap();
                    assert_eq!(buf, b2[pos..pos + n]);
                }
            });
        });
        let (fetched, direct) = shared.bytes_read();
        assert_eq!(fetched, bytes.len() as u64);
        assert!(direct > 0, "the backward reader read dropped bytes itself");
    }

    /// A seat that never joins holds the window only for the grace period.
    #[test]
    fn a_seat_that_never_joins_is_waited_for_only_during_the_grace_period() {
        let (f, bytes) = file_of(30_000);
        let config = WindowConfig {
            grace: Duration::from_millis(200),
            ..small()
        };
        let shared = SharedRead::open(f.path(), 2, config, |_: &[u8]| {}).unwrap();
        let reader = shared.seat(0).join(&File::open(f.path()).unwrap()).unwrap();
        let started = Instant::now();
        let mut buf = vec![0u8; bytes.len()];
        reader.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(buf, bytes);
        assert!(started.elapsed() >= Duration::from_millis(200));
    }

    /// Two files read one after the other by two readers: each file is fetched once and
    /// observed in order, and the first file's window is empty once both are past it.
    #[test]
    fn several_files_are_each_read_once_and_released_when_passed() {
        let (f1, b1) = file_of(20_011);
        let (f2, b2) = file_of(17_003);
        let observed = [
            Arc::new(Mutex::new(Vec::new())),
            Arc::new(Mutex::new(Vec::new())),
        ];
        let reads: Vec<SharedRead> = [f1.path(), f2.path()]
            .into_iter()
            .zip(&observed)
            .map(|(p, o)| {
                let sink = Arc::clone(o);
                SharedRead::open(p, 2, small(), move |b: &[u8]| {
                    sink.lock().unwrap().extend_from_slice(b)
                })
                .unwrap()
            })
            .collect();
        let files = SharedFiles::new(reads);
        let both_read = std::sync::Barrier::new(2);
        std::thread::scope(|s| {
            s.spawn(|| files.read_ahead());
            for seat in 0..2 {
                let (files, both_read) = (&files, &both_read);
                let sources = [(f1.path(), &b1), (f2.path(), &b2)];
                s.spawn(move || {
                    let seat = files.seat(seat);
                    let readers: Vec<Reader> = sources
                        .iter()
                        .map(|(p, _)| seat.join(&File::open(p).unwrap()).unwrap())
                        .collect();
                    for (reader, (_, bytes)) in readers.iter().zip(sources) {
                        for pos in (0..bytes.len()).step_by(700) {
                            let n = 700.min(bytes.len() - pos);
                            let mut buf = vec![0u8; n];
                            reader.read_exact_at(&mut buf, pos as u64).unwrap();
                            assert_eq!(buf, bytes[pos..pos + n]);
                        }
                    }
                    both_read.wait();
                    // Both readers read the second file beyond the slack: the first file's
                    // window is empty, while the second's still holds its tail.
                    assert!(files.files()[0].inner.lock().chunks.is_empty());
                    assert!(files.files()[0].inner.lock().spare.is_empty());
                    assert!(!files.files()[1].inner.lock().chunks.is_empty());
                    seat.done();
                });
            }
        });
        assert_eq!(files.read_to_end().unwrap(), (b1.len() + b2.len()) as u64);
        assert_eq!(files.bytes_read(), ((b1.len() + b2.len()) as u64, 0));
        assert_eq!(*observed[0].lock().unwrap(), b1);
        assert_eq!(*observed[1].lock().unwrap(), b2);
    }

    #[test]
    fn another_file_is_not_joined() {
        let (f, _) = file_of(10);
        let (g, _) = file_of(10);
        let shared = SharedRead::open(f.path(), 1, small(), |_: &[u8]| {}).unwrap();
        assert!(
            shared
                .seat(0)
                .join(&File::open(g.path()).unwrap())
                .is_none()
        );
    }
}
