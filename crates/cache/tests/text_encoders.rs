//! Text encoders' outputs live in `text_encoders/{converted,gguf}` and get the same lookup,
//! listing, statistics, cleanup and eviction as diffusion models' (the model kind comes from
//! `LookupOptions::model_kind`; listings cover both folders).

#![allow(clippy::unwrap_used)] // test code: a failed setup step should fail the test loudly

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use cache::provenance::SourceStat;
use cache::{Cache, Kind, LookupOptions, LookupStatus, ModelKind, ModelsDir, Provenance, digest};
use detect::Precision;
use tensorfile::safetensors::Dtype;
use tensorfile::{SafetensorsWriter, TensorSpec};

const VERSION: &str = "test-converter/1";

fn write_model(path: &Path, dtype: Dtype, fill: u8, meta: &BTreeMap<String, String>) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let spec = TensorSpec {
        name: "w".into(),
        dtype,
        shape: vec![2, 8],
    };
    let len = spec.byte_len().unwrap() as usize;
    let mut w = SafetensorsWriter::new(fs::File::create(path).unwrap(), &[spec], meta).unwrap();
    w.write_chunk(&vec![fill; len]).unwrap();
    w.finish().unwrap();
}

fn publish(src: &Path, target: Precision, dtype: Dtype, at: &Path) {
    let prov = Provenance::new(
        &SourceStat::of(src).unwrap(),
        digest::digest_file(src).unwrap(),
        target,
        VERSION,
    );
    write_model(at, dtype, 1, &prov.to_metadata());
}

fn opts(kind: ModelKind) -> LookupOptions {
    LookupOptions {
        converter_version: Some(VERSION.into()),
        model_kind: kind,
        ..Default::default()
    }
}

#[test]
fn text_encoder_outputs_have_their_own_folders_and_every_cache_operation() {
    let tmp = tempfile::tempdir().unwrap();
    let models = ModelsDir::at(tmp.path().join("models"));
    let cache = Cache::new(models.clone());
    let te = tmp.path().join("t5xxl_fp32.safetensors");
    write_model(&te, Dtype::F32, 7, &BTreeMap::new());
    let dm = tmp.path().join("flux_fp32.safetensors");
    write_model(&dm, Dtype::F32, 9, &BTreeMap::new());

    let te_dir = tmp.path().join("models/text_encoders/converted");
    let l = cache
        .lookup(&te, Precision::Bf16, &opts(ModelKind::TextEncoder))
        .unwrap();
    assert_eq!(l.status, LookupStatus::Missing);
    assert_eq!(l.path, te_dir.join("t5xxl_bf16.safetensors"));
    assert_eq!(
        models.output_dir_for(ModelKind::TextEncoder, "Q8_0".parse().unwrap()),
        tmp.path().join("models/text_encoders/gguf")
    );

    publish(&te, Precision::Bf16, Dtype::BF16, &l.path);
    let dm_out = models.converted_dir().join("flux_bf16.safetensors");
    publish(&dm, Precision::Bf16, Dtype::BF16, &dm_out);
    let hit = cache
        .lookup(&te, Precision::Bf16, &opts(ModelKind::TextEncoder))
        .unwrap();
    assert_eq!(hit.status, LookupStatus::Hit);
    // The diffusion-model folder holds nothing of this source.
    let other = cache
        .lookup(&te, Precision::Bf16, &opts(ModelKind::DiffusionModel))
        .unwrap();
    assert_eq!(other.status, LookupStatus::Missing);

    let listed = cache.list(Kind::All).unwrap();
    let kinds: Vec<(ModelKind, &str)> = listed
        .iter()
        .map(|e| (e.model_kind, e.basename.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            (ModelKind::DiffusionModel, "flux"),
            (ModelKind::TextEncoder, "t5xxl")
        ]
    );
    let json = serde_json::to_value(&listed[1]).unwrap();
    assert_eq!(json["model_kind"], "text_encoders");
    assert!(cache.list(Kind::Gguf).unwrap().is_empty());
    let stats = cache.stats(Kind::All).unwrap();
    assert_eq!(stats.count, 2);
    assert_eq!(stats.by_kind["text_encoders"].count, 1);
    assert_eq!(stats.by_kind["diffusion_models"].count, 1);

    // Cleanup and eviction reach the text encoders' folder.
    let removed = cache.cleanup(&te, 0, true).unwrap();
    assert_eq!(removed.len(), 1);
    assert_eq!(removed[0].path, l.path);
    let ev = cache.evict_to(0, true).unwrap();
    assert_eq!(ev.removed.len(), 2);
    assert!(cache.remove_output(&l.path, false).unwrap());
    assert!(!l.path.exists());
    // An output name outside the output folders is still left alone.
    let stray = tmp
        .path()
        .join("models/text_encoders/t5xxl_fp16.safetensors");
    publish(&te, Precision::Fp16, Dtype::F16, &stray);
    assert!(!cache.remove_output(&stray, false).unwrap());
}
