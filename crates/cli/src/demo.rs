//! `convcache demo`: the whole product on a built-in sample, in a temporary models dir.

use cache::{Cache, Kind, ModelsDir};
use detect::Precision;
use indicatif::HumanBytes;
use serde_json::{Value, json};

use crate::cache_cmds::{entry_json, stats_json, stats_text};
use crate::convert_cmd::{Row, convert_all, present};
use crate::detect_cmd::describe;
use crate::output::{Exit, Failure, Ui};
use crate::sample::SampleSpec;

/// The targets the demo converts to.
const TARGETS: [Precision; 4] = [
    Precision::Bf16,
    Precision::Fp8E4m3fn,
    Precision::Nf4,
    Precision::Gguf(gguf::FileType::Q4KM),
];

fn all_ok(rows: &[Row]) -> bool {
    rows.iter().all(|r| r.result.is_ok())
}

/// Runs the demo. Everything it writes lives in a temporary dir removed at the end.
pub fn run(ui: &Ui) -> Result<Exit, Failure> {
    let tmp = tempfile::Builder::new()
        .prefix("convcache-demo-")
        .tempdir()
        .map_err(|e| Failure::failed(format!("cannot create a temporary directory: {e}")))?;
    let models = ModelsDir::at(tmp.path().join("models"));
    let source_dir = models.root().join("diffusion_models");
    std::fs::create_dir_all(&source_dir)
        .map_err(|e| Failure::failed(format!("{}: {e}", source_dir.display())))?;
    let source = source_dir.join("flux_sample.safetensors");
    let size = SampleSpec::DEMO
        .write(&source)
        .map_err(|e| Failure::failed(format!("{}: {e}", source.display())))?;

    ui.print(format!(
        "== a sample model ({}) in a temporary models dir {}\n",
        HumanBytes(size),
        models.root().display()
    ));
    let detection = detect::detect(&source).map_err(Failure::failed)?;
    let detection = serde_json::to_value(&detection).unwrap_or(Value::Null);
    ui.print(describe(&detection));

    let mut request = smart::Options::new(models.clone());
    // An interrupt stops the conversion; the temporary models dir is removed on the way out.
    request.cancel = crate::interrupt::install();
    let bars = crate::progress::Bars::default();
    if ui.progress_enabled() {
        request.observer = Some(&bars);
    }
    // Text and -q output of the conversions comes from `present`, as for `convert`.
    let text_ui = Ui { json: false, ..*ui };
    let quiet_json = Ui {
        json: true,
        quiet: true,
    };
    let show = |rows: &[Row]| {
        if ui.json {
            // Errors still go to stderr; the rows go into the one JSON document below.
            for r in rows {
                if let Err(e) = &r.result {
                    quiet_json.error(&Failure::failed(e));
                }
            }
        } else {
            present(&text_ui, rows);
        }
    };

    ui.print("\n== convert to bf16, fp8, nf4 and Q4_K_M (converts)");
    let interrupted = || crate::interrupt::arrived(request.cancel.as_deref());
    let first = convert_all(
        &request,
        std::slice::from_ref(&source),
        &TARGETS,
        smart::many::default_jobs(),
    );
    show(&first);
    if interrupted() {
        return Ok(Exit::Interrupted);
    }
    ui.print("\n== the same again (answered from the cache)");
    let second = convert_all(
        &request,
        std::slice::from_ref(&source),
        &TARGETS,
        smart::many::default_jobs(),
    );
    show(&second);
    if interrupted() {
        return Ok(Exit::Interrupted);
    }

    let cache = Cache::new(models.clone());
    let entries = cache.list(Kind::All).map_err(Failure::failed)?;
    let stats = cache.stats(Kind::All).map_err(Failure::failed)?;
    ui.print("\n== convcache list");
    for e in &entries {
        ui.print(format!(
            "{:<12} {:>11}  {}",
            e.precision.canonical_name(),
            HumanBytes(e.size).to_string(),
            e.path.display()
        ));
    }
    ui.print("\n== convcache stats");
    ui.print(stats_text(&stats));

    if ui.json {
        ui.print_json(&json!({
            "models_dir": models.root().display().to_string(),
            "sample": detection,
            "first": first.iter().map(Row::json).collect::<Vec<_>>(),
            "second": second.iter().map(Row::json).collect::<Vec<_>>(),
            "list": entries.iter().map(entry_json).collect::<Vec<_>>(),
            "stats": stats_json(&stats),
        }));
    } else {
        ui.print(
            "\nThe temporary models dir is removed now. Try it on your own models:\n  \
             convcache convert path/to/model.safetensors --to bf16,fp8,nf4,Q4_K_M",
        );
    }
    Ok(if all_ok(&first) && all_ok(&second) {
        Exit::Ok
    } else {
        Exit::Failed
    })
}
