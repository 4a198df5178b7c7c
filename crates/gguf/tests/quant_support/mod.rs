//! Input generators and hashing shared by the quantization tests; each mirrors a function of
//! `tests/golden/quant/make_goldens.py` exactly (same draws, same f32 operations).

#![allow(dead_code)]

use std::path::PathBuf;

/// FNV-1a 64 over bytes.
pub fn fnv1a64(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{h:016x}")
}

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// xorshift32 (13, 17, 5).
pub struct Xorshift32(pub u32);

impl Xorshift32 {
    pub fn next_u32(&mut self) -> u32 {
        let mut s = self.0;
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        self.0 = s;
        s
    }

    /// Sum of four 24-bit draws, centred, times 2^-24 (int → f32 rounds to nearest even).
    pub fn gauss(&mut self) -> f32 {
        let k: i64 = (0..4).map(|_| (self.next_u32() >> 8) as i64).sum();
        (k - (1 << 25)) as f32 * (1.0 / 16_777_216.0)
    }
}

/// ggml-quants.md §10: 16 × 4096.
pub fn note_vector() -> Vec<f32> {
    let mut r = Xorshift32(0x1234_5678);
    let mut x = Vec::with_capacity(16 * 4096);
    for row in 0..16 {
        for i in 0..4096 {
            let g = r.gauss();
            x.push(match row {
                14 => 0.0,
                15 if i == 7 => 3.0,
                15 => g,
                _ => g * 0.02,
            });
        }
    }
    x
}

const SWEEP_SCALES: [f32; 6] = [0.02, 1.0, 1e-3, 300.0, 3e-6, 6e4];

/// `gen_sweep` of make_goldens.py: 512 × 256.
pub fn sweep() -> Vec<f32> {
    let mut r = Xorshift32(0x00C0_FFEE);
    let mut x = vec![0f32; 512 * 256];
    for row in 0..512 {
        let sc = SWEEP_SCALES[row % 6];
        let xs = &mut x[row * 256..row * 256 + 256];
        for v in xs.iter_mut() {
            *v = r.gauss() * sc;
        }
        if row % 5 == 0 {
            let pos = (r.next_u32() % 256) as usize;
            xs[pos] = r.gauss() * sc * 64.0;
        }
        if row % 7 == 3 {
            let sb = (r.next_u32() % 16) as usize;
            xs[16 * sb..16 * sb + 16].fill(0.0);
        }
    }
    x
}

pub fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/quant")
}
