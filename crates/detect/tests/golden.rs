//! Files written by the reference tools (see `golden/make_goldens.py`): the parser reads what
//! safetensors itself wrote exactly as safetensors reports it, and bitsandbytes' own saved
//! layouts are detected as nf4/fp4/int8; the adversarial cases convcache refuses are the ones
//! safetensors and gguf-py refuse too.

use std::path::PathBuf;

use detect::{BnbQuantType, Evidence, Precision, detect};
use tensorfile::safetensors::read_header;

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

#[test]
fn python_safetensors_file_parses_as_safetensors_reports_it() {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden("mixed_dtypes.json")).unwrap())
            .unwrap();
    let path = golden("mixed_dtypes.safetensors");
    let header = read_header(&path).unwrap();
    let metadata: serde_json::Value = serde_json::to_value(&header.metadata).unwrap();
    assert_eq!(metadata, expected["metadata"]);
    let tensors = expected["tensors"].as_object().unwrap();
    assert_eq!(header.tensors.len(), tensors.len());
    for t in &header.tensors {
        let e = &tensors[&t.name];
        assert_eq!(e["dtype"], t.dtype.as_str(), "{}", t.name);
        assert_eq!(e["shape"], serde_json::json!(t.shape), "{}", t.name);
        assert_eq!(
            e["data_offsets"],
            serde_json::json!([t.data_offsets.0, t.data_offsets.1]),
            "{}",
            t.name
        );
    }

    let d = detect(&path).unwrap();
    assert_eq!(d.file_size, expected["file_size"].as_u64().unwrap());
    // 1 KB of BF16 outweighs the F32 norm listed first.
    assert_eq!(d.precision, Some(Precision::Bf16));
    assert_eq!(d.evidence, Evidence::Header);
    assert_eq!(d.metadata["title"], "golden ✓");
}

#[test]
fn bitsandbytes_saved_layouts_are_detected() {
    for (file, quant_type, double_quant) in [
        ("bnb_nf4.safetensors", BnbQuantType::Nf4, false),
        ("bnb_nf4_dq.safetensors", BnbQuantType::Nf4, true),
        ("bnb_fp4.safetensors", BnbQuantType::Fp4, false),
        ("bnb_int8.safetensors", BnbQuantType::Int8, false),
    ] {
        let d = detect(&golden(file)).unwrap();
        let b = d
            .bitsandbytes
            .unwrap_or_else(|| panic!("{file}: no layout"));
        assert_eq!(b.quant_type, quant_type, "{file}");
        assert_eq!(b.quantized_weights, 1, "{file}");
        assert_eq!(b.double_quant, double_quant, "{file}");
        assert_eq!(d.precision, Some(quant_type.precision()), "{file}");
    }
}

/// Cases convcache refuses on purpose although the reference library reads them.
const STRICTER_THAN_REFERENCE: &[(&str, &str)] = &[(
    "rank_too_large.safetensors",
    "a shape of more than MAX_RANK dims is refused to bound memory on hostile headers",
)];

#[test]
fn the_reference_libraries_refuse_the_same_cases() {
    let verdicts: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden("reference_verdicts.json")).unwrap())
            .unwrap();
    let verdicts = verdicts.as_object().unwrap();
    for case in detect::corpus::cases() {
        let reference_reads_it =
            case.name.ends_with(".safetensors") || case.name.ends_with(".gguf");
        if !reference_reads_it || case.content == detect::corpus::Content::Directory {
            continue;
        }
        let verdict = verdicts.get(case.name).unwrap_or_else(|| {
            panic!(
                "{}: no reference verdict; rerun golden/reference_verdicts.py",
                case.name
            )
        });
        let expected = if STRICTER_THAN_REFERENCE.iter().any(|(n, _)| *n == case.name) {
            "accepted"
        } else {
            "rejected"
        };
        assert_eq!(verdict, expected, "{}", case.name);
    }
}
