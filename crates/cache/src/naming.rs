//! Output file names: `{basename}_{precision}.{ext}`, and parsing them back.
//!
//! The precision suffix is always the canonical name ([`Precision::canonical_name`]);
//! the extension is `safetensors` for safetensors precisions (plain and bitsandbytes) and
//! `gguf` for GGUF ones. Parsing matches the known suffixes longest first and never splits on
//! the last `_`, so `flux_fp8_e4m3fn` is (`flux`, fp8_e4m3fn) and `flux_Q4_K_M` is
//! (`flux`, Q4_K_M).
//!
//! A basename never ends in a precision suffix: [`basename_of`] strips them (repeatedly) from the
//! source's stem, so `flux_fp16.safetensors` converted to bf16 is `flux_bf16.safetensors`,
//! never `flux_fp16_bf16`. That is also what makes parsing exact: the only `_<precision>` at the
//! end of an output name is the one [`output_file_name`] put there.

use std::path::Path;

use detect::Precision;
use detect::precision::Container;

/// The file extension (without the dot) of outputs in `container`.
pub fn extension(container: Container) -> &'static str {
    match container {
        Container::Safetensors => "safetensors",
        Container::Gguf => "gguf",
    }
}

/// Aliases people put in file names besides the canonical names (compared case-insensitively).
/// Stripped from stems so the output does not repeat the precision in another spelling.
const STEM_ALIASES: &[&str] = &[
    "fp8",
    "f8",
    "f16",
    "f32",
    "float16",
    "float32",
    "bfloat16",
    "fp8_e4m3",
    "fp8_e5m2fn",
    "e4m3fn",
    "e5m2",
    "float8_e4m3fn",
    "float8_e5m2",
    "gguf_f16",
    "gguf_f32",
    "gguf_bf16",
    // ComfyUI quantized releases (`flux1-dev_fp8_e4m3fn_scaled`).
    "fp8_e4m3fn_scaled",
    "fp8scaled",
];

/// Every name a stem may end with that counts as a precision, longest first so that
/// `_fp8_e4m3fn` is stripped whole rather than as `_e4m3fn`.
fn stem_suffixes() -> Vec<String> {
    let mut v: Vec<String> = Precision::all()
        .map(|p| p.canonical_name().to_ascii_lowercase())
        .chain(STEM_ALIASES.iter().map(|s| s.to_string()))
        .collect();
    v.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
    v.dedup();
    v
}

/// Separators that may stand before a precision in a source stem (`flux_fp16`,
/// `flux1-dev-Q8_0`, `model.fp16`). Output names only ever use `_`.
const STEM_SEPARATORS: &[u8] = b"_-.";

/// Strips one trailing `<sep><precision>` from `stem`, if present and something remains.
fn strip_one(stem: &str, suffixes: &[String]) -> Option<usize> {
    let lower = stem.to_ascii_lowercase();
    for s in suffixes {
        if lower.len() > s.len() + 1 && lower.ends_with(s.as_str()) {
            let sep_at = lower.len() - s.len() - 1;
            if STEM_SEPARATORS.contains(&lower.as_bytes()[sep_at]) && sep_at > 0 {
                return Some(sep_at);
            }
        }
    }
    None
}

/// Folders a diffusers repository keeps a model in: a sharded source there is named after the
/// repository folder above (`FLUX.1-dev/transformer/` -> `FLUX.1-dev`).
const DIFFUSERS_MODEL_FOLDERS: &[&str] = &["transformer", "unet"];

/// The basename outputs of `source` are named after: the file stem without any trailing
/// precision suffix (repeatedly: `a_fp16_bf16` -> `a`).
///
/// A sharded source (a shard index, or a folder holding one), and a diffusers model kept in one
/// `diffusion_pytorch_model.safetensors`, is named after its model folder:
/// the index's folder, or the folder above it when that is a diffusers `transformer` or `unet`
/// folder (`FLUX.1-dev/transformer/` and `FLUX.1-dev/transformer/*.index.json` both give
/// `FLUX.1-dev`; `my-model/` gives `my-model`), with no extension cut off. In a Hugging Face
/// hub cache, where that folder is a revision (`models--org--NAME/snapshots/<revision>`), the
/// repository's `NAME`.
///
/// A stem that would become empty is kept as it is. Non-UTF-8 bytes are replaced (lossy): the
/// name is only a label, source identity is checked through the provenance.
pub fn basename_of(source: &Path) -> String {
    let mut stem = match sharded_model_folder(source) {
        Some(folder) => folder,
        None => {
            let name = file_name(source);
            match name.rfind('.') {
                Some(i) if i > 0 => name[..i].to_string(),
                _ => name,
            }
        }
    };
    let suffixes = stem_suffixes();
    while let Some(cut) = strip_one(&stem, &suffixes) {
        stem.truncate(cut);
    }
    if stem.is_empty() {
        stem.push_str("model");
    }
    stem
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The model folder's name when `source` is a sharded source (see [`basename_of`]).
fn sharded_model_folder(source: &Path) -> Option<String> {
    // A diffusers model kept in one file is named like a sharded one: by its folders.
    let single = source.file_name()
        == Some(std::ffi::OsStr::new(
            tensorfile::diffusers::SINGLE_FILE_NAME,
        ));
    let index = if single {
        source.to_owned()
    } else {
        tensorfile::sharded::locate_index(source).ok().flatten()?
    };
    // The folder canonical (so that `.` or `transformer/..` still has a name), the index not
    // resolved: in a model hub's cache it is a link into a folder of blobs.
    let folder = match index.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let folder = std::fs::canonicalize(folder).ok()?;
    let model = match folder.file_name()?.to_str() {
        Some(name) if DIFFUSERS_MODEL_FOLDERS.contains(&name) => folder.parent()?,
        _ => &folder,
    };
    Some(hub_repository_name(model).unwrap_or_else(|| file_name(model))).filter(|n| !n.is_empty())
}

/// The repository's name when `folder` is a revision in a Hugging Face hub cache
/// (`models--black-forest-labs--FLUX.1-dev/snapshots/<revision>` -> `FLUX.1-dev`).
fn hub_repository_name(folder: &Path) -> Option<String> {
    let snapshots = folder.parent()?;
    if snapshots.file_name()? != "snapshots" {
        return None;
    }
    let repo = snapshots.parent()?.file_name()?.to_str()?;
    let name = repo.strip_prefix("models--")?.rsplit("--").next()?;
    Some(name.to_owned())
}

/// The output file name for `basename` in `target`: `{basename}_{canonical}.{ext}`.
pub fn output_file_name(basename: &str, target: Precision) -> String {
    format!(
        "{basename}_{}.{}",
        target.canonical_name(),
        extension(target.container())
    )
}

/// The basename used when the plain basename already belongs to another source:
/// `{basename}-{first 8 hex digits of the source digest}`.
pub fn disambiguated_basename(basename: &str, short_digest: &str) -> String {
    format!("{basename}-{short_digest}")
}

/// Parses an output file name back into (basename, precision); `None` when the name is not one
/// [`output_file_name`] can produce (wrong extension, no precision suffix, empty basename).
///
/// Exact: `parse_output_name(&output_file_name(b, p)) == Some((b, p))` for every basename
/// [`basename_of`] returns and every precision.
pub fn parse_output_name(file_name: &str) -> Option<(String, Precision)> {
    let (stem, ext) = file_name.rsplit_once('.')?;
    let container = match ext {
        "safetensors" => Container::Safetensors,
        "gguf" => Container::Gguf,
        _ => return None,
    };
    let mut candidates: Vec<Precision> = Precision::all()
        .filter(|p| p.container() == container)
        .collect();
    candidates.sort_by_key(|p| std::cmp::Reverse(p.canonical_name().len()));
    for p in candidates {
        let suffix = p.canonical_name();
        if let Some(base) = stem.strip_suffix(suffix).and_then(|b| b.strip_suffix('_'))
            && !base.is_empty()
        {
            return Some((base.to_string(), p));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tensorfile::gguf::FileType;

    /// An index (the shards need not exist for naming) at `rel` under `root`.
    fn index_at(root: &Path, rel: &str) -> std::path::PathBuf {
        let index = root.join(rel);
        std::fs::create_dir_all(index.parent().unwrap()).unwrap();
        std::fs::write(&index, b"{}").unwrap();
        index
    }

    #[test]
    fn a_sharded_source_is_named_after_its_model_folder() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let index = "diffusion_pytorch_model.safetensors.index.json";
        let flux = index_at(root, &format!("FLUX.1-dev/transformer/{index}"));
        assert_eq!(basename_of(&flux), "FLUX.1-dev");
        assert_eq!(basename_of(flux.parent().unwrap()), "FLUX.1-dev");
        let trailing = format!("{}/", flux.parent().unwrap().display());
        assert_eq!(basename_of(Path::new(&trailing)), "FLUX.1-dev");
        let sdxl = index_at(root, &format!("sdxl-base/unet/{index}"));
        assert_eq!(basename_of(sdxl.parent().unwrap()), "sdxl-base");
        // A plain folder: its own name, precision suffix stripped, no extension cut.
        let plain = index_at(root, "my.model_fp16/model.safetensors.index.json");
        assert_eq!(basename_of(plain.parent().unwrap()), "my.model");
        assert_eq!(basename_of(&plain), "my.model");
        // A hub cache revision: the repository's name.
        let hub = index_at(
            root,
            &format!(
                "models--black-forest-labs--FLUX.1-schnell/snapshots/0123abc/transformer/{index}"
            ),
        );
        assert_eq!(basename_of(&hub), "FLUX.1-schnell");
        // A folder without an index is not a sharded source: named like a file.
        assert_eq!(basename_of(&root.join("FLUX.1-dev")), "FLUX");
    }

    #[test]
    fn examples_from_the_issue() {
        assert_eq!(basename_of(Path::new("m/flux_fp16.safetensors")), "flux");
        assert_eq!(
            output_file_name(
                &basename_of(Path::new("flux_fp16.safetensors")),
                Precision::Bf16
            ),
            "flux_bf16.safetensors"
        );
        assert_eq!(
            output_file_name(
                &basename_of(Path::new("flux_fp8_e4m3fn.safetensors")),
                Precision::Fp8E4m3fn
            ),
            "flux_fp8_e4m3fn.safetensors"
        );
        assert_eq!(basename_of(Path::new("flux1-dev-Q8_0.gguf")), "flux1-dev");
        assert_eq!(basename_of(Path::new("a_fp16_bf16.safetensors")), "a");
        assert_eq!(basename_of(Path::new("flux_FP16.safetensors")), "flux");
        assert_eq!(basename_of(Path::new("fp16.safetensors")), "fp16");
        assert_eq!(
            basename_of(Path::new("flux.1-dev.safetensors")),
            "flux.1-dev"
        );
        assert_eq!(
            output_file_name("flux", Precision::Gguf(FileType::Q4KM)),
            "flux_Q4_K_M.gguf"
        );
    }

    #[test]
    fn parses_every_precision_exactly() {
        for p in Precision::all() {
            for base in ["flux", "a_b", "x_fp8", "flux-0123abcd", "q4_k"] {
                let name = output_file_name(base, p);
                assert_eq!(
                    parse_output_name(&name),
                    Some((base.to_string(), p)),
                    "{name}"
                );
            }
        }
        assert_eq!(
            parse_output_name("flux_fp8_e4m3fn.safetensors"),
            Some(("flux".into(), Precision::Fp8E4m3fn))
        );
        assert_eq!(
            parse_output_name("flux_Q4_K_M.gguf"),
            Some(("flux".into(), Precision::Gguf(FileType::Q4KM)))
        );
    }

    #[test]
    fn rejects_non_outputs() {
        for n in [
            "flux.safetensors",
            "_fp16.safetensors",
            "flux_fp16.gguf",
            "flux_Q8_0.safetensors",
            "flux_fp16.safetensors.tmp",
            ".flux_fp16.safetensors.123.tmp",
            "flux_fp16",
            "flux_e4m3fn.safetensors",
        ] {
            assert_eq!(parse_output_name(n), None, "{n}");
        }
    }

    fn any_precision() -> impl Strategy<Value = Precision> {
        let all: Vec<Precision> = Precision::all().collect();
        (0..all.len()).prop_map(move |i| all[i])
    }

    proptest! {
        #[test]
        fn name_roundtrips(stem in "[A-Za-z0-9_.-]{1,24}", p in any_precision(), q in any_precision(), tag in any::<bool>()) {
            // Stems that already carry a precision, in either case, are the interesting ones.
            let stem = if tag { format!("{stem}_{}", q.canonical_name()) } else { stem };
            let source = format!("{stem}.safetensors");
            let base = basename_of(Path::new(&source));
            let name = output_file_name(&base, p);
            prop_assert_eq!(parse_output_name(&name), Some((base.clone(), p)));
            // Never a doubled precision.
            let doubled = format!("_{}_{}.", q.canonical_name(), p.canonical_name());
            prop_assert!(!tag || !name.contains(&doubled), "{} from {}", name, source);
            // The basename never ends in a recognised precision.
            prop_assert!(strip_one(&base, &stem_suffixes()).is_none());
        }

        #[test]
        fn parse_never_panics(name in "\\PC{0,40}") {
            let _ = parse_output_name(&name);
        }
    }
}
