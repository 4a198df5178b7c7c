//! Architecture detection and the per-architecture tables, against ComfyUI-GGUF's convert.py
//! (auto_convert branch) rules: minimal key sets per architecture, the diffusers refusal, the
//! unknown case, the order that decides overlaps, and the prefix rules.

use detect::arch::{
    Arch, ArchError, DIFFUSION_MODEL_PREFIX, GgufNaming, KeyPattern, KeyPrefix, ModelKind,
    detect_arch, strip_prefix,
};

/// Filler keys every real model has, which must never decide anything.
const FILLER: &[&str] = &["some.block.weight", "norm.bias", "x.y.z"];

fn detect(keys: &[&str]) -> Result<Arch, ArchError> {
    detect_arch(FILLER.iter().chain(keys).copied())
}

#[test]
fn each_reference_layout_is_detected_from_its_minimal_key_set() {
    let cases: &[(Arch, &[&str])] = &[
        (Arch::Flux, &["double_blocks.0.img_attn.proj.weight"]),
        (Arch::Sd3, &["joint_blocks.0.x_block.attn.qkv.weight"]),
        (Arch::Aura, &["double_layers.3.modX.1.weight"]),
        (
            Arch::Hidream,
            &[
                "caption_projection.0.linear.weight",
                "double_stream_blocks.0.block.ff_i.shared_experts.w3.weight",
            ],
        ),
        (
            Arch::Cosmos,
            &[
                "blocks.0.mlp.layer1.weight",
                "blocks.0.adaln_modulation_cross_attn.1.weight",
            ],
        ),
        (
            Arch::QwenImage,
            &[
                "time_text_embed.timestep_embedder.linear_2.weight",
                "transformer_blocks.0.attn.norm_added_q.weight",
                "transformer_blocks.0.img_mlp.net.0.proj.weight",
            ],
        ),
        (
            Arch::Ltxv,
            &[
                "adaln_single.emb.timestep_embedder.linear_2.weight",
                "transformer_blocks.27.scale_shift_table",
                "caption_projection.linear_2.weight",
            ],
        ),
        (
            Arch::Hyvid,
            &[
                "double_blocks.0.img_attn_proj.weight",
                "txt_in.individual_token_refiner.blocks.1.self_attn_qkv.weight",
            ],
        ),
        (
            Arch::Wan,
            &[
                "blocks.0.self_attn.norm_q.weight",
                "text_embedding.2.weight",
                "head.modulation",
            ],
        ),
        (
            Arch::Sdxl,
            &[
                "input_blocks.3.0.op.weight",
                "input_blocks.6.0.op.weight",
                "output_blocks.2.2.conv.weight",
                "output_blocks.5.2.conv.weight",
            ],
        ),
        (Arch::Sdxl, &["label_emb.0.0.weight"]),
        (
            Arch::Sdxl,
            &[
                "down_blocks.0.downsamplers.0.conv.weight",
                "add_embedding.linear_1.weight",
            ],
        ),
        (
            Arch::Sd1,
            &[
                "input_blocks.3.0.op.weight",
                "input_blocks.6.0.op.weight",
                "input_blocks.9.0.op.weight",
                "output_blocks.2.1.conv.weight",
                "output_blocks.5.2.conv.weight",
                "output_blocks.8.2.conv.weight",
            ],
        ),
        (Arch::Sd1, &["down_blocks.0.downsamplers.0.conv.weight"]),
        (
            Arch::Lumina2,
            &[
                "cap_embedder.1.weight",
                "context_refiner.0.attention.qkv.weight",
            ],
        ),
        // The variants convert.py folds into an architecture, by ComfyUI's
        // model_detection.py keys.
        (
            Arch::Flux2,
            &[
                "double_blocks.0.img_attn.proj.weight",
                "double_stream_modulation_img.lin.weight",
            ],
        ),
        (
            Arch::Chroma,
            &[
                "double_blocks.0.img_attn.proj.weight",
                "distilled_guidance_layer.norms.0.scale",
            ],
        ),
        (
            Arch::Chroma,
            &[
                "double_blocks.0.img_attn.proj.weight",
                "distilled_guidance_layer.0.norms.0.weight",
            ],
        ),
        (
            Arch::Ltxav,
            &[
                "adaln_single.emb.timestep_embedder.linear_1.bias",
                "audio_adaln_single.linear.weight",
            ],
        ),
        (
            Arch::Hyvid15,
            &[
                "double_blocks.0.img_attn_proj.weight",
                "txt_in.individual_token_refiner.blocks.0.self_attn_qkv.weight",
                "cond_type_embedding.weight",
            ],
        ),
        (
            Arch::ZImage,
            &[
                "cap_embedder.1.weight",
                "context_refiner.0.attention.qkv.weight",
                "x_pad_token",
                "cap_pad_token",
            ],
        ),
        // Text encoders, by ComfyUI's detect_te_model keys.
        (
            Arch::T5xxl,
            &[
                "encoder.block.0.layer.0.SelfAttention.q.weight",
                "encoder.block.0.layer.1.DenseReluDense.wi_1.weight",
            ],
        ),
        (
            Arch::Umt5xxl,
            &[
                "encoder.block.0.layer.0.SelfAttention.q.weight",
                "encoder.block.0.layer.1.DenseReluDense.wi_1.weight",
                "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight",
            ],
        ),
        (
            Arch::ClipL,
            &[
                "text_model.embeddings.token_embedding.weight",
                "text_model.encoder.layers.0.mlp.fc1.weight",
            ],
        ),
        (
            Arch::ClipG,
            &[
                "text_model.embeddings.token_embedding.weight",
                "text_model.encoder.layers.30.mlp.fc1.weight",
            ],
        ),
    ];
    for (arch, keys) in cases {
        assert_eq!(detect(keys), Ok(*arch), "{keys:?}");
        // Every key of a tuple is needed: drop any one and this arch no longer matches.
        if keys.len() > 1 {
            for skip in 0..keys.len() {
                let partial: Vec<&str> = keys
                    .iter()
                    .enumerate()
                    .filter(|&(i, _)| i != skip)
                    .map(|(_, k)| *k)
                    .collect();
                assert_ne!(detect(&partial), Ok(*arch), "{partial:?}");
            }
        }
    }
    // Every architecture is covered above.
    for arch in Arch::DETECTION_ORDER {
        assert!(cases.iter().any(|(a, _)| *a == arch), "{arch} untested");
    }
}

#[test]
fn diffusers_layouts_are_refused_with_an_explanation() {
    for (arch, key) in [
        (Arch::Flux, "single_transformer_blocks.0.attn.norm_k.weight"),
        (
            Arch::Sd3,
            "transformer_blocks.0.ff_context.net.0.proj.weight",
        ),
        (
            Arch::Aura,
            "joint_transformer_blocks.3.ff_context.out_projection.weight",
        ),
    ] {
        let err = detect(&[key]).expect_err("diffusers");
        assert_eq!(err, ArchError::DiffusersLayout { arch });
        let msg = err.to_string();
        assert!(msg.contains(arch.name()), "{msg}");
        assert!(msg.contains("reference (non-diffusers) layout"), "{msg}");
    }
    // A reference flux file that also carries the diffusers key is refused too (convert.py
    // checks the banned keys after any tuple matched).
    assert_eq!(
        detect(&[
            "double_blocks.0.img_attn.proj.weight",
            "single_transformer_blocks.0.attn.norm_k.weight"
        ]),
        Err(ArchError::DiffusersLayout { arch: Arch::Flux })
    );
}

#[test]
fn unknown_layouts_are_a_clear_error() {
    assert_eq!(detect(&[]), Err(ArchError::Unknown));
    assert_eq!(detect_arch([]), Err(ArchError::Unknown));
    // A full checkpoint whose keys still carry the prefix is not detected.
    assert_eq!(
        detect(&["model.diffusion_model.double_blocks.0.img_attn.proj.weight"]),
        Err(ArchError::Unknown)
    );
    assert!(ArchError::Unknown.to_string().contains("--arch"));
}

#[test]
fn order_decides_overlapping_key_sets() {
    // sd1's diffusers probe is a subset of sdxl's: sdxl is tried first.
    assert_eq!(
        detect(&[
            "down_blocks.0.downsamplers.0.conv.weight",
            "add_embedding.linear_1.weight"
        ]),
        Ok(Arch::Sdxl)
    );
    // Qwen-Image has transformer_blocks.* keys that main's flux/sd3 diffusers probes would
    // have caught; the auto_convert probes do not.
    let qwen = [
        "time_text_embed.timestep_embedder.linear_2.weight",
        "transformer_blocks.0.attn.norm_added_q.weight",
        "transformer_blocks.0.img_mlp.net.0.proj.weight",
        "transformer_blocks.0.attn.norm_added_k.weight",
        "transformer_blocks.0.attn.add_q_proj.weight",
    ];
    assert_eq!(detect(&qwen), Ok(Arch::QwenImage));
    // A file matching both flux and hyvid key sets is flux (earlier in the list).
    assert_eq!(
        detect(&[
            "double_blocks.0.img_attn.proj.weight",
            "double_blocks.0.img_attn_proj.weight",
            "txt_in.individual_token_refiner.blocks.1.self_attn_qkv.weight",
        ]),
        Ok(Arch::Flux)
    );
    // Each variant is tried before the architecture whose keys it extends, so a real file of
    // the variant (which has the parent's keys too) is the variant.
    let variant_with_parent_keys: &[(Arch, &[&str])] = &[
        (
            Arch::Flux2,
            &[
                "double_blocks.0.img_attn.proj.weight",
                "double_stream_modulation_img.lin.weight",
            ],
        ),
        (
            Arch::Chroma,
            &[
                "double_blocks.0.img_attn.proj.weight",
                "distilled_guidance_layer.norms.0.scale",
            ],
        ),
        (
            Arch::Ltxav,
            &[
                "adaln_single.emb.timestep_embedder.linear_1.bias",
                "adaln_single.emb.timestep_embedder.linear_2.weight",
                "transformer_blocks.27.scale_shift_table",
                "caption_projection.linear_2.weight",
                "audio_adaln_single.linear.weight",
            ],
        ),
        (
            Arch::Hyvid15,
            &[
                "double_blocks.0.img_attn_proj.weight",
                "txt_in.individual_token_refiner.blocks.0.self_attn_qkv.weight",
                "txt_in.individual_token_refiner.blocks.1.self_attn_qkv.weight",
                "cond_type_embedding.weight",
            ],
        ),
        (
            Arch::ZImage,
            &[
                "cap_embedder.1.weight",
                "context_refiner.0.attention.qkv.weight",
                "x_pad_token",
                "cap_pad_token",
            ],
        ),
        (
            Arch::Umt5xxl,
            &[
                "encoder.block.0.layer.0.SelfAttention.q.weight",
                "encoder.block.0.layer.1.DenseReluDense.wi_1.weight",
                "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight",
            ],
        ),
        (
            Arch::ClipG,
            &[
                "text_model.embeddings.token_embedding.weight",
                "text_model.encoder.layers.0.mlp.fc1.weight",
                "text_model.encoder.layers.30.mlp.fc1.weight",
            ],
        ),
    ];
    for (arch, keys) in variant_with_parent_keys {
        assert_eq!(detect(keys), Ok(*arch), "{keys:?}");
    }
    let pos = |a| Arch::DETECTION_ORDER.iter().position(|&b| b == a).unwrap();
    assert!(pos(Arch::Flux2) < pos(Arch::Flux) && pos(Arch::Chroma) < pos(Arch::Flux));
    assert!(pos(Arch::Ltxav) < pos(Arch::Ltxv));
    assert!(pos(Arch::Hyvid15) < pos(Arch::Hyvid));
    assert!(pos(Arch::ZImage) < pos(Arch::Lumina2));
}

#[test]
fn variants_are_written_under_a_name_comfyui_gguf_loads_and_text_encoders_are_their_kind() {
    // ComfyUI-GGUF's loader.py IMG_ARCH_LIST and TXT_ARCH_LIST.
    const IMG: &[&str] = &[
        "flux",
        "sd1",
        "sdxl",
        "sd3",
        "aura",
        "hidream",
        "cosmos",
        "ltxv",
        "hyvid",
        "wan",
        "lumina2",
        "qwen_image",
    ];
    const TXT: &[&str] = &["t5", "t5encoder", "llama", "qwen2vl", "qwen3", "qwen3vl"];
    for arch in Arch::DETECTION_ORDER {
        match (arch.kind(), arch.gguf_refusal()) {
            (ModelKind::DiffusionModel, None) => {
                assert!(IMG.contains(&arch.gguf_name()), "{arch}");
                assert_eq!(arch.gguf_naming(), GgufNaming::Reference, "{arch}");
            }
            (ModelKind::TextEncoder, None) => {
                assert!(TXT.contains(&arch.gguf_name()), "{arch}");
                assert_eq!(arch.gguf_naming(), GgufNaming::LlamaCppT5, "{arch}");
            }
            (ModelKind::TextEncoder, Some(reason)) => {
                assert!(matches!(arch, Arch::ClipL | Arch::ClipG), "{arch}");
                assert!(reason.contains("CLIP"), "{reason}");
            }
            (ModelKind::DiffusionModel, Some(_)) => panic!("{arch}: a refused diffusion model"),
        }
    }
    assert_eq!(Arch::Chroma.gguf_name(), "flux");
    assert_eq!(Arch::Ltxav.gguf_name(), "ltxv");
    assert_eq!(Arch::Umt5xxl.gguf_name(), "t5encoder");
    assert_eq!(
        ModelKind::of_architecture(Some("t5encoder")),
        ModelKind::TextEncoder
    );
    assert_eq!(
        ModelKind::of_architecture(Some("umt5xxl")),
        ModelKind::TextEncoder
    );
    assert_eq!(
        ModelKind::of_architecture(Some("clip_l")),
        ModelKind::TextEncoder
    );
    assert_eq!(
        ModelKind::of_architecture(Some("flux2")),
        ModelKind::DiffusionModel
    );
    assert_eq!(ModelKind::of_architecture(None), ModelKind::DiffusionModel);
    assert_eq!(ModelKind::TextEncoder.folder(), "text_encoders");
}

#[test]
fn names_round_trip_and_parse_leniently() {
    for arch in Arch::DETECTION_ORDER {
        assert_eq!(arch.name().parse::<Arch>(), Ok(arch));
        assert_eq!(arch.to_string(), arch.name());
        assert_eq!(arch.name().to_uppercase().parse::<Arch>(), Ok(arch));
    }
    assert_eq!("qwen-image".parse::<Arch>(), Ok(Arch::QwenImage));
    assert_eq!(Arch::QwenImage.name(), "qwen_image");
    assert!("sd2".parse::<Arch>().is_err());
    let names: Vec<&str> = Arch::DETECTION_ORDER.iter().map(|a| a.name()).collect();
    assert_eq!(
        names,
        [
            "flux2",
            "chroma",
            "flux",
            "sd3",
            "aura",
            "hidream",
            "cosmos",
            "qwen_image",
            "ltxav",
            "ltxv",
            "hyvid15",
            "hyvid",
            "wan",
            "sdxl",
            "sd1",
            "z_image",
            "lumina2",
            "umt5xxl",
            "t5xxl",
            "clip_g",
            "clip_l"
        ]
    );
}

#[test]
fn per_arch_tables() {
    for arch in Arch::DETECTION_ORDER {
        assert_eq!(
            arch.shape_fix(),
            matches!(arch, Arch::Sd1 | Arch::Sdxl),
            "{arch}"
        );
        assert_eq!(
            arch.ndims_fix(),
            matches!(arch, Arch::Hyvid | Arch::Hyvid15 | Arch::Wan),
            "{arch}"
        );
        assert!(!arch.no_quant_patterns().is_empty(), "{arch}");
    }
    assert!(Arch::Wan.is_hiprec("blocks.3.modulation"));
    assert!(Arch::Wan.is_hiprec("head.modulation"));
    assert!(!Arch::Flux.is_hiprec("head.modulation"));
    assert!(Arch::Ltxv.is_hiprec("transformer_blocks.0.scale_shift_table"));
    assert!(Arch::Hidream.is_hiprec("double_stream_blocks.0.block.ff_i.gate.weight"));
    assert!(Arch::Lumina2.is_hiprec("x_pad_token"));
    assert!(Arch::Cosmos.is_ignored("blocks.0.attn._extra_state"));
    assert!(Arch::Cosmos.is_ignored("accum_steps"));
    assert!(!Arch::Flux.is_ignored("accum_steps"));
    assert!(Arch::Flux.is_quant_excluded("img_in.weight"));
    assert!(Arch::Flux.is_quant_excluded("final_layer.linear.weight"));
    assert!(!Arch::Flux.is_quant_excluded("double_blocks.0.img_attn.qkv.weight"));
    // Exact-name rules do not match by substring.
    assert!(Arch::Sd1.is_quant_excluded("input_blocks.0.0.weight"));
    assert!(!Arch::Sd1.is_quant_excluded("input_blocks.0.0.weight_extra"));
    assert!(Arch::Sd3.is_quant_excluded("pos_embed"));
    assert!(!Arch::Sd3.is_quant_excluded("x.pos_embed"));
    assert!(KeyPattern::Contains("head.").matches("head.head.weight"));
    // The new rows.
    assert!(Arch::Chroma.is_quant_excluded("distilled_guidance_layer.layers.3.in_layer.weight"));
    assert!(!Arch::Flux.is_quant_excluded("distilled_guidance_layer.layers.3.in_layer.weight"));
    assert!(Arch::Flux2.is_quant_excluded("double_stream_modulation_img.lin.weight"));
    assert!(Arch::Ltxav.is_quant_excluded("audio_adaln_single.linear.weight"));
    assert!(Arch::Ltxav.is_quant_excluded("av_ca_a2v_gate_adaln_single.linear.weight"));
    assert!(Arch::Ltxav.is_hiprec("transformer_blocks.3.scale_shift_table_a2v_ca_audio"));
    assert!(Arch::Hyvid15.is_quant_excluded("cond_type_embedding.weight"));
    assert!(Arch::ZImage.is_hiprec("cap_pad_token"));
    assert!(Arch::T5xxl.is_quant_excluded("shared.weight"));
    assert!(
        Arch::Umt5xxl.is_quant_excluded(
            "encoder.block.5.layer.0.SelfAttention.relative_attention_bias.weight"
        )
    );
    assert!(!Arch::T5xxl.is_quant_excluded("encoder.block.5.layer.0.SelfAttention.q.weight"));
}

#[test]
fn strip_prefix_removes_only_a_leading_diffusion_model_prefix() {
    assert_eq!(
        strip_prefix("model.diffusion_model.double_blocks.0.img_attn.proj.weight"),
        "double_blocks.0.img_attn.proj.weight"
    );
    assert_eq!(strip_prefix("double_blocks.0.x"), "double_blocks.0.x");
    assert_eq!(
        strip_prefix("first_stage_model.decoder.x"),
        "first_stage_model.decoder.x"
    );
    assert_eq!(DIFFUSION_MODEL_PREFIX, "model.diffusion_model.");
}

#[test]
fn key_prefix_follows_convert_py() {
    let full = [
        "model.diffusion_model.input_blocks.0.0.weight",
        "first_stage_model.decoder.conv_in.weight",
        "cond_stage_model.transformer.x",
    ];
    let p = KeyPrefix::detect(full);
    assert_eq!(p, KeyPrefix::DiffusionModel);
    let kept: Vec<String> = full
        .iter()
        .filter_map(|k| p.apply(k).map(|c| c.into_owned()))
        .collect();
    assert_eq!(kept, ["input_blocks.0.0.weight"]);

    let model = ["model.a.weight", "b.weight"];
    assert_eq!(KeyPrefix::detect(model), KeyPrefix::Model);
    // Keys without the prefix are dropped; str.replace removes every occurrence.
    assert_eq!(KeyPrefix::Model.apply("b.weight"), None);
    assert_eq!(
        KeyPrefix::Model.apply("model.x.model.y").as_deref(),
        Some("x.y")
    );

    assert_eq!(KeyPrefix::detect(["net.a", "net.b"]), KeyPrefix::Net);
    assert_eq!(KeyPrefix::detect(["net.a", "b"]), KeyPrefix::None);
    assert_eq!(KeyPrefix::detect([]), KeyPrefix::None);
    assert_eq!(
        KeyPrefix::Net.apply("net.blocks.0").as_deref(),
        Some("blocks.0")
    );
    assert_eq!(
        KeyPrefix::None.apply("anything").as_deref(),
        Some("anything")
    );
}
