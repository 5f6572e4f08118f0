//! Reverse-mode automatic differentiation over the IR: `differentiate(g, "loss")` returns `g`
//! with, for every parameter `p`, an output `grad.<p>` holding `∂loss/∂p`.
//!
//! Fused ops are first expanded into the primitives that define them (`unfuse`), so every
//! op has one derivative rule, written once below; the fusion passes run on the result
//! re-fuse the forward part. Attention is the exception: it keeps its fused form and its
//! backward is FlashAttention-2's (`attention_lse`, `attention_grad_{q,k,v}`), which
//! recomputes the probabilities from `q` and `k` block by block instead of keeping them or
//! spelling out the `[T, S]` scores. Only values that depend on a parameter get adjoints
//! (masks, rotary tables and positions do not).
//!
//! Rules (`g` is the adjoint of the result `y`):
//! - `neg`: `-g`; `exp`: `g·y`; `log`: `g/x`; `sqrt`: `g·0.5/y`; `rsqrt`: `-0.5·g·y³`;
//!   `recip`: `-g·y²`; `sigmoid`: `g·y·(1-y)`; `tanh`: `g·(1-y²)`; `sin`: `g·cos x`;
//!   `cos`: `-g·sin x`; `abs`: `g·sign x`; `silu`: `g·s·(1 + x·(1-s))`, `s = sigmoid x`.
//! - `add`/`sub`: `g`, `±g`; `mul`: `g·b`, `g·a`; `div`: `g/b`, `-g·y/b`; `max`/`min`: `g`
//!   to the chosen operand (ties: the first); `pow`: `g·b·a^(b-1)`, `g·y·log a`.
//! - `select(c, a, b)`: `select(c, g, 0)`, `select(c, 0, g)`; `cast`: `g` cast back.
//! - `reduce sum/mean`: `g` broadcast back (÷ n for mean); `reduce max`: `g` where `x = y`.
//! - `matmul`: `g·bᵀ`, `aᵀ·g` (summed over the batch when `b` is shared).
//! - `reshape`, `permute`: the inverse view; `broadcast`: `g` summed over broadcast axes;
//!   `slice`: `g` padded with zeros; `concat`: slices of `g`.
//! - `stop_gradient`: none (its result is a constant to differentiation).
//! - `gather` (a table `[V, ..]` by ids on axis 0): `scatter_add(ids, g)`, each `g[j]` added
//!   to row `ids[j]`; `scatter_add(ids, x)`: `gather(g, ids)` for `x`.
//! - `fused_attention(q, k, v, pos) = y`: with `lse = attention_lse(q, k, pos)` and `delta =
//!   Σ_c g·y` over the last axis (f32), `attention_grad_{q,k,v}(q, k, v, pos, g, lse,
//!   delta)` (`Op::AttentionGrad` has the formulas).

use egret_ir::{
    AttnGrad, BinaryOp, CompareOp, DType, Dim, Graph, IrError, Op, ReduceOp, UnaryOp, ValueId,
};

type R<T> = Result<T, IrError>;

fn unsupported(msg: impl Into<String>) -> IrError {
    IrError::Build {
        op: "autodiff".into(),
        msg: msg.into(),
    }
}

/// `g` with each fused op but attention replaced by its primitive spelling (same outputs):
/// what `differentiate` differentiates.
pub fn unfuse(g: &Graph) -> R<Graph> {
    rewrite_fused(g, false)
}

/// `g` with every fused op replaced by its primitive spelling, attention's included (the
/// `[T, S]` scores, the causal mask, the softmax): the definition the fused forms and
/// attention's backward ops are checked against.
pub fn spell_out(g: &Graph) -> R<Graph> {
    rewrite_fused(g, true)
}

fn rewrite_fused(g: &Graph, attention_too: bool) -> R<Graph> {
    let mut out = Graph::new(&g.name);
    let mut map: Vec<Option<ValueId>> = vec![None; g.len()];
    let order = g
        .live_topo_order()
        .map_err(|v| unsupported(format!("cycle at {v}")))?;
    for v in order {
        let n = g.node(v);
        let ins: Vec<ValueId> = n
            .inputs
            .iter()
            .map(|i| map[i.index()].expect("topological order"))
            .collect();
        let new = match &n.op {
            Op::Softmax { axis } => softmax(&mut out, ins[0], *axis)?,
            Op::RmsNorm { eps } => rms_norm(&mut out, ins[0], ins[1], *eps)?,
            Op::RmsNormMatMul { eps } => {
                let x = rms_norm(&mut out, ins[0], ins[1], *eps)?;
                out.matmul(x, ins[2])?
            }
            Op::SwiGlu => {
                let s = out.unary(UnaryOp::Sigmoid, ins[0])?;
                let silu = out.binary(BinaryOp::Mul, ins[0], s)?;
                out.binary(BinaryOp::Mul, silu, ins[1])?
            }
            Op::Unary(UnaryOp::Silu) => {
                let s = out.unary(UnaryOp::Sigmoid, ins[0])?;
                out.binary(BinaryOp::Mul, ins[0], s)?
            }
            Op::FusedAttention { scale } if attention_too => attention(&mut out, &ins, *scale)?,
            op => out.push(op.clone(), ins, n.ty.clone()),
        };
        map[v.index()] = Some(new);
    }
    for (name, v) in &g.outputs {
        out.output(name, map[v.index()].expect("live"));
    }
    Ok(out)
}

/// `exp(x - max x) / Σ exp(x - max x)` along `axis`.
fn softmax(g: &mut Graph, x: ValueId, axis: usize) -> R<ValueId> {
    let shape = g.shape(x).to_vec();
    let m = g.reduce(ReduceOp::Max, x, axis)?;
    let m = g.broadcast(m, shape.clone())?;
    let d = g.binary(BinaryOp::Sub, x, m)?;
    let e = g.unary(UnaryOp::Exp, d)?;
    let s = g.reduce(ReduceOp::Sum, e, axis)?;
    let s = g.broadcast(s, shape)?;
    g.binary(BinaryOp::Div, e, s)
}

/// `w · x · rsqrt(mean(x², last axis) + eps)`.
fn rms_norm(g: &mut Graph, x: ValueId, w: ValueId, eps: f64) -> R<ValueId> {
    let shape = g.shape(x).to_vec();
    let last = shape.len() - 1;
    let sq = g.binary(BinaryOp::Mul, x, x)?;
    let ms = g.reduce(ReduceOp::Mean, sq, last)?;
    let e = g.constant_like(eps, ms);
    let ms = g.binary(BinaryOp::Add, ms, e)?;
    let r = g.unary(UnaryOp::Rsqrt, ms)?;
    let r = g.broadcast(r, shape.clone())?;
    let n = g.binary(BinaryOp::Mul, x, r)?;
    let w = g.broadcast_to(w, &shape)?;
    g.binary(BinaryOp::Mul, w, n)
}

/// `Op::FusedAttention` spelled out: query heads grouped by their KV head (`[B, Hkv,
/// rep·T, D]`), scores, the causal mask from `positions`, softmax, weighted values.
fn attention(g: &mut Graph, ins: &[ValueId], scale: f64) -> R<ValueId> {
    let (q, k, v, pos) = (ins[0], ins[1], ins[2], ins[3]);
    let qs = g.shape(q).to_vec();
    let ks = g.shape(k).to_vec();
    let vs = g.shape(v).to_vec();
    let (b, h, t, d) = (qs[0].clone(), &qs[1], qs[2].clone(), qs[3].clone());
    let (hkv, s, dv) = (ks[1].clone(), ks[2].clone(), vs[3].clone());
    let (Some(hn), Some(hkvn)) = (h.as_const(), hkv.as_const()) else {
        return Err(unsupported("attention needs constant head counts"));
    };
    let rep = hn / hkvn;
    let rt = t.scale(rep);
    let q4 = g.reshape(q, vec![b.clone(), hkv.clone(), rt.clone(), d])?;
    let kt = g.permute(k, vec![0, 1, 3, 2])?;
    let sc = g.matmul(q4, kt)?;
    let c = g.constant_like(scale, sc);
    let sc = g.binary(BinaryOp::Mul, sc, c)?;
    let grid = vec![b.clone(), hkv.clone(), Dim::c(rep), t.clone(), s.clone()];
    let kpos = g.iota(4, DType::I64, grid.clone())?;
    let qpos = g.reshape(
        pos,
        vec![b.clone(), Dim::c(1), Dim::c(1), t.clone(), Dim::c(1)],
    )?;
    let qpos = g.broadcast(qpos, grid)?;
    let vis = g.compare(CompareOp::Le, kpos, qpos)?;
    let vis = g.reshape(vis, vec![b.clone(), hkv.clone(), rt.clone(), s])?;
    let ninf = g.constant_like(f64::NEG_INFINITY, sc);
    let sc = g.select(vis, sc, ninf)?;
    let p = softmax(g, sc, 3)?;
    let o = g.matmul(p, v)?;
    g.reshape(o, vec![b, Dim::c(hn), t, dv])
}

/// Adds `grad.<param>` outputs (`∂ output[loss] / ∂ param`) to `g`, which must have a
/// scalar (every dim 1) f32 output named `loss`. Fused ops are expanded first.
pub fn differentiate(g: &Graph, loss: &str) -> R<Graph> {
    let mut g = unfuse(g)?;
    let l = g
        .outputs
        .iter()
        .find(|(n, _)| n == loss)
        .map(|(_, v)| *v)
        .ok_or_else(|| unsupported(format!("the graph has no output `{loss}`")))?;
    if g.ty(l).dtype != DType::F32 || g.shape(l).iter().any(|d| *d != Dim::c(1)) {
        return Err(unsupported(format!(
            "`{loss}` must be a scalar f32 (every dim 1), not {:?} {:?}",
            g.ty(l).dtype,
            g.shape(l)
        )));
    }
    let order = g
        .live_topo_order()
        .map_err(|v| unsupported(format!("cycle at {v}")))?;
    // Values that depend on a float parameter: the only ones that need adjoints.
    let mut needs = vec![false; g.len()];
    for &v in &order {
        let n = g.node(v);
        needs[v.index()] = n.ty.dtype.is_float()
            && n.op != Op::StopGradient
            && (matches!(n.op, Op::Param { .. }) || n.inputs.iter().any(|i| needs[i.index()]));
    }
    let mut adj: Vec<Option<ValueId>> = vec![None; g.len()];
    adj[l.index()] = Some(g.constant_like(1.0, l));
    for &v in order.iter().rev() {
        let Some(gv) = adj[v.index()] else { continue };
        if !needs[v.index()] {
            continue;
        }
        let n = g.node(v).clone();
        let contribs = backward(&mut g, v, &n.op, &n.inputs, gv, &needs)?;
        for (x, c) in contribs {
            let sum = match adj[x.index()] {
                Some(a) => g.binary(BinaryOp::Add, a, c)?,
                None => c,
            };
            adj[x.index()] = Some(sum);
        }
    }
    // Gradients in reverse order of the parameters' first use: a backend that computes
    // outputs in order then runs backpropagation layer by layer, from the last one down,
    // each weight's gradient as soon as its adjoint exists.
    let params: Vec<(String, ValueId)> = g
        .params()
        .into_iter()
        .rev()
        .map(|(n, v)| (n.to_string(), v))
        .collect();
    for (name, p) in params {
        if !g.ty(p).dtype.is_float() {
            continue;
        }
        let gp = match adj[p.index()] {
            Some(a) => a,
            None => g.constant_like(0.0, p),
        };
        g.output(&format!("grad.{name}"), gp);
    }
    Ok(g)
}

/// The adjoint contributions of node `v = op(ins)` with adjoint `gv`, to the inputs that
/// need them.
fn backward(
    g: &mut Graph,
    v: ValueId,
    op: &Op,
    ins: &[ValueId],
    gv: ValueId,
    needs: &[bool],
) -> R<Vec<(ValueId, ValueId)>> {
    let need = |i: usize| needs[ins[i].index()];
    let mut out = vec![];
    let c = |g: &mut Graph, value: f64, like: ValueId| g.constant_like(value, like);
    let mul = |g: &mut Graph, a, b| g.binary(BinaryOp::Mul, a, b);
    match op {
        Op::Input { .. } | Op::Param { .. } | Op::Constant { .. } | Op::Iota { .. } => {}
        Op::Compare(_) | Op::StopGradient => {}
        Op::Unary(u) => {
            let x = ins[0];
            let d = match u {
                UnaryOp::Neg => g.unary(UnaryOp::Neg, gv)?,
                UnaryOp::Exp => mul(g, gv, v)?,
                UnaryOp::Log => g.binary(BinaryOp::Div, gv, x)?,
                UnaryOp::Sqrt => {
                    let h = c(g, 0.5, v);
                    let t = g.binary(BinaryOp::Div, h, v)?;
                    mul(g, gv, t)?
                }
                UnaryOp::Rsqrt => {
                    let y2 = mul(g, v, v)?;
                    let y3 = mul(g, y2, v)?;
                    let h = c(g, -0.5, v);
                    let t = mul(g, h, y3)?;
                    mul(g, gv, t)?
                }
                UnaryOp::Recip => {
                    let y2 = mul(g, v, v)?;
                    let t = g.unary(UnaryOp::Neg, y2)?;
                    mul(g, gv, t)?
                }
                UnaryOp::Sigmoid => {
                    let one = c(g, 1.0, v);
                    let om = g.binary(BinaryOp::Sub, one, v)?;
                    let t = mul(g, v, om)?;
                    mul(g, gv, t)?
                }
                UnaryOp::Tanh => {
                    let one = c(g, 1.0, v);
                    let y2 = mul(g, v, v)?;
                    let t = g.binary(BinaryOp::Sub, one, y2)?;
                    mul(g, gv, t)?
                }
                UnaryOp::Sin => {
                    let t = g.unary(UnaryOp::Cos, x)?;
                    mul(g, gv, t)?
                }
                UnaryOp::Cos => {
                    let s = g.unary(UnaryOp::Sin, x)?;
                    let t = g.unary(UnaryOp::Neg, s)?;
                    mul(g, gv, t)?
                }
                UnaryOp::Abs => {
                    let z = c(g, 0.0, x);
                    let pos = g.compare(CompareOp::Gt, x, z)?;
                    let neg = g.compare(CompareOp::Lt, x, z)?;
                    let ng = g.unary(UnaryOp::Neg, gv)?;
                    let zg = c(g, 0.0, gv);
                    let t = g.select(neg, ng, zg)?;
                    g.select(pos, gv, t)?
                }
                UnaryOp::Silu => {
                    let s = g.unary(UnaryOp::Sigmoid, x)?;
                    let one = c(g, 1.0, s);
                    let om = g.binary(BinaryOp::Sub, one, s)?;
                    let xo = mul(g, x, om)?;
                    let t = g.binary(BinaryOp::Add, one, xo)?;
                    let t = mul(g, s, t)?;
                    mul(g, gv, t)?
                }
            };
            out.push((x, d));
        }
        Op::Binary(b) => {
            let (a, bb) = (ins[0], ins[1]);
            match b {
                BinaryOp::Add => {
                    out.push((a, gv));
                    out.push((bb, gv));
                }
                BinaryOp::Sub => {
                    out.push((a, gv));
                    if need(1) {
                        out.push((bb, g.unary(UnaryOp::Neg, gv)?));
                    }
                }
                BinaryOp::Mul => {
                    if need(0) {
                        out.push((a, mul(g, gv, bb)?));
                    }
                    if need(1) {
                        out.push((bb, mul(g, gv, a)?));
                    }
                }
                BinaryOp::Div => {
                    if need(0) {
                        out.push((a, g.binary(BinaryOp::Div, gv, bb)?));
                    }
                    if need(1) {
                        let t = g.binary(BinaryOp::Div, v, bb)?;
                        let t = mul(g, gv, t)?;
                        out.push((bb, g.unary(UnaryOp::Neg, t)?));
                    }
                }
                BinaryOp::Max | BinaryOp::Min => {
                    let cmp = if *b == BinaryOp::Max {
                        CompareOp::Ge
                    } else {
                        CompareOp::Le
                    };
                    let first = g.compare(cmp, a, bb)?;
                    let z = c(g, 0.0, gv);
                    if need(0) {
                        out.push((a, g.select(first, gv, z)?));
                    }
                    if need(1) {
                        out.push((bb, g.select(first, z, gv)?));
                    }
                }
                BinaryOp::Pow => {
                    if need(0) {
                        let one = c(g, 1.0, bb);
                        let e = g.binary(BinaryOp::Sub, bb, one)?;
                        let p = g.binary(BinaryOp::Pow, a, e)?;
                        let t = mul(g, bb, p)?;
                        out.push((a, mul(g, gv, t)?));
                    }
                    if need(1) {
                        let la = g.unary(UnaryOp::Log, a)?;
                        let t = mul(g, v, la)?;
                        out.push((bb, mul(g, gv, t)?));
                    }
                }
            }
        }
        Op::Select => {
            let z = c(g, 0.0, gv);
            if need(1) {
                out.push((ins[1], g.select(ins[0], gv, z)?));
            }
            if need(2) {
                out.push((ins[2], g.select(ins[0], z, gv)?));
            }
        }
        Op::Cast => {
            let dt = g.ty(ins[0]).dtype;
            out.push((ins[0], g.cast(gv, dt)?));
        }
        Op::Reduce { op: r, axis } => {
            let x = ins[0];
            let xs = g.shape(x).to_vec();
            let gb = g.broadcast(gv, xs.clone())?;
            let d = match r {
                ReduceOp::Sum => gb,
                ReduceOp::Mean => {
                    let n = xs[*axis]
                        .as_const()
                        .ok_or_else(|| unsupported("mean over a symbolic axis"))?;
                    let k = c(g, 1.0 / n as f64, gb);
                    mul(g, gb, k)?
                }
                ReduceOp::Max => {
                    let yb = g.broadcast(v, xs)?;
                    let hit = g.compare(CompareOp::Eq, x, yb)?;
                    let z = c(g, 0.0, gb);
                    g.select(hit, gb, z)?
                }
            };
            out.push((x, d));
        }
        Op::MatMul => {
            let (a, b) = (ins[0], ins[1]);
            let ra = g.shape(a).len();
            let rb = g.shape(b).len();
            let swap = |r: usize| {
                let mut p: Vec<usize> = (0..r).collect();
                p.swap(r - 2, r - 1);
                p
            };
            if need(0) {
                let bt = g.permute(b, swap(rb))?;
                out.push((a, g.matmul(gv, bt)?));
            }
            if need(1) {
                let at = g.permute(a, swap(ra))?;
                if rb == ra {
                    out.push((b, g.matmul(at, gv)?));
                } else {
                    // `b` shared by every batch: per-batch `aᵀ·g`, summed over the batch.
                    let mut d = g.matmul(at, gv)?;
                    for axis in 0..ra - 2 {
                        d = g.reduce(ReduceOp::Sum, d, axis)?;
                    }
                    let bs = g.shape(b).to_vec();
                    out.push((b, g.reshape(d, bs)?));
                }
            }
        }
        Op::Reshape => {
            let s = g.shape(ins[0]).to_vec();
            out.push((ins[0], g.reshape(gv, s)?));
        }
        Op::Permute { perm } => {
            let mut inv = vec![0; perm.len()];
            for (i, &p) in perm.iter().enumerate() {
                inv[p] = i;
            }
            out.push((ins[0], g.permute(gv, inv)?));
        }
        Op::Broadcast => {
            let xs = g.shape(ins[0]).to_vec();
            let ys = g.shape(v).to_vec();
            let mut d = gv;
            for (i, (a, b)) in xs.iter().zip(&ys).enumerate() {
                if a != b {
                    d = g.reduce(ReduceOp::Sum, d, i)?;
                }
            }
            out.push((ins[0], d));
        }
        Op::Slice { axis, start, end } => {
            let xs = g.shape(ins[0]).to_vec();
            let n = xs[*axis]
                .as_const()
                .ok_or_else(|| unsupported("slice of a symbolic axis"))?
                as usize;
            let mut parts = vec![];
            let dt = g.ty(gv).dtype;
            for (from, to) in [(0, *start), (*end, n)] {
                if to > from {
                    let mut s = xs.clone();
                    s[*axis] = Dim::c((to - from) as i64);
                    parts.push((from, g.constant(0.0, dt, s)));
                }
            }
            parts.push((*start, gv));
            parts.sort_by_key(|p| p.0);
            let vs: Vec<ValueId> = parts.into_iter().map(|p| p.1).collect();
            let d = if vs.len() == 1 {
                vs[0]
            } else {
                g.concat(&vs, *axis)?
            };
            out.push((ins[0], d));
        }
        Op::Concat { axis } => {
            let mut at = 0usize;
            for (i, &x) in ins.iter().enumerate() {
                let len = g.shape(x)[*axis]
                    .as_const()
                    .ok_or_else(|| unsupported("concat along a symbolic axis"))?
                    as usize;
                if need(i) {
                    out.push((x, g.slice(gv, *axis, at, at + len)?));
                }
                at += len;
            }
        }
        Op::Gather { axis } => {
            let (table, idx) = (ins[0], ins[1]);
            if *axis != 0 {
                return Err(unsupported(
                    "the gradient of gather is built for tables indexed on axis 0",
                ));
            }
            // dTable[v] = Σ over the index positions j with idx[j] = v of g[j].
            let rows = g.shape(table)[0].clone();
            out.push((table, g.scatter_add(idx, gv, rows)?));
        }
        Op::ScatterAdd => {
            // Each src[j] went to row idx[j]: its adjoint is that row of g.
            if need(1) {
                out.push((ins[1], g.gather(gv, ins[0], 0)?));
            }
        }
        Op::FusedAttention { scale } => {
            let (q, k, vv, pos) = (ins[0], ins[1], ins[2], ins[3]);
            let f32_of = |g: &mut Graph, x| -> R<ValueId> {
                if g.ty(x).dtype == DType::F32 {
                    Ok(x)
                } else {
                    g.cast(x, DType::F32)
                }
            };
            let gy = mul(g, gv, v)?;
            let gy = f32_of(g, gy)?;
            let delta = g.reduce(ReduceOp::Sum, gy, 3)?;
            let rows = g.shape(delta)[..3].to_vec();
            let delta = g.reshape(delta, rows)?;
            let lse = g.add(Op::AttentionLse { scale: *scale }, &[q, k, pos], None)?;
            for (i, wrt) in [(0, AttnGrad::Q), (1, AttnGrad::K), (2, AttnGrad::V)] {
                if need(i) {
                    let op = Op::AttentionGrad { scale: *scale, wrt };
                    let d = g.add(op, &[q, k, vv, pos, gv, lse, delta], None)?;
                    out.push((ins[i], d));
                }
            }
        }
        Op::AttentionLse { .. } | Op::AttentionGrad { .. } => {
            return Err(unsupported(format!(
                "`{}` has no derivative here (attention's backward is not differentiated \
                 again)",
                op.name()
            )))
        }
        Op::Softmax { .. } | Op::RmsNorm { .. } | Op::RmsNormMatMul { .. } | Op::SwiGlu => {
            return Err(unsupported(format!(
                "`{}` should have been expanded before differentiation",
                op.name()
            )))
        }
    }
    Ok(out)
}
