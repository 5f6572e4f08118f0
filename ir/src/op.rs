//! The operations of the IR. Primitives are few and each has one meaning, defined by the
//! reference interpreter (`interp.rs`); type rules are in `infer.rs`.
//!
//! Ops whose result type cannot be derived from their operands (`input`, `param`, `const`,
//! `iota`, `reshape`, `broadcast`, `cast`) take it from the node's declared type.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum UnaryOp {
    Neg,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Recip,
    Sigmoid,
    Tanh,
    Sin,
    Cos,
    Abs,
    /// `x * sigmoid(x)` (introduced by fusion; also writable directly).
    Silu,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
    Pow,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CompareOp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReduceOp {
    Sum,
    Max,
    Mean,
}

/// An operation. Operands are the node's `inputs`, in the order documented per variant.
#[derive(Clone, Debug)]
pub enum Op {
    /// A runtime input (token ids, positions, KV cache), bound by name when the graph runs.
    Input { name: String },
    /// A model parameter, named by its Hugging Face checkpoint name.
    Param { name: String },
    /// Every element equals `value` (converted to the declared dtype; `-inf` allowed).
    Constant { value: f64 },
    /// Element at index `i` equals `i[axis]` (in the declared dtype).
    Iota { axis: usize },
    /// Elementwise `f(x)`.
    Unary(UnaryOp),
    /// Elementwise `f(a, b)`; operands have equal shapes and dtypes (broadcast explicitly).
    Binary(BinaryOp),
    /// Elementwise comparison of equal-shaped operands; result `bool`.
    Compare(CompareOp),
    /// `select(c, a, b)[i] = if c[i] { a[i] } else { b[i] }`.
    Select,
    /// Reduces `axis`, keeping it with size 1. `mean` divides the sum by the axis length.
    Reduce { op: ReduceOp, axis: usize },
    /// `[..., M, K] x [..., K, N] -> [..., M, N]`; batch dims equal, or the right operand is
    /// rank 2 and shared by every batch. Accumulates in f64 in the interpreter.
    MatMul,
    /// Same elements in row-major order, declared shape.
    Reshape,
    /// `out.dims[i] = in.dims[perm[i]]`.
    Permute { perm: Vec<usize> },
    /// Same rank; each input dim equals the output dim or is 1 (then repeated).
    Broadcast,
    /// `out = in[.., start..end, ..]` along `axis` (constant bounds).
    Slice {
        axis: usize,
        start: usize,
        end: usize,
    },
    /// Concatenation of all operands along `axis`; other dims equal.
    Concat { axis: usize },
    /// `gather(table, idx)`: `out[i.., j, k..] = table[i.., idx[j], k..]` with `j` the index
    /// dims replacing table dim `axis`. An index outside the table is an error.
    Gather { axis: usize },
    /// `scatter_add(idx, src)`, the adjoint of `gather` on axis 0: `out[v, k..] = Σ src[j.., k..]`
    /// over the index positions `j` with `idx[j] == v`, zero where no index points; the
    /// result type `[V, k..]` is declared. An index outside `0..V` is an error.
    ScatterAdd,
    /// The operand unchanged; reverse-mode differentiation treats it as a constant (no
    /// gradient flows through it), as `max` in a stable log-sum-exp needs none.
    StopGradient,
    /// Conversion to the declared dtype (floats round to nearest even; float→int truncates).
    Cast,

    // ---- Fused ops, introduced by the e-graph passes. Each equals the spelled-out form
    // ---- the interpreter would compute from primitives (up to rounding).
    /// `exp(x - max x) / Σ exp(x - max x)` along `axis`.
    Softmax { axis: usize },
    /// `rms_norm(x, w) = w * (x * rsqrt(mean(x², last axis) + eps))`; `w` has the last dim of `x`.
    RmsNorm { eps: f64 },
    /// `matmul(rms_norm(x, w), W)`, `W: [K, N]` shared by every batch.
    RmsNormMatMul { eps: f64 },
    /// `swiglu(g, u) = silu(g) * u`, elementwise.
    SwiGlu,
    /// Causal grouped-query attention `(q [B,H,T,D], k [B,Hkv,S,D], v [B,Hkv,S,Dv],
    /// positions i64[B,T]) -> [B,H,T,Dv]`: query head `h` uses KV head `h / (H/Hkv)`;
    /// key `j` is visible to query `t` iff `j <= positions[b,t]`;
    /// `out = softmax(scale · q·kᵀ over visible keys) · v`.
    FusedAttention { scale: f64 },

    // ---- Attention's backward, introduced by `autodiff` (FlashAttention-2's: the
    // ---- probabilities are recomputed block by block, never stored).
    /// `(q, k, positions) -> f32[B,H,T]`: each query row's log-sum-exp of its scaled visible
    /// scores, `lse = log Σ_{j visible} exp(scale · q·k_j)` (`-inf` with no visible key).
    AttentionLse { scale: f64 },
    /// `(q, k, v, positions, dout [B,H,T,Dv], lse, delta)`, `lse` and `delta` f32 `[B,H,T]`
    /// (`delta = Σ_c dout·out`, the rows of `dout` dotted with attention's output): the
    /// gradient of `fused_attention` with respect to `wrt`. With `p_ij = exp(scale · q_i·k_j
    /// − lse_i)` on visible keys (0 elsewhere) and `ds_ij = p_ij (dout_i·v_j − delta_i)`:
    /// `dq_i = scale Σ_j ds_ij k_j`, `dk_j = scale Σ_i ds_ij q_i`, `dv_j = Σ_i p_ij dout_i`
    /// (for keys and values, `i` over the query rows of every head that reads KV head `j`'s).
    AttentionGrad { scale: f64, wrt: AttnGrad },
}

/// Which operand of `fused_attention` an `attention_grad` differentiates with respect to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AttnGrad {
    Q,
    K,
    V,
}

// `Constant` holds an f64, so equality and hashing compare its bits: two constants are the
// same op iff they print the same (NaN equals NaN, 0.0 differs from -0.0).
impl PartialEq for Op {
    fn eq(&self, other: &Op) -> bool {
        match (self, other) {
            (Op::Constant { value: a }, Op::Constant { value: b }) => a.to_bits() == b.to_bits(),
            (Op::Input { name: a }, Op::Input { name: b })
            | (Op::Param { name: a }, Op::Param { name: b }) => a == b,
            (Op::Iota { axis: a }, Op::Iota { axis: b })
            | (Op::Concat { axis: a }, Op::Concat { axis: b }) => a == b,
            (Op::Gather { axis: a }, Op::Gather { axis: b }) => a == b,
            (Op::Unary(a), Op::Unary(b)) => a == b,
            (Op::Binary(a), Op::Binary(b)) => a == b,
            (Op::Compare(a), Op::Compare(b)) => a == b,
            (Op::Reduce { op: a, axis: x }, Op::Reduce { op: b, axis: y }) => a == b && x == y,
            (Op::Permute { perm: a }, Op::Permute { perm: b }) => a == b,
            (
                Op::Slice {
                    axis: a,
                    start: s1,
                    end: e1,
                },
                Op::Slice {
                    axis: b,
                    start: s2,
                    end: e2,
                },
            ) => (a, s1, e1) == (b, s2, e2),
            (Op::Select, Op::Select) | (Op::MatMul, Op::MatMul) | (Op::Reshape, Op::Reshape) => {
                true
            }
            (Op::Broadcast, Op::Broadcast) | (Op::Cast, Op::Cast) | (Op::SwiGlu, Op::SwiGlu) => {
                true
            }
            (Op::ScatterAdd, Op::ScatterAdd) | (Op::StopGradient, Op::StopGradient) => true,
            (Op::Softmax { axis: a }, Op::Softmax { axis: b }) => a == b,
            (Op::RmsNorm { eps: a }, Op::RmsNorm { eps: b })
            | (Op::RmsNormMatMul { eps: a }, Op::RmsNormMatMul { eps: b }) => {
                a.to_bits() == b.to_bits()
            }
            (Op::FusedAttention { scale: a }, Op::FusedAttention { scale: b })
            | (Op::AttentionLse { scale: a }, Op::AttentionLse { scale: b }) => {
                a.to_bits() == b.to_bits()
            }
            (Op::AttentionGrad { scale: a, wrt: x }, Op::AttentionGrad { scale: b, wrt: y }) => {
                a.to_bits() == b.to_bits() && x == y
            }
            _ => false,
        }
    }
}

impl Eq for Op {}

impl Op {
    /// Attributes as numbers, for a total order (f64s by their bits).
    fn attr_key(&self) -> Vec<u64> {
        match self {
            Op::Constant { value }
            | Op::RmsNorm { eps: value }
            | Op::RmsNormMatMul { eps: value }
            | Op::FusedAttention { scale: value }
            | Op::AttentionLse { scale: value }
            | Op::AttentionGrad { scale: value, .. } => {
                vec![value.to_bits()]
            }
            Op::Iota { axis }
            | Op::Concat { axis }
            | Op::Gather { axis }
            | Op::Softmax { axis }
            | Op::Reduce { axis, .. } => vec![*axis as u64],
            Op::Permute { perm } => perm.iter().map(|&p| p as u64).collect(),
            Op::Slice { axis, start, end } => vec![*axis as u64, *start as u64, *end as u64],
            _ => vec![],
        }
    }
}

impl PartialOrd for Op {
    fn partial_cmp(&self, other: &Op) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// A total order (by name, then attributes, then input/param name), as e-graph nodes need.
impl Ord for Op {
    fn cmp(&self, other: &Op) -> std::cmp::Ordering {
        let label = |o: &Op| match o {
            Op::Input { name } | Op::Param { name } => name.clone(),
            _ => String::new(),
        };
        (self.name(), self.attr_key(), label(self)).cmp(&(
            other.name(),
            other.attr_key(),
            label(other),
        ))
    }
}

impl std::hash::Hash for Op {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        std::mem::discriminant(self).hash(h);
        match self {
            Op::Input { name } | Op::Param { name } => name.hash(h),
            Op::Constant { value }
            | Op::RmsNorm { eps: value }
            | Op::RmsNormMatMul { eps: value }
            | Op::FusedAttention { scale: value }
            | Op::AttentionLse { scale: value } => value.to_bits().hash(h),
            Op::AttentionGrad { scale, wrt } => (scale.to_bits(), wrt).hash(h),
            Op::Iota { axis }
            | Op::Concat { axis }
            | Op::Gather { axis }
            | Op::Softmax { axis } => axis.hash(h),
            Op::Unary(u) => u.hash(h),
            Op::Binary(b) => b.hash(h),
            Op::Compare(c) => c.hash(h),
            Op::Reduce { op, axis } => (op, axis).hash(h),
            Op::Permute { perm } => perm.hash(h),
            Op::Slice { axis, start, end } => (axis, start, end).hash(h),
            Op::Select
            | Op::MatMul
            | Op::Reshape
            | Op::Broadcast
            | Op::Cast
            | Op::SwiGlu
            | Op::ScatterAdd
            | Op::StopGradient => {}
        }
    }
}

impl Op {
    /// The op's name in the text format and in statistics.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Param { .. } => "param",
            Op::Constant { .. } => "const",
            Op::Iota { .. } => "iota",
            Op::Unary(u) => u.name(),
            Op::Binary(b) => b.name(),
            Op::Compare(c) => c.name(),
            Op::Select => "select",
            Op::Reduce { op, .. } => op.name(),
            Op::MatMul => "matmul",
            Op::Reshape => "reshape",
            Op::Permute { .. } => "permute",
            Op::Broadcast => "broadcast",
            Op::Slice { .. } => "slice",
            Op::Concat { .. } => "concat",
            Op::Gather { .. } => "gather",
            Op::ScatterAdd => "scatter_add",
            Op::StopGradient => "stop_gradient",
            Op::Cast => "cast",
            Op::Softmax { .. } => "softmax",
            Op::RmsNorm { .. } => "rms_norm",
            Op::RmsNormMatMul { .. } => "rms_norm_matmul",
            Op::SwiGlu => "swiglu",
            Op::FusedAttention { .. } => "fused_attention",
            Op::AttentionLse { .. } => "attention_lse",
            Op::AttentionGrad { wrt, .. } => match wrt {
                AttnGrad::Q => "attention_grad_q",
                AttnGrad::K => "attention_grad_k",
                AttnGrad::V => "attention_grad_v",
            },
        }
    }

    /// Number of operands, or `None` for variadic ops (`concat`: at least one).
    pub fn arity(&self) -> Option<usize> {
        Some(match self {
            Op::Input { .. } | Op::Param { .. } | Op::Constant { .. } | Op::Iota { .. } => 0,
            Op::Unary(_) | Op::Reduce { .. } | Op::Reshape | Op::Permute { .. } | Op::Broadcast => {
                1
            }
            Op::Slice { .. } | Op::Cast | Op::Softmax { .. } | Op::StopGradient => 1,
            Op::Binary(_)
            | Op::Compare(_)
            | Op::MatMul
            | Op::Gather { .. }
            | Op::ScatterAdd
            | Op::RmsNorm { .. }
            | Op::SwiGlu => 2,
            Op::Select | Op::RmsNormMatMul { .. } | Op::AttentionLse { .. } => 3,
            Op::FusedAttention { .. } => 4,
            Op::AttentionGrad { .. } => 7,
            Op::Concat { .. } => return None,
        })
    }

    /// Whether the result type is taken from the node's declaration rather than inferred.
    /// Whether this is one of the fused ops the optimizer introduces.
    pub fn is_fused(&self) -> bool {
        matches!(
            self,
            Op::Softmax { .. }
                | Op::RmsNorm { .. }
                | Op::RmsNormMatMul { .. }
                | Op::SwiGlu
                | Op::FusedAttention { .. }
                | Op::Unary(UnaryOp::Silu)
        )
    }

    pub fn declares_type(&self) -> bool {
        matches!(
            self,
            Op::Input { .. }
                | Op::Param { .. }
                | Op::Constant { .. }
                | Op::Iota { .. }
                | Op::Reshape
                | Op::Broadcast
                | Op::Cast
                | Op::ScatterAdd
        )
    }
}

macro_rules! named_enum {
    ($ty:ident { $($variant:ident => $name:literal),* $(,)? }) => {
        impl $ty {
            pub const ALL: &'static [$ty] = &[$($ty::$variant),*];
            pub fn name(self) -> &'static str {
                match self { $($ty::$variant => $name),* }
            }
            pub fn from_name(s: &str) -> Option<$ty> {
                match s { $($name => Some($ty::$variant),)* _ => None }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.name()) }
        }
    };
}

named_enum!(UnaryOp {
    Neg => "neg", Exp => "exp", Log => "log", Sqrt => "sqrt", Rsqrt => "rsqrt", Recip => "recip",
    Sigmoid => "sigmoid", Tanh => "tanh", Sin => "sin", Cos => "cos", Abs => "abs", Silu => "silu",
});
named_enum!(BinaryOp {
    Add => "add", Sub => "sub", Mul => "mul", Div => "div", Max => "max", Min => "min", Pow => "pow",
});
named_enum!(CompareOp { Lt => "lt", Le => "le", Gt => "gt", Ge => "ge", Eq => "eq", Ne => "ne" });
named_enum!(ReduceOp { Sum => "reduce_sum", Max => "reduce_max", Mean => "reduce_mean" });
