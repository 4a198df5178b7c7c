//! Quantization and dequantization kernels, reproducing bitsandbytes 0.50's CPU arithmetic.
//!
//! Every function works on a caller-sized slice so the converter can run them in parallel over
//! chunks of whole blocks (4-bit) or whole rows (int8). The f32 operations are the ones bnb's
//! CPU path performs, in the same order, so results are bit-identical (see the crate docs for
//! where bnb's CPU and CUDA paths differ and which one is matched).

use std::sync::LazyLock;

use serde::Serialize;

use crate::codes::{self, FP4_BITS, FP4_SORTED_NIBBLES, NF4_BITS};

/// Elements per 4-bit block (absmax group). bnb's default and Forge's choice.
pub const BLOCKSIZE: usize = 64;
/// Absmax values per block of the double quantization.
pub const NESTED_BLOCKSIZE: usize = 256;
/// The lower clamp bnb's CPU quantizer applies to absmax before dividing by it
/// (`absmax.clamp(min=1e-38)`); an all-zero *partial* final block stores this value.
pub const MIN_ABSMAX: f32 = 1e-38;
/// `f32(1/127)` as bnb's int8 dequantization multiplies by it (`7.874015718698502e-3`).
#[allow(clippy::excessive_precision)] // bnb's literal, rounded to f32 as torch does
pub const INV_127: f32 = 7.874_015_718_698_502e-3;

/// The 4-bit data type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantType {
    /// NormalFloat4.
    Nf4,
    /// bnb's FP4 (E2M1).
    Fp4,
}

impl QuantType {
    /// bnb's spelling (`quant_type` in the JSON, suffix of the quant-state key).
    pub const fn name(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }

    /// The 16 code values, nibble order (what `quant_map` holds).
    pub fn table(self) -> [f32; 16] {
        match self {
            QuantType::Nf4 => codes::table(&NF4_BITS),
            QuantType::Fp4 => codes::table(&FP4_BITS),
        }
    }

    /// The values bnb's `dequantize_4bit` decodes nibbles to for a weight of this `shape`.
    ///
    /// Equal to [`QuantType::table`] except FP4 nibble 8: bnb's native CPU kernel (and CUDA)
    /// decode it as -0.0, but bnb's CPU falls back to the PyTorch table (+0.0) when the last
    /// dimension is odd. Matching both keeps the sign of zero identical to bnb's output.
    pub fn dequant_table(self, shape: &[u64]) -> [f32; 16] {
        let mut t = self.table();
        let odd_last = shape.last().is_some_and(|d| d % 2 == 1);
        if self == QuantType::Fp4 && !odd_last {
            t[8] = -0.0;
        }
        t
    }

    /// Parses bnb's spelling.
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "nf4" => Some(QuantType::Nf4),
            "fp4" => Some(QuantType::Fp4),
            _ => None,
        }
    }
}

/// Picks the nibble for a scaled value the way bnb's CPU quantizer does: `torch.bucketize` of
/// the value over the f32 midpoints of the sorted table (`right=False`: the number of midpoints
/// strictly below the value, so an exact tie goes to the lower code), mapped back to nibble order.
#[derive(Debug, Clone)]
pub struct Quantizer4 {
    bounds: [f32; 15],
    nibble_of_rank: [u8; 16],
}

impl Quantizer4 {
    /// The quantizer for `qt`.
    pub fn new(qt: QuantType) -> Self {
        let table = qt.table();
        let nibble_of_rank = match qt {
            QuantType::Nf4 => std::array::from_fn(|i| i as u8),
            QuantType::Fp4 => FP4_SORTED_NIBBLES,
        };
        let sorted = nibble_of_rank.map(|n| table[n as usize]);
        let bounds = std::array::from_fn(|i| (sorted[i] + sorted[i + 1]) / 2.0);
        Quantizer4 {
            bounds,
            nibble_of_rank,
        }
    }

    /// The nibble of scaled value `s`.
    #[inline]
    pub fn nibble(&self, s: f32) -> u8 {
        let rank: usize = self
            .bounds
            .iter()
            .map(|&b| usize::from(b < s || s.is_nan()))
            .sum();
        self.nibble_of_rank[rank]
    }
}

/// max |x| over a slice, NaN-propagating like `torch.max` (some NaN if any element is NaN).
///
/// Works on the bit patterns: for non-NaN values the order of `|x|`'s bits is the order of the
/// values, and every NaN's bits are above infinity's, so an integer max (which vectorizes)
/// gives the float max.
#[inline]
fn abs_max(x: &[f32]) -> f32 {
    f32::from_bits(x.iter().fold(0u32, |m, v| m.max(v.to_bits() & 0x7fff_ffff)))
}

/// `clamp(min=MIN_ABSMAX)` that keeps NaN, like torch.
#[inline]
fn clamp_min(a: f32) -> f32 {
    if a < MIN_ABSMAX { MIN_ABSMAX } else { a }
}

impl Quantizer4 {
    /// Nibbles of up to 64 scaled values (bound by bound over the whole block, which
    /// vectorizes, instead of value by value).
    #[inline]
    fn block_nibbles(&self, s: &[f32; BLOCKSIZE], out: &mut [u8; BLOCKSIZE]) {
        let mut rank = [0u8; BLOCKSIZE];
        for &b in &self.bounds {
            for (r, &v) in rank.iter_mut().zip(s) {
                // `b < v`, except that NaN ranks above every bound, as in `torch.bucketize`.
                *r += u8::from(b < v || v.is_nan());
            }
        }
        for (o, r) in out.iter_mut().zip(rank) {
            *o = self.nibble_of_rank[r as usize];
        }
    }
}

/// Quantizes `x` (the f32 values of consecutive elements of a flattened tensor, starting at a
/// block boundary) into packed nibbles and per-block absmax.
///
/// Only the last block of `x` may be partial, and only if `x` ends the tensor. `codes` holds
/// `x.len().div_ceil(2)` bytes (element `2k` in the high nibble), `absmax` `x.len().div_ceil(64)`.
///
/// Full blocks: absmax = max|x| stored as is; scaled = x · f32(1/max(absmax, 1e-38)). A partial
/// final block: absmax = max(max|x|, 1e-38) stored clamped; scaled = x / absmax (bnb divides
/// there). An odd element count pads with a scaled 0.
pub fn quantize_4bit(q: &Quantizer4, x: &[f32], codes: &mut [u8], absmax: &mut [f32]) {
    debug_assert_eq!(codes.len(), x.len().div_ceil(2));
    debug_assert_eq!(absmax.len(), x.len().div_ceil(BLOCKSIZE));
    let mut scaled = [0f32; BLOCKSIZE];
    let mut nib = [0u8; BLOCKSIZE];
    for ((block, out), am_out) in x
        .chunks(BLOCKSIZE)
        .zip(codes.chunks_mut(BLOCKSIZE / 2))
        .zip(absmax.iter_mut())
    {
        let am = abs_max(block);
        if block.len() == BLOCKSIZE {
            *am_out = am;
            let r = 1.0f32 / clamp_min(am);
            for (s, &v) in scaled.iter_mut().zip(block) {
                *s = v * r;
            }
        } else {
            let am = clamp_min(am);
            *am_out = am;
            scaled = [0.0; BLOCKSIZE]; // the pad element of an odd tail is a scaled 0
            for (s, &v) in scaled.iter_mut().zip(block) {
                *s = v / am;
            }
        }
        q.block_nibbles(&scaled, &mut nib);
        for (byte, pair) in out.iter_mut().zip(nib.chunks_exact(2)) {
            *byte = (pair[0] << 4) | pair[1];
        }
    }
}

/// Decodes the elements `[first, first + out.len())` of a packed 4-bit tensor: f32(code · absmax),
/// as bnb's CPU and CUDA dequantizers compute before casting to the output dtype.
///
/// `packed` and `absmax` are the whole tensor's; the caller checks their lengths. `blocksize`
/// is even (bnb's are powers of two), so both nibbles of a byte share one absmax.
pub fn dequantize_4bit(
    table: &[f32; 16],
    packed: &[u8],
    absmax: &[f32],
    blocksize: usize,
    first: usize,
    out: &mut [f32],
) {
    let (head, rest) = if first % 2 == 1 && !out.is_empty() {
        let (h, r) = out.split_at_mut(1);
        h[0] = table[(packed[first / 2] & 0x0F) as usize] * absmax[first / blocksize];
        (1, r)
    } else {
        (0, out)
    };
    let first = first + head;
    for (k, pair) in rest.chunks_mut(2).enumerate() {
        let e = first + 2 * k;
        let byte = packed[e / 2];
        let a = absmax[e / blocksize];
        pair[0] = table[(byte >> 4) as usize] * a;
        if let Some(lo) = pair.get_mut(1) {
            *lo = table[(byte & 0x0F) as usize] * a;
        }
    }
}

/// f32 -> bf16 as bnb's native CPU dequantizer rounds (`float_to_bf16`: add 0x7FFF plus the
/// lowest kept bit, shift). Equal to torch's rounding except for NaN bits (a quiet NaN keeps its
/// sign and top payload bits here; torch writes 0xFFFF).
#[inline]
pub fn f32_to_bf16_bnb(v: f32) -> u16 {
    let b = v.to_bits();
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// Double quantization of a tensor's absmax, as `quantize_4bit(compress_statistics=True)` does it.
#[derive(Debug, Clone, PartialEq)]
pub struct NestedAbsmax {
    /// `absmax.mean()`, subtracted before quantizing.
    pub offset: f32,
    /// One 8-bit code (index into the dynamic map) per 4-bit block.
    pub codes: Vec<u8>,
    /// Per 256-block absmax of `absmax - offset`.
    pub nested_absmax: Vec<f32>,
}

/// The mean bnb subtracts. torch sums in f32 in an order that depends on its vector width and
/// thread count; we sum in f64 and round once, which agrees with torch to the last ulp or so.
pub fn absmax_mean(absmax: &[f32]) -> f32 {
    if absmax.is_empty() {
        return 0.0;
    }
    let sum: f64 = absmax.iter().map(|&a| f64::from(a)).sum();
    (sum / absmax.len() as f64) as f32
}

/// Double-quantizes `absmax` with the mean as offset.
pub fn double_quant(absmax: &[f32]) -> NestedAbsmax {
    double_quant_with_offset(absmax, absmax_mean(absmax))
}

/// bnb 0.50's CPU 8-bit blockwise quantizer's lookup table: the value range [-1, 1] cut into 65536
/// bins, each mapped to the code whose midpoint interval holds the bin's left value.
static DYNAMIC_LUT: LazyLock<Box<[u8; 65536]>> = LazyLock::new(|| {
    let map = codes::dynamic_map();
    let mid: Vec<f32> = map.windows(2).map(|w| 0.5f32 * (w[0] + w[1])).collect();
    let mut lut = Box::new([0u8; 65536]);
    let mut code = 0usize;
    for (i, slot) in lut.iter_mut().enumerate() {
        let val = -1.0f32 + (2.0f32 * i as f32) / 65535.0f32;
        while code < mid.len() && mid[code] < val {
            code += 1;
        }
        *slot = code as u8;
    }
    lut
});

/// The LUT index of a scaled value (bnb's `norm_to_lut_index`; the float-to-int conversion
/// truncates).
#[inline]
fn lut_index(v: f32) -> usize {
    let v = v.clamp(-1.0, 1.0);
    ((v + 1.0) * 0.5 * 65535.0 + 0.5) as u16 as usize
}

/// Double-quantizes `absmax` around a given offset (bnb's CPU `quantize_blockwise` of
/// `absmax - offset` with blocksize 256 and the dynamic map).
///
/// This matches bnb 0.50's CPU kernel, which snaps each scaled value to a 65536-bin grid before
/// picking the code, not the exact nearest-code search of bnb's CUDA kernel (the two differ for
/// values within ~1.5e-5 of a code midpoint and near 0); see the crate docs.
pub fn double_quant_with_offset(absmax: &[f32], offset: f32) -> NestedAbsmax {
    let lut = &**DYNAMIC_LUT;
    let mut codes = vec![0u8; absmax.len()];
    let mut nested_absmax = vec![0f32; absmax.len().div_ceil(NESTED_BLOCKSIZE)];
    for ((block, out), na) in absmax
        .chunks(NESTED_BLOCKSIZE)
        .zip(codes.chunks_mut(NESTED_BLOCKSIZE))
        .zip(nested_absmax.iter_mut())
    {
        // bnb's loop `std::max(m, fabs(v))` skips NaN.
        let am = block.iter().fold(0.0f32, |m, &a| {
            let v = (a - offset).abs();
            if m < v { v } else { m }
        });
        *na = am;
        if am == 0.0 {
            continue; // codes stay 0, as bnb writes them
        }
        let inv = 1.0f32 / am;
        for (o, &a) in out.iter_mut().zip(block) {
            *o = lut[lut_index((a - offset) * inv)];
        }
    }
    NestedAbsmax {
        offset,
        codes,
        nested_absmax,
    }
}

/// Decodes double-quantized absmax: `f32(f32(map[q] · nested_absmax) + offset)`, bnb's
/// `dequantize_blockwise` followed by `absmax += offset`.
///
/// The caller checks `nested_absmax.len() == codes.len().div_ceil(nested_blocksize)`.
pub fn decode_nested_absmax(
    map: &[f32; 256],
    codes: &[u8],
    nested_absmax: &[f32],
    nested_blocksize: usize,
    offset: f32,
) -> Vec<f32> {
    codes
        .iter()
        .enumerate()
        .map(|(i, &q)| map[q as usize] * nested_absmax[i / nested_blocksize] + offset)
        .collect()
}

/// LLM.int8 row-wise quantization of one or more whole rows of `cols` values, which must
/// already be fp16 values widened to f32 (bnb casts the weight to fp16 first).
///
/// SCB = max|row| (NaN propagates); q = round_half_even(x · f32(f32(1/SCB) · 127)) — bnb computes
/// `127.0 / SCB` as `SCB.reciprocal() * 127`. An all-zero row gets q = 0 and SCB = 0.
pub fn quantize_int8_rows(x: &[f32], cols: usize, q: &mut [i8], scb: &mut [f32]) {
    debug_assert_eq!(x.len(), q.len());
    debug_assert_eq!(x.len(), cols * scb.len());
    for ((row, qrow), s) in x.chunks(cols).zip(q.chunks_mut(cols)).zip(scb.iter_mut()) {
        let am = abs_max(row);
        *s = am;
        if am == 0.0 {
            qrow.fill(0);
            continue;
        }
        let scale = (1.0f32 / am) * 127.0f32;
        for (o, &v) in qrow.iter_mut().zip(row) {
            // `as` saturates and maps NaN to 0, which is what torch gives on x86 for NaN rows.
            *o = round_half_even_small(v * scale) as i8;
        }
    }
}

/// 1.5 · 2^23: adding it leaves no fraction bits, so the FPU's round-to-nearest-even does the
/// rounding; subtracting it back is exact.
const ROUNDING_MAGIC: f32 = 12_582_912.0;

/// `y.round_ties_even()` for |y| <= 2^22 (and NaN, which stays NaN), in two additions that
/// vectorise on any x86-64: `round_ties_even` itself becomes a call to libm's `rintf` per value
/// without SSE4.1, which was 45% of an int8 conversion. Here |y| <= 127 (|v| <= max|row|).
/// The sign of a zero result may differ, which the `as i8` that follows erases.
#[inline(always)]
fn round_half_even_small(y: f32) -> f32 {
    (y + ROUNDING_MAGIC) - ROUNDING_MAGIC
}

/// LLM.int8 dequantization of whole rows: f32(f32(q · SCB) · f32(1/127)).
pub fn dequantize_int8_rows(q: &[i8], cols: usize, scb: &[f32], out: &mut [f32]) {
    for ((qrow, orow), &s) in q.chunks(cols).zip(out.chunks_mut(cols)).zip(scb) {
        for (o, &v) in orow.iter_mut().zip(qrow) {
            *o = (f32::from(v) * s) * INV_127;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn magic_rounding_is_round_half_even_for_the_int8_range() {
        let mut ys: Vec<f32> = (-260..=260).map(|i| i as f32 * 0.5).collect();
        ys.extend([
            0.49999997,
            -0.49999997,
            126.5,
            -126.5,
            127.49999,
            1e-30,
            -1e-30,
        ]);
        let mut x = 0x1234_5678u32;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            ys.push((x as f32 / u32::MAX as f32 - 0.5) * 260.0);
        }
        for y in ys {
            let a = round_half_even_small(y);
            let b = y.round_ties_even();
            assert!(a == b, "{y}: {a} vs {b}");
            assert_eq!(a as i8, b as i8, "{y}");
        }
        assert!(round_half_even_small(f32::NAN).is_nan());
        assert_eq!(round_half_even_small(f32::NAN) as i8, 0);
    }

    #[test]
    fn nf4_ties_go_down_and_zero_is_code_7() {
        let q = Quantizer4::new(QuantType::Nf4);
        let t = QuantType::Nf4.table();
        assert_eq!(q.nibble(0.0), 7);
        for i in 0..15 {
            let mid = (t[i] + t[i + 1]) / 2.0;
            assert_eq!(q.nibble(mid), i as u8);
            assert_eq!(q.nibble(f32::from_bits(mid.to_bits() + 1) * 1.0), {
                // the next float above a positive midpoint / below a negative one
                if mid > 0.0 { i as u8 + 1 } else { i as u8 }
            });
        }
        assert_eq!(q.nibble(1.0), 15);
        assert_eq!(q.nibble(-1.0), 0);
    }

    #[test]
    fn fp4_decodes_to_nearest_value() {
        let q = Quantizer4::new(QuantType::Fp4);
        let t = QuantType::Fp4.table();
        for k in -1000..=1000 {
            let s = k as f32 / 1000.0;
            let got = t[q.nibble(s) as usize];
            let best = t
                .iter()
                .map(|v| (v - s).abs())
                .fold(f32::INFINITY, f32::min);
            assert!((got - s).abs() <= best + 1e-7, "{s}: got {got}");
        }
    }

    #[test]
    fn zero_blocks_and_odd_tails() {
        let q = Quantizer4::new(QuantType::Nf4);
        let x = vec![0.0f32; 64 + 3];
        let mut codes = vec![0u8; 34];
        let mut am = vec![0f32; 2];
        quantize_4bit(&q, &x, &mut codes, &mut am);
        assert!(codes.iter().all(|&c| c == 0x77));
        assert_eq!(am, [0.0, MIN_ABSMAX]);
    }

    #[test]
    fn int8_round_trip_is_within_half_a_step() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) * 0.37).collect();
        let mut q = vec![0i8; 64];
        let mut scb = vec![0f32; 2];
        quantize_int8_rows(&x, 32, &mut q, &mut scb);
        let mut back = vec![0f32; 64];
        dequantize_int8_rows(&q, 32, &scb, &mut back);
        for (i, (b, v)) in back.iter().zip(&x).enumerate() {
            assert!((b - v).abs() <= scb[i / 32] / 127.0 * 0.5 + 1e-6);
        }
    }
}
