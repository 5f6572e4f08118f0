//! Hugging Face `tokenizer.json`: reading it into a [`Tokenizer`] and writing one back.
//!
//! Every component is parsed by hand from `serde_json::Value`, so that an unknown component
//! is reported by its `"type"` and field names, and both forms of BPE merges (`"a b"` strings
//! and, since tokenizers 0.20, `["a", "b"]` pairs) are accepted. BOS and EOS are not part of
//! tokenizer.json; they are read from `tokenizer_config.json` or `config.json` next to it when
//! present, else from the post-processor's template, else from well-known token names.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Map, Value};

use super::added::AddedToken;
use super::bpe::{Bpe, BpeOptions};
use super::decode::Decoder;
use super::normalize::Normalizer;
use super::post::PostProcessor;
use super::pretokenize::PreTokenizer;
use super::{Parts, Tokenizer};
use crate::error::{Result, RuntimeError};

/// Names that mean beginning / end of sequence when nothing says otherwise.
const BOS_NAMES: [&str; 4] = ["<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"];
const EOS_NAMES: [&str; 4] = ["</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>"];

fn bad(msg: String) -> RuntimeError {
    RuntimeError::Tokenizer(msg)
}

fn optional<T>(v: &Value, key: &str, parse: impl Fn(&Value) -> Result<T>) -> Result<Option<T>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => parse(x).map(Some),
    }
}

fn parse_model(v: &Value) -> Result<Bpe> {
    if let Some(ty) = v.get("type").and_then(Value::as_str) {
        if ty != "BPE" {
            return Err(bad(format!(
                "model type {ty:?} is not supported (only BPE)"
            )));
        }
    }
    let vocab_json = v
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("model has no \"vocab\" object".into()))?;
    let mut vocab = HashMap::with_capacity(vocab_json.len());
    for (token, id) in vocab_json {
        let id = id
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| bad(format!("vocab entry {token:?} has id {id}, not a u32")))?;
        vocab.insert(token.clone(), id);
    }
    let merges_json = v
        .get("merges")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("model has no \"merges\" list".into()))?;
    let mut merges = Vec::with_capacity(merges_json.len());
    for (rank, m) in merges_json.iter().enumerate() {
        let pair = match m {
            Value::String(s) => {
                let mut parts = s.split(' ');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(a), Some(b), None) => Some((a.to_owned(), b.to_owned())),
                    _ => None,
                }
            }
            Value::Array(a) => match (
                a.first().and_then(Value::as_str),
                a.get(1).and_then(Value::as_str),
                a.len(),
            ) {
                (Some(x), Some(y), 2) => Some((x.to_owned(), y.to_owned())),
                _ => None,
            },
            _ => None,
        };
        merges.push(pair.ok_or_else(|| {
            bad(format!(
                "merge {} is neither \"a b\" nor [\"a\", \"b\"]: {m}",
                rank + 1
            ))
        })?);
    }
    let string = |key: &str| v.get(key).and_then(Value::as_str).map(str::to_owned);
    let flag = |key: &str| v.get(key).and_then(Value::as_bool).unwrap_or(false);
    let options = BpeOptions {
        unk_token: string("unk_token"),
        continuing_subword_prefix: string("continuing_subword_prefix"),
        end_of_word_suffix: string("end_of_word_suffix"),
        fuse_unk: flag("fuse_unk"),
        byte_fallback: flag("byte_fallback"),
        ignore_merges: flag("ignore_merges"),
    };
    Bpe::new(vocab, merges, options)
}

fn model_to_json(model: &Bpe) -> Value {
    let mut by_id: Vec<(&String, &u32)> = model.vocab.iter().collect();
    by_id.sort_by_key(|&(t, &id)| (id, t.as_str()));
    let vocab: Map<String, Value> = by_id
        .into_iter()
        .map(|(t, &id)| (t.clone(), json!(id)))
        .collect();
    // The "a b" form is read by every tokenizers release; pairs only where a token has a space.
    let merges: Vec<Value> = if model
        .merges
        .iter()
        .any(|(a, b)| a.contains(' ') || b.contains(' '))
    {
        model.merges.iter().map(|(a, b)| json!([a, b])).collect()
    } else {
        model
            .merges
            .iter()
            .map(|(a, b)| json!(format!("{a} {b}")))
            .collect()
    };
    let o = model.options();
    json!({
        "type": "BPE", "dropout": null, "unk_token": o.unk_token,
        "continuing_subword_prefix": o.continuing_subword_prefix,
        "end_of_word_suffix": o.end_of_word_suffix, "fuse_unk": o.fuse_unk,
        "byte_fallback": o.byte_fallback, "ignore_merges": o.ignore_merges,
        "vocab": vocab, "merges": merges
    })
}

impl Tokenizer {
    /// Reads a Hugging Face `tokenizer.json` (BPE model). BOS/EOS come from a
    /// `tokenizer_config.json` or `config.json` beside it when present.
    pub fn from_tokenizer_json(path: &Path) -> Result<Tokenizer> {
        let text = std::fs::read_to_string(path).map_err(|source| RuntimeError::Io {
            path: path.to_owned(),
            source,
        })?;
        let at = |e: RuntimeError| match e {
            RuntimeError::Tokenizer(msg) => {
                RuntimeError::Tokenizer(format!("{}: {msg}", path.display()))
            }
            other => other,
        };
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| bad(format!("{}: not valid JSON: {e}", path.display())))?;
        let mut tok = Tokenizer::from_tokenizer_json_value(&value).map_err(at)?;
        if let Some(dir) = path.parent() {
            let (bos, eos) = sibling_bos_eos(&tok, dir);
            tok.set_bos_eos(bos.or(tok.bos), eos.or(tok.eos))
                .map_err(at)?;
        }
        Ok(tok)
    }

    /// Builds a tokenizer from the parsed contents of a `tokenizer.json`; BOS/EOS from its
    /// template or well-known token names.
    pub fn from_tokenizer_json_value(value: &Value) -> Result<Tokenizer> {
        if !value.is_object() {
            return Err(bad("tokenizer.json must hold a JSON object".into()));
        }
        let model = parse_model(
            value
                .get("model")
                .ok_or_else(|| bad("no \"model\"".into()))?,
        )?;
        let added = match value.get("added_tokens") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(list)) => list
                .iter()
                .map(AddedToken::from_json)
                .collect::<Result<_>>()?,
            Some(other) => {
                return Err(bad(format!("\"added_tokens\" must be a list, not {other}")))
            }
        };
        let added = assign_added_ids(&model, added);
        let parts = Parts {
            normalizer: optional(value, "normalizer", Normalizer::from_json)?,
            pre_tokenizer: optional(value, "pre_tokenizer", PreTokenizer::from_json)?,
            model,
            added,
            decoder: optional(value, "decoder", Decoder::from_json)?,
            post_processor: optional(value, "post_processor", PostProcessor::from_json)?,
        };
        let mut tok = Tokenizer::from_parts(parts)?;
        let (before, after) = tok
            .post_processor
            .as_ref()
            .map(PostProcessor::template_specials)
            .unwrap_or_default();
        let by_name = |names: &[&str]| names.iter().find_map(|n| tok.token_to_id(n));
        let bos = before.first().copied().or_else(|| by_name(&BOS_NAMES));
        let eos = after.last().copied().or_else(|| by_name(&EOS_NAMES));
        tok.set_bos_eos(bos, eos)?;
        Ok(tok)
    }

    /// An equivalent Hugging Face `tokenizer.json` (loadable by `tokenizers` ≥ 0.14 and by
    /// [`Tokenizer::from_tokenizer_json`]). BOS/EOS ids belong in the `config.json` beside it.
    pub fn to_tokenizer_json(&self) -> Value {
        let component = |v: Option<Value>| v.unwrap_or(Value::Null);
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": self.added.tokens.iter().map(AddedToken::to_json).collect::<Vec<_>>(),
            "normalizer": component(self.normalizer.as_ref().map(Normalizer::to_json)),
            "pre_tokenizer": component(self.pre_tokenizer.as_ref().map(PreTokenizer::to_json)),
            "post_processor": component(self.post_processor.as_ref().map(PostProcessor::to_json)),
            "decoder": component(self.decoder.as_ref().map(Decoder::to_json)),
            "model": model_to_json(&self.model),
        })
    }
}

/// The ids HF gives added tokens when it loads a tokenizer.json: the ids written in the file
/// are ignored (HF only warns when they differ); a token already in the model's vocabulary
/// takes that id, any other the next id from the vocabulary's size on. A content listed twice
/// keeps its first id and its last flags; empty contents are dropped.
fn assign_added_ids(model: &Bpe, tokens: Vec<AddedToken>) -> Vec<AddedToken> {
    let mut next_id = u32::try_from(model.vocab.len()).unwrap_or(u32::MAX);
    let mut out: Vec<AddedToken> = Vec::with_capacity(tokens.len());
    for mut token in tokens {
        if token.content.is_empty() {
            continue;
        }
        if let Some(seen) = out.iter_mut().find(|t| t.content == token.content) {
            token.id = seen.id;
            *seen = token;
            continue;
        }
        token.id = match model.vocab.get(&token.content) {
            Some(&id) => id,
            None => {
                next_id = next_id.saturating_add(1);
                next_id - 1
            }
        };
        out.push(token);
    }
    out
}

/// BOS/EOS as `tokenizer_config.json` (token strings) or `config.json` (ids) in `dir` say.
fn sibling_bos_eos(tok: &Tokenizer, dir: &Path) -> (Option<u32>, Option<u32>) {
    let read = |name: &str| -> Option<Value> {
        let text = std::fs::read_to_string(dir.join(name)).ok()?;
        serde_json::from_str(&text).ok()
    };
    let mut bos = None;
    let mut eos = None;
    if let Some(cfg) = read("tokenizer_config.json") {
        let token = |key: &str| {
            let v = cfg.get(key)?;
            let s = v
                .as_str()
                .or_else(|| v.get("content").and_then(Value::as_str))?;
            tok.token_to_id(s)
        };
        bos = token("bos_token");
        eos = token("eos_token");
    }
    if let Some(cfg) = read("config.json") {
        let id = |key: &str| {
            let v = cfg.get(key)?;
            let n = v.as_u64().or_else(|| v.as_array()?.first()?.as_u64())?;
            u32::try_from(n)
                .ok()
                .filter(|&id| (id as usize) < tok.vocab_size())
        };
        bos = bos.or_else(|| id("bos_token_id"));
        eos = eos.or_else(|| id("eos_token_id"));
    }
    (bos, eos)
}
