//! Normalisers: rewrite text before pre-tokenisation, as tokenizer.json's `"normalizer"`
//! says (`Sequence`, `Prepend`, `Replace`, `Lowercase`, `Strip`). LLaMA's legacy SentencePiece
//! tokenizer is `Sequence[Prepend("▁"), Replace(" ", "▁")]`.
//!
//! Unicode normal forms (`NFC`, `NFKC`, …) need Unicode tables this crate does not carry; they
//! are refused by name rather than silently skipped.

use serde_json::{json, Value};

use super::pretokenize::{type_of, unsupported, Pattern};
use crate::error::{Result, RuntimeError};

#[derive(Clone, Debug)]
pub(crate) enum Normalizer {
    Sequence(Vec<Normalizer>),
    /// Prepends the string to non-empty text.
    Prepend(String),
    Replace {
        pattern: Pattern,
        content: String,
    },
    /// Lowercases character by character (no final-sigma rule, as in HF).
    Lowercase,
    Strip {
        left: bool,
        right: bool,
    },
}

impl Normalizer {
    pub fn normalize(&self, text: &str) -> Result<String> {
        Ok(match self {
            Normalizer::Sequence(steps) => {
                let mut s = text.to_owned();
                for step in steps {
                    s = step.normalize(&s)?;
                }
                s
            }
            Normalizer::Prepend(p) => {
                if text.is_empty() {
                    String::new()
                } else {
                    format!("{p}{text}")
                }
            }
            Normalizer::Replace { pattern, content } => {
                if !pattern.is_regex {
                    if pattern.source.is_empty() {
                        text.to_owned()
                    } else {
                        text.replace(&pattern.source, content)
                    }
                } else {
                    let mut out = String::with_capacity(text.len());
                    let mut prev = 0;
                    for (s, e) in pattern.find_all(text)? {
                        out.push_str(&text[prev..s]);
                        out.push_str(content);
                        prev = e;
                    }
                    out.push_str(&text[prev..]);
                    out
                }
            }
            Normalizer::Lowercase => text.chars().flat_map(char::to_lowercase).collect(),
            Normalizer::Strip { left, right } => {
                let mut s = text;
                if *left {
                    s = s.trim_start();
                }
                if *right {
                    s = s.trim_end();
                }
                s.to_owned()
            }
        })
    }

    pub fn from_json(v: &Value) -> Result<Normalizer> {
        let ty = type_of(v, "normalizer")?;
        let string = |key: &str| {
            v.get(key)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| {
                    RuntimeError::Tokenizer(format!("normalizer {ty} needs a string \"{key}\""))
                })
        };
        Ok(match ty {
            "Sequence" => {
                let list = v
                    .get("normalizers")
                    .and_then(Value::as_array)
                    .ok_or_else(|| {
                        RuntimeError::Tokenizer(
                            "normalizer Sequence needs a \"normalizers\" list".into(),
                        )
                    })?;
                Normalizer::Sequence(
                    list.iter()
                        .map(Normalizer::from_json)
                        .collect::<Result<_>>()?,
                )
            }
            "Prepend" => Normalizer::Prepend(string("prepend")?),
            "Replace" => Normalizer::Replace {
                pattern: Pattern::from_json(v.get("pattern").unwrap_or(&Value::Null))?,
                content: string("content")?,
            },
            "Lowercase" => Normalizer::Lowercase,
            "Strip" => Normalizer::Strip {
                left: v.get("strip_left").and_then(Value::as_bool).unwrap_or(true),
                right: v
                    .get("strip_right")
                    .and_then(Value::as_bool)
                    .unwrap_or(true),
            },
            other => return Err(unsupported("normalizer", other)),
        })
    }

    pub fn to_json(&self) -> Value {
        match self {
            Normalizer::Sequence(steps) => json!({
                "type": "Sequence", "normalizers": steps.iter().map(Normalizer::to_json).collect::<Vec<_>>()
            }),
            Normalizer::Prepend(p) => json!({ "type": "Prepend", "prepend": p }),
            Normalizer::Replace { pattern, content } => {
                json!({ "type": "Replace", "pattern": pattern.to_json(), "content": content })
            }
            Normalizer::Lowercase => json!({ "type": "Lowercase" }),
            Normalizer::Strip { left, right } => {
                json!({ "type": "Strip", "strip_left": left, "strip_right": right })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_llama_normalizer() {
        let n = Normalizer::Sequence(vec![
            Normalizer::Prepend("▁".into()),
            Normalizer::Replace {
                pattern: Pattern::literal(" ").unwrap(),
                content: "▁".into(),
            },
        ]);
        assert_eq!(n.normalize("Hi  there").unwrap(), "▁Hi▁▁there");
        assert_eq!(n.normalize("").unwrap(), "");
    }
}
