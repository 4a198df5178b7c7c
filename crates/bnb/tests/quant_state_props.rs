//! The quant-state JSON: Python's float printing, round trips, and hostile bytes.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use bnb::QuantType;
use bnb::quant_state::{
    MAX_FLOAT_REPR_LEN, NestedJson, QuantStateJson, parse_quant_state, python_float_repr,
    reserved_json_len,
};
use proptest::prelude::*;
use tensorfile::safetensors::Dtype;

#[test]
fn float_printing_matches_python_json_dumps() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/float_repr.json");
    let cases: Vec<(u32, String)> =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(cases.len() > 200);
    for (bits, text) in cases {
        let v = f64::from(f32::from_bits(bits));
        assert_eq!(python_float_repr(v), text, "{bits:08x}");
    }
}

fn state_strategy() -> impl Strategy<Value = QuantStateJson> {
    (
        prop::bool::ANY,
        prop::sample::select(vec![32u64, 64, 128, 4096]),
        prop::sample::select(vec![Dtype::F16, Dtype::BF16, Dtype::F32]),
        prop::collection::vec(1u64..100_000, 1..4),
        prop::option::of(any::<u32>()),
    )
        .prop_map(|(nf4, blocksize, dtype, shape, offset)| QuantStateJson {
            quant_type: if nf4 { QuantType::Nf4 } else { QuantType::Fp4 },
            blocksize,
            dtype,
            shape,
            nested: offset
                .map(f32::from_bits)
                .filter(|o| o.is_finite())
                .map(|o| NestedJson {
                    blocksize: 256,
                    offset: f64::from(o),
                }),
        })
}

proptest! {
    #[test]
    fn states_round_trip_and_fit_their_reservation(state in state_strategy()) {
        let bytes = state.to_json_bytes();
        prop_assert!(bytes.len() <= reserved_json_len(&state));
        prop_assert_eq!(parse_quant_state(&bytes).unwrap(), state.clone());
        // the padded form we write for double quant parses the same
        let mut padded = bytes.clone();
        padded.resize(reserved_json_len(&state), b' ');
        prop_assert_eq!(parse_quant_state(&padded).unwrap(), state);
    }

    #[test]
    fn any_finite_f32_prints_within_the_reserved_width(bits in any::<u32>()) {
        let v = f32::from_bits(bits);
        prop_assume!(v.is_finite());
        let s = python_float_repr(f64::from(v));
        prop_assert!(s.len() <= MAX_FLOAT_REPR_LEN, "{}", s);
        prop_assert_eq!(s.parse::<f64>().unwrap(), f64::from(v));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let _ = parse_quant_state(&bytes);
    }

    #[test]
    fn mutated_states_never_panic(
        state in state_strategy(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
    ) {
        let mut bytes = state.to_json_bytes();
        for (i, b) in edits {
            let k = i.index(bytes.len());
            bytes[k] = b;
        }
        if let Ok(s) = parse_quant_state(&bytes) {
            prop_assert!(s.n_elements().is_some());
            prop_assert!(!s.shape.is_empty());
        }
    }
}
