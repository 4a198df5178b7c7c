//! `cast_slice` against PyTorch's `.to(dtype)`, bit for bit.
//!
//! The goldens come from `tests/golden/make_goldens.py` (torch 2.15); the input generators here
//! mirror the script's exactly.

#![allow(clippy::unwrap_used)] // test code: a malformed golden should fail loudly

use std::collections::BTreeSet;

use serde_json::Value;
use tensorfile::cast::cast_slice;
use tensorfile::safetensors::Dtype;

const GOLDEN: &str = include_str!("golden/casts.json");

fn dtype(v: &Value) -> Dtype {
    v.as_str().unwrap().parse().unwrap()
}

fn size(d: Dtype) -> usize {
    (d.bits() / 8) as usize
}

/// Little-endian bytes of `vals`, each `width` bytes wide.
fn to_bytes(vals: &[u64], width: usize) -> Vec<u8> {
    vals.iter()
        .flat_map(|v| v.to_le_bytes()[..width].to_vec())
        .collect()
}

fn from_bytes(bytes: &[u8], width: usize) -> Vec<u64> {
    bytes
        .chunks_exact(width)
        .map(|c| {
            let mut b = [0u8; 8];
            b[..width].copy_from_slice(c);
            u64::from_le_bytes(b)
        })
        .collect()
}

fn patterns(mant_bits: u32, guards: &[u32], stride: usize) -> Vec<u64> {
    let mask = (1u64 << mant_bits) - 1;
    let mut p = vec![0u64];
    for k in 0..mant_bits {
        p.extend([1u64 << k, (1u64 << k) - 1, (1u64 << k) + 1, 3u64 << k]);
    }
    for &g in guards {
        for j in (0..g).step_by(stride) {
            p.extend([(1u64 << g) | (1u64 << j), (3u64 << g) | (1u64 << j)]);
        }
        p.extend([
            (1u64 << g) | (1u64 << (g - 1)),
            (3u64 << g) | (1u64 << (g - 1)),
        ]);
    }
    p.into_iter().map(|x| x & mask).collect()
}

fn gen_f32_sweep() -> Vec<u64> {
    let pats = patterns(23, &[12, 15, 19, 20], 1);
    let mut out = Vec::new();
    for s in 0..2u64 {
        for e in 0..256u64 {
            for t in 0..8u64 {
                let head = (s << 31) | (e << 23) | (t << 20);
                out.extend(pats.iter().map(|p| (head | p) & 0xFFFF_FFFF));
            }
        }
    }
    out
}

fn gen_f64_sweep() -> Vec<u64> {
    let pats = patterns(52, &[28, 41, 44, 48, 49], 4);
    let exps: Vec<u64> = [0, 1]
        .into_iter()
        .chain(1023 - 160..1023 + 141)
        .chain([2046, 2047])
        .collect();
    let mut out = Vec::new();
    for s in 0..2u64 {
        for &e in &exps {
            for t in 0..8u64 {
                let head = (s << 63) | (e << 52) | (t << 49);
                out.extend(pats.iter().map(|p| head | p));
            }
        }
    }
    out
}

fn splitmix64(seed: u64, n: u64) -> Vec<u64> {
    (1..=n)
        .map(|i| {
            let mut z = seed.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        })
        .collect()
}

fn gen_f32_random() -> Vec<u64> {
    splitmix64(32, 1 << 18)
        .into_iter()
        .map(|r| r >> 32)
        .collect()
}

fn gen_f64_random() -> Vec<u64> {
    splitmix64(64, 1 << 18)
        .into_iter()
        .map(|r| {
            let e = (1023 - 150) + ((r >> 52) & 0x7FF) % 300;
            (r & 0x800F_FFFF_FFFF_FFFF) | (e << 52)
        })
        .collect()
}

fn input(name: &str) -> Vec<u64> {
    match name {
        "f32_sweep" => gen_f32_sweep(),
        "f64_sweep" => gen_f64_sweep(),
        "f32_random" => gen_f32_random(),
        "f64_random" => gen_f64_random(),
        "all16" => (0..65536).collect(),
        other => panic!("unknown golden input {other}"),
    }
}

fn block_hashes(out: &[u64], block: usize, p: u64) -> Vec<String> {
    out.chunks(block)
        .map(|blk| {
            let mut k = 1u64;
            let mut h = 0u64;
            for &v in blk {
                k = k.wrapping_mul(p);
                h = h.wrapping_add(v.wrapping_add(1).wrapping_mul(k));
            }
            format!("{h:016x}")
        })
        .collect()
}

fn cast(src: Dtype, vals: &[u64], dst: Dtype) -> Vec<u64> {
    let bytes = to_bytes(vals, size(src));
    let mut out = vec![0u8; vals.len() * size(dst)];
    cast_slice(src, &bytes, dst, &mut out).unwrap();
    from_bytes(&out, size(dst))
}

#[test]
fn every_pair_has_goldens() {
    let doc: Value = serde_json::from_str(GOLDEN).unwrap();
    let explicit: BTreeSet<(String, String)> = doc["explicit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["src"].to_string(), c["dst"].to_string()))
        .collect();
    // 6 sources x 5 other destinations.
    assert_eq!(explicit.len(), 30);
    assert!(doc["sweeps"].as_array().unwrap().len() >= 30);
}

#[test]
fn explicit_values_match_torch() {
    let doc: Value = serde_json::from_str(GOLDEN).unwrap();
    let mut failures = Vec::new();
    for case in doc["explicit"].as_array().unwrap() {
        let (src, dst) = (dtype(&case["src"]), dtype(&case["dst"]));
        let hex = |v: &Value| -> Vec<u64> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|s| u64::from_str_radix(s.as_str().unwrap(), 16).unwrap())
                .collect()
        };
        let (inp, want) = (hex(&case["in"]), hex(&case["out"]));
        let got = cast(src, &inp, dst);
        for ((i, w), g) in inp.iter().zip(&want).zip(&got) {
            if w != g {
                failures.push(format!(
                    "{src}->{dst}: input {i:#x}: torch {w:#x}, ours {g:#x}"
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures[..failures.len().min(40)].join("\n")
    );
}

#[test]
fn sweeps_match_torch() {
    let doc: Value = serde_json::from_str(GOLDEN).unwrap();
    let block = doc["block"].as_u64().unwrap() as usize;
    let p = u64::from_str_radix(doc["hash_p"].as_str().unwrap(), 16).unwrap();
    let mut failures = Vec::new();
    let mut inputs = std::collections::HashMap::new();
    for sweep in doc["sweeps"].as_array().unwrap() {
        let (src, dst) = (dtype(&sweep["src"]), dtype(&sweep["dst"]));
        let name = sweep["input"].as_str().unwrap().to_string();
        let inp = inputs.entry(name.clone()).or_insert_with(|| input(&name));
        assert_eq!(inp.len() as u64, sweep["len"].as_u64().unwrap(), "{name}");
        let got = block_hashes(&cast(src, inp, dst), block, p);
        let want: Vec<&str> = sweep["block_hashes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h.as_str().unwrap())
            .collect();
        assert_eq!(got.len(), want.len());
        for (b, (g, w)) in got.iter().zip(&want).enumerate() {
            if g != w {
                failures.push(format!(
                    "{src}->{dst} on {name}: block {b} (inputs {}..{}) differs from torch",
                    b * block,
                    ((b + 1) * block).min(inp.len())
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `half`'s slice conversions (what `cast_slice` uses) run F16C instructions when the CPU has
/// them (the goldens above then test that path) and software otherwise. Its `_const` functions
/// are the software path: they must agree, so machines without F16C match torch too.
#[test]
fn half_software_path_equals_slice_path() {
    use half::f16;
    use half::slice::HalfFloatSliceExt;
    let all: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
    let mut wide = vec![0f32; all.len()];
    all.convert_to_f32_slice(&mut wide);
    for (h, w) in all.iter().zip(&wide) {
        assert_eq!(
            h.to_f32_const().to_bits(),
            w.to_bits(),
            "{:#06x}",
            h.to_bits()
        );
    }
    let xs: Vec<f32> = gen_f32_sweep()
        .into_iter()
        .chain(gen_f32_random())
        .map(|b| f32::from_bits(b as u32))
        .collect();
    let mut narrow = vec![f16::ZERO; xs.len()];
    narrow.convert_from_f32_slice(&xs);
    for (x, n) in xs.iter().zip(&narrow) {
        assert_eq!(
            f16::from_f32_const(*x).to_bits(),
            n.to_bits(),
            "{:#010x}",
            x.to_bits()
        );
    }
}
