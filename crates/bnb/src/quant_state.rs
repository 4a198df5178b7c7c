//! The packed quant-state JSON (`P.weight.quant_state.bitsandbytes__nf4|fp4`): writing it byte
//! for byte as bitsandbytes does, and parsing it defensively.

use serde_json::Value;
use tensorfile::safetensors::Dtype;

use crate::error::BnbError;
use crate::kernels::QuantType;

/// The largest quant-state blob accepted. Real ones are under 200 bytes.
pub const MAX_QUANT_STATE_LEN: usize = 64 * 1024;
/// The largest rank accepted in `shape`.
pub const MAX_RANK: usize = tensorfile::safetensors::MAX_RANK;
/// Block sizes bnb accepts.
pub const VALID_BLOCKSIZES: [u64; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// The non-tensor fields of a 4-bit `QuantState`, as `QuantState.as_dict(packed=True)` packs them.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantStateJson {
    /// `quant_type`.
    pub quant_type: QuantType,
    /// `blocksize` (elements per absmax).
    pub blocksize: u64,
    /// `dtype`: the dtype of the weight before quantization and of its dequantization (F16,
    /// BF16 or F32).
    pub dtype: Dtype,
    /// `shape`: the original weight's shape.
    pub shape: Vec<u64>,
    /// The double-quantization fields, when absmax is double-quantized.
    pub nested: Option<NestedJson>,
}

/// `nested_blocksize`, `nested_dtype` and `nested_offset`.
#[derive(Debug, Clone, PartialEq)]
pub struct NestedJson {
    /// `nested_blocksize` (bnb: 256).
    pub blocksize: u64,
    /// `nested_offset`: the mean subtracted from absmax before double quantization (an f32
    /// widened to f64 by bnb).
    pub offset: f64,
}

/// torch's name for a float dtype (`str(dtype)` minus `torch.`).
pub fn torch_dtype_name(d: Dtype) -> Option<&'static str> {
    match d {
        Dtype::F16 => Some("float16"),
        Dtype::BF16 => Some("bfloat16"),
        Dtype::F32 => Some("float32"),
        _ => None,
    }
}

fn dtype_from_torch_name(s: &str) -> Option<Dtype> {
    match s {
        "float16" => Some(Dtype::F16),
        "bfloat16" => Some(Dtype::BF16),
        "float32" => Some(Dtype::F32),
        _ => None,
    }
}

/// Python's `repr(float)` as `json.dumps` writes it: shortest round-trip digits; positional
/// notation when the decimal exponent is in [-4, 16), else `d.ddde±XX`; `.0` on integral
/// values; `NaN`, `Infinity`, `-Infinity` for the non-finite.
pub fn python_float_repr(v: f64) -> String {
    if v.is_nan() {
        return "NaN".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if v == 0.0 {
        return if v.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    // Rust's `{:e}` prints the shortest round-trip digits ("-1.2345e-5"), but breaks an exact
    // tie between two shortest candidates upwards where Python takes the even one
    // (0.063327789306640625 is "...063" in Rust, "...062" in Python). Re-printing at that many
    // significant digits with `{:.N$e}` rounds the exact value half to even, like Python.
    let shortest = format!("{v:e}");
    let n_digits = shortest
        .split_once('e')
        .map_or(shortest.as_str(), |(m, _)| m)
        .chars()
        .filter(char::is_ascii_digit)
        .count();
    let sci = format!("{v:.*e}", n_digits.saturating_sub(1));
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let mut out = String::from(sign);
    if (-4..16).contains(&exp) {
        if exp < 0 {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', (-exp - 1) as usize));
            out.push_str(&digits);
        } else {
            let int_len = exp as usize + 1;
            if digits.len() <= int_len {
                out.push_str(&digits);
                out.extend(std::iter::repeat_n('0', int_len - digits.len()));
                out.push_str(".0");
            } else {
                out.push_str(&digits[..int_len]);
                out.push('.');
                out.push_str(&digits[int_len..]);
            }
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        out.push_str(&format!(
            "e{}{:02}",
            if exp < 0 { '-' } else { '+' },
            exp.abs()
        ));
    }
    out
}

/// The longest `python_float_repr` of an f32 widened to f64 ("-1.2345678901234567e-38" is 23).
pub const MAX_FLOAT_REPR_LEN: usize = 24;

impl QuantStateJson {
    /// The JSON bytes exactly as `json.dumps` writes bnb's dict: `", "` and `": "` separators,
    /// bnb's key order, no trailing newline.
    pub fn to_json_bytes(&self) -> Vec<u8> {
        let shape: Vec<String> = self.shape.iter().map(u64::to_string).collect();
        let mut s = format!(
            "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
            self.quant_type.name(),
            self.blocksize,
            torch_dtype_name(self.dtype).unwrap_or("float32"),
            shape.join(", ")
        );
        if let Some(n) = &self.nested {
            s.push_str(&format!(
                ", \"nested_blocksize\": {}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
                n.blocksize,
                python_float_repr(n.offset)
            ));
        }
        s.push('}');
        s.into_bytes()
    }

    /// Number of elements of `shape` (checked).
    pub fn n_elements(&self) -> Option<u64> {
        self.shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d))
    }
}

/// The length [`QuantStateJson::to_json_bytes`] can reach for this state whatever the nested
/// offset's value: used to size the tensor before the offset is known.
pub fn reserved_json_len(state: &QuantStateJson) -> usize {
    let mut s = state.clone();
    if let Some(n) = &mut s.nested {
        n.offset = 0.0; // "0.0": 3 bytes
        return s.to_json_bytes().len() - 3 + MAX_FLOAT_REPR_LEN;
    }
    s.to_json_bytes().len()
}

fn bad(problem: impl Into<String>) -> BnbError {
    BnbError::QuantState {
        problem: problem.into(),
    }
}

fn get_u64(v: &Value, key: &str) -> Result<u64, BnbError> {
    v.as_u64()
        .ok_or_else(|| bad(format!("`{key}` is not a non-negative integer")))
}

/// Parses a quant-state blob (`P.weight.quant_state.bitsandbytes__*` bytes).
///
/// Accepts what bnb's `QuantState.from_dict` accepts for 4-bit weights that convcache can
/// decode (f32 nested absmax) and refuses the rest with a message naming the field: unknown
/// keys, a missing field, a `quant_type` other than nf4/fp4, a block size bnb does not allow, a
/// dtype that is not float16/bfloat16/float32, an empty or over-long shape or one whose element
/// count overflows, or a blob longer than [`MAX_QUANT_STATE_LEN`]. Never panics.
pub fn parse_quant_state(bytes: &[u8]) -> Result<QuantStateJson, BnbError> {
    if bytes.len() > MAX_QUANT_STATE_LEN {
        return Err(bad(format!(
            "{} bytes, more than the {MAX_QUANT_STATE_LEN}-byte limit",
            bytes.len()
        )));
    }
    let value: Value =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let obj = value.as_object().ok_or_else(|| bad("not a JSON object"))?;
    const KNOWN: [&str; 7] = [
        "quant_type",
        "blocksize",
        "dtype",
        "shape",
        "nested_blocksize",
        "nested_dtype",
        "nested_offset",
    ];
    if let Some(k) = obj.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(bad(format!("unknown key `{}`", k.escape_debug())));
    }
    let field = |k: &str| obj.get(k).ok_or_else(|| bad(format!("missing `{k}`")));
    let qt_str = field("quant_type")?
        .as_str()
        .ok_or_else(|| bad("`quant_type` is not a string"))?;
    let quant_type = QuantType::from_name(qt_str)
        .ok_or_else(|| bad(format!("unknown quant_type `{}`", qt_str.escape_debug())))?;
    let blocksize = get_u64(field("blocksize")?, "blocksize")?;
    if !VALID_BLOCKSIZES.contains(&blocksize) {
        return Err(bad(format!("blocksize {blocksize} is not one bnb allows")));
    }
    let dtype_str = field("dtype")?
        .as_str()
        .ok_or_else(|| bad("`dtype` is not a string"))?;
    let dtype = dtype_from_torch_name(dtype_str).ok_or_else(|| {
        bad(format!(
            "dtype `{}` is not float16, bfloat16 or float32",
            dtype_str.escape_debug()
        ))
    })?;
    let shape_v = field("shape")?
        .as_array()
        .ok_or_else(|| bad("`shape` is not a list"))?;
    if shape_v.is_empty() || shape_v.len() > MAX_RANK {
        return Err(bad(format!(
            "shape has {} dimensions (1 to {MAX_RANK} accepted)",
            shape_v.len()
        )));
    }
    let shape = shape_v
        .iter()
        .map(|d| get_u64(d, "shape"))
        .collect::<Result<Vec<u64>, _>>()?;
    let nested_keys = ["nested_blocksize", "nested_dtype", "nested_offset"];
    let present = nested_keys.iter().filter(|k| obj.contains_key(**k)).count();
    let nested = match present {
        0 => None,
        3 => {
            let nb = get_u64(field("nested_blocksize")?, "nested_blocksize")?;
            if !VALID_BLOCKSIZES.contains(&nb) {
                return Err(bad(format!("nested_blocksize {nb} is not one bnb allows")));
            }
            if field("nested_dtype")?.as_str() != Some("float32") {
                return Err(bad("nested_dtype is not `float32`"));
            }
            let offset = field("nested_offset")?
                .as_f64()
                .ok_or_else(|| bad("`nested_offset` is not a number"))?;
            Some(NestedJson {
                blocksize: nb,
                offset,
            })
        }
        _ => {
            return Err(bad(
                "nested_blocksize, nested_dtype and nested_offset must appear together",
            ));
        }
    };
    let state = QuantStateJson {
        quant_type,
        blocksize,
        dtype,
        shape,
        nested,
    };
    if state.n_elements().is_none() {
        return Err(bad("shape's element count overflows"));
    }
    Ok(state)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn python_repr_matches_known_outputs() {
        // Expected strings are Python 3's `repr(float(x))`.
        for (v, s) in [
            (0.12822723388671875, "0.12822723388671875"),
            (0.028394877910614014, "0.028394877910614014"),
            (2.4563801288604736, "2.4563801288604736"),
            (1e-5, "1e-05"),
            (1.5e-5, "1.5e-05"),
            (0.0001, "0.0001"),
            (2.0, "2.0"),
            (100.0, "100.0"),
            (1e16, "1e+16"),
            (1.2345e20, "1.2345e+20"),
            (9999999999999998.0, "9999999999999998.0"),
            (-0.5, "-0.5"),
            (f64::from(f32::from_bits(1)), "1.401298464324817e-45"),
            (f64::from(1e-38f32), "9.999999350456404e-39"),
        ] {
            assert_eq!(python_float_repr(v), s, "{v:e}");
        }
    }

    #[test]
    fn writes_bnb_bytes_and_parses_them_back() {
        let s = QuantStateJson {
            quant_type: QuantType::Nf4,
            blocksize: 64,
            dtype: Dtype::BF16,
            shape: vec![3072, 3072],
            nested: None,
        };
        let b = s.to_json_bytes();
        assert_eq!(
            b,
            br#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [3072, 3072]}"#
        );
        assert_eq!(b.len(), 82);
        assert_eq!(parse_quant_state(&b).unwrap(), s);
        let n = QuantStateJson {
            nested: Some(NestedJson {
                blocksize: 256,
                offset: 0.028394877910614014,
            }),
            ..s
        };
        let b = n.to_json_bytes();
        assert_eq!(b.len(), 173);
        assert_eq!(parse_quant_state(&b).unwrap(), n);
        assert!(b.len() <= reserved_json_len(&n));
    }

    #[test]
    fn refuses_hostile_blobs() {
        for bad in [
            &b""[..],
            b"[]",
            b"{}",
            b"{\"quant_type\": \"nf4\"}",
            br#"{"quant_type": "nf5", "blocksize": 64, "dtype": "bfloat16", "shape": [1]}"#,
            br#"{"quant_type": "nf4", "blocksize": 63, "dtype": "bfloat16", "shape": [1]}"#,
            br#"{"quant_type": "nf4", "blocksize": 64, "dtype": "int8", "shape": [1]}"#,
            br#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": []}"#,
            br#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [-1]}"#,
            br#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [4294967296, 4294967296]}"#,
            br#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [1], "x": 1}"#,
            br#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [1], "nested_offset": 1.0}"#,
            b"{\"a\": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
            &[0xff, 0xfe, 0x00][..],
        ] {
            assert!(parse_quant_state(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let deep = "[".repeat(100_000);
        assert!(parse_quant_state(deep.as_bytes()).is_err());
    }
}
