//! Per-thread scratch for the row tasks: f32 values, and raw source bytes (page-aligned, as
//! [`ReadBuffer`] explains) for the paths that work on 16-bit weights without widening them.
//!
//! A fresh `vec![0f32; 64K]` per task is a fresh mapping from the allocator (it is over glibc's
//! mmap threshold) whose pages the kernel zeroes on first touch: measured on the ~1 GB bf16
//! Flux-like model, that made `--to fp8_scaled` spend 1.4 s in the kernel against 1.0 s in user
//! code. One buffer per thread, reused, costs a memset.

use std::cell::RefCell;

use tensorfile::ReadBuffer;

/// Largest scratch kept for the next task; a huge row's buffer is given back at once.
const KEEP_BYTES: usize = 16 << 20;

thread_local! {
    static VALUES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static BYTES: RefCell<ReadBuffer> = RefCell::new(ReadBuffer::new());
}

/// Runs `f` on `len` bytes of this thread's raw scratch, whose contents are unspecified (the
/// caller overwrites them: a read fills all of them).
pub(crate) fn with_bytes<R>(len: usize, f: impl FnOnce(&mut [u8]) -> R) -> R {
    BYTES.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buffer) => {
            let r = f(buffer.get(len, len));
            if len > KEEP_BYTES {
                *buffer = ReadBuffer::new();
            }
            r
        }
        Err(_) => f(ReadBuffer::new().get(len, len)),
    })
}

/// Runs `f` on `len` zeroed f32 values of this thread's scratch (a fresh buffer if the
/// thread's is already in use, which nothing here does, or if it grew past a task's size).
pub(crate) fn with_zeroed<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    VALUES.with(|cell| match cell.try_borrow_mut() {
        Ok(mut values) => {
            values.clear();
            values.resize(len, 0.0);
            let r = f(&mut values);
            // A huge row made it much larger than a task: give the memory back now.
            if values.capacity() > KEEP_BYTES / 4 {
                *values = Vec::new();
            }
            r
        }
        Err(_) => f(&mut vec![0f32; len]),
    })
}
