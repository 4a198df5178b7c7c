//! GGUF end to end through `smart`: safetensors -> GGUF with lock, verification and publish;
//! a GGUF source dequantized to safetensors (names kept, logical shapes restored) or
//! requantized (with a warning); ComfyUI scaled-fp8 sources de-scaled.

#![allow(clippy::unwrap_used)] // test code: a failed setup step should fail the test loudly

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use cache::ModelsDir;
use detect::Precision;
use gguf::{FileType, GgmlType, GgufFile};
use smart::backends::gguf::GgufBackend;
use smart::{Backend, Options, Status, smart_convert_with};
use tensorfile::safetensors::{Dtype, SafetensorsFile};
use tensorfile::{SafetensorsWriter, TensorSpec};

const BACKEND: GgufBackend = GgufBackend;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
}

struct Env {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    models: ModelsDir,
}

impl Env {
    fn new() -> Env {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        let models = ModelsDir::at(root.join("models"));
        Env {
            _tmp: tmp,
            root,
            models,
        }
    }

    /// A copy of a fixture under the temp root (so nothing is written next to the fixtures).
    fn copy(&self, name: &str) -> PathBuf {
        let dst = self.root.join("src").join(name);
        fs::create_dir_all(dst.parent().unwrap()).unwrap();
        fs::copy(fixture(name), &dst).unwrap();
        dst
    }

    fn convert(&self, src: &Path, target: Precision) -> smart::Outcome {
        let backends: [&dyn Backend; 1] = [&BACKEND];
        smart_convert_with(src, target, &Options::new(self.models.clone()), &backends).unwrap()
    }
}

fn f32_values(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

#[test]
fn safetensors_to_gguf_is_published_verified_and_then_cached() {
    let env = Env::new();
    let src = env.copy("flux_bf16.safetensors");
    let out = env.convert(&src, Precision::Gguf(FileType::Q4KM));
    assert_eq!(out.status, Status::Converted);
    // The name is the cache's business; the place and the suffix are GGUF's.
    assert_eq!(out.path.parent(), Some(env.models.gguf_dir().as_path()));
    assert!(out.path.to_string_lossy().ends_with("_Q4_K_M.gguf"));
    let report = serde_json::to_value(out.report.unwrap()).unwrap();
    assert_eq!(report["file_type"], "Q4_K_M");
    let counted: u64 = report["types"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert_eq!(counted, report["tensors"].as_u64().unwrap());
    // Rows of 256 take Q4_K (the fixture's img_mlp.2 weights).
    assert!(report["types"]["Q4_K"].as_u64().unwrap() >= 2);
    let detection = detect::detect(&out.path).unwrap();
    assert_eq!(detection.precision, Some(Precision::Gguf(FileType::Q4KM)));
    // Provenance keys are STRING KVs after the policy's keys.
    let file = GgufFile::open(&out.path).unwrap();
    assert_eq!(file.metadata[0].0, "general.architecture");
    assert!(file.metadata.len() > 3);
    assert!(
        file.metadata[3..]
            .iter()
            .all(|(_, v)| matches!(v, gguf::MetadataValue::String(_)))
    );
    let again = env.convert(&src, Precision::Gguf(FileType::Q4KM));
    assert_eq!(again.status, Status::Cached);
}

#[test]
fn gguf_dequantizes_to_safetensors_with_names_and_logical_shapes() {
    let env = Env::new();
    // sd1 has flattened convolutions (orig_shape) and F16/F32/Q4_0/Q4_1 tensors.
    let src = env.copy("sd1_f32.safetensors");
    let q = env.convert(&src, Precision::Gguf(FileType::Q4_0)).path;
    let gguf_file = GgufFile::open(&q).unwrap();
    assert!(
        gguf_file
            .metadata
            .iter()
            .any(|(k, _)| k.starts_with("comfy.gguf.orig_shape."))
    );
    let source = SafetensorsFile::open(&src).unwrap();
    for (target, dtype) in [
        (Precision::Fp32, Dtype::F32),
        (Precision::Fp16, Dtype::F16),
        (Precision::Bf16, Dtype::BF16),
    ] {
        let out = env.convert(&q, target);
        assert_eq!(out.status, Status::Converted, "{target}");
        assert_eq!(detect::detect(&out.path).unwrap().precision, Some(target));
        let st = SafetensorsFile::open(&out.path).unwrap();
        assert_eq!(st.header.tensors.len(), gguf_file.tensors.len());
        for info in &gguf_file.tensors {
            let (entry, bytes) = st.tensor(&info.name).unwrap();
            // The torch shape of the source, not the stored (flattened) one.
            assert_eq!(
                entry.shape,
                source.header.tensor(&info.name).unwrap().shape,
                "{}",
                info.name
            );
            assert_eq!(entry.dtype, dtype);
            let deq = gguf::quant::dequantize_to_vec(info.ggml_type, gguf_file.tensor_data(info))
                .unwrap();
            let wide: Vec<u8> = deq.iter().flat_map(|v| v.to_le_bytes()).collect();
            let mut want = vec![0u8; bytes.len()];
            tensorfile::cast_slice(Dtype::F32, &wide, dtype, &mut want).unwrap();
            assert_eq!(bytes, &want[..], "{} as {target}", info.name);
        }
        let report = serde_json::to_value(out.report.unwrap()).unwrap();
        assert!(report["reshaped"].as_u64().unwrap() > 0);
    }
}

#[test]
fn gguf_requantizes_with_a_quality_warning() {
    let env = Env::new();
    let src = env.copy("flux_f32.safetensors");
    let q8 = env.convert(&src, Precision::Gguf(FileType::Q8_0)).path;
    let direct = env.convert(&src, Precision::Gguf(FileType::Q4_0)).path;
    let out = env.convert(&q8, Precision::Gguf(FileType::Q4_0));
    assert_eq!(out.status, Status::Converted);
    assert_eq!(out.path.parent(), Some(env.models.gguf_dir().as_path()));
    assert_ne!(out.path, direct);
    let report = serde_json::to_value(out.report.unwrap()).unwrap();
    let warnings = report["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 1);
    assert!(warnings[0].as_str().unwrap().contains("loses quality"));
    // Same mix as converting the original.
    let requant = GgufFile::open(&out.path).unwrap();
    let fresh = GgufFile::open(&direct).unwrap();
    let types = |f: &GgufFile| {
        f.tensors
            .iter()
            .map(|t| (t.name.clone(), t.ggml_type, t.dims.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(types(&requant), types(&fresh));
    // The values are the Q8_0 ones, requantized: close to the originals, not equal.
    let name = "double_blocks.0.img_attn.proj.weight";
    let r = requant.tensor(name).unwrap();
    let f = fresh.tensor(name).unwrap();
    assert_eq!(r.ggml_type, GgmlType::Q4_0);
    assert_ne!(requant.tensor_data(r), fresh.tensor_data(f));
}

/// A ComfyUI scaled-fp8 file: fp8 weights with `scale_weight` scalars, an empty
/// `scaled_fp8` marker, one `scale_input`.
fn write_scaled_fp8(path: &Path) -> (Vec<f32>, f32) {
    let flux = SafetensorsFile::open(&fixture("flux_f32.safetensors")).unwrap();
    let mut specs = Vec::new();
    let mut data: Vec<Vec<u8>> = Vec::new();
    let scale = 0.0625f32;
    let mut first_weight = None;
    for t in &flux.header.tensors {
        let bytes = flux.tensor_bytes(t);
        if t.shape.len() == 2 && t.name.ends_with(".weight") {
            // Store value / scale in fp8 so that fp8 * scale is the model's weight.
            let scaled: Vec<u8> = f32_values(bytes)
                .iter()
                .flat_map(|v| (v / scale).to_le_bytes())
                .collect();
            let mut fp8 = vec![0u8; scaled.len() / 4];
            tensorfile::cast_slice(Dtype::F32, &scaled, Dtype::F8E4M3, &mut fp8).unwrap();
            if first_weight.is_none() && t.name == "double_blocks.0.img_attn.proj.weight" {
                let mut back = vec![0u8; scaled.len()];
                tensorfile::cast_slice(Dtype::F8E4M3, &fp8, Dtype::F32, &mut back).unwrap();
                first_weight = Some(f32_values(&back));
            }
            specs.push(TensorSpec {
                name: t.name.clone(),
                dtype: Dtype::F8E4M3,
                shape: t.shape.clone(),
            });
            data.push(fp8);
            specs.push(TensorSpec {
                name: t.name.replace(".weight", ".scale_weight"),
                dtype: Dtype::F32,
                shape: vec![],
            });
            data.push(scale.to_le_bytes().to_vec());
        } else {
            specs.push(TensorSpec {
                name: t.name.clone(),
                dtype: Dtype::F32,
                shape: t.shape.clone(),
            });
            data.push(bytes.to_vec());
        }
    }
    specs.push(TensorSpec {
        name: "scaled_fp8".into(),
        dtype: Dtype::F8E4M3,
        shape: vec![0],
    });
    data.push(Vec::new());
    specs.push(TensorSpec {
        name: "img_in.scale_input".into(),
        dtype: Dtype::F32,
        shape: vec![],
    });
    data.push(1.0f32.to_le_bytes().to_vec());
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let mut w = SafetensorsWriter::new(fs::File::create(path).unwrap(), &specs, &meta).unwrap();
    for d in &data {
        w.write_chunk(d).unwrap();
    }
    w.finish().unwrap();
    (first_weight.unwrap(), scale)
}

#[test]
fn scaled_fp8_weights_are_multiplied_by_their_scale_and_the_scales_dropped() {
    let env = Env::new();
    let src = env.root.join("flux_scaled_fp8.safetensors");
    let (fp8_values, scale) = write_scaled_fp8(&src);
    let detection = detect::detect(&src).unwrap();
    assert!(detection.fp8_scaling.is_some());
    let out = env.convert(&src, Precision::Gguf(FileType::AllF32));
    let report = serde_json::to_value(out.report.unwrap()).unwrap();
    let dropped: Vec<&str> = report["dropped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert!(dropped.contains(&"scaled_fp8"));
    assert!(dropped.contains(&"img_in.scale_input"));
    assert!(dropped.contains(&"double_blocks.0.img_attn.proj.scale_weight"));
    let file = GgufFile::open(&out.path).unwrap();
    assert!(
        file.tensors
            .iter()
            .all(|t| !t.name.contains("scale_weight"))
    );
    let t = file.tensor("double_blocks.0.img_attn.proj.weight").unwrap();
    assert_eq!(t.ggml_type, GgmlType::F32);
    let got = f32_values(file.tensor_data(t));
    let want: Vec<f32> = fp8_values.iter().map(|v| v * scale).collect();
    assert_eq!(got, want);
}

#[test]
fn unsupported_pairs_are_refused() {
    let bf16 = detect::detect(&fixture("flux_bf16.safetensors")).unwrap();
    let gguf_src = detect::detect(&fixture("flux_f16.gguf")).unwrap();
    assert!(!BACKEND.supports(&bf16, Precision::Fp16));
    assert!(!BACKEND.supports(&gguf_src, Precision::Nf4));
    assert!(!BACKEND.supports(&gguf_src, Precision::Fp8E4m3fn));
    assert!(BACKEND.supports(&gguf_src, Precision::Bf16));
    assert!(BACKEND.supports(&bf16, Precision::Gguf(FileType::Q2K)));
}

/// Peak RSS in KiB (`VmHWM`).
fn peak_rss_kib() -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Runs the backend alone (no cache digest) from `src` to `target` into `out`.
fn backend_convert(src: &Path, target: Precision, out: &Path) {
    let detection = detect::detect(src).unwrap();
    let extra = BTreeMap::new();
    let job = smart::Job {
        source_path: src,
        source: &detection,
        target,
        extra_metadata: &extra,
        options: smart::BackendOptions::default(),
        shared_read: None,
    };
    let planned = BACKEND.plan(&job).unwrap();
    let mut f = std::io::BufWriter::new(fs::File::create(out).unwrap());
    planned.write(&mut f, &mut |_, _| {}).unwrap();
    drop(f);
    assert_eq!(fs::metadata(out).unwrap().len(), planned.output_len());
}

/// Manual check on a large model (not run by default: it needs one):
/// `GGUF_RSS_SOURCE=big.safetensors cargo test -p smart --release --test gguf_sources -- --ignored`.
/// The backend reads with positioned reads, so the source's pages never count against the
/// process: peak RSS stays bounded by the chunk buffers whatever the model size. (This runs
/// the backend alone: `smart`'s cache digest maps the whole source, which is cache's concern.)
#[test]
#[ignore = "needs GGUF_RSS_SOURCE pointing at a large safetensors model"]
fn large_source_peak_rss_stays_bounded() {
    let src = PathBuf::from(std::env::var_os("GGUF_RSS_SOURCE").unwrap());
    let size = fs::metadata(&src).unwrap().len();
    let env = Env::new();
    for target in [FileType::Q4KM, FileType::Q8_0] {
        let out = env.root.join(format!("big_{target}.gguf"));
        backend_convert(&src, Precision::Gguf(target), &out);
        // The GGUF source path: dequantize back.
        backend_convert(&out, Precision::Bf16, &env.root.join("back.safetensors"));
    }
    let peak = peak_rss_kib();
    eprintln!("source {} MiB, peak RSS {} MiB", size >> 20, peak >> 10);
    assert!(peak < 512 * 1024, "peak RSS {peak} KiB");
}

fn write_f32_model(path: &Path, tensors: &[(&str, &[u64])]) {
    let specs: Vec<TensorSpec> = tensors
        .iter()
        .map(|(n, s)| TensorSpec {
            name: n.to_string(),
            dtype: Dtype::F32,
            shape: s.to_vec(),
        })
        .collect();
    let mut w =
        SafetensorsWriter::new(fs::File::create(path).unwrap(), &specs, &BTreeMap::new()).unwrap();
    for s in &specs {
        let n = s.shape.iter().product::<u64>() as usize;
        let v: Vec<u8> = (0..n)
            .flat_map(|i| ((i % 17) as f32 * 0.01).to_le_bytes())
            .collect();
        w.write_chunk(&v).unwrap();
    }
    w.finish().unwrap();
}

#[test]
fn layouts_are_refused_with_the_file_named_and_arch_can_be_forced() {
    let env = Env::new();
    let unknown = env.root.join("mystery.safetensors");
    write_f32_model(&unknown, &[("foo.weight", &[64, 256]), ("foo.bias", &[64])]);
    let diffusers = env.root.join("flux_diffusers.safetensors");
    write_f32_model(
        &diffusers,
        &[
            ("transformer_blocks.0.attn.norm_added_k.weight", &[128]),
            ("transformer_blocks.0.attn.to_q.weight", &[64, 256]),
        ],
    );
    let backends: [&dyn Backend; 1] = [&BACKEND];
    let target = Precision::Gguf(FileType::Q8_0);
    for (path, needle) in [
        (&unknown, "unknown model architecture"),
        (&diffusers, "diffusers"),
    ] {
        let err = smart_convert_with(path, target, &Options::new(env.models.clone()), &backends)
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
    }
    assert!(!env.models.gguf_dir().join("mystery_Q8_0.gguf").exists());

    let mut forced = Options::new(env.models.clone());
    forced.gguf_arch = Some(gguf::Arch::Flux);
    let out = smart_convert_with(&unknown, target, &forced, &backends).unwrap();
    assert_eq!(out.status, Status::Converted);
    let file = GgufFile::open(&out.path).unwrap();
    assert_eq!(file.architecture(), Some("flux"));
    assert_eq!(file.tensor("foo.weight").unwrap().ggml_type, GgmlType::Q8_0);
}
