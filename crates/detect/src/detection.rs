//! [`detect`]: what a model file is, from its header.
//!
//! The format is sniffed from the first bytes (`GGUF` magic; a safetensors length followed by
//! `{`; a zip or pickle header), the extension only when the content is not conclusive. Then:
//! - **safetensors**: the header is read (only the header) and validated; the precision is the
//!   dominant *floating* dtype by bytes over all tensors — not the first tensor, since writers
//!   put F32 norms and scales first. bitsandbytes layouts (NF4/FP4 quant states, LLM.int8 `SCB`)
//!   override it; a ComfyUI quantized layout (scaled fp8, `comfy_quant` nvfp4/mxfp8) decides it
//!   next (`fp8_scaled`, `nvfp4`, `mxfp8`: the layout of most quantized layers).
//! - **GGUF**: `general.file_type` when present, else the dominant tensor type by bytes.
//! - **pickle checkpoints** (`.ckpt`, `.pt`, `.pth`, `.bin`): recognised and reported with
//!   `supported_as_source: false`; `detect` returns `Ok` for them (the CLI prints "not supported
//!   as a source").
//!
//! The file name is used only as a last resort (no floating-point tensors to go by), and the
//! result then says `evidence: filename_guess`.
//!
//! Decisions worth knowing:
//! - Pickle checkpoints are `Ok` with `supported_as_source: false` (not an error), so
//!   `convcache detect` can list them next to other files.
//! - A safetensors file whose dominant floating dtype is one of the newer formats (F4, F6,
//!   F8_E8M0, the FNUZ fp8 variants) is `Ok` with `precision: None`, `supported_as_source:
//!   false` and a note naming the dtype; the minority dtypes (norms, scales) are not promoted
//!   to the file's precision.
//! - Errors are [`DetectError`], one line `PATH: problem`, with a stable [`DetectError::kind`].

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Serialize;
use tensorfile::gguf::{FileType, GgmlType, GgufError, GgufFile, MetadataValue};

use crate::precision::{Container, Precision};
use tensorfile::diffusers::Mapping;
use tensorfile::safetensors::{self, Dtype, Header, HeaderError, SafetensorsError, TensorEntry};
use tensorfile::scaled::{LayoutError, ScaledLayout};
use tensorfile::sharded::{ShardError, ShardedSource};

/// What [`detect`] found. This struct, serialized, is the stable JSON of
/// `convcache detect --json`; every field is documented with its JSON spelling.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Detection {
    /// The path as given (in JSON, non-UTF-8 bytes are replaced by U+FFFD).
    #[serde(serialize_with = "serialize_path_lossy")]
    pub path: PathBuf,
    /// The container: `"safetensors"`, `"gguf"` or `"pickle"`.
    pub format: Format,
    /// The precision as its canonical name (`"bf16"`, `"fp8_e4m3fn"`, `"nf4"`, `"fp8_scaled"`,
    /// `"nvfp4"`, `"Q4_K_M"`, `"F16"` for an F16 GGUF file, ...), or `null` when it cannot be
    /// determined (pickle checkpoints; files whose dominant floating dtype convcache cannot
    /// read, like F4/F6 or the FNUZ/E8M0 fp8 variants; integer-only files without a precision
    /// in their name).
    pub precision: Option<Precision>,
    /// How `precision` was determined: `"header"`, `"filename_guess"` (the header had nothing
    /// to go by; the file name's suffix was used), or `"undetermined"` (`precision` is null).
    pub evidence: Evidence,
    /// Whether convcache can read this file as a conversion source: false for pickle
    /// checkpoints and for files whose dominant floating dtype it cannot read. `notes` says why.
    pub supported_as_source: bool,
    /// Per-dtype counts, largest byte total first (ties: more tensors first, then by name).
    /// `dtype` is the safetensors dtype string (`"BF16"`, `"F8_E4M3"`, `"U8"`) or the ggml
    /// type name (`"Q4_K"`, `"F32"`).
    pub histogram: Vec<DtypeCount>,
    /// The model architecture (`"flux"`, `"sdxl"`, ...): GGUF's `general.architecture`; for
    /// safetensors, detected from the tensor names. `null` when unknown.
    pub architecture: Option<String>,
    /// Which models folder outputs go to: `"diffusion_models"` or `"text_encoders"`
    /// ([`crate::arch::ModelKind::of_architecture`] of `architecture`, set with it).
    pub model_kind: crate::arch::ModelKind,
    /// ComfyUI scaled-fp8 layout, when present (safetensors only).
    pub fp8_scaling: Option<Fp8Scaling>,
    /// bitsandbytes layout, when present (safetensors only); it decides `precision`.
    pub bitsandbytes: Option<BnbLayout>,
    /// safetensors `__metadata__`; for GGUF, the string, number and boolean metadata values
    /// rendered as strings (arrays are left out).
    pub metadata: BTreeMap<String, String>,
    /// Size of the file in bytes; for a sharded source, of the index and every shard.
    pub file_size: u64,
    /// For a sharded source (a `*.safetensors.index.json`, or a folder holding one), the
    /// number of shards. Absent from the JSON for a single file (whose fields stay as they
    /// were).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shards: Option<u64>,
    /// For a model in a diffusers layout, which one (`"flux"`, `"sd3"`, `"unet"`, `"wan"`,
    /// `"z_image"`, `"lumina2"`, `"flux2"`: [`tensorfile::diffusers::Layout::name`]): converters read it in ComfyUI's layout ([`tensorfile::diffusers`]), and
    /// `architecture` is detected from those names. Absent from the JSON otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diffusers: Option<String>,
    /// Number of tensors.
    pub tensor_count: u64,
    /// GGUF only: the `general.file_type` name (`"Q4_K_M"`), or `"unknown (N)"` for an id
    /// convcache does not know; `null` when absent or not GGUF.
    pub gguf_file_type: Option<String>,
    /// Human-readable remarks (why `precision` is null, a guess, or how it was inferred).
    pub notes: Vec<String>,
}

fn serialize_path_lossy<S: serde::Serializer>(path: &Path, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&path.to_string_lossy())
}

/// A file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// safetensors.
    Safetensors,
    /// GGUF.
    Gguf,
    /// A PyTorch pickle checkpoint (`.ckpt`, `.pt`, `.pth`, `.bin`): recognised, not supported
    /// as a source.
    Pickle,
}

impl Format {
    /// The lowercase name, as in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Format::Safetensors => "safetensors",
            Format::Gguf => "gguf",
            Format::Pickle => "pickle",
        }
    }
}

/// How a precision was determined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Evidence {
    /// From the header's dtypes, metadata or layout.
    Header,
    /// The header had no floating-point tensors; the file name's suffix was used.
    FilenameGuess,
    /// No precision was determined.
    Undetermined,
}

/// One row of the dtype histogram.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DtypeCount {
    /// safetensors dtype string or ggml type name.
    pub dtype: String,
    /// Tensors of this dtype.
    pub tensors: u64,
    /// Data bytes of those tensors.
    pub bytes: u64,
}

/// ComfyUI's scaled-fp8 layouts: fp8 weights with per-tensor float32 scales (parsed by
/// `tensorfile::scaled`, the one reader of these layouts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Fp8Scaling {
    /// `"scaled_fp8"` (the legacy marker and `scale_weight` layout) or `"comfy_quant"`
    /// (ComfyUI's per-layer mixed-precision layout, `weight_scale`).
    pub layout: &'static str,
    /// Scaled layers per `comfy_quant` format (`"float8_e4m3fn"`, `"float8_e5m2"`, and
    /// `"nvfp4"`, `"mxfp8"` where the reader serves them); legacy layers are named by their
    /// weight dtype.
    pub formats: BTreeMap<String, u64>,
    /// The key of the `scaled_fp8` marker tensor, if present.
    pub marker: Option<String>,
    /// The marker's dtype (ComfyUI reads the fp8 flavour from it; F32 means e4m3fn).
    pub marker_dtype: Option<String>,
    /// Number of weight scales (`scale_weight` or `weight_scale`; one per scaled weight).
    pub scale_weights: u64,
    /// Number of activation scales (`scale_input` or `input_scale`).
    pub scale_inputs: u64,
}

/// A bitsandbytes quantization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BnbQuantType {
    /// 4-bit NormalFloat.
    Nf4,
    /// 4-bit float.
    Fp4,
    /// LLM.int8 (row-wise absmax, `SCB` scales).
    Int8,
}

impl BnbQuantType {
    /// The precision it stands for.
    pub fn precision(self) -> Precision {
        match self {
            BnbQuantType::Nf4 => Precision::Nf4,
            BnbQuantType::Fp4 => Precision::Fp4,
            BnbQuantType::Int8 => Precision::Int8,
        }
    }
}

/// A bitsandbytes layout found in a safetensors header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BnbLayout {
    /// `"nf4"`, `"fp4"` or `"int8"`.
    pub quant_type: BnbQuantType,
    /// Number of quantized weights (quant-state tensors for 4-bit; `I8` weights with an `SCB`
    /// for int8).
    pub quantized_weights: u64,
    /// 4-bit only: whether the absmax values are themselves quantized (`nested_absmax` keys).
    pub double_quant: bool,
}

/// What marks a bitsandbytes 4-bit quant-state key: `W.quant_state.bitsandbytes__<type>`, for
/// the weight `W`.
pub const BNB_QUANT_STATE_MARK: &str = ".quant_state.bitsandbytes__";

/// A 4-bit quant-state key, `W.quant_state.bitsandbytes__<type>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BnbQuantStateKey {
    /// Position of the quant-state tensor in the parsed list.
    pub index: usize,
    /// The weight's key, `W` (it may be missing from the file).
    pub weight: String,
    /// The type the key's suffix names, `None` when it is neither `nf4` nor `fp4`.
    pub quant_type: Option<BnbQuantType>,
}

/// An LLM.int8 weight: an I8 `P.weight` with its `P.SCB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BnbInt8Keys {
    /// Position of `P.weight` in the parsed list.
    pub weight: usize,
    /// Position of `P.SCB` in the parsed list.
    pub scb: usize,
}

/// The bitsandbytes keys of a safetensors file: the one reading of the layout's key names,
/// which [`detect`] summarizes as a [`BnbLayout`] and the `bnb` converter dequantizes from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BnbKeys {
    /// Every 4-bit quant-state key, in file order.
    pub quant_states: Vec<BnbQuantStateKey>,
    /// Every LLM.int8 weight, in file order of its `SCB`.
    pub int8: Vec<BnbInt8Keys>,
    /// Number of `W.nested_absmax` keys (double-quantized absmax).
    pub nested_absmax: u64,
}

impl BnbKeys {
    /// Reads the keys of a file's tensors, given as (name, dtype) in file order.
    pub fn parse<'a>(tensors: impl IntoIterator<Item = (&'a str, Dtype)>) -> BnbKeys {
        let tensors: Vec<(&str, Dtype)> = tensors.into_iter().collect();
        let by_name: HashMap<&str, usize> = tensors
            .iter()
            .enumerate()
            .map(|(i, &(n, _))| (n, i))
            .collect();
        let mut keys = BnbKeys::default();
        for (index, &(name, _)) in tensors.iter().enumerate() {
            if let Some(at) = name.find(BNB_QUANT_STATE_MARK) {
                let quant_type = match &name[at + BNB_QUANT_STATE_MARK.len()..] {
                    "nf4" => Some(BnbQuantType::Nf4),
                    "fp4" => Some(BnbQuantType::Fp4),
                    _ => None,
                };
                keys.quant_states.push(BnbQuantStateKey {
                    index,
                    weight: name[..at].to_owned(),
                    quant_type,
                });
            } else if name.ends_with(".weight.nested_absmax") {
                keys.nested_absmax += 1;
            } else if let Some(module) = name.strip_suffix(".SCB") {
                // LLM.int8 stores `P.SCB` next to an I8 `P.weight`.
                let weight = by_name.get(format!("{module}.weight").as_str()).copied();
                if let Some(weight) = weight.filter(|&w| tensors[w].1 == Dtype::I8) {
                    keys.int8.push(BnbInt8Keys { weight, scb: index });
                }
            }
        }
        keys
    }

    /// Whether the file has no bitsandbytes key.
    pub fn is_empty(&self) -> bool {
        self.quant_states.is_empty() && self.int8.is_empty()
    }

    /// The file's layout: the quantization with the most weights (ties: int8, then fp4).
    pub fn layout(&self) -> Option<BnbLayout> {
        let count = |qt| {
            self.quant_states
                .iter()
                .filter(|k| k.quant_type == Some(qt))
                .count() as u64
        };
        let (quant_type, quantized_weights) = [
            (BnbQuantType::Nf4, count(BnbQuantType::Nf4)),
            (BnbQuantType::Fp4, count(BnbQuantType::Fp4)),
            (BnbQuantType::Int8, self.int8.len() as u64),
        ]
        .into_iter()
        .max_by_key(|&(_, n)| n)?;
        (quantized_weights > 0).then_some(BnbLayout {
            quant_type,
            quantized_weights,
            double_quant: quant_type != BnbQuantType::Int8 && self.nested_absmax > 0,
        })
    }
}

/// Why a file could not be detected. Display: `PATH: problem`, one line (the CLI prints it
/// verbatim and exits 2).
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    /// The path does not exist.
    #[error("{}: no such file", path.display())]
    NotFound {
        /// The path.
        path: PathBuf,
    },
    /// The path is a directory.
    #[error("{}: is a directory, not a model file", path.display())]
    IsDirectory {
        /// The path.
        path: PathBuf,
    },
    /// The path is a device, FIFO or socket.
    #[error("{}: not a regular file", path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// The file cannot be opened for reading.
    #[error("{}: permission denied", path.display())]
    PermissionDenied {
        /// The path.
        path: PathBuf,
    },
    /// The file has no bytes.
    #[error("{}: the file is empty", path.display())]
    Empty {
        /// The path.
        path: PathBuf,
    },
    /// A safetensors file that ends before its header does.
    #[error("{}: {source}", path.display())]
    Truncated {
        /// The path.
        path: PathBuf,
        /// [`HeaderError::TooShort`] or [`HeaderError::HeaderPastEnd`].
        source: HeaderError,
    },
    /// An invalid safetensors header.
    #[error("{}: {source}", path.display())]
    Header {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        source: HeaderError,
    },
    /// An invalid GGUF file (the GGUF error already names the path; control characters
    /// from names in the file are escaped to keep the message on one line).
    #[error("{}", one_line(&source.to_string()))]
    Gguf {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        source: GgufError,
    },
    /// Neither safetensors, GGUF nor a pickle checkpoint, by content or extension.
    #[error(
        "{}: unknown format (not safetensors, GGUF or a pickle checkpoint; first bytes {magic})",
        path.display()
    )]
    UnknownFormat {
        /// The path.
        path: PathBuf,
        /// The first bytes, in hex.
        magic: String,
    },
    /// Another I/O error.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A sharded source whose index or shards are invalid, missing or unreadable (the error
    /// names the file at fault).
    #[error("{}", one_line(&source.to_string()))]
    Sharded {
        /// The path as given.
        path: PathBuf,
        /// What is wrong.
        source: ShardError,
    },
}

impl DetectError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            DetectError::NotFound { path }
            | DetectError::IsDirectory { path }
            | DetectError::NotAFile { path }
            | DetectError::PermissionDenied { path }
            | DetectError::Empty { path }
            | DetectError::Truncated { path, .. }
            | DetectError::Header { path, .. }
            | DetectError::Gguf { path, .. }
            | DetectError::UnknownFormat { path, .. }
            | DetectError::Io { path, .. }
            | DetectError::Sharded { path, .. } => path,
        }
    }

    /// A stable snake_case name of the error kind: `not_found`, `is_directory`, `not_a_file`,
    /// `permission_denied`, `empty`, `truncated`, `gguf`, `unknown_format`, `io`, or for header
    /// errors the [`HeaderError::kind`] (`overlap`, `unknown_dtype`, ...), for sharded sources
    /// the [`ShardError::kind`] (`missing_shard`, `not_in_shard`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            DetectError::NotFound { .. } => "not_found",
            DetectError::IsDirectory { .. } => "is_directory",
            DetectError::NotAFile { .. } => "not_a_file",
            DetectError::PermissionDenied { .. } => "permission_denied",
            DetectError::Empty { .. } => "empty",
            DetectError::Truncated { .. } => "truncated",
            DetectError::Header { source, .. } => source.kind(),
            DetectError::Gguf { .. } => "gguf",
            DetectError::UnknownFormat { .. } => "unknown_format",
            DetectError::Io { .. } => "io",
            DetectError::Sharded { source, .. } => source.kind(),
        }
    }

    /// Maps an I/O error on `path` to its specific variant (missing, directory, permission).
    pub fn from_io(path: &Path, source: io::Error) -> DetectError {
        let path = path.to_owned();
        match source.kind() {
            io::ErrorKind::NotFound => DetectError::NotFound { path },
            io::ErrorKind::PermissionDenied => DetectError::PermissionDenied { path },
            io::ErrorKind::IsADirectory => DetectError::IsDirectory { path },
            _ => DetectError::Io { path, source },
        }
    }

    fn from_safetensors(err: SafetensorsError) -> DetectError {
        match err {
            SafetensorsError::Io { path, source } => DetectError::from_io(&path, source),
            SafetensorsError::NotAFile { path } => DetectError::NotAFile { path },
            SafetensorsError::Header { path, source } if source.is_truncation() => {
                DetectError::Truncated { path, source }
            }
            SafetensorsError::Header { path, source } => DetectError::Header { path, source },
            err @ SafetensorsError::Changed { .. } => DetectError::Io {
                path: err.path().to_owned(),
                source: io::Error::other(err.to_string()),
            },
        }
    }
}

/// `message` with control characters (a newline in a tensor name) escaped.
fn one_line(message: &str) -> String {
    message
        .chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// Bytes read to sniff the format.
const SNIFF_LEN: usize = 16;

/// Detects `path`'s format and precision from its header, reading only the header bytes.
///
/// A shard index (`*.safetensors.index.json`), or a folder holding exactly one, is one source:
/// every shard's header is read and checked against the index, and the detection covers all
/// shards (see [`tensorfile::sharded`]).
///
/// A diffusers repository folder stands for its model ([`tensorfile::diffusers::resolve_source`]:
/// the root for `transformer/` or `unet/`, a folder without an index for its
/// `diffusion_pytorch_model.safetensors`); the detection's `path` is what it stands for.
pub fn detect(path: &Path) -> Result<Detection, DetectError> {
    let resolved = tensorfile::diffusers::resolve_source(path);
    let path = resolved.as_path();
    let sharded = |source| DetectError::Sharded {
        path: path.to_owned(),
        source,
    };
    if tensorfile::sharded::locate_index(path)
        .map_err(sharded)?
        .is_some()
    {
        return ShardedSource::open(path)
            .map(|source| detect_sharded(path, &source))
            .map_err(sharded);
    }
    let meta = std::fs::metadata(path).map_err(|e| DetectError::from_io(path, e))?;
    if meta.is_dir() {
        return Err(DetectError::IsDirectory {
            path: path.to_owned(),
        });
    }
    if !meta.is_file() {
        // Never open a FIFO or device: reading one can block forever.
        return Err(DetectError::NotAFile {
            path: path.to_owned(),
        });
    }
    let mut file = File::open(path).map_err(|e| DetectError::from_io(path, e))?;
    let file_len = file
        .metadata()
        .map_err(|e| DetectError::from_io(path, e))?
        .len();
    if file_len == 0 {
        return Err(DetectError::Empty {
            path: path.to_owned(),
        });
    }
    let mut head = Vec::with_capacity(SNIFF_LEN);
    (&mut file)
        .take(SNIFF_LEN as u64)
        .read_to_end(&mut head)
        .map_err(|e| DetectError::from_io(path, e))?;

    match sniff(&head, file_len, path) {
        Some(Format::Safetensors) => {
            file.seek(SeekFrom::Start(0))
                .map_err(|e| DetectError::from_io(path, e))?;
            let header = safetensors::read_header_from(&mut file, path, file_len)
                .map_err(DetectError::from_safetensors)?;
            // The comfy_quant layout keeps each layer's format in a tiny U8 tensor: read those
            // (at most 64 KiB each, bounds-checked against the validated header), nothing else.
            let mut read_small = |t: &TensorEntry| {
                let mut buf = vec![0u8; t.byte_len() as usize];
                let at = header.data_start + t.data_offsets.0;
                std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, at).map_err(
                    |source| SafetensorsError::Io {
                        path: path.to_owned(),
                        source,
                    },
                )?;
                Ok(buf)
            };
            let scaled = ScaledLayout::parse(&header, &mut read_small);
            Ok(detect_safetensors(path, &header, file_len, scaled))
        }
        Some(Format::Gguf) => {
            drop(file);
            let gguf = GgufFile::open(path).map_err(|source| DetectError::Gguf {
                path: path.to_owned(),
                source,
            })?;
            Ok(detect_gguf(path, &gguf, file_len))
        }
        Some(Format::Pickle) => Ok(Detection {
            path: path.to_owned(),
            format: Format::Pickle,
            precision: None,
            evidence: Evidence::Undetermined,
            supported_as_source: false,
            histogram: Vec::new(),
            architecture: None,
            model_kind: crate::arch::ModelKind::DiffusionModel,
            fp8_scaling: None,
            bitsandbytes: None,
            metadata: BTreeMap::new(),
            file_size: file_len,
            shards: None,
            diffusers: None,
            tensor_count: 0,
            gguf_file_type: None,
            notes: vec![
                "pickle checkpoint: recognised but not supported as a source (pickle files can \
                 run code when loaded; convert it to safetensors with a trusted tool first)"
                    .to_owned(),
            ],
        }),
        None => Err(DetectError::UnknownFormat {
            path: path.to_owned(),
            magic: head.iter().take(8).map(|b| format!("{b:02x}")).collect(),
        }),
    }
}

fn extension(path: &Path) -> Option<String> {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
}

/// The format by content, then by extension. `head` is the first (up to) [`SNIFF_LEN`] bytes.
///
/// Strong content signatures win over the extension; the one-byte pickle protocol marker is
/// weak (a safetensors header length can start with 0x80), so it only counts when the extension
/// says nothing.
fn sniff(head: &[u8], file_len: u64, path: &Path) -> Option<Format> {
    if let Some(first8) = head.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
        let header_len = u64::from_le_bytes(first8);
        if head.get(8) == Some(&b'{')
            && header_len <= safetensors::MAX_HEADER_LEN
            && 8 + header_len <= file_len
        {
            return Some(Format::Safetensors);
        }
    }
    if head.starts_with(b"GGUF") {
        return Some(Format::Gguf);
    }
    // torch.save's zip archive format (PyTorch >= 1.6).
    if head.starts_with(b"PK\x03\x04") {
        return Some(Format::Pickle);
    }
    match extension(path).as_deref() {
        Some("safetensors" | "sft") => return Some(Format::Safetensors),
        Some("gguf") => return Some(Format::Gguf),
        Some("ckpt" | "pt" | "pth" | "bin") => return Some(Format::Pickle),
        _ => {}
    }
    // Legacy torch.save: a pickle stream, protocol 2..=5.
    if head.first() == Some(&0x80) && matches!(head.get(1), Some(2..=5)) {
        return Some(Format::Pickle);
    }
    None
}

fn sorted_histogram(rows: BTreeMap<String, (u64, u64)>) -> Vec<DtypeCount> {
    let mut hist: Vec<DtypeCount> = rows
        .into_iter()
        .map(|(dtype, (tensors, bytes))| DtypeCount {
            dtype,
            tensors,
            bytes,
        })
        .collect();
    hist.sort_by(|a, b| {
        b.bytes
            .cmp(&a.bytes)
            .then(b.tensors.cmp(&a.tensors))
            .then(a.dtype.cmp(&b.dtype))
    });
    hist
}

/// The floating dtype holding the most bytes (ties: more tensors, then the enum order).
fn dominant_float(header: &Header) -> Option<Dtype> {
    let mut per_dtype: BTreeMap<Dtype, (u64, u64)> = BTreeMap::new();
    for t in header.tensors.iter().filter(|t| t.dtype.is_float()) {
        let e = per_dtype.entry(t.dtype).or_default();
        e.0 = e.0.saturating_add(t.byte_len());
        e.1 += 1;
    }
    per_dtype
        .into_iter()
        .max_by_key(|&(_, (bytes, tensors))| (bytes, tensors))
        .map(|(d, _)| d)
}

fn detect_bitsandbytes(header: &Header) -> Option<BnbLayout> {
    BnbKeys::parse(header.tensors.iter().map(|t| (t.name.as_str(), t.dtype))).layout()
}

fn fp8_scaling(layout: &ScaledLayout) -> Fp8Scaling {
    Fp8Scaling {
        layout: layout.kind.name(),
        formats: layout.formats.clone(),
        marker: layout.marker.as_ref().map(|(name, _)| name.clone()),
        marker_dtype: layout.marker.as_ref().map(|(_, d)| d.as_str().to_owned()),
        scale_weights: layout.layers.len() as u64,
        scale_inputs: layout.input_scales,
    }
}

/// The precision of a file with ComfyUI quantized layers: the layout of most of them
/// (`fp8_scaled` for both fp8 flavours and the legacy layout, `nvfp4`, `mxfp8`; ties go to the
/// later of these). A file mixing layouts gets a note; the per-format counts stay in
/// [`Fp8Scaling::formats`].
fn comfy_quant_precision(
    formats: &BTreeMap<String, u64>,
    notes: &mut Vec<String>,
) -> Option<Precision> {
    let mut layers: BTreeMap<Precision, u64> = BTreeMap::new();
    for (format, &n) in formats {
        if let Some(p) = Precision::from_comfy_quant_format(format) {
            *layers.entry(p).or_default() += n;
        }
    }
    let (&precision, _) = layers.iter().max_by_key(|&(_, &n)| n)?;
    if layers.len() > 1 {
        let counts: Vec<String> = layers.iter().map(|(p, n)| format!("{n} {p}")).collect();
        notes.push(format!(
            "mixed ComfyUI quantization ({} layers): reported as {precision}, the layout of \
             most quantized layers",
            counts.join(", ")
        ));
    }
    Some(precision)
}

/// The precision a file name's suffix names (`flux_fp8_e4m3fn`, `model_Q4_K_M`), trying the
/// longest `_`-separated suffix first so `fp8_e4m3fn` wins over `e4m3fn`.
fn guess_from_file_name(path: &Path, container: Container) -> Option<Precision> {
    let stem = path.file_stem()?.to_str()?;
    stem.match_indices('_').find_map(|(i, _)| {
        let suffix = &stem[i + 1..];
        Precision::from_suffix(suffix, container).or_else(|| {
            suffix
                .parse::<Precision>()
                .ok()
                .filter(|p| p.container() == container)
        })
    })
}

/// The architecture from safetensors tensor names, by ComfyUI-GGUF's key-set rules
/// ([`crate::arch`]), on names stripped of the `model.diffusion_model.` prefix. A model in the
/// diffusers layout is still named, with a note (convcache cannot convert that layout to GGUF).
fn architecture_from_tensor_names<'a>(
    names: impl Iterator<Item = &'a str>,
    notes: &mut Vec<String>,
) -> Option<String> {
    match crate::arch::detect_arch(names.map(crate::arch::strip_prefix)) {
        Ok(arch) => Some(arch.name().to_owned()),
        Err(crate::arch::ArchError::DiffusersLayout { arch }) => {
            notes.push(format!(
                "{} model in the diffusers layout (GGUF conversion needs the original layout)",
                arch.name()
            ));
            Some(arch.name().to_owned())
        }
        Err(_) => None,
    }
}

fn detect_safetensors(
    path: &Path,
    header: &Header,
    file_len: u64,
    scaled: Result<Option<ScaledLayout>, LayoutError>,
) -> Detection {
    let mut rows: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for t in &header.tensors {
        let e = rows.entry(t.dtype.as_str().to_owned()).or_default();
        e.0 += 1;
        e.1 = e.1.saturating_add(t.byte_len());
    }
    let bitsandbytes = detect_bitsandbytes(header);
    let mut notes = Vec::new();
    let mut supported_as_source = true;
    let fp8_scaling = match &scaled {
        Ok(layout) => layout.as_ref().map(fp8_scaling),
        Err(e) => {
            supported_as_source = false;
            notes.push(format!(
                "a ComfyUI quantized layout convcache cannot read: {e}"
            ));
            None
        }
    };

    let comfy_quant = fp8_scaling
        .as_ref()
        .and_then(|s| comfy_quant_precision(&s.formats, &mut notes));
    let (precision, evidence) = if let Some(bnb) = bitsandbytes {
        (Some(bnb.quant_type.precision()), Evidence::Header)
    } else if let Some(p) = comfy_quant {
        (Some(p), Evidence::Header)
    } else if let Some(dtype) = dominant_float(header) {
        match Precision::from_safetensors_dtype(dtype) {
            Some(p) => (Some(p), Evidence::Header),
            None if dtype.is_convertible_float() => {
                notes.push(format!(
                    "most floating-point bytes are {dtype}, which has no precision name in \
                     convcache (it can still be converted from)"
                ));
                (None, Evidence::Undetermined)
            }
            None => {
                supported_as_source = false;
                notes.push(format!(
                    "most floating-point bytes are {dtype}, a dtype convcache recognises but \
                     cannot convert from"
                ));
                (None, Evidence::Undetermined)
            }
        }
    } else {
        match guess_from_file_name(path, Container::Safetensors) {
            Some(p) => {
                notes.push(format!(
                    "no floating-point tensors in the header; precision {p} guessed from the \
                     file name"
                ));
                (Some(p), Evidence::FilenameGuess)
            }
            None => {
                notes.push(
                    "no floating-point tensors in the header and no precision in the file name"
                        .to_owned(),
                );
                (None, Evidence::Undetermined)
            }
        }
    };

    if let Some(s) = &fp8_scaling {
        notes.push(format!(
            "ComfyUI quantized layers ({} layout): {} weight scales{}; converted dequantized",
            s.layout,
            s.scale_weights,
            if s.marker.is_some() {
                ", `scaled_fp8` marker present"
            } else {
                ""
            }
        ));
    }

    // A diffusers layout is read in ComfyUI's layout (what every converter receives), so the
    // architecture is the one of the mapped names.
    let mut diffusers = None;
    let mapped = match (&fp8_scaling, &scaled) {
        (None, Ok(_)) => {
            let tensors = tensorfile::source::safetensors_tensors(header);
            match Mapping::plan(path, &tensors) {
                Ok(m) => m,
                Err(e) => {
                    supported_as_source = false;
                    notes.push(e.to_string());
                    None
                }
            }
        }
        _ => None,
    };
    let architecture = match &mapped {
        Some(m) => {
            diffusers = Some(m.layout().name().to_owned());
            notes.push(format!(
                "diffusers {} layout: read in ComfyUI's key layout ({})",
                m.layout().name(),
                m.layout().changes()
            ));
            architecture_from_tensor_names(m.tensors().iter().map(|t| t.name.as_str()), &mut notes)
        }
        None => architecture_from_tensor_names(
            header.tensors.iter().map(|t| t.name.as_str()),
            &mut notes,
        ),
    };

    Detection {
        path: path.to_owned(),
        format: Format::Safetensors,
        precision,
        evidence,
        supported_as_source,
        histogram: sorted_histogram(rows),
        model_kind: crate::arch::ModelKind::of_architecture(architecture.as_deref()),
        architecture,
        fp8_scaling,
        bitsandbytes,
        metadata: header.metadata.clone(),
        file_size: file_len,
        shards: None,
        diffusers,
        tensor_count: header.tensors.len() as u64,
        gguf_file_type: None,
        notes,
    }
}

/// The detection of a sharded source: as one safetensors file holding every shard's tensors,
/// with the shards' merged metadata. A shard with a scaled-fp8 layout makes it unsupported.
fn detect_sharded(path: &Path, source: &ShardedSource) -> Detection {
    let header = Header {
        metadata: tensorfile::TensorSource::metadata(source).clone(),
        tensors: source
            .shards()
            .iter()
            .flat_map(|s| s.header.tensors.iter().cloned())
            .collect(),
        data_start: 0,
    };
    let scaled = match source.scaled_shard() {
        None => Ok(None),
        Some(shard) => Err(LayoutError {
            tensor: shard.display().to_string(),
            problem: "a scaled-fp8 layout in a sharded source is not supported".into(),
        }),
    };
    let size = source
        .shards()
        .iter()
        .map(|s| s.file_len())
        .fold(source.index().bytes.len() as u64, u64::saturating_add);
    Detection {
        shards: Some(source.shards().len() as u64),
        ..detect_safetensors(path, &header, size, scaled)
    }
}

/// A non-negative integer metadata value.
fn metadata_uint(v: &MetadataValue) -> Option<u64> {
    match *v {
        MetadataValue::U8(x) => Some(x.into()),
        MetadataValue::U16(x) => Some(x.into()),
        MetadataValue::U32(x) => Some(x.into()),
        MetadataValue::U64(x) => Some(x),
        MetadataValue::I8(x) => u64::try_from(x).ok(),
        MetadataValue::I16(x) => u64::try_from(x).ok(),
        MetadataValue::I32(x) => u64::try_from(x).ok(),
        MetadataValue::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

/// A scalar metadata value as a string; `None` for arrays.
fn render_metadata(v: &MetadataValue) -> Option<String> {
    Some(match v {
        MetadataValue::U8(x) => x.to_string(),
        MetadataValue::I8(x) => x.to_string(),
        MetadataValue::U16(x) => x.to_string(),
        MetadataValue::I16(x) => x.to_string(),
        MetadataValue::U32(x) => x.to_string(),
        MetadataValue::I32(x) => x.to_string(),
        MetadataValue::U64(x) => x.to_string(),
        MetadataValue::I64(x) => x.to_string(),
        MetadataValue::F32(x) => x.to_string(),
        MetadataValue::F64(x) => x.to_string(),
        MetadataValue::Bool(x) => x.to_string(),
        MetadataValue::String(s) => s.clone(),
        MetadataValue::Array(_) => return None,
    })
}

fn detect_gguf(path: &Path, gguf: &GgufFile, file_len: u64) -> Detection {
    let mut rows: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut per_type: BTreeMap<GgmlType, (u64, u64)> = BTreeMap::new();
    for t in &gguf.tensors {
        let n = t
            .dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .unwrap_or(u64::MAX);
        let bytes = t.ggml_type.bytes_for(n).unwrap_or(0);
        let e = rows.entry(t.ggml_type.name().to_owned()).or_default();
        e.0 += 1;
        e.1 = e.1.saturating_add(bytes);
        let e = per_type.entry(t.ggml_type).or_default();
        e.0 = e.0.saturating_add(bytes);
        e.1 += 1;
    }

    let mut metadata = BTreeMap::new();
    let mut architecture = None;
    let mut file_type_id = None;
    for (key, value) in &gguf.metadata {
        if let Some(s) = render_metadata(value) {
            metadata.insert(key.clone(), s);
        }
        match key.as_str() {
            "general.architecture" => {
                if let MetadataValue::String(s) = value {
                    architecture = Some(s.clone());
                }
            }
            "general.file_type" => file_type_id = metadata_uint(value),
            _ => {}
        }
    }

    let mut notes = Vec::new();
    let known_file_type = file_type_id
        .and_then(|id| u32::try_from(id).ok())
        .and_then(FileType::from_id);
    let gguf_file_type = match (file_type_id, known_file_type) {
        (_, Some(ft)) => Some(ft.name().to_owned()),
        (Some(id), None) => {
            notes.push(format!(
                "general.file_type {id} is not a file type convcache knows; precision taken \
                 from the tensor types"
            ));
            Some(format!("unknown ({id})"))
        }
        (None, None) => None,
    };
    let dominant = per_type
        .into_iter()
        .max_by_key(|&(_, (bytes, tensors))| (bytes, tensors))
        .map(|(t, _)| t);
    let (precision, evidence) = match (known_file_type, dominant) {
        (Some(ft), _) => (Some(Precision::Gguf(ft)), Evidence::Header),
        (None, Some(t)) => {
            let p = Precision::gguf_from_dominant_type(t);
            if file_type_id.is_none() {
                notes.push(format!(
                    "no general.file_type; precision {p} inferred from the dominant tensor \
                     type {t}"
                ));
            }
            (Some(p), Evidence::Header)
        }
        (None, None) => match guess_from_file_name(path, Container::Gguf) {
            Some(p) => {
                notes.push(format!(
                    "no tensors and no general.file_type; precision {p} guessed from the \
                     file name"
                ));
                (Some(p), Evidence::FilenameGuess)
            }
            None => {
                notes.push("no tensors and no general.file_type".to_owned());
                (None, Evidence::Undetermined)
            }
        },
    };

    Detection {
        path: path.to_owned(),
        format: Format::Gguf,
        precision,
        evidence,
        supported_as_source: true,
        histogram: sorted_histogram(rows),
        model_kind: crate::arch::ModelKind::of_architecture(architecture.as_deref()),
        architecture,
        fp8_scaling: None,
        bitsandbytes: None,
        metadata,
        file_size: file_len,
        shards: None,
        diffusers: None,
        tensor_count: gguf.tensors.len() as u64,
        gguf_file_type,
        notes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_map_to_specific_variants() {
        let p = Path::new("/models/x.safetensors");
        let e = DetectError::from_io(p, io::Error::from(io::ErrorKind::PermissionDenied));
        assert_eq!(e.kind(), "permission_denied");
        assert_eq!(e.to_string(), "/models/x.safetensors: permission denied");
        let e = DetectError::from_io(p, io::Error::from(io::ErrorKind::NotFound));
        assert_eq!(e.kind(), "not_found");
        let e = DetectError::from_io(p, io::Error::from(io::ErrorKind::IsADirectory));
        assert_eq!(e.kind(), "is_directory");
        let e = DetectError::from_io(p, io::Error::other("disk on fire"));
        assert_eq!(e.kind(), "io");
        assert_eq!(e.to_string(), "/models/x.safetensors: disk on fire");
    }

    #[test]
    fn sniffing_prefers_content_over_extension() {
        let mut st = 2u64.to_le_bytes().to_vec();
        st.extend_from_slice(b"{}");
        assert_eq!(
            sniff(&st, 10, Path::new("a.bin")),
            Some(Format::Safetensors)
        );
        assert_eq!(
            sniff(b"GGUF\x03\0\0\0", 100, Path::new("a.safetensors")),
            Some(Format::Gguf)
        );
        assert_eq!(
            sniff(b"PK\x03\x04rest", 100, Path::new("a.safetensors")),
            Some(Format::Pickle)
        );
        // A safetensors length whose low byte is 0x80 must not read as a pickle.
        let weak = [0x80, 0x02, 0, 0, 0, 0, 0, 0, b'['];
        assert_eq!(
            sniff(&weak, 1000, Path::new("a.safetensors")),
            Some(Format::Safetensors)
        );
        assert_eq!(sniff(&weak, 1000, Path::new("a")), Some(Format::Pickle));
        assert_eq!(sniff(b"hello", 5, Path::new("a.txt")), None);
        assert_eq!(
            sniff(b"hello", 5, Path::new("a.CKPT")),
            Some(Format::Pickle)
        );
    }

    #[test]
    fn comfy_quant_files_are_the_layout_of_most_layers() {
        let formats = |pairs: &[(&str, u64)]| -> BTreeMap<String, u64> {
            pairs.iter().map(|&(f, n)| (f.to_owned(), n)).collect()
        };
        let mut notes = Vec::new();
        let p = comfy_quant_precision(
            &formats(&[("float8_e4m3fn", 3), ("float8_e5m2", 1)]),
            &mut notes,
        );
        assert_eq!(p, Some(Precision::Fp8Scaled));
        assert!(notes.is_empty(), "both fp8 flavours are one layout");
        let p = comfy_quant_precision(
            &formats(&[("float8_e4m3fn", 2), ("nvfp4", 5), ("mxfp8", 1)]),
            &mut notes,
        );
        assert_eq!(p, Some(Precision::Nvfp4));
        assert_eq!(notes.len(), 1);
        assert!(
            notes[0].contains("2 fp8_scaled, 5 nvfp4, 1 mxfp8"),
            "{notes:?}"
        );
        assert_eq!(
            comfy_quant_precision(&formats(&[("int8_tensorwise", 4)]), &mut notes),
            None
        );
    }

    #[test]
    fn file_name_guesses_take_the_longest_suffix() {
        let g = |name: &str, c| guess_from_file_name(Path::new(name), c);
        assert_eq!(
            g("flux_fp8_e4m3fn.safetensors", Container::Safetensors),
            Some(Precision::Fp8E4m3fn)
        );
        assert_eq!(
            g("sd_xl_base_1.0_fp16.safetensors", Container::Safetensors),
            Some(Precision::Fp16)
        );
        assert_eq!(
            g("flux_Q4_K_M.gguf", Container::Gguf),
            Some(Precision::Gguf(FileType::Q4KM))
        );
        assert_eq!(g("flux_dev.safetensors", Container::Safetensors), None);
        assert_eq!(g("flux_Q4_K_M.safetensors", Container::Safetensors), None);
    }
}
