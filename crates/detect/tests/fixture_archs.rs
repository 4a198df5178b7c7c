//! Every committed fixture with an architecture (`fixtures/MANIFEST.json`: the old layouts and
//! `fixtures/archs/`) is detected, from its header, as the architecture and precision it was
//! written as, and its model kind follows (text encoders go to `text_encoders/`).

#![allow(clippy::unwrap_used)] // test code: a failed setup step should fail the test loudly

use std::path::Path;

use detect::arch::ModelKind;
use detect::detect;

#[test]
fn every_fixture_is_detected_as_written() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("MANIFEST.json")).unwrap())
            .unwrap();
    let mut archs_seen = 0;
    for (file, entry) in manifest["files"].as_object().unwrap() {
        let (Some(arch), "safetensors") =
            (entry["arch"].as_str(), entry["format"].as_str().unwrap())
        else {
            continue;
        };
        let d = detect(&root.join(file)).unwrap();
        assert_eq!(d.architecture.as_deref(), Some(arch), "{file}");
        assert_eq!(
            d.precision
                .map(|p| p.canonical_name().to_owned())
                .as_deref(),
            entry["precision"].as_str(),
            "{file}"
        );
        let kind = ModelKind::of_architecture(d.architecture.as_deref());
        let text = ["t5xxl", "umt5xxl", "clip_l", "clip_g"].contains(&arch);
        assert_eq!(kind == ModelKind::TextEncoder, text, "{file}");
        if file.starts_with("archs/") {
            archs_seen += 1;
        }
    }
    assert_eq!(archs_seen, 12);
}
