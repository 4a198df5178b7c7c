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
        Box::new(ShardedSource::open(&index).expect("golden test"))
    } else {
        Box::new(
            SafetensorsFile::open(&folder.join("diffusion_pytorch_model.safetensors"))
                .expect("golden test"),
        )
    }
}

fn all_bytes(s: &dyn TensorSource, i: usize) -> Vec<u8> {
    let mut b = vec![0u8; s.tensors()[i].byte_len().expect("golden test") as usize];
    s.read_raw(i, 0, &mut b).expect("golden test");
    b
}

fn check(model: &str, repo: &str, folder: &str, arch_key: &str) {
    let repo = root().join("fixtures/diffusers").join(repo);
    // The repository root stands for its model folder.
    let view = open_safetensors(&repo).expect("golden test");
    let raw = raw(&repo.join(folder));
    let table: serde_json::Map<String, serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(golden(&format!("{model}.json"))).expect("golden test"),
    )
    .expect("golden test");
    let computed =
        SafetensorsFile::open(&golden(&format!("{model}.safetensors"))).expect("golden test");

    let served: BTreeSet<&str> = view.tensors().iter().map(|t| t.name.as_str()).collect();
    let want: BTreeSet<&str> = table.keys().map(String::as_str).collect();
    assert_eq!(served, want, "{model}: key sets");
    assert!(served.contains(arch_key), "{model}: {arch_key}");

    for (name, row) in &table {
        let i = view.index_of(name).expect("golden test");
        let t = &view.tensors()[i];
        let shape: Vec<u64> = row["shape"]
            .as_array()
            .expect("golden test")
            .iter()
            .map(|v| v.as_u64().expect("golden test"))
            .collect();
        assert_eq!(t.shape, shape, "{model}: {name}");
        assert_eq!(t.dtype, Dtype::BF16, "{model}: {name}");
        assert_eq!(row["dtype"], "bfloat16");
        let expected = match row["from"].as_str() {
            Some(from) => all_bytes(raw.as_ref(), raw.index_of(from).expect("golden test")),
            None => all_bytes(&computed, computed.index_of(name).expect("golden test")),
        };
        let got = all_bytes(view.as_ref(), i);
        assert!(got == expected, "{model}: {name} differs from ComfyUI's");

        // Any range is served piecewise, across the parts' borders.
        let step = 998; // not a divisor of any part's byte length
        let mut at = 2usize;
        while at < got.len() {
            let n = step.min(got.len() - at);
            let mut b = vec![0u8; n];
            view.read_raw(i, at as u64, &mut b).expect("golden test");
            assert_eq!(b, got[at..at + n], "{model}: {name} bytes {at}+{n}");
            at += n;
        }
        let n_el = got.len() / 2;
        if n_el > 3 {
            let mut f = vec![0f32; n_el - 3];
            view.read_f32(i, 1, &mut f).expect("golden test");
            let mut want = vec![0f32; n_el - 3];
            widen_to_f32(Dtype::BF16, &got[2..2 + 2 * (n_el - 3)], &mut want).expect("golden test");
            assert_eq!(f, want, "{model}: {name} as f32");
        }
    }
    // Past the end is an error, not a read of another tensor.
    let last = view.tensors().len() - 1;
    let len = view.tensors()[last].byte_len().expect("golden test");
    assert!(view.read_raw(last, len - 1, &mut [0u8; 2]).is_err());
}

#[test]
fn sharded_flux_matches_comfyui() {
    check(
        "flux",
        "FLUX.1-tiny",
        "transformer",
        "single_blocks.1.linear1.weight",
    );
}

#[test]
fn sd3_matches_comfyui() {
    check(
        "sd3",
        "sd3-tiny",
        "transformer",
        "joint_blocks.1.context_block.adaLN_modulation.1.weight",
    );
}

#[test]
fn sdxl_unet_matches_comfyui() {
    check("sdxl", "sdxl-tiny", "unet", "output_blocks.5.2.conv.weight");
}

#[test]
fn wan_matches_the_reference_names() {
    check(
        "wan",
        "wan-tiny",
        "transformer",
        "blocks.1.cross_attn.k_img.weight",
    );
}

#[test]
fn z_image_matches_comfyui() {
    check(
        "z_image",
        "z-image-tiny",
        "transformer",
        "context_refiner.1.attention.qkv.weight",
    );
}

/// Files already in ComfyUI's layout are never claimed as diffusers (their names would be
/// rewritten), nor is Qwen-Image, whose diffusers names are ComfyUI's.
#[test]
fn reference_layouts_and_qwen_image_are_served_as_they_are() {
    use tensorfile::diffusers::Mapping;
    use tensorfile::source::{SourceTensor, Stored};
    for arch in ["flux", "sd3", "sdxl", "sd1", "wan"] {
        let path = root().join(format!("fixtures/{arch}_bf16.safetensors"));
        let file = SafetensorsFile::open(&path).expect("golden test");
        assert!(
            Mapping::plan(&path, file.tensors())
                .expect("golden test")
                .is_none(),
            "{arch}"
        );
        let view = open_safetensors(&path).expect("golden test");
        assert_eq!(view.tensors(), file.tensors(), "{arch}");
    }
    let t = |name: &str| SourceTensor {
        name: name.into(),
        shape: vec![4, 4],
        dtype: Dtype::BF16,
        stored: Stored::Safetensors(Dtype::BF16),
        source_bytes: 32,
    };
    let keys = [
        // Qwen-Image (ComfyUI loads these names as they are).
        &[
            "img_in.weight",
            "txt_in.weight",
            "time_text_embed.timestep_embedder.linear_2.weight",
            "transformer_blocks.0.attn.add_q_proj.weight",
            "transformer_blocks.0.attn.norm_added_q.weight",
            "transformer_blocks.0.img_mlp.net.0.proj.weight",
        ][..],
        // Lumina 2 / Z-Image reference layout (`x_embedder.weight` like diffusers Flux).
        &[
            "x_embedder.weight",
            "cap_embedder.1.weight",
            "context_refiner.0.attention.qkv.weight",
            "noise_refiner.0.attention.k_norm.weight",
        ][..],
    ];
    for set in keys {
        let tensors: Vec<SourceTensor> = set.iter().map(|n| t(n)).collect();
        assert!(
            Mapping::plan(Path::new("m"), &tensors)
                .expect("golden test")
                .is_none(),
            "{set:?}"
        );
    }
}
