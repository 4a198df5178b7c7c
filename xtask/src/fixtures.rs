//! `cargo xtask fixtures`: deterministic small models for tests, and benchmark-size models.
//!
//! Every file is a pure function of this source: values come from [`SplitMix64`] seeded by the
//! tensor name, tensors are ordered as `safetensors.torch.save_file` orders them (dtype size
//! descending, then name), maps are `BTreeMap`s, and nothing reads the clock.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use tensorfile::safetensors::Dtype;
use tensorfile::safetensors::writer::{SafetensorsWriter, TensorSpec, output_len};

use crate::layouts::{self, FluxDims, Init, Layout};

#[path = "fixtures_archs.rs"]
pub mod archs;
use crate::rng::{SplitMix64, name_seed};
use crate::{DynResult, adversarial};

#[path = "fixtures_diffusers.rs"]
pub mod diffusers;

/// Elements generated per write, so a large tensor never sits in memory whole.
const CHUNK_ELEMS: usize = 1 << 20;

/// What a tensor holds.
#[derive(Debug, Clone, Copy)]
enum Content {
    Float(Init),
    /// 0, 1, 2, ... (position ids).
    Range,
    /// A causal-looking mask: true on even positions.
    Mask,
    /// Fixed bytes (U8), made by this function (a serialized tokenizer).
    Bytes(fn() -> Vec<u8>),
}

#[derive(Debug, Clone)]
struct Entry {
    name: String,
    /// The name whose stream seeds the values (the key without any checkpoint prefix).
    seed_name: String,
    shape: Vec<u64>,
    dtype: Dtype,
    content: Content,
}

/// One safetensors file to write.
#[derive(Debug, Clone)]
pub struct FileSpec {
    pub file: String,
    pub arch: &'static str,
    /// Canonical precision name of the dominant dtype (what `detect` must report).
    pub precision: &'static str,
    entries: Vec<Entry>,
    metadata: BTreeMap<String, String>,
}

impl FileSpec {
    fn from_layout(
        file: String,
        layout: &Layout,
        precision: &'static str,
        dtype_of: impl Fn(&[u64]) -> Dtype,
        strip_prefix: &str,
    ) -> Self {
        let entries = layout
            .tensors
            .iter()
            .map(|t| Entry {
                name: t.name.clone(),
                seed_name: t
                    .name
                    .strip_prefix(strip_prefix)
                    .unwrap_or(&t.name)
                    .to_string(),
                shape: t.shape.clone(),
                dtype: dtype_of(&t.shape),
                content: Content::Float(t.init),
            })
            .collect();
        let mut metadata = BTreeMap::new();
        metadata.insert("format".to_string(), "pt".to_string());
        let mut spec = FileSpec {
            file,
            arch: layout.arch,
            precision,
            entries,
            metadata,
        };
        spec.sort_like_safetensors();
        spec
    }

    /// `safetensors` orders tensors by dtype alignment (largest first), then by name; real files
    /// therefore start with their F32 norms and scales, which detection must not be fooled by.
    fn sort_like_safetensors(&mut self) {
        self.entries.sort_by(|a, b| {
            b.dtype
                .bits()
                .cmp(&a.dtype.bits())
                .then_with(|| a.name.cmp(&b.name))
        });
    }

    fn tensor_specs(&self) -> Vec<TensorSpec> {
        self.entries
            .iter()
            .map(|e| TensorSpec {
                name: e.name.clone(),
                dtype: e.dtype,
                shape: e.shape.clone(),
            })
            .collect()
    }

    /// Exact size of the file this spec writes.
    pub fn output_len(&self) -> std::io::Result<u64> {
        output_len(&self.tensor_specs(), &self.metadata)
    }

    /// Writes the file, streaming one chunk at a time.
    pub fn write(&self, path: &Path) -> DynResult<()> {
        let out = BufWriter::with_capacity(1 << 20, File::create(path)?);
        self.write_to(out)
    }

    fn write_to<W: Write>(&self, out: W) -> DynResult<()> {
        let mut w = SafetensorsWriter::new(out, &self.tensor_specs(), &self.metadata)?;
        let mut values: Vec<f32> = Vec::new();
        let mut bytes: Vec<u8> = Vec::new();
        for e in &self.entries {
            let numel: u64 = e.shape.iter().product();
            let mut rng = SplitMix64::new(name_seed(&e.seed_name));
            let mut done = 0u64;
            while done < numel {
                let n = usize::try_from((numel - done).min(CHUNK_ELEMS as u64))?;
                bytes.clear();
                match e.content {
                    Content::Float(init) => {
                        values.clear();
                        values.extend((0..n).map(|_| sample(&mut rng, init)));
                        encode_float(&values, e.dtype, &mut bytes)?;
                    }
                    Content::Range => {
                        for i in done..done + n as u64 {
                            let v = i64::try_from(i)?;
                            bytes.extend_from_slice(&v.to_le_bytes());
                        }
                    }
                    Content::Mask => {
                        bytes.extend((done..done + n as u64).map(|i| u8::from(i % 2 == 0)));
                    }
                    Content::Bytes(make) => {
                        let all = make();
                        let start = usize::try_from(done)?;
                        bytes.extend_from_slice(&all[start..start + n]);
                    }
                }
                w.write_chunk(&bytes)?;
                done += n as u64;
            }
        }
        let mut out = w.finish()?;
        out.flush()?;
        Ok(())
    }
}

fn sample(rng: &mut SplitMix64, init: Init) -> f32 {
    let (z, outlier) = rng.normal();
    let v = match init {
        Init::Weight if outlier => z * 0.02 * 16.0,
        Init::Weight => z * 0.02,
        Init::Norm => 1.0 + z * 0.1,
        Init::Bias => z * 0.01,
    };
    v as f32
}

/// f32 -> the file dtype. f16/bf16 round to nearest even (the `half` crate, as torch does);
/// fp8 goes through convcache's own PyTorch-identical cast.
fn encode_float(values: &[f32], dtype: Dtype, out: &mut Vec<u8>) -> DynResult<()> {
    match dtype {
        Dtype::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        Dtype::F16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
        Dtype::BF16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
        Dtype::F8E4M3 => {
            let src: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            let start = out.len();
            out.resize(start + values.len(), 0);
            tensorfile::cast::cast_slice(Dtype::F32, &src, Dtype::F8E4M3, &mut out[start..])?;
        }
        other => return Err(format!("fixtures cannot write {other}").into()),
    }
    Ok(())
}

/// The precision variants of every architecture file.
#[derive(Debug, Clone, Copy)]
enum Variant {
    F32,
    F16,
    Bf16,
    /// F8_E4M3 for every tensor of 2 dims or more; 1-D norms and biases stay BF16, as in
    /// the fp8 checkpoints people share.
    Fp8,
}

impl Variant {
    const ALL: [Variant; 4] = [Variant::F32, Variant::F16, Variant::Bf16, Variant::Fp8];

    fn suffix(self) -> &'static str {
        match self {
            Variant::F32 => "f32",
            Variant::F16 => "f16",
            Variant::Bf16 => "bf16",
            Variant::Fp8 => "fp8",
        }
    }

    fn precision(self) -> &'static str {
        match self {
            Variant::F32 => "fp32",
            Variant::F16 => "fp16",
            Variant::Bf16 => "bf16",
            Variant::Fp8 => "fp8_e4m3fn",
        }
    }

    fn dtype_of(self, shape: &[u64]) -> Dtype {
        match self {
            Variant::F32 => Dtype::F32,
            Variant::F16 => Dtype::F16,
            Variant::Bf16 => Dtype::BF16,
            Variant::Fp8 if shape.len() >= 2 => Dtype::F8E4M3,
            Variant::Fp8 => Dtype::BF16,
        }
    }
}

/// The committed small fixtures.
pub fn small_specs() -> Vec<FileSpec> {
    let archs = [
        layouts::flux(FluxDims::SMALL),
        layouts::sdxl(),
        layouts::sd1(),
        layouts::sd3(),
        layouts::wan(),
    ];
    let mut specs = Vec::new();
    for layout in &archs {
        for v in Variant::ALL {
            specs.push(FileSpec::from_layout(
                format!("{}_{}.safetensors", layout.arch, v.suffix()),
                layout,
                v.precision(),
                |s| v.dtype_of(s),
                "",
            ));
        }
    }
    specs.push(FileSpec::from_layout(
        "flux_checkpoint_bf16.safetensors".into(),
        &layouts::flux_checkpoint(),
        "bf16",
        |_| Dtype::BF16,
        "model.diffusion_model.",
    ));
    specs.push(mixed());
    specs
}

/// SD3-like file whose first float tensors are F32 (norms, biases, scalars) while BF16 holds
/// most bytes, plus an I64 and a BOOL tensor and the tiny cases: a 0-d scalar and a 1-element
/// tensor.
fn mixed() -> FileSpec {
    let layout = layouts::sd3();
    let mut spec = FileSpec::from_layout(
        "sd3_mixed.safetensors".into(),
        &layout,
        "bf16",
        |s| {
            if s.len() == 1 {
                Dtype::F32
            } else {
                Dtype::BF16
            }
        },
        "",
    );
    let extra = [
        (
            "logit_scale",
            vec![],
            Dtype::F32,
            Content::Float(Init::Norm),
        ),
        (
            "temperature",
            vec![1],
            Dtype::F32,
            Content::Float(Init::Norm),
        ),
        ("text_position_ids", vec![1, 77], Dtype::I64, Content::Range),
        ("text_attention_mask", vec![77], Dtype::Bool, Content::Mask),
    ];
    for (name, shape, dtype, content) in extra {
        spec.entries.push(Entry {
            name: name.into(),
            seed_name: name.into(),
            shape,
            dtype,
            content,
        });
    }
    spec.sort_like_safetensors();
    spec
}

/// Benchmark models: the same Flux-like layout at hidden 1536 (rows of 6x256), as f32 (~2 GB)
/// and bf16 (~1 GB).
pub fn large_specs() -> Vec<FileSpec> {
    let dims = FluxDims {
        hidden: 1536,
        head_dim: 128,
        vec_in: 768,
        context: 4096,
        double_blocks: 4,
        single_blocks: 4,
    };
    let layout = layouts::flux(dims);
    vec![
        FileSpec::from_layout(
            "flux_large_f32.safetensors".into(),
            &layout,
            "fp32",
            |_| Dtype::F32,
            "",
        ),
        FileSpec::from_layout(
            "flux_large_bf16.safetensors".into(),
            &layout,
            "bf16",
            |_| Dtype::BF16,
            "",
        ),
    ]
}

/// Tiny valid files (a few hundred bytes) that seed the fuzzers: the mixed file's odd tensors
/// (0-d, 1-element, I64, BOOL) plus a 2-D BF16 weight, as safetensors and as GGUF.
pub fn fuzz_seeds() -> DynResult<Vec<(String, Vec<u8>)>> {
    let mut tiny = mixed();
    tiny.file = "tiny.safetensors".into();
    tiny.entries.retain(|e| {
        !matches!(e.content, Content::Float(_)) || e.shape.iter().product::<u64>() <= 1
    });
    tiny.entries.push(Entry {
        name: "joint_blocks.0.x_block.attn.qkv.weight".into(),
        seed_name: "tiny".into(),
        shape: vec![6, 4],
        dtype: Dtype::BF16,
        content: Content::Float(Init::Weight),
    });
    tiny.sort_like_safetensors();
    let mut st = Vec::new();
    tiny.write_to(&mut st)?;
    let mut gg = Vec::new();
    write_gguf(&mut gg, &tiny_flux_layout())?;
    Ok(vec![
        ("tiny.safetensors".into(), st),
        ("tiny.gguf".into(), gg),
    ])
}

/// A two-tensor Flux-keyed layout for the GGUF seed.
fn tiny_flux_layout() -> Layout {
    let full = layouts::flux(FluxDims::SMALL);
    Layout {
        arch: full.arch,
        tensors: full
            .tensors
            .into_iter()
            .filter(|t| t.name.starts_with("final_layer.linear"))
            .map(|mut t| {
                t.shape = t.shape.iter().map(|&d| d.min(8)).collect();
                t
            })
            .collect(),
    }
}

/// Writes the small fixtures and `MANIFEST.json` into `out`.
pub fn write_small(out: &Path) -> DynResult<Vec<String>> {
    fs::create_dir_all(out)?;
    let mut manifest = BTreeMap::new();
    for spec in small_specs() {
        let path = out.join(&spec.file);
        spec.write(&path)?;
        manifest.insert(
            spec.file.clone(),
            manifest_entry(&path, Some(spec.arch), Some(spec.precision), "safetensors")?,
        );
    }
    fs::create_dir_all(out.join("archs"))?;
    for spec in archs::specs() {
        let rel = format!("archs/{}", spec.file);
        let path = out.join(&rel);
        spec.write(&path)?;
        manifest.insert(
            rel,
            manifest_entry(&path, Some(spec.arch), Some(spec.precision), "safetensors")?,
        );
    }
    let gguf_name = "flux_f16.gguf";
    write_gguf_flux_f16(&out.join(gguf_name))?;
    manifest.insert(
        gguf_name.to_string(),
        manifest_entry(&out.join(gguf_name), Some("flux"), Some("gguf_f16"), "gguf")?,
    );
    diffusers::write(out, &mut manifest)?;
    for rel in adversarial::write_corpus(&out.join("adversarial"))? {
        let rel = format!("adversarial/{rel}");
        let entry = manifest_entry(&out.join(&rel), None, None, "adversarial")?;
        manifest.insert(rel, entry);
    }
    let mut written: Vec<String> = manifest.keys().cloned().collect();
    write_manifest(out, &manifest)?;
    fs::write(out.join("README.md"), readme(&manifest))?;
    written.push("MANIFEST.json".into());
    written.push("README.md".into());
    Ok(written)
}

/// `fixtures/README.md`: generated too, so `--check` covers it and it never goes stale.
fn readme(manifest: &BTreeMap<String, serde_json::Value>) -> String {
    let mut s = String::from(README_HEAD);
    s.push_str("\n| file | format | arch | precision | bytes |\n|---|---|---|---|---|\n");
    for (file, v) in manifest {
        let field = |k: &str| v[k].as_str().unwrap_or("-").to_string();
        s.push_str(&format!(
            "| `{file}` | {} | {} | {} | {} |\n",
            field("format"),
            field("arch"),
            field("precision"),
            v["size"]
        ));
    }
    s
}

const README_HEAD: &str = "\
# Test fixtures

Generated by `cargo xtask fixtures` (source: `xtask/src/fixtures.rs`, `xtask/src/layouts.rs`);
do not edit. `cargo xtask fixtures --check` fails when these files differ from a fresh run, and
`MANIFEST.json` lists each file's size and xxh3-64 hash.

- `{arch}_{f32,f16,bf16,fp8}.safetensors`: scaled-down models with the real key names and shape
  patterns of Flux, SDXL, SD1, SD3 and Wan (the keys ComfyUI-GGUF detects each architecture by
  are present). Same values in every variant: the f16/bf16/fp8 files are bit-identical to torch's
  `.to(dtype)` of the f32 file (round to nearest even). Values: roughly normal, std 0.02 for
  weights with rare outliers (x16), 1 +- 0.1 for norm scales, std 0.01 for biases.
  Tensors are ordered as `safetensors.torch.save_file` orders them (dtype size, then name);
  `__metadata__` is `{\"format\": \"pt\"}`.
- Shapes covered: rows divisible by 256 (flux `*_mlp.2`, `txt_in`, embedders), by 32 but not
  256 (most 2-D weights, flux `single_blocks.*.linear2` = 320), not by 32 (flux
  `vector_in.in_layer` = 100, sd1 cross-attention `to_k`/`to_v` = 48, sdxl `label_emb.0.0` = 176);
  4-D conv kernels (sd1/sdxl/sd3); the 5-D Conv3d `patch_embedding.weight` (wan); 3-D parameters
  with a leading 1 (sd3 `pos_embed`, wan `*.modulation`); 1-D norms and biases.
- `flux_checkpoint_bf16.safetensors`: ComfyUI checkpoint layout, every diffusion key under
  `model.diffusion_model.` plus two `first_stage_model.` (VAE) tensors.
- `flux_f16.gguf`: what ComfyUI-GGUF's convert.py makes of `flux_f32.safetensors` (F16, with
  1-D and <= 1024-element tensors in F32; `general.architecture` = flux, file type F16).
- `adversarial/`: hostile files `detect` must refuse, written from `detect::corpus` (the
  same cases detect's tests check); `adversarial/expected.json` gives each one's error kind.
- `diffusers/`: models in diffusers' layout and repository folders (source:
  `xtask/src/fixtures_diffusers.rs`): `FLUX.1-tiny/transformer/` as three shards and
  `FLUX.2-tiny/transformer/` as two, each with a `diffusion_pytorch_model.safetensors.index.json`;
  `sd3-tiny/transformer/`, `sdxl-tiny/unet/`, `wan-tiny/transformer/`,
  `z-image-tiny/transformer/` and `lumina2-tiny/transformer/` as one
  `diffusion_pytorch_model.safetensors` each. BF16, diffusers key names and shape patterns.
- `sd3_mixed.safetensors`: F32 norms and biases first, BF16 for the bulk (dominant by bytes), an
  I64 tensor, a BOOL tensor, a 0-d F32 scalar (`logit_scale`) and a 1-element tensor.
- `archs/`: one file per newer architecture and text encoder (`xtask/src/fixtures_archs.rs`):
  the key layouts of Flux.2, Chroma, LTX-2 (a checkpoint: `model.diffusion_model.` keys, an
  unprefixed text projection, its `config` metadata), HunyuanVideo 1.5, Z-Image, Wan 2.2 (5B
  TI2V, A14B), T5-XXL (fp16 and fp8), umt5-xxl (with a `spiece_model` U8 tensor), CLIP-L and
  CLIP-G, tiny but with rows of 256 in the block linears. The names follow real key lists
  (`crates/detect/tests/real_key_sets/`, each citing its source).
";

fn manifest_entry(
    path: &Path,
    arch: Option<&str>,
    precision: Option<&str>,
    format: &str,
) -> DynResult<serde_json::Value> {
    let bytes = fs::read(path)?;
    Ok(serde_json::json!({
        "format": format,
        "arch": arch,
        "precision": precision,
        "size": bytes.len(),
        "xxh3_64": format!("{:016x}", twox_hash::XxHash3_64::oneshot(&bytes)),
    }))
}

fn write_manifest(out: &Path, entries: &BTreeMap<String, serde_json::Value>) -> DynResult<()> {
    let mut files = serde_json::Map::new();
    for (k, v) in entries {
        files.insert(k.clone(), v.clone());
    }
    let doc = serde_json::json!({
        "generator": "cargo xtask fixtures",
        "hash": "xxh3_64 of the file bytes, hex",
        "files": files,
    });
    let mut text = serde_json::to_string_pretty(&doc)?;
    text.push('\n');
    fs::write(out.join("MANIFEST.json"), text)?;
    Ok(())
}

/// ComfyUI-GGUF's convert.py output for `flux_f32.safetensors`: tensors in name order, F16,
/// except 1-D tensors and tensors of at most 1024 elements, which stay F32; metadata
/// `general.architecture`, `general.quantization_version` = 2, `general.file_type` = 1 (F16).
fn write_gguf_flux_f16(path: &Path) -> DynResult<()> {
    let out = BufWriter::new(File::create(path)?);
    write_gguf(out, &layouts::flux(FluxDims::SMALL))
}

fn write_gguf<W: Write>(out: W, layout: &Layout) -> DynResult<()> {
    use gguf::{FileType, GgmlType, GgufWriter, MetadataValue, TensorDesc};

    let mut tensors = layout.tensors.clone();
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    let ggml_type = |shape: &[u64]| {
        if shape.len() == 1 || shape.iter().product::<u64>() <= 1024 {
            GgmlType::F32
        } else {
            GgmlType::F16
        }
    };
    let descs: Vec<TensorDesc> = tensors
        .iter()
        .map(|t| TensorDesc::from_torch_shape(&t.name, &t.shape, ggml_type(&t.shape)))
        .collect();
    let metadata = vec![
        (
            "general.architecture".to_string(),
            MetadataValue::String(layout.arch.to_string()),
        ),
        (
            "general.quantization_version".to_string(),
            MetadataValue::U32(2),
        ),
        (
            "general.file_type".to_string(),
            MetadataValue::U32(FileType::MostlyF16.id()),
        ),
    ];
    let mut w = GgufWriter::new(out, metadata, &descs, gguf::writer::DEFAULT_ALIGNMENT)?;
    let mut bytes = Vec::new();
    for t in &tensors {
        let mut rng = SplitMix64::new(name_seed(&t.name));
        let numel = usize::try_from(t.shape.iter().product::<u64>())?;
        let values: Vec<f32> = (0..numel).map(|_| sample(&mut rng, t.init)).collect();
        bytes.clear();
        let dtype = match ggml_type(&t.shape) {
            GgmlType::F32 => Dtype::F32,
            _ => Dtype::F16,
        };
        encode_float(&values, dtype, &mut bytes)?;
        w.write_chunk(&bytes)?;
    }
    let mut out = w.finish()?;
    out.flush()?;
    Ok(())
}

/// Three smaller Flux-like bf16 models (~340 MB each, 1 double and 2 single blocks of the
/// large model's width) for the benchmark of several sources in one command.
pub fn several_specs() -> Vec<FileSpec> {
    let dims = FluxDims {
        hidden: 1536,
        head_dim: 128,
        vec_in: 768,
        context: 4096,
        double_blocks: 1,
        single_blocks: 2,
    };
    let layout = layouts::flux(dims);
    (1..=3)
        .map(|i| {
            FileSpec::from_layout(
                format!("flux_small{i}_bf16.safetensors"),
                &layout,
                "bf16",
                |_| Dtype::BF16,
                "",
            )
        })
        .collect()
}

/// Writes the benchmark models into `dir`, skipping files already there at the right size, and
/// the bf16 one as a three-shard diffusers folder ([`diffusers::write_large_sharded`]).
pub fn write_large(dir: &Path, force: bool) -> DynResult<Vec<PathBuf>> {
    let mut paths = write_specs(dir, large_specs(), force)?;
    paths.push(diffusers::write_large_sharded(dir, force)?);
    Ok(paths)
}

/// Writes `specs` into `dir`, skipping files already there at the right size.
pub fn write_specs(dir: &Path, specs: Vec<FileSpec>, force: bool) -> DynResult<Vec<PathBuf>> {
    fs::create_dir_all(dir)?;
    let mut paths = Vec::new();
    for spec in specs {
        let path = dir.join(&spec.file);
        let want = spec.output_len()?;
        let have = fs::metadata(&path).map(|m| m.len()).ok();
        if force || have != Some(want) {
            eprintln!("writing {} ({:.2} GB)", path.display(), want as f64 / 1e9);
            let tmp = dir.join(format!("{}.partial", spec.file));
            spec.write(&tmp)?;
            fs::rename(&tmp, &path)?;
        } else {
            eprintln!("up to date: {}", path.display());
        }
        paths.push(path);
    }
    Ok(paths)
}

/// Regenerates into a temporary directory and lists the files that differ from `committed`
/// (missing on either side or with other bytes).
pub fn check(committed: &Path) -> DynResult<Vec<String>> {
    let tmp = tempfile::tempdir()?;
    write_small(tmp.path())?;
    let fresh = list_files(tmp.path())?;
    let old = list_files(committed)?;
    let mut differing = Vec::new();
    let all: std::collections::BTreeSet<&String> = fresh.iter().chain(old.iter()).collect();
    for rel in all {
        let a = fs::read(tmp.path().join(rel)).ok();
        let b = fs::read(committed.join(rel)).ok();
        if a.is_none() || b.is_none() || a != b {
            differing.push(rel.clone());
        }
    }
    Ok(differing)
}

/// Relative paths of every regular file under `root`, sorted.
fn list_files(root: &Path) -> DynResult<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = root.join(&rel);
        if !dir.exists() {
            continue;
        }
        for entry in fs::read_dir(&dir)? {
            let entry = entry?;
            let r = rel.join(entry.file_name());
            let ft = entry.file_type()?;
            if ft.is_dir() {
                stack.push(r);
            } else if ft.is_file() {
                out.push(r.to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_fixtures_stay_small() {
        let total: u64 = small_specs()
            .iter()
            .map(|s| s.output_len().unwrap_or(u64::MAX))
            .sum();
        assert!(total < 8_000_000, "{total} bytes");
    }

    #[test]
    fn arch_fixtures_stay_small() {
        let total: u64 = archs::specs()
            .iter()
            .map(|s| s.output_len().unwrap_or(u64::MAX))
            .sum();
        assert!(total < 6_000_000, "{total} bytes");
    }

    #[test]
    fn writing_twice_gives_identical_bytes() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let spec = mixed();
        spec.write(&a.path().join("x")).unwrap();
        spec.write(&b.path().join("x")).unwrap();
        let x = fs::read(a.path().join("x")).unwrap();
        assert_eq!(x, fs::read(b.path().join("x")).unwrap());
        assert_eq!(x.len() as u64, spec.output_len().unwrap());
    }

    #[test]
    fn mixed_file_puts_f32_before_bf16_and_bf16_dominates() {
        let spec = mixed();
        let first_float = spec.entries.iter().find(|e| e.dtype.is_float()).unwrap();
        assert_eq!(first_float.dtype, Dtype::F32);
        let bytes = |d: Dtype| -> u64 {
            spec.entries
                .iter()
                .filter(|e| e.dtype == d)
                .map(|e| d.bytes_for(e.shape.iter().product()).unwrap())
                .sum()
        };
        assert!(bytes(Dtype::BF16) > bytes(Dtype::F32));
    }

    #[test]
    fn fuzz_seeds_are_valid_files() {
        let seeds = fuzz_seeds().unwrap();
        assert_eq!(seeds.len(), 2);
        for (name, bytes) in seeds {
            assert!(bytes.len() < 4096, "{name}: {} bytes", bytes.len());
            if name.ends_with(".gguf") {
                gguf::GgufFile::parse_header(&bytes, Path::new(&name)).unwrap();
            } else {
                let h = tensorfile::safetensors::parse_header(&bytes, bytes.len() as u64).unwrap();
                assert!(h.tensors.len() >= 4, "{name}");
            }
        }
    }

    #[test]
    fn committed_fixtures_are_up_to_date() {
        let differing = check(&crate::repo_root().join("fixtures")).unwrap();
        assert!(
            differing.is_empty(),
            "run `cargo xtask fixtures`; stale: {differing:?}"
        );
    }

    #[test]
    fn large_models_have_the_intended_sizes() {
        let l = large_specs();
        let f32_len = l[0].output_len().unwrap();
        assert!(
            (1_800_000_000..2_200_000_000).contains(&f32_len),
            "{f32_len}"
        );
        let bf16_len = l[1].output_len().unwrap();
        assert!(
            (900_000_000..1_100_000_000).contains(&bf16_len),
            "{bf16_len}"
        );
    }
}
