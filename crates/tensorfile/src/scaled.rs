//! ComfyUI's quantized layouts (scaled fp8, nvfp4, mxfp8), and the view that serves their weights
//! dequantized.
//!
//! Two layouts put scales next to quantized weights (see `shared/reference/comfy-formats.md` and
//! `tests/golden/comfy_quant/README.md`, checked against ComfyUI's `comfy/utils.py`,
//! `comfy/ops.py` and `comfy/quant_ops.py`):
//! - **legacy** (`scaled_fp8` marker tensor): `<layer>.weight` in fp8 with a float32
//!   `<layer>.scale_weight`, and an optional `<layer>.scale_input` (activations only);
//! - **comfy_quant** (ComfyUI's mixed-precision ops): `<layer>.comfy_quant`, a U8 tensor holding
//!   JSON such as `{"format": "nvfp4"}` (or the same per layer in the file metadata's
//!   `_quantization_metadata`), `<layer>.weight` with `<layer>.weight_scale`, and an optional
//!   `<layer>.input_scale`. Per format:
//!   - `float8_e4m3fn` / `float8_e5m2`: an fp8 weight and one float `weight_scale`;
//!   - `nvfp4`: weight U8 `[R, C/2]` (two E2M1 codes per byte), `weight_scale` F8_E4M3 (or U8)
//!     block-16 scales in the cuBLAS blocked layout `[roundup(R,128), roundup(C/16,4)]`, and
//!     `weight_scale_2`, one F32;
//!   - `mxfp8`: weight F8_E4M3 `[R, C]`, `weight_scale` U8 (or F8_E8M0) block-32 E8M0 scales,
//!     blocked `[roundup(R,128), roundup(C/32,4)]`.
//!
//! [`ScaledView`] serves each such weight as F32, the value comfy-kitchen's f32 dequantizers
//! give: `w.to(float32) * scale` for fp8 (so a converter that rounds it to its target rounds
//! once, as torch's `(w.to(torch.float32) * scale).to(dtype)` does), and [`crate::blockfp`]'s
//! `dequantize_*_rows` for nvfp4 and mxfp8. The scale, input-scale, marker and `comfy_quant`
//! tensors are hidden. [`ScaledLayout::parse`] is the one reader of these layouts: `detect`
//! names them with it, converters read through the view. A layer the view cannot dequantize
//! exactly (an unknown format, scales of the wrong dtype or shape, an activation
//! `pre_quant_scale`) is refused, never served as if it were plain.
//!
//! **The shape of a padded weight.** comfy-kitchen zero-pads an nvfp4 (mxfp8) weight to
//! multiples of 16 (32) in both dimensions when either is not one, and the file does not record
//! the original shape: ComfyUI takes it from the model's module, which convcache does not have.
//! So a block-scaled weight is served in its stored (padded) shape, padding included (zeros),
//! unless its `comfy_quant` JSON records `"orig_shape": [rows, cols]` (convcache's own outputs
//! do; ComfyUI reads only `format` and `full_precision_matrix_mult` from that JSON and ignores
//! other keys). A recorded shape must fit the stored one with less than one block of padding
//! per dimension.
//!
//! Reading a row range of a block-scaled weight reads only those rows and the 128-row tiles of
//! the blocked scales they fall in, a batch of rows at a time: memory stays bounded whatever the
//! size of the weight or of the range asked for.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::path::Path;

use crate::blockfp::{self, BLOCKED_TILE_ROWS, MXFP8_GROUP, NVFP4_GROUP};
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
/// Suffix of nvfp4's per-tensor scale.
const TENSOR_SCALE_SUFFIX: &str = ".weight_scale_2";
/// Suffix of an activation pre-scale (ComfyUI multiplies the layer's input by it).
const PRE_QUANT_SCALE_SUFFIX: &str = ".pre_quant_scale";

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

/// How a scaled layer's weight is stored: what the view undoes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// An fp8 weight times one float scale.
    Fp8,
    /// nvfp4: packed E2M1 codes, block-16 E4M3 scales (blocked), and a per-tensor F32 scale.
    Nvfp4 {
        /// Header index of `weight_scale_2`.
        tensor_scale: usize,
    },
    /// mxfp8: E4M3 codes and block-32 E8M0 scales (blocked).
    Mxfp8,
}

/// One scaled layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaledLayer {
    /// The layer's key prefix (`double_blocks.0.img_attn.qkv`).
    pub layer: String,
    /// Its format: `float8_e4m3fn`, `float8_e5m2`, `nvfp4`, `mxfp8` (the comfy_quant spelling;
    /// legacy layers are named by their weight's dtype).
    pub format: String,
    /// Header index of the weight.
    pub weight: usize,
    /// Header index of its weight scale (per tensor for fp8, the blocked grid otherwise).
    pub scale: usize,
    /// How the weight is stored.
    pub storage: Storage,
    /// The shape the weight is served in: the stored shape for fp8; `[rows, cols]` in values
    /// for nvfp4 and mxfp8, cut to the layer's `orig_shape` when its comfy_quant JSON has one.
    pub shape: Vec<u64>,
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

/// The comfy_quant formats the view dequantizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Fp8(Dtype),
    Nvfp4,
    Mxfp8,
}

impl Format {
    fn parse(format: &str) -> Option<Format> {
        match format {
            "float8_e4m3fn" => Some(Format::Fp8(Dtype::F8E4M3)),
            "float8_e5m2" => Some(Format::Fp8(Dtype::F8E5M2)),
            "nvfp4" => Some(Format::Nvfp4),
            "mxfp8" => Some(Format::Mxfp8),
            _ => None,
        }
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
        let mut confs: BTreeMap<String, LayerConf> = BTreeMap::new();
        let mut hidden = Vec::new();
        // comfy_quant: file metadata first, then per-layer tensors (which win, as in ComfyUI,
        // whose loader turns the metadata into tensors only for layers that lack one).
        if let Some(json) = header.metadata.get(QUANTIZATION_METADATA) {
            confs.extend(parse_quantization_metadata(json)?);
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
                confs.insert(layer.to_owned(), parse_comfy_quant(&t.name, &bytes)?);
                hidden.push((
                    i,
                    "comfy_quant layer format (the weight is served dequantized)",
                ));
            }
        }
        let comfy = !confs.is_empty();
        let legacy_scales = header
            .tensors
            .iter()
            .any(|t| t.name.ends_with(".scale_weight"));
        if !comfy && marker.is_none() && !legacy_scales {
            // A `weight_scale` beside a quantized weight is ComfyUI's per-layer layout whose
            // formats went missing (no `.comfy_quant` tensor, no `_quantization_metadata`):
            // ComfyUI applies a scale only to a layer with a format, and serving the weight
            // unscaled would be silently wrong, so the file is refused. (Flux.2 dev's
            // `flux2_dev_fp8mixed` has such scales and no `.comfy_quant` tensors: its formats
            // are in the header.)
            let orphan = header.tensors.iter().find(|t| {
                t.name.strip_suffix(".weight_scale").is_some_and(|layer| {
                    index
                        .get(format!("{layer}.weight").as_str())
                        .is_some_and(|&w| {
                            matches!(
                                header.tensors[w].dtype,
                                Dtype::F8E4M3 | Dtype::F8E5M2 | Dtype::U8 | Dtype::I8
                            )
                        })
                })
            });
            if let Some(t) = orphan {
                return Err(layout_err(
                    &t.name,
                    "a quantized weight's weight_scale, but the file gives its layer no \
                     comfy_quant format (no .comfy_quant tensor, no _quantization_metadata \
                     entry), so the scale cannot be applied and the weight cannot be read \
                     correctly",
                ));
            }
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
                let (format, orig_shape) = match kind {
                    LayoutKind::Legacy => (format_name(w.dtype).to_owned(), None),
                    LayoutKind::ComfyQuant => {
                        let conf = confs.get(layer).ok_or_else(|| {
                            layout_err(&t.name, "a weight scale on a layer without comfy_quant")
                        })?;
                        (conf.format.clone(), conf.orig_shape)
                    }
                };
                let (storage, stored) = check_layer(header, &index, layer, w, t, &format)?;
                let shape = served_shape(w, storage, stored, orig_shape)?;
                if let Storage::Nvfp4 { tensor_scale } = storage {
                    hidden.push((
                        tensor_scale,
                        "nvfp4 per-tensor scale (applied to its weight)",
                    ));
                }
                layers.push(ScaledLayer {
                    layer: layer.to_owned(),
                    format,
                    weight,
                    scale: i,
                    storage,
                    shape,
                });
                hidden.push((i, "weight scale (applied to its weight)"));
            } else if t.name.ends_with(input_suffix) {
                input_scales += 1;
                hidden.push((i, "activation scale (not part of the weights)"));
            } else if is_marker(&t.name) {
                hidden.push((i, "scaled_fp8 marker"));
            } else if kind == LayoutKind::ComfyQuant && t.name.ends_with(PRE_QUANT_SCALE_SUFFIX) {
                return Err(layout_err(
                    &t.name,
                    "ComfyUI multiplies the layer's input by this pre_quant_scale; convcache \
                     cannot fold it into the weight, so the file cannot be read",
                ));
            }
        }
        // Every comfy_quant layer must be one this view dequantizes.
        let scaled: HashSet<&str> = layers.iter().map(|l| l.layer.as_str()).collect();
        for (layer, conf) in &confs {
            if !scaled.contains(layer.as_str()) {
                let weight = format!("{layer}.weight");
                return Err(match Format::parse(&conf.format) {
                    None => unreadable_format(&weight, &conf.format),
                    Some(_) => layout_err(
                        &weight,
                        format!(
                            "{} layer without weight_scale: its weight cannot be read",
                            conf.format
                        ),
                    ),
                });
            }
        }
        // An nvfp4 per-tensor scale belongs to an nvfp4 layer (else it would be served as a
        // weight of its own).
        if kind == LayoutKind::ComfyQuant {
            let used: HashSet<usize> = hidden.iter().map(|&(i, _)| i).collect();
            if let Some((_, t)) = header
                .tensors
                .iter()
                .enumerate()
                .find(|(i, t)| t.name.ends_with(TENSOR_SCALE_SUFFIX) && !used.contains(i))
            {
                return Err(layout_err(
                    &t.name,
                    "a weight_scale_2 on a layer that is not nvfp4",
                ));
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

fn unreadable_format(weight: &str, format: &str) -> LayoutError {
    layout_err(
        weight,
        format!("comfy_quant format {format:?} cannot be read by convcache"),
    )
}

/// Checks a layer's weight and scales against its format; returns how the weight is stored and
/// its shape in values (before any `orig_shape`).
fn check_layer(
    header: &Header,
    index: &HashMap<&str, usize>,
    layer: &str,
    w: &TensorEntry,
    scale: &TensorEntry,
    format: &str,
) -> Result<(Storage, Vec<u64>), LayoutError> {
    match Format::parse(format) {
        None => Err(unreadable_format(&w.name, format)),
        Some(Format::Fp8(dtype)) => {
            if w.dtype != dtype {
                return Err(layout_err(
                    &w.name,
                    format!(
                        "has a weight scale (`{}`) but is {}, not {format}",
                        scale.name, w.dtype
                    ),
                ));
            }
            check_scalar(scale)?;
            Ok((Storage::Fp8, w.shape.clone()))
        }
        Some(Format::Nvfp4) => {
            let [rows, bytes_per_row] = matrix(w, Dtype::U8, "U8 [rows, cols/2]", format)?;
            let cols = bytes_per_row * 2;
            check_cols(w, cols, NVFP4_GROUP, format)?;
            check_block_scales(scale, &[Dtype::F8E4M3, Dtype::U8], rows, cols, NVFP4_GROUP)?;
            let name = format!("{layer}{TENSOR_SCALE_SUFFIX}");
            let tensor_scale = *index
                .get(name.as_str())
                .ok_or_else(|| layout_err(&w.name, "an nvfp4 weight without its weight_scale_2"))?;
            let t = &header.tensors[tensor_scale];
            if t.dtype != Dtype::F32 || t.n_elements() != 1 {
                return Err(layout_err(
                    &t.name,
                    format!(
                        "an nvfp4 per-tensor scale must be one F32, found {} {:?}",
                        t.dtype, t.shape
                    ),
                ));
            }
            Ok((Storage::Nvfp4 { tensor_scale }, vec![rows, cols]))
        }
        Some(Format::Mxfp8) => {
            let [rows, cols] = matrix(w, Dtype::F8E4M3, "F8_E4M3 [rows, cols]", format)?;
            check_cols(w, cols, MXFP8_GROUP, format)?;
            check_block_scales(scale, &[Dtype::U8, Dtype::F8E8M0], rows, cols, MXFP8_GROUP)?;
            Ok((Storage::Mxfp8, vec![rows, cols]))
        }
    }
}

/// The [rows, cols] of a block-scaled weight, which must be a non-empty matrix of `dtype`.
fn matrix(
    w: &TensorEntry,
    dtype: Dtype,
    what: &str,
    format: &str,
) -> Result<[u64; 2], LayoutError> {
    match w.shape[..] {
        [rows, cols] if w.dtype == dtype && rows > 0 && cols > 0 => Ok([rows, cols]),
        _ => Err(layout_err(
            &w.name,
            format!(
                "an {format} weight must be {what}, found {} {:?}",
                w.dtype, w.shape
            ),
        )),
    }
}

fn check_cols(w: &TensorEntry, cols: u64, group: usize, format: &str) -> Result<(), LayoutError> {
    if cols.is_multiple_of(group as u64) {
        return Ok(());
    }
    Err(layout_err(
        &w.name,
        format!("an {format} weight has {cols} values per row, not a multiple of {group}"),
    ))
}

/// A block-scale grid for a [rows, cols] weight (one scale per `group` values of a row) must be
/// stored in the blocked layout, as one of `dtypes`.
fn check_block_scales(
    scale: &TensorEntry,
    dtypes: &[Dtype],
    rows: u64,
    cols: u64,
    group: usize,
) -> Result<(), LayoutError> {
    let blocked = usize::try_from(rows)
        .ok()
        .zip(usize::try_from(cols / group as u64).ok())
        .map(|(rows, grid_cols)| blockfp::blocked_shape(rows, grid_cols))
        .map(|(r, c)| vec![r as u64, c as u64]);
    if dtypes.contains(&scale.dtype) && blocked.as_ref() == Some(&scale.shape) {
        return Ok(());
    }
    let dtypes: Vec<&str> = dtypes.iter().map(|d| d.as_str()).collect();
    Err(layout_err(
        &scale.name,
        format!(
            "block scales of a [{rows}, {cols}] weight must be {} {:?} (one per {group} values, \
             in the blocked layout), found {} {:?}",
            dtypes.join(" or "),
            blocked.unwrap_or_default(),
            scale.dtype,
            scale.shape
        ),
    ))
}

/// The shape a layer's weight is served in: its stored shape in values, or the comfy_quant
/// `orig_shape`, which must fit it with less than one block of padding per dimension (none for
/// fp8).
fn served_shape(
    w: &TensorEntry,
    storage: Storage,
    stored: Vec<u64>,
    orig: Option<[u64; 2]>,
) -> Result<Vec<u64>, LayoutError> {
    let Some(orig) = orig else {
        return Ok(stored);
    };
    let group = match storage {
        Storage::Fp8 => 1,
        Storage::Nvfp4 { .. } => NVFP4_GROUP as u64,
        Storage::Mxfp8 => MXFP8_GROUP as u64,
    };
    let fits = stored.len() == 2
        && orig
            .iter()
            .zip(&stored)
            .all(|(&o, &s)| o > 0 && o <= s && s - o < group);
    if fits {
        return Ok(orig.to_vec());
    }
    Err(layout_err(
        &w.name,
        format!(
            "comfy_quant orig_shape {orig:?} is not the weight's shape before padding (stored \
             {stored:?} values, blocks of {group})"
        ),
    ))
}

/// A per-tensor scale must be one float.
fn check_scalar(t: &TensorEntry) -> Result<(), LayoutError> {
    if t.n_elements() != 1 || !crate::cast::is_cast_source(t.dtype) {
        return Err(layout_err(
            &t.name,
            format!(
                "a weight scale must be one float, found {} {:?}; per-channel scales are not \
                 supported",
                t.dtype, t.shape
            ),
        ));
    }
    Ok(())
}

/// One layer's `comfy_quant` JSON. Other keys, such as `full_precision_matrix_mult`, only change
/// how ComfyUI multiplies, not the weight's value.
#[derive(serde::Deserialize)]
struct LayerConf {
    format: String,
    /// The weight's shape before padding (block-scaled formats), recorded by convcache.
    orig_shape: Option<[u64; 2]>,
}

/// The file metadata's `_quantization_metadata` (`format_version` and other keys ignored, as
/// ComfyUI does).
#[derive(serde::Deserialize)]
struct QuantizationMetadata {
    layers: BTreeMap<String, LayerConf>,
}

fn parse_comfy_quant(name: &str, bytes: &[u8]) -> Result<LayerConf, LayoutError> {
    serde_json::from_slice::<LayerConf>(bytes).map_err(|e| {
        layout_err(
            name,
            format!(
                "comfy_quant is not JSON with a \"format\" (and optionally an \"orig_shape\" of \
                 two sizes): {e}"
            ),
        )
    })
}

fn parse_quantization_metadata(json: &str) -> Result<BTreeMap<String, LayerConf>, LayoutError> {
    let meta: QuantizationMetadata = serde_json::from_str(json).map_err(|e| {
        layout_err(
            QUANTIZATION_METADATA,
            format!("not JSON with \"layers\" of {{\"format\": ...}}: {e}"),
        )
    })?;
    Ok(meta.layers)
}

/// A file with ComfyUI scaled or block-scaled weights, served dequantized: see the module
/// documentation.
#[derive(Debug)]
pub struct ScaledView {
    file: SafetensorsFile,
    layout: ScaledLayout,
    tensors: Vec<SourceTensor>,
    /// How each served tensor is read.
    served: Vec<Served>,
    hidden: Vec<HiddenTensor>,
    /// The file's metadata without `_quantization_metadata`: that list describes scales this
    /// view applies and hides, and copied into an output it would make ComfyUI load plain
    /// weights as quantized ones.
    metadata: BTreeMap<String, String>,
}

/// How the view reads one served tensor (header indices).
#[derive(Debug, Clone, Copy)]
enum Served {
    /// As stored.
    Plain { entry: usize },
    /// An fp8 weight times its scale.
    Fp8 { entry: usize, scale: f32 },
    /// An nvfp4 or mxfp8 weight.
    Blocks(BlockWeight),
}

/// An nvfp4 or mxfp8 weight as the view reads it.
#[derive(Debug, Clone, Copy)]
struct BlockWeight {
    format: BlockFormat,
    weight: usize,
    /// The blocked scale grid.
    scales: usize,
    /// Values per stored (padded) row.
    stored_cols: usize,
    /// Values per served row (`orig_shape`'s, else `stored_cols`).
    cols: usize,
}

#[derive(Debug, Clone, Copy)]
enum BlockFormat {
    Nvfp4 { tensor_scale: f32 },
    Mxfp8,
}

impl BlockFormat {
    fn group(self) -> usize {
        match self {
            BlockFormat::Nvfp4 { .. } => NVFP4_GROUP,
            BlockFormat::Mxfp8 => MXFP8_GROUP,
        }
    }

    /// The stored bytes of the values `cols` of a row (block-aligned).
    fn bytes(self, cols: Range<usize>) -> Range<usize> {
        match self {
            BlockFormat::Nvfp4 { .. } => cols.start / 2..cols.end / 2,
            BlockFormat::Mxfp8 => cols,
        }
    }

    /// Dequantizes whole blocks of one row: `out.len()` values.
    fn dequantize(self, stored: &[u8], block_scales: &[u8], out: &mut [f32]) {
        match self {
            BlockFormat::Nvfp4 { tensor_scale } => {
                blockfp::dequantize_nvfp4_rows(stored, block_scales, out.len(), tensor_scale, out)
            }
            BlockFormat::Mxfp8 => {
                blockfp::dequantize_mxfp8_rows(stored, block_scales, out.len(), out)
            }
        }
    }
}

/// Stored weight bytes a block-scaled read dequantizes at a time (at least one row). With the
/// scale tiles of those rows, this is what one read holds in memory.
const BLOCK_BATCH_BYTES: usize = 1 << 20;

impl ScaledView {
    /// Serves `file` dequantized under `layout` (from [`ScaledLayout::of_file`]); reads the
    /// per-tensor scales.
    pub fn new(file: SafetensorsFile, layout: ScaledLayout) -> Result<ScaledView, SourceError> {
        let mut by_weight: HashMap<usize, (Served, Vec<u64>, u64)> = HashMap::new();
        for l in &layout.layers {
            let entries = &file.header.tensors;
            let mut scale_bytes = entries[l.scale].byte_len();
            let served = match l.storage {
                Storage::Fp8 => Served::Fp8 {
                    entry: l.weight,
                    scale: read_scalar(&file, &entries[l.scale])?,
                },
                Storage::Nvfp4 { tensor_scale } => {
                    scale_bytes += entries[tensor_scale].byte_len();
                    let format = BlockFormat::Nvfp4 {
                        tensor_scale: read_scalar(&file, &entries[tensor_scale])?,
                    };
                    block_weight(&file, l, format)?
                }
                Storage::Mxfp8 => block_weight(&file, l, BlockFormat::Mxfp8)?,
            };
            by_weight.insert(l.weight, (served, l.shape.clone(), scale_bytes));
        }
        let hidden_idx: HashSet<usize> = layout.hidden.iter().map(|&(i, _)| i).collect();
        let mut tensors = Vec::new();
        let mut served = Vec::new();
        for (i, mut t) in file.source_tensors().iter().cloned().enumerate() {
            if hidden_idx.contains(&i) {
                continue;
            }
            match by_weight.remove(&i) {
                Some((how, shape, scale_bytes)) => {
                    t.dtype = Dtype::F32;
                    t.shape = shape;
                    t.source_bytes += scale_bytes;
                    served.push(how);
                }
                None => served.push(Served::Plain { entry: i }),
            }
            tensors.push(t);
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
        Ok(ScaledView {
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

    fn served(&self, index: usize) -> Result<Served, SourceError> {
        self.served.get(index).copied().ok_or_else(|| {
            SourceError::invalid(&self.file.path, &format!("#{index}"), "no such tensor")
        })
    }

    /// Values `start..start + out.len()` of a block-scaled weight (checked by the caller):
    /// batches of whole stored rows within one 128-row tile of the scales, each row's blocks
    /// covering the range dequantized, the served part copied out.
    fn read_blocks(&self, b: BlockWeight, start: u64, out: &mut [f32]) -> Result<(), SourceError> {
        if out.is_empty() {
            return Ok(());
        }
        let weight = &self.file.header.tensors[b.weight];
        let scales = &self.file.header.tensors[b.scales];
        let group = b.format.group();
        let grid_cols = b.stored_cols / group;
        let row_bytes = b.format.bytes(0..b.stored_cols).len();
        let cols = b.cols as u64;
        let end = start + out.len() as u64;
        let last_row = to_usize(&self.file.path, weight, end.div_ceil(cols))?;
        let batch_rows = (BLOCK_BATCH_BYTES / row_bytes).clamp(1, BLOCKED_TILE_ROWS);
        let (mut tiles, mut grid, mut stored, mut partial) = (vec![], vec![], vec![], vec![]);
        let mut row = to_usize(&self.file.path, weight, start / cols)?;
        while row < last_row {
            let tile_end = (row / BLOCKED_TILE_ROWS + 1) * BLOCKED_TILE_ROWS;
            let batch = row..last_row.min(tile_end).min(row + batch_rows);
            let span = blockfp::blocked_tiles_span(batch.clone(), grid_cols);
            tiles.resize(span.len(), 0u8);
            self.file
                .read_tensor_range(scales, span.start as u64, &mut tiles)?;
            grid.resize(batch.len() * grid_cols, 0u8);
            blockfp::from_blocked_rows(&tiles, batch.clone(), grid_cols, &mut grid);
            stored.resize(batch.len() * row_bytes, 0u8);
            self.file
                .read_tensor_range(weight, (batch.start * row_bytes) as u64, &mut stored)?;
            for (i, r) in batch.clone().enumerate() {
                let row_start = r as u64 * cols;
                // The columns of this row asked for, and the whole blocks that hold them.
                let lo = (start.max(row_start) - row_start) as usize;
                let hi = (end.min(row_start + cols) - row_start) as usize;
                let blocks = lo / group..hi.div_ceil(group);
                let values = blocks.start * group..blocks.end * group;
                let bytes = &stored[i * row_bytes..][b.format.bytes(values.clone())];
                let block_scales = &grid[i * grid_cols..][blocks];
                let dst = &mut out[(row_start + lo as u64 - start) as usize..][..hi - lo];
                if values == (lo..hi) {
                    b.format.dequantize(bytes, block_scales, dst);
                } else {
                    partial.resize(values.len(), 0f32);
                    b.format.dequantize(bytes, block_scales, &mut partial);
                    dst.copy_from_slice(&partial[lo - values.start..hi - values.start]);
                }
            }
            row = batch.end;
        }
        Ok(())
    }
}

/// How the view reads layer `l`'s block-scaled weight.
fn block_weight(
    file: &SafetensorsFile,
    l: &ScaledLayer,
    format: BlockFormat,
) -> Result<Served, SourceError> {
    let w = &file.header.tensors[l.weight];
    let stored_cols = match format {
        BlockFormat::Nvfp4 { .. } => w.shape[1] * 2,
        BlockFormat::Mxfp8 => w.shape[1],
    };
    Ok(Served::Blocks(BlockWeight {
        format,
        weight: l.weight,
        scales: l.scale,
        stored_cols: to_usize(&file.path, w, stored_cols)?,
        cols: to_usize(&file.path, w, l.shape[1])?,
    }))
}

fn to_usize(path: &Path, t: &TensorEntry, v: u64) -> Result<usize, SourceError> {
    usize::try_from(v)
        .map_err(|_| SourceError::invalid(path, &t.name, "too large for this platform"))
}

/// A per-tensor scale's value: one float, finite.
fn read_scalar(file: &SafetensorsFile, entry: &TensorEntry) -> Result<f32, SourceError> {
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
    Ok(v[0])
}

impl TensorSource for ScaledView {
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
        match self.served(index)? {
            Served::Plain { entry } => Ok(self.file.read_tensor_range(
                &self.file.header.tensors[entry],
                byte_offset,
                buf,
            )?),
            Served::Fp8 { .. } | Served::Blocks(_) => {
                read_raw_via_f32(self, index, byte_offset, buf)
            }
        }
    }

    fn read_f32(&self, index: usize, start: u64, out: &mut [f32]) -> Result<(), SourceError> {
        match self.served(index)? {
            Served::Plain { .. } => read_f32_via_raw(self, index, start, out),
            Served::Fp8 { entry, scale } => {
                check_range(self, tensor(self, index)?, start, out.len() as u64)?;
                // Widen the stored fp8 values exactly, then one f32 multiply each: torch's
                // `w.to(torch.float32) * scale` with a float32 scale.
                let entry = &self.file.header.tensors[entry];
                let mut bytes = vec![0u8; out.len()];
                self.file.read_tensor_range(entry, start, &mut bytes)?;
                crate::cast::widen_to_f32(entry.dtype, &bytes, out)
                    .map_err(|e| SourceError::invalid(&self.file.path, &entry.name, e))?;
                out.iter_mut().for_each(|v| *v *= scale);
                Ok(())
            }
            Served::Blocks(b) => {
                check_range(self, tensor(self, index)?, start, out.len() as u64)?;
                self.read_blocks(b, start, out)
            }
        }
    }

    fn check_unchanged(&self) -> Result<(), SourceError> {
        Ok(self.file.check_unchanged()?)
    }
}
