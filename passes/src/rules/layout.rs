//! Layout cleanup: chains of views collapse, identity views vanish, and views of splat
//! constants become constants, so the fusion rules see the spelled math, not the plumbing.

use egret_ir::{BinaryOp, Op};

use super::{constant, declared, konst, nodes_named, op, rule, ty, var, Rw};

pub fn rules() -> Vec<Rw> {
    vec![
        // permute-permute: permute(permute(x, p), q) -> permute(x, [p[q[i]]]) (or x if identity)
        rule("permute-permute", "(permute ?p)", |eg, id, s| {
            let outer = eg[id].nodes.iter().find_map(|n| match &n.op {
                Op::Permute { perm } if n.children == [var(s, "?p")] => Some(perm.clone()),
                _ => None,
            })?;
            let inner = nodes_named(eg, var(s, "?p"), "permute")
                .into_iter()
                .next()?;
            let Op::Permute { perm: p } = &inner.op else {
                return None;
            };
            let composed: Vec<usize> = outer.iter().map(|&q| p[q]).collect();
            if composed.iter().enumerate().all(|(i, &c)| i == c) {
                return Some(inner.children[0]);
            }
            op(eg, Op::Permute { perm: composed }, vec![inner.children[0]])
        }),
        // permute-identity: permute(x, [0, 1, ..]) -> x
        rule("permute-identity", "(permute ?x)", |eg, id, s| {
            eg[id].nodes.iter().any(|n| matches!(&n.op, Op::Permute { perm } if n.children == [var(s, "?x")] && perm.iter().enumerate().all(|(i, &p)| i == p)))
                .then(|| var(s, "?x"))
        }),
        // reshape-reshape: reshape(reshape(x)) -> reshape(x)
        rule("reshape-reshape", "(reshape (reshape ?x))", |eg, id, s| {
            declared(eg, Op::Reshape, ty(eg, id), vec![var(s, "?x")])
        }),
        // reshape-noop / broadcast-noop: a view to the same shape is the value itself
        rule("reshape-noop", "(reshape ?x)", |eg, id, s| {
            (ty(eg, id) == ty(eg, var(s, "?x"))).then(|| var(s, "?x"))
        }),
        rule("broadcast-noop", "(broadcast ?x)", |eg, id, s| {
            (ty(eg, id) == ty(eg, var(s, "?x"))).then(|| var(s, "?x"))
        }),
        // broadcast-broadcast: broadcast(broadcast(x)) -> broadcast(x)
        rule(
            "broadcast-broadcast",
            "(broadcast (broadcast ?x))",
            |eg, id, s| declared(eg, Op::Broadcast, ty(eg, id), vec![var(s, "?x")]),
        ),
        // view-of-const: reshape/broadcast/permute of a splat constant is a splat constant
        rule("reshape-const", "(reshape ?c)", |eg, id, s| {
            let c = konst(eg, var(s, "?c"))?;
            Some(constant(eg, c, ty(eg, id)))
        }),
        rule("broadcast-const", "(broadcast ?c)", |eg, id, s| {
            let c = konst(eg, var(s, "?c"))?;
            Some(constant(eg, c, ty(eg, id)))
        }),
        rule("permute-const", "(permute ?c)", |eg, id, s| {
            let c = konst(eg, var(s, "?c"))?;
            Some(constant(eg, c, ty(eg, id)))
        }),
        // permute-through-scale: permute(k * c) -> permute(k) * c
        rule("permute-through-scale", "(permute ?m)", |eg, id, s| {
            let m = var(s, "?m");
            let perm = eg[id].nodes.iter().find_map(|n| match &n.op {
                Op::Permute { perm } if n.children == [m] => Some(perm.clone()),
                _ => None,
            })?;
            let (k, c) = nodes_named(eg, m, "mul")
                .into_iter()
                .find_map(|n| Some((n.children[0], konst(eg, n.children[1])?)))?;
            let pk = op(eg, Op::Permute { perm }, vec![k])?;
            let cc = constant(eg, c, ty(eg, id));
            op(eg, Op::Binary(BinaryOp::Mul), vec![pk, cc])
        }),
    ]
}
