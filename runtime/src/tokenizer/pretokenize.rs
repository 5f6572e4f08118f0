//! Pre-tokenisers: cut normalised text into words before BPE, as Hugging Face `tokenizers`'
//! pre-tokenisers do (`ByteLevel`, `Digits`, `Split`, `Metaspace`, `Whitespace`,
//! `WhitespaceSplit`, `Sequence`), and the regular expressions that GGUF's
//! `tokenizer.ggml.pre` names stand for.
//!
//! Every splitting step is one function, [`split_ranges`], a port of HF's
//! `NormalizedString::split` with its five delimiter behaviours, so a new pre-tokeniser is a
//! pattern plus a behaviour. Regular expressions go through `fancy-regex`, which has the
//! look-ahead that `\s+(?!\S)` needs.

use fancy_regex::Regex;
use serde_json::{json, Value};

use super::bytelevel;
use crate::error::{Result, RuntimeError};

/// GPT-2's pre-tokenising regex, which HF's ByteLevel pre-tokeniser applies when `use_regex`.
pub(crate) const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// LLaMA-3's pre-tokenising regex (its tokenizer.json `Split` pattern).
pub(crate) const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's pre-tokenising regex: LLaMA-3's with single digits.
pub(crate) const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// HF's `Whitespace` pre-tokeniser keeps what this matches and drops the rest.
const WHITESPACE_PATTERN: &str = r"\w+|[^\w\s]+";
/// Backtracking budget of one regex search. The patterns above need a handful of steps per
/// character; a pathological user pattern fails with an error instead of running forever.
const REGEX_BACKTRACK_LIMIT: usize = 10_000_000;

/// A piece of text between splitting steps. `at_start` says whether it begins at the start of
/// the input (HF's `offsets_original().0 == 0`), which `Metaspace`'s `prepend_scheme: first`
/// needs.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Piece {
    pub text: String,
    pub at_start: bool,
}

/// What a split does with the delimiters it finds (HF's `SplitDelimiterBehavior`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Behavior {
    Removed,
    Isolated,
    MergedWithPrevious,
    MergedWithNext,
    Contiguous,
}

impl Behavior {
    fn parse(s: &str) -> Result<Behavior> {
        Ok(match s {
            "Removed" => Behavior::Removed,
            "Isolated" => Behavior::Isolated,
            "MergedWithPrevious" => Behavior::MergedWithPrevious,
            "MergedWithNext" => Behavior::MergedWithNext,
            "Contiguous" => Behavior::Contiguous,
            other => return Err(bad(format!("unknown split behavior {other:?}"))),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Behavior::Removed => "Removed",
            Behavior::Isolated => "Isolated",
            Behavior::MergedWithPrevious => "MergedWithPrevious",
            Behavior::MergedWithNext => "MergedWithNext",
            Behavior::Contiguous => "Contiguous",
        }
    }
}

/// A `Split`/`Replace` pattern: a literal string or a regular expression, compiled.
#[derive(Clone, Debug)]
pub(crate) struct Pattern {
    /// `true` for `{"Regex": …}`, `false` for `{"String": …}`.
    pub is_regex: bool,
    pub source: String,
    pub regex: Regex,
}

impl Pattern {
    pub fn regex(source: &str) -> Result<Pattern> {
        Ok(Pattern {
            is_regex: true,
            source: source.to_owned(),
            regex: compile(source)?,
        })
    }

    pub fn literal(source: &str) -> Result<Pattern> {
        Ok(Pattern {
            is_regex: false,
            source: source.to_owned(),
            regex: compile(&fancy_regex::escape(source))?,
        })
    }

    /// Parses tokenizer.json's `{"String": s}` or `{"Regex": r}`.
    pub fn from_json(v: &Value) -> Result<Pattern> {
        if let Some(s) = v.get("String").and_then(Value::as_str) {
            Pattern::literal(s)
        } else if let Some(r) = v.get("Regex").and_then(Value::as_str) {
            Pattern::regex(r)
        } else {
            Err(bad(format!(
                "a pattern must be {{\"String\": …}} or {{\"Regex\": …}}, not {v}"
            )))
        }
    }

    pub fn to_json(&self) -> Value {
        if self.is_regex {
            json!({ "Regex": self.source })
        } else {
            json!({ "String": self.source })
        }
    }

    /// `(start, end)` byte ranges of the non-overlapping matches in `text`.
    pub fn find_all(&self, text: &str) -> Result<Vec<(usize, usize)>> {
        let mut out = Vec::new();
        for m in self.regex.find_iter(text) {
            let m = m.map_err(|e| bad(format!("regex {:?} failed: {e}", self.source)))?;
            out.push((m.start(), m.end()));
        }
        Ok(out)
    }
}

fn compile(source: &str) -> Result<Regex> {
    fancy_regex::RegexBuilder::new(source)
        .backtrack_limit(REGEX_BACKTRACK_LIMIT)
        .build()
        .map_err(|e| bad(format!("cannot compile regex {source:?}: {e}")))
}

fn bad(msg: String) -> RuntimeError {
    RuntimeError::Tokenizer(msg)
}

/// `text` cut into `(start, end, is_match)` ranges that cover it, from a list of matches.
fn cover(
    len: usize,
    matches: impl IntoIterator<Item = (usize, usize)>,
) -> Vec<(usize, usize, bool)> {
    if len == 0 {
        return vec![(0, 0, false)];
    }
    let mut out = Vec::new();
    let mut prev = 0;
    for (s, e) in matches {
        if prev != s {
            out.push((prev, s, false));
        }
        out.push((s, e, true));
        prev = e;
    }
    if prev != len {
        out.push((prev, len, false));
    }
    out
}

/// HF's `NormalizedString::split`: the ranges to keep, from the covering ranges and a behaviour.
fn split_ranges(ranges: Vec<(usize, usize, bool)>, behavior: Behavior) -> Vec<(usize, usize)> {
    match behavior {
        Behavior::Isolated => ranges.into_iter().map(|(s, e, _)| (s, e)).collect(),
        Behavior::Removed => ranges
            .into_iter()
            .filter(|r| !r.2)
            .map(|(s, e, _)| (s, e))
            .collect(),
        Behavior::Contiguous => {
            let mut out: Vec<(usize, usize)> = Vec::new();
            let mut previous_match = false;
            for (s, e, is_match) in ranges {
                match out.last_mut() {
                    Some(last) if is_match == previous_match => last.1 = e,
                    _ => out.push((s, e)),
                }
                previous_match = is_match;
            }
            out
        }
        Behavior::MergedWithPrevious => {
            let mut out: Vec<(usize, usize)> = Vec::new();
            let mut previous_match = false;
            for (s, e, is_match) in ranges {
                match out.last_mut() {
                    Some(last) if is_match && !previous_match => last.1 = e,
                    _ => out.push((s, e)),
                }
                previous_match = is_match;
            }
            out
        }
        Behavior::MergedWithNext => {
            let mut out: Vec<(usize, usize)> = Vec::new();
            let mut previous_match = false;
            for (s, e, is_match) in ranges.into_iter().rev() {
                match out.last_mut() {
                    Some(last) if is_match && !previous_match => last.0 = s,
                    _ => out.push((s, e)),
                }
                previous_match = is_match;
            }
            out.reverse();
            out
        }
    }
}

/// Cuts `piece` at `ranges` (from [`cover`]) under `behavior`, dropping empty pieces.
fn split_piece(
    piece: &Piece,
    ranges: Vec<(usize, usize, bool)>,
    behavior: Behavior,
    out: &mut Vec<Piece>,
) {
    for (s, e) in split_ranges(ranges, behavior) {
        if s < e {
            if let Some(text) = piece.text.get(s..e) {
                out.push(Piece {
                    text: text.to_owned(),
                    at_start: piece.at_start && s == 0,
                });
            }
        }
    }
}

/// Ranges of single characters for which `pred` holds (HF's `Fn(char) -> bool` pattern).
fn char_ranges(text: &str, pred: impl Fn(char) -> bool) -> Vec<(usize, usize, bool)> {
    let matches = text
        .char_indices()
        .filter(|&(_, c)| pred(c))
        .map(|(i, c)| (i, i + c.len_utf8()));
    cover(text.len(), matches)
}

/// When a Metaspace pre-tokeniser adds its replacement character in front of a piece.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PrependScheme {
    Always,
    First,
    Never,
}

impl PrependScheme {
    pub fn parse(s: &str) -> Result<PrependScheme> {
        Ok(match s {
            "always" => PrependScheme::Always,
            "first" => PrependScheme::First,
            "never" => PrependScheme::Never,
            other => return Err(bad(format!("unknown Metaspace prepend_scheme {other:?}"))),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            PrependScheme::Always => "always",
            PrependScheme::First => "first",
            PrependScheme::Never => "never",
        }
    }
}

/// One pre-tokeniser of tokenizer.json's `"pre_tokenizer"`.
#[derive(Clone, Debug)]
pub(crate) enum PreTokenizer {
    /// Optionally a leading space, optionally GPT-2's regex, then bytes → table characters.
    ByteLevel {
        add_prefix_space: bool,
        trim_offsets: bool,
        use_regex: bool,
        gpt2: Pattern,
    },
    /// Digits cut out one by one (`individual_digits`) or in runs.
    Digits {
        individual_digits: bool,
    },
    Split {
        pattern: Pattern,
        behavior: Behavior,
        invert: bool,
    },
    /// Spaces become `replacement`, which may be prepended, and the text is cut before each.
    Metaspace {
        replacement: char,
        prepend_scheme: PrependScheme,
        split: bool,
    },
    Whitespace {
        pattern: Pattern,
    },
    WhitespaceSplit,
    Sequence(Vec<PreTokenizer>),
}

impl PreTokenizer {
    pub fn byte_level(add_prefix_space: bool, use_regex: bool) -> Result<PreTokenizer> {
        Ok(PreTokenizer::ByteLevel {
            add_prefix_space,
            trim_offsets: true,
            use_regex,
            gpt2: Pattern::regex(GPT2_PATTERN)?,
        })
    }

    pub fn split_regex(pattern: &str) -> Result<PreTokenizer> {
        Ok(PreTokenizer::Split {
            pattern: Pattern::regex(pattern)?,
            behavior: Behavior::Isolated,
            invert: false,
        })
    }

    /// Applies this pre-tokeniser to every piece.
    pub fn run(&self, pieces: Vec<Piece>) -> Result<Vec<Piece>> {
        let mut out = Vec::with_capacity(pieces.len());
        match self {
            PreTokenizer::Sequence(steps) => {
                let mut pieces = pieces;
                for step in steps {
                    pieces = step.run(pieces)?;
                }
                return Ok(pieces);
            }
            PreTokenizer::ByteLevel {
                add_prefix_space,
                use_regex,
                gpt2,
                ..
            } => {
                for mut piece in pieces {
                    if *add_prefix_space && !piece.text.starts_with(' ') {
                        piece.text.insert(0, ' ');
                    }
                    let mut words = Vec::new();
                    if *use_regex {
                        let ranges = cover(piece.text.len(), gpt2.find_all(&piece.text)?);
                        split_piece(&piece, ranges, Behavior::Isolated, &mut words);
                    } else if !piece.text.is_empty() {
                        words.push(piece);
                    }
                    out.extend(words.into_iter().map(|w| Piece {
                        text: bytelevel::encode_bytes(&w.text),
                        at_start: w.at_start,
                    }));
                }
            }
            PreTokenizer::Digits { individual_digits } => {
                let behavior = if *individual_digits {
                    Behavior::Isolated
                } else {
                    Behavior::Contiguous
                };
                for piece in &pieces {
                    split_piece(
                        piece,
                        char_ranges(&piece.text, char::is_numeric),
                        behavior,
                        &mut out,
                    );
                }
            }
            PreTokenizer::Split {
                pattern,
                behavior,
                invert,
            } => {
                for piece in &pieces {
                    let mut ranges = cover(piece.text.len(), pattern.find_all(&piece.text)?);
                    if *invert {
                        ranges.iter_mut().for_each(|r| r.2 = !r.2);
                    }
                    split_piece(piece, ranges, *behavior, &mut out);
                }
            }
            PreTokenizer::Metaspace {
                replacement,
                prepend_scheme,
                split,
            } => {
                let rep = replacement.to_string();
                for piece in pieces {
                    let mut text = piece.text.replace(' ', &rep);
                    let prepend = match prepend_scheme {
                        PrependScheme::Always => true,
                        PrependScheme::First => piece.at_start,
                        PrependScheme::Never => false,
                    };
                    if prepend && !text.starts_with(*replacement) {
                        text.insert(0, *replacement);
                    }
                    let piece = Piece {
                        text,
                        at_start: piece.at_start,
                    };
                    if *split {
                        let ranges = char_ranges(&piece.text, |c| c == *replacement);
                        split_piece(&piece, ranges, Behavior::MergedWithNext, &mut out);
                    } else if !piece.text.is_empty() {
                        out.push(piece);
                    }
                }
            }
            PreTokenizer::Whitespace { pattern } => {
                for piece in &pieces {
                    let mut ranges = cover(piece.text.len(), pattern.find_all(&piece.text)?);
                    ranges.iter_mut().for_each(|r| r.2 = !r.2);
                    split_piece(piece, ranges, Behavior::Removed, &mut out);
                }
            }
            PreTokenizer::WhitespaceSplit => {
                for piece in &pieces {
                    split_piece(
                        piece,
                        char_ranges(&piece.text, char::is_whitespace),
                        Behavior::Removed,
                        &mut out,
                    );
                }
            }
        }
        Ok(out)
    }

    pub fn from_json(v: &Value) -> Result<PreTokenizer> {
        let ty = type_of(v, "pre_tokenizer")?;
        let flag =
            |key: &str, default: bool| v.get(key).and_then(Value::as_bool).unwrap_or(default);
        Ok(match ty {
            "ByteLevel" => PreTokenizer::ByteLevel {
                add_prefix_space: flag("add_prefix_space", true),
                trim_offsets: flag("trim_offsets", true),
                use_regex: flag("use_regex", true),
                gpt2: Pattern::regex(GPT2_PATTERN)?,
            },
            "Digits" => PreTokenizer::Digits {
                individual_digits: flag("individual_digits", false),
            },
            "Split" => PreTokenizer::Split {
                pattern: Pattern::from_json(v.get("pattern").unwrap_or(&Value::Null))?,
                behavior: Behavior::parse(v.get("behavior").and_then(Value::as_str).unwrap_or(""))?,
                invert: flag("invert", false),
            },
            "Metaspace" => {
                let replacement = single_char(v.get("replacement"), "Metaspace replacement")?;
                let mut prepend_scheme = match v.get("prepend_scheme").and_then(Value::as_str) {
                    Some(s) => PrependScheme::parse(s)?,
                    None => PrependScheme::Always,
                };
                if v.get("add_prefix_space").and_then(Value::as_bool) == Some(false) {
                    prepend_scheme = PrependScheme::Never;
                }
                PreTokenizer::Metaspace {
                    replacement,
                    prepend_scheme,
                    split: flag("split", true),
                }
            }
            "Whitespace" => PreTokenizer::Whitespace {
                pattern: Pattern::regex(WHITESPACE_PATTERN)?,
            },
            "WhitespaceSplit" => PreTokenizer::WhitespaceSplit,
            "Sequence" => {
                let list = v
                    .get("pretokenizers")
                    .and_then(Value::as_array)
                    .ok_or_else(|| {
                        bad("pre_tokenizer Sequence needs a \"pretokenizers\" list".into())
                    })?;
                PreTokenizer::Sequence(
                    list.iter()
                        .map(PreTokenizer::from_json)
                        .collect::<Result<_>>()?,
                )
            }
            other => return Err(unsupported("pre_tokenizer", other)),
        })
    }

    pub fn to_json(&self) -> Value {
        match self {
            PreTokenizer::ByteLevel {
                add_prefix_space,
                trim_offsets,
                use_regex,
                ..
            } => json!({
                "type": "ByteLevel", "add_prefix_space": add_prefix_space,
                "trim_offsets": trim_offsets, "use_regex": use_regex
            }),
            PreTokenizer::Digits { individual_digits } => {
                json!({ "type": "Digits", "individual_digits": individual_digits })
            }
            PreTokenizer::Split {
                pattern,
                behavior,
                invert,
            } => json!({
                "type": "Split", "pattern": pattern.to_json(), "behavior": behavior.name(), "invert": invert
            }),
            PreTokenizer::Metaspace {
                replacement,
                prepend_scheme,
                split,
            } => json!({
                "type": "Metaspace", "replacement": replacement.to_string(),
                "prepend_scheme": prepend_scheme.name(), "split": split
            }),
            PreTokenizer::Whitespace { .. } => json!({ "type": "Whitespace" }),
            PreTokenizer::WhitespaceSplit => json!({ "type": "WhitespaceSplit" }),
            PreTokenizer::Sequence(steps) => json!({
                "type": "Sequence", "pretokenizers": steps.iter().map(PreTokenizer::to_json).collect::<Vec<_>>()
            }),
        }
    }
}

/// The `"type"` of a tokenizer.json component.
pub(crate) fn type_of<'a>(v: &'a Value, what: &str) -> Result<&'a str> {
    v.get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(format!("{what} without a \"type\": {v}")))
}

pub(crate) fn unsupported(what: &str, ty: &str) -> RuntimeError {
    bad(format!("{what} type {ty:?} is not supported"))
}

/// A one-character string field (`"replacement": "▁"`).
pub(crate) fn single_char(v: Option<&Value>, what: &str) -> Result<char> {
    let s = v.and_then(Value::as_str).unwrap_or("");
    let mut chars = s.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) => Ok(c),
        _ => Err(bad(format!("{what} must be one character, not {s:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(p: &PreTokenizer, text: &str) -> Vec<String> {
        p.run(vec![Piece {
            text: text.into(),
            at_start: true,
        }])
        .unwrap()
        .into_iter()
        .map(|p| p.text)
        .collect()
    }

    #[test]
    fn gpt2_regex_keeps_one_space_with_the_next_word() {
        let p = PreTokenizer::byte_level(false, true).unwrap();
        assert_eq!(
            words(&p, "Hello  world's 12"),
            vec!["Hello", "Ġ", "Ġworld", "'s", "Ġ12"]
        );
    }

    #[test]
    fn digits_and_behaviours() {
        let p = PreTokenizer::Digits {
            individual_digits: true,
        };
        assert_eq!(words(&p, "ab123c"), vec!["ab", "1", "2", "3", "c"]);
        let p = PreTokenizer::Digits {
            individual_digits: false,
        };
        assert_eq!(words(&p, "ab123c"), vec!["ab", "123", "c"]);
        let split = |b| PreTokenizer::Split {
            pattern: Pattern::literal("-").unwrap(),
            behavior: b,
            invert: false,
        };
        assert_eq!(
            words(&split(Behavior::Removed), "a-b--c"),
            vec!["a", "b", "c"]
        );
        assert_eq!(
            words(&split(Behavior::MergedWithPrevious), "a-b--c"),
            vec!["a-", "b-", "-", "c"]
        );
        assert_eq!(
            words(&split(Behavior::MergedWithNext), "a-b--c"),
            vec!["a", "-b", "-", "-c"]
        );
        assert_eq!(
            words(&split(Behavior::Contiguous), "a-b--c"),
            vec!["a", "-", "b", "--", "c"]
        );
    }

    #[test]
    fn metaspace_prepends_only_at_the_start_with_first() {
        let p = PreTokenizer::Metaspace {
            replacement: '▁',
            prepend_scheme: PrependScheme::First,
            split: true,
        };
        assert_eq!(words(&p, "Hey you"), vec!["▁Hey", "▁you"]);
        let later = p
            .run(vec![Piece {
                text: "Hey".into(),
                at_start: false,
            }])
            .unwrap();
        assert_eq!(later[0].text, "Hey");
    }
}
