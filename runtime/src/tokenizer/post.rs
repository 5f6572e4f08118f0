//! Post-processors: what `add_special` adds around an encoding (BOS, EOS), as tokenizer.json's
//! `"post_processor"` says. `TemplateProcessing` (`"<s> $A"`), `RobertaProcessing` and
//! `BertProcessing` (`cls $A sep`), `ByteLevel` (offsets only: no ids) and `Sequence`.
//! Only single sequences are encoded here; pair templates are kept for writing back.

use serde_json::{json, Value};

use super::pretokenize::{type_of, unsupported};
use crate::error::{Result, RuntimeError};

/// One item of a template: the sequence or a named special token.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum TemplatePiece {
    Sequence { id: String, type_id: u64 },
    Special { id: String, type_id: u64 },
}

/// A template's named special token: the ids it expands to.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct TemplateSpecial {
    pub name: String,
    pub ids: Vec<u32>,
    pub tokens: Vec<String>,
}

#[derive(Clone, Debug)]
pub(crate) enum PostProcessor {
    Template {
        single: Vec<TemplatePiece>,
        pair: Vec<TemplatePiece>,
        specials: Vec<TemplateSpecial>,
    },
    /// `cls $A sep`, for both Roberta and Bert; the JSON form is kept to write it back.
    ClsSep {
        cls: u32,
        sep: u32,
        json: Value,
    },
    ByteLevel {
        json: Value,
    },
    Sequence(Vec<PostProcessor>),
}

fn bad(msg: String) -> RuntimeError {
    RuntimeError::Tokenizer(msg)
}

impl PostProcessor {
    /// A template that puts `bos` before and/or `eos` after the sequence, as LLaMA's
    /// tokenizer.json does for `add_bos_token` / `add_eos_token`.
    pub fn bos_eos(bos: Option<(u32, &str)>, eos: Option<(u32, &str)>) -> PostProcessor {
        let mut single = Vec::new();
        let mut pair = Vec::new();
        let mut specials = Vec::new();
        let special = |name: &str, type_id| TemplatePiece::Special {
            id: name.to_owned(),
            type_id,
        };
        let seq = |id: &str, type_id| TemplatePiece::Sequence {
            id: id.to_owned(),
            type_id,
        };
        if let Some((id, name)) = bos {
            single.push(special(name, 0));
            specials.push(TemplateSpecial {
                name: name.to_owned(),
                ids: vec![id],
                tokens: vec![name.to_owned()],
            });
        }
        single.push(seq("A", 0));
        if let Some((id, name)) = eos {
            single.push(special(name, 0));
            if specials.iter().all(|s| s.name != name) {
                specials.push(TemplateSpecial {
                    name: name.to_owned(),
                    ids: vec![id],
                    tokens: vec![name.to_owned()],
                });
            }
        }
        for (seq_id, type_id) in [("A", 0), ("B", 1)] {
            if let Some((_, name)) = bos {
                pair.push(special(name, type_id));
            }
            pair.push(seq(seq_id, type_id));
            if let Some((_, name)) = eos {
                pair.push(special(name, type_id));
            }
        }
        PostProcessor::Template {
            single,
            pair,
            specials,
        }
    }

    /// `ids` with the special tokens of a single-sequence encoding added.
    pub fn process(&self, ids: Vec<u32>) -> Vec<u32> {
        match self {
            PostProcessor::Template {
                single, specials, ..
            } => {
                let mut out = Vec::with_capacity(ids.len() + 2);
                for piece in single {
                    match piece {
                        TemplatePiece::Sequence { .. } => out.extend_from_slice(&ids),
                        TemplatePiece::Special { id, .. } => {
                            if let Some(s) = specials.iter().find(|s| &s.name == id) {
                                out.extend_from_slice(&s.ids);
                            }
                        }
                    }
                }
                out
            }
            PostProcessor::ClsSep { cls, sep, .. } => {
                let mut out = Vec::with_capacity(ids.len() + 2);
                out.push(*cls);
                out.extend_from_slice(&ids);
                out.push(*sep);
                out
            }
            PostProcessor::ByteLevel { .. } => ids,
            PostProcessor::Sequence(steps) => steps.iter().fold(ids, |ids, p| p.process(ids)),
        }
    }

    /// The special tokens that the single template puts before and after the sequence.
    pub fn template_specials(&self) -> (Vec<u32>, Vec<u32>) {
        match self {
            PostProcessor::Template {
                single, specials, ..
            } => {
                let mut before = Vec::new();
                let mut after = Vec::new();
                let mut seen_sequence = false;
                for piece in single {
                    match piece {
                        TemplatePiece::Sequence { .. } => seen_sequence = true,
                        TemplatePiece::Special { id, .. } => {
                            let ids = specials
                                .iter()
                                .find(|s| &s.name == id)
                                .map(|s| s.ids.clone())
                                .unwrap_or_default();
                            if seen_sequence {
                                after.extend(ids)
                            } else {
                                before.extend(ids)
                            }
                        }
                    }
                }
                (before, after)
            }
            PostProcessor::ClsSep { cls, sep, .. } => (vec![*cls], vec![*sep]),
            PostProcessor::ByteLevel { .. } => (vec![], vec![]),
            PostProcessor::Sequence(steps) => {
                let mut before = Vec::new();
                let mut after = Vec::new();
                for s in steps {
                    let (b, a) = s.template_specials();
                    before.splice(0..0, b);
                    after.extend(a);
                }
                (before, after)
            }
        }
    }

    pub fn from_json(v: &Value) -> Result<PostProcessor> {
        let ty = type_of(v, "post_processor")?;
        Ok(match ty {
            "TemplateProcessing" => {
                let single = parse_template(v.get("single"), "single")?;
                let pair = match v.get("pair") {
                    Some(p) if !p.is_null() => parse_template(Some(p), "pair")?,
                    _ => Vec::new(),
                };
                let specials = parse_specials(v.get("special_tokens"))?;
                for piece in single.iter().chain(&pair) {
                    if let TemplatePiece::Special { id, .. } = piece {
                        if specials.iter().all(|s| &s.name != id) {
                            return Err(bad(format!(
                                "TemplateProcessing uses special token {id:?} without defining it"
                            )));
                        }
                    }
                }
                PostProcessor::Template {
                    single,
                    pair,
                    specials,
                }
            }
            "RobertaProcessing" | "BertProcessing" => {
                let pair_id = |key: &str| {
                    v.get(key)
                        .and_then(Value::as_array)
                        .and_then(|a| a.get(1))
                        .and_then(Value::as_u64)
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| bad(format!("{ty} needs \"{key}\": [token, id]")))
                };
                PostProcessor::ClsSep {
                    cls: pair_id("cls")?,
                    sep: pair_id("sep")?,
                    json: v.clone(),
                }
            }
            "ByteLevel" => PostProcessor::ByteLevel { json: v.clone() },
            "Sequence" => {
                let list = v
                    .get("processors")
                    .and_then(Value::as_array)
                    .ok_or_else(|| {
                        bad("post_processor Sequence needs a \"processors\" list".into())
                    })?;
                PostProcessor::Sequence(
                    list.iter()
                        .map(PostProcessor::from_json)
                        .collect::<Result<_>>()?,
                )
            }
            other => return Err(unsupported("post_processor", other)),
        })
    }

    pub fn to_json(&self) -> Value {
        match self {
            PostProcessor::Template {
                single,
                pair,
                specials,
            } => {
                let pieces = |list: &[TemplatePiece]| {
                    list.iter()
                        .map(|p| match p {
                            TemplatePiece::Sequence { id, type_id } => {
                                json!({ "Sequence": { "id": id, "type_id": type_id } })
                            }
                            TemplatePiece::Special { id, type_id } => {
                                json!({ "SpecialToken": { "id": id, "type_id": type_id } })
                            }
                        })
                        .collect::<Vec<_>>()
                };
                let specials: serde_json::Map<String, Value> = specials
                    .iter()
                    .map(|s| {
                        (
                            s.name.clone(),
                            json!({ "id": s.name, "ids": s.ids, "tokens": s.tokens }),
                        )
                    })
                    .collect();
                json!({ "type": "TemplateProcessing", "single": pieces(single), "pair": pieces(pair), "special_tokens": specials })
            }
            PostProcessor::ClsSep { json, .. } | PostProcessor::ByteLevel { json } => json.clone(),
            PostProcessor::Sequence(steps) => {
                json!({ "type": "Sequence", "processors": steps.iter().map(PostProcessor::to_json).collect::<Vec<_>>() })
            }
        }
    }
}

fn parse_template(v: Option<&Value>, what: &str) -> Result<Vec<TemplatePiece>> {
    let list = v
        .and_then(Value::as_array)
        .ok_or_else(|| bad(format!("TemplateProcessing needs a \"{what}\" list")))?;
    list.iter()
        .map(|item| {
            let field = |inner: &Value| -> Result<(String, u64)> {
                let id = inner
                    .get("id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad(format!("template piece without an id: {item}")))?;
                Ok((
                    id.to_owned(),
                    inner.get("type_id").and_then(Value::as_u64).unwrap_or(0),
                ))
            };
            if let Some(inner) = item.get("Sequence") {
                let (id, type_id) = field(inner)?;
                Ok(TemplatePiece::Sequence { id, type_id })
            } else if let Some(inner) = item.get("SpecialToken") {
                let (id, type_id) = field(inner)?;
                Ok(TemplatePiece::Special { id, type_id })
            } else {
                Err(bad(format!(
                    "template piece must be Sequence or SpecialToken: {item}"
                )))
            }
        })
        .collect()
}

fn parse_specials(v: Option<&Value>) -> Result<Vec<TemplateSpecial>> {
    let Some(map) = v.and_then(Value::as_object) else {
        return Ok(Vec::new());
    };
    map.iter()
        .map(|(name, s)| {
            let ids = s
                .get("ids")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
                        .collect::<Option<Vec<u32>>>()
                })
                .unwrap_or(None)
                .ok_or_else(|| {
                    bad(format!(
                        "template special token {name:?} needs \"ids\": [u32, …]"
                    ))
                })?;
            let tokens = s
                .get("tokens")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            let name = s
                .get("id")
                .and_then(Value::as_str)
                .unwrap_or(name)
                .to_owned();
            Ok(TemplateSpecial { name, ids, tokens })
        })
        .collect()
}
