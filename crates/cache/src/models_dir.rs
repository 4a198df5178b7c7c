//! Finding the models dir, and the cache dirs inside it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use detect::Precision;
use detect::arch::ModelKind;
use detect::precision::Container;

use crate::CacheError;

/// The environment variable naming the models dir.
pub const MODELS_DIR_ENV: &str = "CONVCACHE_MODELS_DIR";

/// Files that together mark a ComfyUI install (its entry point and its folder registry).
const COMFYUI_MARKERS: &[&str] = &["main.py", "folder_paths.py"];

/// The models dir (a ComfyUI-style `models/` folder) the cache lives in.
///
/// Outputs go to `<models>/diffusion_models/converted/` (safetensors precisions and
/// bitsandbytes) and `<models>/diffusion_models/gguf/`: ComfyUI lists `diffusion_models`
/// recursively, so both are visible to its loaders (GGUF ones through ComfyUI-GGUF). Text
/// encoders' outputs go to `<models>/text_encoders/converted/` and
/// `<models>/text_encoders/gguf/`, where ComfyUI's CLIP loaders (and `CLIPLoaderGGUF`) look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelsDir {
    root: PathBuf,
}

impl ModelsDir {
    /// Resolves the models dir: `explicit` (the `--models-dir` flag), else
    /// `CONVCACHE_MODELS_DIR`, else the `models/` of a ComfyUI install found by walking up from
    /// the current directory, else `./models`.
    pub fn resolve(explicit: Option<&Path>) -> Result<ModelsDir, CacheError> {
        let cwd = std::env::current_dir().map_err(|source| CacheError::Io {
            path: PathBuf::from("."),
            op: "read the current directory",
            source,
        })?;
        Ok(Self::resolve_with(
            explicit,
            std::env::var_os(MODELS_DIR_ENV),
            &cwd,
        ))
    }

    /// [`ModelsDir::resolve`] with the environment value and current directory given.
    /// Relative paths are taken relative to `cwd`. An empty environment value counts as unset.
    fn resolve_with(explicit: Option<&Path>, env: Option<OsString>, cwd: &Path) -> ModelsDir {
        let root = if let Some(p) = explicit {
            cwd.join(p)
        } else if let Some(e) = env.filter(|e| !e.is_empty()) {
            cwd.join(e)
        } else if let Some(install) = find_comfyui(cwd) {
            install.join("models")
        } else {
            cwd.join("models")
        };
        ModelsDir { root }
    }

    /// A models dir at exactly this path.
    pub fn at(root: impl Into<PathBuf>) -> ModelsDir {
        ModelsDir { root: root.into() }
    }

    /// The models dir itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<models>/diffusion_models/converted`: safetensors outputs (plain, bitsandbytes and
    /// ComfyUI quantized).
    pub fn converted_dir(&self) -> PathBuf {
        self.root.join("diffusion_models").join("converted")
    }

    /// `<models>/diffusion_models/gguf`: GGUF outputs.
    pub fn gguf_dir(&self) -> PathBuf {
        self.root.join("diffusion_models").join("gguf")
    }

    /// The directory diffusion-model outputs of `target` go to.
    pub fn output_dir(&self, target: Precision) -> PathBuf {
        self.output_dir_for(ModelKind::DiffusionModel, target)
    }

    /// The directory outputs of `target` made from a model of `kind` go to:
    /// `<models>/{diffusion_models,text_encoders}/{converted,gguf}`.
    pub fn output_dir_for(&self, kind: ModelKind, target: Precision) -> PathBuf {
        self.dir_for(kind, target.container())
    }

    /// The directory outputs of `kind` in `container` go to.
    pub fn dir_for(&self, kind: ModelKind, container: Container) -> PathBuf {
        self.root.join(kind.folder()).join(match container {
            Container::Safetensors => "converted",
            Container::Gguf => "gguf",
        })
    }
}

/// The nearest ancestor of `start` (itself included) that holds ComfyUI's entry files and a
/// `models/` folder.
fn find_comfyui(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .find(|dir| {
            COMFYUI_MARKERS.iter().all(|m| dir.join(m).is_file()) && dir.join("models").is_dir()
        })
        .map(Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comfy(root: &Path) -> PathBuf {
        let install = root.join("ComfyUI");
        std::fs::create_dir_all(install.join("models/checkpoints")).unwrap();
        std::fs::write(install.join("main.py"), "").unwrap();
        std::fs::write(install.join("folder_paths.py"), "").unwrap();
        install
    }

    #[test]
    fn explicit_beats_env_beats_comfyui_beats_default() {
        let t = tempfile::tempdir().unwrap();
        let install = comfy(t.path());
        let cwd = install.join("models/checkpoints");
        let env = Some(OsString::from("/env/models"));

        let m = ModelsDir::resolve_with(Some(Path::new("flag")), env.clone(), &cwd);
        assert_eq!(m.root(), cwd.join("flag"));

        let m = ModelsDir::resolve_with(None, env, &cwd);
        assert_eq!(m.root(), Path::new("/env/models"));

        let m = ModelsDir::resolve_with(None, Some(OsString::new()), &cwd);
        assert_eq!(m.root(), install.join("models"));
        assert_eq!(
            m.converted_dir(),
            install.join("models/diffusion_models/converted")
        );
        assert_eq!(m.gguf_dir(), install.join("models/diffusion_models/gguf"));
        assert_eq!(
            m.output_dir_for(ModelKind::TextEncoder, Precision::Bf16),
            install.join("models/text_encoders/converted")
        );
        assert_eq!(
            m.output_dir_for(ModelKind::TextEncoder, "Q8_0".parse().unwrap()),
            install.join("models/text_encoders/gguf")
        );

        let elsewhere = t.path().join("elsewhere");
        std::fs::create_dir_all(&elsewhere).unwrap();
        let m = ModelsDir::resolve_with(None, None, &elsewhere);
        assert_eq!(m.root(), elsewhere.join("models"));
    }

    #[test]
    fn a_folder_without_the_entry_files_is_not_comfyui() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("models")).unwrap();
        std::fs::write(t.path().join("main.py"), "").unwrap();
        assert_eq!(find_comfyui(t.path()), None);
    }
}
