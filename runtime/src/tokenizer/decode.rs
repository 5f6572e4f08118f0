//! Decoders: token strings back to text, as tokenizer.json's `"decoder"` says (`ByteLevel`,
//! `Replace`, `ByteFallback`, `Fuse`, `Strip`, `Metaspace`, `Sequence`), each a port of HF's
//! `decode_chain` (a list of token strings in, a list out; the results are concatenated).
//!
//! [`Decoder::token_bytes`] is the streaming form: the bytes of one token on its own, with no
//! step that looks at a token's position (the leading-space `Strip`, Metaspace's first-token
//! rule), so that the bytes of consecutive tokens concatenate to the text.

use serde_json::{json, Value};

use super::bytelevel;
use super::pretokenize::{single_char, type_of, unsupported, Pattern, PrependScheme};
use crate::error::{Result, RuntimeError};

#[derive(Clone, Debug)]
pub(crate) enum Decoder {
    ByteLevel,
    Replace {
        pattern: Pattern,
        content: String,
    },
    /// Runs of `<0xXX>` tokens become the text of their bytes (one U+FFFD per byte if invalid).
    ByteFallback,
    /// Joins all tokens into one.
    Fuse,
    /// Removes up to `start` leading and `stop` trailing `content` characters of each token.
    Strip {
        content: char,
        start: usize,
        stop: usize,
    },
    Metaspace {
        replacement: char,
        prepend_scheme: PrependScheme,
        split: bool,
    },
    Sequence(Vec<Decoder>),
}

/// The byte a `<0xXX>` token stands for.
pub(crate) fn byte_token(token: &str) -> Option<u8> {
    if token.len() == 6 && token.starts_with("<0x") && token.ends_with('>') {
        u8::from_str_radix(token.get(3..5)?, 16).ok()
    } else {
        None
    }
}

fn flush_bytes(bytes: &mut Vec<u8>, out: &mut Vec<String>) {
    if bytes.is_empty() {
        return;
    }
    match String::from_utf8(std::mem::take(bytes)) {
        Ok(s) => out.push(s),
        Err(e) => out.extend(std::iter::repeat_n(
            "\u{FFFD}".to_string(),
            e.into_bytes().len(),
        )),
    }
}

impl Decoder {
    pub fn decode_chain(&self, tokens: Vec<String>) -> Result<Vec<String>> {
        Ok(match self {
            Decoder::Sequence(steps) => {
                let mut tokens = tokens;
                for step in steps {
                    tokens = step.decode_chain(tokens)?;
                }
                tokens
            }
            Decoder::ByteLevel => {
                let mut bytes = Vec::new();
                for t in &tokens {
                    bytelevel::token_bytes(t, &mut bytes);
                }
                vec![String::from_utf8_lossy(&bytes).into_owned()]
            }
            Decoder::Replace { pattern, content } => {
                let mut out = Vec::with_capacity(tokens.len());
                for t in tokens {
                    let mut s = String::with_capacity(t.len());
                    let mut prev = 0;
                    for (a, b) in pattern.find_all(&t)? {
                        s.push_str(&t[prev..a]);
                        s.push_str(content);
                        prev = b;
                    }
                    s.push_str(&t[prev..]);
                    out.push(s);
                }
                out
            }
            Decoder::ByteFallback => {
                let mut out = Vec::with_capacity(tokens.len());
                let mut bytes = Vec::new();
                for t in tokens {
                    match byte_token(&t) {
                        Some(b) => bytes.push(b),
                        None => {
                            flush_bytes(&mut bytes, &mut out);
                            out.push(t);
                        }
                    }
                }
                flush_bytes(&mut bytes, &mut out);
                out
            }
            Decoder::Fuse => vec![tokens.concat()],
            Decoder::Strip {
                content,
                start,
                stop,
            } => tokens
                .into_iter()
                .map(|t| {
                    let chars: Vec<char> = t.chars().collect();
                    let lead = chars
                        .iter()
                        .take(*start)
                        .take_while(|&&c| c == *content)
                        .count();
                    let rest = &chars[lead..];
                    let trail = rest
                        .iter()
                        .rev()
                        .take(*stop)
                        .take_while(|&&c| c == *content)
                        .count();
                    rest[..rest.len() - trail].iter().collect()
                })
                .collect(),
            Decoder::Metaspace {
                replacement,
                prepend_scheme,
                ..
            } => tokens
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    t.chars()
                        .filter_map(|c| {
                            if c != *replacement {
                                Some(c)
                            } else if i == 0 && *prepend_scheme != PrependScheme::Never {
                                None
                            } else {
                                Some(' ')
                            }
                        })
                        .collect()
                })
                .collect(),
        })
    }

    /// The bytes one token decodes to on its own (see the module docs).
    pub fn token_bytes(&self, token: &str) -> Vec<u8> {
        /// A token between steps: text, or bytes once a step has produced raw bytes.
        enum Form {
            Text(String),
            Bytes(Vec<u8>),
        }
        fn steps(d: &Decoder, form: Form) -> Form {
            match (d, form) {
                (Decoder::Sequence(list), form) => list.iter().fold(form, |f, d| steps(d, f)),
                (Decoder::ByteLevel, Form::Text(t)) => {
                    let mut bytes = Vec::new();
                    bytelevel::token_bytes(&t, &mut bytes);
                    Form::Bytes(bytes)
                }
                (Decoder::ByteFallback, Form::Text(t)) => match byte_token(&t) {
                    Some(b) => Form::Bytes(vec![b]),
                    None => Form::Text(t),
                },
                (Decoder::Replace { pattern, content }, Form::Text(t)) => {
                    let mut s = String::new();
                    let mut prev = 0;
                    for (a, b) in pattern.find_all(&t).unwrap_or_default() {
                        s.push_str(&t[prev..a]);
                        s.push_str(content);
                        prev = b;
                    }
                    s.push_str(&t[prev..]);
                    Form::Text(s)
                }
                (Decoder::Metaspace { replacement, .. }, Form::Text(t)) => Form::Text(
                    t.chars()
                        .map(|c| if c == *replacement { ' ' } else { c })
                        .collect(),
                ),
                (_, form) => form,
            }
        }
        match steps(self, Form::Text(token.to_owned())) {
            Form::Text(t) => t.into_bytes(),
            Form::Bytes(b) => b,
        }
    }

    pub fn from_json(v: &Value) -> Result<Decoder> {
        let ty = type_of(v, "decoder")?;
        let int = |key: &str| {
            v.get(key)
                .and_then(Value::as_u64)
                .map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX))
        };
        Ok(match ty {
            "ByteLevel" => Decoder::ByteLevel,
            "Replace" => Decoder::Replace {
                pattern: Pattern::from_json(v.get("pattern").unwrap_or(&Value::Null))?,
                content: v
                    .get("content")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
            },
            "ByteFallback" => Decoder::ByteFallback,
            "Fuse" => Decoder::Fuse,
            "Strip" => Decoder::Strip {
                content: single_char(v.get("content"), "Strip decoder content")?,
                start: int("start"),
                stop: int("stop"),
            },
            "Metaspace" => {
                let mut prepend_scheme = match v.get("prepend_scheme").and_then(Value::as_str) {
                    Some(s) => PrependScheme::parse(s)?,
                    None => PrependScheme::Always,
                };
                if v.get("add_prefix_space").and_then(Value::as_bool) == Some(false) {
                    prepend_scheme = PrependScheme::Never;
                }
                Decoder::Metaspace {
                    replacement: single_char(v.get("replacement"), "Metaspace replacement")?,
                    prepend_scheme,
                    split: v.get("split").and_then(Value::as_bool).unwrap_or(true),
                }
            }
            "Sequence" => {
                let list = v.get("decoders").and_then(Value::as_array).ok_or_else(|| {
                    RuntimeError::Tokenizer("decoder Sequence needs a \"decoders\" list".into())
                })?;
                Decoder::Sequence(list.iter().map(Decoder::from_json).collect::<Result<_>>()?)
            }
            other => return Err(unsupported("decoder", other)),
        })
    }

    pub fn to_json(&self) -> Value {
        match self {
            Decoder::ByteLevel => {
                json!({ "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true })
            }
            Decoder::Replace { pattern, content } => {
                json!({ "type": "Replace", "pattern": pattern.to_json(), "content": content })
            }
            Decoder::ByteFallback => json!({ "type": "ByteFallback" }),
            Decoder::Fuse => json!({ "type": "Fuse" }),
            Decoder::Strip {
                content,
                start,
                stop,
            } => {
                json!({ "type": "Strip", "content": content.to_string(), "start": start, "stop": stop })
            }
            Decoder::Metaspace {
                replacement,
                prepend_scheme,
                split,
            } => json!({
                "type": "Metaspace", "replacement": replacement.to_string(),
                "prepend_scheme": prepend_scheme.name(), "split": split
            }),
            Decoder::Sequence(steps) => json!({
                "type": "Sequence", "decoders": steps.iter().map(Decoder::to_json).collect::<Vec<_>>()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llama_decoder() -> Decoder {
        Decoder::Sequence(vec![
            Decoder::Replace {
                pattern: Pattern::literal("▁").unwrap(),
                content: " ".into(),
            },
            Decoder::ByteFallback,
            Decoder::Fuse,
            Decoder::Strip {
                content: ' ',
                start: 1,
                stop: 0,
            },
        ])
    }

    #[test]
    fn llama_chain_strips_one_leading_space_and_joins_bytes() {
        let toks = ["▁Hello", "▁", "<0xE2>", "<0x82>", "<0xAC>", "▁x", "<0xFF>"]
            .map(String::from)
            .to_vec();
        let out = llama_decoder().decode_chain(toks).unwrap().concat();
        assert_eq!(out, "Hello € x\u{FFFD}");
        // An invalid run gives one U+FFFD per byte, as in HF.
        let toks = ["<0xE2>", "<0x82>", "<0xFF>"].map(String::from).to_vec();
        assert_eq!(
            llama_decoder().decode_chain(toks).unwrap().concat(),
            "\u{FFFD}\u{FFFD}\u{FFFD}"
        );
        assert_eq!(llama_decoder().token_bytes("▁Hi"), b" Hi");
        assert_eq!(llama_decoder().token_bytes("<0xE2>"), vec![0xE2]);
    }

    #[test]
    fn strip_never_panics_on_short_tokens() {
        let d = Decoder::Strip {
            content: ' ',
            start: 3,
            stop: 5,
        };
        assert_eq!(
            d.decode_chain(vec![" ".into(), "".into(), " a  ".into()])
                .unwrap(),
            vec!["", "", "a"]
        );
    }
}
