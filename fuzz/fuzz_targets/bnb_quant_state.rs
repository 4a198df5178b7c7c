//! Fuzzes the bitsandbytes quant-state JSON parser on arbitrary bytes: it must return a typed
//! error or a state that convcache can use, never panic. An accepted state must have a
//! checked element count, fit the reserved blob length the writer sizes tensors with, and
//! survive a write/parse round trip unchanged (the writer's bytes are what bnb reads back).
#![no_main]

use bnb::quant_state::{MAX_QUANT_STATE_LEN, parse_quant_state, reserved_json_len};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match parse_quant_state(data) {
        Ok(state) => {
            assert!(data.len() <= MAX_QUANT_STATE_LEN);
            assert!(state.n_elements().is_some());
            assert!(!state.shape.is_empty());
            let bytes = state.to_json_bytes();
            if state.nested.as_ref().is_none_or(|n| n.offset.is_finite()) {
                // A nested offset that is not an f32 value widened to f64 may print longer than
                // the reserved length; bnb only ever writes f32 offsets.
                let f32_offset = state
                    .nested
                    .as_ref()
                    .is_none_or(|n| f64::from(n.offset as f32) == n.offset);
                if f32_offset {
                    assert!(bytes.len() <= reserved_json_len(&state));
                }
                let again = parse_quant_state(&bytes).expect("the writer's own bytes parse");
                assert_eq!(again, state);
            }
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
        }
    }
});
