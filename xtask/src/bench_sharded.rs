//! The `sharded-q4_k_m` bench case: the ~1 GB bf16 Flux-like model as a three-shard diffusers
//! repository (`target/bench-models/flux_large_bf16_diffusers/`, written by
//! `cargo xtask fixtures --large` from `flux_large_bf16.safetensors` in ComfyUI's
//! `flux_to_diffusers` direction) converted to Q4_K_M, against the same model as one
//! ComfyUI-layout file. Reading through the shards and the diffusers view (renames, fused
//! q/k/v and q/k/v/mlp, swapped final modulation) must cost at most 10% of the time, and stay
//! under 512 MiB of peak RSS; both outputs are the same bytes.

use super::{Case, Model, Tool};

/// The case (registered in `bench::cases`).
pub(super) fn case() -> Case {
    Case {
        id: "sharded-q4_k_m",
        what: "Q4_K_M GGUF of the ~1 GB bf16 Flux-like model as a 3-shard diffusers folder, \
               against the same model as one file",
        model: Model::FluxBf16Diffusers,
        tools: vec![
            Tool::Convert {
                to: "Q4_K_M",
                extra: &[],
            },
            Tool::ConvertModel {
                model: Model::FluxBf16,
                to: "Q4_K_M",
            },
        ],
        checked: &[0],
        peer: Some(1),
        baseline: None,
        baseline_fsync: None,
        durable_peer: None,
        durable_rows: &[],
        wired: true,
        goal: "within 10% of the time of the same model as one file (speed-up >= 0.91x \
               against that row: time <= 1.1x), peak RSS < 512 MiB",
        min_speedup: Some(0.91),
        max_vs_cp: None,
        max_ms: None,
        rss_limit: true,
    }
}
