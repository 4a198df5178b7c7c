//! A Flux-like model converted to each ComfyUI target: the output's key set, dtypes, shapes and
//! `comfy_quant` JSON are exactly what the layer rule and ComfyUI's loader say; layers the
//! format cannot hold are kept high precision; the quantized bytes are `tensorfile::blockfp`'s
//! on the source values, in order (a weight large enough to span several pieces and tasks).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use detect::Precision;
use tensorfile::{
    Dtype, SafetensorsFile, SafetensorsWriter, TensorSpec, blockfp, open_safetensors,
};

/// One tensor of the fixture: name, dtype, shape.
type Fixture = (&'static str, Dtype, &'static [u64]);

const H: u64 = 64;

/// Real Flux key names (one double and one single block), plus three weights in the blocks the
/// formats cannot hold (1-D, 5-D, NaN), a padded one ([130, 96]) and a large one that spans
/// several pieces and tasks, padded for the block formats ([2050, 2300]).
const FLUX: &[Fixture] = &[
    ("img_in.weight", Dtype::BF16, &[H, 64]),
    ("img_in.bias", Dtype::BF16, &[H]),
    ("time_in.in_layer.weight", Dtype::BF16, &[H, 256]),
    ("time_in.in_layer.bias", Dtype::BF16, &[H]),
    (
        "double_blocks.0.img_mod.lin.weight",
        Dtype::BF16,
        &[6 * H, H],
    ),
    ("double_blocks.0.img_mod.lin.bias", Dtype::BF16, &[6 * H]),
    (
        "double_blocks.0.img_attn.qkv.weight",
        Dtype::BF16,
        &[3 * H, H],
    ),
    ("double_blocks.0.img_attn.qkv.bias", Dtype::BF16, &[3 * H]),
    (
        "double_blocks.0.img_attn.norm.query_norm.scale",
        Dtype::BF16,
        &[H / 2],
    ),
    (
        "double_blocks.0.img_attn.norm.key_norm.scale",
        Dtype::F32,
        &[H / 2],
    ),
    ("double_blocks.0.img_attn.proj.weight", Dtype::BF16, &[H, H]),
    ("double_blocks.0.img_attn.odd.weight", Dtype::BF16, &[H]),
    (
        "double_blocks.0.img_attn.conv.weight",
        Dtype::BF16,
        &[2, 2, 2, 2, 2],
    ),
    ("double_blocks.0.img_mlp.0.weight", Dtype::BF16, &[4 * H, H]),
    ("double_blocks.0.txt_mlp.0.weight", Dtype::BF16, &[130, 96]),
    ("double_blocks.0.txt_mlp.2.weight", Dtype::BF16, &[H, 4 * H]),
    ("single_blocks.0.linear1.weight", Dtype::BF16, &[7 * H, H]),
    ("single_blocks.0.linear2.weight", Dtype::BF16, &[2050, 2300]),
    (
        "single_blocks.0.modulation.lin.weight",
        Dtype::BF16,
        &[3 * H, H],
    ),
    ("single_blocks.0.norm.key_norm.scale", Dtype::BF16, &[H / 2]),
    (
        "final_layer.adaLN_modulation.1.weight",
        Dtype::BF16,
        &[2 * H, H],
    ),
    ("final_layer.linear.weight", Dtype::BF16, &[64, H]),
    ("final_layer.linear.bias", Dtype::BF16, &[64]),
    ("step_counter", Dtype::I64, &[2]),
];

/// The weights the rule quantizes.
const QUANTIZED: &[&str] = &[
    "double_blocks.0.img_attn.qkv",
    "double_blocks.0.img_attn.proj",
    "double_blocks.0.img_mlp.0",
    "double_blocks.0.txt_mlp.0",
    "single_blocks.0.linear1",
    "single_blocks.0.linear2",
];

/// The weights it selects that no format holds, with the reason reported.
const UNFIT: &[(&str, &str)] = &[
    ("double_blocks.0.img_attn.odd.weight", "not a 2-D weight"),
    ("double_blocks.0.img_attn.conv.weight", "not a 2-D weight"),
    ("double_blocks.0.txt_mlp.2.weight", "NaN or infinite values"),
];

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Element `i` of tensor `t`: roughly normal-sized weights with an outlier now and then.
fn value(t: usize, i: u64) -> f32 {
    let bits = splitmix64(((t as u64) << 40) ^ i);
    let unit = (bits >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
    let v = if bits & 255 == 0 {
        unit * 40.0
    } else {
        unit * 0.05
    };
    if FLUX[t].0 == "double_blocks.0.txt_mlp.2.weight" && i == 77 {
        f32::NAN
    } else {
        v
    }
}

fn encode(dtype: Dtype, v: f32) -> Vec<u8> {
    match dtype {
        Dtype::BF16 => half::bf16::from_f32(v).to_le_bytes().to_vec(),
        Dtype::F32 => v.to_le_bytes().to_vec(),
        Dtype::I64 => (v as i64).to_le_bytes().to_vec(),
        d => panic!("fixture dtype {d}"),
    }
}

/// The source values of tensor `t` as the source serves them (exact f32 of the stored value).
fn served(t: usize) -> Vec<f32> {
    let (_, dtype, shape) = FLUX[t];
    let n: u64 = shape.iter().product();
    (0..n)
        .map(|i| match dtype {
            Dtype::BF16 => half::bf16::from_f32(value(t, i)).to_f32(),
            _ => value(t, i),
        })
        .collect()
}

fn write_fixture(path: &Path) {
    let specs: Vec<TensorSpec> = FLUX
        .iter()
        .map(|&(name, dtype, shape)| TensorSpec {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
        })
        .collect();
    let file = std::fs::File::create(path).unwrap();
    let mut w = SafetensorsWriter::new(file, &specs, &BTreeMap::new()).unwrap();
    for (t, &(_, dtype, shape)) in FLUX.iter().enumerate() {
        let n: u64 = shape.iter().product();
        let bytes: Vec<u8> = (0..n).flat_map(|i| encode(dtype, value(t, i))).collect();
        w.write_all(&bytes).unwrap();
    }
    w.finish().unwrap();
}

/// Converts the fixture to `target`; returns the output path and the report.
fn convert(dir: &Path, target: Precision) -> (PathBuf, comfyquant::Report) {
    let src = dir.join("flux.safetensors");
    if !src.exists() {
        write_fixture(&src);
    }
    let source = open_safetensors(&src).unwrap();
    let plan = comfyquant::plan(source.as_ref(), target).unwrap();
    let metadata = BTreeMap::from([("note".to_owned(), "test".to_owned())]);
    let out = dir.join(format!("flux_{target}.safetensors"));
    let file = std::io::BufWriter::new(std::fs::File::create(&out).unwrap());
    let report =
        comfyquant::convert(source.as_ref(), &plan, &metadata, file, &mut |_, _| {}).unwrap();
    assert_eq!(
        std::fs::metadata(&out).unwrap().len(),
        plan.output_len(&metadata).unwrap()
    );
    (out, report)
}

fn index(name: &str) -> usize {
    FLUX.iter().position(|f| f.0 == name).unwrap()
}

fn amax(values: &[f32]) -> f32 {
    values.iter().fold(0f32, |m, v| m.max(v.abs()))
}

fn roundup(x: u64, m: u64) -> u64 {
    x.div_ceil(m) * m
}

/// The stored shape comfy-kitchen gives a [rows, cols] weight with blocks of `m`.
fn padded(rows: u64, cols: u64, m: u64) -> (u64, u64) {
    if rows.is_multiple_of(m) && cols.is_multiple_of(m) {
        (rows, cols)
    } else {
        (roundup(rows, m), roundup(cols, m))
    }
}

#[test]
fn outputs_hold_exactly_what_comfyui_loads() {
    let dir = tempfile::tempdir().unwrap();
    for target in [Precision::Fp8Scaled, Precision::Nvfp4, Precision::Mxfp8] {
        let (out, report) = convert(dir.path(), target);
        let file = SafetensorsFile::open(&out).unwrap();
        let got: BTreeMap<&str, (Dtype, Vec<u64>)> = file
            .header
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), (t.dtype, t.shape.clone())))
            .collect();

        let mut want: BTreeMap<String, (Dtype, Vec<u64>)> = BTreeMap::new();
        for &(name, dtype, shape) in FLUX {
            let layer = name.strip_suffix(".weight").unwrap_or(name);
            if !QUANTIZED.contains(&layer) {
                // Kept: 16-bit as it is, f32 to bf16, integers as they are.
                let dtype = if dtype == Dtype::F32 {
                    Dtype::BF16
                } else {
                    dtype
                };
                want.insert(name.into(), (dtype, shape.to_vec()));
                continue;
            }
            let (r, c) = (shape[0], shape[1]);
            let blocked =
                |rows: u64, grid_cols: u64| vec![roundup(rows, 128), roundup(grid_cols, 4)];
            let mut add = |suffix: &str, dtype, shape: Vec<u64>| {
                want.insert(format!("{layer}.{suffix}"), (dtype, shape));
            };
            let json = match target {
                Precision::Fp8Scaled => {
                    add("weight", Dtype::F8E4M3, vec![r, c]);
                    add("weight_scale", Dtype::F32, vec![]);
                    r#"{"format": "float8_e4m3fn"}"#.to_owned()
                }
                Precision::Nvfp4 => {
                    let (pr, pc) = padded(r, c, 16);
                    add("weight", Dtype::U8, vec![pr, pc / 2]);
                    add("weight_scale", Dtype::F8E4M3, blocked(pr, pc / 16));
                    add("weight_scale_2", Dtype::F32, vec![]);
                    comfy_json("nvfp4", (r, c), (pr, pc))
                }
                _ => {
                    let (pr, pc) = padded(r, c, 32);
                    add("weight", Dtype::F8E4M3, vec![pr, pc]);
                    add("weight_scale", Dtype::U8, blocked(pr, pc / 32));
                    comfy_json("mxfp8", (r, c), (pr, pc))
                }
            };
            add("comfy_quant", Dtype::U8, vec![json.len() as u64]);
            let (_, bytes) = file.tensor(&format!("{layer}.comfy_quant")).unwrap();
            assert_eq!(
                std::str::from_utf8(bytes).unwrap(),
                json,
                "{target} {layer}"
            );
        }
        let want: BTreeMap<&str, (Dtype, Vec<u64>)> =
            want.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        assert_eq!(got, want, "{target}: key set, dtypes and shapes");
        // No activation scales, and every quantized layer has its marker.
        assert!(!got.keys().any(|k| k.ends_with("input_scale")));

        // Tensors kept as they are are byte for byte the source's; the f32 norm is cast.
        let src = SafetensorsFile::open(&dir.path().join("flux.safetensors")).unwrap();
        for name in [
            "img_in.weight",
            "double_blocks.0.txt_mlp.2.weight",
            "step_counter",
        ] {
            assert_eq!(
                file.tensor(name).unwrap().1,
                src.tensor(name).unwrap().1,
                "{name}"
            );
        }
        let norm = "double_blocks.0.img_attn.norm.key_norm.scale";
        let want_bf16: Vec<u8> = served(index(norm))
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        assert_eq!(file.tensor(norm).unwrap().1, want_bf16);

        // Per-tensor scales from the source's amax.
        for layer in QUANTIZED {
            let a = amax(&served(index(&format!("{layer}.weight"))));
            let scalar = |suffix: &str| {
                let (_, b) = file.tensor(&format!("{layer}.{suffix}")).unwrap();
                f32::from_le_bytes(b.try_into().unwrap())
            };
            match target {
                Precision::Fp8Scaled => assert_eq!(
                    scalar("weight_scale").to_bits(),
                    blockfp::fp8_tensor_scale(a, Dtype::BF16).to_bits()
                ),
                Precision::Nvfp4 => assert_eq!(
                    scalar("weight_scale_2").to_bits(),
                    blockfp::nvfp4_tensor_scale(a).to_bits()
                ),
                _ => {}
            }
        }

        // The report.
        assert_eq!(report.target, target.canonical_name());
        assert_eq!(report.layer_rule, "flux");
        assert_eq!(report.float_dtype, "BF16");
        assert_eq!(report.quantized, QUANTIZED.len() as u64);
        let format = match target {
            Precision::Fp8Scaled => "float8_e4m3fn",
            Precision::Nvfp4 => "nvfp4",
            _ => "mxfp8",
        };
        assert_eq!(
            report.formats,
            BTreeMap::from([(format.to_owned(), QUANTIZED.len() as u64)])
        );
        let padded_layers = if target == Precision::Fp8Scaled { 0 } else { 2 };
        assert_eq!(report.padded, padded_layers);
        let kept: BTreeSet<(&str, &str)> = report
            .kept
            .iter()
            .map(|k| (k.name.as_str(), k.reason.as_str()))
            .collect();
        assert_eq!(kept, UNFIT.iter().copied().collect());
        assert_eq!(report.kept_high_precision, UNFIT.len() as u64);
        assert_eq!(report.cast, 1, "the f32 norm");
        assert_eq!(
            report.copied as usize,
            FLUX.len() - QUANTIZED.len() - 1,
            "everything else"
        );
        assert_eq!(report.bytes_out, std::fs::metadata(&out).unwrap().len());
        let meta = &file.header.metadata;
        assert_eq!(meta.get("note").map(String::as_str), Some("test"));
    }
}

fn comfy_json(format: &str, shape: (u64, u64), stored: (u64, u64)) -> String {
    if shape == stored {
        format!(r#"{{"format": "{format}"}}"#)
    } else {
        format!(
            r#"{{"format": "{format}", "orig_shape": [{}, {}]}}"#,
            shape.0, shape.1
        )
    }
}

/// The quantized bytes are blockfp's on the source values: the pipeline neither reorders nor
/// misaligns rows, pieces or tasks, pads with zeros and swizzles the whole scale grid.
#[test]
fn quantized_bytes_are_blockfps_on_the_source_values() {
    let dir = tempfile::tempdir().unwrap();
    for target in [Precision::Fp8Scaled, Precision::Nvfp4, Precision::Mxfp8] {
        let (out, _) = convert(dir.path(), target);
        let file = SafetensorsFile::open(&out).unwrap();
        for layer in ["single_blocks.0.linear2", "double_blocks.0.txt_mlp.0"] {
            let t = index(&format!("{layer}.weight"));
            let (r, c) = (FLUX[t].2[0] as usize, FLUX[t].2[1] as usize);
            let values = served(t);
            let a = amax(&values);
            let got = |suffix: &str| file.tensor(&format!("{layer}.{suffix}")).unwrap().1;
            match target {
                Precision::Fp8Scaled => {
                    let mut want = vec![0u8; r * c];
                    let s = blockfp::fp8_tensor_scale(a, Dtype::BF16);
                    blockfp::quantize_fp8(&values, Dtype::BF16, s, &mut want);
                    assert!(got("weight") == want, "{target} {layer}");
                }
                _ => {
                    let nvfp4 = target == Precision::Nvfp4;
                    let (pr, pc) = if nvfp4 {
                        blockfp::nvfp4_padded_shape(r, c)
                    } else {
                        blockfp::mxfp8_padded_shape(r, c)
                    };
                    let mut padded = vec![0f32; pr * pc];
                    for (row, src) in padded.chunks_mut(pc).zip(values.chunks(c)) {
                        row[..c].copy_from_slice(src);
                    }
                    let group = if nvfp4 { 16 } else { 32 };
                    let mut grid = vec![0u8; pr * pc / group];
                    let mut codes = vec![0u8; if nvfp4 { pr * pc / 2 } else { pr * pc }];
                    if nvfp4 {
                        let s2 = blockfp::nvfp4_tensor_scale(a);
                        blockfp::quantize_nvfp4_rows(&padded, pc, s2, &mut codes, &mut grid);
                    } else {
                        blockfp::quantize_mxfp8_rows(&padded, pc, &mut codes, &mut grid);
                    }
                    assert!(got("weight") == codes, "{target} {layer}");
                    let blocked = blockfp::to_blocked(&grid, pr, pc / group);
                    assert!(got("weight_scale") == blocked, "{target} {layer} scales");
                }
            }
        }
    }
}

/// The output is detected as the target, so a request for the target it already is needs no
/// conversion (`detect::should_skip`).
fn assert_detected_as(target: Precision) {
    let dir = tempfile::tempdir().unwrap();
    let (out, _) = convert(dir.path(), target);
    let d = detect::detect(&out).unwrap();
    assert_eq!(d.precision, Some(target), "{target}: {:?}", d.notes);
    assert!(d.supported_as_source, "{target}: {:?}", d.notes);
    assert_eq!(d.architecture.as_deref(), Some("flux"));
    let layers = d.fp8_scaling.expect("a comfy_quant layout");
    assert_eq!(layers.layout, "comfy_quant");
    assert_eq!(layers.scale_weights, QUANTIZED.len() as u64);
    assert!(detect::should_skip(d.precision.unwrap(), target).is_some());
}

#[test]
fn fp8_scaled_outputs_are_detected_as_fp8_scaled() {
    assert_detected_as(Precision::Fp8Scaled);
}

#[test]
fn nvfp4_and_mxfp8_outputs_are_detected_as_their_target() {
    assert_detected_as(Precision::Nvfp4);
    assert_detected_as(Precision::Mxfp8);
}

/// A scaled-fp8 source converts to the other layouts through its de-scaled view; its scales
/// and markers do not reach the output.
#[test]
fn a_comfy_fp8_output_converts_to_nvfp4() {
    let dir = tempfile::tempdir().unwrap();
    let (fp8, _) = convert(dir.path(), Precision::Fp8Scaled);
    let source = open_safetensors(&fp8).unwrap();
    let plan = comfyquant::plan(source.as_ref(), Precision::Nvfp4).unwrap();
    let names: BTreeSet<&str> = plan.specs.iter().map(|s| s.name.as_str()).collect();
    for layer in QUANTIZED {
        for suffix in ["weight", "weight_scale", "weight_scale_2", "comfy_quant"] {
            assert!(names.contains(format!("{layer}.{suffix}").as_str()));
        }
    }
    assert_eq!(plan.quantized(), QUANTIZED.len() as u64);
    // The de-scaled weights arrive as f32, the others stay bf16: the model's dtype is kept.
    assert_eq!(plan.float_dtype, Dtype::BF16);
}

#[test]
fn other_targets_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("flux.safetensors");
    write_fixture(&src);
    let source = open_safetensors(&src).unwrap();
    let err = comfyquant::plan(source.as_ref(), Precision::Bf16).unwrap_err();
    assert!(err.is_input_fault());
    assert!(err.to_string().contains("flux.safetensors"), "{err}");
}
