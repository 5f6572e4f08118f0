//! Checkpoint placement: which forward activations a training graph keeps for its backward
//! pass and which it recomputes there, so activations fit a memory budget.
//!
//! The forward part of a graph is what its `loss` output depends on; the rest is backward.
//! A *saved* value is a forward value some backward node reads. Recomputing a set `R` of
//! saved values (`recompute`) rewires the backward reads of each `v ∈ R` to a clone of `v`
//! computed from its operands (cloned in turn when they are in `R` too), so `v` dies at the
//! end of the forward pass and the clone lives only around its backward use.
//!
//! Peak memory is the real memory plan's: the graph is scheduled for the CPU backend and the
//! peak of live `Temp` bytes is taken over the kernel order (`Plan::peak_temp_bytes`),
//! excluding the outputs (gradients, updated parameters and optimizer state).
//!
//! `place(g, budget)`: saved values are ordered by recompute FLOPs per byte freed (cheap
//! elementwise results first, matmul outputs last) and the shortest prefix whose recompute
//! brings the peak under the budget is found by bisection on the prefix length. A budget
//! below the peak with every saved value recomputed is an error naming that minimum.

use std::collections::{HashMap, HashSet};

use egret_ir::{Dim, Graph, Op, ValueId};

use crate::llvm::kernel_buffers;
use crate::schedule::{schedule_with, ScheduleOptions};
use crate::BackendError;

fn err(msg: String) -> BackendError {
    BackendError::Unsupported(msg)
}

fn eval(d: &Dim, b: &HashMap<String, i64>) -> Result<u64, BackendError> {
    d.eval(b)
        .map(|v| v.max(0) as u64)
        .map_err(|e| err(format!("memory planning needs every dim bound: {e}")))
}

fn numel(g: &Graph, v: ValueId, b: &HashMap<String, i64>) -> Result<u64, BackendError> {
    g.shape(v).iter().map(|d| eval(d, b)).product()
}

/// FLOPs of computing `v` once: `2·M·N·K` per matmul, `4·B·H·T·S·D` per attention (`2·…`
/// for its log-sum-exp, `4·B·H·T·S·(D + Dv)` for a gradient), one per element otherwise
/// (views: none).
pub fn node_flops(g: &Graph, v: ValueId, b: &HashMap<String, i64>) -> Result<u64, BackendError> {
    let n = g.node(v);
    Ok(match &n.op {
        Op::MatMul | Op::RmsNormMatMul { .. } => {
            let a = g.shape(n.inputs[0]);
            let k = eval(&a[a.len() - 1], b)?;
            2 * numel(g, v, b)? * k
        }
        Op::FusedAttention { .. } => {
            let k = g.shape(n.inputs[1]);
            let (s, d) = (eval(&k[2], b)?, eval(&k[3], b)?);
            4 * numel(g, v, b)? / d.max(1) * s * d
        }
        Op::AttentionLse { .. } | Op::AttentionGrad { .. } => {
            let (q, k) = (g.shape(n.inputs[0]), g.shape(n.inputs[1]));
            let rows: u64 = q[..3]
                .iter()
                .map(|d| eval(d, b))
                .product::<Result<_, _>>()?;
            let (s, d) = (eval(&k[2], b)?, eval(&k[3], b)?);
            match n.op {
                Op::AttentionLse { .. } => 2 * rows * s * d,
                _ => {
                    let dv = eval(&g.shape(n.inputs[2])[3], b)?;
                    4 * rows * s * (d + dv)
                }
            }
        }
        Op::Input { .. }
        | Op::Param { .. }
        | Op::Constant { .. }
        | Op::Reshape
        | Op::Permute { .. }
        | Op::Broadcast
        | Op::Slice { .. } => 0,
        _ => numel(g, v, b)?,
    })
}

/// The forward part: every value the output `loss` depends on.
pub fn forward_set(g: &Graph) -> Result<Vec<bool>, BackendError> {
    let l = g
        .outputs
        .iter()
        .find(|(n, _)| n == "loss")
        .map(|(_, v)| *v)
        .ok_or_else(|| err("a training graph needs a `loss` output".into()))?;
    let mut fwd = vec![false; g.len()];
    let mut stack = vec![l];
    while let Some(v) = stack.pop() {
        if !std::mem::replace(&mut fwd[v.index()], true) {
            stack.extend(g.node(v).inputs.iter().copied());
        }
    }
    Ok(fwd)
}

/// Forward values read by backward nodes (parameters, inputs and constants excluded).
pub fn saved_values(g: &Graph) -> Result<Vec<ValueId>, BackendError> {
    let fwd = forward_set(g)?;
    let order = g
        .live_topo_order()
        .map_err(|v| err(format!("cycle at {v}")))?;
    let mut saved = vec![false; g.len()];
    for &v in &order {
        if fwd[v.index()] {
            continue;
        }
        for &u in &g.node(v).inputs {
            saved[u.index()] |= fwd[u.index()];
        }
    }
    Ok(order
        .into_iter()
        .filter(|v| {
            saved[v.index()]
                && !matches!(
                    g.node(*v).op,
                    Op::Param { .. } | Op::Input { .. } | Op::Constant { .. } | Op::Iota { .. }
                )
        })
        .collect())
}

/// `g` with the backward reads of every value in `drop` served by a recomputed clone. A clone
/// is computed from kept values only: its operands are the kept saved values, parameters,
/// inputs and constants as they are, and every other forward value cloned in turn (so no
/// forward temporary outlives the forward pass on a clone's account).
pub fn recompute(g: &Graph, drop: &HashSet<ValueId>) -> Result<Graph, BackendError> {
    if drop.is_empty() {
        return Ok(g.clone());
    }
    let fwd = forward_set(g)?;
    let saved: HashSet<ValueId> = saved_values(g)?.into_iter().collect();
    let kept = |u: ValueId| {
        !fwd[u.index()]
            || (saved.contains(&u) && !drop.contains(&u))
            || matches!(
                g.node(u).op,
                Op::Param { .. } | Op::Input { .. } | Op::Constant { .. } | Op::Iota { .. }
            )
    };
    let mut out = g.clone();
    let mut clones: HashMap<ValueId, ValueId> = HashMap::new();
    // Iterative post-order over the values to clone.
    let mut clone_of = |out: &mut Graph, v: ValueId| -> ValueId {
        let mut stack = vec![(v, false)];
        while let Some((u, ready)) = stack.pop() {
            if clones.contains_key(&u) {
                continue;
            }
            let n = g.node(u);
            if !ready {
                stack.push((u, true));
                for &w in &n.inputs {
                    if !kept(w) && !clones.contains_key(&w) {
                        stack.push((w, false));
                    }
                }
                continue;
            }
            let ins: Vec<ValueId> = n
                .inputs
                .iter()
                .map(|w| if kept(*w) { *w } else { clones[w] })
                .collect();
            let c = out.push(n.op.clone(), ins, n.ty.clone());
            clones.insert(u, c);
        }
        clones[&v]
    };
    for i in 0..g.len() {
        if fwd[i] {
            continue;
        }
        let ins = g.nodes[i].inputs.clone();
        let mut new = ins.clone();
        for (k, u) in ins.iter().enumerate() {
            if drop.contains(u) {
                new[k] = clone_of(&mut out, *u);
            }
        }
        if new != ins {
            out.nodes[i].inputs = new;
        }
    }
    Ok(out)
}

/// Peak activation bytes of `g`'s memory plan (outputs excluded) with dims bound by `b`.
pub fn peak_activation_bytes(g: &Graph, b: &HashMap<String, i64>) -> Result<u64, BackendError> {
    let prog = schedule_with(
        g,
        ScheduleOptions {
            deep_first: true,
            ..Default::default()
        },
    )?;
    let syms: Vec<i64> = prog
        .symbols
        .iter()
        .map(|s| {
            b.get(s)
                .copied()
                .ok_or_else(|| err(format!("memory planning needs a value for `{s}`")))
        })
        .collect::<Result<_, _>>()?;
    let plan = egret_runtime::plan::Plan {
        name: prog.name.clone(),
        symbols: prog.symbols.clone(),
        buffers: prog.buffers.clone(),
        kernels: prog
            .kernels
            .iter()
            .zip(&prog.init)
            .map(|(k, &init)| egret_runtime::plan::KernelCall {
                symbol: String::new(),
                args: kernel_buffers(k),
                init,
                scratch_floats: 0,
                what: String::new(),
                work: vec![],
                threads: vec![],
                shared_bytes: 0,
                tiles: vec![],
                light: None,
            })
            .collect(),
        outputs: prog.outputs.clone(),
        states: vec![],
    };
    let outs: HashSet<u32> = prog.outputs.iter().map(|(_, b)| *b).collect();
    Ok(plan.peak_temp_bytes(&syms, |b| outs.contains(&b)))
}

/// FLOPs of the whole graph (forward and backward, recomputation included).
pub fn total_flops(g: &Graph, b: &HashMap<String, i64>) -> Result<u64, BackendError> {
    let order = g
        .live_topo_order()
        .map_err(|v| err(format!("cycle at {v}")))?;
    order.iter().map(|&v| node_flops(g, v, b)).sum()
}

/// What a placement chose and what it costs.
#[derive(Clone, Debug, PartialEq)]
pub struct Placement {
    pub graph: Graph,
    pub peak_activation_bytes: u64,
    /// FLOPs recomputed over the FLOPs of forward + backward without recomputation.
    pub recompute_flops_ratio: f64,
    /// Saved values recomputed.
    pub recomputed: usize,
}

/// Evaluates recomputing `drop` in `g`.
pub fn evaluate(
    g: &Graph,
    drop: &HashSet<ValueId>,
    b: &HashMap<String, i64>,
) -> Result<Placement, BackendError> {
    evaluate_from(g, total_flops(g, b)?, drop, b)
}

/// `evaluate` with `g`'s own FLOPs already counted (`base`).
fn evaluate_from(
    g: &Graph,
    base: u64,
    drop: &HashSet<ValueId>,
    b: &HashMap<String, i64>,
) -> Result<Placement, BackendError> {
    let r = recompute(g, drop)?;
    let peak = peak_activation_bytes(&r, b)?;
    let extra = total_flops(&r, b)?.saturating_sub(base);
    Ok(Placement {
        graph: r,
        peak_activation_bytes: peak,
        recompute_flops_ratio: extra as f64 / base.max(1) as f64,
        recomputed: drop.len(),
    })
}

/// Chooses what to recompute so the peak fits `budget` bytes (see the module
/// documentation): first, with every layer input kept, the shortest prefix of the other saved
/// values (cheapest recompute per byte first) that fits, by bisection; if even recomputing all
/// of them does not fit, layer inputs are kept only every `k`-th layer, for the smallest `k`
/// that fits. Below every option's peak: an error naming the smallest peak found.
pub fn place(g: &Graph, budget: u64, b: &HashMap<String, i64>) -> Result<Placement, BackendError> {
    let base = total_flops(g, b)?;
    let eval = |drop: &HashSet<ValueId>| evaluate_from(g, base, drop, b);
    let none = eval(&HashSet::new())?;
    if none.peak_activation_bytes <= budget {
        return Ok(none);
    }
    let inputs = layer_inputs(g)?;
    let anchors: HashSet<ValueId> = inputs.iter().copied().collect();
    let mut cands: Vec<(f64, ValueId)> = saved_values(g)?
        .into_iter()
        .filter(|v| !anchors.contains(v))
        .map(|v| {
            let bytes = numel(g, v, b)? as f64 * 4.0;
            Ok((node_flops(g, v, b)? as f64 / bytes.max(1.0), v))
        })
        .collect::<Result<_, BackendError>>()?;
    cands.sort_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
    let prefix = |k: usize| -> HashSet<ValueId> { cands[..k].iter().map(|c| c.1).collect() };
    let all = eval(&prefix(cands.len()))?;
    let mut smallest = all.peak_activation_bytes.min(none.peak_activation_bytes);
    if all.peak_activation_bytes <= budget {
        let (mut lo, mut hi, mut best) = (0usize, cands.len(), all);
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            let p = eval(&prefix(mid))?;
            if p.peak_activation_bytes <= budget {
                hi = mid;
                best = p;
            } else {
                lo = mid;
            }
        }
        return Ok(best);
    }
    for every in 2..=inputs.len().max(2) {
        let p = eval(&layer_checkpoints(g, every)?)?;
        smallest = smallest.min(p.peak_activation_bytes);
        if p.peak_activation_bytes <= budget {
            return Ok(p);
        }
    }
    Err(err(format!(
        "--memory-budget {budget} is below the smallest activation peak checkpoint placement reaches here, {smallest} bytes"
    )))
}

/// Each layer's input in the forward pass: the embedding lookup, then every second residual
/// add (`[B, T, hidden]`; the first of each layer's two adds is the attention residual).
pub fn layer_inputs(g: &Graph) -> Result<Vec<ValueId>, BackendError> {
    let fwd = forward_set(g)?;
    let order = g
        .live_topo_order()
        .map_err(|v| err(format!("cycle at {v}")))?;
    let emb = order
        .iter()
        .copied()
        .find(|&v| fwd[v.index()] && matches!(g.node(v).op, Op::Gather { .. }))
        .ok_or_else(|| err("no embedding lookup in the forward pass".into()))?;
    let hidden = g.shape(emb).to_vec();
    let residual: Vec<ValueId> = order
        .iter()
        .copied()
        .filter(|&v| {
            fwd[v.index()]
                && matches!(g.node(v).op, Op::Binary(egret_ir::BinaryOp::Add))
                && g.shape(v) == hidden.as_slice()
        })
        .collect();
    let mut out = vec![emb];
    out.extend(residual.iter().skip(1).step_by(2).copied());
    Ok(out)
}

/// The classic baselines, for comparison: keep only each layer's input (`every = 1`), or
/// every `every`-th layer's (√n checkpointing), recomputing every other saved value.
pub fn layer_checkpoints(g: &Graph, every: usize) -> Result<HashSet<ValueId>, BackendError> {
    let keep: HashSet<ValueId> = layer_inputs(g)?
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % every.max(1) == 0)
        .map(|(_, v)| v)
        .collect();
    Ok(saved_values(g)?
        .into_iter()
        .filter(|v| !keep.contains(v))
        .collect())
}
