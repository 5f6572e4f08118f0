//! Tokenizers from GGUF metadata (`tokenizer.ggml.*`), assembled from the same parts a
//! Hugging Face tokenizer.json of that model has, so that encoding agrees with HF and
//! [`Tokenizer::to_tokenizer_json`] writes the model's tokenizer.json.
//!
//! - `model = "gpt2"`: byte-level BPE with `merges`; `pre` names the pre-tokeniser family
//!   (GPT-2 regex; SmolLM2/StarCoder digits-then-GPT-2; LLaMA-3 and Qwen2 `Split` regexes).
//! - `model = "llama"`: SentencePiece BPE with `scores` → LLaMA's legacy tokenizer.json
//!   (`▁` normaliser, byte fallback, merges from scores as `transformers` derives them).
//!
//! Token types (`token_type`): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
//! 6 byte. Unknown, control and user-defined tokens become added tokens, matched in the text
//! before pre-tokenisation, as they are in the models' tokenizer.json files.

use std::collections::HashMap;

use super::added::AddedToken;
use super::bpe::{Bpe, BpeOptions};
use super::decode::Decoder;
use super::normalize::Normalizer;
use super::post::PostProcessor;
use super::pretokenize::{Pattern, PreTokenizer, LLAMA3_PATTERN, QWEN2_PATTERN};
use super::spm::merges_from_scores;
use super::{Parts, Tokenizer};
use crate::error::{Result, RuntimeError};
use crate::gguf::{GgufMetadata, GgufValue};

const TYPE_UNKNOWN: i64 = 2;
const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

/// The `tokenizer.ggml.pre` values understood, for the error message.
const KNOWN_PRE: &str = "default, gpt2, smollm, starcoder, refact, llama3, llama-bpe, qwen2";

fn bad(msg: String) -> RuntimeError {
    RuntimeError::Tokenizer(msg)
}

fn as_int(v: &GgufValue) -> Option<i64> {
    Some(match *v {
        GgufValue::U8(x) => i64::from(x),
        GgufValue::I8(x) => i64::from(x),
        GgufValue::U16(x) => i64::from(x),
        GgufValue::I16(x) => i64::from(x),
        GgufValue::U32(x) => i64::from(x),
        GgufValue::I32(x) => i64::from(x),
        GgufValue::U64(x) => i64::try_from(x).ok()?,
        GgufValue::I64(x) => x,
        _ => return None,
    })
}

struct Meta<'a>(&'a GgufMetadata);

impl Meta<'_> {
    fn key(name: &str) -> String {
        format!("tokenizer.ggml.{name}")
    }

    fn string(&self, name: &str) -> Result<Option<&str>> {
        match self.0.get(&Self::key(name)) {
            None => Ok(None),
            Some(GgufValue::String(s)) => Ok(Some(s)),
            Some(other) => Err(bad(format!(
                "{} must be a string, not {other:?}",
                Self::key(name)
            ))),
        }
    }

    fn flag(&self, name: &str) -> Result<Option<bool>> {
        match self.0.get(&Self::key(name)) {
            None => Ok(None),
            Some(GgufValue::Bool(b)) => Ok(Some(*b)),
            Some(v) => as_int(v)
                .map(|n| Some(n != 0))
                .ok_or_else(|| bad(format!("{} must be a bool", Self::key(name)))),
        }
    }

    fn id(&self, name: &str) -> Result<Option<u32>> {
        match self.0.get(&Self::key(name)) {
            None => Ok(None),
            // Some converters write -1 for "none".
            Some(v) => match as_int(v) {
                Some(n) if n < 0 => Ok(None),
                Some(n) => u32::try_from(n)
                    .map(Some)
                    .map_err(|_| bad(format!("{} = {n} is too large", Self::key(name)))),
                None => Err(bad(format!(
                    "{} must be an integer, not {v:?}",
                    Self::key(name)
                ))),
            },
        }
    }

    fn array(&self, name: &str) -> Result<Option<&[GgufValue]>> {
        match self.0.get(&Self::key(name)) {
            None => Ok(None),
            Some(GgufValue::Array(a)) => Ok(Some(a)),
            Some(_) => Err(bad(format!("{} must be an array", Self::key(name)))),
        }
    }

    fn strings(&self, name: &str) -> Result<Option<Vec<String>>> {
        let Some(a) = self.array(name)? else {
            return Ok(None);
        };
        a.iter()
            .map(|v| match v {
                GgufValue::String(s) => Ok(s.clone()),
                other => Err(bad(format!(
                    "{} must hold strings, found {other:?}",
                    Self::key(name)
                ))),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

impl Tokenizer {
    /// Builds the tokenizer a GGUF file embeds, from its `tokenizer.ggml.*` metadata.
    pub fn from_gguf_metadata(meta: &GgufMetadata) -> Result<Tokenizer> {
        let m = Meta(meta);
        let model = m
            .string("model")?
            .ok_or_else(|| bad("GGUF metadata has no tokenizer.ggml.model".into()))?;
        let tokens = m
            .strings("tokens")?
            .ok_or_else(|| bad("GGUF metadata has no tokenizer.ggml.tokens".into()))?;
        let n = tokens.len();
        if n == 0 || n >= super::bpe::MAX_TOKEN_ID as usize {
            return Err(bad(format!("tokenizer.ggml.tokens has {n} tokens")));
        }
        let types: Vec<i64> = match m.array("token_type")? {
            None => vec![1; n],
            Some(a) => a
                .iter()
                .map(|v| {
                    as_int(v)
                        .ok_or_else(|| bad("tokenizer.ggml.token_type must hold integers".into()))
                })
                .collect::<Result<_>>()?,
        };
        if types.len() != n {
            return Err(bad(format!(
                "tokenizer.ggml.token_type has {} entries for {n} tokens",
                types.len()
            )));
        }
        // Python-dict semantics: a repeated token string maps to its last id.
        let vocab: HashMap<String, u32> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .filter(|(_, (t, &ty))| {
                !t.is_empty() && matches!(ty, TYPE_UNKNOWN | TYPE_CONTROL | TYPE_USER_DEFINED)
            })
            .map(|(i, (t, &ty))| AddedToken::special(i as u32, t, ty != TYPE_USER_DEFINED))
            .collect();
        let bos = m.id("bos_token_id")?;
        let eos = m.id("eos_token_id")?;
        let name_of = |id: Option<u32>| -> Result<Option<(u32, String)>> {
            match id {
                None => Ok(None),
                Some(id) => tokens
                    .get(id as usize)
                    .map(|t| Some((id, t.clone())))
                    .ok_or_else(|| {
                        bad(format!(
                            "special token id {id} is outside the vocabulary of {n} tokens"
                        ))
                    }),
            }
        };
        let bos_tok = name_of(bos)?;
        let eos_tok = name_of(eos)?;

        let parts = match model {
            "gpt2" => {
                let add_bos = m.flag("add_bos_token")?.unwrap_or(false);
                let add_eos = m.flag("add_eos_token")?.unwrap_or(false);
                let merges = m
                    .strings("merges")?
                    .ok_or_else(|| bad("a gpt2 GGUF tokenizer needs tokenizer.ggml.merges".into()))?
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        // Split at the first space after the first character, as llama.cpp does.
                        let at = s
                            .char_indices()
                            .skip(1)
                            .find(|&(_, c)| c == ' ')
                            .map(|(at, _)| at);
                        at.map(|at| (s[..at].to_owned(), s[at + 1..].to_owned()))
                            .ok_or_else(|| {
                                bad(format!("tokenizer.ggml.merges[{i}] = {s:?} is not \"a b\""))
                            })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let pre = m.string("pre")?.unwrap_or("default");
                let (pre_tokenizer, ignore_merges) = byte_level_pre(pre)?;
                Parts {
                    normalizer: None,
                    pre_tokenizer: Some(pre_tokenizer),
                    model: Bpe::new(
                        vocab,
                        merges,
                        BpeOptions {
                            ignore_merges,
                            ..Default::default()
                        },
                    )?,
                    added,
                    decoder: Some(Decoder::ByteLevel),
                    post_processor: post(add_bos, add_eos, &bos_tok, &eos_tok),
                }
            }
            "llama" => {
                let add_bos = m.flag("add_bos_token")?.unwrap_or(true);
                let add_eos = m.flag("add_eos_token")?.unwrap_or(false);
                let add_space_prefix = m.flag("add_space_prefix")?.unwrap_or(true);
                let scores: Vec<f32> = match m.array("scores")? {
                    None => vec![0.0; n],
                    Some(a) => a
                        .iter()
                        .map(|v| match v {
                            GgufValue::F32(x) => Ok(*x),
                            GgufValue::F64(x) => Ok(*x as f32),
                            other => Err(bad(format!(
                                "tokenizer.ggml.scores must hold floats, found {other:?}"
                            ))),
                        })
                        .collect::<Result<_>>()?,
                };
                if scores.len() != n {
                    return Err(bad(format!(
                        "tokenizer.ggml.scores has {} entries for {n} tokens",
                        scores.len()
                    )));
                }
                let unk_id = m.id("unknown_token_id")?.or_else(|| {
                    types
                        .iter()
                        .position(|&t| t == TYPE_UNKNOWN)
                        .map(|i| i as u32)
                });
                let unk_token = match unk_id {
                    Some(id) => Some(name_of(Some(id))?.map(|(_, t)| t).unwrap_or_default()),
                    None => vocab.contains_key("<unk>").then(|| "<unk>".to_owned()),
                };
                let merges = merges_from_scores(&tokens, &scores, &vocab);
                let options = BpeOptions {
                    unk_token,
                    fuse_unk: true,
                    byte_fallback: true,
                    ..Default::default()
                };
                let space = Normalizer::Replace {
                    pattern: Pattern::literal(" ")?,
                    content: "▁".into(),
                };
                let normalizer = if add_space_prefix {
                    Normalizer::Sequence(vec![Normalizer::Prepend("▁".into()), space])
                } else {
                    Normalizer::Sequence(vec![space])
                };
                let mut decoder = vec![
                    Decoder::Replace {
                        pattern: Pattern::literal("▁")?,
                        content: " ".into(),
                    },
                    Decoder::ByteFallback,
                    Decoder::Fuse,
                ];
                if add_space_prefix {
                    decoder.push(Decoder::Strip {
                        content: ' ',
                        start: 1,
                        stop: 0,
                    });
                }
                Parts {
                    normalizer: Some(normalizer),
                    pre_tokenizer: None,
                    model: Bpe::new(vocab, merges, options)?,
                    added,
                    decoder: Some(Decoder::Sequence(decoder)),
                    post_processor: post(add_bos, add_eos, &bos_tok, &eos_tok),
                }
            }
            other => {
                return Err(bad(format!(
                    "GGUF tokenizer model {other:?} is not supported (supported: gpt2, llama)"
                )));
            }
        };
        let mut tok = Tokenizer::from_parts(parts)?;
        tok.set_bos_eos(bos, eos)?;
        Ok(tok)
    }
}

/// The HF pre-tokeniser for a GGUF `tokenizer.ggml.pre` family, and whether the BPE model
/// ignores merges for words already in the vocabulary (LLaMA-3 does).
fn byte_level_pre(pre: &str) -> Result<(PreTokenizer, bool)> {
    Ok(match pre {
        "default" | "gpt2" => (PreTokenizer::byte_level(false, true)?, false),
        "smollm" | "starcoder" | "refact" => (
            PreTokenizer::Sequence(vec![
                PreTokenizer::Digits {
                    individual_digits: true,
                },
                PreTokenizer::byte_level(false, true)?,
            ]),
            false,
        ),
        "llama3" | "llama-bpe" => (
            PreTokenizer::Sequence(vec![
                PreTokenizer::split_regex(LLAMA3_PATTERN)?,
                PreTokenizer::byte_level(false, false)?,
            ]),
            true,
        ),
        "qwen2" => (
            PreTokenizer::Sequence(vec![
                PreTokenizer::split_regex(QWEN2_PATTERN)?,
                PreTokenizer::byte_level(false, false)?,
            ]),
            false,
        ),
        other => {
            return Err(bad(format!(
                "GGUF tokenizer.ggml.pre {other:?} is not supported (supported: {KNOWN_PRE})"
            )));
        }
    })
}

/// The post-processor for `add_bos_token` / `add_eos_token`; a flag without its token id
/// adds nothing (llama.cpp does the same).
fn post(
    add_bos: bool,
    add_eos: bool,
    bos: &Option<(u32, String)>,
    eos: &Option<(u32, String)>,
) -> Option<PostProcessor> {
    let bos = bos
        .as_ref()
        .filter(|_| add_bos)
        .map(|(id, t)| (*id, t.as_str()));
    let eos = eos
        .as_ref()
        .filter(|_| add_eos)
        .map(|(id, t)| (*id, t.as_str()));
    if bos.is_none() && eos.is_none() {
        return None;
    }
    Some(PostProcessor::bos_eos(bos, eos))
}
