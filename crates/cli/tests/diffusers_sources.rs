//! Diffusers repository folders end to end: `convcache convert FOLDER --to bf16,q4_k_m,nf4`
//! writes ComfyUI-layout outputs (ComfyUI's key names, fused q/k/v equal to ComfyUI's own
//! conversion), detected as the right architecture and named after the repository folder; a
//! folder ComfyUI's map cannot serve is a one-line input fault (exit 2) and nothing is
//! published.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use common::*;
use tensorfile::safetensors::Dtype;
use tensorfile::safetensors::writer::{WholeTensor, write_file};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Copies the fixture repository `name` (`fixtures/diffusers/<name>`) into the scratch dir.
fn copy_fixture(s: &Scratch, name: &str) -> PathBuf {
    let from = repo_root().join("fixtures/diffusers").join(name);
    let to = s.root().join(name);
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        std::fs::create_dir_all(to.join(&rel)).expect("mkdir");
        for e in std::fs::read_dir(from.join(&rel)).expect("list fixture") {
            let e = e.expect("entry");
            let r = rel.join(e.file_name());
            if e.file_type().expect("type").is_dir() {
                stack.push(r);
            } else {
                std::fs::copy(from.join(&r), to.join(&r)).expect("copy");
            }
        }
    }
    to
}

/// The golden table of `model` (see crates/tensorfile/tests/golden/diffusers/make_goldens.py).
fn golden(model: &str) -> (serde_json::Map<String, serde_json::Value>, Safetensors) {
    let dir = repo_root().join("crates/tensorfile/tests/golden/diffusers");
    let table = serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("{model}.json"))).expect("golden table"),
    )
    .expect("golden JSON");
    (
        table,
        Safetensors::read(&dir.join(format!("{model}.safetensors"))),
    )
}

fn gguf_dir(s: &Scratch) -> PathBuf {
    s.models().join("diffusion_models").join("gguf")
}

fn detect_json(s: &Scratch, path: &Path) -> serde_json::Value {
    let run = s
        .run(&["--json", "detect", path.to_str().expect("utf-8")])
        .ok();
    run.json()[0].clone()
}

/// Converts the fixture repository `repo` to bf16, Q4_K_M and nf4 in one run and checks each
/// output carries exactly ComfyUI's names (golden `model`), the bf16 one ComfyUI's bytes, and
/// each is detected as `arch` (the GGUF as `gguf_arch`, its `general.architecture`: Flux.2 is
/// written as flux, which ComfyUI-GGUF loads it as). The outputs' paths, in that order.
fn converts_to_bf16_q4_k_m_nf4(
    s: &Scratch,
    repo: &Path,
    model: &str,
    [arch, gguf_arch]: [&str; 2],
) -> [PathBuf; 3] {
    let arg = repo.to_str().expect("utf-8");
    let name = repo.file_name().expect("name").to_str().expect("utf-8");
    let run = s
        .run(&["--json", "convert", arg, "--to", "bf16,q4_k_m,nf4"])
        .ok();
    let rows = run.json();
    let statuses: Vec<&str> = rows
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r["status"].as_str().expect("status"))
        .collect();
    assert_eq!(statuses, ["converted"; 3], "{name}: {rows}");
    let bf16 = s.converted_dir().join(format!("{name}_bf16.safetensors"));
    let q4 = gguf_dir(s).join(format!("{name}_Q4_K_M.gguf"));
    let nf4 = s.converted_dir().join(format!("{name}_nf4.safetensors"));
    for (row, path) in rows
        .as_array()
        .expect("rows")
        .iter()
        .zip([&bf16, &q4, &nf4])
    {
        assert_eq!(PathBuf::from(row["path"].as_str().expect("path")), *path);
    }

    let (table, computed) = golden(model);
    let comfy_keys: BTreeSet<&str> = table.keys().map(String::as_str).collect();

    // bf16 of a bf16 model: every tensor is ComfyUI's, byte for byte.
    let out = Safetensors::read(&bf16);
    let keys: BTreeSet<&str> = out
        .header
        .keys()
        .map(String::as_str)
        .filter(|k| *k != "__metadata__")
        .collect();
    assert_eq!(keys, comfy_keys, "{name}");
    for (key, row) in &table {
        if row["from"].is_null() {
            assert!(out.tensor(key) == computed.tensor(key), "{name}: {key}");
        }
    }

    // Q4_K_M: ComfyUI's names.
    let gguf = tensorfile::gguf::GgufFile::open(&q4).expect("open the GGUF");
    let names: BTreeSet<&str> = gguf.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, comfy_keys, "{name}");

    // nf4: every ComfyUI weight present (quantized ones with their quant state), nothing else.
    let out = Safetensors::read(&nf4);
    for k in &comfy_keys {
        assert!(out.header.contains_key(*k), "{name}: nf4 lacks {k}");
    }
    for k in out.header.keys().filter(|k| *k != "__metadata__") {
        assert!(
            comfy_keys.contains(k.as_str())
                || comfy_keys
                    .iter()
                    .any(|c| k.strip_prefix(c).is_some_and(|r| r.starts_with('.'))),
            "{name}: nf4 has {k}"
        );
    }

    for (path, arch) in [(&bf16, arch), (&q4, gguf_arch), (&nf4, arch)] {
        assert_eq!(
            detect_json(s, path)["architecture"],
            arch,
            "{}",
            path.display()
        );
    }
    [bf16, q4, nf4]
}

#[test]
fn a_sharded_flux_repository_converts_to_comfyui_layout_bf16_q4_k_m_and_nf4() {
    let s = Scratch::new();
    let repo = copy_fixture(&s, "FLUX.1-tiny");
    let arg = repo.to_str().expect("utf-8");
    let [bf16, q4, nf4] = converts_to_bf16_q4_k_m_nf4(&s, &repo, "flux", ["flux", "flux"]);
    let out = Safetensors::read(&nf4);
    assert!(
        !out.header
            .keys()
            .any(|k| k.contains("to_q") || k.contains("proj_mlp"))
    );

    // The same model named by its transformer folder or its index: cache hits.
    for again in [
        repo.join("transformer"),
        repo.join("transformer")
            .join("diffusion_pytorch_model.safetensors.index.json"),
    ] {
        let run = s
            .run(&[
                "--json",
                "convert",
                again.to_str().expect("utf-8"),
                "--to",
                "bf16",
            ])
            .ok();
        assert_eq!(run.json()[0]["status"], "cached", "{}", again.display());
    }
    // ComfyUI's quantized formats too.
    s.run(&["convert", arg, "--to", "fp8_scaled,nvfp4"]).ok();
    for name in ["FLUX.1-tiny_fp8_scaled", "FLUX.1-tiny_nvfp4"] {
        let path = s.converted_dir().join(format!("{name}.safetensors"));
        assert_eq!(detect_json(&s, &path)["architecture"], "flux", "{name}");
        let out = Safetensors::read(&path);
        assert!(
            out.header
                .contains_key("double_blocks.1.img_attn.qkv.weight"),
            "{name}"
        );
        assert!(
            out.header.contains_key("single_blocks.1.linear1.weight"),
            "{name}"
        );
    }

    // `cleanup` finds the outputs by the repository folder too.
    s.run(&["cleanup", arg, "--keep", "0"]).ok();
    assert!(!bf16.exists() && !q4.exists() && !nf4.exists());
    assert!(
        !s.converted_dir()
            .join("FLUX.1-tiny_nvfp4.safetensors")
            .exists()
    );
}

/// The layouts ComfyUI has no map for, served by the inverse of diffusers' own conversion:
/// Lumina-Image-2.0 (one file) and Flux.2 (sharded).
#[test]
fn lumina2_and_flux2_repositories_convert_to_comfyui_layout_bf16_q4_k_m_nf4_and_fp8_scaled() {
    let s = Scratch::new();
    for (repo, model, gguf_arch) in [
        ("lumina2-tiny", "lumina2", "lumina2"),
        ("FLUX.2-tiny", "flux2", "flux"),
    ] {
        let dir = copy_fixture(&s, repo);
        let d = detect_json(&s, &dir);
        assert_eq!(d["architecture"], model, "{d}");
        assert_eq!(d["diffusers"], model, "{d}");
        let [bf16, ..] = converts_to_bf16_q4_k_m_nf4(&s, &dir, model, [model, gguf_arch]);
        // ComfyUI's fp8_scaled reads the same renamed, fused tensors.
        s.run(&[
            "convert",
            dir.to_str().expect("utf-8"),
            "--to",
            "fp8_scaled",
        ])
        .ok();
        let fp8 = s
            .converted_dir()
            .join(format!("{repo}_fp8_scaled.safetensors"));
        assert_eq!(detect_json(&s, &fp8)["architecture"], model, "{repo}");
        let fp8_keys: BTreeSet<String> = Safetensors::read(&fp8)
            .header
            .keys()
            .filter(|k| *k != "__metadata__")
            .filter(|k| !k.ends_with(".comfy_quant") && !k.ends_with(".weight_scale"))
            .cloned()
            .collect();
        let bf16_keys: BTreeSet<String> = Safetensors::read(&bf16)
            .header
            .keys()
            .filter(|k| *k != "__metadata__")
            .cloned()
            .collect();
        assert_eq!(fp8_keys, bf16_keys, "{repo}: fp8_scaled keys");
    }
}

#[test]
fn single_file_diffusers_folders_convert_and_are_named_after_the_repository() {
    let s = Scratch::new();
    for (repo, model, arch) in [
        ("sd3-tiny", "sd3", "sd3"),
        ("sdxl-tiny", "sdxl", "sdxl"),
        ("wan-tiny", "wan", "wan"),
        ("z-image-tiny", "z_image", "z_image"),
    ] {
        let dir = copy_fixture(&s, repo);
        let d = detect_json(&s, &dir);
        assert_eq!(d["architecture"], arch, "{d}");
        assert_eq!(d["diffusers"].as_str().map(|_| true), Some(true), "{d}");
        s.run(&["convert", dir.to_str().expect("utf-8"), "--to", "bf16"])
            .ok();
        let out = s.converted_dir().join(format!("{repo}_bf16.safetensors"));
        let got = Safetensors::read(&out);
        let (table, computed) = golden(model);
        let keys: BTreeSet<&str> = got
            .header
            .keys()
            .map(String::as_str)
            .filter(|k| *k != "__metadata__")
            .collect();
        assert_eq!(keys, table.keys().map(String::as_str).collect(), "{repo}");
        for (name, row) in &table {
            if row["from"].is_null() {
                assert!(got.tensor(name) == computed.tensor(name), "{repo}: {name}");
            }
        }
        assert_eq!(detect_json(&s, &out)["architecture"], arch, "{repo}");
        // A target hashed in its conversion pass reads the renamed, fused layout too (one
        // file is not a source served as stored).
        s.run(&[
            "convert",
            dir.to_str().expect("utf-8"),
            "--to",
            "fp8_scaled",
        ])
        .ok();
        let fp8 = Safetensors::read(
            &s.converted_dir()
                .join(format!("{repo}_fp8_scaled.safetensors")),
        );
        let fp8_keys: BTreeSet<&str> = fp8
            .header
            .keys()
            .map(String::as_str)
            .filter(|k| *k != "__metadata__")
            .filter(|k| !k.ends_with(".comfy_quant") && !k.ends_with(".weight_scale"))
            .collect();
        assert_eq!(fp8_keys, keys, "{repo}: fp8_scaled keys");
        // The file itself is the same source: a hit under the same name.
        let file = dir
            .join(if repo == "sdxl-tiny" {
                "unet"
            } else {
                "transformer"
            })
            .join("diffusion_pytorch_model.safetensors");
        let run = s
            .run(&[
                "--json",
                "convert",
                file.to_str().expect("utf-8"),
                "--to",
                "bf16",
            ])
            .ok();
        assert_eq!(run.json()[0]["status"], "cached", "{repo}");
        assert_eq!(
            PathBuf::from(run.json()[0]["path"].as_str().expect("path")),
            out
        );
        s.run(&["cleanup", dir.to_str().expect("utf-8"), "--keep", "0"])
            .ok();
        assert!(!out.exists(), "{repo}: cleanup by the repository folder");
    }
}

/// A minimal diffusers Flux double block, BF16, with `edit` applied to the tensor list.
fn write_broken(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Dtype, Vec<u64>)>)) -> PathBuf {
    let mut tensors: Vec<(String, Dtype, Vec<u64>)> = vec![
        ("x_embedder.weight".into(), Dtype::BF16, vec![8, 4]),
        ("x_embedder.bias".into(), Dtype::BF16, vec![8]),
    ];
    for m in [
        "to_q",
        "to_k",
        "to_v",
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
    ] {
        tensors.push((
            format!("transformer_blocks.0.attn.{m}.weight"),
            Dtype::BF16,
            vec![8, 8],
        ));
    }
    edit(&mut tensors);
    let dir = dir.join("transformer");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let whole: Vec<WholeTensor<'_>> = tensors
        .iter()
        .map(|(n, d, s)| {
            let len = d.bytes_for(s.iter().product()).expect("size") as usize;
            (n.as_str(), *d, s.clone(), vec![0x3c; len])
        })
        .collect();
    let file = dir.join("diffusion_pytorch_model.safetensors");
    write_file(&file, &whole, &BTreeMap::new()).expect("write");
    file
}

#[test]
fn a_diffusers_folder_comfyuis_map_cannot_serve_is_a_one_line_input_fault() {
    type Edit = fn(&mut Vec<(String, Dtype, Vec<u64>)>);
    let cases: [(&str, Edit, &str); 5] = [
        (
            "mixed-dtypes",
            |t| t[3].1 = Dtype::F16,
            "cannot fuse `double_blocks.0.img_attn.qkv.weight`",
        ),
        (
            "missing-part",
            |t| t.retain(|(n, _, _)| !n.ends_with("attn.to_v.weight")),
            "needs `transformer_blocks.0.attn.to_v.weight`, which is missing",
        ),
        (
            "unknown-key",
            |t| {
                t.push((
                    "transformer_blocks.0.attn.to_gate.weight".into(),
                    Dtype::BF16,
                    vec![8],
                ))
            },
            "`transformer_blocks.0.attn.to_gate.weight` has no name in ComfyUI's layout",
        ),
        (
            // Flux.2 (its shared modulation) with a bias: ComfyUI builds Flux.2 without any.
            "flux2-bias",
            |t| {
                t.push((
                    "double_stream_modulation_img.linear.weight".into(),
                    Dtype::BF16,
                    vec![48, 8],
                ))
            },
            "diffusers flux2 layout: tensor `x_embedder.bias` has no name in ComfyUI's layout",
        ),
        (
            // Lumina 2 with k and v of different sizes: no grouped-query split gives them back.
            "lumina2-kv-sizes",
            |t| {
                t.retain(|(n, _, _)| n.starts_with("x_embedder"));
                for (m, rows) in [("to_q", 8), ("to_k", 8), ("to_v", 4)] {
                    t.push((
                        format!("noise_refiner.0.attn.{m}.weight"),
                        Dtype::BF16,
                        vec![rows, 8],
                    ));
                }
            },
            "cannot fuse `noise_refiner.0.attention.qkv.weight`: its q, k and v parts have sizes 8, 8, 4",
        ),
    ];
    for (name, edit, needle) in cases {
        let s = Scratch::new();
        let repo = s.root().join(name);
        let file = write_broken(&repo, edit);
        for target in ["bf16", "q4_k_m", "nf4"] {
            let run = s.run(&["convert", repo.to_str().expect("utf-8"), "--to", target]);
            let err = run.stderr.trim();
            assert_eq!(run.code, 2, "{name} -> {target}: {err}");
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(err.contains(&file.display().to_string()), "{err}");
            assert!(err.contains(needle), "{name}: {err}");
            for out in [s.converted_dir(), gguf_dir(&s)] {
                let published: Vec<String> = files_in(&out)
                    .into_iter()
                    .filter(|f| f != ".convcache")
                    .collect();
                assert!(published.is_empty(), "{name}: {published:?}");
            }
        }
    }
}
