//! Algebraic simplification and canonical spellings: constants folded, identities removed,
//! and the several ways people write the same activation or mask reduced to one form that
//! the fusion rules recognise.

use egg::{Id, Subst};
use egret_ir::interp::{binary_f32, unary_f32};
use egret_ir::{BinaryOp, CompareOp, Op, ReduceOp, UnaryOp};

use super::{constant, is_const, konst, nodes_named, op, rule, same, ty, var, Rw};
use crate::egraph::EG;

pub fn rules() -> Vec<Rw> {
    let mut r = vec![
        // div-const-to-mul: x / c -> x * (1/c)
        rule("div-const-to-mul", "(div ?x ?c)", |eg, _, s| {
            let c = konst(eg, var(s, "?c")).filter(|c| *c != 0.0)?;
            let t = ty(eg, var(s, "?c"));
            let inv = constant(eg, 1.0 / c, t);
            op(eg, Op::Binary(BinaryOp::Mul), vec![var(s, "?x"), inv])
        }),
        // mul-one: x * 1 -> x, 1 * x -> x
        rule("mul-one", "(mul ?x ?c)", |eg, _, s| {
            is_const(eg, var(s, "?c"), 1.0).then(|| var(s, "?x"))
        }),
        rule("one-mul", "(mul ?c ?x)", |eg, _, s| {
            is_const(eg, var(s, "?c"), 1.0).then(|| var(s, "?x"))
        }),
        // add-zero: x + 0 -> x, 0 + x -> x
        rule("add-zero", "(add ?x ?c)", |eg, _, s| {
            is_const(eg, var(s, "?c"), 0.0).then(|| var(s, "?x"))
        }),
        rule("zero-add", "(add ?c ?x)", |eg, _, s| {
            is_const(eg, var(s, "?c"), 0.0).then(|| var(s, "?x"))
        }),
        // neg-neg: -(-x) -> x
        rule("neg-neg", "(neg (neg ?x))", |_, _, s| Some(var(s, "?x"))),
        // scale-fold: (x * a) * b -> x * (a*b) for constants a, b
        rule("scale-fold", "(mul (mul ?x ?a) ?b)", |eg, _, s| {
            let (a, b) = (konst(eg, var(s, "?a"))?, konst(eg, var(s, "?b"))?);
            let t = ty(eg, var(s, "?a"));
            let ab = constant(eg, (a as f32 * b as f32) as f64, t);
            op(eg, Op::Binary(BinaryOp::Mul), vec![var(s, "?x"), ab])
        }),
        // pow-two: pow(x, 2) -> x * x
        rule("pow-two", "(pow ?x ?c)", |eg, _, s| {
            is_const(eg, var(s, "?c"), 2.0).then_some(())?;
            op(
                eg,
                Op::Binary(BinaryOp::Mul),
                vec![var(s, "?x"), var(s, "?x")],
            )
        }),
        // recip-sqrt: 1 / sqrt(x) -> rsqrt(x)
        rule("recip-sqrt", "(recip (sqrt ?x))", |eg, _, s| {
            op(eg, Op::Unary(UnaryOp::Rsqrt), vec![var(s, "?x")])
        }),
        // div-sqrt: x / sqrt(v) -> x * rsqrt(v)
        rule("div-sqrt", "(div ?x (sqrt ?v))", |eg, _, s| {
            let r = op(eg, Op::Unary(UnaryOp::Rsqrt), vec![var(s, "?v")])?;
            op(eg, Op::Binary(BinaryOp::Mul), vec![var(s, "?x"), r])
        }),
        // div-broadcast-sqrt: x / broadcast(sqrt(v)) -> x * broadcast(rsqrt(v))
        rule(
            "div-broadcast-sqrt",
            "(div ?x (broadcast (sqrt ?v)))",
            |eg, _, s| {
                let r = op(eg, Op::Unary(UnaryOp::Rsqrt), vec![var(s, "?v")])?;
                let b = super::declared(eg, Op::Broadcast, ty(eg, var(s, "?x")), vec![r])?;
                op(eg, Op::Binary(BinaryOp::Mul), vec![var(s, "?x"), b])
            },
        ),
        // mul-broadcast-recip: x * broadcast(1/s) -> x / broadcast(s)
        rule(
            "mul-broadcast-recip",
            "(mul ?x (broadcast (recip ?d)))",
            |eg, _, s| {
                let b =
                    super::declared(eg, Op::Broadcast, ty(eg, var(s, "?x")), vec![var(s, "?d")])?;
                op(eg, Op::Binary(BinaryOp::Div), vec![var(s, "?x"), b])
            },
        ),
        // mean-from-sum: sum(x, a) * (1/n) -> mean(x, a), n = dim a of x
        rule("mean-from-sum", "(mul ?sum ?c)", |eg, _, s| {
            let c = konst(eg, var(s, "?c"))?;
            for n in nodes_named(eg, var(s, "?sum"), "reduce_sum") {
                let Op::Reduce { axis, .. } = n.op else {
                    continue;
                };
                let len = ty(eg, n.children[0]).shape.dims()[axis].as_const()?;
                if (c as f32) == (1.0 / len as f64) as f32 {
                    return op(
                        eg,
                        Op::Reduce {
                            op: ReduceOp::Mean,
                            axis,
                        },
                        vec![n.children[0]],
                    );
                }
            }
            None
        }),
        // silu-from-div: x / (1 + exp(-x)) -> silu(x)
        rule(
            "silu-from-div",
            "(div ?x (add ?one (exp (neg ?y))))",
            |eg, _, s| silu_if_one(eg, s),
        ),
        rule(
            "silu-from-div-r",
            "(div ?x (add (exp (neg ?y)) ?one))",
            |eg, _, s| silu_if_one(eg, s),
        ),
        // sigmoid-from-recip: 1 / (1 + exp(-x)) -> sigmoid(x)
        rule(
            "sigmoid-from-recip",
            "(recip (add ?one (exp (neg ?x))))",
            |eg, _, s| sigmoid_if_one(eg, s),
        ),
        rule(
            "sigmoid-from-recip-r",
            "(recip (add (exp (neg ?x)) ?one))",
            |eg, _, s| sigmoid_if_one(eg, s),
        ),
        // silu: x * sigmoid(x) -> silu(x), sigmoid(x) * x -> silu(x)
        rule("silu", "(mul ?x (sigmoid ?y))", |eg, _, s| {
            same(eg, var(s, "?x"), var(s, "?y")).then_some(())?;
            op(eg, Op::Unary(UnaryOp::Silu), vec![var(s, "?x")])
        }),
        rule("silu-r", "(mul (sigmoid ?y) ?x)", |eg, _, s| {
            same(eg, var(s, "?x"), var(s, "?y")).then_some(())?;
            op(eg, Op::Unary(UnaryOp::Silu), vec![var(s, "?x")])
        }),
        // ge-to-le: a >= b -> b <= a;  lt-to-gt: a < b -> b > a
        rule("ge-to-le", "(ge ?a ?b)", |eg, _, s| {
            op(
                eg,
                Op::Compare(CompareOp::Le),
                vec![var(s, "?b"), var(s, "?a")],
            )
        }),
        rule("lt-to-gt", "(lt ?a ?b)", |eg, _, s| {
            op(
                eg,
                Op::Compare(CompareOp::Gt),
                vec![var(s, "?b"), var(s, "?a")],
            )
        }),
        // select-gt: select(a > b, x, y) -> select(a <= b, y, x)
        rule("select-gt", "(select (gt ?a ?b) ?x ?y)", |eg, _, s| {
            let le = op(
                eg,
                Op::Compare(CompareOp::Le),
                vec![var(s, "?a"), var(s, "?b")],
            )?;
            op(eg, Op::Select, vec![le, var(s, "?y"), var(s, "?x")])
        }),
        // mask-add-to-select: s + select(m, 0, -inf) -> select(m, s, -inf) (mask broadcast or not)
        rule(
            "mask-add-to-select",
            "(add ?s (select ?m ?z ?n))",
            |eg, _, s| mask_select(eg, s, false),
        ),
        rule(
            "mask-add-to-select-r",
            "(add (select ?m ?z ?n) ?s)",
            |eg, _, s| mask_select(eg, s, false),
        ),
        rule(
            "mask-add-to-select-b",
            "(add ?s (broadcast (select ?m ?z ?n)))",
            |eg, _, s| mask_select(eg, s, true),
        ),
        rule(
            "mask-add-to-select-br",
            "(add (broadcast (select ?m ?z ?n)) ?s)",
            |eg, _, s| mask_select(eg, s, true),
        ),
        // scale-through-select: select(m, s, -inf) * c -> select(m, s * c, -inf), c > 0
        rule(
            "scale-through-select",
            "(mul (select ?m ?s ?n) ?c)",
            |eg, _, s| {
                let c = konst(eg, var(s, "?c")).filter(|c| *c > 0.0)?;
                is_const(eg, var(s, "?n"), f64::NEG_INFINITY).then_some(())?;
                let t = ty(eg, var(s, "?s"));
                let cc = constant(eg, c, t);
                let scaled = op(eg, Op::Binary(BinaryOp::Mul), vec![var(s, "?s"), cc])?;
                op(eg, Op::Select, vec![var(s, "?m"), scaled, var(s, "?n")])
            },
        ),
        // scale-out-of-matmul: (q * c) @ k -> (q @ k) * c;  q @ (k * c) -> (q @ k) * c
        rule(
            "scale-out-of-matmul",
            "(matmul (mul ?q ?c) ?k)",
            |eg, id, s| {
                let c = konst(eg, var(s, "?c"))?;
                let mm = op(eg, Op::MatMul, vec![var(s, "?q"), var(s, "?k")])?;
                let cc = constant(eg, c, ty(eg, id));
                op(eg, Op::Binary(BinaryOp::Mul), vec![mm, cc])
            },
        ),
        rule(
            "scale-out-of-matmul-r",
            "(matmul ?q (mul ?k ?c))",
            |eg, id, s| {
                let c = konst(eg, var(s, "?c"))?;
                let mm = op(eg, Op::MatMul, vec![var(s, "?q"), var(s, "?k")])?;
                let cc = constant(eg, c, ty(eg, id));
                op(eg, Op::Binary(BinaryOp::Mul), vec![mm, cc])
            },
        ),
    ];
    // const-fold: f(c) -> f(c) evaluated, for every unary and binary float op.
    for u in UnaryOp::ALL {
        let u = *u;
        r.push(rule(
            &format!("fold-{}", u.name()),
            &format!("({} ?c)", u.name()),
            move |eg, id, s| {
                let c = konst(eg, var(s, "?c"))?;
                let t = ty(eg, id);
                t.dtype.is_float().then_some(())?;
                Some(constant(eg, unary_f32(u, c as f32) as f64, t))
            },
        ));
    }
    for b in BinaryOp::ALL {
        let b = *b;
        r.push(rule(
            &format!("fold-{}", b.name()),
            &format!("({} ?a ?b)", b.name()),
            move |eg, id, s| {
                let (a, c) = (konst(eg, var(s, "?a"))?, konst(eg, var(s, "?b"))?);
                let t = ty(eg, id);
                t.dtype.is_float().then_some(())?;
                Some(constant(eg, binary_f32(b, a as f32, c as f32) as f64, t))
            },
        ));
    }
    r
}

fn silu_if_one(eg: &mut EG, s: &Subst) -> Option<Id> {
    is_const(eg, var(s, "?one"), 1.0).then_some(())?;
    same(eg, var(s, "?x"), var(s, "?y")).then_some(())?;
    op(eg, Op::Unary(UnaryOp::Silu), vec![var(s, "?x")])
}

fn sigmoid_if_one(eg: &mut EG, s: &Subst) -> Option<Id> {
    is_const(eg, var(s, "?one"), 1.0).then_some(())?;
    op(eg, Op::Unary(UnaryOp::Sigmoid), vec![var(s, "?x")])
}

fn mask_select(eg: &mut EG, s: &Subst, broadcast: bool) -> Option<Id> {
    is_const(eg, var(s, "?z"), 0.0).then_some(())?;
    is_const(eg, var(s, "?n"), f64::NEG_INFINITY).then_some(())?;
    let st = ty(eg, var(s, "?s"));
    let m = if broadcast {
        super::declared(
            eg,
            Op::Broadcast,
            egret_ir::TensorType {
                dtype: egret_ir::DType::Bool,
                shape: st.shape.clone(),
            },
            vec![var(s, "?m")],
        )?
    } else {
        var(s, "?m")
    };
    let ninf = constant(eg, f64::NEG_INFINITY, st);
    op(eg, Op::Select, vec![m, var(s, "?s"), ninf])
}
