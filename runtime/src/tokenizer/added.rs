//! Added tokens: special and user tokens (`<|im_start|>`, `<s>`, …) that are found in the raw
//! text before anything else runs, so that a chat template's markers become their ids.
//!
//! This is Hugging Face's `AddedVocabulary`: tokens with `normalized: false` are matched in the
//! raw text; the text between them is normalised, and then tokens with `normalized: true` are
//! matched (by their normalised form) in that. Matching is leftmost-longest; `single_word`,
//! `lstrip` and `rstrip` are honoured as HF does.

use std::sync::OnceLock;

use fancy_regex::Regex;
use serde_json::{json, Value};

use super::normalize::Normalizer;
use crate::error::{Result, RuntimeError};

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct AddedToken {
    pub id: u32,
    pub content: String,
    pub single_word: bool,
    pub lstrip: bool,
    pub rstrip: bool,
    pub normalized: bool,
    pub special: bool,
}

impl AddedToken {
    /// A special token as GGUF vocabularies and HF special tokens have them: matched verbatim.
    pub fn special(id: u32, content: &str, special: bool) -> AddedToken {
        AddedToken {
            id,
            content: content.to_owned(),
            single_word: false,
            lstrip: false,
            rstrip: false,
            normalized: false,
            special,
        }
    }

    pub fn from_json(v: &Value) -> Result<AddedToken> {
        let id = v
            .get("id")
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| {
                RuntimeError::Tokenizer(format!("added token without a valid \"id\": {v}"))
            })?;
        let content = v.get("content").and_then(Value::as_str).ok_or_else(|| {
            RuntimeError::Tokenizer(format!("added token without \"content\": {v}"))
        })?;
        let special = v.get("special").and_then(Value::as_bool).unwrap_or(false);
        let flag =
            |key: &str, default: bool| v.get(key).and_then(Value::as_bool).unwrap_or(default);
        Ok(AddedToken {
            id,
            content: content.to_owned(),
            single_word: flag("single_word", false),
            lstrip: flag("lstrip", false),
            rstrip: flag("rstrip", false),
            normalized: flag("normalized", !special),
            special,
        })
    }

    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id, "content": self.content, "single_word": self.single_word,
            "lstrip": self.lstrip, "rstrip": self.rstrip, "normalized": self.normalized,
            "special": self.special
        })
    }
}

/// A piece of text after splitting out added tokens.
#[derive(Debug, PartialEq)]
pub(crate) enum Segment<'a> {
    Token(u32),
    /// Text and its byte offset in the string that was split.
    Text(&'a str, usize),
}

/// Leftmost-longest matching of a fixed set of strings.
#[derive(Clone, Debug, Default)]
struct Matcher {
    /// `(pattern, index into AddedVocab::tokens)`.
    patterns: Vec<(String, usize)>,
    /// For each first byte, indices into `patterns`, longest pattern first.
    by_first_byte: Vec<Vec<usize>>,
}

impl Matcher {
    fn new(patterns: Vec<(String, usize)>) -> Matcher {
        let mut by_first_byte = vec![Vec::new(); 256];
        for (i, (p, _)) in patterns.iter().enumerate() {
            if let Some(&b) = p.as_bytes().first() {
                by_first_byte[usize::from(b)].push(i);
            }
        }
        for list in &mut by_first_byte {
            // Longest first; among equal patterns the first added wins.
            list.sort_by(|&a, &b| {
                patterns[b]
                    .0
                    .len()
                    .cmp(&patterns[a].0.len())
                    .then(a.cmp(&b))
            });
        }
        Matcher {
            patterns,
            by_first_byte,
        }
    }

    /// The next match at or after `from`: `(start, end, token index)`.
    fn find(&self, text: &str, from: usize) -> Option<(usize, usize, usize)> {
        if self.patterns.is_empty() {
            return None;
        }
        let bytes = text.as_bytes();
        for i in from..bytes.len() {
            for &p in &self.by_first_byte[usize::from(bytes[i])] {
                let (pattern, token) = &self.patterns[p];
                if bytes[i..].starts_with(pattern.as_bytes()) {
                    return Some((i, i + pattern.len(), *token));
                }
            }
        }
        None
    }
}

/// The added tokens of a tokenizer and the two matchers over them.
#[derive(Clone, Debug, Default)]
pub(crate) struct AddedVocab {
    pub tokens: Vec<AddedToken>,
    /// Tokens with `normalized: false`, matched in the raw text.
    raw: Matcher,
    /// Tokens with `normalized: true`, matched by their normalised form in normalised text.
    normalized: Matcher,
    /// The form each token decodes to (its normalised form when `normalized`, as in HF).
    pub decoded: Vec<String>,
}

/// Whether `c` is a word character in the sense of the regex `\w` (letters, marks, decimal
/// digits, connector punctuation, joiners), which HF's `single_word` check uses.
fn is_word_char(c: char) -> bool {
    static WORD: OnceLock<Option<Regex>> = OnceLock::new();
    let mut buf = [0u8; 4];
    match WORD.get_or_init(|| Regex::new(r"^\w$").ok()) {
        Some(re) => re.is_match(c.encode_utf8(&mut buf)).unwrap_or(false),
        None => c.is_alphanumeric() || c == '_',
    }
}

impl AddedVocab {
    pub fn new(tokens: Vec<AddedToken>, normalizer: Option<&Normalizer>) -> Result<AddedVocab> {
        let mut raw = Vec::new();
        let mut normalized = Vec::new();
        let mut decoded = Vec::new();
        for (i, t) in tokens.iter().enumerate() {
            let form = match (t.normalized, normalizer) {
                (true, Some(n)) => n.normalize(&t.content)?,
                _ => t.content.clone(),
            };
            decoded.push(form.clone());
            if form.is_empty() {
                continue;
            }
            if t.normalized {
                normalized.push((form, i));
            } else {
                raw.push((form, i));
            }
        }
        Ok(AddedVocab {
            tokens,
            raw: Matcher::new(raw),
            normalized: Matcher::new(normalized),
            decoded,
        })
    }

    /// Splits `text` at the raw (`normalized == false`) or the normalised added tokens.
    pub fn split<'a>(&self, text: &'a str, normalized: bool) -> Vec<Segment<'a>> {
        let matcher = if normalized {
            &self.normalized
        } else {
            &self.raw
        };
        let mut out = Vec::new();
        let mut start_offset = 0;
        let mut from = 0;
        while let Some((mut start, mut stop, index)) = matcher.find(text, from) {
            from = stop;
            let token = &self.tokens[index];
            if token.single_word {
                let before_is_word = text[..start].chars().next_back().is_some_and(is_word_char);
                let after_is_word = text[stop..].chars().next().is_some_and(is_word_char);
                if before_is_word || after_is_word {
                    continue;
                }
            }
            if token.lstrip {
                let trimmed = text[..start].trim_end_matches(char::is_whitespace).len();
                start = trimmed.max(start_offset);
            }
            if token.rstrip {
                stop = text.len() - text[stop..].trim_start_matches(char::is_whitespace).len();
                from = stop;
            }
            if start_offset < start {
                out.push(Segment::Text(&text[start_offset..start], start_offset));
            }
            out.push(Segment::Token(token.id));
            start_offset = stop;
        }
        if start_offset < text.len() {
            out.push(Segment::Text(&text[start_offset..], start_offset));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_match_wins_and_strip_flags_eat_spaces() {
        let mut a = AddedToken::special(7, "<|a|>", true);
        let b = AddedToken::special(8, "<|a|>x", true);
        a.rstrip = true;
        let mut c = AddedToken::special(9, "<m>", false);
        c.lstrip = true;
        let v = AddedVocab::new(vec![a, b, c], None).unwrap();
        assert_eq!(
            v.split("hi <|a|>x <|a|>  yo   <m>z", false),
            vec![
                Segment::Text("hi ", 0),
                Segment::Token(8),
                Segment::Text(" ", 9),
                Segment::Token(7),
                Segment::Text("yo", 17),
                Segment::Token(9),
                Segment::Text("z", 25),
            ]
        );
    }

    #[test]
    fn single_word_tokens_need_word_boundaries() {
        let mut t = AddedToken::special(3, "ab", false);
        t.single_word = true;
        let v = AddedVocab::new(vec![t], None).unwrap();
        assert_eq!(
            v.split("xab ab", false),
            vec![Segment::Text("xab ", 0), Segment::Token(3)]
        );
    }
}
