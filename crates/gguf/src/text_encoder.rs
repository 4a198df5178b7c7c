//! GGUF tensor names of text encoders: llama.cpp's T5 encoder names, which ComfyUI-GGUF's
//! `CLIPLoaderGGUF` turns back into ComfyUI's keys.
//!
//! The loader (`loader.py`, `gguf_clip_loader`) reads a GGUF whose `general.architecture` is
//! `t5` or `t5encoder` and applies `T5_SD_MAP` to every name, as substring replacements in
//! this order: `enc.` → `encoder.`, `.blk.` → `.block.`, `token_embd` → `shared`,
//! `output_norm` → `final_layer_norm`, `attn_q`/`attn_k`/`attn_v`/`attn_o` →
//! `layer.0.SelfAttention.{q,k,v,o}`, `attn_norm` → `layer.0.layer_norm`, `attn_rel_b` →
//! `layer.0.SelfAttention.relative_attention_bias`, `ffn_up` → `layer.1.DenseReluDense.wi_1`,
//! `ffn_down` → `...wo`, `ffn_gate` → `...wi_0`, `ffn_norm` → `layer.1.layer_norm`.
//! [`t5_gguf_name`] is the inverse, with llama.cpp's `convert_hf_to_gguf.py` spelling
//! (`enc.blk.N.attn_q.weight`, `enc.output_norm.weight`, `token_embd.weight`); the unit tests
//! apply the loader's map to every name and get the ComfyUI key back.

/// The llama.cpp name of a ComfyUI T5 / umt5 encoder key, `None` for a key the loader's map
/// cannot give back (not part of a T5 encoder).
pub fn t5_gguf_name(key: &str) -> Option<String> {
    if key == "shared.weight" {
        return Some("token_embd.weight".into());
    }
    if key == "encoder.final_layer_norm.weight" {
        return Some("enc.output_norm.weight".into());
    }
    let rest = key.strip_prefix("encoder.block.")?;
    let (block, rest) = rest.split_once('.')?;
    if block.is_empty() || !block.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    const LAYERS: &[(&str, &str)] = &[
        ("layer.0.SelfAttention.q.", "attn_q."),
        ("layer.0.SelfAttention.k.", "attn_k."),
        ("layer.0.SelfAttention.v.", "attn_v."),
        ("layer.0.SelfAttention.o.", "attn_o."),
        (
            "layer.0.SelfAttention.relative_attention_bias.",
            "attn_rel_b.",
        ),
        ("layer.0.layer_norm.", "attn_norm."),
        ("layer.1.DenseReluDense.wi_0.", "ffn_gate."),
        ("layer.1.DenseReluDense.wi_1.", "ffn_up."),
        ("layer.1.DenseReluDense.wo.", "ffn_down."),
        ("layer.1.layer_norm.", "ffn_norm."),
    ];
    let (suffix, gguf) = LAYERS
        .iter()
        .find_map(|(from, to)| rest.strip_prefix(from).map(|s| (s, *to)))?;
    // Only a parameter name may follow (`weight`); anything else would not map back.
    if suffix != "weight" {
        return None;
    }
    Some(format!("enc.blk.{block}.{gguf}{suffix}"))
}

/// The block number of a llama.cpp T5 encoder tensor name (`enc.blk.N.`).
fn t5_block(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("enc.blk.")?;
    let (n, _) = rest.split_once('.')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// The encoder's `block_count`: one more than the highest `enc.blk.N.` (0 without blocks).
pub fn t5_block_count<'a>(names: impl Iterator<Item = &'a str>) -> usize {
    names
        .filter_map(t5_block)
        .max()
        .map_or(0, |b| b.saturating_add(1))
}

/// T5 v1.1's and umt5's `n_positions` (llama.cpp's converter writes it as the context length).
const T5_CONTEXT_LENGTH: u32 = 512;
/// T5 v1.1's and umt5's `layer_norm_epsilon`.
const T5_LAYER_NORM_EPS: f32 = 1e-6;

/// The `t5encoder.*` hyperparameters llama.cpp's `convert_hf_to_gguf.py` writes for a T5
/// encoder, read off the tensors (GGUF name, torch shape): `context_length` (512),
/// `embedding_length` (d_model: `token_embd`'s width), `feed_forward_length` (d_ff: `ffn_up`'s
/// rows), `block_count`, `attention.head_count` and `attention.relative_buckets_count` (from
/// `attn_rel_b`, `[buckets, heads]`), `attention.key_length` = `value_length` (d_kv:
/// `attn_q`'s rows / heads), `attention.layer_norm_epsilon` and `layer_norm_rms_epsilon`
/// (1e-6). llama.cpp refuses a T5 file without them (llama-quantize included). A value the
/// tensors do not give (a tensor missing, a size over u32) is left out.
pub fn t5_hparams<'a>(
    tensors: impl Iterator<Item = (&'a str, &'a [u64])> + Clone,
) -> Vec<(String, crate::MetadataValue)> {
    use crate::MetadataValue as V;
    let dim = |name: &str, axis: usize| {
        tensors
            .clone()
            .find(|(n, _)| *n == name)
            .and_then(|(_, s)| s.get(axis).copied())
            .and_then(|d| u32::try_from(d).ok())
    };
    let n_embd = dim("token_embd.weight", 1).or_else(|| dim("enc.blk.0.attn_q.weight", 1));
    let n_ff = dim("enc.blk.0.ffn_up.weight", 0);
    let n_head = dim("enc.blk.0.attn_rel_b.weight", 1).filter(|&h| h > 0);
    let buckets = dim("enc.blk.0.attn_rel_b.weight", 0);
    let d_kv = dim("enc.blk.0.attn_q.weight", 0)
        .zip(n_head)
        .filter(|(inner, h)| inner % h == 0)
        .map(|(inner, h)| inner / h);
    let blocks = u32::try_from(t5_block_count(tensors.clone().map(|(n, _)| n))).ok();
    let key = |k: &str| format!("t5encoder.{k}");
    [
        ("context_length", Some(V::U32(T5_CONTEXT_LENGTH))),
        ("embedding_length", n_embd.map(V::U32)),
        ("feed_forward_length", n_ff.map(V::U32)),
        ("block_count", blocks.map(V::U32)),
        ("attention.head_count", n_head.map(V::U32)),
        ("attention.key_length", d_kv.map(V::U32)),
        ("attention.value_length", d_kv.map(V::U32)),
        (
            "attention.layer_norm_epsilon",
            Some(V::F32(T5_LAYER_NORM_EPS)),
        ),
        ("attention.relative_buckets_count", buckets.map(V::U32)),
        (
            "attention.layer_norm_rms_epsilon",
            Some(V::F32(T5_LAYER_NORM_EPS)),
        ),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.map(|v| (key(k), v)))
    .collect()
}

/// ComfyUI-GGUF's `T5_SD_MAP`, in its order (`loader.py`): what the loader does to a GGUF
/// name. Public for tests that check the names convcache writes map back.
pub const COMFYUI_GGUF_T5_SD_MAP: &[(&str, &str)] = &[
    ("enc.", "encoder."),
    (".blk.", ".block."),
    ("token_embd", "shared"),
    ("output_norm", "final_layer_norm"),
    ("attn_q", "layer.0.SelfAttention.q"),
    ("attn_k", "layer.0.SelfAttention.k"),
    ("attn_v", "layer.0.SelfAttention.v"),
    ("attn_o", "layer.0.SelfAttention.o"),
    ("attn_norm", "layer.0.layer_norm"),
    (
        "attn_rel_b",
        "layer.0.SelfAttention.relative_attention_bias",
    ),
    ("ffn_up", "layer.1.DenseReluDense.wi_1"),
    ("ffn_down", "layer.1.DenseReluDense.wo"),
    ("ffn_gate", "layer.1.DenseReluDense.wi_0"),
    ("ffn_norm", "layer.1.layer_norm"),
];

/// The ComfyUI key ComfyUI-GGUF's loader makes of GGUF name `name` (`sd_map_replace`).
pub fn comfyui_gguf_t5_key(name: &str) -> String {
    let mut k = name.to_owned();
    for (from, to) in COMFYUI_GGUF_T5_SD_MAP {
        k = k.replace(from, to);
    }
    k
}

/// The largest `spiece_model` read (umt5's is 4.5 MB).
pub const MAX_SPIECE_MODEL_BYTES: u64 = 64 << 20;

/// What ComfyUI-GGUF's `gguf_tokenizer_loader` rebuilds a T5 tokenizer from, read from a
/// serialized SentencePiece `ModelProto` (Comfy-Org's `spiece_model` tensor).
#[derive(Debug, Clone, PartialEq)]
pub struct SentencePiece {
    /// Each piece: text, score, type (SentencePiece's enum: 1 normal, 2 unknown, 3 control,
    /// 4 user defined, 5 unused, 6 byte; llama.cpp's token types use the same numbers).
    pub pieces: Vec<(String, f32, i32)>,
    /// `normalizer_spec.add_dummy_prefix` (default true).
    pub add_dummy_prefix: bool,
    /// `normalizer_spec.remove_extra_whitespaces` (default true).
    pub remove_extra_whitespaces: bool,
    /// `trainer_spec.eos_id` (default 2).
    pub eos_id: i32,
    /// `trainer_spec.pad_id` (default -1: none).
    pub pad_id: i32,
}

/// Why `spiece_model` is not a SentencePiece model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("spiece_model is not a SentencePiece model: {0}")]
pub struct SentencePieceError(&'static str);

/// A protobuf wire-format reader over a byte slice; every length is checked against what is
/// left, so hostile bytes end in an error, never a panic or a large allocation.
struct Wire<'a> {
    b: &'a [u8],
}

impl<'a> Wire<'a> {
    fn varint(&mut self) -> Result<u64, SentencePieceError> {
        let mut v = 0u64;
        for i in 0..10 {
            let (&byte, rest) = self
                .b
                .split_first()
                .ok_or(SentencePieceError("truncated varint"))?;
            self.b = rest;
            v |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(SentencePieceError("varint longer than 10 bytes"))
    }

    fn take(&mut self, n: u64) -> Result<&'a [u8], SentencePieceError> {
        let n = usize::try_from(n).map_err(|_| SentencePieceError("length overflows"))?;
        if n > self.b.len() {
            return Err(SentencePieceError("length past the end"));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }

    /// The next field: its number and value (a varint, fixed bytes or a length-delimited
    /// slice).
    fn field(&mut self) -> Result<Option<(u64, Value<'a>)>, SentencePieceError> {
        if self.b.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => Value::Fixed(self.take(8)?),
            2 => {
                let n = self.varint()?;
                Value::Bytes(self.take(n)?)
            }
            5 => Value::Fixed(self.take(4)?),
            _ => return Err(SentencePieceError("unsupported wire type")),
        };
        Ok(Some((key >> 3, value)))
    }
}

enum Value<'a> {
    Varint(u64),
    Fixed(&'a [u8]),
    Bytes(&'a [u8]),
}

/// Reads the fields `gguf_tokenizer_loader` needs from a serialized SentencePiece
/// `ModelProto` (`sentencepiece_model.proto`: pieces = 1 {piece = 1, score = 2, type = 3},
/// trainer_spec = 2 {eos_id = 42, pad_id = 43}, normalizer_spec = 3 {add_dummy_prefix = 3,
/// remove_extra_whitespaces = 4}).
pub fn parse_sentencepiece(bytes: &[u8]) -> Result<SentencePiece, SentencePieceError> {
    let mut sp = SentencePiece {
        pieces: Vec::new(),
        add_dummy_prefix: true,
        remove_extra_whitespaces: true,
        eos_id: 2,
        pad_id: -1,
    };
    let mut w = Wire { b: bytes };
    while let Some((field, value)) = w.field()? {
        match (field, value) {
            (1, Value::Bytes(piece)) => {
                let (mut text, mut score, mut kind) = (None, 0.0f32, 1i32);
                let mut p = Wire { b: piece };
                while let Some((f, v)) = p.field()? {
                    match (f, v) {
                        (1, Value::Bytes(t)) => {
                            let t = std::str::from_utf8(t)
                                .map_err(|_| SentencePieceError("a piece is not UTF-8"))?;
                            text = Some(t.to_owned());
                        }
                        (2, Value::Fixed(f)) if f.len() == 4 => {
                            score = f32::from_le_bytes([f[0], f[1], f[2], f[3]]);
                        }
                        (3, Value::Varint(t)) => {
                            kind = i32::try_from(t)
                                .map_err(|_| SentencePieceError("a piece type is out of range"))?;
                        }
                        (1..=3, _) => {
                            return Err(SentencePieceError(
                                "a piece field has the wrong wire type",
                            ));
                        }
                        _ => {}
                    }
                }
                sp.pieces.push((
                    text.ok_or(SentencePieceError("a piece without text"))?,
                    score,
                    kind,
                ));
            }
            (2, Value::Bytes(spec)) => {
                let mut t = Wire { b: spec };
                while let Some((f, v)) = t.field()? {
                    // int32 fields are sign-extended to 64 bits on the wire.
                    let as_i32 = |v: u64| v as i64 as i32;
                    match (f, v) {
                        (42, Value::Varint(v)) => sp.eos_id = as_i32(v),
                        (43, Value::Varint(v)) => sp.pad_id = as_i32(v),
                        _ => {}
                    }
                }
            }
            (3, Value::Bytes(spec)) => {
                let mut n = Wire { b: spec };
                while let Some((f, v)) = n.field()? {
                    match (f, v) {
                        (3, Value::Varint(v)) => sp.add_dummy_prefix = v != 0,
                        (4, Value::Varint(v)) => sp.remove_extra_whitespaces = v != 0,
                        _ => {}
                    }
                }
            }
            (1..=3, _) => {
                return Err(SentencePieceError(
                    "a top-level field has the wrong wire type",
                ));
            }
            _ => {}
        }
    }
    if sp.pieces.is_empty() {
        return Err(SentencePieceError("no pieces"));
    }
    Ok(sp)
}

/// The largest vocabulary [`tokenizer_metadata`] pads to (umt5-xxl's is 256384): the row count
/// comes from the file, and every padding token is a metadata string.
pub const MAX_PADDED_VOCAB: usize = 1 << 20;

/// SentencePiece's UNUSED piece type (llama.cpp's `TokenType.UNUSED`).
const UNUSED_PIECE: i32 = 5;

/// The `tokenizer.ggml.*` key-values ComfyUI-GGUF's `gguf_tokenizer_loader` reads back into a
/// SentencePiece model, as llama.cpp's T5 conversion writes them: when the token embedding has
/// more rows (`n_vocab`: umt5-xxl's 256384) than the model has pieces, the list is padded to
/// `n_vocab` with `[PAD{i}]` tokens (score -1000, type UNUSED), as `convert_hf_to_gguf.py`'s
/// SentencePiece vocabulary does; llama.cpp refuses a T5 file whose token list is shorter than
/// its embedding. No padding past [`MAX_PADDED_VOCAB`].
pub fn tokenizer_metadata(
    sp: &SentencePiece,
    n_vocab: usize,
) -> Vec<(String, crate::MetadataValue)> {
    use crate::MetadataValue as V;
    let id = |v: i32| u32::try_from(v).map_or(V::I32(v), V::U32);
    let padded = if n_vocab <= MAX_PADDED_VOCAB {
        sp.pieces.len()..n_vocab
    } else {
        0..0
    };
    let tokens = sp
        .pieces
        .iter()
        .map(|p| V::String(p.0.clone()))
        .chain(padded.clone().map(|i| V::String(format!("[PAD{i}]"))));
    let scores = sp
        .pieces
        .iter()
        .map(|p| V::F32(p.1))
        .chain(padded.clone().map(|_| V::F32(-1000.0)));
    let types = sp
        .pieces
        .iter()
        .map(|p| V::I32(p.2))
        .chain(padded.map(|_| V::I32(UNUSED_PIECE)));
    vec![
        ("tokenizer.ggml.model".into(), V::String("t5".into())),
        ("tokenizer.ggml.tokens".into(), V::Array(tokens.collect())),
        ("tokenizer.ggml.scores".into(), V::Array(scores.collect())),
        (
            "tokenizer.ggml.token_type".into(),
            V::Array(types.collect()),
        ),
        (
            "tokenizer.ggml.add_space_prefix".into(),
            V::Bool(sp.add_dummy_prefix),
        ),
        (
            "tokenizer.ggml.remove_extra_whitespaces".into(),
            V::Bool(sp.remove_extra_whitespaces),
        ),
        ("tokenizer.ggml.eos_token_id".into(), id(sp.eos_id)),
        ("tokenizer.ggml.padding_token_id".into(), id(sp.pad_id)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_t5_key_maps_back_through_the_loaders_map() {
        let mut keys = vec![
            "shared.weight".to_owned(),
            "encoder.final_layer_norm.weight".to_owned(),
        ];
        for b in [0, 1, 9, 23] {
            for p in [
                "layer.0.SelfAttention.q",
                "layer.0.SelfAttention.k",
                "layer.0.SelfAttention.v",
                "layer.0.SelfAttention.o",
                "layer.0.SelfAttention.relative_attention_bias",
                "layer.0.layer_norm",
                "layer.1.DenseReluDense.wi_0",
                "layer.1.DenseReluDense.wi_1",
                "layer.1.DenseReluDense.wo",
                "layer.1.layer_norm",
            ] {
                keys.push(format!("encoder.block.{b}.{p}.weight"));
            }
        }
        for k in &keys {
            let g = t5_gguf_name(k).unwrap_or_else(|| panic!("{k} has no name"));
            assert!(g.len() <= crate::mix::MAX_TENSOR_NAME_LEN);
            assert_eq!(&comfyui_gguf_t5_key(&g), k, "via {g}");
        }
        assert_eq!(
            t5_gguf_name("encoder.block.3.layer.1.DenseReluDense.wo.weight").as_deref(),
            Some("enc.blk.3.ffn_down.weight")
        );
    }

    #[test]
    fn hostile_sentencepiece_bytes_are_errors() {
        // Truncated varint, length past the end, bad wire type, piece without text, nothing.
        for bytes in [
            &[0x0a, 0x80][..],
            &[0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f][..],
            &[0x0b][..],
            &[0x0a, 0x02, 0x10, 0x01][..],
            &[][..],
            &[0x0a, 0x02, 0x0a, 0xff][..],
        ] {
            assert!(parse_sentencepiece(bytes).is_err(), "{bytes:?}");
        }
        // One piece with defaults.
        let sp = parse_sentencepiece(&[0x0a, 0x03, 0x0a, 0x01, b'x']).unwrap();
        assert_eq!(sp.pieces, [("x".to_owned(), 0.0, 1)]);
        assert_eq!((sp.eos_id, sp.pad_id), (2, -1));
        assert!(sp.add_dummy_prefix && sp.remove_extra_whitespaces);
        let meta = tokenizer_metadata(&sp, 0);
        let pad = meta
            .iter()
            .find(|(k, _)| k == "tokenizer.ggml.padding_token_id");
        assert_eq!(pad.map(|(_, v)| v), Some(&crate::MetadataValue::I32(-1)));
        // Padded to the embedding's rows as llama.cpp's converter does; never past the cap.
        let list = |meta: &[(String, crate::MetadataValue)], key: &str| match meta
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
        {
            Some(crate::MetadataValue::Array(a)) => a,
            other => panic!("{key}: {other:?}"),
        };
        let meta = tokenizer_metadata(&sp, 3);
        use crate::MetadataValue as V;
        assert_eq!(
            list(&meta, "tokenizer.ggml.tokens"),
            [
                V::String("x".into()),
                V::String("[PAD1]".into()),
                V::String("[PAD2]".into())
            ]
        );
        assert_eq!(
            list(&meta, "tokenizer.ggml.scores"),
            [V::F32(0.0), V::F32(-1000.0), V::F32(-1000.0)]
        );
        assert_eq!(
            list(&meta, "tokenizer.ggml.token_type"),
            [V::I32(1), V::I32(5), V::I32(5)]
        );
        let meta = tokenizer_metadata(&sp, MAX_PADDED_VOCAB + 1);
        assert_eq!(list(&meta, "tokenizer.ggml.tokens").len(), 1);
    }

    #[test]
    fn keys_outside_the_encoder_have_no_name() {
        for k in [
            "encoder.block.x.layer.0.SelfAttention.q.weight",
            "encoder.block.0.layer.0.SelfAttention.q.bias",
            "encoder.block.0.layer.2.foo.weight",
            "decoder.block.0.layer.0.SelfAttention.q.weight",
            "spiece_model",
            "encoder.embed_tokens.weight",
        ] {
            assert_eq!(t5_gguf_name(k), None, "{k}");
        }
    }
}
