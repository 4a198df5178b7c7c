//! The one streaming pipeline every converter writes through.
//!
//! A conversion is a sequence of pieces (a chunk of a tensor, a whole small tensor, the tail of
//! a quantized weight), each with a known number of output bytes. [`stream`] produces piece
//! `i + 1` on the rayon pool (the converter's `produce`: read the source, convert, usually
//! itself spread over the pool) while piece `i` is written to the output on the calling thread,
//! so the disk and the cores work at the same time. Memory is two page-aligned buffers of the
//! largest piece, never the model.
//!
//! `produce` calls happen one at a time, in piece order (a piece is produced only after the
//! previous one was), so a converter may carry state from piece to piece (a weight's absmax
//! values, finished by its tail piece) behind a lock that is never contended. `written` is
//! called, in order, once a piece's bytes have gone to the output (progress). Cancelling is the
//! output's business: a writer that refuses a write (smart's, once its cancel flag is set)
//! stops the stream at the next piece, with nothing produced after it.
//!
//! Resuming: inside [`resumable`] (smart's conversions), the stream skips the first pieces
//! (written before an interruption: it writes zeros of their length in their place, without
//! producing them, so container writers downstream keep their count and the output's own
//! writer discards those bytes), and after each piece past which the converter carries no
//! state ([`Piece::resumable_after`]) it flushes the output with [`at_boundary`] telling how
//! many pieces the output then holds: the output's writer may journal a checkpoint there. It
//! also flushes at boundary 0, before the first piece, when what the converter wrote before
//! the stream (a container's header) is complete.

use std::cell::Cell;
use std::io::{self, Write};

use crate::safetensors::ReadBuffer;

/// A unit of output.
pub trait Piece: Sync {
    /// Exactly how many bytes `produce` writes for it.
    fn out_len(&self) -> usize;

    /// Whether the converter carries no state from this piece to the next (a weight's absmax
    /// values finished by a later tail piece do): a stream may then be resumed after it.
    fn resumable_after(&self) -> bool {
        true
    }
}

/// A piece as most converters describe one: what to do, its exact output size, and the progress
/// it stands for once written.
#[derive(Debug)]
pub struct Unit<W> {
    /// The converter's description of the work.
    pub work: W,
    /// Output bytes.
    pub out_len: usize,
    /// Source bytes the piece reads (progress).
    pub source_bytes: u64,
    /// Source tensors finished with this piece (progress).
    pub tensors_done: u64,
    /// The converter hands state from this piece to the next (see [`Piece::resumable_after`]).
    pub carries_state: bool,
}

impl<W> Unit<W> {
    /// Closes one conversion step's `pieces` (a step: the output tensors made from one or more
    /// source tensors): an empty step gets one `nothing` piece, so that its progress is still
    /// reported; every piece but the last hands the step's state on (not a place to resume);
    /// the last one finishes the step, `extra_source_bytes` (source bytes no piece read on its
    /// own, such as a fused tensor's other parts) and `tensors` source tensors.
    pub fn close_step(
        pieces: &mut Vec<Unit<W>>,
        nothing: W,
        extra_source_bytes: u64,
        tensors: u64,
    ) {
        if pieces.is_empty() {
            pieces.push(Unit {
                work: nothing,
                out_len: 0,
                source_bytes: 0,
                tensors_done: 0,
                carries_state: true,
            });
        }
        let last = pieces.len() - 1;
        for (i, piece) in pieces.iter_mut().enumerate() {
            piece.carries_state = i != last;
        }
        let last = &mut pieces[last];
        last.source_bytes += extra_source_bytes;
        last.tensors_done = tensors;
    }
}

impl<W: Sync> Piece for Unit<W> {
    fn out_len(&self) -> usize {
        self.out_len
    }

    fn resumable_after(&self) -> bool {
        !self.carries_state
    }
}

thread_local! {
    /// Set by [`resumable`] for the next [`stream`] on this thread: pieces to skip.
    static RESUME: Cell<Option<u64>> = const { Cell::new(None) };
    /// While a resumable stream flushes its output at a boundary: pieces in the output.
    static BOUNDARY: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Runs `f` (a converter's whole write) with the next [`stream`] on this thread resumable: it
/// skips its first `skip` pieces (already in the output: zeros of their length are written in
/// their place, nothing is produced) and flushes its output at every boundary a stream may be
/// resumed from, with [`at_boundary`] saying how many pieces the output holds during that
/// flush. The stream refuses to skip to a boundary that is not resumable.
///
/// A per-thread setting rather than a parameter: it concerns only the output's writer and the
/// stream, not the converters between them, which all write through [`stream`] on the thread
/// that calls them.
pub fn resumable<R>(skip: u64, f: impl FnOnce() -> R) -> R {
    struct Reset(Option<u64>);
    impl Drop for Reset {
        fn drop(&mut self) {
            RESUME.with(|r| r.set(self.0));
        }
    }
    let _reset = Reset(RESUME.with(|r| r.replace(Some(skip))));
    f()
}

/// During a flush of a resumable stream's output at a boundary, the number of pieces the output
/// holds (all bytes before the boundary have been written to the output); `None` at any other
/// time. The output's writer reads it in its `flush`.
pub fn at_boundary() -> Option<u64> {
    BOUNDARY.with(Cell::get)
}

/// Flushes `out` at the boundary after `pieces` pieces.
fn flush_at_boundary<W: Write + ?Sized>(out: &mut W, pieces: u64) -> io::Result<()> {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            BOUNDARY.with(|b| b.set(None));
        }
    }
    BOUNDARY.with(|b| b.set(Some(pieces)));
    let _reset = Reset;
    out.flush()
}

/// Writes `len` zero bytes (a skipped piece's place).
fn write_zeros<W: Write + ?Sized>(out: &mut W, mut len: usize) -> io::Result<()> {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    while len > 0 {
        let n = len.min(ZEROS.len());
        out.write_all(&ZEROS[..n])?;
        len -= n;
    }
    Ok(())
}

/// A converter's work for one piece: fill the slice (exactly [`Piece::out_len`] bytes).
pub type Produce<'a, P, E> = dyn Fn(&P, &mut [u8]) -> Result<(), E> + Sync + 'a;

/// Why [`stream`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum StreamError<E> {
    /// The converter failed on a piece.
    #[error(transparent)]
    Produce(E),
    /// Writing the output failed (or the output refused the write: cancelled).
    #[error("writing the output: {0}")]
    Write(#[source] io::Error),
}

/// Streams `pieces` into `out`: see the module documentation.
pub fn stream<P, W, E>(
    pieces: impl IntoIterator<Item = P>,
    out: &mut W,
    produce: &Produce<'_, P, E>,
    written: &mut dyn FnMut(&P),
) -> Result<(), StreamError<E>>
where
    P: Piece,
    W: Write + ?Sized,
    E: Send,
{
    let resume = RESUME.with(Cell::take);
    let mut pieces = pieces.into_iter();
    // Pieces 0..index are in `out` (or pending).
    let mut index = 0u64;
    if let Some(skip) = resume {
        // What the converter wrote before the stream (a container's header) is complete here:
        // a resumed output's writer checks it against the temporary it continues.
        flush_at_boundary(out, 0).map_err(StreamError::Write)?;
        let mut last_resumable = true;
        while index < skip {
            let Some(piece) = pieces.next() else { break };
            write_zeros(out, piece.out_len()).map_err(StreamError::Write)?;
            written(&piece);
            last_resumable = piece.resumable_after();
            index += 1;
        }
        if index < skip || !last_resumable {
            return Err(StreamError::Write(io::Error::other(format!(
                "cannot resume after piece {skip}: not a boundary of this conversion"
            ))));
        }
        if skip > 0 {
            flush_at_boundary(out, skip).map_err(StreamError::Write)?;
        }
    }
    // `front` holds a produced piece being written while the next is produced into `back`.
    let mut front = ReadBuffer::new();
    let mut back = ReadBuffer::new();
    let mut pending: Option<P> = None;
    for piece in pieces {
        let len = piece.out_len();
        let dst = back.get(len, len);
        let mut produced = Ok(());
        let mut wrote = Ok(());
        rayon::in_place_scope(|s| {
            s.spawn(|_| produced = produce(&piece, dst));
            if let Some(p) = &pending {
                wrote = write_all(out, front.get(p.out_len(), 0));
                // The flush (and a checkpoint behind it) overlaps the next piece's production.
                if wrote.is_ok() && resume.is_some() && p.resumable_after() {
                    wrote = flush_at_boundary(out, index);
                }
            }
        });
        wrote.map_err(StreamError::Write)?;
        if let Some(p) = pending.take() {
            written(&p);
        }
        produced.map_err(StreamError::Produce)?;
        std::mem::swap(&mut front, &mut back);
        pending = Some(piece);
        index += 1;
    }
    if let Some(p) = pending.take() {
        write_all(out, front.get(p.out_len(), 0)).map_err(StreamError::Write)?;
        written(&p);
    }
    Ok(())
}

/// Writes `bytes`; an empty piece writes nothing.
fn write_all<W: Write + ?Sized>(out: &mut W, bytes: &[u8]) -> io::Result<()> {
    if bytes.is_empty() {
        Ok(())
    } else {
        out.write_all(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Ranged(usize, usize);

    impl Piece for Ranged {
        fn out_len(&self) -> usize {
            self.1
        }
    }

    #[test]
    fn pieces_are_produced_and_written_in_order() {
        let pieces: Vec<Ranged> = (0..50).map(|i| Ranged(i, (i * 37) % 11)).collect();
        let order = Mutex::new(Vec::new());
        let mut out = Vec::new();
        let mut seen = Vec::new();
        stream(
            pieces,
            &mut out,
            &|p: &Ranged, dst: &mut [u8]| {
                order.lock().unwrap().push(p.0);
                dst.fill(p.0 as u8);
                Ok::<(), ()>(())
            },
            &mut |p| seen.push(p.0),
        )
        .unwrap();
        let expected: Vec<u8> = (0..50)
            .flat_map(|i| std::iter::repeat_n(i as u8, (i * 37) % 11))
            .collect();
        assert_eq!(out, expected);
        assert_eq!(seen, (0..50).collect::<Vec<_>>());
        assert_eq!(*order.lock().unwrap(), (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn an_error_stops_the_stream_after_what_was_produced_before_it() {
        let mut out = Vec::new();
        let err = stream(
            (0..10).map(|i| Ranged(i, 4)),
            &mut out,
            &|p: &Ranged, dst: &mut [u8]| {
                dst.fill(1);
                if p.0 == 3 { Err(p.0) } else { Ok(()) }
            },
            &mut |_| {},
        )
        .unwrap_err();
        assert!(matches!(err, StreamError::Produce(3)));
        assert_eq!(out.len(), 12, "pieces 0..3 were written, nothing after");
    }

    /// Piece `.0` of `.1` bytes; carries state to the next piece when `.2`.
    struct Stateful(usize, usize, bool);

    impl Piece for Stateful {
        fn out_len(&self) -> usize {
            self.1
        }
        fn resumable_after(&self) -> bool {
            !self.2
        }
    }

    /// A writer that records, at each flush during a boundary, (pieces, bytes so far).
    #[derive(Default)]
    struct Boundaries(Vec<u8>, Vec<(u64, usize)>);

    impl std::io::Write for Boundaries {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            if let Some(p) = at_boundary() {
                self.1.push((p, self.0.len()));
            }
            Ok(())
        }
    }

    /// Pieces 0..8 of 3 bytes each; 2, 3 and 6 carry state.
    fn stateful() -> Vec<Stateful> {
        (0..8)
            .map(|i| Stateful(i, 3, matches!(i, 2 | 3 | 6)))
            .collect()
    }

    fn fill(p: &Stateful, dst: &mut [u8]) -> Result<(), ()> {
        dst.fill(p.0 as u8 + 1);
        Ok(())
    }

    #[test]
    fn a_resumable_stream_flushes_at_stateless_boundaries_only() {
        let mut out = Boundaries::default();
        let mut seen = 0;
        resumable(0, || {
            stream(stateful(), &mut out, &fill, &mut |_| seen += 1)
        })
        .unwrap();
        assert_eq!(seen, 8);
        // Before the stream, then after pieces 0, 1, 4, 5 (the last piece is not followed by a
        // boundary flush).
        assert_eq!(out.1, vec![(0, 0), (1, 3), (2, 6), (5, 15), (6, 18)]);
        // Outside `resumable`, no boundary flushes.
        let mut plain = Boundaries::default();
        stream(stateful(), &mut plain, &fill, &mut |_| {}).unwrap();
        assert!(plain.1.is_empty());
        assert_eq!(plain.0, out.0);
    }

    #[test]
    fn a_resumed_stream_skips_without_producing_and_writes_the_same_bytes_after() {
        let clean: Vec<u8> = (0..8u8).flat_map(|i| [i + 1; 3]).collect();
        let produced = Mutex::new(Vec::new());
        let mut out = Boundaries::default();
        let mut seen = 0;
        resumable(5, || {
            stream(
                stateful(),
                &mut out,
                &|p: &Stateful, dst: &mut [u8]| {
                    produced.lock().unwrap().push(p.0);
                    fill(p, dst)
                },
                &mut |_| seen += 1,
            )
        })
        .unwrap();
        assert_eq!(
            *produced.lock().unwrap(),
            vec![5, 6, 7],
            "skipped pieces are not produced"
        );
        assert_eq!(seen, 8, "skipped pieces count as written (progress)");
        assert_eq!(&out.0[..15], &[0; 15], "zeros in the skipped pieces' place");
        assert_eq!(&out.0[15..], &clean[15..]);
        assert_eq!(
            out.1[..2],
            [(0, 0), (5, 15)],
            "the resume point is a boundary the writer sees"
        );

        // Not a boundary (piece 3 carries state into 4), or past the end: refused.
        for skip in [4, 9] {
            let err = resumable(skip, || {
                stream(stateful(), &mut Boundaries::default(), &fill, &mut |_| {})
            });
            assert!(matches!(err, Err(StreamError::Write(_))), "skip {skip}");
        }
    }

    /// A writer that refuses writes once a flag is set, as smart's cancelling writer does.
    struct Refusing<'a>(&'a std::sync::atomic::AtomicBool, Vec<u8>);

    impl std::io::Write for Refusing<'_> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.0.load(std::sync::atomic::Ordering::Relaxed) {
                // Not `Interrupted`: `write_all` retries those.
                return Err(io::Error::other("cancelled"));
            }
            self.1.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_refused_write_stops_the_stream_soon_after() {
        let cancel = std::sync::atomic::AtomicBool::new(false);
        let mut out = Refusing(&cancel, Vec::new());
        let produced = Mutex::new(0);
        let err = stream(
            (0..10).map(|i| Ranged(i, 2)),
            &mut out,
            &|p: &Ranged, _dst: &mut [u8]| {
                *produced.lock().unwrap() += 1;
                if p.0 == 4 {
                    cancel.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                Ok::<(), ()>(())
            },
            &mut |_| {},
        )
        .unwrap_err();
        assert!(matches!(err, StreamError::Write(_)));
        assert!(out.1.len() <= 8, "nothing after the flag is written");
        assert!(
            *produced.lock().unwrap() <= 6,
            "production stops a piece later"
        );
    }
}
