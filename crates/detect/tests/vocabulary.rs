//! The precision vocabulary: every canonical name and alias parses in any letter case, nothing
//! else does, garbage never panics, and `should_skip` treats spellings of one precision alike.

use detect::precision::Container;
use detect::{Precision, should_skip};
use proptest::prelude::*;
use tensorfile::gguf::FileType;

/// Every accepted spelling (lowercase, `_` form) and what it means.
fn spellings() -> Vec<(String, Precision)> {
    use Precision::*;
    let mut v: Vec<(String, Precision)> = [
        ("fp32", Fp32),
        ("float32", Fp32),
        ("f32", Fp32),
        ("float", Fp32),
        ("fp16", Fp16),
        ("float16", Fp16),
        ("half", Fp16),
        ("f16", Fp16),
        ("bf16", Bf16),
        ("bfloat16", Bf16),
        ("fp8", Fp8E4m3fn),
        ("float8", Fp8E4m3fn),
        ("fp8_e4m3fn", Fp8E4m3fn),
        ("fp8_e4m3", Fp8E4m3fn),
        ("float8_e4m3fn", Fp8E4m3fn),
        ("f8_e4m3", Fp8E4m3fn),
        ("e4m3fn", Fp8E4m3fn),
        ("e4m3", Fp8E4m3fn),
        ("fp8_e5m2", Fp8E5m2),
        ("float8_e5m2", Fp8E5m2),
        ("f8_e5m2", Fp8E5m2),
        ("e5m2", Fp8E5m2),
        ("nf4", Nf4),
        ("bnb_nf4", Nf4),
        ("fp4", Fp4),
        ("bnb_fp4", Fp4),
        ("int8", Int8),
        ("uint8", Int8),
        ("i8", Int8),
        ("u8", Int8),
        ("llm.int8", Int8),
        ("llm_int8", Int8),
        ("bnb_int8", Int8),
        ("gguf_f32", Gguf(FileType::AllF32)),
        ("gguf_f16", Gguf(FileType::MostlyF16)),
        ("gguf_bf16", Gguf(FileType::MostlyBF16)),
        ("q3_k", Gguf(FileType::Q3KM)),
        ("q4_k", Gguf(FileType::Q4KM)),
        ("q5_k", Gguf(FileType::Q5KM)),
        ("gguf_q3_k", Gguf(FileType::Q3KM)),
        ("gguf_q4_k", Gguf(FileType::Q4KM)),
        ("gguf_q5_k", Gguf(FileType::Q5KM)),
    ]
    .into_iter()
    .map(|(s, p)| (s.to_owned(), p))
    .collect();
    for ft in FileType::ALL
        .into_iter()
        .filter(|t| t.base_type().is_quantized())
    {
        let name = ft.name().to_ascii_lowercase();
        v.push((format!("gguf_{name}"), Gguf(ft)));
        v.push((name, Gguf(ft)));
    }
    v
}

fn normalize(s: &str) -> String {
    s.trim().to_ascii_lowercase().replace('-', "_")
}

fn spelling() -> impl Strategy<Value = (String, Precision)> {
    proptest::sample::select(spellings())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_letter_case_parses((name, expected) in spelling(), flips in any::<u64>(), dash in any::<bool>()) {
        let mixed: String = name
            .chars()
            .enumerate()
            .map(|(i, c)| if flips >> (i % 64) & 1 == 1 { c.to_ascii_uppercase() } else { c })
            .map(|c| if dash && c == '_' { '-' } else { c })
            .collect();
        prop_assert_eq!(mixed.parse::<Precision>(), Ok(expected));
        prop_assert_eq!(format!("  {mixed} ").parse::<Precision>(), Ok(expected));
    }

    #[test]
    fn garbage_never_panics_and_only_known_spellings_parse(s in "\\PC{0,24}|[a-zA-Z0-9_.-]{0,12}") {
        let known = spellings();
        match s.parse::<Precision>() {
            Ok(p) => {
                let n = normalize(&s);
                prop_assert!(known.iter().any(|(k, q)| *k == n && *q == p), "{s:?} parsed as {p:?}");
            }
            Err(e) => prop_assert!(e.to_string().contains("unknown precision")),
        }
    }

    #[test]
    fn aliases_never_need_a_conversion((a, pa) in spelling(), (b, pb) in spelling()) {
        let (sa, sb) = (a.parse::<Precision>().unwrap(), b.parse::<Precision>().unwrap());
        prop_assert_eq!(should_skip(sa, sb).is_some(), pa == pb);
    }
}

#[test]
fn every_precision_has_a_name_that_parses_back() {
    for p in Precision::all() {
        assert_eq!(p.target_name().parse::<Precision>(), Ok(p), "{p}");
        assert_eq!(
            Precision::from_suffix(p.canonical_name(), p.container()),
            Some(p)
        );
        assert_eq!(p.to_string(), p.canonical_name());
    }
    // Canonical names are the file-name spellings.
    assert_eq!(Precision::Fp8E4m3fn.canonical_name(), "fp8_e4m3fn");
    assert_eq!(Precision::Gguf(FileType::Q4KM).canonical_name(), "Q4_K_M");
    assert_eq!(Precision::Gguf(FileType::MostlyF16).canonical_name(), "F16");
    // Safetensors suffixes are exact; GGUF ones are case-insensitive.
    assert_eq!(Precision::from_suffix("FP16", Container::Safetensors), None);
    assert_eq!(
        Precision::from_suffix("q4_k_m", Container::Gguf),
        Some(Precision::Gguf(FileType::Q4KM))
    );
}

#[test]
fn should_skip_respects_aliases_and_containers() {
    let p = |s: &str| s.parse::<Precision>().unwrap();
    assert!(should_skip(p("fp8_e4m3fn"), p("fp8")).is_some());
    assert!(should_skip(p("int8"), p("uint8")).is_some());
    assert!(should_skip(p("bf16"), p("BFloat16")).is_some());
    assert!(should_skip(p("Q4_K_M"), p("q4_k_m")).is_some());
    assert!(should_skip(p("fp8_e4m3fn"), p("fp8_e5m2")).is_none());
    assert!(should_skip(p("Q4_K_S"), p("Q4_K_M")).is_none());
    // A GGUF file of file type F16 is detected as Gguf(MostlyF16): already a gguf_f16 target,
    // but not a safetensors fp16 one (and vice versa).
    let gguf_f16_file = Precision::Gguf(FileType::MostlyF16);
    assert!(should_skip(gguf_f16_file, p("gguf_f16")).is_some());
    assert!(should_skip(gguf_f16_file, p("fp16")).is_none());
    assert!(should_skip(p("fp16"), p("gguf_f16")).is_none());
    assert_eq!(
        should_skip(p("half"), p("F16")).map(|r| r.to_string()),
        Some("the source already is in the target precision".to_owned())
    );
}

#[test]
fn precision_serializes_as_its_canonical_name() {
    assert_eq!(
        serde_json::to_value(Precision::Fp8E4m3fn).unwrap(),
        serde_json::json!("fp8_e4m3fn")
    );
    assert_eq!(
        serde_json::to_value(Precision::Gguf(FileType::Q8_0)).unwrap(),
        serde_json::json!("Q8_0")
    );
}
