//! Property test: random small graphs (elementwise chains, matmuls, reductions, and the
//! spellings of softmax, RMSNorm and SiLU the fusion rules look for), optimised with the
//! default pipeline, compute what they computed before.

mod common;

use common::{compare_numerically, Rng};
use egret_ir::{BinaryOp, CompareOp, DType, Dim, Graph, ReduceOp, UnaryOp, ValueId};
use egret_passes::{pipeline, PassCx, PassManager};

const GRAPHS: u64 = 150;
const STEPS: usize = 10;

fn random_graph(seed: u64) -> Graph {
    let mut r = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut g = Graph::new("random");
    let t = Dim::sym("T");
    let full = vec![t.clone(), Dim::c(6)];
    let col = vec![t.clone(), Dim::c(1)];
    let mut pool: Vec<ValueId> = (0..2)
        .map(|i| g.input(&format!("x{i}"), DType::F32, full.clone()))
        .collect();
    let mut params = 0;
    for _ in 0..STEPS {
        let pick = |r: &mut Rng, pool: &Vec<ValueId>| pool[(r.next() % pool.len() as u64) as usize];
        let a = pick(&mut r, &pool);
        let b = pick(&mut r, &pool);
        let v = match r.next() % 11 {
            0 => {
                let u = [
                    UnaryOp::Neg,
                    UnaryOp::Tanh,
                    UnaryOp::Sigmoid,
                    UnaryOp::Abs,
                    UnaryOp::Sin,
                ][(r.next() % 5) as usize];
                g.unary(u, a).unwrap()
            }
            1 => {
                let op = [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Max]
                    [(r.next() % 4) as usize];
                g.binary(op, a, b).unwrap()
            }
            2 => {
                let c = g.constant(
                    [0.5, 2.0, 1.0, 3.0][(r.next() % 4) as usize],
                    DType::F32,
                    full.clone(),
                );
                let op = if r.next() % 2 == 0 {
                    BinaryOp::Mul
                } else {
                    BinaryOp::Div
                };
                g.binary(op, a, c).unwrap()
            }
            3 => {
                // softmax over axis 1, stable or plain
                let x = g.unary(UnaryOp::Tanh, a).unwrap();
                let z = if r.next() % 2 == 0 {
                    let m = g.reduce(ReduceOp::Max, x, 1).unwrap();
                    let mb = g.broadcast(m, full.clone()).unwrap();
                    g.binary(BinaryOp::Sub, x, mb).unwrap()
                } else {
                    x
                };
                let e = g.unary(UnaryOp::Exp, z).unwrap();
                let s = g.reduce(ReduceOp::Sum, e, 1).unwrap();
                let sb = g.broadcast(s, full.clone()).unwrap();
                g.binary(BinaryOp::Div, e, sb).unwrap()
            }
            4 => {
                // rms norm with a weight
                let sq = g.binary(BinaryOp::Mul, a, a).unwrap();
                let m = g.reduce(ReduceOp::Mean, sq, 1).unwrap();
                let eps = g.constant(1e-5, DType::F32, col.clone());
                let ve = g.binary(BinaryOp::Add, m, eps).unwrap();
                let rs = g.unary(UnaryOp::Rsqrt, ve).unwrap();
                let rb = g.broadcast(rs, full.clone()).unwrap();
                let xn = g.binary(BinaryOp::Mul, a, rb).unwrap();
                params += 1;
                let w = g.param(&format!("w{params}"), DType::F32, vec![Dim::c(6)]);
                let wb = g.broadcast_to(w, &full).unwrap();
                g.binary(BinaryOp::Mul, wb, xn).unwrap()
            }
            5 | 6 => {
                params += 1;
                let w = g.param(
                    &format!("m{params}"),
                    DType::F32,
                    vec![Dim::c(6), Dim::c(6)],
                );
                let w = if r.next() % 2 == 0 {
                    g.permute(w, vec![1, 0]).unwrap()
                } else {
                    w
                };
                g.matmul(a, w).unwrap()
            }
            7 => {
                // silu, one of three spellings
                match r.next() % 3 {
                    0 => {
                        let s = g.unary(UnaryOp::Sigmoid, a).unwrap();
                        g.binary(BinaryOp::Mul, a, s).unwrap()
                    }
                    1 => {
                        let s = g.unary(UnaryOp::Sigmoid, a).unwrap();
                        g.binary(BinaryOp::Mul, s, a).unwrap()
                    }
                    _ => {
                        let n = g.unary(UnaryOp::Neg, a).unwrap();
                        let e = g.unary(UnaryOp::Exp, n).unwrap();
                        let one = g.constant(1.0, DType::F32, full.clone());
                        let d = g.binary(BinaryOp::Add, one, e).unwrap();
                        g.binary(BinaryOp::Div, a, d).unwrap()
                    }
                }
            }
            8 => {
                let op = [CompareOp::Lt, CompareOp::Gt, CompareOp::Ge, CompareOp::Le]
                    [(r.next() % 4) as usize];
                let c = g.compare(op, a, b).unwrap();
                g.select(c, a, b).unwrap()
            }
            9 => {
                let s = g.reduce(ReduceOp::Sum, a, 1).unwrap();
                let sb = g.broadcast(s, full.clone()).unwrap();
                g.binary(BinaryOp::Sub, a, sb).unwrap()
            }
            _ => {
                let p = g.permute(a, vec![1, 0]).unwrap();
                g.permute(p, vec![1, 0]).unwrap()
            }
        };
        pool.push(v);
    }
    let n = pool.len();
    g.output("y", pool[n - 1]);
    g.output("z", pool[n - 2]);
    egret_ir::verify(&g).unwrap();
    g
}

#[test]
fn random_graphs_keep_their_meaning_under_the_default_pipeline() {
    let mut fired = std::collections::BTreeMap::new();
    for seed in 0..GRAPHS {
        let g = random_graph(seed);
        let mut opt = g.clone();
        let mut cx = PassCx::default();
        PassManager::new(pipeline("default").unwrap())
            .run(&mut opt, &mut cx, |_, _| {})
            .unwrap();
        for (k, v) in cx.rules_fired {
            *fired.entry(k).or_insert(0) += v;
        }
        let d = compare_numerically(&g, &opt, seed + 100);
        assert!(
            d <= 1e-4,
            "seed {seed}: outputs differ by {d}\nbefore:\n{}\nafter:\n{}",
            egret_ir::print(&g),
            egret_ir::print(&opt)
        );
    }
    // The graphs exercise the interesting rules, not only the trivial ones.
    for rule in [
        "softmax",
        "silu",
        "silu-from-div",
        "rms-norm",
        "rms-norm-matmul",
        "div-const-to-mul",
        "permute-permute",
        "merge-matmuls",
    ] {
        assert!(
            fired.get(rule).copied().unwrap_or(0) > 0,
            "rule {rule} never fired: {fired:?}"
        );
    }
}
