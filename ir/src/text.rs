//! The IR's text format: `print` and `parse`, exact inverses of each other.
//!
//! ```text
//! graph prefill {
//!   %0 = input "tokens" : i64[B, T]
//!   %1 = param "model.embed_tokens.weight" : f32[49152, 576]
//!   %2 = gather[axis=0](%1, %0) : f32[B, T, 576]
//!   %3 = permute[perm=[1, 0]](%1) : f32[576, 49152]
//!   output "logits" = %2
//! }
//! ```
//! Every node carries its type; `;` starts a comment. Value names are any `%` followed by
//! letters, digits, `_` or `.`; they are renumbered densely on parse in definition order.
//! Parse errors give line and column.

use std::collections::HashMap;
use std::fmt::Write;

use crate::dtype::DType;
use crate::graph::{Graph, Node, TensorType, ValueId};
use crate::op::{AttnGrad, BinaryOp, CompareOp, Op, ReduceOp, UnaryOp};
use crate::shape::{Dim, Shape};

/// Prints the graph in the text format.
pub fn print(g: &Graph) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "graph {} {{", quote_if_needed(&g.name));
    for (i, n) in g.nodes.iter().enumerate() {
        let _ = writeln!(s, "  %{i} = {}", print_node(n));
    }
    for (name, v) in &g.outputs {
        let _ = writeln!(s, "  output {} = {v}", quote(name));
    }
    s.push_str("}\n");
    s
}

fn quote(s: &str) -> String {
    format!("{s:?}")
}

fn quote_if_needed(s: &str) -> String {
    if !s.is_empty()
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
    {
        s.to_string()
    } else {
        quote(s)
    }
}

fn print_f64(v: f64) -> String {
    if v.is_nan() {
        "nan".into()
    } else if v.is_infinite() {
        if v > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        }
    } else {
        format!("{v:?}")
    }
}

fn print_node(n: &Node) -> String {
    let mut s = String::from(n.op.name());
    match &n.op {
        Op::Input { name } | Op::Param { name } => {
            let _ = write!(s, " {}", quote(name));
        }
        Op::Constant { value } => {
            let _ = write!(s, "[value={}]", print_f64(*value));
        }
        Op::RmsNorm { eps } | Op::RmsNormMatMul { eps } => {
            let _ = write!(s, "[eps={}]", print_f64(*eps));
        }
        Op::FusedAttention { scale }
        | Op::AttentionLse { scale }
        | Op::AttentionGrad { scale, .. } => {
            let _ = write!(s, "[scale={}]", print_f64(*scale));
        }
        Op::Iota { axis }
        | Op::Reduce { axis, .. }
        | Op::Concat { axis }
        | Op::Gather { axis }
        | Op::Softmax { axis } => {
            let _ = write!(s, "[axis={axis}]");
        }
        Op::Permute { perm } => {
            let p: Vec<String> = perm.iter().map(|p| p.to_string()).collect();
            let _ = write!(s, "[perm=[{}]]", p.join(", "));
        }
        Op::Slice { axis, start, end } => {
            let _ = write!(s, "[axis={axis}, start={start}, end={end}]");
        }
        Op::Unary(_)
        | Op::Binary(_)
        | Op::Compare(_)
        | Op::Select
        | Op::MatMul
        | Op::Reshape
        | Op::Broadcast
        | Op::Cast
        | Op::SwiGlu
        | Op::ScatterAdd
        | Op::StopGradient => {}
    }
    if !n.inputs.is_empty() {
        let a: Vec<String> = n.inputs.iter().map(|v| v.to_string()).collect();
        let _ = write!(s, "({})", a.join(", "));
    }
    let _ = write!(s, " : {}", n.ty);
    s
}

/// A parse error with its 1-based position.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{line}:{col}: {msg}")]
pub struct ParseError {
    pub line: usize,
    pub col: usize,
    pub msg: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Value(String),
    Str(String),
    Num(String),
    Punct(char),
    Eof,
}

struct Lexer<'a> {
    chars: std::iter::Peekable<std::str::CharIndices<'a>>,
    line: usize,
    col: usize,
}

#[derive(Debug, Clone)]
struct Spanned {
    tok: Tok,
    line: usize,
    col: usize,
}

fn lex(src: &str) -> Result<Vec<Spanned>, ParseError> {
    let mut lx = Lexer {
        chars: src.char_indices().peekable(),
        line: 1,
        col: 1,
    };
    let mut out = Vec::new();
    loop {
        let (line, col) = (lx.line, lx.col);
        let Some(&(_, c)) = lx.chars.peek() else {
            out.push(Spanned {
                tok: Tok::Eof,
                line,
                col,
            });
            return Ok(out);
        };
        let err = |msg: String| ParseError { line, col, msg };
        if c == '\n' {
            lx.bump();
            continue;
        }
        if c.is_whitespace() {
            lx.bump();
            continue;
        }
        if c == ';' {
            while let Some(&(_, c)) = lx.chars.peek() {
                if c == '\n' {
                    break;
                }
                lx.bump();
            }
            continue;
        }
        let word = |lx: &mut Lexer, _first: bool| {
            let mut w = String::new();
            while let Some(&(_, c)) = lx.chars.peek() {
                if c.is_ascii_alphanumeric() || c == '_' || c == '.' {
                    w.push(c);
                    lx.bump();
                } else {
                    break;
                }
            }
            w
        };
        let tok = if c == '%' {
            lx.bump();
            let w = word(&mut lx, false);
            if w.is_empty() {
                return Err(err("expected a value name after `%`".into()));
            }
            Tok::Value(w)
        } else if c == '"' {
            lx.bump();
            let mut s = String::new();
            loop {
                match lx.bump() {
                    None | Some('\n') => return Err(err("unterminated string".into())),
                    Some('"') => break,
                    Some('\\') => match lx.bump() {
                        Some('"') => s.push('"'),
                        Some('\\') => s.push('\\'),
                        Some('n') => s.push('\n'),
                        Some('t') => s.push('\t'),
                        other => {
                            return Err(err(format!("unknown escape `\\{}`", other.unwrap_or(' '))))
                        }
                    },
                    Some(c) => s.push(c),
                }
            }
            Tok::Str(s)
        } else if c.is_ascii_digit()
            || (c == '-'
                && !matches!(
                    out.last(),
                    Some(Spanned {
                        tok: Tok::Ident(_) | Tok::Num(_),
                        ..
                    })
                ))
        {
            // A number: digits, '.', exponent; a leading '-' only where a value is expected.
            let mut s = String::new();
            if c == '-' {
                s.push('-');
                lx.bump();
                if let Some(&(_, 'i')) = lx.chars.peek() {
                    let w = word(&mut lx, false);
                    if w != "inf" {
                        return Err(err(format!("unexpected `-{w}`")));
                    }
                    out.push(Spanned {
                        tok: Tok::Num("-inf".into()),
                        line,
                        col,
                    });
                    continue;
                }
                if !matches!(lx.chars.peek(), Some(&(_, d)) if d.is_ascii_digit()) {
                    out.push(Spanned {
                        tok: Tok::Punct('-'),
                        line,
                        col,
                    });
                    continue;
                }
            }
            while let Some(&(_, d)) = lx.chars.peek() {
                let prev_e = s.ends_with('e') || s.ends_with('E');
                if d.is_ascii_digit()
                    || d == '.'
                    || d == 'e'
                    || d == 'E'
                    || (prev_e && (d == '-' || d == '+'))
                {
                    s.push(d);
                    lx.bump();
                } else {
                    break;
                }
            }
            Tok::Num(s)
        } else if c.is_ascii_alphabetic() || c == '_' {
            Tok::Ident(word(&mut lx, true))
        } else if "{}[]()=,:*+-".contains(c) {
            lx.bump();
            Tok::Punct(c)
        } else {
            return Err(err(format!("unexpected character `{c}`")));
        };
        out.push(Spanned { tok, line, col });
    }
}

impl Lexer<'_> {
    fn bump(&mut self) -> Option<char> {
        let (_, c) = self.chars.next()?;
        if c == '\n' {
            self.line += 1;
            self.col = 1;
        } else {
            self.col += 1;
        }
        Some(c)
    }
}

struct Parser {
    toks: Vec<Spanned>,
    pos: usize,
}

impl Parser {
    fn peek(&self) -> &Tok {
        &self.toks[self.pos].tok
    }

    fn err<T>(&self, msg: impl Into<String>) -> Result<T, ParseError> {
        let t = &self.toks[self.pos];
        Err(ParseError {
            line: t.line,
            col: t.col,
            msg: msg.into(),
        })
    }

    fn next(&mut self) -> Spanned {
        let t = self.toks[self.pos].clone();
        if self.pos + 1 < self.toks.len() {
            self.pos += 1;
        }
        t
    }

    fn expect(&mut self, c: char) -> Result<(), ParseError> {
        if *self.peek() == Tok::Punct(c) {
            self.next();
            Ok(())
        } else {
            self.err(format!("expected `{c}`, found {}", describe(self.peek())))
        }
    }

    fn eat(&mut self, c: char) -> bool {
        if *self.peek() == Tok::Punct(c) {
            self.next();
            true
        } else {
            false
        }
    }

    fn ident(&mut self) -> Result<String, ParseError> {
        match self.peek().clone() {
            Tok::Ident(s) => {
                self.next();
                Ok(s)
            }
            t => self.err(format!("expected a name, found {}", describe(&t))),
        }
    }

    fn string(&mut self) -> Result<String, ParseError> {
        match self.peek().clone() {
            Tok::Str(s) => {
                self.next();
                Ok(s)
            }
            t => self.err(format!("expected a quoted name, found {}", describe(&t))),
        }
    }

    fn usize(&mut self) -> Result<usize, ParseError> {
        match self.peek().clone() {
            Tok::Num(s) => match s.parse() {
                Ok(v) => {
                    self.next();
                    Ok(v)
                }
                Err(_) => self.err(format!("expected a non-negative integer, found `{s}`")),
            },
            t => self.err(format!("expected an integer, found {}", describe(&t))),
        }
    }

    fn f64(&mut self) -> Result<f64, ParseError> {
        match self.peek().clone() {
            Tok::Num(s) => {
                let v = if s == "-inf" {
                    Ok(f64::NEG_INFINITY)
                } else {
                    s.parse::<f64>()
                };
                match v {
                    Ok(v) => {
                        self.next();
                        Ok(v)
                    }
                    Err(_) => self.err(format!("bad number `{s}`")),
                }
            }
            Tok::Ident(s) if s == "inf" || s == "nan" => {
                self.next();
                Ok(if s == "inf" { f64::INFINITY } else { f64::NAN })
            }
            t => self.err(format!("expected a number, found {}", describe(&t))),
        }
    }

    fn dim(&mut self) -> Result<Dim, ParseError> {
        let mut total = Dim::c(0);
        let mut sign = 1i64;
        if self.eat('-') {
            sign = -1;
        }
        loop {
            let term = match self.peek().clone() {
                Tok::Num(s) => {
                    let k: i64 = match s.parse() {
                        Ok(k) => k,
                        Err(_) => return self.err(format!("bad dimension `{s}`")),
                    };
                    self.next();
                    if self.eat('*') {
                        Dim::sym(&self.ident()?).scale(k)
                    } else {
                        Dim::c(k)
                    }
                }
                Tok::Ident(s) => {
                    self.next();
                    Dim::sym(&s)
                }
                t => return self.err(format!("expected a dimension, found {}", describe(&t))),
            };
            total = total.add(&term.scale(sign));
            if self.eat('+') {
                sign = 1;
            } else if self.eat('-') {
                sign = -1;
            } else if let Tok::Num(s) = self.peek().clone() {
                // `P-1` lexes as `P` then the number `-1`.
                if let Some(rest) = s.strip_prefix('-') {
                    let _ = rest;
                    sign = 1;
                    continue;
                }
                break;
            } else {
                break;
            }
        }
        Ok(total)
    }

    fn ty(&mut self) -> Result<TensorType, ParseError> {
        let start = self.pos;
        let name = self.ident()?;
        let Some(dtype) = DType::from_name(&name) else {
            self.pos = start;
            return self.err(format!(
                "unknown dtype `{name}` (expected one of f32, f16, bf16, i32, i64, bool)"
            ));
        };
        self.expect('[')?;
        let mut dims = Vec::new();
        if !self.eat(']') {
            loop {
                let at = self.pos;
                let d = self.dim()?;
                if let Some(k) = d.as_const().filter(|k| *k < 0) {
                    self.pos = at;
                    return self.err(format!("dimension {k} is negative"));
                }
                dims.push(d);
                if self.eat(']') {
                    break;
                }
                self.expect(',')?;
            }
        }
        Ok(TensorType {
            dtype,
            shape: Shape(dims),
        })
    }
}

fn describe(t: &Tok) -> String {
    match t {
        Tok::Ident(s) => format!("`{s}`"),
        Tok::Value(s) => format!("`%{s}`"),
        Tok::Str(s) => format!("{s:?}"),
        Tok::Num(s) => format!("`{s}`"),
        Tok::Punct(c) => format!("`{c}`"),
        Tok::Eof => "end of input".into(),
    }
}

/// Attributes as written: `[key=value, ...]`.
#[derive(Default)]
struct Attrs {
    items: Vec<(String, AttrVal, usize, usize)>,
}

enum AttrVal {
    Num(f64, Option<usize>),
    List(Vec<usize>),
}

impl Parser {
    fn attrs(&mut self) -> Result<Attrs, ParseError> {
        let mut a = Attrs::default();
        if !self.eat('[') {
            return Ok(a);
        }
        loop {
            let (line, col) = (self.toks[self.pos].line, self.toks[self.pos].col);
            let key = self.ident()?;
            self.expect('=')?;
            let val = if self.eat('[') {
                let mut v = Vec::new();
                if !self.eat(']') {
                    loop {
                        v.push(self.usize()?);
                        if self.eat(']') {
                            break;
                        }
                        self.expect(',')?;
                    }
                }
                AttrVal::List(v)
            } else {
                let as_int = match self.peek() {
                    Tok::Num(s) => s.parse::<usize>().ok(),
                    _ => None,
                };
                AttrVal::Num(self.f64()?, as_int)
            };
            a.items.push((key, val, line, col));
            if self.eat(']') {
                break;
            }
            self.expect(',')?;
        }
        Ok(a)
    }
}

impl Attrs {
    fn take(&mut self, key: &str, at: (usize, usize)) -> Result<AttrVal, ParseError> {
        match self.items.iter().position(|(k, ..)| k == key) {
            Some(i) => Ok(self.items.remove(i).1),
            None => Err(ParseError {
                line: at.0,
                col: at.1,
                msg: format!("missing attribute `{key}`"),
            }),
        }
    }

    fn usize(&mut self, key: &str, at: (usize, usize)) -> Result<usize, ParseError> {
        match self.take(key, at)? {
            AttrVal::Num(_, Some(v)) => Ok(v),
            _ => Err(ParseError {
                line: at.0,
                col: at.1,
                msg: format!("attribute `{key}` must be a non-negative integer"),
            }),
        }
    }

    fn f64(&mut self, key: &str, at: (usize, usize)) -> Result<f64, ParseError> {
        match self.take(key, at)? {
            AttrVal::Num(v, _) => Ok(v),
            AttrVal::List(_) => Err(ParseError {
                line: at.0,
                col: at.1,
                msg: format!("attribute `{key}` must be a number"),
            }),
        }
    }

    fn finish(self) -> Result<(), ParseError> {
        match self.items.first() {
            Some((k, _, line, col)) => Err(ParseError {
                line: *line,
                col: *col,
                msg: format!("unknown attribute `{k}`"),
            }),
            None => Ok(()),
        }
    }
}

/// Parses the text format. The result is not verified: call `verify` for types and cycles.
pub fn parse(src: &str) -> Result<Graph, ParseError> {
    let mut p = Parser {
        toks: lex(src)?,
        pos: 0,
    };
    match p.ident() {
        Ok(kw) if kw == "graph" => {}
        _ => {
            p.pos = 0;
            return p.err("expected `graph NAME {`");
        }
    }
    let name = match p.peek().clone() {
        Tok::Ident(s) | Tok::Str(s) => {
            p.next();
            s
        }
        t => return p.err(format!("expected the graph's name, found {}", describe(&t))),
    };
    p.expect('{')?;
    let mut g = Graph::new(&name);
    let mut names: HashMap<String, ValueId> = HashMap::new();
    // Operand references, resolved once every definition is known (forward references are
    // legal text; the verifier reports any cycle they make).
    let mut refs: Vec<(usize, usize, String, usize, usize)> = Vec::new();
    let mut out_refs: Vec<(String, String, usize, usize)> = Vec::new();
    loop {
        let at = (p.toks[p.pos].line, p.toks[p.pos].col);
        match p.peek().clone() {
            Tok::Punct('}') => {
                p.next();
                break;
            }
            Tok::Ident(kw) if kw == "output" => {
                p.next();
                let oname = p.string()?;
                p.expect('=')?;
                let sp = p.next();
                match sp.tok {
                    Tok::Value(v) => out_refs.push((oname, v, sp.line, sp.col)),
                    t => {
                        return Err(ParseError {
                            line: sp.line,
                            col: sp.col,
                            msg: format!("expected a value, found {}", describe(&t)),
                        })
                    }
                }
            }
            Tok::Value(v) => {
                p.next();
                if names.contains_key(&v) {
                    return Err(ParseError {
                        line: at.0,
                        col: at.1,
                        msg: format!("%{v} is defined twice"),
                    });
                }
                p.expect('=')?;
                let op_at = (p.toks[p.pos].line, p.toks[p.pos].col);
                let opname = p.ident()?;
                let label = match opname.as_str() {
                    "input" | "param" => Some(p.string()?),
                    _ => None,
                };
                let mut attrs = p.attrs()?;
                let mut operands = Vec::new();
                if p.eat('(') {
                    if !p.eat(')') {
                        loop {
                            let sp = p.next();
                            match sp.tok {
                                Tok::Value(v) => operands.push((v, sp.line, sp.col)),
                                t => {
                                    return Err(ParseError {
                                        line: sp.line,
                                        col: sp.col,
                                        msg: format!(
                                            "expected an operand `%name`, found {}",
                                            describe(&t)
                                        ),
                                    })
                                }
                            }
                            if p.eat(')') {
                                break;
                            }
                            p.expect(',')?;
                        }
                    }
                }
                p.expect(':')?;
                let ty = p.ty()?;
                let op = build_op(&opname, label, &mut attrs, op_at)?;
                attrs.finish()?;
                let node_index = g.nodes.len();
                for (k, (name, line, col)) in operands.into_iter().enumerate() {
                    refs.push((node_index, k, name, line, col));
                }
                let arity = refs.iter().filter(|r| r.0 == node_index).count();
                let id = g.push(op, vec![ValueId(u32::MAX); arity], ty);
                names.insert(v, id);
            }
            t => {
                return p.err(format!(
                    "expected `%name = ...`, `output` or `}}`, found {}",
                    describe(&t)
                ))
            }
        }
    }
    if *p.peek() != Tok::Eof {
        return p.err(format!("unexpected {} after the graph", describe(p.peek())));
    }
    for (node, k, name, line, col) in refs {
        let Some(&id) = names.get(&name) else {
            return Err(ParseError {
                line,
                col,
                msg: format!("%{name} is not defined"),
            });
        };
        g.nodes[node].inputs[k] = id;
    }
    for (oname, name, line, col) in out_refs {
        let Some(&id) = names.get(&name) else {
            return Err(ParseError {
                line,
                col,
                msg: format!("%{name} is not defined"),
            });
        };
        g.output(&oname, id);
    }
    Ok(g)
}

fn build_op(
    name: &str,
    label: Option<String>,
    a: &mut Attrs,
    at: (usize, usize),
) -> Result<Op, ParseError> {
    if let Some(u) = UnaryOp::from_name(name) {
        return Ok(Op::Unary(u));
    }
    if let Some(b) = BinaryOp::from_name(name) {
        return Ok(Op::Binary(b));
    }
    if let Some(c) = CompareOp::from_name(name) {
        return Ok(Op::Compare(c));
    }
    if let Some(r) = ReduceOp::from_name(name) {
        return Ok(Op::Reduce {
            op: r,
            axis: a.usize("axis", at)?,
        });
    }
    Ok(match name {
        "input" => Op::Input {
            name: label.unwrap_or_default(),
        },
        "param" => Op::Param {
            name: label.unwrap_or_default(),
        },
        "const" => match a.take("value", at)? {
            AttrVal::Num(v, _) => Op::Constant { value: v },
            AttrVal::List(_) => {
                return Err(ParseError {
                    line: at.0,
                    col: at.1,
                    msg: "`value` must be a number".into(),
                })
            }
        },
        "iota" => Op::Iota {
            axis: a.usize("axis", at)?,
        },
        "select" => Op::Select,
        "matmul" => Op::MatMul,
        "reshape" => Op::Reshape,
        "broadcast" => Op::Broadcast,
        "cast" => Op::Cast,
        "permute" => match a.take("perm", at)? {
            AttrVal::List(perm) => Op::Permute { perm },
            AttrVal::Num(..) => {
                return Err(ParseError {
                    line: at.0,
                    col: at.1,
                    msg: "`perm` must be a list like [0, 2, 1]".into(),
                })
            }
        },
        "slice" => Op::Slice {
            axis: a.usize("axis", at)?,
            start: a.usize("start", at)?,
            end: a.usize("end", at)?,
        },
        "concat" => Op::Concat {
            axis: a.usize("axis", at)?,
        },
        "gather" => Op::Gather {
            axis: a.usize("axis", at)?,
        },
        "scatter_add" => Op::ScatterAdd,
        "stop_gradient" => Op::StopGradient,
        "softmax" => Op::Softmax {
            axis: a.usize("axis", at)?,
        },
        "swiglu" => Op::SwiGlu,
        "rms_norm" => Op::RmsNorm {
            eps: a.f64("eps", at)?,
        },
        "rms_norm_matmul" => Op::RmsNormMatMul {
            eps: a.f64("eps", at)?,
        },
        "fused_attention" => Op::FusedAttention {
            scale: a.f64("scale", at)?,
        },
        "attention_lse" => Op::AttentionLse {
            scale: a.f64("scale", at)?,
        },
        "attention_grad_q" | "attention_grad_k" | "attention_grad_v" => Op::AttentionGrad {
            scale: a.f64("scale", at)?,
            wrt: match name {
                "attention_grad_q" => AttnGrad::Q,
                "attention_grad_k" => AttnGrad::K,
                _ => AttnGrad::V,
            },
        },
        other => {
            return Err(ParseError {
                line: at.0,
                col: at.1,
                msg: format!("unknown op `{other}`"),
            })
        }
    })
}
