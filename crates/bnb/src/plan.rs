//! Planning: which source tensor becomes which output tensors, decided from the header alone
//! (plus, for dequantization, the small quant-state blobs).

use std::collections::{BTreeMap, HashSet};
use std::io;

use detect::Precision;
use tensorfile::TensorSpec;
use tensorfile::cast::is_cast_source;
use tensorfile::safetensors::{Dtype, Header, SafetensorsFile, TensorEntry};

use crate::error::BnbError;
use crate::kernels::{BLOCKSIZE, NESTED_BLOCKSIZE, QuantType};
use crate::quant_state::{NestedJson, QuantStateJson, parse_quant_state, reserved_json_len};

/// Quantization options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// Double-quantize absmax (bnb `compress_statistics=True`, nested blocksize 256). Off by
    /// default, as in Forge's current ("v2") Flux files.
    pub double_quant: bool,
}

/// What the converter will write, tensor by tensor.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Every output tensor, in file order.
    pub specs: Vec<TensorSpec>,
    /// The target precision (nf4/fp4/int8, or fp16/bf16/fp32 for a dequantization).
    pub target: Precision,
    /// Whether absmax is double-quantized.
    pub double_quant: bool,
    /// Quantization: the 16-bit dtype every unquantized float tensor is written in and every
    /// 4-bit weight records as its `dtype`. Dequantization: the output float dtype.
    pub float_dtype: Dtype,
    pub(crate) steps: Vec<Step>,
}

impl Plan {
    /// The exact size of the output file with this `metadata`.
    pub fn output_len(&self, metadata: &BTreeMap<String, String>) -> io::Result<u64> {
        tensorfile::safetensors::writer::output_len(&self.specs, metadata)
    }

    /// Number of source tensors the plan reads.
    pub fn source_tensors(&self) -> u64 {
        self.steps.iter().map(|s| s.sources().len() as u64).sum()
    }
}

/// One unit of work; produces consecutive entries of [`Plan::specs`].
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // one per tensor; boxing buys nothing
pub(crate) enum Step {
    /// A 2-D weight to NF4/FP4: `weight`, `absmax`, `quant_map`, [`nested_absmax`,
    /// `nested_quant_map`], quant-state JSON of `json_len` bytes.
    Quant4 {
        src: TensorEntry,
        state: QuantStateJson,
        json_len: usize,
    },
    /// A 2-D weight to LLM.int8: `weight` (I8), `SCB`, `weight_format`.
    Int8 { src: TensorEntry },
    /// A float tensor cast to another float dtype (torch rounding).
    Cast { src: TensorEntry, dst: Dtype },
    /// Bytes copied unchanged.
    Copy { src: TensorEntry },
    /// A packed 4-bit weight decoded to `dst`.
    Dequant4 {
        weight: TensorEntry,
        absmax: TensorEntry,
        /// `nested_absmax`, `nested_quant_map`.
        nested: Option<(TensorEntry, TensorEntry)>,
        /// Read by the planner; the converter uses `state`.
        aux: Vec<TensorEntry>,
        state: QuantStateJson,
        dst: Dtype,
    },
    /// An int8 weight and its `SCB` decoded to `dst`.
    DequantInt8 {
        weight: TensorEntry,
        scb: TensorEntry,
        aux: Vec<TensorEntry>,
        dst: Dtype,
    },
}

impl Step {
    /// The source tensors this step reads or accounts for.
    pub(crate) fn sources(&self) -> Vec<&TensorEntry> {
        match self {
            Step::Quant4 { src, .. }
            | Step::Int8 { src }
            | Step::Cast { src, .. }
            | Step::Copy { src } => vec![src],
            Step::Dequant4 {
                weight,
                absmax,
                nested,
                aux,
                ..
            } => {
                let mut v = vec![weight, absmax];
                if let Some((a, b)) = nested {
                    v.extend([a, b]);
                }
                v.extend(aux);
                v
            }
            Step::DequantInt8 {
                weight, scb, aux, ..
            } => {
                let mut v = vec![weight, scb];
                v.extend(aux);
                v
            }
        }
    }
}

/// Module names (the key minus `.weight`) whose last part marks an embedding table, which
/// bnb loaders keep in float (Forge swaps only `nn.Linear`).
fn is_embedding_module(module: &str) -> bool {
    let last = module.rsplit('.').next().unwrap_or(module);
    last.contains("embedding")
        || matches!(
            last,
            "wte"
                | "wpe"
                | "embed_tokens"
                | "embed_positions"
                | "shared"
                | "relative_attention_bias"
        )
}

/// Whether a tensor is quantized: a 2-D `*.weight` of a float dtype we can read, not an
/// embedding. These are the `nn.Linear` weights; Flux's embedders (`img_in`, `txt_in`,
/// `time_in.*`, `vector_in.*`, `guidance_in.*`) are Linears and are included, as in Forge.
/// Convolutions (4-D), norms and biases (1-D) never match.
pub fn is_quantized_weight(t: &TensorEntry) -> bool {
    let Some(module) = t.name.strip_suffix(".weight") else {
        return false;
    };
    t.shape.len() == 2
        && t.shape.iter().all(|&d| d > 0)
        && is_cast_source(t.dtype)
        && !module.is_empty()
        && !is_embedding_module(module)
}

/// The 16-bit dtype of a quantized file: the source's dominant 16-bit float dtype, bf16 when the
/// source has no 16-bit floats (f32).
pub fn compute_dtype(header: &Header) -> Dtype {
    let count = |d: Dtype| -> u64 {
        header
            .tensors
            .iter()
            .filter(|t| t.dtype == d)
            .map(TensorEntry::n_elements)
            .fold(0u64, u64::saturating_add)
    };
    if count(Dtype::F16) > count(Dtype::BF16) {
        Dtype::F16
    } else {
        Dtype::BF16
    }
}

/// The suffix of a bnb 4-bit quant-state key.
pub(crate) const QS_MARK: &str = ".quant_state.bitsandbytes__";

/// Whether `header` holds bitsandbytes-quantized tensors (4-bit quant states or int8 `SCB`).
pub fn is_bitsandbytes(header: &Header) -> bool {
    header.tensors.iter().any(|t| {
        t.name.contains(QS_MARK)
            || (t.name.ends_with(".SCB")
                && header
                    .tensor(&format!("{}.weight", t.name.trim_end_matches(".SCB")))
                    .is_some_and(|w| w.dtype == Dtype::I8))
    })
}

fn spec(name: impl Into<String>, dtype: Dtype, shape: Vec<u64>) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        dtype,
        shape,
    }
}

fn check_unique(specs: &[TensorSpec]) -> Result<(), BnbError> {
    let mut seen = HashSet::new();
    for s in specs {
        if !seen.insert(s.name.as_str()) {
            return Err(BnbError::tensor(
                &s.name,
                "two output tensors would have this name (the source already has a \
                 bitsandbytes auxiliary key)",
            ));
        }
    }
    Ok(())
}

/// Plans quantizing a safetensors model to `target` (nf4, fp4 or int8).
///
/// Quantized: every [`is_quantized_weight`] tensor. Everything else float is written in
/// [`compute_dtype`] (so an f32 model gets bf16 biases and norms), F8 and integer tensors are
/// copied. 4-bit weights are first cast to the compute dtype (as Forge loads them) and their
/// quant state records it; int8 weights are cast to fp16 (as bnb's `Int8Params` does).
pub fn plan(header: &Header, target: Precision, options: &Options) -> Result<Plan, BnbError> {
    let quant = match target {
        Precision::Nf4 => Some(QuantType::Nf4),
        Precision::Fp4 => Some(QuantType::Fp4),
        Precision::Int8 => None,
        _ => {
            return Err(BnbError::UnsupportedTarget {
                target,
                what: "quantization",
            });
        }
    };
    if is_bitsandbytes(header) {
        return Err(BnbError::tensor(
            header
                .tensors
                .iter()
                .find(|t| t.name.contains(QS_MARK) || t.name.ends_with(".SCB"))
                .map_or("", |t| t.name.as_str()),
            "the source is already bitsandbytes-quantized; dequantize it first",
        ));
    }
    let cdt = compute_dtype(header);
    let mut specs = Vec::new();
    let mut steps = Vec::new();
    for t in &header.tensors {
        if is_quantized_weight(t) {
            let n = t.n_elements();
            let prefix = t.name.strip_suffix(".weight").unwrap_or(&t.name);
            match quant {
                Some(qt) => {
                    let blocks = n.div_ceil(BLOCKSIZE as u64);
                    let w = &t.name;
                    specs.push(spec(w, Dtype::U8, vec![n.div_ceil(2), 1]));
                    let state = QuantStateJson {
                        quant_type: qt,
                        blocksize: BLOCKSIZE as u64,
                        dtype: cdt,
                        shape: t.shape.clone(),
                        nested: options.double_quant.then_some(NestedJson {
                            blocksize: NESTED_BLOCKSIZE as u64,
                            offset: 0.0,
                        }),
                    };
                    let json_len = reserved_json_len(&state);
                    if options.double_quant {
                        specs.push(spec(format!("{w}.absmax"), Dtype::U8, vec![blocks]));
                        specs.push(spec(format!("{w}.quant_map"), Dtype::F32, vec![16]));
                        specs.push(spec(
                            format!("{w}.nested_absmax"),
                            Dtype::F32,
                            vec![blocks.div_ceil(NESTED_BLOCKSIZE as u64)],
                        ));
                        specs.push(spec(format!("{w}.nested_quant_map"), Dtype::F32, vec![256]));
                    } else {
                        specs.push(spec(format!("{w}.absmax"), Dtype::F32, vec![blocks]));
                        specs.push(spec(format!("{w}.quant_map"), Dtype::F32, vec![16]));
                    }
                    specs.push(spec(
                        format!("{w}{QS_MARK}{}", qt.name()),
                        Dtype::U8,
                        vec![json_len as u64],
                    ));
                    steps.push(Step::Quant4 {
                        src: t.clone(),
                        state,
                        json_len,
                    });
                }
                None => {
                    specs.push(spec(&t.name, Dtype::I8, t.shape.clone()));
                    specs.push(spec(format!("{prefix}.SCB"), Dtype::F32, vec![t.shape[0]]));
                    specs.push(spec(format!("{prefix}.weight_format"), Dtype::U8, vec![]));
                    steps.push(Step::Int8 { src: t.clone() });
                }
            }
        } else if is_cast_source(t.dtype) && !matches!(t.dtype, Dtype::F8E4M3 | Dtype::F8E5M2) {
            specs.push(spec(&t.name, cdt, t.shape.clone()));
            steps.push(if t.dtype == cdt {
                Step::Copy { src: t.clone() }
            } else {
                Step::Cast {
                    src: t.clone(),
                    dst: cdt,
                }
            });
        } else {
            specs.push(spec(&t.name, t.dtype, t.shape.clone()));
            steps.push(Step::Copy { src: t.clone() });
        }
    }
    check_unique(&specs)?;
    Ok(Plan {
        specs,
        target,
        double_quant: quant.is_some() && options.double_quant,
        float_dtype: cdt,
        steps,
    })
}

fn dequant_dtype(target: Precision) -> Result<Dtype, BnbError> {
    match target {
        Precision::Fp16 => Ok(Dtype::F16),
        Precision::Bf16 => Ok(Dtype::BF16),
        Precision::Fp32 => Ok(Dtype::F32),
        _ => Err(BnbError::UnsupportedTarget {
            target,
            what: "dequantization",
        }),
    }
}

/// Plans dequantizing a bitsandbytes file to `target` (fp16, bf16 or fp32) from its header
/// alone. This works for LLM.int8 files; 4-bit weights need their quant-state JSON (the
/// original shape is not in the header), so a file with any is refused here: use
/// [`plan_dequantize_file`].
pub fn plan_dequantize(header: &Header, target: Precision) -> Result<Plan, BnbError> {
    plan_dequantize_with(header, target, &mut |t: &TensorEntry| {
        Err(BnbError::tensor(
            &t.name,
            "a 4-bit weight's shape is in its quant-state JSON: plan with plan_dequantize_file",
        ))
    })
}

/// Plans dequantizing the bitsandbytes file `src` to `target` (fp16, bf16 or fp32): every
/// NF4/FP4 and int8 weight becomes `P.weight` in `target`, the bnb auxiliaries (`absmax`,
/// `quant_map`, `nested_*`, `quant_state.*`, `SCB`, `weight_format`) are dropped, every other
/// F32/F16/BF16/F64 tensor is cast to `target`, the rest is copied.
pub fn plan_dequantize_file(src: &SafetensorsFile, target: Precision) -> Result<Plan, BnbError> {
    plan_dequantize_with(&src.header, target, &mut |t: &TensorEntry| {
        Ok(src.tensor_bytes(t).to_vec())
    })
    .map_err(|e| e.in_file(&src.path))
}

/// Bytes of a tensor's quant-state JSON, read on demand.
type JsonReader<'a> = dyn FnMut(&TensorEntry) -> Result<Vec<u8>, BnbError> + 'a;

fn expect_shape(t: &TensorEntry, dtype: Dtype, n: u64, what: &str) -> Result<(), BnbError> {
    if t.dtype != dtype || t.n_elements() != n {
        return Err(BnbError::tensor(
            &t.name,
            format!(
                "{what} should be {dtype} with {n} elements, found {} {:?}",
                t.dtype, t.shape
            ),
        ));
    }
    Ok(())
}

pub(crate) fn plan_dequantize_with(
    header: &Header,
    target: Precision,
    read_json: &mut JsonReader<'_>,
) -> Result<Plan, BnbError> {
    let dst = dequant_dtype(target)?;
    let by_name: BTreeMap<&str, &TensorEntry> = header
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    // weight name -> its quant-state entry
    let mut qs_of: BTreeMap<&str, &TensorEntry> = BTreeMap::new();
    for t in &header.tensors {
        if let Some(pos) = t.name.find(QS_MARK) {
            let w = &t.name[..pos];
            if qs_of.insert(w, t).is_some() {
                return Err(BnbError::tensor(w, "more than one quant-state key"));
            }
        }
    }
    let mut consumed: HashSet<&str> = HashSet::new();
    let mut steps = Vec::new();
    for (&w, &qs) in &qs_of {
        let suffix = &qs.name[w.len() + QS_MARK.len()..];
        let qt = QuantType::from_name(suffix).ok_or_else(|| {
            BnbError::tensor(
                &qs.name,
                format!("unknown quant type `{}`", suffix.escape_debug()),
            )
        })?;
        if qs.dtype != Dtype::U8 || qs.shape.len() != 1 {
            return Err(BnbError::tensor(
                &qs.name,
                "quant state is not a 1-D U8 tensor",
            ));
        }
        let state = parse_quant_state(&read_json(qs)?).map_err(|e| match e {
            BnbError::QuantState { problem } => BnbError::tensor(&qs.name, problem),
            e => e,
        })?;
        if state.quant_type != qt {
            return Err(BnbError::tensor(
                &qs.name,
                format!(
                    "key says {} but the JSON says {}",
                    qt.name(),
                    state.quant_type.name()
                ),
            ));
        }
        let n = state.n_elements().unwrap_or(u64::MAX);
        let get = |k: String| {
            by_name
                .get(k.as_str())
                .copied()
                .ok_or_else(|| BnbError::tensor(&k, "missing (needed to dequantize)"))
        };
        let weight = get(w.to_string())?;
        if weight.byte_len() != n.div_ceil(2) {
            return Err(BnbError::tensor(
                w,
                format!(
                    "{} bytes of packed codes, the quant state's shape {:?} needs {}",
                    weight.byte_len(),
                    state.shape,
                    n.div_ceil(2)
                ),
            ));
        }
        let blocks = n.div_ceil(state.blocksize);
        let absmax = get(format!("{w}.absmax"))?;
        let quant_map = get(format!("{w}.quant_map"))?;
        expect_shape(quant_map, Dtype::F32, 16, "quant_map")?;
        let nested = match &state.nested {
            None => {
                expect_shape(absmax, Dtype::F32, blocks, "absmax")?;
                None
            }
            Some(nj) => {
                expect_shape(absmax, Dtype::U8, blocks, "double-quantized absmax")?;
                let na = get(format!("{w}.nested_absmax"))?;
                expect_shape(
                    na,
                    Dtype::F32,
                    blocks.div_ceil(nj.blocksize),
                    "nested_absmax",
                )?;
                let nm = get(format!("{w}.nested_quant_map"))?;
                expect_shape(nm, Dtype::F32, 256, "nested_quant_map")?;
                Some((na.clone(), nm.clone()))
            }
        };
        // bnb's loader gathers every key under `W.`; anything unexpected there is an error.
        let allowed: Vec<String> = [
            "absmax",
            "quant_map",
            "nested_absmax",
            "nested_quant_map",
            &qs.name[w.len() + 1..],
        ]
        .iter()
        .map(|s| format!("{w}.{s}"))
        .collect();
        let under = format!("{w}.");
        if let Some(extra) = header
            .tensors
            .iter()
            .find(|t| t.name.starts_with(&under) && !allowed.contains(&t.name))
        {
            return Err(BnbError::tensor(
                &extra.name,
                "unexpected key next to a 4-bit weight",
            ));
        }
        if state.nested.is_none() && by_name.contains_key(format!("{w}.nested_absmax").as_str()) {
            return Err(BnbError::tensor(
                w,
                "nested_absmax present but the quant state is not nested",
            ));
        }
        for t in header.tensors.iter().filter(|t| t.name.starts_with(&under)) {
            consumed.insert(t.name.as_str());
        }
        consumed.insert(w);
        steps.push((
            weight.name.clone(),
            Step::Dequant4 {
                weight: weight.clone(),
                absmax: absmax.clone(),
                nested,
                aux: vec![quant_map.clone(), qs.clone()],
                state,
                dst,
            },
        ));
    }
    for t in &header.tensors {
        let Some(prefix) = t.name.strip_suffix(".SCB") else {
            continue;
        };
        let wname = format!("{prefix}.weight");
        let Some(&weight) = by_name.get(wname.as_str()) else {
            continue;
        };
        if weight.dtype != Dtype::I8 || consumed.contains(wname.as_str()) {
            continue;
        }
        if weight.shape.len() != 2 {
            return Err(BnbError::tensor(&wname, "an int8 weight must be 2-D"));
        }
        expect_shape(t, Dtype::F32, weight.shape[0], "SCB")?;
        let mut aux = Vec::new();
        if let Some(&wf) = by_name.get(format!("{prefix}.weight_format").as_str()) {
            aux.push(wf.clone());
            consumed.insert(wf.name.as_str());
        }
        consumed.insert(t.name.as_str());
        consumed.insert(weight.name.as_str());
        steps.push((
            weight.name.clone(),
            Step::DequantInt8 {
                weight: weight.clone(),
                scb: t.clone(),
                aux,
                dst,
            },
        ));
    }
    if steps.is_empty() {
        return Err(BnbError::tensor(
            "",
            "no bitsandbytes-quantized tensor (quant_state.bitsandbytes__* or int8 weight + SCB)",
        ));
    }
    let mut by_weight: BTreeMap<String, Step> = steps.into_iter().collect();
    let mut plan_steps = Vec::new();
    let mut specs = Vec::new();
    for t in &header.tensors {
        if let Some(step) = by_weight.remove(&t.name) {
            let shape = match &step {
                Step::Dequant4 { state, .. } => state.shape.clone(),
                _ => t.shape.clone(),
            };
            specs.push(spec(&t.name, dst, shape));
            plan_steps.push(step);
        } else if consumed.contains(t.name.as_str()) {
            continue;
        } else if is_cast_source(t.dtype) && !matches!(t.dtype, Dtype::F8E4M3 | Dtype::F8E5M2) {
            specs.push(spec(&t.name, dst, t.shape.clone()));
            plan_steps.push(if t.dtype == dst {
                Step::Copy { src: t.clone() }
            } else {
                Step::Cast {
                    src: t.clone(),
                    dst,
                }
            });
        } else {
            specs.push(spec(&t.name, t.dtype, t.shape.clone()));
            plan_steps.push(Step::Copy { src: t.clone() });
        }
    }
    check_unique(&specs)?;
    Ok(Plan {
        specs,
        target,
        double_quant: false,
        float_dtype: dst,
        steps: plan_steps,
    })
}
