//! Tokenizers: text ↔ token ids for the models egret runs, matching Hugging Face `tokenizers`
//! id for id.
//!
//! A [`Tokenizer`] is the same pipeline as HF's, built from a `tokenizer.json` or from a GGUF
//! file's `tokenizer.ggml.*` metadata, and written back as a `tokenizer.json`:
//!
//! ```text
//! text ─► added tokens split out (added.rs) ─► normalizer (normalize.rs)
//!      ─► pre-tokenizer: words (pretokenize.rs) ─► BPE per word, cached (bpe.rs)
//!      ─► post-processor: BOS/EOS when add_special (post.rs)
//! ids  ─► token strings ─► decoder (decode.rs) ─► text
//! ```
//!
//! Two vocabulary families go through it: GPT-2 byte-level BPE (GPT-2, SmolLM2, LLaMA-3,
//! Qwen2: words are bytes mapped to printable characters, `bytelevel.rs`) and SentencePiece
//! BPE (LLaMA 1/2: `▁` for spaces, `<0xXX>` byte fallback, merges derived from piece scores,
//! `spm.rs`). Reading tokenizer.json is in `json.rs`, reading GGUF metadata in `gguf.rs`.
//! Keeping one pipeline, rather than one encoder per family, is what makes a GGUF tokenizer
//! and the tokenizer.json it converts to agree by construction.

mod added;
mod bpe;
mod bytelevel;
mod decode;
mod gguf;
mod json;
mod normalize;
mod post;
mod pretokenize;
mod spm;

use std::collections::HashMap;

use crate::error::{Result, RuntimeError};
use added::{AddedVocab, Segment};
use bpe::Bpe;
use decode::Decoder;
use normalize::Normalizer;
use post::PostProcessor;
use pretokenize::{Piece, PreTokenizer};

/// Encodes text to token ids and decodes ids to text; see the module docs.
#[derive(Clone)]
pub struct Tokenizer {
    normalizer: Option<Normalizer>,
    pre_tokenizer: Option<PreTokenizer>,
    model: Bpe,
    added: AddedVocab,
    decoder: Option<Decoder>,
    post_processor: Option<PostProcessor>,
    /// Token string of every id, as decoding sees it (an added token's own form first).
    id_to_token: Vec<Option<String>>,
    /// Added token contents → ids (HF looks these up before the model's vocabulary).
    added_ids: HashMap<String, u32>,
    bos: Option<u32>,
    eos: Option<u32>,
}

/// The parts a tokenizer is assembled from (what tokenizer.json lists).
pub(crate) struct Parts {
    pub normalizer: Option<Normalizer>,
    pub pre_tokenizer: Option<PreTokenizer>,
    pub model: Bpe,
    pub added: Vec<added::AddedToken>,
    pub decoder: Option<Decoder>,
    pub post_processor: Option<PostProcessor>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("model", &self.model)
            .field("added_tokens", &self.added.tokens.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    pub(crate) fn from_parts(parts: Parts) -> Result<Tokenizer> {
        let added = AddedVocab::new(parts.added, parts.normalizer.as_ref())?;
        let max_id = parts
            .model
            .vocab
            .values()
            .chain(added.tokens.iter().map(|t| &t.id))
            .copied()
            .max();
        let size = max_id.map_or(0, |m| m as usize + 1);
        if max_id.is_some_and(|m| m >= bpe::MAX_TOKEN_ID) {
            return Err(RuntimeError::Tokenizer(format!(
                "token id {} is above the limit of {}",
                max_id.unwrap_or(0),
                bpe::MAX_TOKEN_ID
            )));
        }
        let mut id_to_token = vec![None; size];
        for (token, &id) in &parts.model.vocab {
            id_to_token[id as usize] = Some(token.clone());
        }
        let mut added_ids = HashMap::new();
        for (t, form) in added.tokens.iter().zip(&added.decoded) {
            id_to_token[t.id as usize] = Some(form.clone());
            added_ids.insert(t.content.clone(), t.id);
        }
        if let Some(post) = &parts.post_processor {
            let (before, after) = post.template_specials();
            if let Some(id) = before.iter().chain(&after).find(|&&id| id as usize >= size) {
                return Err(RuntimeError::Tokenizer(format!(
                    "the post-processor adds token id {id}, but the vocabulary has {size} tokens"
                )));
            }
        }
        Ok(Tokenizer {
            normalizer: parts.normalizer,
            pre_tokenizer: parts.pre_tokenizer,
            model: parts.model,
            added,
            decoder: parts.decoder,
            post_processor: parts.post_processor,
            id_to_token,
            added_ids,
            bos: None,
            eos: None,
        })
    }

    /// Sets BOS/EOS, refusing ids outside the vocabulary.
    pub(crate) fn set_bos_eos(&mut self, bos: Option<u32>, eos: Option<u32>) -> Result<()> {
        for (what, id) in [("BOS", bos), ("EOS", eos)] {
            if let Some(id) = id {
                if id as usize >= self.vocab_size() {
                    return Err(RuntimeError::Tokenizer(format!(
                        "{what} id {id} is outside the vocabulary of {} tokens",
                        self.vocab_size()
                    )));
                }
            }
        }
        self.bos = bos;
        self.eos = eos;
        Ok(())
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`) are recognised
    /// as HF `tokenizers` does; BOS/EOS (the post-processor's additions) only if `add_special`.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 2);
        for segment in self.added.split(text, false) {
            let (raw, raw_offset) = match segment {
                Segment::Token(id) => {
                    ids.push(id);
                    continue;
                }
                Segment::Text(s, offset) => (s, offset),
            };
            let normalized = match &self.normalizer {
                Some(n) => std::borrow::Cow::Owned(n.normalize(raw)?),
                None => std::borrow::Cow::Borrowed(raw),
            };
            for segment in self.added.split(&normalized, true) {
                match segment {
                    Segment::Token(id) => ids.push(id),
                    Segment::Text(s, offset) => {
                        let piece = Piece {
                            text: s.to_owned(),
                            at_start: raw_offset == 0 && offset == 0,
                        };
                        match &self.pre_tokenizer {
                            Some(p) => {
                                for word in p.run(vec![piece])? {
                                    self.model.tokenize(&word.text, &mut ids);
                                }
                            }
                            None => self.model.tokenize(&piece.text, &mut ids),
                        }
                    }
                }
            }
        }
        if add_special {
            if let Some(post) = &self.post_processor {
                ids = post.process(ids);
            }
        }
        Ok(ids)
    }

    fn token(&self, id: u32) -> Result<&str> {
        match self.id_to_token.get(id as usize) {
            Some(Some(t)) => Ok(t),
            Some(None) => Err(RuntimeError::Tokenizer(format!(
                "token id {id} has no token in this vocabulary"
            ))),
            None => Err(RuntimeError::TokenOutOfRange {
                id: u64::from(id),
                vocab: self.vocab_size(),
            }),
        }
    }

    /// The text of `ids`, special tokens included (as their text); bytes that do not form
    /// UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let tokens = ids
            .iter()
            .map(|&id| self.token(id).map(str::to_owned))
            .collect::<Result<Vec<_>>>()?;
        match &self.decoder {
            Some(d) => Ok(d.decode_chain(tokens)?.concat()),
            None => Ok(tokens.join(" ")),
        }
    }

    /// The bytes of one token, for streaming output: concatenating the bytes of successive
    /// tokens gives the text (it may split a UTF-8 character between tokens). Unlike
    /// [`Tokenizer::decode`], a SentencePiece tokenizer's leading space is kept.
    pub fn decode_token_bytes(&self, id: u32) -> Result<Vec<u8>> {
        let token = self.token(id)?;
        Ok(match &self.decoder {
            Some(d) => d.token_bytes(token),
            None => token.as_bytes().to_vec(),
        })
    }

    /// Number of ids: one more than the largest id of the vocabulary or the added tokens.
    pub fn vocab_size(&self) -> usize {
        self.id_to_token.len()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// The id of a token string, as the vocabulary writes it (`"Ġthe"`, `"▁the"`, `"<s>"`).
    pub fn token_to_id(&self, s: &str) -> Option<u32> {
        self.added_ids
            .get(s)
            .or_else(|| self.model.vocab.get(s))
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::{GgufMetadata, GgufValue};

    fn strings(list: &[&str]) -> GgufValue {
        GgufValue::Array(
            list.iter()
                .map(|s| GgufValue::String(s.to_string()))
                .collect(),
        )
    }

    /// A tiny byte-level vocabulary: all 256 byte characters, a few merges, two specials.
    fn tiny_gpt2() -> GgufMetadata {
        let mut tokens: Vec<String> = vec!["<|endoftext|>".into(), "<|im_start|>".into()];
        tokens.extend((0..=255u8).map(|b| bytelevel::byte_char(b).to_string()));
        tokens.extend(["Ġt", "he", "Ġthe", "Ġhe"].map(String::from));
        let mut types = vec![GgufValue::I32(3), GgufValue::I32(3)];
        types.extend(std::iter::repeat_n(GgufValue::I32(1), tokens.len() - 2));
        let mut m = GgufMetadata::new();
        m.insert(
            "tokenizer.ggml.model".into(),
            GgufValue::String("gpt2".into()),
        );
        m.insert(
            "tokenizer.ggml.pre".into(),
            GgufValue::String("smollm".into()),
        );
        m.insert(
            "tokenizer.ggml.tokens".into(),
            GgufValue::Array(tokens.into_iter().map(GgufValue::String).collect()),
        );
        m.insert("tokenizer.ggml.token_type".into(), GgufValue::Array(types));
        m.insert(
            "tokenizer.ggml.merges".into(),
            strings(&["Ġ t", "h e", "Ġt he", "Ġ he"]),
        );
        m.insert("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(1));
        m.insert("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(0));
        m
    }

    #[test]
    fn gguf_byte_level_round_trip() {
        let t = Tokenizer::from_gguf_metadata(&tiny_gpt2()).unwrap();
        let the = t.token_to_id("Ġthe").unwrap();
        let ids = t.encode("<|im_start|>x the 42", false).unwrap();
        assert_eq!(ids[0], 1);
        assert!(ids.contains(&the));
        assert_eq!(t.decode(&ids).unwrap(), "<|im_start|>x the 42");
        assert_eq!(t.encode("", true).unwrap(), Vec::<u32>::new());
        assert_eq!((t.bos_id(), t.eos_id()), (Some(1), Some(0)));
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&i| t.decode_token_bytes(i).unwrap())
            .collect();
        assert_eq!(bytes, b"<|im_start|>x the 42");
        assert!(matches!(
            t.decode(&[9999]),
            Err(RuntimeError::TokenOutOfRange { id: 9999, .. })
        ));
    }

    #[test]
    fn unknown_pre_tokenizer_is_named() {
        let mut m = tiny_gpt2();
        m.insert(
            "tokenizer.ggml.pre".into(),
            GgufValue::String("klingon".into()),
        );
        let err = Tokenizer::from_gguf_metadata(&m).unwrap_err().to_string();
        assert!(err.contains("klingon"), "{err}");
    }
}
