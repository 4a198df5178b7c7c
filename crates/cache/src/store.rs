//! Lookup, listing, statistics, cleanup and eviction over the output dirs.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::SystemTime;

use detect::Precision;
use detect::arch::ModelKind;
use detect::precision::Container;

use crate::examine::{Examined, examine};
use crate::naming::{basename_of, disambiguated_basename, output_file_name, parse_output_name};
use crate::provenance::{Provenance, SourceStat, identity_path};
use crate::record::{
    DataCheck, SourceSeen, check_output_data, read_output_record, remove_output_record,
};
use crate::slot::{
    OutputSlot, RecordedFacts, STATE_DIR, Upkeep, parse_temp_name, record_use_at, use_stamp_path,
};
use crate::{CacheError, ModelsDir, digest};

/// How strictly [`Cache::lookup`] validates.
#[derive(Debug, Clone, Default)]
pub struct LookupOptions {
    /// A file without provenance at the standard path is not used even when its precision is
    /// right (`--strict`): it is reported [`LookupStatus::Foreign`] and gets reconverted. An
    /// output without a usable output record ([`crate::record`]) is not used either: it is
    /// reported [`LookupStatus::Broken`] and gets reconverted.
    pub strict: bool,
    /// Hash the source even when its size and mtime match the provenance, and the output even
    /// when its size and mtime match its output record. Without it, a source or an output
    /// rewritten in place with the same size and its mtime restored is not noticed.
    pub verify_digest: bool,
    /// When set, an output written by another converter version is stale.
    pub converter_version: Option<String>,
    /// Once set, hashing (of a source whose size or mtime changed) stops with
    /// [`CacheError::Cancelled`]: an interrupted command does not wait for it.
    pub cancel: Option<Arc<AtomicBool>>,
    /// The source's digest as an earlier call found it: used instead of hashing the source
    /// while the source's path, size and mtime are still those it was found under.
    pub known_digest: Option<KnownDigest>,
    /// What the source is (from its detected architecture), which picks the models folder:
    /// `diffusion_models/` (the default) or `text_encoders/`.
    pub model_kind: ModelKind,
}

/// A source's content digest and the facts it was computed under (see
/// [`LookupOptions::known_digest`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownDigest {
    /// The source's identity facts when it was hashed.
    pub source: SourceStat,
    /// Its content digest ([`crate::digest`]).
    pub digest: String,
}

impl KnownDigest {
    /// The digest, if `now` (the source as it is now) has the facts it was computed under.
    fn for_source(&self, now: &SourceStat) -> Option<String> {
        let same = self.source.path == now.path
            && self.source.size == now.size
            && self.source.mtime_ns == now.mtime_ns;
        same.then(|| self.digest.clone())
    }
}

/// The verdict on the cache path of one (source, target).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "status", content = "reason")]
pub enum LookupStatus {
    /// A complete output in the target precision whose provenance names this source,
    /// unchanged, and this target, and whose data is what was published (when it has an output
    /// record; [`Lookup::note`] says when it has none).
    Hit,
    /// A complete file in the target precision at the standard path without provenance
    /// (another tool made it). Used unless [`LookupOptions::strict`].
    Unverified,
    /// Nothing at the path.
    Missing,
    /// An output of this source made before the source (or the converter) changed.
    Stale(String),
    /// A file that cannot serve: incomplete, corrupt, wrong precision, unreadable provenance,
    /// data changed since it was published.
    Broken(String),
    /// A file without provenance, rejected because of [`LookupOptions::strict`].
    Foreign,
}

impl LookupStatus {
    /// Whether the file at the path can be used as the conversion's result.
    pub fn is_usable(&self) -> bool {
        matches!(self, LookupStatus::Hit | LookupStatus::Unverified)
    }
}

/// The result of [`Cache::lookup`].
#[derive(Debug, Clone)]
pub struct Lookup {
    /// The verdict.
    pub status: LookupStatus,
    /// The usable output ([`LookupStatus::is_usable`]), or else where a new conversion must be
    /// published (possibly replacing what is there).
    pub path: PathBuf,
    /// The source's identity facts.
    pub source: SourceStat,
    /// The source's digest, if the lookup had to compute it (reuse it for the provenance).
    pub source_digest: Option<String>,
    /// The provenance of the file at [`Lookup::path`], if it has one.
    pub provenance: Option<Provenance>,
    /// Earlier outputs of this source for this target under another name (a digest-suffixed
    /// name of older content): to remove once the new conversion is published.
    pub superseded: Vec<PathBuf>,
    /// What a usable answer could not check (a hit whose data has no output record to be
    /// verified against), or why a conversion to make does not go to the standard path (a
    /// file another tool made is there).
    pub note: Option<String>,
    /// What the lookup learned, written when its answer is used ([`Cache::record_hit`],
    /// [`OutputSlot::record_hit`]).
    pub(crate) upkeep: Upkeep,
}

/// Which output dirs [`Cache::list`] and friends look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// `diffusion_models/converted` and `text_encoders/converted`: safetensors precisions and
    /// bitsandbytes.
    Precision,
    /// `diffusion_models/gguf` and `text_encoders/gguf`.
    Gguf,
    /// Both.
    All,
}

/// One output in a listing.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Entry {
    /// The models folder it is in (`diffusion_models` or `text_encoders` in JSON).
    pub model_kind: ModelKind,
    /// The basename in the file name (a digest-suffixed one for a second same-named source).
    pub basename: String,
    /// The precision in the file name (see `problem` for whether the header agrees).
    #[serde(serialize_with = "ser_precision")]
    pub precision: Precision,
    /// The output file.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// The source path from the provenance; `None` for a file another tool made.
    pub source: Option<PathBuf>,
    /// The full provenance, if any.
    pub provenance: Option<Provenance>,
    /// Last time it was produced or served (seconds since the Unix epoch in JSON).
    #[serde(serialize_with = "ser_time")]
    pub last_used: SystemTime,
    /// Why the file cannot serve as the precision its name says (not a model, incomplete,
    /// another precision), as the header shows it; `None` for a usable file. The name alone
    /// proves nothing.
    pub problem: Option<String>,
}

/// Totals of [`Cache::stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    /// Usable files (their header agrees with their name).
    pub count: u64,
    /// Their bytes.
    pub total_bytes: u64,
    /// Canonical precision name -> (count, bytes), usable files only.
    pub by_precision: BTreeMap<String, PrecisionTotals>,
    /// Files with an output's name that cannot serve ([`Entry::problem`]).
    pub unusable: PrecisionTotals,
    /// Models folder (`diffusion_models`, `text_encoders`) -> (count, bytes), usable files
    /// only; a folder without outputs is left out.
    pub by_kind: BTreeMap<String, PrecisionTotals>,
}

impl Stats {
    /// The totals of listed entries ([`Cache::list`], or a caller's selection of them): usable
    /// ones by precision, the others as `unusable`.
    pub fn from_entries<'a>(entries: impl IntoIterator<Item = &'a Entry>) -> Stats {
        let mut s = Stats::default();
        for e in entries {
            if e.problem.is_some() {
                s.unusable.count += 1;
                s.unusable.bytes += e.size;
                continue;
            }
            s.count += 1;
            s.total_bytes += e.size;
            let k = s
                .by_kind
                .entry(e.model_kind.folder().to_owned())
                .or_default();
            k.count += 1;
            k.bytes += e.size;
            let t = s
                .by_precision
                .entry(e.precision.canonical_name().to_string())
                .or_default();
            t.count += 1;
            t.bytes += e.size;
        }
        s
    }
}

/// Count and bytes of one precision.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PrecisionTotals {
    /// Files.
    pub count: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// A file removed (or, in a dry run, that would be removed).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Removed {
    /// The file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
}

/// What [`Cache::evict_to`] did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Eviction {
    /// The files removed, least recently used first.
    pub removed: Vec<Removed>,
    /// Bytes of all listed outputs before.
    pub bytes_before: u64,
    /// Bytes after (what a dry run would leave).
    pub bytes_after: u64,
}

fn ser_precision<S: serde::Serializer>(p: &Precision, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(p.canonical_name())
}

fn ser_time<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    s.serialize_u64(secs)
}

/// The converted-models cache inside a models dir.
#[derive(Debug, Clone)]
pub struct Cache {
    models: ModelsDir,
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> CacheError + 'a {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// [`LookupOptions::known_digest`] when it applies to the source as it is now (and the caller
/// did not ask for every digest to be computed afresh).
fn known_digest(options: &LookupOptions, now: &SourceStat) -> Option<String> {
    if options.verify_digest {
        return None;
    }
    options
        .known_digest
        .as_ref()
        .and_then(|k| k.for_source(now))
}

/// The source's digest, computed at most once per lookup or batch.
struct LazyDigest<'a> {
    source: &'a Path,
    value: Option<String>,
    cancel: Option<&'a AtomicBool>,
}

impl LazyDigest<'_> {
    fn get(&mut self) -> Result<&str, CacheError> {
        if self.value.is_none() {
            self.value = Some(digest::digest_file_cancellable(
                self.source,
                &mut |_, _| {},
                self.cancel,
            )?);
        }
        Ok(self.value.as_deref().unwrap_or_default())
    }
}

impl Cache {
    /// The cache of outputs under `models`.
    pub fn new(models: ModelsDir) -> Cache {
        Cache { models }
    }

    /// The models dir the outputs live in.
    pub fn models_dir(&self) -> &ModelsDir {
        &self.models
    }

    /// The standard output path for `source` in `target` (the plain name; [`Cache::lookup`]
    /// may answer a digest-suffixed one when another source owns it).
    pub fn standard_path(&self, source: &Path, target: Precision) -> PathBuf {
        self.models
            .output_dir(target)
            .join(output_file_name(&basename_of(source), target))
    }

    /// Validates what the cache holds for `source` in `target`.
    ///
    /// A hit needs: a complete file (header parses, size matches it) in the target precision,
    /// whose provenance names the target and this source — same path, size and mtime, or,
    /// when those differ, the same content digest. The source is only hashed when the cheap
    /// facts do not settle it (or [`LookupOptions::verify_digest`]).
    ///
    /// Writes nothing (no record, no use stamp, no lock file): a caller that uses the answer
    /// passes it to [`Cache::record_hit`] (or [`OutputSlot::record_hit`]).
    pub fn lookup(
        &self,
        source: &Path,
        target: Precision,
        options: &LookupOptions,
    ) -> Result<Lookup, CacheError> {
        let stat = SourceStat::of(source)?;
        let mut digest = LazyDigest {
            source,
            value: known_digest(options, &stat),
            cancel: options.cancel.as_deref(),
        };
        self.lookup_inner(source, &stat, &mut digest, target, options)
    }

    /// [`Cache::lookup`] reusing the digest an earlier lookup computed (`earlier.source_digest`),
    /// as long as the source's size and mtime have not changed since; for re-checking under a
    /// lock without hashing a large source twice.
    pub fn lookup_again(
        &self,
        source: &Path,
        target: Precision,
        options: &LookupOptions,
        earlier: &Lookup,
    ) -> Result<Lookup, CacheError> {
        let stat = SourceStat::of(source)?;
        let mut digest = LazyDigest {
            source,
            value: earlier
                .source_digest
                .clone()
                .filter(|_| {
                    stat.size == earlier.source.size && stat.mtime_ns == earlier.source.mtime_ns
                })
                .or_else(|| known_digest(options, &stat)),
            cancel: options.cancel.as_deref(),
        };
        self.lookup_inner(source, &stat, &mut digest, target, options)
    }

    fn lookup_inner(
        &self,
        source: &Path,
        stat: &SourceStat,
        digest: &mut LazyDigest<'_>,
        target: Precision,
        options: &LookupOptions,
    ) -> Result<Lookup, CacheError> {
        let dir = self.models.output_dir_for(options.model_kind, target);
        let base = basename_of(source);
        let plain = dir.join(output_file_name(&base, target));
        let plain_ex = examine(&plain);
        let alternates = alternates(&dir, &base, target);

        let version_ok = |p: &Provenance| {
            options
                .converter_version
                .as_ref()
                .is_none_or(|v| *v == p.converter_version)
        };
        // The provenance of a file that is a complete output of `target` by a current converter.
        let valid_prov = |ex: &Examined| -> Option<Provenance> {
            ex.provenance
                .clone()
                .filter(|p| ex.is_complete_in(target) && p.target == target && version_ok(p))
        };
        let same_facts = |p: &Provenance| {
            p.source_path == stat.path
                && p.source_size == stat.size
                && p.source_mtime_ns == stat.mtime_ns
        };
        // Or the facts a lookup recorded after finding this source's content under others.
        let seen_before = |ex: &Examined, p: &Provenance| match read_output_record(&ex.path) {
            Ok(Some(r)) => r.source_seen.is_some_and(|s| {
                s.path == stat.path
                    && s.size == stat.size
                    && s.mtime_ns == stat.mtime_ns
                    && s.digest == p.source_digest
            }),
            _ => false,
        };
        let candidates: Vec<&Examined> = plain_ex.iter().chain(alternates.iter()).collect();
        let hit = |ex: &Examined, p: Provenance, digest: Option<String>, data: Served| Lookup {
            status: LookupStatus::Hit,
            path: ex.path.clone(),
            source: stat.clone(),
            source_digest: digest,
            provenance: Some(p),
            superseded: Vec::new(),
            note: data.note,
            upkeep: Upkeep {
                refresh: data.refresh,
                source_seen: None,
            },
        };
        // Outputs whose provenance fits but whose data is not what was published, with why.
        let mut data_changed: Vec<(PathBuf, String)> = Vec::new();

        // 1. The cheap identity: same path, size and mtime.
        for ex in &candidates {
            if let Some(p) = valid_prov(ex).filter(|p| same_facts(p) || seen_before(ex, p)) {
                if options.verify_digest && digest.get()? != p.source_digest {
                    continue;
                }
                if let Some(data) = data_verdict(ex, options, &mut data_changed) {
                    return Ok(hit(ex, p, digest.value.clone(), data));
                }
            }
        }
        // 2. A file another tool made, right precision, no provenance.
        if let Some(ex) = &plain_ex
            && !ex.has_provenance_keys
            && ex.is_complete_in(target)
            && !options.strict
        {
            return Ok(Lookup {
                status: LookupStatus::Unverified,
                path: plain,
                source: stat.clone(),
                source_digest: digest.value.clone(),
                provenance: None,
                superseded: Vec::new(),
                note: None,
                upkeep: Upkeep::default(),
            });
        }
        // Nothing at all to compare against: no need to hash here (the converter hashes the
        // source for the provenance, with progress).
        if candidates.is_empty() {
            return Ok(Lookup {
                status: LookupStatus::Missing,
                path: plain,
                source: stat.clone(),
                source_digest: digest.value.clone(),
                provenance: None,
                superseded: Vec::new(),
                note: None,
                upkeep: Upkeep::default(),
            });
        }
        // 3. The same content under other facts (moved, copied, touched).
        let d = digest.get()?.to_string();
        for ex in &candidates {
            if let Some(p) = valid_prov(ex).filter(|p| p.source_digest == d)
                && let Some(data) = data_verdict(ex, options, &mut data_changed)
            {
                // Remembered once the answer is used, so that the next lookups need not hash
                // the source again.
                let mut found = hit(ex, p, Some(d.clone()), data);
                found.upkeep.source_seen = Some(SourceSeen {
                    path: stat.path.clone(),
                    size: stat.size,
                    mtime_ns: stat.mtime_ns,
                    digest: d,
                });
                return Ok(found);
            }
        }

        // 4. No usable output: decide where the new one goes, and why.
        let stale_reason = |p: &Provenance| -> String {
            if p.source_digest == d {
                format!(
                    "made by converter `{}`, current is `{}`",
                    p.converter_version,
                    options.converter_version.as_deref().unwrap_or("?")
                )
            } else if p.source_size != stat.size {
                format!(
                    "the source changed size ({} -> {} bytes)",
                    p.source_size, stat.size
                )
            } else {
                "the source's content changed".to_string()
            }
        };
        let verdict = |ex: &Examined| -> LookupStatus {
            if let Some(r) = ex.defect_for(target) {
                return LookupStatus::Broken(r);
            }
            if let Some((_, r)) = data_changed.iter().find(|(p, _)| *p == ex.path) {
                return LookupStatus::Broken(r.clone());
            }
            match &ex.provenance {
                None if ex.has_provenance_keys => {
                    LookupStatus::Broken("its provenance is unreadable".into())
                }
                None => LookupStatus::Foreign,
                Some(p) if p.target != target => {
                    LookupStatus::Broken(format!("its provenance says it was made as {}", p.target))
                }
                Some(p) => LookupStatus::Stale(stale_reason(p)),
            }
        };
        let mut note = None;
        let (status, path, provenance) = match &plain_ex {
            None => (LookupStatus::Missing, plain.clone(), None),
            Some(ex) => {
                let owned_by_other = ex.provenance.as_ref().is_some_and(|p| {
                    ex.is_complete_in(target)
                        && p.target == target
                        && p.source_path != stat.path
                        && p.source_digest != d
                });
                // A file convcache did not make is the user's: it is never replaced. The
                // conversion takes the digest-suffixed name, as for another source's output.
                // Ours are told by the provenance keys in their header (readable even when the
                // data is damaged) or, for a header damaged in place, by an output record of
                // the same size (a record alone may have outlived its output).
                let record_of_this_file = matches!(
                    read_output_record(&ex.path),
                    Ok(Some(r)) if r.size == ex.size
                );
                let made_elsewhere = !ex.has_provenance_keys && !record_of_this_file;
                if made_elsewhere {
                    let why = match ex.defect_for(target) {
                        Some(defect) => defect,
                        None => "not used with --strict".to_string(),
                    };
                    note = Some(format!(
                        "{} was made by another tool ({why}) and is left in place",
                        ex.path.display()
                    ));
                }
                if owned_by_other || made_elsewhere {
                    let alt = dir.join(output_file_name(
                        &disambiguated_basename(&base, digest::short(&d)),
                        target,
                    ));
                    match examine(&alt) {
                        None => (LookupStatus::Missing, alt, None),
                        Some(aex) => (verdict(&aex), alt, aex.provenance.clone()),
                    }
                } else {
                    (verdict(ex), plain.clone(), ex.provenance.clone())
                }
            }
        };
        let superseded = alternates
            .iter()
            .filter(|ex| ex.path != path)
            .filter(|ex| {
                ex.provenance
                    .as_ref()
                    .is_some_and(|p| p.source_path == stat.path && p.target == target)
            })
            .map(|ex| ex.path.clone())
            .collect();
        Ok(Lookup {
            status,
            path,
            source: stat.clone(),
            source_digest: Some(d),
            provenance,
            superseded,
            note,
            upkeep: Upkeep::default(),
        })
    }

    /// The output dirs of `kind`, of every model kind (diffusion models, then text encoders).
    fn dirs(&self, kind: Kind) -> Vec<(PathBuf, Container, ModelKind)> {
        let mut v = Vec::new();
        for model_kind in ModelKind::ALL {
            if matches!(kind, Kind::Precision | Kind::All) {
                let dir = self.models.dir_for(model_kind, Container::Safetensors);
                v.push((dir, Container::Safetensors, model_kind));
            }
            if matches!(kind, Kind::Gguf | Kind::All) {
                let dir = self.models.dir_for(model_kind, Container::Gguf);
                v.push((dir, Container::Gguf, model_kind));
            }
        }
        v
    }

    /// The outputs in the dirs of `kind`: regular files directly inside whose names parse as
    /// output names of that dir's container (symlinks, temporaries and other files are not
    /// listed). Sorted by path.
    pub fn list(&self, kind: Kind) -> Result<Vec<Entry>, CacheError> {
        let mut out = Vec::new();
        for (dir, container, model_kind) in self.dirs(kind) {
            for (path, size) in output_files(&dir, container)? {
                let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                    continue;
                };
                let Some((basename, precision)) = parse_output_name(name) else {
                    continue;
                };
                let examined = examine(&path);
                let problem = match &examined {
                    Some(ex) => ex.defect_for(precision),
                    None => Some("it disappeared while listed".into()),
                };
                let provenance = examined.and_then(|e| e.provenance);
                out.push(Entry {
                    model_kind,
                    basename,
                    precision,
                    source: provenance.as_ref().map(|p| p.source_path.clone()),
                    provenance,
                    last_used: last_used(&path),
                    problem,
                    path,
                    size,
                });
            }
        }
        out.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// Count, bytes and the split by precision of what [`Cache::list`] lists.
    pub fn stats(&self, kind: Kind) -> Result<Stats, CacheError> {
        Ok(Stats::from_entries(&self.list(kind)?))
    }

    /// Keeps the `keep` most recently used outputs of `source` (any target; matched by the
    /// source path in their provenance) and removes the others.
    pub fn cleanup(
        &self,
        source: &Path,
        keep: usize,
        dry_run: bool,
    ) -> Result<Vec<Removed>, CacheError> {
        self.cleanup_matching(source, keep, dry_run, |_| true)
    }

    /// [`Cache::cleanup`] among the outputs of `source` that `include` accepts (a caller's
    /// selection by precision, as the Python package's `conversion_type`): the others are
    /// neither kept nor removed.
    pub fn cleanup_matching(
        &self,
        source: &Path,
        keep: usize,
        dry_run: bool,
        include: impl Fn(&Entry) -> bool,
    ) -> Result<Vec<Removed>, CacheError> {
        let source = identity_path(source);
        let mine: Vec<Entry> = self
            .list(Kind::All)?
            .into_iter()
            .filter(|e| e.source.as_deref() == Some(source.as_path()) && include(e))
            .collect();
        let mut removed = Vec::new();
        self.keep_most_recent(mine, keep, dry_run, &mut removed)?;
        Ok(removed)
    }

    /// [`Cache::cleanup`] for every source: per source (the source path in the provenance),
    /// keeps the `keep` most recently used outputs. Files without provenance are left alone.
    pub fn cleanup_all(&self, keep: usize, dry_run: bool) -> Result<Vec<Removed>, CacheError> {
        let mut by_source: BTreeMap<PathBuf, Vec<Entry>> = BTreeMap::new();
        for e in self.list(Kind::All)? {
            if let Some(s) = e.source.clone() {
                by_source.entry(s).or_default().push(e);
            }
        }
        let mut removed = Vec::new();
        for (_, entries) in by_source {
            self.keep_most_recent(entries, keep, dry_run, &mut removed)?;
        }
        Ok(removed)
    }

    /// Removes all but the `keep` most recently used of `entries` (the outputs of one source),
    /// adding what it removed to `removed`.
    fn keep_most_recent(
        &self,
        mut entries: Vec<Entry>,
        keep: usize,
        dry_run: bool,
        removed: &mut Vec<Removed>,
    ) -> Result<(), CacheError> {
        entries.sort_by(|a, b| b.last_used.cmp(&a.last_used).then(a.path.cmp(&b.path)));
        for e in entries.into_iter().skip(keep) {
            if self.remove_output(&e.path, dry_run)? {
                removed.push(Removed {
                    path: e.path,
                    size: e.size,
                });
            }
        }
        Ok(())
    }

    /// Removes least recently used outputs until all listed outputs total at most `max_bytes`.
    /// Files without provenance count toward the total but are never removed.
    pub fn evict_to(&self, max_bytes: u64, dry_run: bool) -> Result<Eviction, CacheError> {
        let mut entries = self.list(Kind::All)?;
        let bytes_before: u64 = entries.iter().map(|e| e.size).sum();
        entries.retain(|e| e.provenance.is_some());
        entries.sort_by(|a, b| a.last_used.cmp(&b.last_used).then(a.path.cmp(&b.path)));
        let mut total = bytes_before;
        let mut removed = Vec::new();
        for e in entries {
            if total <= max_bytes {
                break;
            }
            if self.remove_output(&e.path, dry_run)? {
                total -= e.size;
                removed.push(Removed {
                    path: e.path,
                    size: e.size,
                });
            }
        }
        Ok(Eviction {
            removed,
            bytes_before,
            bytes_after: total,
        })
    }

    /// Removes one output if the cache recognises it; `Ok(false)` when it is left alone (not
    /// directly in an output dir, not a regular file, not an output name, no provenance, or
    /// locked by a writer). With `dry_run` nothing is removed but the answer is the same.
    pub fn remove_output(&self, path: &Path, dry_run: bool) -> Result<bool, CacheError> {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            return Ok(false);
        };
        let Some((_, precision)) = parse_output_name(name) else {
            return Ok(false);
        };
        let in_output_dir = ModelKind::ALL
            .into_iter()
            .any(|k| path.parent() == Some(self.models.output_dir_for(k, precision).as_path()));
        if !in_output_dir {
            return Ok(false);
        }
        let is_regular = |p: &Path| fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_file());
        if !is_regular(path) {
            return Ok(false);
        }
        let Some(_slot) = OutputSlot::try_acquire(path)? else {
            return Ok(false);
        };
        // Re-checked under the lock: writers publish under it, so the file is stable now.
        if !is_regular(path) || examine(path).and_then(|e| e.provenance).is_none() {
            return Ok(false);
        }
        if !dry_run {
            fs::remove_file(path).map_err(io_err(path, "remove"))?;
            let _ = fs::remove_file(use_stamp_path(path));
            remove_output_record(path);
        }
        Ok(true)
    }

    /// Records that `lookup`'s answer (a hit) was used now, and writes what the lookup learned
    /// (a refreshed output record, the source's new facts), unless a writer holds the output's
    /// lock. Best effort: a read-only models dir must still serve hits. [`Cache::lookup`] itself
    /// writes nothing; this is for a caller that uses the answer (a conversion), not one that
    /// only reports it.
    pub fn record_hit(&self, lookup: &Lookup) {
        let _ = record_use_at(&lookup.path, SystemTime::now());
        if lookup.upkeep == Upkeep::default() {
            return;
        }
        if let Ok(Some(slot)) = OutputSlot::try_acquire(&lookup.path) {
            slot.write_upkeep(&lookup.upkeep);
        }
    }

    /// Removes temporaries in the output dirs whose writer is gone (its output's lock is free),
    /// but those of interrupted conversions that can still be resumed (their resume journal
    /// names them, is younger than [`crate::journal::RESUME_KEEP`] and their source is
    /// unchanged), and resume journals that cannot be. Returns the removed temporaries. For
    /// commands that write (a conversion, a cleanup); lookups and listings leave temporaries
    /// alone.
    pub fn sweep_temporaries(&self) -> Result<Vec<PathBuf>, CacheError> {
        let mut removed = Vec::new();
        for (dir, _, _) in self.dirs(Kind::All) {
            let Ok(rd) = fs::read_dir(&dir) else { continue };
            let mut outputs = BTreeSet::new();
            for ent in rd.flatten() {
                let name = ent.file_name();
                if let Some((output_name, _pid)) = name.to_str().and_then(parse_temp_name) {
                    outputs.insert(output_name.to_owned());
                }
            }
            // Journals whose temporary is gone.
            if let Ok(rd) = fs::read_dir(dir.join(STATE_DIR)) {
                for ent in rd.flatten() {
                    let name = ent.file_name();
                    if let Some(output_name) =
                        name.to_str().and_then(|n| n.strip_suffix(".journal"))
                        && parse_output_name(output_name).is_some()
                    {
                        outputs.insert(output_name.to_owned());
                    }
                }
            }
            for output_name in outputs {
                let output = dir.join(output_name);
                if let Some(slot) = OutputSlot::try_acquire(&output)? {
                    let keep = crate::journal::keepable_temporary(&output);
                    removed.extend(slot.remove_dead_temporaries(keep.as_deref())?);
                    if keep.is_some_and(|t| !dir.join(t).is_file()) {
                        crate::journal::remove_journal(&output);
                    }
                }
            }
        }
        Ok(removed)
    }
}

/// Why an output's data may be served ([`data_verdict`]).
struct Served {
    /// What was not verified (no usable output record).
    note: Option<String>,
    /// Facts to re-record the output with when the answer is used ([`Upkeep::refresh`]).
    refresh: Option<RecordedFacts>,
}

/// Whether the data of `ex` (whose provenance fits) may be served: `Some` if so, `None` if not
/// (the reason is pushed to `changed`). Hashes the output only when its size or mtime differ
/// from its record, or with `verify_digest`.
fn data_verdict(
    ex: &Examined,
    options: &LookupOptions,
    changed: &mut Vec<(PathBuf, String)>,
) -> Option<Served> {
    if changed.iter().any(|(p, _)| *p == ex.path) {
        return None;
    }
    match check_output_data(&ex.path, options.verify_digest) {
        DataCheck::Verified(refresh) => Some(Served {
            note: None,
            refresh,
        }),
        DataCheck::Unrecorded(why) if options.strict => {
            changed.push((ex.path.clone(), format!("{why} (strict)")));
            None
        }
        DataCheck::Unrecorded(why) => Some(Served {
            note: Some(why),
            refresh: None,
        }),
        DataCheck::Changed(why) => {
            changed.push((ex.path.clone(), why));
            None
        }
    }
}

/// Outputs with a digest-suffixed basename `{base}-{8 hex}` for `target` in `dir`.
fn alternates(dir: &Path, base: &str, target: Precision) -> Vec<Examined> {
    let Ok(files) = output_files(dir, target.container()) else {
        return Vec::new();
    };
    files
        .into_iter()
        .filter(|(p, _)| {
            let Some((b, prec)) = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(parse_output_name)
            else {
                return false;
            };
            prec == target
                && b.strip_prefix(base)
                    .and_then(|r| r.strip_prefix('-'))
                    .is_some_and(|h| h.len() == 8 && h.bytes().all(|c| c.is_ascii_hexdigit()))
        })
        .filter_map(|(p, _)| examine(&p))
        .collect()
}

/// Regular files directly in `dir` whose names parse as outputs in `container`, with sizes.
/// A missing dir is empty.
fn output_files(dir: &Path, container: Container) -> Result<Vec<(PathBuf, u64)>, CacheError> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(dir, "list")(e)),
    };
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(io_err(dir, "list"))?;
        // DirEntry::metadata does not follow symlinks.
        let Ok(meta) = ent.metadata() else { continue };
        if !meta.file_type().is_file() {
            continue;
        }
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        match parse_output_name(name) {
            Some((_, p)) if p.container() == container => out.push((ent.path(), meta.len())),
            _ => {}
        }
    }
    Ok(out)
}

/// When `output` was last produced or served: the later of its use stamp and its own mtime.
fn last_used(output: &Path) -> SystemTime {
    let mtime = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    match (mtime(&use_stamp_path(output)), mtime(output)) {
        (Some(a), Some(b)) => a.max(b),
        (a, b) => a.or(b).unwrap_or(SystemTime::UNIX_EPOCH),
    }
}
