//! The e-graph language, derived from `egret_ir::Op` in this one place: an e-node is an `Op`,
//! the declared type for ops that declare one, and child e-class ids. `TensorAnalysis`
//! gives every e-class its type (by the IR's own type rules) and, for splat constants, the
//! value, so rules can only fire where shapes and dtypes agree.
//!
//! Patterns are written as s-expressions of op names — `(matmul (softmax ?s) ?v)` — where a
//! named op matches that op with any attributes; rules read attributes from the matched
//! e-nodes.

use std::fmt;

use egg::{Analysis, DidMerge, EGraph, Id, Language};
use egret_ir::infer::infer_type;
use egret_ir::{AttnGrad, BinaryOp, CompareOp, Op, ReduceOp, TensorType, UnaryOp};

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ENode {
    pub op: Op,
    /// The result type, for ops whose type is declared rather than inferred.
    pub decl: Option<TensorType>,
    /// Pattern nodes only: match any e-node of the same op name and arity.
    pub wildcard: bool,
    pub children: Vec<Id>,
}

impl ENode {
    pub fn new(op: Op, decl: Option<TensorType>, children: Vec<Id>) -> ENode {
        let decl = if op.declares_type() { decl } else { None };
        ENode {
            op,
            decl,
            wildcard: false,
            children,
        }
    }
}

impl Language for ENode {
    type Discriminant = &'static str;

    fn discriminant(&self) -> &'static str {
        self.op.name()
    }

    fn matches(&self, other: &ENode) -> bool {
        self.op.name() == other.op.name()
            && self.children.len() == other.children.len()
            && (self.wildcard || other.wildcard || (self.op == other.op && self.decl == other.decl))
    }

    fn children(&self) -> &[Id] {
        &self.children
    }

    fn children_mut(&mut self) -> &mut [Id] {
        &mut self.children
    }
}

impl fmt::Display for ENode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.op.name())
    }
}

/// A representative op for each name, used to parse patterns (attributes are wildcards).
fn op_for_name(name: &str) -> Option<Op> {
    if let Some(u) = UnaryOp::from_name(name) {
        return Some(Op::Unary(u));
    }
    if let Some(b) = BinaryOp::from_name(name) {
        return Some(Op::Binary(b));
    }
    if let Some(c) = CompareOp::from_name(name) {
        return Some(Op::Compare(c));
    }
    if let Some(r) = ReduceOp::from_name(name) {
        return Some(Op::Reduce { op: r, axis: 0 });
    }
    Some(match name {
        "input" => Op::Input {
            name: String::new(),
        },
        "param" => Op::Param {
            name: String::new(),
        },
        "const" => Op::Constant { value: 0.0 },
        "iota" => Op::Iota { axis: 0 },
        "select" => Op::Select,
        "matmul" => Op::MatMul,
        "reshape" => Op::Reshape,
        "permute" => Op::Permute { perm: vec![] },
        "broadcast" => Op::Broadcast,
        "slice" => Op::Slice {
            axis: 0,
            start: 0,
            end: 0,
        },
        "concat" => Op::Concat { axis: 0 },
        "gather" => Op::Gather { axis: 0 },
        "scatter_add" => Op::ScatterAdd,
        "stop_gradient" => Op::StopGradient,
        "cast" => Op::Cast,
        "softmax" => Op::Softmax { axis: 0 },
        "rms_norm" => Op::RmsNorm { eps: 0.0 },
        "rms_norm_matmul" => Op::RmsNormMatMul { eps: 0.0 },
        "swiglu" => Op::SwiGlu,
        "fused_attention" => Op::FusedAttention { scale: 0.0 },
        "attention_lse" => Op::AttentionLse { scale: 0.0 },
        "attention_grad_q" => Op::AttentionGrad {
            scale: 0.0,
            wrt: AttnGrad::Q,
        },
        "attention_grad_k" => Op::AttentionGrad {
            scale: 0.0,
            wrt: AttnGrad::K,
        },
        "attention_grad_v" => Op::AttentionGrad {
            scale: 0.0,
            wrt: AttnGrad::V,
        },
        _ => return None,
    })
}

impl egg::FromOp for ENode {
    type Error = String;

    fn from_op(op: &str, children: Vec<Id>) -> Result<ENode, String> {
        let o = op_for_name(op).ok_or_else(|| format!("unknown op `{op}` in pattern"))?;
        Ok(ENode {
            op: o,
            decl: None,
            wildcard: true,
            children,
        })
    }
}

/// Per-class facts: the type, and the value if every element is the same constant.
#[derive(Clone, Debug, PartialEq)]
pub struct Info {
    pub ty: TensorType,
    pub konst: Option<f64>,
}

#[derive(Default)]
pub struct TensorAnalysis;

pub type EG = EGraph<ENode, TensorAnalysis>;

impl Analysis<ENode> for TensorAnalysis {
    type Data = Info;

    fn make(egraph: &mut EG, enode: &ENode) -> Info {
        let tys: Vec<&TensorType> = enode.children.iter().map(|c| &egraph[*c].data.ty).collect();
        let ty = infer_type(&enode.op, &tys, enode.decl.as_ref()).unwrap_or_else(|e| {
            panic!(
                "internal: an ill-typed {} entered the e-graph ({e}); rules must use add_typed",
                enode.op.name()
            )
        });
        let konst = match enode.op {
            Op::Constant { value } => Some(value),
            _ => None,
        };
        Info { ty, konst }
    }

    fn merge(&mut self, a: &mut Info, b: Info) -> DidMerge {
        debug_assert_eq!(a.ty, b.ty, "rules must preserve types");
        if a.konst.is_none() && b.konst.is_some() {
            a.konst = b.konst;
            return DidMerge(true, false);
        }
        DidMerge(false, a.konst != b.konst)
    }
}

/// Adds `op(children)` if it is well typed (returns `None` otherwise): the only way rules
/// add nodes, so the analysis never meets an ill-typed node.
pub fn add_typed(eg: &mut EG, op: Op, decl: Option<TensorType>, children: Vec<Id>) -> Option<Id> {
    let tys: Vec<&TensorType> = children.iter().map(|c| &eg[*c].data.ty).collect();
    infer_type(&op, &tys, decl.as_ref()).ok()?;
    Some(eg.add(ENode::new(op, decl, children)))
}
