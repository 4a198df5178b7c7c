//! `convcache detect FILE...`.

use std::fmt::Write as _;

use indicatif::HumanBytes;
use serde_json::Value;

use crate::args::DetectArgs;
use crate::output::{Exit, Failure, Ui};

/// Detects every file; prints the good ones, one error line per bad one (exit 2 if any).
pub fn run(ui: &Ui, args: &DetectArgs) -> Exit {
    let mut exit = Exit::Ok;
    let mut found = Vec::new();
    for file in &args.files {
        match detect::detect(file) {
            Ok(d) => match serde_json::to_value(&d) {
                Ok(v) => {
                    if !ui.json {
                        // A blank line between files.
                        let sep = if found.is_empty() { "" } else { "\n" };
                        ui.print(format!("{sep}{}", describe(&v)));
                    }
                    found.push(v);
                }
                Err(e) => {
                    ui.error(&Failure::failed(format!("{}: {e}", file.display())));
                    exit = exit.max(Exit::Failed);
                }
            },
            Err(e) => {
                ui.error(&Failure::input(e));
                exit = Exit::BadInput;
            }
        }
    }
    if ui.json {
        ui.print_json(&Value::Array(found));
    }
    exit
}

/// Renders a JSON value as a short text: strings bare, null as `-`, others as compact JSON.
pub fn text(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The text form of one detection (a serialized [`detect::Detection`]).
pub fn describe(d: &Value) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "{}", text(&d["path"]));
    let _ = writeln!(s, "  format        {}", text(&d["format"]));
    let mut precision = text(&d["precision"]);
    if let Some(ev) = d.get("evidence").filter(|e| !e.is_null()) {
        precision.push_str(&format!("  ({})", text(ev)));
    }
    let _ = writeln!(s, "  precision     {precision}");
    if let Some(ft) = d.get("gguf_file_type").filter(|v| !v.is_null()) {
        let _ = writeln!(s, "  file type     {}", text(ft));
    }
    let arch = match &d["architecture"] {
        Value::Null => "unknown".to_owned(),
        a => text(a),
    };
    let _ = writeln!(s, "  architecture  {arch}");
    if d.get("model_kind").and_then(Value::as_str) == Some("text_encoders") {
        let _ = writeln!(s, "  kind          text encoder");
    }
    if let Some(fp8) = d.get("fp8_scaling").filter(|v| !v.is_null()) {
        let _ = writeln!(s, "  fp8 scaling   {}", text(fp8));
    }
    if let Some(bnb) = d.get("bitsandbytes").filter(|v| !v.is_null()) {
        let _ = writeln!(s, "  bitsandbytes  {}", text(bnb));
    }
    let size = d["file_size"]
        .as_u64()
        .map(|b| HumanBytes(b).to_string())
        .unwrap_or_else(|| "-".into());
    let _ = writeln!(
        s,
        "  tensors       {}, file {size}",
        text(&d["tensor_count"])
    );
    if let Some(rows) = d["histogram"].as_array() {
        for (i, row) in rows.iter().enumerate() {
            let label = if i == 0 { "histogram" } else { "" };
            let bytes = row["bytes"]
                .as_u64()
                .map(|b| HumanBytes(b).to_string())
                .unwrap_or_else(|| "-".into());
            let _ = writeln!(
                s,
                "  {label:<12}  {:<12} {:>7} tensors {:>12}",
                text(&row["dtype"]),
                text(&row["tensors"]),
                bytes
            );
        }
    }
    if d["supported_as_source"] == Value::Bool(false) {
        let _ = writeln!(s, "  source        not convertible by convcache");
    }
    if let Some(notes) = d["notes"].as_array() {
        for n in notes {
            let _ = writeln!(s, "  note          {}", text(n));
        }
    }
    s.truncate(s.trim_end().len());
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_form_shows_the_fields() {
        let d = serde_json::json!({
            "path": "m/flux.safetensors", "format": "safetensors", "precision": "bf16",
            "evidence": "dominant dtype by bytes", "architecture": "flux",
            "histogram": [{"dtype": "BF16", "tensors": 3, "bytes": 2048},
                          {"dtype": "F32", "tensors": 1, "bytes": 16}],
            "file_size": 2200, "tensor_count": 4, "gguf_file_type": null,
            "fp8_scaling": null, "bitsandbytes": null, "metadata": {}
        });
        let t = describe(&d);
        assert!(t.starts_with("m/flux.safetensors\n"), "{t}");
        assert!(t.contains("precision     bf16"), "{t}");
        assert!(t.contains("architecture  flux"), "{t}");
        assert!(t.contains("BF16"), "{t}");
        assert!(t.contains("2.00 KiB"), "{t}");
        assert!(!t.contains("file type"), "{t}");
        assert!(!t.contains("note"), "{t}");
        let mut d = d;
        d["notes"] = serde_json::json!(["pickle checkpoints are not supported as a source"]);
        d["supported_as_source"] = Value::Bool(false);
        let t = describe(&d);
        assert!(t.contains("note          pickle checkpoints"), "{t}");
        assert!(t.contains("not convertible"), "{t}");
    }
}
