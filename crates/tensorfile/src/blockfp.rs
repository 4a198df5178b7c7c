//! ComfyUI's quantized weight formats: per-tensor scaled fp8, nvfp4 and mxfp8, quantized and
//! dequantized byte for byte as pip `comfy-kitchen` 0.2.40's eager (CPU) kernels do, with the
//! per-tensor scale rules of Comfy-Org's `comfy-quants`.
//!
//! `tests/golden/comfy_quant/README.md` is the specification (every rounding step, checked
//! against comfy-kitchen and torch 2.15, with goldens made by its `make_goldens.py`). In short:
//!
//! - **fp8** (`float8_e4m3fn`): `weight` E4M3FN, `weight_scale` one F32
//!   ([`fp8_tensor_scale`]); each value becomes `e4m3(clamp(x * (1/s), ±448))` with the product
//!   computed in the source dtype ([`quantize_fp8`]).
//! - **nvfp4**: `weight` U8 `[R, C/2]`, two E2M1 codes per byte (the even column in the high
//!   nibble); `weight_scale` one E4M3FN scale per 16 values of a row, relative to the F32
//!   per-tensor `weight_scale_2` ([`nvfp4_tensor_scale`]), stored swizzled ([`to_blocked`]).
//! - **mxfp8**: `weight` E4M3FN `[R, C]`; `weight_scale` one E8M0 power of two per 32 values of
//!   a row, stored swizzled as U8.
//! - A weight whose rows or columns are not multiples of the block is zero-padded in **both**
//!   dimensions ([`nvfp4_padded_shape`], [`mxfp8_padded_shape`]), as ComfyUI's layouts do.
//!
//! All arithmetic is IEEE f32, round to nearest even, no flush to zero. The functions are pure
//! (no I/O) and work on whole rows, so callers stream a weight in row ranges. They expect finite
//! values: NaN or infinite weights have no meaningful scale (callers refuse them). Slice lengths
//! are the caller's contract; a mismatch is a bug and panics with a message.

use std::ops::Range;

use crate::cast::{BF16_NAN_FROM_F32, E4M3FN_TO_F32, f32_bits_to_bf16, f32_bits_to_e4m3fn};
use crate::safetensors::Dtype;

/// Values per nvfp4 block scale (along a row).
pub const NVFP4_GROUP: usize = 16;
/// Values per mxfp8 block scale (along a row).
pub const MXFP8_GROUP: usize = 32;
/// Rows of a scale grid per tile of the cuBLAS blocked layout; each tile is contiguous.
pub const BLOCKED_TILE_ROWS: usize = 128;
/// Scale-grid columns per 512-byte group of the blocked layout.
const BLOCKED_TILE_COLS: usize = 4;

/// Largest finite E4M3FN value.
const E4M3_MAX: f32 = 448.0;
/// Largest E2M1 value.
const E2M1_MAX: f32 = 6.0;
/// comfy-quants' floor of the fp8 scale (`clamp(amax / 448, min=1e-12)`).
const FP8_SCALE_FLOOR: f32 = 1.0e-12;
/// Largest finite f16: ComfyUI keeps `1/scale` within it for f16 sources.
const F16_MAX: f32 = 65504.0;
/// The per-tensor scale that maps the largest value onto the largest block code times the
/// largest E2M1 value.
const NVFP4_TENSOR_DIVISOR: f32 = E4M3_MAX * E2M1_MAX;
/// Floor of the per-tensor scale given to the nvfp4 quantizer (2^-126): an all-zero tensor has
/// scale 0, and 0/0 would make every byte garbage.
const NVFP4_SCALE_FLOOR: f32 = f32::MIN_POSITIVE;
/// comfy-kitchen's smallest mxfp8 scale before the logarithm: 2^-127 (an f32 subnormal).
const MXFP8_NEED_FLOOR: f32 = f32::from_bits(0x0040_0000);
/// E8M0 exponent bias and largest code comfy-kitchen writes.
const E8M0_BIAS: i32 = 127;
const E8M0_MAX_CODE: i32 = 254;

/// E2M1 codes 0..16 as f32 (the high bit is the sign, so code 8 is -0.0).
const E2M1_TO_F32: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// The largest magnitude in `values` (0 for none). NaN is skipped; callers refuse non-finite
/// weights before quantizing.
pub fn abs_max(values: &[f32]) -> f32 {
    values.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// comfy-quants' per-tensor fp8 scale: `amax / 448` (f32), at least 1e-12, and 1.0 when
/// `amax == 0`; for an F16 `source` also ComfyUI's guard `s = 1 / clamp(1/s, ±65504)`, without
/// which `(1/s).to(f16)` overflows inside comfy-kitchen and zeros become NaN.
pub fn fp8_tensor_scale(amax: f32, source: Dtype) -> f32 {
    let scale = if amax > 0.0 {
        (amax / E4M3_MAX).max(FP8_SCALE_FLOOR)
    } else {
        1.0
    };
    if source == Dtype::F16 {
        1.0 / (1.0 / scale).clamp(-F16_MAX, F16_MAX)
    } else {
        scale
    }
}

/// comfy-kitchen's `quantize_per_tensor_fp8` to E4M3FN. `values` are exact widenings of
/// `source` values (F32, F16 or BF16; other dtypes are treated as F32). Each code is
/// `e4m3(clamp(p, ±448))` with `p = round_source(x * round_source(1/scale))`: torch multiplies
/// in the source dtype, so a bf16 product is rounded to bf16 before it is rounded to fp8.
pub fn quantize_fp8(values: &[f32], source: Dtype, scale: f32, out: &mut [u8]) {
    assert_eq!(values.len(), out.len(), "quantize_fp8: one code per value");
    let inv = 1.0 / scale;
    let pairs = values.iter().zip(out.iter_mut());
    match source {
        Dtype::BF16 => {
            let inv = round_to_bf16(inv);
            pairs.for_each(|(&x, q)| *q = e4m3_saturated(round_to_bf16(x * inv)));
        }
        Dtype::F16 => {
            let inv = round_to_f16(inv);
            pairs.for_each(|(&x, q)| *q = e4m3_saturated(round_to_f16(x * inv)));
        }
        _ => pairs.for_each(|(&x, q)| *q = e4m3_saturated(x * inv)),
    }
}

/// [`quantize_fp8`] of a 16-bit (BF16 or F16) weight as a table of all 65,536 inputs: each
/// entry is computed by [`quantize_fp8`] itself, so the table's codes are its codes by
/// construction, and quantizing becomes one lookup per value straight from the source's raw
/// bytes (no widening to f32). Building it costs 65,536 quantizations, paid back by any weight
/// larger than that; measured on the ~1 GB bf16 Flux-like model (BENCHMARKS.md,
/// `comfy-fp8_scaled`), the per-value kernel was a quarter of the conversion's CPU time.
pub struct Fp8Table {
    codes: Box<[u8]>,
}

impl std::fmt::Debug for Fp8Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fp8Table").finish_non_exhaustive()
    }
}

impl Fp8Table {
    /// The table for weights of `source` (BF16 or F16; `None` for any other dtype) quantized
    /// with `scale`.
    pub fn new(source: Dtype, scale: f32) -> Option<Fp8Table> {
        let widen: fn(u16) -> f32 = match source {
            Dtype::BF16 => |b| f32::from_bits(u32::from(b) << 16),
            Dtype::F16 => |b| half::f16::from_bits(b).to_f32(),
            _ => return None,
        };
        let values: Vec<f32> = (0..=u16::MAX).map(widen).collect();
        let mut codes = vec![0u8; values.len()].into_boxed_slice();
        quantize_fp8(&values, source, scale, &mut codes);
        Some(Fp8Table { codes })
    }

    /// Quantizes `raw` (little-endian 16-bit values of the table's dtype) into `out`, one
    /// code per value.
    pub fn quantize(&self, raw: &[u8], out: &mut [u8]) {
        assert_eq!(
            raw.len(),
            2 * out.len(),
            "Fp8Table::quantize: one code per value"
        );
        for (q, b) in out.iter_mut().zip(raw.chunks_exact(2)) {
            *q = self.codes[usize::from(u16::from_le_bytes([b[0], b[1]]))];
        }
    }
}

/// The nvfp4 per-tensor scale stored as `weight_scale_2` (comfy-quants): `amax / 2688` in f32.
pub fn nvfp4_tensor_scale(amax: f32) -> f32 {
    amax / NVFP4_TENSOR_DIVISOR
}

/// The stored [rows, cols] of an nvfp4 weight of logical [rows, cols] (in values, not bytes):
/// both rounded up to 16 when either is not a multiple of 16, else unchanged (ComfyUI's
/// `TensorCoreNVFP4Layout` passes `pad_16x` exactly then).
pub fn nvfp4_padded_shape(rows: usize, cols: usize) -> (usize, usize) {
    padded_shape(rows, cols, NVFP4_GROUP)
}

/// The stored [rows, cols] of an mxfp8 weight: both rounded up to 32 when either is not a
/// multiple of 32, else unchanged.
pub fn mxfp8_padded_shape(rows: usize, cols: usize) -> (usize, usize) {
    padded_shape(rows, cols, MXFP8_GROUP)
}

fn padded_shape(rows: usize, cols: usize, group: usize) -> (usize, usize) {
    if rows.is_multiple_of(group) && cols.is_multiple_of(group) {
        (rows, cols)
    } else {
        (rows.next_multiple_of(group), cols.next_multiple_of(group))
    }
}

/// comfy-kitchen's `quantize_nvfp4` on whole rows of a (zero-padded) weight:
/// `values.len() == n * cols`, `cols` a multiple of 16. Writes `packed` (`n * cols / 2` bytes,
/// the even value in the high nibble) and `block_scales` (`n * cols / 16` E4M3FN codes,
/// row-major, not swizzled: see [`to_blocked`]).
///
/// `tensor_scale` is the stored `weight_scale_2`; the quantizer divides by it floored at 2^-126
/// (comfy-quants' guard for an all-zero tensor). Per block of 16: `code = e4m3(min(amax / 6 /
/// s, 448))`; with `total = s * code`, each value becomes the E2M1 code of `x / total` (ties to
/// the even code, saturating at 6, the sign bit kept, so -0.0 gives code 8), or +0 when
/// `total == 0`.
pub fn quantize_nvfp4_rows(
    values: &[f32],
    cols: usize,
    tensor_scale: f32,
    packed: &mut [u8],
    block_scales: &mut [u8],
) {
    check_rows("quantize_nvfp4_rows", values.len(), cols, NVFP4_GROUP);
    assert_eq!(packed.len() * 2, values.len(), "nvfp4: two values per byte");
    assert_eq!(
        block_scales.len() * NVFP4_GROUP,
        values.len(),
        "nvfp4: one scale per 16"
    );
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { nvfp4_rows_avx2(values, tensor_scale, packed, block_scales) };
    }
    nvfp4_rows(values, tensor_scale, packed, block_scales)
}

/// [`nvfp4_rows`] compiled for AVX2: IEEE arithmetic only (no fused operations), so it gives
/// the same bits as the baseline build with twice the lanes (the per-value division dominates).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn nvfp4_rows_avx2(values: &[f32], tensor_scale: f32, packed: &mut [u8], block_scales: &mut [u8]) {
    nvfp4_rows(values, tensor_scale, packed, block_scales)
}

/// The loop of [`quantize_nvfp4_rows`] on checked slices.
#[inline(always)]
fn nvfp4_rows(values: &[f32], tensor_scale: f32, packed: &mut [u8], block_scales: &mut [u8]) {
    let divisor = tensor_scale.max(NVFP4_SCALE_FLOOR);
    for ((block, packed), code) in values
        .chunks_exact(NVFP4_GROUP)
        .zip(packed.chunks_exact_mut(NVFP4_GROUP / 2))
        .zip(block_scales.iter_mut())
    {
        // Fixed-size arrays: loops of known length over lanes vectorize (the division too,
        // which stays an exact IEEE division per value).
        let block: &[f32; NVFP4_GROUP] = block.try_into().expect("chunks_exact");
        let packed: &mut [u8; NVFP4_GROUP / 2] = packed.try_into().expect("chunks_exact");
        // Two divisions in this order, as comfy-kitchen does (not amax / (6 * s)).
        let scaled = (abs_max_16(block) / E2M1_MAX / divisor).min(E4M3_MAX);
        *code = f32_bits_to_e4m3fn(scaled.to_bits());
        let total = divisor * e4m3_to_f32(*code);
        if total == 0.0 {
            packed.fill(0);
            continue;
        }
        let mut codes = [0u8; NVFP4_GROUP];
        for (c, &x) in codes.iter_mut().zip(block) {
            *c = e2m1_code(x / total);
        }
        for (byte, pair) in packed.iter_mut().zip(codes.chunks_exact(2)) {
            *byte = (pair[0] << 4) | pair[1];
        }
    }
}

/// [`abs_max`] of one nvfp4 block, on the bits: a finite or infinite `|x|` orders as its bits
/// with the sign cleared, and NaN (bits above infinity's) is skipped as `f32::max` skips it.
/// Compared as `i32` (non-negative here), whose lane-wise compare SSE2 has.
#[inline(always)]
fn abs_max_16(block: &[f32; NVFP4_GROUP]) -> f32 {
    const INFINITY: i32 = 0x7f80_0000;
    let mut max = 0i32;
    for &x in block {
        let m = (x.to_bits() & 0x7fff_ffff) as i32;
        max = max.max(if m > INFINITY { 0 } else { m });
    }
    f32::from_bits(max as u32)
}

/// comfy-kitchen's `quantize_mxfp8` on whole rows of a (zero-padded) weight:
/// `values.len() == n * cols`, `cols` a multiple of 32. Writes `codes` (`n * cols` E4M3FN
/// bytes) and `block_scales` (`n * cols / 32` E8M0 codes, row-major, not swizzled).
///
/// Per block of 32: the scale is `2^ceil(log2(max(amax / 448, 2^-127)))` with the logarithm
/// rounded to f32 first (as torch's f32 `log2` is), so an amax a few ulps above `448 * 2^k`
/// gets scale `2^k` and saturates to 448. Code 0 decodes to 0.0: a non-zero block that small
/// (amax below about `448 * 2^-127`) gives ±448 and NaN codes, as comfy-kitchen does;
/// [`mxfp8_zero_scale_blocks`] finds such blocks. An all-zero block gives +0 codes and scale 0.
pub fn quantize_mxfp8_rows(values: &[f32], cols: usize, codes: &mut [u8], block_scales: &mut [u8]) {
    check_rows("quantize_mxfp8_rows", values.len(), cols, MXFP8_GROUP);
    assert_eq!(codes.len(), values.len(), "mxfp8: one code per value");
    assert_eq!(
        block_scales.len() * MXFP8_GROUP,
        values.len(),
        "mxfp8: one scale per 32"
    );
    for ((block, codes), scale_code) in values
        .chunks_exact(MXFP8_GROUP)
        .zip(codes.chunks_exact_mut(MXFP8_GROUP))
        .zip(block_scales.iter_mut())
    {
        let amax = abs_max(block);
        if amax == 0.0 {
            codes.fill(0);
            *scale_code = 0;
            continue;
        }
        *scale_code = mxfp8_scale_code(amax);
        let scale = e8m0_to_f32(*scale_code);
        for (&x, q) in block.iter().zip(codes.iter_mut()) {
            *q = e4m3_saturated(x / scale);
        }
    }
}

/// Blocks of an mxfp8 weight whose scale code is 0 although their values are not all zero
/// (the block was too small for E8M0, see [`quantize_mxfp8_rows`]): such a weight cannot be
/// stored faithfully. `codes` and `block_scales` as that function writes them.
pub fn mxfp8_zero_scale_blocks(codes: &[u8], block_scales: &[u8]) -> usize {
    codes
        .chunks(MXFP8_GROUP)
        .zip(block_scales)
        .filter(|&(block, &scale)| scale == 0 && block.iter().any(|&q| q != 0))
        .count()
}

/// The E8M0 code of a non-zero block with largest magnitude `amax`.
fn mxfp8_scale_code(amax: f32) -> u8 {
    let need = (amax / E4M3_MAX).max(MXFP8_NEED_FLOOR);
    // torch's f32 log2 is correctly rounded to f32, and the ceiling is taken of that rounded
    // value; the f64 logarithm rounded to f32 reproduces it (checked on 21 M values).
    let exponent = ((need as f64).log2() as f32).ceil();
    (exponent as i32)
        .saturating_add(E8M0_BIAS)
        .clamp(0, E8M0_MAX_CODE) as u8
}

fn check_rows(what: &str, len: usize, cols: usize, group: usize) {
    assert!(
        cols > 0 && cols.is_multiple_of(group) && len.is_multiple_of(cols),
        "{what}: {len} values are not whole rows of {cols} columns (a multiple of {group})"
    );
}

/// The stored 2-D shape of a [rows, cols] scale grid in the cuBLAS blocked layout
/// (comfy-kitchen's `to_blocked(flatten=False)`): `[roundup(rows, 128), roundup(cols, 4)]`.
pub fn blocked_shape(rows: usize, cols: usize) -> (usize, usize) {
    (
        rows.next_multiple_of(BLOCKED_TILE_ROWS),
        cols.next_multiple_of(BLOCKED_TILE_COLS),
    )
}

/// Where grid element (row, col) lies in a blocked buffer with `padded_cols` columns: tiles of
/// 128 rows one after the other, each a sequence of 512-byte groups of 4 columns, in which row
/// `r` of the tile is at `(r % 32) * 16 + (r / 32) * 4`.
fn blocked_index(row: usize, col: usize, padded_cols: usize) -> usize {
    let tile = row / BLOCKED_TILE_ROWS * BLOCKED_TILE_ROWS * padded_cols;
    tile + blocked_offset_in_tile(row, col)
}

fn blocked_offset_in_tile(row: usize, col: usize) -> usize {
    let r = row % BLOCKED_TILE_ROWS;
    col / BLOCKED_TILE_COLS * 512 + (r % 32) * 16 + (r / 32) * 4 + col % BLOCKED_TILE_COLS
}

/// The row-major `[rows, cols]` `grid` in the blocked layout ([`blocked_shape`], zero padding).
pub fn to_blocked(grid: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    assert_eq!(
        grid.len(),
        rows * cols,
        "to_blocked: grid is not {rows} x {cols}"
    );
    let (padded_rows, padded_cols) = blocked_shape(rows, cols);
    let mut blocked = vec![0u8; padded_rows * padded_cols];
    if cols == 0 {
        return blocked;
    }
    for (r, row) in grid.chunks_exact(cols).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            blocked[blocked_index(r, c, padded_cols)] = v;
        }
    }
    blocked
}

/// The row-major `[rows, cols]` grid of a blocked buffer (the inverse of [`to_blocked`], cut
/// back to `[rows, cols]`).
pub fn from_blocked(blocked: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    let mut grid = vec![0u8; rows * cols];
    from_blocked_rows(
        &blocked[blocked_tiles_span(0..rows, cols)],
        0..rows,
        cols,
        &mut grid,
    );
    grid
}

/// The bytes of a blocked `[_, cols]` scale buffer that hold grid rows `rows`: the whole
/// 128-row tiles they fall in (a tile is contiguous, `128 * roundup(cols, 4)` bytes). Reading a
/// row range of a weight needs only these bytes of its scales.
pub fn blocked_tiles_span(rows: Range<usize>, cols: usize) -> Range<usize> {
    if rows.is_empty() {
        return 0..0;
    }
    let tile_bytes = BLOCKED_TILE_ROWS * cols.next_multiple_of(BLOCKED_TILE_COLS);
    rows.start / BLOCKED_TILE_ROWS * tile_bytes..rows.end.div_ceil(BLOCKED_TILE_ROWS) * tile_bytes
}

/// Grid rows `rows` (row-major into `grid`, `rows.len() * cols` bytes) from `tiles`, the bytes
/// [`blocked_tiles_span`] gives for the same rows.
pub fn from_blocked_rows(tiles: &[u8], rows: Range<usize>, cols: usize, grid: &mut [u8]) {
    assert_eq!(
        grid.len(),
        rows.len() * cols,
        "from_blocked_rows: grid size"
    );
    assert_eq!(
        tiles.len(),
        blocked_tiles_span(rows.clone(), cols).len(),
        "from_blocked_rows: tiles are not those of the rows"
    );
    if cols == 0 {
        return;
    }
    let tile_bytes = BLOCKED_TILE_ROWS * cols.next_multiple_of(BLOCKED_TILE_COLS);
    let first_tile = rows.start / BLOCKED_TILE_ROWS;
    for (r, row) in rows.zip(grid.chunks_exact_mut(cols)) {
        let tile = (r / BLOCKED_TILE_ROWS - first_tile) * tile_bytes;
        // Each group of 4 columns of a row is 4 contiguous bytes.
        for (g, four) in row.chunks_mut(BLOCKED_TILE_COLS).enumerate() {
            let at = tile + blocked_offset_in_tile(r, g * BLOCKED_TILE_COLS);
            four.copy_from_slice(&tiles[at..at + four.len()]);
        }
    }
}

/// comfy-kitchen's `dequantize_per_tensor_fp8` to f32: `e4m3(code) * scale`.
pub fn dequantize_fp8(codes: &[u8], scale: f32, out: &mut [f32]) {
    assert_eq!(codes.len(), out.len(), "dequantize_fp8: one value per code");
    for (&q, o) in codes.iter().zip(out.iter_mut()) {
        *o = e4m3_to_f32(q) * scale;
    }
}

/// comfy-kitchen's `dequantize_nvfp4` to f32 on whole rows (`out.len() == n * cols`, `packed`
/// and `block_scales` as [`quantize_nvfp4_rows`] writes them): `e2m1 * (tensor_scale *
/// e4m3(block scale))`. The rows are the stored (padded) ones; callers cut the padding. Since
/// blocks are independent, a block-aligned piece of a row is itself a valid "row".
pub fn dequantize_nvfp4_rows(
    packed: &[u8],
    block_scales: &[u8],
    cols: usize,
    tensor_scale: f32,
    out: &mut [f32],
) {
    check_rows("dequantize_nvfp4_rows", out.len(), cols, NVFP4_GROUP);
    assert_eq!(packed.len() * 2, out.len(), "nvfp4: two values per byte");
    assert_eq!(
        block_scales.len() * NVFP4_GROUP,
        out.len(),
        "nvfp4: one scale per 16"
    );
    for ((out, packed), &code) in out
        .chunks_exact_mut(NVFP4_GROUP)
        .zip(packed.chunks_exact(NVFP4_GROUP / 2))
        .zip(block_scales)
    {
        let total = tensor_scale * e4m3_to_f32(code);
        for (pair, &byte) in out.chunks_exact_mut(2).zip(packed) {
            pair[0] = E2M1_TO_F32[usize::from(byte >> 4)] * total;
            pair[1] = E2M1_TO_F32[usize::from(byte & 0x0F)] * total;
        }
    }
}

/// comfy-kitchen's `dequantize_mxfp8` to f32 on whole rows: `e4m3(code) * e8m0(block scale)`,
/// where E8M0 code 0 is 0.0. Padded rows, as [`dequantize_nvfp4_rows`].
pub fn dequantize_mxfp8_rows(codes: &[u8], block_scales: &[u8], cols: usize, out: &mut [f32]) {
    check_rows("dequantize_mxfp8_rows", out.len(), cols, MXFP8_GROUP);
    assert_eq!(codes.len(), out.len(), "mxfp8: one value per code");
    assert_eq!(
        block_scales.len() * MXFP8_GROUP,
        out.len(),
        "mxfp8: one scale per 32"
    );
    for ((out, codes), &scale_code) in out
        .chunks_exact_mut(MXFP8_GROUP)
        .zip(codes.chunks_exact(MXFP8_GROUP))
        .zip(block_scales)
    {
        let scale = e8m0_to_f32(scale_code);
        for (o, &q) in out.iter_mut().zip(codes) {
            *o = e4m3_to_f32(q) * scale;
        }
    }
}

/// comfy-kitchen's `e8m0_to_f32`: `2^(code - 127)` as the bits `code << 23`, except that code 0
/// is 0.0 (not 2^-127).
fn e8m0_to_f32(code: u8) -> f32 {
    if code == 0 {
        0.0
    } else {
        f32::from_bits(u32::from(code) << 23)
    }
}

fn e4m3_to_f32(code: u8) -> f32 {
    f32::from_bits(E4M3FN_TO_F32[usize::from(code)])
}

/// `x.clamp(±448).to(float8_e4m3fn)`.
fn e4m3_saturated(x: f32) -> u8 {
    f32_bits_to_e4m3fn(x.clamp(-E4M3_MAX, E4M3_MAX).to_bits())
}

/// torch's `_f32_to_floatx_unpacked(v, 2, 1)`: nearest E2M1 magnitude with ties to the even code
/// (`0.25 -> 0`, `0.75 -> 2`, `1.25 -> 2`, `1.75 -> 4`, `2.5 -> 4`, `3.5 -> 6`, `5 -> 6`),
/// saturating at 6, then the sign bit of `v` (also for -0.0 and negatives that round to 0).
/// Branch-free: the magnitude code counts the thresholds `|v|` passes.
fn e2m1_code(v: f32) -> u8 {
    let a = v.abs();
    let magnitude = u8::from(a > 0.25)
        + u8::from(a >= 0.75)
        + u8::from(a > 1.25)
        + u8::from(a >= 1.75)
        + u8::from(a > 2.5)
        + u8::from(a >= 3.5)
        + u8::from(a > 5.0);
    magnitude | ((v.to_bits() >> 28) as u8 & 0x08)
}

/// `x.to(bfloat16).to(float32)`.
fn round_to_bf16(x: f32) -> f32 {
    f32::from_bits(u32::from(f32_bits_to_bf16(x.to_bits(), BF16_NAN_FROM_F32)) << 16)
}

/// `x.to(float16).to(float32)`.
fn round_to_f16(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvfp4_block_max_on_bits_is_abs_max() {
        let specials = [
            0.0f32,
            -0.0,
            1.0e-45,
            -3.5,
            448.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            6.0e37,
        ];
        for i in 0..specials.len() {
            for j in 0..specials.len() {
                let mut block = [0.25f32; NVFP4_GROUP];
                block[3] = specials[i];
                block[11] = specials[j];
                assert_eq!(
                    abs_max_16(&block).to_bits(),
                    abs_max(&block).to_bits(),
                    "{i} {j}"
                );
            }
        }
    }

    #[test]
    fn fp8_table_gives_quantize_fp8_codes_for_every_16_bit_input() {
        for source in [Dtype::BF16, Dtype::F16] {
            for amax in [1.0e-30f32, 0.013, 1.0, 3.7, 448.0, 60000.0, 3.0e38] {
                let scale = fp8_tensor_scale(amax, source);
                let table = Fp8Table::new(source, scale).expect("16-bit table");
                let raw: Vec<u8> = (0..=u16::MAX).flat_map(u16::to_le_bytes).collect();
                let values: Vec<f32> = (0..=u16::MAX)
                    .map(|b| match source {
                        Dtype::BF16 => f32::from_bits(u32::from(b) << 16),
                        _ => half::f16::from_bits(b).to_f32(),
                    })
                    .collect();
                let (mut direct, mut looked_up) = (vec![0u8; 65536], vec![0u8; 65536]);
                quantize_fp8(&values, source, scale, &mut direct);
                table.quantize(&raw, &mut looked_up);
                assert!(direct == looked_up, "{source:?} amax {amax}");
                // Not a constant table: the scale is in it.
                assert!(looked_up.iter().any(|&c| c != looked_up[0]));
            }
        }
        assert!(Fp8Table::new(Dtype::F32, 1.0).is_none());
    }

    #[test]
    fn e2m1_rounds_ties_to_even_codes_and_keeps_the_sign() {
        let cases: [(f32, u8); 22] = [
            (0.0, 0),
            (-0.0, 8),
            (0.25, 0),
            (0.2500001, 1),
            (-0.1, 8),
            (0.5, 1),
            (0.75, 2),
            (1.25, 2),
            (1.5, 3),
            (1.75, 4),
            (2.25, 4),
            (2.5, 4),
            (3.0, 5),
            (3.5, 6),
            (4.5, 6),
            (5.0, 6),
            (5.0001, 7),
            (6.0, 7),
            (-6.0, 15),
            (1e9, 7),
            (-0.75, 10),
            (-5.0, 14),
        ];
        for (v, code) in cases {
            assert_eq!(e2m1_code(v), code, "{v}");
            let back = E2M1_TO_F32[usize::from(code)];
            assert_eq!(back.is_sign_negative(), v.is_sign_negative(), "{v}");
        }
    }

    #[test]
    fn fp8_scale_rules() {
        assert_eq!(fp8_tensor_scale(448.0, Dtype::BF16), 1.0);
        assert_eq!(fp8_tensor_scale(0.0, Dtype::F32), 1.0);
        assert_eq!(fp8_tensor_scale(1e-20, Dtype::F32), 1.0e-12);
        assert_eq!(fp8_tensor_scale(1e-20, Dtype::F32).to_bits(), 0x2B8C_BCCC);
        // F16: 1/s above 65504 is clamped, so 1/s stays finite in f16.
        let s = fp8_tensor_scale(0.001, Dtype::F16);
        assert_eq!(s, 1.0 / 65504.0);
        assert!(round_to_f16(1.0 / s).is_finite());
        assert_eq!(
            fp8_tensor_scale(0.001, Dtype::BF16),
            0.001 / 448.0,
            "the guard is for F16 only"
        );
    }

    #[test]
    fn fp8_bf16_products_round_twice() {
        // 1/s rounds to bf16 3.0; 0.7109375 * 3 = 2.1328125 rounds to bf16 2.125, an E4M3 tie
        // that goes to the even 2.0 (0x40). Rounded once (an f32 source), it is 2.25 (0x41).
        let mut q = [0u8];
        quantize_fp8(&[0.7109375], Dtype::BF16, 1.0 / 3.0, &mut q);
        assert_eq!(q, [0x40]);
        quantize_fp8(&[0.7109375], Dtype::F32, 1.0 / 3.0, &mut q);
        assert_eq!(q, [0x41]);
        // Values beyond ±448 after scaling saturate, never NaN.
        let mut q = [0u8; 2];
        quantize_fp8(&[1e6, -1e6], Dtype::F32, 1.0, &mut q);
        assert_eq!(q, [0x7E, 0xFE]);
        // An F16 product beyond 65504 is inf in f16, then clamped to 448.
        let mut q = [0u8];
        quantize_fp8(&[60000.0], Dtype::F16, 1.0 / 4.0, &mut q);
        assert_eq!(q, [0x7E]);
    }

    #[test]
    fn nvfp4_zero_tensor_and_underflowing_blocks_give_positive_zero_codes() {
        let mut values = vec![0f32; 32];
        values[3] = -0.0;
        let (mut packed, mut scales) = (vec![0xAAu8; 16], vec![0xAAu8; 2]);
        quantize_nvfp4_rows(
            &values,
            32,
            nvfp4_tensor_scale(0.0),
            &mut packed,
            &mut scales,
        );
        assert!(packed.iter().all(|&b| b == 0), "{packed:?}");
        assert_eq!(scales, [0, 0]);
        // A block far below the tensor maximum: its scale rounds to code 0, its data to +0.
        values[0] = 2688.0;
        values[16] = 1e-4;
        values[17] = -1e-4;
        quantize_nvfp4_rows(
            &values,
            32,
            nvfp4_tensor_scale(2688.0),
            &mut packed,
            &mut scales,
        );
        assert_eq!(scales[1], 0);
        assert!(packed[8..].iter().all(|&b| b == 0));
        assert_eq!(packed[0] >> 4, 7);
        let mut out = vec![1f32; 32];
        dequantize_nvfp4_rows(&packed, &scales, 32, 1.0, &mut out);
        assert_eq!(out[0], 2688.0);
        assert!(out[16..].iter().all(|v| v.to_bits() == 0));
    }

    #[test]
    fn nvfp4_nibbles_are_high_first() {
        let mut values = [0f32; 16];
        values[0] = 6.0; // code 7
        values[1] = -1.0; // code 10
        let (mut packed, mut scales) = ([0u8; 8], [0u8; 1]);
        // tensor scale 1/448 makes the block scale 1.0 exactly (6 / 6 / (1/448) = 448 -> 448).
        quantize_nvfp4_rows(&values, 16, 1.0 / 448.0, &mut packed, &mut scales);
        assert_eq!(scales[0], 0x7E);
        assert_eq!(packed[0], 0x7A);
    }

    #[test]
    fn mxfp8_scale_codes() {
        assert_eq!(mxfp8_scale_code(448.0), 127);
        assert_eq!(mxfp8_scale_code(448.0 * 2.0), 128);
        assert_eq!(mxfp8_scale_code(449.0), 128);
        // log2 rounded to f32 first: one ulp above 448 * 2^-5 still gives 2^-5.
        let just_above = f32::from_bits((448.0f32 * 2f32.powi(-5)).to_bits() + 1);
        assert_eq!(mxfp8_scale_code(just_above), 127 - 5);
        // Tiny blocks: code 0 (decoded as 0.0) and the quantizer's ±448 codes.
        assert_eq!(mxfp8_scale_code(1e-38), 0);
        assert_eq!(e8m0_to_f32(0), 0.0);
        assert_eq!(e8m0_to_f32(127), 1.0);
        assert_eq!(mxfp8_scale_code(f32::INFINITY), 254);
        let mut values = [0f32; 64];
        values[0] = 1e-38;
        values[1] = -1e-38;
        values[32] = 1.0;
        let (mut codes, mut scales) = ([0u8; 64], [0u8; 2]);
        quantize_mxfp8_rows(&values, 64, &mut codes, &mut scales);
        assert_eq!(scales, [0, 127 - 8]);
        assert_eq!((codes[0], codes[1]), (0x7E, 0xFE));
        assert_eq!(codes[32], 0x78, "1.0 / 2^-8 = 256");
        assert_eq!(mxfp8_zero_scale_blocks(&codes, &scales), 1);
        // An all-zero block: code 0, data +0, and not a faithfulness problem.
        let (mut codes, mut scales) = ([9u8; 32], [9u8; 1]);
        quantize_mxfp8_rows(&[-0.0; 32], 32, &mut codes, &mut scales);
        assert_eq!((codes, scales), ([0; 32], [0]));
        assert_eq!(mxfp8_zero_scale_blocks(&codes, &scales), 0);
    }

    #[test]
    fn padded_shapes() {
        assert_eq!(nvfp4_padded_shape(64, 128), (64, 128));
        assert_eq!(nvfp4_padded_shape(130, 96), (144, 96));
        assert_eq!(nvfp4_padded_shape(3, 5), (16, 16));
        assert_eq!(mxfp8_padded_shape(16, 32), (32, 32));
        assert_eq!(mxfp8_padded_shape(48, 80), (64, 96));
        assert_eq!(mxfp8_padded_shape(64, 128), (64, 128));
    }

    #[test]
    fn blocked_layout_round_trips_and_tiles_are_contiguous() {
        for (rows, cols) in [(1, 1), (3, 5), (128, 4), (130, 6), (300, 9), (256, 8)] {
            let grid: Vec<u8> = (0..rows * cols).map(|i| (i % 251 + 1) as u8).collect();
            let blocked = to_blocked(&grid, rows, cols);
            let (hp, wp) = blocked_shape(rows, cols);
            assert_eq!(blocked.len(), hp * wp);
            assert_eq!(blocked.iter().filter(|&&b| b != 0).count(), rows * cols);
            assert_eq!(from_blocked(&blocked, rows, cols), grid);
            for range in [0..1, 1..rows, rows - 1..rows, rows / 2..rows, 0..rows] {
                let span = blocked_tiles_span(range.clone(), cols);
                let mut part = vec![0u8; range.len() * cols];
                from_blocked_rows(&blocked[span], range.clone(), cols, &mut part);
                assert_eq!(part, grid[range.start * cols..range.end * cols]);
            }
        }
        // The layout itself (comfy-kitchen's formula) for a few elements.
        let (rows, cols) = (256, 8);
        let mut grid = vec![0u8; rows * cols];
        grid[33 * cols + 5] = 1; // tile 0, column group 1, r%32 = 1, r/32 = 1, c%4 = 1
        grid[130 * cols + 2] = 2; // tile 1 (starts at 128 * 8), group 0, r%32 = 2
        let blocked = to_blocked(&grid, rows, cols);
        assert_eq!(blocked[512 + 16 + 4 + 1], 1);
        assert_eq!(blocked[128 * 8 + 2 * 16 + 2], 2);
    }

    #[test]
    fn dequantizers() {
        let mut out = [0f32; 2];
        dequantize_fp8(&[0x38, 0xC0], 0.5, &mut out);
        assert_eq!(out, [0.5, -1.0]);
        let mut out = [0f32; 32];
        let mut codes = [0u8; 32];
        codes[0] = 0x38; // 1.0
        codes[1] = 0xB8; // -1.0
        dequantize_mxfp8_rows(&codes, &[128], 32, &mut out);
        assert_eq!(&out[..3], &[2.0, -2.0, 0.0]);
        dequantize_mxfp8_rows(&codes, &[0], 32, &mut out);
        assert_eq!(&out[..2], &[0.0, -0.0]);
    }

    #[test]
    #[should_panic(expected = "whole rows")]
    fn ragged_rows_are_a_caller_bug() {
        quantize_mxfp8_rows(&[0.0; 48], 48, &mut [0; 48], &mut [0; 1]);
    }
}
