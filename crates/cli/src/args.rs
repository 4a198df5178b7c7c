//! The command line, as clap parses it.

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use detect::Precision;

use crate::size::parse_size;

/// Convert diffusion-model checkpoints between precisions and quantization formats, once.
///
/// Exit codes: 0 success; 1 a conversion failed; 2 bad input or usage.
#[derive(Debug, Parser)]
#[command(name = "convcache", version, propagate_version = true)]
pub struct Cli {
    /// The models directory (default: $CONVCACHE_MODELS_DIR, else the `models/` of a ComfyUI
    /// install found above the current directory, else ./models).
    #[arg(long, global = true, value_name = "DIR")]
    pub models_dir: Option<PathBuf>,

    /// Print stable JSON on stdout instead of text (see docs/cli.md for the fields).
    #[arg(long, global = true)]
    pub json: bool,

    /// No progress bars and no notes; only results and errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,

    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Convert each SRC to each target, or answer from the cache.
    Convert(ConvertArgs),
    /// Say, per source and target, whether a conversion already exists (converts nothing).
    Check(CheckArgs),
    /// List the cached conversions.
    List(KindArgs),
    /// Count and size of the cached conversions.
    Stats(KindArgs),
    /// Remove old conversions: keep SRC's N most recently used, or shrink the cache to SIZE.
    Cleanup(CleanupArgs),
    /// Show each file's format, precision, dtype histogram and architecture.
    Detect(DetectArgs),
    /// Make a sample model in a temporary models dir, convert it twice (the second time is a
    /// cache hit), then list and show statistics.
    Demo,
}

/// What `convert` and `check` are asked about: the source, its targets, and the flags that
/// decide which output answers (`check` answers for a `convert` with the same flags).
#[derive(Debug, Args)]
pub struct ConversionArgs {
    /// The source model file(s). Several sources are each converted to every target.
    #[arg(required = true, value_name = "SRC")]
    pub sources: Vec<PathBuf>,
    /// Target precision(s): fp32, fp16, bf16, fp8 (= fp8_e4m3fn), fp8_e5m2, nf4, fp4, int8,
    /// fp8_scaled, nvfp4, mxfp8 (ComfyUI), Q4_0 ... Q8_0, Q2_K ... Q6_K, gguf_f16 ...;
    /// comma-separated or repeated.
    #[arg(
        long = "to",
        value_name = "T[,T...]",
        value_delimiter = ',',
        required = true
    )]
    pub targets: Vec<Precision>,
    /// A file found at the output path that has no provenance does not count: a conversion is
    /// made beside it instead of using it.
    #[arg(long)]
    pub strict: bool,
    /// bitsandbytes NF4/FP4: also quantize the absmax values (double quantization).
    #[arg(long)]
    pub double_quant: bool,
    /// GGUF targets: the architecture to assume instead of detecting it from the tensor names
    /// (flux, flux2, chroma, sd3, aura, hidream, cosmos, qwen_image, ltxv, ltxav, hyvid,
    /// hyvid15, wan, sdxl, sd1, lumina2, z_image, t5xxl, umt5xxl).
    #[arg(long, value_name = "A")]
    pub arch: Option<gguf::Arch>,
}

/// `convert`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    #[command(flatten)]
    pub conversion: ConversionArgs,
    /// Publish without waiting for the output to reach the disk (no fsync). Faster where the
    /// disk is slower than the conversion. convcache still never serves a torn output: its
    /// first cache hit syncs the output, and after a restart it re-verifies such an output
    /// once. Other tools reading the file right after a power loss could see it incomplete.
    /// Linux only (elsewhere outputs are always synced).
    #[arg(long)]
    pub no_fsync: bool,
    /// How progress is shown on stderr: `bars`, `jsonl` (JSON lines, see docs/cli.md) or
    /// `none`. Default: bars when stderr is a terminal and neither --json nor -q is given,
    /// else none.
    #[arg(long, value_enum, value_name = "HOW")]
    pub progress: Option<ProgressArg>,
    /// The cache's size budget: an output that would take the cached conversions over SIZE
    /// does not fit (default: $CONVCACHE_MAX_SIZE, else no budget). SIZE as for cleanup.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_cache_size: Option<u64>,
    /// When an output does not fit (free space or --max-cache-size), evict least recently used
    /// conversions until it does. Never a file convcache did not make, an output being
    /// written, the source, or an output of this command.
    #[arg(long)]
    pub make_room: bool,
    /// How many conversions run at once (default: the number of CPUs). The targets of one
    /// source start together and share one read of it, so a source with more targets than N
    /// still converts them all at once.
    #[arg(long, short = 'j', value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub jobs: Option<u16>,
    /// Convert from the start even when an interrupted conversion of the same output left a
    /// temporary and its journal (which are then removed). By default such a conversion
    /// continues from its last durable checkpoint, after checking that the source is unchanged
    /// and the temporary's bytes match the journal.
    #[arg(long)]
    pub no_resume: bool,
}

/// How `convert` shows progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ProgressArg {
    /// Progress bars with ETA.
    Bars,
    /// JSON-lines events.
    Jsonl,
    /// Nothing.
    None,
}

/// `check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub conversion: ConversionArgs,
}

/// Which cache folder(s) a command looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KindArg {
    /// `diffusion_models/converted/` and `text_encoders/converted/` (precision,
    /// bitsandbytes and ComfyUI quantized outputs).
    Precision,
    /// `diffusion_models/gguf/` and `text_encoders/gguf/`.
    Gguf,
    /// Both.
    All,
}

/// `list` and `stats`.
#[derive(Debug, Args)]
pub struct KindArgs {
    /// Which conversions.
    #[arg(long, value_enum, default_value_t = KindArg::All)]
    pub kind: KindArg,
}

/// `cleanup`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("policy").required(true).args(["keep", "max_size"])))]
pub struct CleanupArgs {
    /// With --keep: the source whose conversions are cleaned up (it may have been deleted:
    /// conversions are matched by the source path they record). Without it, every source's.
    pub source: Option<PathBuf>,
    /// Keep the N most recently used conversions of SRC (of each source, without SRC), remove
    /// the others.
    #[arg(long, value_name = "N")]
    pub keep: Option<usize>,
    /// Remove least recently used conversions until the cache holds at most SIZE
    /// (e.g. 20G, 512MiB, 1.5GB; K/M/G/T and KiB.. are powers of 1024, KB/MB/GB/TB of 1000).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, conflicts_with = "source")]
    pub max_size: Option<u64>,
    /// Say what would be removed, remove nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// `detect`.
#[derive(Debug, Args)]
pub struct DetectArgs {
    /// The model files.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn targets_split_on_commas_and_parse_aliases() {
        let cli =
            Cli::try_parse_from(["convcache", "convert", "m.safetensors", "--to", "fp8,BF16"])
                .unwrap();
        let Command::Convert(c) = cli.command else {
            panic!("not convert")
        };
        assert_eq!(
            c.conversion.targets,
            vec![Precision::Fp8E4m3fn, Precision::Bf16]
        );
    }

    #[test]
    fn several_sources_and_jobs() {
        let cli = Cli::try_parse_from([
            "convcache",
            "convert",
            "a.safetensors",
            "b.safetensors",
            "--to",
            "Q8_0",
            "--jobs",
            "3",
        ])
        .unwrap();
        let Command::Convert(c) = cli.command else {
            panic!("not convert")
        };
        assert_eq!(
            c.conversion.sources,
            [
                PathBuf::from("a.safetensors"),
                PathBuf::from("b.safetensors")
            ]
        );
        assert_eq!(c.jobs, Some(3));
        let err = Cli::try_parse_from(["convcache", "convert", "a", "--to", "Q8_0", "-j", "0"])
            .expect_err("--jobs 0");
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn usage_errors() {
        for argv in [
            &["convcache", "convert", "m.safetensors"][..],
            &["convcache", "convert", "m.safetensors", "--to", "fp9"],
            &["convcache", "cleanup", "--dry-run"],
            &["convcache", "cleanup", "m"],
            &[
                "convcache",
                "cleanup",
                "m",
                "--keep",
                "2",
                "--max-size",
                "1G",
            ],
            &["convcache", "cleanup", "--max-size", "20X"],
            &["convcache", "detect"],
            &[
                "convcache",
                "convert",
                "m",
                "--to",
                "Q8_0",
                "--arch",
                "nope",
            ],
        ] {
            let err = Cli::try_parse_from(argv).expect_err(&argv.join(" "));
            assert_eq!(err.exit_code(), 2, "{argv:?}");
        }
    }

    #[test]
    fn cleanup_forms() {
        let cli = Cli::try_parse_from(["convcache", "cleanup", "--max-size", "1.5GB", "--dry-run"])
            .unwrap();
        let Command::Cleanup(c) = cli.command else {
            panic!("not cleanup")
        };
        assert_eq!(c.max_size, Some(1_500_000_000));
        assert!(c.dry_run);
        let cli =
            Cli::try_parse_from(["convcache", "--json", "cleanup", "m", "--keep", "2"]).unwrap();
        assert!(cli.json);
        // --keep without a source: every source's conversions.
        let cli = Cli::try_parse_from(["convcache", "cleanup", "--keep", "2"]).unwrap();
        let Command::Cleanup(c) = cli.command else {
            panic!("not cleanup")
        };
        assert_eq!((c.source, c.keep), (None, Some(2)));
    }
}
