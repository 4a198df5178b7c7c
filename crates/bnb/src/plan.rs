//! Planning: which source tensor becomes which output tensors, decided from the source's tensor
//! list alone (plus, for dequantization, the small quant-state blobs).

use std::collections::{BTreeMap, HashSet};
use std::io;

use detect::Precision;
use detect::detection::{BNB_QUANT_STATE_MARK, BnbKeys, BnbQuantType};
use tensorfile::cast::is_cast_source;
use tensorfile::safetensors::Dtype;
use tensorfile::{SourceTensor, TensorSource, TensorSpec};

use crate::error::BnbError;
use crate::kernels::{BLOCKSIZE, NESTED_BLOCKSIZE, QuantType};
use crate::quant_state::{
    MAX_QUANT_STATE_LEN, NestedJson, QuantStateJson, parse_quant_state, reserved_json_len,
};

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
    /// The source tensors the plan was made from: a conversion refuses a source serving others.
    pub(crate) tensors: Vec<SourceTensor>,
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

    /// Bytes of the source file the plan reads (the [`SourceTensor::source_bytes`] of every
    /// tensor it reads): the total of a conversion's progress.
    pub fn source_bytes(&self) -> u64 {
        self.steps
            .iter()
            .flat_map(Step::sources)
            .map(|i| self.tensors[i].source_bytes)
            .sum()
    }
}

/// One unit of work; produces consecutive entries of [`Plan::specs`]. Tensors are positions in
/// the source's tensor list ([`Plan::tensors`]).
#[derive(Debug, Clone)]
pub(crate) enum Step {
    /// A 2-D weight to NF4/FP4: `weight`, `absmax`, `quant_map`, [`nested_absmax`,
    /// `nested_quant_map`], quant-state JSON of `json_len` bytes.
    Quant4 {
        src: usize,
        state: QuantStateJson,
        json_len: usize,
    },
    /// A 2-D weight to LLM.int8: `weight` (I8), `SCB`, `weight_format`.
    Int8 { src: usize },
    /// A float tensor cast to another float dtype (torch rounding).
    Cast { src: usize, dst: Dtype },
    /// Bytes copied unchanged.
    Copy { src: usize },
    /// A packed 4-bit weight decoded to `dst`.
    Dequant4 {
        weight: usize,
        absmax: usize,
        /// `nested_absmax`, `nested_quant_map`.
        nested: Option<(usize, usize)>,
        /// Read by the planner; the converter uses `state`.
        aux: Vec<usize>,
        state: QuantStateJson,
        dst: Dtype,
    },
    /// An int8 weight and its `SCB` decoded to `dst`.
    DequantInt8 {
        weight: usize,
        scb: usize,
        aux: Vec<usize>,
        dst: Dtype,
    },
}

impl Step {
    /// The source tensors this step reads or accounts for.
    pub(crate) fn sources(&self) -> Vec<usize> {
        match self {
            Step::Quant4 { src, .. }
            | Step::Int8 { src }
            | Step::Cast { src, .. }
            | Step::Copy { src } => vec![*src],
            Step::Dequant4 {
                weight,
                absmax,
                nested,
                aux,
                ..
            } => {
                let mut v = vec![*weight, *absmax];
                if let Some((a, b)) = nested {
                    v.extend([*a, *b]);
                }
                v.extend(aux);
                v
            }
            Step::DequantInt8 {
                weight, scb, aux, ..
            } => {
                let mut v = vec![*weight, *scb];
                v.extend(aux);
                v
            }
        }
    }

    /// How many consecutive entries of [`Plan::specs`] this step writes.
    pub(crate) fn outputs(&self) -> usize {
        match self {
            Step::Quant4 { state, .. } if state.nested.is_some() => 6,
            Step::Quant4 { .. } => 4,
            Step::Int8 { .. } => 3,
            _ => 1,
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
pub fn is_quantized_weight(t: &SourceTensor) -> bool {
    let Some(module) = t.name.strip_suffix(".weight") else {
        return false;
    };
    t.shape.len() == 2
        && t.shape.iter().all(|&d| d > 0)
        && is_cast_source(t.dtype)
        && !module.is_empty()
        && !is_embedding_module(module)
}

/// The bitsandbytes keys among `tensors`, as `detect` reads them.
fn bnb_keys(tensors: &[SourceTensor]) -> BnbKeys {
    BnbKeys::parse(tensors.iter().map(|t| (t.name.as_str(), t.dtype)))
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

/// Whether a float tensor that is not quantized is written in the float dtype (cast or copied);
/// fp8 and non-float tensors are copied as they are.
fn takes_float_dtype(d: Dtype) -> bool {
    is_cast_source(d) && !matches!(d, Dtype::F8E4M3 | Dtype::F8E5M2)
}

/// Plans quantizing the model `source` to `target` (nf4, fp4 or int8), from the tensors it
/// serves (a scaled-fp8 source serves its weights de-scaled, as F32, and hides the scales and
/// marker, which the output thus drops).
///
/// Quantized: every [`is_quantized_weight`] tensor. Everything else float is written in
/// [`tensorfile::source::compute_dtype`] (so an f32 model gets bf16 biases and norms), F8 and integer tensors are
/// copied. 4-bit weights are first cast to the compute dtype (as Forge loads them) and their
/// quant state records it; int8 weights are cast to fp16 (as bnb's `Int8Params` does).
pub fn plan(
    source: &dyn TensorSource,
    target: Precision,
    options: &Options,
) -> Result<Plan, BnbError> {
    plan_quantize(source.tensors(), target, options).map_err(|e| e.in_file(source.path()))
}

fn plan_quantize(
    tensors: &[SourceTensor],
    target: Precision,
    options: &Options,
) -> Result<Plan, BnbError> {
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
    let keys = bnb_keys(tensors);
    let first_key = keys
        .quant_states
        .iter()
        .map(|k| k.index)
        .chain(keys.int8.iter().map(|k| k.scb))
        .min();
    if let Some(i) = first_key {
        return Err(BnbError::tensor(
            &tensors[i].name,
            "the source is already bitsandbytes-quantized; dequantize it first",
        ));
    }
    let cdt = tensorfile::source::compute_dtype(tensors);
    let mut specs = Vec::new();
    let mut steps = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
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
                        format!("{w}{BNB_QUANT_STATE_MARK}{}", qt.name()),
                        Dtype::U8,
                        vec![json_len as u64],
                    ));
                    steps.push(Step::Quant4 {
                        src: i,
                        state,
                        json_len,
                    });
                }
                None => {
                    specs.push(spec(&t.name, Dtype::I8, t.shape.clone()));
                    specs.push(spec(format!("{prefix}.SCB"), Dtype::F32, vec![t.shape[0]]));
                    specs.push(spec(format!("{prefix}.weight_format"), Dtype::U8, vec![]));
                    steps.push(Step::Int8 { src: i });
                }
            }
        } else if takes_float_dtype(t.dtype) {
            specs.push(spec(&t.name, cdt, t.shape.clone()));
            steps.push(if t.dtype == cdt {
                Step::Copy { src: i }
            } else {
                Step::Cast { src: i, dst: cdt }
            });
        } else {
            specs.push(spec(&t.name, t.dtype, t.shape.clone()));
            steps.push(Step::Copy { src: i });
        }
    }
    check_unique(&specs)?;
    Ok(Plan {
        specs,
        target,
        double_quant: quant.is_some() && options.double_quant,
        float_dtype: cdt,
        tensors: tensors.to_vec(),
        steps,
    })
}

fn dequant_dtype(target: Precision) -> Result<Dtype, BnbError> {
    target
        .dequantization_dtype()
        .ok_or(BnbError::UnsupportedTarget {
            target,
            what: "dequantization",
        })
}

/// Plans dequantizing a bitsandbytes file to `target` (fp16, bf16 or fp32) from its tensor list
/// alone. This works for LLM.int8 files; 4-bit weights need their quant-state JSON (the
/// original shape is not in the header), so a file with any is refused here: use
/// [`plan_dequantize_file`].
pub fn plan_dequantize(tensors: &[SourceTensor], target: Precision) -> Result<Plan, BnbError> {
    plan_dequantize_with(tensors, target, &mut |_, t| {
        Err(BnbError::tensor(
            &t.name,
            "a 4-bit weight's shape is in its quant-state JSON: plan with plan_dequantize_file",
        ))
    })
}

/// Plans dequantizing the bitsandbytes file `source` to `target` (fp16, bf16 or fp32): every
/// NF4/FP4 and int8 weight becomes `P.weight` in `target`, the bnb auxiliaries (`absmax`,
/// `quant_map`, `nested_*`, `quant_state.*`, `SCB`, `weight_format`) are dropped, every other
/// F32/F16/BF16/F64 tensor is cast to `target`, the rest is copied.
pub fn plan_dequantize_file(
    source: &dyn TensorSource,
    target: Precision,
) -> Result<Plan, BnbError> {
    plan_dequantize_with(source.tensors(), target, &mut |index, t| {
        let len = t
            .byte_len()
            .filter(|&l| l <= MAX_QUANT_STATE_LEN as u64)
            .ok_or_else(|| {
                BnbError::tensor(
                    &t.name,
                    format!("more than the {MAX_QUANT_STATE_LEN}-byte limit of a quant state"),
                )
            })?;
        let mut bytes = vec![0u8; len as usize];
        source.read_raw(index, 0, &mut bytes)?;
        Ok(bytes)
    })
    .map_err(|e| e.in_file(source.path()))
}

/// Bytes of a tensor's quant-state JSON (its position and entry), read on demand.
type JsonReader<'a> = dyn FnMut(usize, &SourceTensor) -> Result<Vec<u8>, BnbError> + 'a;

fn expect_shape(t: &SourceTensor, dtype: Dtype, n: u64, what: &str) -> Result<(), BnbError> {
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

fn plan_dequantize_with(
    tensors: &[SourceTensor],
    target: Precision,
    read_json: &mut JsonReader<'_>,
) -> Result<Plan, BnbError> {
    let dst = dequant_dtype(target)?;
    let by_name: BTreeMap<&str, usize> = tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let keys = bnb_keys(tensors);
    // weight name -> its quant-state key
    let mut qs_of = BTreeMap::new();
    for k in &keys.quant_states {
        if qs_of.insert(k.weight.as_str(), k).is_some() {
            return Err(BnbError::tensor(&k.weight, "more than one quant-state key"));
        }
    }
    let mut consumed: HashSet<usize> = HashSet::new();
    let mut steps = BTreeMap::new();
    for (&w, &key) in &qs_of {
        let qs = &tensors[key.index];
        let qt = match key.quant_type {
            Some(BnbQuantType::Nf4) => QuantType::Nf4,
            Some(BnbQuantType::Fp4) => QuantType::Fp4,
            _ => {
                let suffix = &qs.name[w.len() + BNB_QUANT_STATE_MARK.len()..];
                return Err(BnbError::tensor(
                    &qs.name,
                    format!("unknown quant type `{}`", suffix.escape_debug()),
                ));
            }
        };
        if qs.dtype != Dtype::U8 || qs.shape.len() != 1 {
            return Err(BnbError::tensor(
                &qs.name,
                "quant state is not a 1-D U8 tensor",
            ));
        }
        let state = parse_quant_state(&read_json(key.index, qs)?).map_err(|e| match e {
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
        let weight_bytes = tensors[weight].byte_len().unwrap_or(u64::MAX);
        if weight_bytes != n.div_ceil(2) {
            return Err(BnbError::tensor(
                w,
                format!(
                    "{weight_bytes} bytes of packed codes, the quant state's shape {:?} needs {}",
                    state.shape,
                    n.div_ceil(2)
                ),
            ));
        }
        let blocks = n.div_ceil(state.blocksize);
        let absmax = get(format!("{w}.absmax"))?;
        let quant_map = get(format!("{w}.quant_map"))?;
        expect_shape(&tensors[quant_map], Dtype::F32, 16, "quant_map")?;
        let nested = match &state.nested {
            None => {
                expect_shape(&tensors[absmax], Dtype::F32, blocks, "absmax")?;
                None
            }
            Some(nj) => {
                expect_shape(
                    &tensors[absmax],
                    Dtype::U8,
                    blocks,
                    "double-quantized absmax",
                )?;
                let na = get(format!("{w}.nested_absmax"))?;
                expect_shape(
                    &tensors[na],
                    Dtype::F32,
                    blocks.div_ceil(nj.blocksize),
                    "nested_absmax",
                )?;
                let nm = get(format!("{w}.nested_quant_map"))?;
                expect_shape(&tensors[nm], Dtype::F32, 256, "nested_quant_map")?;
                Some((na, nm))
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
        if let Some(extra) = tensors
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
        consumed.extend(
            (0..tensors.len()).filter(|&i| i == weight || tensors[i].name.starts_with(&under)),
        );
        steps.insert(
            weight,
            Step::Dequant4 {
                weight,
                absmax,
                nested,
                aux: vec![quant_map, key.index],
                state,
                dst,
            },
        );
    }
    for k in &keys.int8 {
        if consumed.contains(&k.weight) {
            continue;
        }
        let (weight, scb) = (&tensors[k.weight], &tensors[k.scb]);
        if weight.shape.len() != 2 {
            return Err(BnbError::tensor(&weight.name, "an int8 weight must be 2-D"));
        }
        expect_shape(scb, Dtype::F32, weight.shape[0], "SCB")?;
        let prefix = scb.name.strip_suffix(".SCB").unwrap_or(&scb.name);
        let mut aux = Vec::new();
        if let Some(&wf) = by_name.get(format!("{prefix}.weight_format").as_str()) {
            aux.push(wf);
            consumed.insert(wf);
        }
        consumed.extend([k.scb, k.weight]);
        steps.insert(
            k.weight,
            Step::DequantInt8 {
                weight: k.weight,
                scb: k.scb,
                aux,
                dst,
            },
        );
    }
    if steps.is_empty() {
        return Err(BnbError::tensor(
            "",
            "no bitsandbytes-quantized tensor (quant_state.bitsandbytes__* or int8 weight + SCB)",
        ));
    }
    let mut plan_steps = Vec::new();
    let mut specs = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        if let Some(step) = steps.remove(&i) {
            let shape = match &step {
                Step::Dequant4 { state, .. } => state.shape.clone(),
                _ => t.shape.clone(),
            };
            specs.push(spec(&t.name, dst, shape));
            plan_steps.push(step);
        } else if consumed.contains(&i) {
            continue;
        } else if takes_float_dtype(t.dtype) {
            specs.push(spec(&t.name, dst, t.shape.clone()));
            plan_steps.push(if t.dtype == dst {
                Step::Copy { src: i }
            } else {
                Step::Cast { src: i, dst }
            });
        } else {
            specs.push(spec(&t.name, t.dtype, t.shape.clone()));
            plan_steps.push(Step::Copy { src: i });
        }
    }
    check_unique(&specs)?;
    Ok(Plan {
        specs,
        target,
        double_quant: false,
        float_dtype: dst,
        tensors: tensors.to_vec(),
        steps: plan_steps,
    })
}
