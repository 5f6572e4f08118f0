//! The roofline cost model extraction uses: a node costs a kernel launch plus the larger of
//! its memory time (bytes in and out over the target's bandwidth) and its compute time
//! (FLOPs over the target's peak). Views (`reshape`, `permute`, `broadcast`, `slice`),
//! constants, inputs and parameters cost nearly nothing: backends fold them into indexing.

use std::collections::HashMap;

use egret_ir::{AttnGrad, BinaryOp, CompareOp, Dim, Op, TensorType, UnaryOp};

/// Machine figures for the roofline. `cpu()` is this project's 2-core development machine
/// (measured: ~205 GFLOP/s sgemm, ~10 GB/s copy); `gpu()` an H100-class card.
#[derive(Clone, Debug, PartialEq)]
pub struct Target {
    pub name: &'static str,
    pub bytes_per_s: f64,
    pub flops_per_s: f64,
    pub launch_s: f64,
}

impl Target {
    pub fn cpu() -> Target {
        Target {
            name: "cpu",
            bytes_per_s: 10e9,
            flops_per_s: 200e9,
            launch_s: 2e-6,
        }
    }

    pub fn gpu() -> Target {
        Target {
            name: "gpu",
            bytes_per_s: 3e12,
            flops_per_s: 700e12,
            launch_s: 4e-6,
        }
    }
}

/// Values assumed for symbolic dims when costing: a decode-sized batch, a mid-length
/// sequence and cache. Costs only rank alternatives, so typical values suffice.
const TYPICAL_DIM: i64 = 256;
const TYPICAL_BATCH: i64 = 1;

/// Cost of views and leaves: tiny but positive, so fewer nodes win ties.
const VIEW_COST_S: f64 = 1e-12;

fn numel(t: &TensorType) -> f64 {
    let typical: HashMap<String, i64> = HashMap::new();
    t.shape
        .dims()
        .iter()
        .map(|d: &Dim| {
            let mut b = typical.clone();
            for s in d.symbols() {
                b.insert(
                    s.to_string(),
                    if s == "B" { TYPICAL_BATCH } else { TYPICAL_DIM },
                );
            }
            d.eval(&b).unwrap_or(TYPICAL_DIM).max(1) as f64
        })
        .product()
}

fn bytes(t: &TensorType) -> f64 {
    numel(t) * t.dtype.size_bytes() as f64
}

/// Seconds to compute `op` with operand types `ins` and result type `out` on `target`.
pub fn node_cost(target: &Target, op: &Op, ins: &[&TensorType], out: &TensorType) -> f64 {
    let io_bytes: f64 = ins.iter().map(|t| bytes(t)).sum::<f64>() + bytes(out);
    let n = numel(out);
    let flops = match op {
        Op::Input { .. }
        | Op::Param { .. }
        | Op::Constant { .. }
        | Op::Reshape
        | Op::Permute { .. }
        | Op::Broadcast
        | Op::Slice { .. } => {
            return VIEW_COST_S;
        }
        Op::MatMul => {
            let k = ins[0]
                .shape
                .dims()
                .last()
                .map(|d| numel(&TensorType::new(out.dtype, vec![d.clone()])))
                .unwrap_or(1.0);
            2.0 * n * k
        }
        Op::RmsNormMatMul { .. } => {
            let k = numel(&TensorType::new(
                out.dtype,
                vec![ins[0].shape.dims().last().cloned().unwrap_or(Dim::c(1))],
            ));
            2.0 * n * k + 3.0 * numel(ins[0])
        }
        Op::FusedAttention { .. } => {
            // Two matmuls over T×S scores per head plus the softmax.
            let d = numel(&TensorType::new(
                out.dtype,
                vec![ins[0].shape.dims()[3].clone()],
            ));
            let s = numel(&TensorType::new(
                out.dtype,
                vec![ins[1].shape.dims()[2].clone()],
            ));
            let tq = n / d.max(1.0);
            4.0 * tq * s * d + 5.0 * tq * s
        }
        Op::AttentionLse { .. } | Op::AttentionGrad { .. } => {
            // Per visible (row, key) pair: the score (2·d) and its exponential; the gradients
            // add `dout·v` (2·dv, not for `v`) and their own product (2·d or 2·dv).
            let dim = |t: &TensorType, i: usize| {
                numel(&TensorType::new(t.dtype, vec![t.shape.dims()[i].clone()]))
            };
            let (d, s) = (dim(ins[0], 3), dim(ins[1], 2));
            let tq = numel(ins[0]) / d.max(1.0);
            let per = match op {
                Op::AttentionGrad { wrt, .. } => {
                    let dv = dim(ins[2], 3);
                    match wrt {
                        AttnGrad::V => 2.0 * d + 2.0 * dv,
                        _ => 4.0 * d + 2.0 * dv,
                    }
                }
                _ => 2.0 * d,
            };
            tq * s * (per + 5.0)
        }
        Op::Softmax { .. } | Op::RmsNorm { .. } => 5.0 * n,
        Op::SwiGlu => 6.0 * n,
        Op::Unary(u) => unary_flops(*u) * n,
        // Division has a fraction of multiplication's throughput on every target.
        Op::Binary(BinaryOp::Div) => 4.0 * n,
        Op::Binary(BinaryOp::Pow) => 16.0 * n,
        // `le` is the canonical comparison; the others cost a hair more so ties go to it.
        Op::Compare(CompareOp::Le | CompareOp::Eq | CompareOp::Ne) => n,
        Op::Compare(_) => 1.01 * n,
        _ => n,
    };
    let (mem, compute) = (io_bytes / target.bytes_per_s, flops / target.flops_per_s);
    // Memory and compute overlap imperfectly: the smaller one still shows a little.
    target.launch_s + mem.max(compute) + OVERLAP_RESIDUE * mem.min(compute)
}

/// Fraction of the smaller of memory and compute time that overlap does not hide.
const OVERLAP_RESIDUE: f64 = 0.05;

/// Relative cost of a unary function in multiply-add units.
fn unary_flops(u: UnaryOp) -> f64 {
    match u {
        UnaryOp::Neg | UnaryOp::Abs => 1.0,
        UnaryOp::Rsqrt => 2.0,
        UnaryOp::Sqrt | UnaryOp::Recip => 4.0,
        UnaryOp::Exp | UnaryOp::Log | UnaryOp::Sigmoid | UnaryOp::Tanh => 8.0,
        UnaryOp::Silu => 9.0,
        UnaryOp::Sin | UnaryOp::Cos => 12.0,
    }
}
