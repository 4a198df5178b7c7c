//! Helpers for the end-to-end tests: run the built `convcache`, build sample sources, read
//! outputs back independently of the library crates.

#![allow(dead_code)] // each test file uses a different subset

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use cli::sample::SampleSpec;
use serde_json::Value;

/// A scratch area: `root/` holds sources, `root/models` is the models dir.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn models(&self) -> PathBuf {
        self.root().join("models")
    }

    pub fn converted_dir(&self) -> PathBuf {
        self.models().join("diffusion_models").join("converted")
    }

    /// Writes a sample source at `rel` (folders created) and returns its path and bytes.
    pub fn source(&self, rel: &str, spec: SampleSpec) -> Source {
        let path = self.root().join(rel);
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
        spec.write(&path).expect("write sample");
        let bytes = std::fs::read(&path).expect("read sample");
        Source { path, spec, bytes }
    }

    /// `convcache --models-dir <models> ARGS...`, run in the scratch dir with no environment
    /// override, so nothing outside the scratch dir is looked at.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_convcache"));
        c.current_dir(self.root())
            .env_remove("CONVCACHE_MODELS_DIR")
            .arg("--models-dir")
            .arg(self.models())
            .args(args)
            .stdin(Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> Run {
        Run::from(self.cmd(args).output().expect("spawn convcache"))
    }

    /// Every file name in the converted dir (empty if it does not exist).
    pub fn converted_files(&self) -> BTreeSet<String> {
        files_in(&self.converted_dir())
    }
}

pub fn files_in(dir: &Path) -> BTreeSet<String> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| {
                e.expect("dir entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect(),
        Err(_) => BTreeSet::new(),
    }
}

/// A source model and its original bytes.
pub struct Source {
    pub path: PathBuf,
    pub spec: SampleSpec,
    pub bytes: Vec<u8>,
}

impl Source {
    pub fn arg(&self) -> &str {
        self.path.to_str().expect("utf-8 temp path")
    }

    /// The source's bytes are exactly what was written.
    pub fn assert_unchanged(&self) {
        let now = std::fs::read(&self.path).expect("read source");
        assert!(
            now == self.bytes,
            "{}: the source was modified",
            self.path.display()
        );
    }
}

/// A finished run.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Run {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
                self.stdout, self.stderr
            )
        })
    }

    pub fn ok(self) -> Run {
        assert_eq!(
            self.code, 0,
            "exit {}\nstdout:\n{}\nstderr:\n{}",
            self.code, self.stdout, self.stderr
        );
        self
    }
}

/// A parsed safetensors file: header JSON and data section.
pub struct Safetensors {
    pub header: serde_json::Map<String, Value>,
    pub data: Vec<u8>,
}

impl Safetensors {
    /// Reads and checks `path`: header length in bounds, every tensor's data in bounds, and the
    /// data section exactly as long as the last tensor's end (a complete, uncorrupted file).
    pub fn read(path: &Path) -> Safetensors {
        let bytes = std::fs::read(path).expect("read output");
        assert!(bytes.len() >= 8, "{}: shorter than 8 bytes", path.display());
        let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
        assert!(
            8 + n <= bytes.len(),
            "{}: header past the end",
            path.display()
        );
        let header: serde_json::Map<String, Value> =
            serde_json::from_slice(&bytes[8..8 + n]).expect("header JSON");
        let data = bytes[8 + n..].to_vec();
        let end = header
            .iter()
            .filter(|(k, _)| *k != "__metadata__")
            .map(|(_, v)| v["data_offsets"][1].as_u64().expect("offset"))
            .max()
            .unwrap_or(0);
        assert_eq!(end as usize, data.len(), "{}: data length", path.display());
        Safetensors { header, data }
    }

    pub fn dtype(&self, name: &str) -> &str {
        self.header[name]["dtype"].as_str().expect("dtype")
    }

    pub fn tensor(&self, name: &str) -> &[u8] {
        let o = &self.header[name]["data_offsets"];
        let (a, b) = (
            o[0].as_u64().expect("begin") as usize,
            o[1].as_u64().expect("end") as usize,
        );
        &self.data[a..b]
    }

    pub fn metadata(&self) -> &Value {
        self.header.get("__metadata__").unwrap_or(&Value::Null)
    }
}

/// The expected bytes of tensor `t` of `spec` cast to bf16 (RNE, as torch `.to(bfloat16)`).
pub fn expected_bf16(spec: &SampleSpec, t: usize, n: u64) -> Vec<u8> {
    (0..n)
        .flat_map(|i| half::bf16::from_f32(spec.value(t, i)).to_le_bytes())
        .collect()
}

/// The expected bytes of tensor `t` of `spec` cast to f16.
pub fn expected_f16(spec: &SampleSpec, t: usize, n: u64) -> Vec<u8> {
    (0..n)
        .flat_map(|i| half::f16::from_f32(spec.value(t, i)).to_le_bytes())
        .collect()
}

/// Checks that `out` is `source` cast to bf16, tensor by tensor.
pub fn assert_is_bf16_of(out: &Path, spec: &SampleSpec) {
    let st = Safetensors::read(out);
    for (t, ts) in spec.tensors().iter().enumerate() {
        assert_eq!(st.dtype(&ts.name), "BF16", "{}", ts.name);
        let n = ts.shape.iter().product::<u64>();
        assert!(
            st.tensor(&ts.name) == expected_bf16(spec, t, n).as_slice(),
            "{}: tensor {} differs from bf16 of the source",
            out.display(),
            ts.name
        );
    }
}

/// Checks that `out` is `source` cast to f16, tensor by tensor.
pub fn assert_is_f16_of(out: &Path, spec: &SampleSpec) {
    let st = Safetensors::read(out);
    for (t, ts) in spec.tensors().iter().enumerate() {
        assert_eq!(st.dtype(&ts.name), "F16", "{}", ts.name);
        let n = ts.shape.iter().product::<u64>();
        assert!(
            st.tensor(&ts.name) == expected_f16(spec, t, n).as_slice(),
            "{}: tensor {} differs from f16 of the source",
            out.display(),
            ts.name
        );
    }
}

/// Small and quick: about 100 KB.
pub const SMALL: SampleSpec = SampleSpec {
    hidden: 32,
    blocks: 1,
    seed: 11,
};

/// About 8 MB: long enough that racing processes overlap.
pub const MEDIUM: SampleSpec = SampleSpec {
    hidden: 256,
    blocks: 2,
    seed: 12,
};

/// About 63 MB: a conversion takes long enough to be killed half-way.
pub const LARGE: SampleSpec = SampleSpec {
    hidden: 512,
    blocks: 4,
    seed: 13,
};

/// The single element of a `convert --json` array for one target.
pub fn only(v: &Value) -> &Value {
    let a = v.as_array().expect("a JSON array");
    assert_eq!(a.len(), 1, "{v}");
    &a[0]
}

/// The `CONVCACHE_READ_STATS` count of a run: bytes of model files it read from the disk.
#[allow(dead_code)] // Not every test binary reads the stats.
pub fn bytes_read(stderr: &str) -> u64 {
    stderr
        .lines()
        .find_map(|l| {
            l.strip_prefix("convcache: read stats: ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no read stats line in {stderr}"))
}

/// Each row of a several-target `convert --json` of `source` (rows in `targets`' order) is
/// converted and holds the bytes a separate `convert SOURCE --to TARGET` writes to the same
/// path (each output is removed and made again alone).
#[allow(dead_code)] // Not every test binary converts several targets.
pub fn assert_rows_match_separate_commands(
    s: &Scratch,
    source: &str,
    rows: &[Value],
    targets: &[&str],
) {
    assert_eq!(rows.len(), targets.len(), "one row per target");
    for (r, target) in rows.iter().zip(targets) {
        assert_eq!(r["status"], "converted", "{r}");
        let out = PathBuf::from(
            r["path"]
                .as_str()
                .unwrap_or_else(|| panic!("no path in {r}")),
        );
        let bytes = std::fs::read(&out).expect("read output");
        std::fs::remove_file(&out).expect("remove output");
        let alone = s
            .run(&["--json", "convert", source, "--to", target])
            .ok()
            .json();
        assert_eq!(only(&alone)["path"], r["path"], "{target}");
        assert!(
            std::fs::read(&out).expect("read output") == bytes,
            "{target} of {source} differs from a separate command"
        );
    }
}
