//! GGUF tensor names of text encoders: llama.cpp's T5 encoder names, which ComfyUI-GGUF's
//! `CLIPLoaderGGUF` turns back into ComfyUI's keys.
//!
//! The loader (`loader.py`, `gguf_clip_loader`) reads a GGUF whose `general.architecture` is
//! `t5` or `t5encoder` and applies `T5_SD_MAP` to every name, as substring replacements in
//! this order: `enc.` → `encoder.`, `.blk.` → `.block.`, `token_embd` → `shared`,
//! `output_norm` → `final_layer_norm`, `attn_q`/`attn_k`/`attn_v`/`attn_o` →
//! `layer.0.SelfAttention.{q,k,v,o}`, `attn_norm` → `layer.0.layer_norm`, `attn_rel_b` →
//! `layer.0.SelfAttention.relative_attention_bias`, `ffn_up` → `layer.1.DenseReluDense.wi_1`,
//! `ffn_down` → `...wo`, `ffn_gate` → `...wi_0`, `ffn_norm` → `layer.1.layer_norm`.
//! [`t5_gguf_name`] is the inverse, with llama.cpp's `convert_hf_to_gguf.py` spelling
//! (`enc.blk.N.attn_q.weight`, `enc.output_norm.weight`, `token_embd.weight`); the unit tests
//! apply the loader's map to every name and get the ComfyUI key back.

/// The llama.cpp name of a ComfyUI T5 / umt5 encoder key, `None` for a key the loader's map
/// cannot give back (not part of a T5 encoder).
pub fn t5_gguf_name(key: &str) -> Option<String> {
    if key == "shared.weight" {
        return Some("token_embd.weight".into());
    }
    if key == "encoder.final_layer_norm.weight" {
        return Some("enc.output_norm.weight".into());
    }
    let rest = key.strip_prefix("encoder.block.")?;
    let (block, rest) = rest.split_once('.')?;
    if block.is_empty() || !block.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    const LAYERS: &[(&str, &str)] = &[
        ("layer.0.SelfAttention.q.", "attn_q."),
        ("layer.0.SelfAttention.k.", "attn_k."),
        ("layer.0.SelfAttention.v.", "attn_v."),
        ("layer.0.SelfAttention.o.", "attn_o."),
        (
            "layer.0.SelfAttention.relative_attention_bias.",
            "attn_rel_b.",
        ),
        ("layer.0.layer_norm.", "attn_norm."),
        ("layer.1.DenseReluDense.wi_0.", "ffn_gate."),
        ("layer.1.DenseReluDense.wi_1.", "ffn_up."),
        ("layer.1.DenseReluDense.wo.", "ffn_down."),
        ("layer.1.layer_norm.", "ffn_norm."),
    ];
    let (suffix, gguf) = LAYERS
        .iter()
        .find_map(|(from, to)| rest.strip_prefix(from).map(|s| (s, *to)))?;
    // Only a parameter name may follow (`weight`); anything else would not map back.
    if suffix != "weight" {
        return None;
    }
    Some(format!("enc.blk.{block}.{gguf}{suffix}"))
}

/// ComfyUI-GGUF's `T5_SD_MAP`, in its order (`loader.py`): what the loader does to a GGUF
/// name. Public for tests that check the names convcache writes map back.
pub const COMFYUI_GGUF_T5_SD_MAP: &[(&str, &str)] = &[
    ("enc.", "encoder."),
    (".blk.", ".block."),
    ("token_embd", "shared"),
    ("output_norm", "final_layer_norm"),
    ("attn_q", "layer.0.SelfAttention.q"),
    ("attn_k", "layer.0.SelfAttention.k"),
    ("attn_v", "layer.0.SelfAttention.v"),
    ("attn_o", "layer.0.SelfAttention.o"),
    ("attn_norm", "layer.0.layer_norm"),
    (
        "attn_rel_b",
        "layer.0.SelfAttention.relative_attention_bias",
    ),
    ("ffn_up", "layer.1.DenseReluDense.wi_1"),
    ("ffn_down", "layer.1.DenseReluDense.wo"),
    ("ffn_gate", "layer.1.DenseReluDense.wi_0"),
    ("ffn_norm", "layer.1.layer_norm"),
];

/// The ComfyUI key ComfyUI-GGUF's loader makes of GGUF name `name` (`sd_map_replace`).
pub fn comfyui_gguf_t5_key(name: &str) -> String {
    let mut k = name.to_owned();
    for (from, to) in COMFYUI_GGUF_T5_SD_MAP {
        k = k.replace(from, to);
    }
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_t5_key_maps_back_through_the_loaders_map() {
        let mut keys = vec![
            "shared.weight".to_owned(),
            "encoder.final_layer_norm.weight".to_owned(),
        ];
        for b in [0, 1, 9, 23] {
            for p in [
                "layer.0.SelfAttention.q",
                "layer.0.SelfAttention.k",
                "layer.0.SelfAttention.v",
                "layer.0.SelfAttention.o",
                "layer.0.SelfAttention.relative_attention_bias",
                "layer.0.layer_norm",
                "layer.1.DenseReluDense.wi_0",
                "layer.1.DenseReluDense.wi_1",
                "layer.1.DenseReluDense.wo",
                "layer.1.layer_norm",
            ] {
                keys.push(format!("encoder.block.{b}.{p}.weight"));
            }
        }
        for k in &keys {
            let g = t5_gguf_name(k).unwrap_or_else(|| panic!("{k} has no name"));
            assert!(g.len() <= crate::mix::MAX_TENSOR_NAME_LEN);
            assert_eq!(&comfyui_gguf_t5_key(&g), k, "via {g}");
        }
        assert_eq!(
            t5_gguf_name("encoder.block.3.layer.1.DenseReluDense.wo.weight").as_deref(),
            Some("enc.blk.3.ffn_down.weight")
        );
    }

    #[test]
    fn keys_outside_the_encoder_have_no_name() {
        for k in [
            "encoder.block.x.layer.0.SelfAttention.q.weight",
            "encoder.block.0.layer.0.SelfAttention.q.bias",
            "encoder.block.0.layer.2.foo.weight",
            "decoder.block.0.layer.0.SelfAttention.q.weight",
            "spiece_model",
            "encoder.embed_tokens.weight",
        ] {
            assert_eq!(t5_gguf_name(k), None, "{k}");
        }
    }
}
