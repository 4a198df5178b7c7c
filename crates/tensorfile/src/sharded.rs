//! Sharded safetensors sources: a `*.safetensors.index.json` (`{"metadata": {...},
//! "weight_map": {tensor: shard file}}`) and the shards it names, served as ONE
//! [`TensorSource`].
//!
//! A diffusers repository keeps a large model as `diffusion_pytorch_model-0000N-of-0000M.safetensors`
//! next to `diffusion_pytorch_model.safetensors.index.json`; the index, or a folder holding
//! exactly one index, is the source ([`locate_index`]).
//!
//! Everything is checked before a tensor is served: the index is size-capped before it is
//! parsed and names at most [`MAX_SHARDS`] shards, each a plain file name in the index's folder
//! (a `..`, absolute or nested name is refused: a source reads only what it is given); every
//! shard is a valid safetensors file ([`SafetensorsFile::open`]); every listed tensor is in the
//! shard the index names, no tensor is in two shards or missing from the index, and no
//! `<index stem>-*.safetensors` file in the folder is left unreferenced (a shard the index forgot
//! would silently drop weights).
//!
//! Tensors are served in shard order (file names sorted, which is `-00001-of-` order), then in
//! each shard's offset order: reading them in order is one sequential pass over the shards.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::safetensors::{SafetensorsError, SafetensorsFile};
use crate::source::{SourceError, SourceTensor, TensorSource};

/// How an index file's name ends.
pub const INDEX_SUFFIX: &str = ".safetensors.index.json";

/// The largest index file read (a 400-billion-parameter LLM's index is a few MiB).
pub const MAX_INDEX_LEN: u64 = 64 << 20;

/// The most shards one index may name (each is kept open while the source is read).
pub const MAX_SHARDS: usize = 512;

/// Why a sharded source cannot be read. Display: `PATH: problem`, one line, naming the file at
/// fault (the index, or the shard).
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// Reading the index or listing its folder failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The index or folder.
        path: PathBuf,
        /// The failure.
        source: io::Error,
    },
    /// A folder holding several indexes: which one is the model is not for convcache to guess.
    #[error(
        "{}: holds {count} shard indexes (`*{INDEX_SUFFIX}`); name the index to convert",
        path.display()
    )]
    SeveralIndexes {
        /// The folder.
        path: PathBuf,
        /// How many indexes it holds.
        count: usize,
    },
    /// The index file is larger than [`MAX_INDEX_LEN`].
    #[error("{}: the shard index is {len} bytes, more than the {MAX_INDEX_LEN} accepted", path.display())]
    IndexTooLarge {
        /// The index.
        path: PathBuf,
        /// Its size.
        len: u64,
    },
    /// The index is not `{"weight_map": {tensor: file}, ...}`, or lists no tensor.
    #[error("{}: invalid shard index: {problem}", path.display())]
    BadIndex {
        /// The index.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// The index names more than [`MAX_SHARDS`] shards.
    #[error("{}: the index names {count} shards, more than the {MAX_SHARDS} accepted", path.display())]
    TooManyShards {
        /// The index.
        path: PathBuf,
        /// How many it names.
        count: usize,
    },
    /// A `weight_map` entry names a file outside the index's folder (`..`, absolute, nested).
    #[error(
        "{}: the index maps tensor `{tensor}` to {shard:?}, which is not a file in the index's folder",
        path.display()
    )]
    OutsideFolder {
        /// The index.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The file name as written in the index.
        shard: String,
    },
    /// A shard the index names does not exist.
    #[error("{}: shard missing (named by {})", path.display(), index.display())]
    MissingShard {
        /// The shard.
        path: PathBuf,
        /// The index naming it.
        index: PathBuf,
    },
    /// A shard is not a valid safetensors file (truncated, bad header, unreadable).
    #[error(transparent)]
    Shard(SafetensorsError),
    /// A tensor the index lists is not in the shard it names.
    #[error("{}: tensor `{tensor}` is listed for this shard in the index, but the shard does not hold it", path.display())]
    NotInShard {
        /// The shard.
        path: PathBuf,
        /// The tensor.
        tensor: String,
    },
    /// A tensor is stored in two shards.
    #[error("{}: tensor `{tensor}` is also stored in {}", path.display(), first.display())]
    InTwoShards {
        /// The second shard holding it.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The first shard holding it.
        first: PathBuf,
    },
    /// A shard holds a tensor the index does not list.
    #[error("{}: holds tensor `{tensor}`, which the index does not list", path.display())]
    Unlisted {
        /// The shard.
        path: PathBuf,
        /// The tensor.
        tensor: String,
    },
    /// A shard-named file in the index's folder that the index does not reference.
    #[error("{}: looks like a shard of {} but the index does not reference it", path.display(), index.display())]
    UnreferencedShard {
        /// The file.
        path: PathBuf,
        /// The index.
        index: PathBuf,
    },
    /// A shard with a ComfyUI scaled-fp8 layout: the de-scaling view reads one file, so such a
    /// source is not served (converting its shards one by one, or merging them first, works).
    #[error("{}: a sharded source with a ComfyUI scaled-fp8 layout is not supported", path.display())]
    ScaledShard {
        /// The shard.
        path: PathBuf,
    },
}

impl ShardError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        match self {
            ShardError::Shard(e) => e.path(),
            ShardError::Io { path, .. }
            | ShardError::SeveralIndexes { path, .. }
            | ShardError::IndexTooLarge { path, .. }
            | ShardError::BadIndex { path, .. }
            | ShardError::TooManyShards { path, .. }
            | ShardError::OutsideFolder { path, .. }
            | ShardError::MissingShard { path, .. }
            | ShardError::NotInShard { path, .. }
            | ShardError::InTwoShards { path, .. }
            | ShardError::Unlisted { path, .. }
            | ShardError::UnreferencedShard { path, .. }
            | ShardError::ScaledShard { path } => path,
        }
    }

    /// Whether the input is at fault (everything but a failed read of a file that is there).
    pub fn is_input_fault(&self) -> bool {
        !matches!(
            self,
            ShardError::Io { .. } | ShardError::Shard(SafetensorsError::Io { .. })
        )
    }

    /// A stable snake_case name of the error kind (`missing_shard`, `not_in_shard`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            ShardError::Io { .. } => "io",
            ShardError::SeveralIndexes { .. } => "several_indexes",
            ShardError::IndexTooLarge { .. } => "index_too_large",
            ShardError::BadIndex { .. } => "bad_index",
            ShardError::TooManyShards { .. } => "too_many_shards",
            ShardError::OutsideFolder { .. } => "shard_outside_folder",
            ShardError::MissingShard { .. } => "missing_shard",
            ShardError::Shard(_) => "bad_shard",
            ShardError::NotInShard { .. } => "not_in_shard",
            ShardError::InTwoShards { .. } => "in_two_shards",
            ShardError::Unlisted { .. } => "unlisted_tensor",
            ShardError::UnreferencedShard { .. } => "unreferenced_shard",
            ShardError::ScaledShard { .. } => "scaled_shard",
        }
    }
}

/// The index `path` stands for: `path` itself when its name ends in [`INDEX_SUFFIX`], the one
/// index in it when `path` is a folder holding exactly one; `None` for anything else (a plain
/// file, a folder without an index, a path that does not exist). Only a folder is listed.
pub fn locate_index(path: &Path) -> Result<Option<PathBuf>, ShardError> {
    if is_index_name(path) {
        return Ok(Some(path.to_owned()));
    }
    if !fs::metadata(path).is_ok_and(|m| m.is_dir()) {
        return Ok(None);
    }
    let io_err = |source| ShardError::Io {
        path: path.to_owned(),
        source,
    };
    let mut found = Vec::new();
    for entry in fs::read_dir(path).map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        if is_index_name(Path::new(&entry.file_name())) {
            found.push(entry.path());
        }
    }
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop()),
        count => Err(ShardError::SeveralIndexes {
            path: path.to_owned(),
            count,
        }),
    }
}

fn is_index_name(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.len() > INDEX_SUFFIX.len() && n.ends_with(INDEX_SUFFIX))
}

/// A parsed and checked index: the shards it names and where each tensor is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardIndex {
    /// The index file.
    pub path: PathBuf,
    /// Its bytes as read (the source's identity starts with them).
    pub bytes: Vec<u8>,
    /// The shards, in serving order (file names sorted), each in the index's folder.
    pub shards: Vec<PathBuf>,
    /// Every listed tensor and the position of its shard in [`ShardIndex::shards`].
    pub weight_map: BTreeMap<String, usize>,
}

/// The index file's layout (`metadata`, usually `{"total_size": N}`, is not needed: the
/// shards' headers are the truth).
#[derive(serde::Deserialize)]
struct IndexJson {
    weight_map: BTreeMap<String, String>,
}

impl ShardIndex {
    /// Reads and checks the index at `path` (size cap, layout, shard names and count, and no
    /// unreferenced shard file next to it). Shards are not opened.
    pub fn read(path: &Path) -> Result<ShardIndex, ShardError> {
        let bytes = read_capped(path)?;
        let bad = |problem: String| ShardError::BadIndex {
            path: path.to_owned(),
            problem,
        };
        let json: IndexJson = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        if json.weight_map.is_empty() {
            return Err(bad("the weight_map lists no tensor".into()));
        }
        let folder = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let mut names: Vec<&str> = json.weight_map.values().map(String::as_str).collect();
        names.sort_unstable();
        names.dedup();
        if names.len() > MAX_SHARDS {
            return Err(ShardError::TooManyShards {
                path: path.to_owned(),
                count: names.len(),
            });
        }
        let position: HashMap<&str, usize> =
            names.iter().enumerate().map(|(i, &n)| (n, i)).collect();
        let mut weight_map = BTreeMap::new();
        for (tensor, shard) in &json.weight_map {
            if !is_plain_file_name(shard) {
                return Err(ShardError::OutsideFolder {
                    path: path.to_owned(),
                    tensor: tensor.clone(),
                    shard: shard.clone(),
                });
            }
            weight_map.insert(tensor.clone(), position[shard.as_str()]);
        }
        let index = ShardIndex {
            path: path.to_owned(),
            shards: names.iter().map(|n| folder.join(n)).collect(),
            bytes,
            weight_map,
        };
        index.refuse_unreferenced(folder, &names)?;
        Ok(index)
    }

    /// Refuses a `<stem>-*.safetensors` file in `folder` that the index does not name.
    fn refuse_unreferenced(&self, folder: &Path, names: &[&str]) -> Result<(), ShardError> {
        let index_name = self.path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let prefix = format!(
            "{}-",
            index_name.strip_suffix(INDEX_SUFFIX).unwrap_or(index_name)
        );
        let io_err = |source| ShardError::Io {
            path: folder.to_owned(),
            source,
        };
        for entry in fs::read_dir(folder).map_err(io_err)? {
            let name = entry.map_err(io_err)?.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with(&prefix)
                && name.ends_with(".safetensors")
                && names.binary_search(&name).is_err()
            {
                return Err(ShardError::UnreferencedShard {
                    path: folder.join(name),
                    index: self.path.clone(),
                });
            }
        }
        Ok(())
    }

    /// The files the source is made of: the index, then every shard in order.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        std::iter::once(self.path.as_path()).chain(self.shards.iter().map(PathBuf::as_path))
    }
}

/// A shard name the index may use: one plain file name (no separator, not `.` or `..`).
fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\0'])
}

fn read_capped(path: &Path) -> Result<Vec<u8>, ShardError> {
    use std::io::Read;
    let io_err = |source| ShardError::Io {
        path: path.to_owned(),
        source,
    };
    let file = fs::File::open(path).map_err(io_err)?;
    let len = file.metadata().map_err(io_err)?.len();
    if len > MAX_INDEX_LEN {
        return Err(ShardError::IndexTooLarge {
            path: path.to_owned(),
            len,
        });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // `take`: a file growing after the stat is still read only up to the cap.
    file.take(MAX_INDEX_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    if bytes.len() as u64 > MAX_INDEX_LEN {
        return Err(ShardError::IndexTooLarge {
            path: path.to_owned(),
            len: bytes.len() as u64,
        });
    }
    Ok(bytes)
}

/// The shards of an index, opened and checked against it, served as one source.
#[derive(Debug)]
pub struct ShardedSource {
    index: ShardIndex,
    shards: Vec<SafetensorsFile>,
    tensors: Vec<SourceTensor>,
    /// For each served tensor: its shard and its position in that shard's header.
    at: Vec<(usize, usize)>,
    /// The shards' `__metadata__`, merged in shard order (the first shard's value wins).
    metadata: BTreeMap<String, String>,
}

impl ShardedSource {
    /// Opens the sharded source `path` stands for (an index, or a folder holding one; see
    /// [`locate_index`]), opening and validating every shard and checking it against the index.
    pub fn open(path: &Path) -> Result<ShardedSource, ShardError> {
        Self::open_shared(path, None)
    }

    /// [`ShardedSource::open`], each shard reading its tensor data through `seat`'s window for
    /// it ([`crate::shared_read::SharedFiles`]) when `seat` reads that shard.
    pub fn open_shared(
        path: &Path,
        seat: Option<&crate::shared_read::Seat>,
    ) -> Result<ShardedSource, ShardError> {
        let index_path = locate_index(path)?.ok_or_else(|| ShardError::BadIndex {
            path: path.to_owned(),
            problem: format!("no `*{INDEX_SUFFIX}` here"),
        })?;
        let index = ShardIndex::read(&index_path)?;
        let mut shards = Vec::with_capacity(index.shards.len());
        for shard in &index.shards {
            let file = SafetensorsFile::open_shared(shard, seat).map_err(|e| match e {
                SafetensorsError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                    ShardError::MissingShard {
                        path: shard.clone(),
                        index: index.path.clone(),
                    }
                }
                e => ShardError::Shard(e),
            })?;
            shards.push(file);
        }
        let mut holder: HashMap<&str, usize> = HashMap::new();
        let mut tensors = Vec::new();
        let mut at = Vec::new();
        let mut metadata = BTreeMap::new();
        for (s, file) in shards.iter().enumerate() {
            for (k, v) in &file.header.metadata {
                metadata.entry(k.clone()).or_insert_with(|| v.clone());
            }
            for (e, t) in file.source_tensors().iter().enumerate() {
                if let Some(&first) = holder.get(t.name.as_str()) {
                    return Err(ShardError::InTwoShards {
                        path: file.path.clone(),
                        tensor: t.name.clone(),
                        first: shards[first].path.clone(),
                    });
                }
                holder.insert(&t.name, s);
                tensors.push(t.clone());
                at.push((s, e));
            }
        }
        for (tensor, &s) in &index.weight_map {
            if holder.get(tensor.as_str()) != Some(&s) {
                return Err(ShardError::NotInShard {
                    path: index.shards[s].clone(),
                    tensor: tensor.clone(),
                });
            }
        }
        if let Some(t) = tensors
            .iter()
            .find(|t| !index.weight_map.contains_key(&t.name))
        {
            let s = holder[t.name.as_str()];
            return Err(ShardError::Unlisted {
                path: index.shards[s].clone(),
                tensor: t.name.clone(),
            });
        }
        drop(holder);
        Ok(ShardedSource {
            index,
            shards,
            tensors,
            at,
            metadata,
        })
    }

    /// The checked index.
    pub fn index(&self) -> &ShardIndex {
        &self.index
    }

    /// The opened shards, in serving order.
    pub fn shards(&self) -> &[SafetensorsFile] {
        &self.shards
    }

    /// The first shard with a ComfyUI scaled-fp8 layout (or one the layout reader refuses):
    /// the de-scaling view reads one file, so such a sharded source is not served.
    pub fn scaled_shard(&self) -> Option<&Path> {
        self.shards
            .iter()
            .find(|f| !matches!(crate::scaled::ScaledLayout::of_file(f), Ok(None)))
            .map(|f| f.path.as_path())
    }
}

impl TensorSource for ShardedSource {
    fn path(&self) -> &Path {
        &self.index.path
    }

    fn tensors(&self) -> &[SourceTensor] {
        &self.tensors
    }

    fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    fn read_raw(&self, index: usize, byte_offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let &(s, e) = self.at.get(index).ok_or_else(|| {
            SourceError::invalid(&self.index.path, &format!("#{index}"), "no such tensor")
        })?;
        let file = &self.shards[s];
        Ok(file.read_tensor_range(&file.header.tensors[e], byte_offset, buf)?)
    }

    fn check_unchanged(&self) -> Result<(), SourceError> {
        for shard in &self.shards {
            shard.check_unchanged()?;
        }
        match read_capped(&self.index.path) {
            Ok(bytes) if bytes == self.index.bytes => Ok(()),
            _ => Err(SourceError::Changed {
                path: self.index.path.clone(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Dtype;
    use crate::safetensors::writer::write_file;

    /// Two shards in `dir`: `b` holds `b.0` and `b.1`, `a` holds `a.0`; values are the
    /// element's position plus 10 per tensor.
    fn two_shards(dir: &Path) -> BTreeMap<String, String> {
        let f32s = |base: f32, n: usize| -> Vec<u8> {
            (0..n)
                .flat_map(|i| (base + i as f32).to_le_bytes())
                .collect()
        };
        write_file(
            &dir.join("m-2.safetensors"),
            &[
                ("b.0", Dtype::F32, vec![2], f32s(10.0, 2)),
                ("b.1", Dtype::F32, vec![3], f32s(20.0, 3)),
            ],
            &[("config".to_owned(), "{}".to_owned())].into(),
        )
        .unwrap();
        write_file(
            &dir.join("m-1.safetensors"),
            &[("a.0", Dtype::F32, vec![1], f32s(0.0, 1))],
            &BTreeMap::new(),
        )
        .unwrap();
        let map: BTreeMap<String, String> = [
            ("a.0", "m-1.safetensors"),
            ("b.0", "m-2.safetensors"),
            ("b.1", "m-2.safetensors"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        write_map(dir, &map);
        map
    }

    fn write_map(dir: &Path, map: &BTreeMap<String, String>) {
        let json = serde_json::json!({ "metadata": {"total_size": 24}, "weight_map": map });
        fs::write(dir.join("m.safetensors.index.json"), json.to_string()).unwrap();
    }

    #[test]
    fn tensors_are_served_in_shard_order_then_offset_order() {
        let dir = tempfile::tempdir().unwrap();
        two_shards(dir.path());
        let source = ShardedSource::open(dir.path()).unwrap();
        let names: Vec<&str> = source.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a.0", "b.0", "b.1"]);
        assert_eq!(source.path(), dir.path().join("m.safetensors.index.json"));
        assert_eq!(
            source.metadata().get("config").map(String::as_str),
            Some("{}")
        );
        let mut v = [0f32; 2];
        source.read_f32(2, 1, &mut v).unwrap();
        assert_eq!(v, [21.0, 22.0]);
        assert!(source.read_f32(2, 2, &mut v).is_err(), "past the tensor");
        source.check_unchanged().unwrap();
        assert_eq!(source.scaled_shard(), None);

        // Opened by its index: the same source.
        let by_index = ShardedSource::open(source.path()).unwrap();
        assert_eq!(by_index.tensors(), source.tensors());

        // A rewritten index is a changed source.
        let mut map = BTreeMap::new();
        map.insert("a.0".to_owned(), "m-1.safetensors".to_owned());
        write_map(dir.path(), &map);
        assert!(matches!(
            source.check_unchanged(),
            Err(SourceError::Changed { .. })
        ));
    }

    #[test]
    fn only_an_index_or_a_folder_with_one_index_is_a_sharded_source() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(locate_index(dir.path()).unwrap(), None);
        assert_eq!(locate_index(&dir.path().join("absent")).unwrap(), None);
        let plain = dir.path().join("x.safetensors");
        assert_eq!(locate_index(&plain).unwrap(), None);
        two_shards(dir.path());
        let index = dir.path().join("m.safetensors.index.json");
        assert_eq!(locate_index(dir.path()).unwrap(), Some(index.clone()));
        assert_eq!(locate_index(&index).unwrap(), Some(index.clone()));
        fs::copy(&index, dir.path().join("n.safetensors.index.json")).unwrap();
        let err = locate_index(dir.path()).unwrap_err();
        assert_eq!(err.kind(), "several_indexes", "{err}");
    }

    #[test]
    fn shard_names_outside_the_folder_and_too_many_shards_are_refused_before_any_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut map = two_shards(dir.path());
        for bad in [
            "../m-1.safetensors",
            "/etc/passwd",
            "sub/m-1.safetensors",
            "..",
            "",
        ] {
            map.insert("a.0".into(), bad.into());
            write_map(dir.path(), &map);
            let err = ShardedSource::open(dir.path()).unwrap_err();
            assert_eq!(err.kind(), "shard_outside_folder", "{bad}: {err}");
            assert!(
                err.to_string().contains("m.safetensors.index.json"),
                "{err}"
            );
        }
        let many: BTreeMap<String, String> = (0..=MAX_SHARDS)
            .map(|i| (format!("t{i}"), format!("s{i}.safetensors")))
            .collect();
        write_map(dir.path(), &many);
        let err = ShardedSource::open(dir.path()).unwrap_err();
        assert_eq!(err.kind(), "too_many_shards", "{err}");
        write_map(dir.path(), &BTreeMap::new());
        let err = ShardedSource::open(dir.path()).unwrap_err();
        assert_eq!(err.kind(), "bad_index", "{err}");
    }

    #[test]
    fn shards_inconsistent_with_the_index_are_refused_naming_the_shard() {
        let dir = tempfile::tempdir().unwrap();
        let map = two_shards(dir.path());
        let shard = |n: &str| dir.path().join(n);
        let check = |kind: &str, file: &Path| {
            let err = ShardedSource::open(dir.path()).unwrap_err();
            assert_eq!(err.kind(), kind, "{err}");
            assert_eq!(err.path(), file, "{err}");
            assert!(
                err.to_string().starts_with(&file.display().to_string()),
                "{err}"
            );
            assert!(SourceError::from(err).is_input_fault());
        };
        // Listed for the wrong shard.
        let mut wrong = map.clone();
        wrong.insert("b.1".into(), "m-1.safetensors".into());
        write_map(dir.path(), &wrong);
        check("not_in_shard", &shard("m-1.safetensors"));
        // Not listed at all.
        let mut unlisted = map.clone();
        unlisted.remove("b.1");
        write_map(dir.path(), &unlisted);
        check("unlisted_tensor", &shard("m-2.safetensors"));
        // An unreferenced shard next to the index.
        write_map(dir.path(), &map);
        fs::copy(shard("m-1.safetensors"), shard("m-3.safetensors")).unwrap();
        check("unreferenced_shard", &shard("m-3.safetensors"));
        fs::remove_file(shard("m-3.safetensors")).unwrap();
        // Missing and truncated shards.
        fs::rename(shard("m-1.safetensors"), dir.path().join("elsewhere")).unwrap();
        check("missing_shard", &shard("m-1.safetensors"));
        fs::rename(dir.path().join("elsewhere"), shard("m-1.safetensors")).unwrap();
        let f = fs::File::options()
            .write(true)
            .open(shard("m-2.safetensors"))
            .unwrap();
        f.set_len(f.metadata().unwrap().len() - 4).unwrap();
        check("bad_shard", &shard("m-2.safetensors"));
    }
}
