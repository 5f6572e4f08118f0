//! Matmul merging, a graph-level rewrite run after extraction (it needs a whole-graph view
//! of sharing that extraction's per-class choice cannot see):
//!
//! ```text
//! merge-matmuls:          x @ A, x @ B              -> y = x @ concat(A, B); y[.., :nA], y[.., nA:]
//! merge-rms-norm-matmuls: rms_norm_matmul(x, w, A), rms_norm_matmul(x, w, B)
//!                                                   -> y = rms_norm_matmul(x, w, concat(A, B)); slices
//! ```
//! (Q/K/V projections; gate/up). Taken only where the roofline cost of the merged kernel is
//! below the separate ones'. Concatenating weights costs nothing at run time when the
//! weights depend only on parameters (backends precompute such values at load).

use std::collections::BTreeMap;

use egret_ir::{Dim, Graph, Op, TensorType, ValueId};

use crate::egraph::cost::{node_cost, Target};

/// Merges sibling matmuls; returns how many groups were merged.
pub fn merge_matmuls(g: &mut Graph, target: &Target) -> usize {
    // Values computed from parameters and constants only.
    let mut weight_only = vec![false; g.len()];
    for v in g.live_topo_order().unwrap_or_default() {
        let n = g.node(v);
        weight_only[v.index()] = match n.op {
            Op::Param { .. } | Op::Constant { .. } | Op::Iota { .. } => true,
            Op::Input { .. } => false,
            _ => n.inputs.iter().all(|u| weight_only[u.index()]),
        };
    }
    // Group by (op, shared operands).
    let mut groups: BTreeMap<(String, Vec<ValueId>), Vec<ValueId>> = BTreeMap::new();
    for v in g.live_topo_order().unwrap_or_default() {
        let n = g.node(v);
        let (key, shared) = match n.op {
            Op::MatMul => ("matmul".to_string(), n.inputs[..1].to_vec()),
            Op::RmsNormMatMul { eps } => (
                format!("rms_norm_matmul:{}", eps.to_bits()),
                n.inputs[..2].to_vec(),
            ),
            _ => continue,
        };
        let w = *n.inputs.last().expect("matmul has operands");
        let wt = g.ty(w);
        if wt.shape.rank() != 2 || wt.shape.dims()[1].as_const().is_none() {
            continue;
        }
        groups.entry((key, shared)).or_default().push(v);
    }
    let mut merged = 0;
    let mut replace: Vec<(ValueId, ValueId)> = Vec::new();
    for ((_, shared), members) in groups {
        if members.len() < 2 {
            continue;
        }
        let op = g.node(members[0]).op.clone();
        let ws: Vec<ValueId> = members
            .iter()
            .map(|m| *g.node(*m).inputs.last().expect("operands"))
            .collect();
        // Every weight must share K and dtype.
        let k = g.ty(ws[0]).shape.dims()[0].clone();
        if ws
            .iter()
            .any(|w| g.ty(*w).shape.dims()[0] != k || g.ty(*w).dtype != g.ty(ws[0]).dtype)
        {
            continue;
        }
        let ns: Vec<i64> = ws
            .iter()
            .map(|w| g.ty(*w).shape.dims()[1].as_const().expect("checked"))
            .collect();
        let total: i64 = ns.iter().sum();
        let separate: f64 = members
            .iter()
            .map(|m| {
                let n = g.node(*m);
                let ins: Vec<&TensorType> = n.inputs.iter().map(|u| g.ty(*u)).collect();
                node_cost(target, &n.op, &ins, &n.ty)
            })
            .sum();
        let wcat_ty = TensorType::new(g.ty(ws[0]).dtype, vec![k.clone(), Dim::c(total)]);
        let mut out_dims = g.ty(members[0]).shape.dims().to_vec();
        *out_dims.last_mut().expect("rank >= 2") = Dim::c(total);
        let out_ty = TensorType::new(g.ty(members[0]).dtype, out_dims);
        let mut ins: Vec<&TensorType> = shared.iter().map(|u| g.ty(*u)).collect();
        ins.push(&wcat_ty);
        let mut together = node_cost(target, &op, &ins, &out_ty);
        if !ws.iter().all(|w| weight_only[w.index()]) {
            together += node_cost(
                target,
                &Op::Concat { axis: 1 },
                &ws.iter().map(|w| g.ty(*w)).collect::<Vec<_>>(),
                &wcat_ty,
            );
        }
        if together >= separate {
            continue;
        }
        let Ok(wcat) = g.concat(&ws, 1) else { continue };
        let mut operands = shared.clone();
        operands.push(wcat);
        let Ok(y) = g.add(op.clone(), &operands, None) else {
            continue;
        };
        let axis = out_ty.shape.rank() - 1;
        let mut start = 0usize;
        for (m, n) in members.iter().zip(&ns) {
            let Ok(part) = g.slice(y, axis, start, start + *n as usize) else {
                break;
            };
            replace.push((*m, part));
            start += *n as usize;
        }
        merged += 1;
    }
    if !replace.is_empty() {
        let mut map: Vec<ValueId> = g.values().collect();
        for (old, new) in replace {
            map[old.index()] = new;
        }
        for n in &mut g.nodes {
            for u in &mut n.inputs {
                *u = map[u.index()];
            }
        }
        for (_, v) in &mut g.outputs {
            *v = map[v.index()];
        }
        // The merged nodes' own slices must still read the merged result, not themselves.
        let _ = g.compact();
    }
    merged
}
