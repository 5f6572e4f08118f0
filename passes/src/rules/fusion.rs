//! Fusion: recognise softmax, RMSNorm, SwiGLU and causal attention in any of the spellings
//! the algebra rules reduce them to, and replace them by fused ops. Stages build on each
//! other (softmax, then attention around it; rms_norm, then rms_norm_matmul), so each
//! spelling variant is written once, not once per combination.

use egg::{Id, Subst};
use egret_ir::{DType, Dim, Op};

use super::{is_const, konst, nodes_named, op, rule, same, ty, var, Rw};
use crate::egraph::EG;

pub fn rules() -> Vec<Rw> {
    let mut r = vec![
        // softmax-stable: exp(x - max(x)) / sum(exp(x - max(x))) -> softmax(x)
        // softmax-plain:  exp(z) / sum(exp(z)) -> softmax(z)   (equal in exact arithmetic;
        //                 the fused op is the overflow-safe form)
        rule("softmax", "(div ?e (broadcast ?sum))", |eg, _, s| {
            let (e, sum) = (var(s, "?e"), var(s, "?sum"));
            let z = nodes_named(eg, e, "exp").into_iter().next()?.children[0];
            let axis = nodes_named(eg, sum, "reduce_sum")
                .into_iter()
                .find_map(|r| match r.op {
                    Op::Reduce { axis, .. } if same(eg, r.children[0], e) => Some(axis),
                    _ => None,
                })?;
            // Stable spelling: z = x - broadcast(max(x, axis)).
            let stable = nodes_named(eg, z, "sub").into_iter().find_map(|sub| {
                let (x, mb) = (sub.children[0], sub.children[1]);
                nodes_named(eg, mb, "broadcast")
                    .iter()
                    .any(|b| {
                        nodes_named(eg, b.children[0], "reduce_max")
                            .iter()
                            .any(|m| {
                                same(eg, m.children[0], x)
                                    && matches!(m.op, Op::Reduce { axis: a, .. } if a == axis)
                            })
                    })
                    .then_some(x)
            });
            op(eg, Op::Softmax { axis }, vec![stable.unwrap_or(z)])
        }),
        // attention: softmax(select(causal, (q @ kᵀ) * c, -inf)) @ v -> fused_attention(q, k, v, pos)
        rule(
            "attention",
            "(matmul (softmax (select ?mask (mul (matmul ?q ?kt) ?c) ?ninf)) ?vr)",
            |eg, id, s| {
                let scale = konst(eg, var(s, "?c"))?;
                attention(eg, id, s, scale)
            },
        ),
        rule(
            "attention-unscaled",
            "(matmul (softmax (select ?mask (matmul ?q ?kt) ?ninf)) ?vr)",
            |eg, id, s| attention(eg, id, s, 1.0),
        ),
        // swiglu: silu(g) * u -> swiglu(g, u), u * silu(g) -> swiglu(g, u)
        rule("swiglu", "(mul (silu ?g) ?u)", |eg, _, s| {
            op(eg, Op::SwiGlu, vec![var(s, "?g"), var(s, "?u")])
        }),
        rule("swiglu-r", "(mul ?u (silu ?g))", |eg, _, s| {
            op(eg, Op::SwiGlu, vec![var(s, "?g"), var(s, "?u")])
        }),
        // rms-norm-matmul: rms_norm(x, w) @ W -> rms_norm_matmul(x, w, W)
        rule("rms-norm-matmul", "(matmul ?n ?w)", |eg, _, s| {
            (ty(eg, var(s, "?w")).shape.rank() == 2).then_some(())?;
            let norm = nodes_named(eg, var(s, "?n"), "rms_norm")
                .into_iter()
                .next()?;
            let Op::RmsNorm { eps } = norm.op else {
                return None;
            };
            op(
                eg,
                Op::RmsNormMatMul { eps },
                vec![norm.children[0], norm.children[1], var(s, "?w")],
            )
        }),
    ];
    // rms-norm: w * (x * rsqrt(mean(x·x) + eps)) -> rms_norm(x, w), in the four operand orders
    // (weight left/right, normaliser left/right); `eps + mean` or `mean + eps` either way.
    let inv = "(broadcast (rsqrt (add ?a ?b)))";
    for (norm_name, norm) in [
        ("", format!("(mul ?x {inv})")),
        ("-inv-left", format!("(mul {inv} ?x)")),
    ] {
        for (w_name, pat) in [
            ("", format!("(mul ?w {norm})")),
            ("-weight-right", format!("(mul {norm} ?w)")),
        ] {
            r.push(rule(
                &format!("rms-norm{w_name}{norm_name}"),
                &pat,
                rms_norm,
            ));
        }
    }
    r
}

/// The rank-1 `[n]` weight behind a broadcast (possibly of a reshape to `[1, .., n]`).
fn weight_vector(eg: &EG, id: Id, n: &Dim) -> Option<Id> {
    for b in nodes_named(eg, id, "broadcast") {
        let src = b.children[0];
        let t = ty(eg, src);
        if t.shape.dims() == [n.clone()] {
            return Some(src);
        }
        for r in nodes_named(eg, src, "reshape") {
            if ty(eg, r.children[0]).shape.dims() == [n.clone()] {
                return Some(r.children[0]);
            }
        }
    }
    None
}

fn rms_norm(eg: &mut EG, _: Id, s: &Subst) -> Option<Id> {
    let x = eg.find(var(s, "?x"));
    let xt = ty(eg, x);
    let last = xt.shape.rank().checked_sub(1)?;
    let (a, b) = (var(s, "?a"), var(s, "?b"));
    let (eps, mean) = match (konst(eg, a), konst(eg, b)) {
        (Some(e), None) => (e, b),
        (None, Some(e)) => (e, a),
        _ => return None,
    };
    // mean = reduce_mean(x * x) over the last axis
    let is_mean_sq = nodes_named(eg, mean, "reduce_mean").iter().any(|m| {
        matches!(m.op, Op::Reduce { axis, .. } if axis == last)
            && eg[m.children[0]]
                .nodes
                .iter()
                .any(|n| n.op == Op::Binary(egret_ir::BinaryOp::Mul) && n.children == [x, x])
    });
    is_mean_sq.then_some(())?;
    let w = weight_vector(eg, var(s, "?w"), &xt.shape.dims()[last])?;
    op(eg, Op::RmsNorm { eps }, vec![x, w])
}

/// `[B, Hkv·rep, S, D]` built as `reshape(broadcast(reshape(k)))` from `k: [B, Hkv, S, D]`
/// (each KV head repeated `rep` times, adjacent): returns `k`. A plain `k` returns itself.
fn unrepeat_kv(eg: &EG, kr: Id) -> Id {
    let t = ty(eg, kr);
    if t.shape.rank() != 4 {
        return kr;
    }
    for r in nodes_named(eg, kr, "reshape") {
        for b in nodes_named(eg, r.children[0], "broadcast") {
            for r2 in nodes_named(eg, b.children[0], "reshape") {
                let k = r2.children[0];
                let (kd, bd) = (ty(eg, k).shape.0, ty(eg, b.children[0]).shape.0);
                let bt = ty(eg, r.children[0]).shape.0;
                let d = t.shape.dims();
                // k [B,Hkv,S,D] -> [B,Hkv,1,S,D] -> [B,Hkv,rep,S,D] -> [B,Hkv*rep,S,D]
                if kd.len() == 4
                    && bd.len() == 5
                    && bt.len() == 5
                    && bd[0] == kd[0]
                    && bd[1] == kd[1]
                    && bd[2] == Dim::c(1)
                    && bd[3] == kd[2]
                    && bd[4] == kd[3]
                    && bt[0] == kd[0]
                    && bt[1] == kd[1]
                    && bt[3] == kd[2]
                    && bt[4] == kd[3]
                    && d[0] == kd[0]
                    && d[2] == kd[2]
                    && d[3] == kd[3]
                    && bt[1].as_const().zip(bt[2].as_const()).map(|(a, b)| a * b) == d[1].as_const()
                {
                    return k;
                }
            }
        }
    }
    kr
}

/// Whether `m` (bool `[B, 1|H, T, S]`, perhaps broadcast) is `key index <= position`, with
/// the key index an `iota` over the last axis and the positions `pos [B, T]` reshaped to
/// `[B, 1, T, 1]` and broadcast. Returns `pos`.
fn causal_positions(eg: &EG, m: Id) -> Option<Id> {
    let mut cands = vec![m];
    for b in nodes_named(eg, m, "broadcast") {
        cands.push(b.children[0]);
    }
    for c in cands {
        for le in nodes_named(eg, c, "le") {
            let (kpos, qpos) = (le.children[0], le.children[1]);
            let key_is_iota = eg[kpos]
                .nodes
                .iter()
                .any(|n| matches!(n.op, Op::Iota { axis: 3 }))
                || nodes_named(eg, kpos, "broadcast").iter().any(|b| {
                    eg[b.children[0]]
                        .nodes
                        .iter()
                        .any(|n| matches!(n.op, Op::Iota { axis: 3 }))
                        && ty(eg, b.children[0]).shape.dims()[3] == ty(eg, kpos).shape.dims()[3]
                });
            if !key_is_iota {
                continue;
            }
            for b in nodes_named(eg, qpos, "broadcast") {
                for r in nodes_named(eg, b.children[0], "reshape") {
                    let p = r.children[0];
                    let (pt, rt) = (ty(eg, p), ty(eg, b.children[0]));
                    let rd = rt.shape.dims();
                    if pt.shape.rank() == 2
                        && rd.len() == 4
                        && rd[0] == pt.shape.dims()[0]
                        && rd[1] == Dim::c(1)
                        && rd[2] == pt.shape.dims()[1]
                        && rd[3] == Dim::c(1)
                    {
                        return Some(p);
                    }
                }
            }
        }
    }
    None
}

fn attention(eg: &mut EG, id: Id, s: &Subst, scale: f64) -> Option<Id> {
    is_const(eg, var(s, "?ninf"), f64::NEG_INFINITY).then_some(())?;
    // The softmax must run over the key axis (the last).
    let probs = eg[id]
        .nodes
        .iter()
        .find(|n| n.op == Op::MatMul && n.children[1] == eg.find(var(s, "?vr")))?
        .children[0];
    eg[probs]
        .nodes
        .iter()
        .any(|n| matches!(n.op, Op::Softmax { axis: 3 }))
        .then_some(())?;
    let q = var(s, "?q");
    (ty(eg, q).shape.rank() == 4).then_some(())?;
    // kᵀ = permute(k, [0, 1, 3, 2])
    let kr = nodes_named(eg, var(s, "?kt"), "permute")
        .into_iter()
        .find(|n| matches!(&n.op, Op::Permute { perm } if perm == &[0, 1, 3, 2]))?
        .children[0];
    let k = unrepeat_kv(eg, kr);
    let v = unrepeat_kv(eg, var(s, "?vr"));
    let pos = causal_positions(eg, var(s, "?mask"))?;
    matches!(ty(eg, pos).dtype, DType::I64 | DType::I32).then_some(())?;
    op(eg, Op::FusedAttention { scale }, vec![q, k, v, pos])
}
