//! The diffusers fixtures (`fixtures/diffusers/`, `cargo xtask fixtures`) read through
//! `open_safetensors` equal ComfyUI's own conversion of them, byte for byte: the goldens in
//! `tests/golden/diffusers/` were made by `make_goldens.py` there, which runs ComfyUI's maps
//! (comfy/utils.py, model_detection.py) in the direction its loader applies them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use tensorfile::safetensors::SafetensorsFile;
use tensorfile::sharded::ShardedSource;
use tensorfile::{Dtype, TensorSource, open_safetensors, widen_to_f32};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/diffusers")
        .join(name)
}

/// The diffusers tensors as stored (no view), for tensors ComfyUI keeps unchanged.
fn raw(folder: &Path) -> Box<dyn TensorSource> {
    let index = folder.join("diffusion_pytorch_model.safetensors.index.json");
    if index.exists() {
        Box::new(ShardedSource::open(&index).unwrap())
    } else {
        Box::new(SafetensorsFile::open(&folder.join("diffusion_pytorch_model.safetensors")).unwrap())
    }
}

fn all_bytes(s: &dyn TensorSource, i: usize) -> Vec<u8> {
    let mut b = vec![0u8; s.tensors()[i].byte_len().unwrap() as usize];
    s.read_raw(i, 0, &mut b).unwrap();
    b
}

fn check(model: &str, repo: &str, folder: &str, arch_key: &str) {
    let repo = root().join("fixtures/diffusers").join(repo);
    // The repository root stands for its model folder.
    let view = open_safetensors(&repo).unwrap();
    let raw = raw(&repo.join(folder));
    let table: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(golden(&format!("{model}.json"))).unwrap())
            .unwrap();
    let computed = SafetensorsFile::open(&golden(&format!("{model}.safetensors"))).unwrap();

    let served: BTreeSet<&str> = view.tensors().iter().map(|t| t.name.as_str()).collect();
    let want: BTreeSet<&str> = table.keys().map(String::as_str).collect();
    assert_eq!(served, want, "{model}: key sets");
    assert!(served.contains(arch_key), "{model}: {arch_key}");

    for (name, row) in &table {
        let i = view.index_of(name).unwrap();
        let t = &view.tensors()[i];
        let shape: Vec<u64> = row["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(t.shape, shape, "{model}: {name}");
        assert_eq!(t.dtype, Dtype::BF16, "{model}: {name}");
        assert_eq!(row["dtype"], "bfloat16");
        let expected = match row["from"].as_str() {
            Some(from) => all_bytes(raw.as_ref(), raw.index_of(from).unwrap()),
            None => all_bytes(&computed, computed.index_of(name).unwrap()),
        };
        let got = all_bytes(view.as_ref(), i);
        assert!(got == expected, "{model}: {name} differs from ComfyUI's");

        // Any range is served piecewise, across the parts' borders.
        let step = 998; // not a divisor of any part's byte length
        let mut at = 2usize;
        while at < got.len() {
            let n = step.min(got.len() - at);
            let mut b = vec![0u8; n];
            view.read_raw(i, at as u64, &mut b).unwrap();
            assert_eq!(b, got[at..at + n], "{model}: {name} bytes {at}+{n}");
            at += n;
        }
        let n_el = got.len() / 2;
        if n_el > 3 {
            let mut f = vec![0f32; n_el - 3];
            view.read_f32(i, 1, &mut f).unwrap();
            let mut want = vec![0f32; n_el - 3];
            widen_to_f32(Dtype::BF16, &got[2..2 + 2 * (n_el - 3)], &mut want).unwrap();
            assert_eq!(f, want, "{model}: {name} as f32");
        }
    }
    // Past the end is an error, not a read of another tensor.
    let last = view.tensors().len() - 1;
    let len = view.tensors()[last].byte_len().unwrap();
    assert!(view.read_raw(last, len - 1, &mut [0u8; 2]).is_err());
}

#[test]
fn sharded_flux_matches_comfyui() {
    check("flux", "FLUX.1-tiny", "transformer", "single_blocks.1.linear1.weight");
}

#[test]
fn sd3_matches_comfyui() {
    check("sd3", "sd3-tiny", "transformer", "joint_blocks.1.context_block.adaLN_modulation.1.weight");
}

#[test]
fn sdxl_unet_matches_comfyui() {
    check("sdxl", "sdxl-tiny", "unet", "output_blocks.5.2.conv.weight");
}

#[test]
fn wan_matches_the_reference_names() {
    check("wan", "wan-tiny", "transformer", "blocks.1.cross_attn.k_img.weight");
}

#[test]
fn z_image_matches_comfyui() {
    check("z_image", "z-image-tiny", "transformer", "context_refiner.1.attention.qkv.weight");
}
