//! ComfyUI's scaled-fp8 layouts, and the view that serves their weights de-scaled.
//!
//! Two layouts put per-tensor float scales next to fp8 weights (see
//! `shared/reference/comfy-formats.md`, checked against ComfyUI's `comfy/utils.py` and
//! `comfy/quant_ops.py`):
//! - **legacy** (`scaled_fp8` marker tensor): `<layer>.weight` in fp8 with a float32
//!   `<layer>.scale_weight`, and an optional `<layer>.scale_input` (activations only);
//! - **comfy_quant** (ComfyUI's mixed-precision ops): `<layer>.comfy_quant`, a U8 tensor holding
//!   JSON such as `{"format": "float8_e4m3fn"}` (or the same per layer in the file metadata's
//!   `_quantization_metadata`), `<layer>.weight` with `<layer>.weight_scale`, and an optional
//!   `<layer>.input_scale`.
//!
//! The real weight is `weight.to(float32) * scale`. [`ScaledFp8`] serves exactly that, as F32,
//! so a converter that rounds it to its target rounds once, as torch's
//! `(w.to(torch.float32) * scale).to(dtype)` does; the scale, input-scale, marker and
//! `comfy_quant` tensors are hidden. [`ScaledLayout::parse`] is the one reader of these
//! layouts: `detect` names them with it, converters read through the view. A `comfy_quant`
//! format this view cannot de-scale is refused, never served as if it were plain.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::safetensors::{Dtype, Header, SafetensorsError, SafetensorsFile, TensorEntry};
use crate::source::{
    HiddenTensor, SourceError, SourceTensor, TensorSource, check_range, read_f32_via_raw,
    read_raw_via_f32, tensor,
};

/// Name (or suffix after `.`) of the legacy layout's marker tensor.
pub const SCALED_FP8_MARKER: &str = "scaled_fp8";
/// File metadata key listing comfy_quant layers.
pub const QUANTIZATION_METADATA: &str = "_quantization_metadata";
/// Largest `comfy_quant` JSON read (real ones are tens of bytes).
const MAX_COMFY_QUANT_LEN: u64 = 64 << 10;

/// Which scaled layout a file uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LayoutKind {
    /// `scaled_fp8` marker, `scale_weight` / `scale_input`.
    Legacy,
    /// Per-layer `comfy_quant` (tensors or `_quantization_metadata`), `weight_scale` /
    /// `input_scale`.
    ComfyQuant,
}

impl LayoutKind {
    /// Stable name (`scaled_fp8`, `comfy_quant`), as in `detect`'s JSON.
    pub fn name(self) -> &'static str {
        match self {
            LayoutKind::Legacy => "scaled_fp8",
            LayoutKind::ComfyQuant => "comfy_quant",
        }
    }
}

/// One scaled layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaledLayer {
    /// The layer's key prefix (`double_blocks.0.img_attn.qkv`).
    pub layer: String,
    /// Its format: `float8_e4m3fn`, `float8_e5m2` (the comfy_quant spelling; legacy layers
    /// are named by their weight's dtype).
    pub format: String,
    /// Header index of the weight.
    pub weight: usize,
    /// Header index of its weight scale.
    pub scale: usize,
}

/// A file's scaled layout, from its header (and its small `comfy_quant` tensors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaledLayout {
    /// Which layout.
    pub kind: LayoutKind,
    /// The legacy marker's key and dtype, when present.
    pub marker: Option<(String, Dtype)>,
    /// Every scaled layer, in header order of its weight.
    pub layers: Vec<ScaledLayer>,
    /// Layers per format (the histogram `detect` reports).
    pub formats: BTreeMap<String, u64>,
    /// Activation scales present (`scale_input` / `input_scale`).
    pub input_scales: u64,
    /// Tensors a view hides, with the reason (header indices).
    hidden: Vec<(usize, &'static str)>,
}

/// Why a scaled layout cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tensor `{tensor}`: {problem}")]
pub struct LayoutError {
    /// The tensor (or metadata key) concerned.
    pub tensor: String,
    /// What is wrong.
    pub problem: String,
}

fn layout_err(tensor: &str, problem: impl Into<String>) -> LayoutError {
    LayoutError {
        tensor: tensor.to_owned(),
        problem: problem.into(),
    }
}

/// The fp8 dtype a comfy_quant format stores its weight in, for the formats this view
/// de-scales.
pub fn fp8_format_dtype(format: &str) -> Option<Dtype> {
    match format {
        "float8_e4m3fn" => Some(Dtype::F8E4M3),
        "float8_e5m2" => Some(Dtype::F8E5M2),
        _ => None,
    }
}

fn format_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F8E5M2 => "float8_e5m2",
        _ => "float8_e4m3fn",
    }
}

impl ScaledLayout {
    /// The layout of a file with this `header`, or `None` for a file without scales.
    /// `read_small` returns the bytes of a small tensor (`comfy_quant` JSON); it is only called
    /// for tensors of at most 64 KiB.
    pub fn parse(
        header: &Header,
        read_small: &mut dyn FnMut(&TensorEntry) -> Result<Vec<u8>, SafetensorsError>,
    ) -> Result<Option<ScaledLayout>, LayoutError> {
        let index: HashMap<&str, usize> = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.as_str(), i))
            .collect();
        let marker = header
            .tensors
            .iter()
            .enumerate()
            .find(|(_, t)| is_marker(&t.name));
        let mut formats_by_layer: BTreeMap<String, String> = BTreeMap::new();
        let mut hidden = Vec::new();
        // comfy_quant: file metadata first, then per-layer tensors (which win, as in ComfyUI,
        // whose loader turns the metadata into tensors only for layers that lack one).
        if let Some(json) = header.metadata.get(QUANTIZATION_METADATA) {
            let layers = parse_quantization_metadata(json)?;
            formats_by_layer.extend(layers);
        }
        for (i, t) in header.tensors.iter().enumerate() {
            if let Some(layer) = t.name.strip_suffix(".comfy_quant") {
                if t.byte_len() > MAX_COMFY_QUANT_LEN || t.dtype != Dtype::U8 {
                    return Err(layout_err(
                        &t.name,
                        format!(
                            "a comfy_quant tensor must be U8 JSON of at most 64 KiB, found {} \
                             {:?}",
                            t.dtype, t.shape
                        ),
                    ));
                }
                let bytes = read_small(t).map_err(|e| layout_err(&t.name, e.to_string()))?;
                let format = parse_comfy_quant(&t.name, &bytes)?;
                formats_by_layer.insert(layer.to_owned(), format);
                hidden.push((
                    i,
                    "comfy_quant layer format (the weight is served de-scaled)",
                ));
            }
        }
        let comfy = !formats_by_layer.is_empty();
        let legacy_scales = header
            .tensors
            .iter()
            .any(|t| t.name.ends_with(".scale_weight"));
        if !comfy && marker.is_none() && !legacy_scales {
            return Ok(None);
        }
        if comfy && (marker.is_some() || legacy_scales) {
            return Err(layout_err(
                marker.map_or("scale_weight", |(_, t)| t.name.as_str()),
                "the file mixes the legacy scaled_fp8 layout with comfy_quant layers",
            ));
        }
        let kind = if comfy {
            LayoutKind::ComfyQuant
        } else {
            LayoutKind::Legacy
        };
        let (scale_suffix, input_suffix) = match kind {
            LayoutKind::Legacy => (".scale_weight", ".scale_input"),
            LayoutKind::ComfyQuant => (".weight_scale", ".input_scale"),
        };
        let mut layers = Vec::new();
        let mut input_scales = 0;
        for (i, t) in header.tensors.iter().enumerate() {
            if let Some(layer) = t.name.strip_suffix(scale_suffix) {
                let weight_name = format!("{layer}.weight");
                let weight = *index.get(weight_name.as_str()).ok_or_else(|| {
                    layout_err(&t.name, "a weight scale without its weight in the file")
                })?;
                let w = &header.tensors[weight];
                let format = match kind {
                    LayoutKind::Legacy => format_name(w.dtype).to_owned(),
                    LayoutKind::ComfyQuant => {
                        formats_by_layer.get(layer).cloned().ok_or_else(|| {
                            layout_err(&t.name, "a weight scale on a layer without comfy_quant")
                        })?
                    }
                };
                check_scaled_weight(w, &t.name, &format)?;
                check_scalar(t)?;
                layers.push(ScaledLayer {
                    layer: layer.to_owned(),
                    format,
                    weight,
                    scale: i,
                });
                hidden.push((i, "weight scale (applied to its weight)"));
            } else if t.name.ends_with(input_suffix) {
                input_scales += 1;
                hidden.push((i, "activation scale (not part of the weights)"));
            } else if is_marker(&t.name) {
                hidden.push((i, "scaled_fp8 marker"));
            }
        }
        // Every comfy_quant layer must be one this view de-scales.
        for (layer, format) in &formats_by_layer {
            if !layers.iter().any(|l| &l.layer == layer) {
                let weight = format!("{layer}.weight");
                return Err(match fp8_format_dtype(format) {
                    None => layout_err(
                        &weight,
                        format!("comfy_quant format {format:?} cannot be read by convcache"),
                    ),
                    Some(_) => layout_err(&weight, format!("{format} layer without weight_scale")),
                });
            }
        }
        layers.sort_by_key(|l| l.weight);
        hidden.sort_unstable();
        let mut formats = BTreeMap::new();
        for l in &layers {
            *formats.entry(l.format.clone()).or_insert(0) += 1;
        }
        Ok(Some(ScaledLayout {
            kind,
            marker: marker.map(|(_, t)| (t.name.clone(), t.dtype)),
            layers,
            formats,
            input_scales,
            hidden,
        }))
    }

    /// Reads the layout of an opened file (its comfy_quant tensors with positioned reads).
    pub fn of_file(file: &SafetensorsFile) -> Result<Option<ScaledLayout>, LayoutError> {
        ScaledLayout::parse(&file.header, &mut |t| {
            let mut buf = vec![0u8; t.byte_len() as usize];
            file.read_tensor_range(t, 0, &mut buf)?;
            Ok(buf)
        })
    }
}

fn is_marker(name: &str) -> bool {
    name == SCALED_FP8_MARKER
        || name
            .strip_suffix(SCALED_FP8_MARKER)
            .is_some_and(|p| p.ends_with('.'))
}

/// A scale must be one float.
fn check_scalar(t: &TensorEntry) -> Result<(), LayoutError> {
    if t.n_elements() != 1 || !crate::cast::is_cast_source(t.dtype) {
        return Err(layout_err(
            &t.name,
            format!(
                "a weight scale must be one float, found {} {:?}; per-channel and block scales \
                 are not supported",
                t.dtype, t.shape
            ),
        ));
    }
    Ok(())
}

fn check_scaled_weight(w: &TensorEntry, scale: &str, format: &str) -> Result<(), LayoutError> {
    match fp8_format_dtype(format) {
        None => Err(layout_err(
            &w.name,
            format!("comfy_quant format {format:?} cannot be read by convcache"),
        )),
        Some(d) if d != w.dtype => Err(layout_err(
            &w.name,
            format!(
                "has a weight scale (`{scale}`) but is {}, not {format}",
                w.dtype
            ),
        )),
        Some(_) => Ok(()),
    }
}

/// One layer's `comfy_quant` JSON (other keys, such as `full_precision_matrix_mult`, only
/// change how ComfyUI multiplies, not the weight's value).
#[derive(serde::Deserialize)]
struct LayerConf {
    format: String,
}

/// The file metadata's `_quantization_metadata` (`format_version` and other keys ignored, as
/// ComfyUI does).
#[derive(serde::Deserialize)]
struct QuantizationMetadata {
    layers: BTreeMap<String, LayerConf>,
}

fn parse_comfy_quant(name: &str, bytes: &[u8]) -> Result<String, LayoutError> {
    serde_json::from_slice::<LayerConf>(bytes)
        .map(|c| c.format)
        .map_err(|e| {
            layout_err(
                name,
                format!("comfy_quant is not JSON with a \"format\": {e}"),
            )
        })
}

fn parse_quantization_metadata(json: &str) -> Result<BTreeMap<String, String>, LayoutError> {
    let meta: QuantizationMetadata = serde_json::from_str(json).map_err(|e| {
        layout_err(
            QUANTIZATION_METADATA,
            format!("not JSON with \"layers\" of {{\"format\": ...}}: {e}"),
        )
    })?;
    Ok(meta
        .layers
        .into_iter()
        .map(|(layer, conf)| (layer, conf.format))
        .collect())
}

/// A scaled-fp8 file served de-scaled: see the module documentation.
#[derive(Debug)]
pub struct ScaledFp8 {
    file: SafetensorsFile,
    layout: ScaledLayout,
    tensors: Vec<SourceTensor>,
    /// For each served tensor: its header index and its scale, if de-scaled.
    served: Vec<(usize, Option<f32>)>,
    hidden: Vec<HiddenTensor>,
    /// The file's metadata without `_quantization_metadata`: that list describes scales this
    /// view applies and hides, and copied into an output it would make ComfyUI load plain
    /// weights as quantized ones.
    metadata: BTreeMap<String, String>,
}

impl ScaledFp8 {
    /// Serves `file` de-scaled under `layout` (from [`ScaledLayout::of_file`]); reads the scales.
    pub fn new(file: SafetensorsFile, layout: ScaledLayout) -> Result<ScaledFp8, SourceError> {
        let plain = file.source_tensors().to_vec();
        let mut scales: HashMap<usize, (usize, f32)> = HashMap::new();
        for l in &layout.layers {
            let entry = &file.header.tensors[l.scale];
            let mut bytes = vec![0u8; entry.byte_len() as usize];
            file.read_tensor_range(entry, 0, &mut bytes)?;
            let mut v = [0f32];
            crate::cast::widen_to_f32(entry.dtype, &bytes, &mut v)
                .map_err(|e| SourceError::invalid(&file.path, &entry.name, e))?;
            if !v[0].is_finite() {
                return Err(SourceError::invalid(
                    &file.path,
                    &entry.name,
                    format!("the weight scale is {}", v[0]),
                ));
            }
            scales.insert(l.weight, (l.scale, v[0]));
        }
        let hidden_idx: HashMap<usize, &'static str> = layout.hidden.iter().copied().collect();
        let mut tensors = Vec::new();
        let mut served = Vec::new();
        for (i, mut t) in plain.into_iter().enumerate() {
            if hidden_idx.contains_key(&i) {
                continue;
            }
            let scale = scales.get(&i).map(|&(s, v)| {
                t.dtype = Dtype::F32;
                t.source_bytes += file.header.tensors[s].byte_len();
                v
            });
            tensors.push(t);
            served.push((i, scale));
        }
        let hidden = layout
            .hidden
            .iter()
            .map(|&(i, reason)| HiddenTensor {
                name: file.header.tensors[i].name.clone(),
                reason,
            })
            .collect();
        let mut metadata = file.header.metadata.clone();
        metadata.remove(QUANTIZATION_METADATA);
        Ok(ScaledFp8 {
            metadata,
            file,
            layout,
            tensors,
            served,
            hidden,
        })
    }

    /// The layout served.
    pub fn layout(&self) -> &ScaledLayout {
        &self.layout
    }

    /// The opened file.
    pub fn file(&self) -> &SafetensorsFile {
        &self.file
    }

    fn entry(&self, index: usize) -> Result<(&TensorEntry, Option<f32>), SourceError> {
        let (i, scale) = *self.served.get(index).ok_or_else(|| {
            SourceError::invalid(&self.file.path, &format!("#{index}"), "no such tensor")
        })?;
        Ok((&self.file.header.tensors[i], scale))
    }
}

impl TensorSource for ScaledFp8 {
    fn path(&self) -> &Path {
        &self.file.path
    }

    fn tensors(&self) -> &[SourceTensor] {
        &self.tensors
    }

    fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    fn hidden(&self) -> &[HiddenTensor] {
        &self.hidden
    }

    fn read_raw(&self, index: usize, byte_offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let (entry, scale) = self.entry(index)?;
        match scale {
            None => Ok(self.file.read_tensor_range(entry, byte_offset, buf)?),
            Some(_) => read_raw_via_f32(self, index, byte_offset, buf),
        }
    }

    fn read_f32(&self, index: usize, start: u64, out: &mut [f32]) -> Result<(), SourceError> {
        let (entry, scale) = self.entry(index)?;
        let Some(scale) = scale else {
            return read_f32_via_raw(self, index, start, out);
        };
        check_range(self, tensor(self, index)?, start, out.len() as u64)?;
        // Widen the stored fp8 values exactly, then one f32 multiply each: torch's
        // `w.to(torch.float32) * scale` with a float32 scale.
        let mut bytes = vec![0u8; out.len()];
        self.file.read_tensor_range(entry, start, &mut bytes)?;
        crate::cast::widen_to_f32(entry.dtype, &bytes, out)
            .map_err(|e| SourceError::invalid(&self.file.path, &entry.name, e))?;
        out.iter_mut().for_each(|v| *v *= scale);
        Ok(())
    }

    fn check_unchanged(&self) -> Result<(), SourceError> {
        Ok(self.file.check_unchanged()?)
    }
}
