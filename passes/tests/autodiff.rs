//! Derivative rules that the model fixtures do not isolate, checked on the interpreter:
//! `stop_gradient` blocks the gradient, gather and scatter_add are each other's adjoint,
//! and attention's backward ops equal the derivative of attention's definition.

use std::collections::HashMap;

use egret_ir::{Interpreter, Tensor};
use egret_passes::autodiff::differentiate;

fn grads(
    src: &str,
    params: &[(&str, Vec<usize>, Vec<f32>)],
    inputs: HashMap<String, Tensor>,
) -> HashMap<String, Vec<f32>> {
    let g = egret_ir::parse(src).unwrap();
    let d = differentiate(&g, "loss").unwrap();
    let params: HashMap<String, Tensor> = params
        .iter()
        .map(|(n, s, v)| {
            (
                n.to_string(),
                Tensor::from_f32(s.clone(), v.clone()).unwrap(),
            )
        })
        .collect();
    let out = Interpreter::new(&d).unwrap().run(&inputs, &params).unwrap();
    out.into_iter()
        .filter(|(n, _)| n.starts_with("grad."))
        .map(|(n, t)| (n, t.to_f32_vec()))
        .collect()
}

#[test]
fn stop_gradient_treats_its_operand_as_a_constant() {
    // loss = Σ stop_gradient(p)·p: the gradient is p, not 2p.
    let src = r#"graph g {
  %p = param "p" : f32[3]
  %s = stop_gradient(%p) : f32[3]
  %m = mul(%s, %p) : f32[3]
  %l = reduce_sum[axis=0](%m) : f32[1]
  output "loss" = %l
}"#;
    let g = grads(src, &[("p", vec![3], vec![1.0, 2.0, -3.0])], HashMap::new());
    assert_eq!(g["grad.p"], vec![1.0, 2.0, -3.0]);
}

#[test]
fn gather_and_scatter_add_are_adjoint() {
    // loss = Σ w ⊙ gather(t, ids): row v of dt sums w over the positions that picked v;
    // loss = Σ u ⊙ scatter_add(ids, x): dx[j] = u[ids[j]].
    let src = r#"graph g {
  %t = param "t" : f32[3, 2]
  %ids = input "ids" : i64[4]
  %w = input "w" : f32[4, 2]
  %r = gather[axis=0](%t, %ids) : f32[4, 2]
  %a = mul(%r, %w) : f32[4, 2]
  %x = param "x" : f32[4, 2]
  %s = scatter_add(%ids, %x) : f32[3, 2]
  %u = input "u" : f32[3, 2]
  %b = mul(%s, %u) : f32[3, 2]
  %a1 = reduce_sum[axis=1](%a) : f32[4, 1]
  %a0 = reduce_sum[axis=0](%a1) : f32[1, 1]
  %b1 = reduce_sum[axis=1](%b) : f32[3, 1]
  %b0 = reduce_sum[axis=0](%b1) : f32[1, 1]
  %l = add(%a0, %b0) : f32[1, 1]
  output "loss" = %l
}"#;
    let inputs = HashMap::from([
        (
            "ids".to_string(),
            Tensor::from_i64(vec![4], vec![2, 0, 2, 1]).unwrap(),
        ),
        (
            "w".to_string(),
            Tensor::from_f32(vec![4, 2], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]).unwrap(),
        ),
        (
            "u".to_string(),
            Tensor::from_f32(vec![3, 2], vec![10.0, 20.0, 30.0, 40.0, 50.0, 60.0]).unwrap(),
        ),
    ]);
    let g = grads(
        src,
        &[
            ("t", vec![3, 2], vec![0.0; 6]),
            ("x", vec![4, 2], vec![0.0; 8]),
        ],
        inputs,
    );
    assert_eq!(g["grad.t"], vec![3.0, 4.0, 7.0, 8.0, 6.0, 8.0]);
    assert_eq!(
        g["grad.x"],
        vec![50.0, 60.0, 10.0, 20.0, 50.0, 60.0, 30.0, 40.0]
    );
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Attention's backward (`attention_lse`, `attention_grad_{q,k,v}`) against the derivative
/// of its spelled-out definition (scores, causal mask, softmax, weighted values), on the
/// interpreter: grouped heads (4 query heads on 2 KV heads), a cache offset (queries at
/// positions 3..8 of 9 keys; in batch 1 rows seeing one key and every key), key
/// and value head sizes that differ, and a weighted loss so every output element counts.
#[test]
fn attention_backward_matches_the_derivative_of_its_definition() {
    let src = r#"graph g {
  %q = param "q" : f32[2, 4, 5, 3]
  %k = param "k" : f32[2, 2, 9, 3]
  %v = param "v" : f32[2, 2, 9, 4]
  %pos = input "pos" : i64[2, 5]
  %o = fused_attention[scale=0.7](%q, %k, %v, %pos) : f32[2, 4, 5, 4]
  %w = input "w" : f32[2, 4, 5, 4]
  %m = mul(%o, %w) : f32[2, 4, 5, 4]
  %r3 = reduce_sum[axis=3](%m) : f32[2, 4, 5, 1]
  %r2 = reduce_sum[axis=2](%r3) : f32[2, 4, 1, 1]
  %r1 = reduce_sum[axis=1](%r2) : f32[2, 1, 1, 1]
  %l = reduce_sum[axis=0](%r1) : f32[1, 1, 1, 1]
  output "loss" = %l
}"#;
    let g = egret_ir::parse(src).unwrap();
    let fused = differentiate(&g, "loss").unwrap();
    let printed = egret_ir::print(&fused);
    for op in [
        "attention_lse",
        "attention_grad_q",
        "attention_grad_k",
        "attention_grad_v",
    ] {
        assert!(printed.contains(op), "no {op} in\n{printed}");
    }
    let reparsed = egret_ir::parse(&printed).unwrap();
    assert_eq!(
        egret_ir::print(&reparsed),
        printed,
        "the text format round-trips"
    );
    let spelled = differentiate(&egret_passes::autodiff::spell_out(&g).unwrap(), "loss").unwrap();
    assert!(!egret_ir::print(&spelled).contains("attention"));
    let params: HashMap<String, Tensor> = [
        ("q", vec![2, 4, 5, 3], 1),
        ("k", vec![2, 2, 9, 3], 2),
        ("v", vec![2, 2, 9, 4], 3),
    ]
    .into_iter()
    .map(|(n, s, seed)| {
        let len = s.iter().product();
        (
            n.to_string(),
            Tensor::from_f32(s, values(len, seed)).unwrap(),
        )
    })
    .collect();
    let inputs = HashMap::from([
        (
            "pos".to_string(),
            Tensor::from_i64(vec![2, 5], vec![3, 4, 5, 6, 7, 0, 2, 4, 8, 8]).unwrap(),
        ),
        (
            "w".to_string(),
            Tensor::from_f32(vec![2, 4, 5, 4], values(160, 4)).unwrap(),
        ),
    ]);
    let run = |d: &egret_ir::Graph| Interpreter::new(d).unwrap().run(&inputs, &params).unwrap();
    let (a, b) = (run(&fused), run(&spelled));
    for p in ["q", "k", "v"] {
        let name = format!("grad.{p}");
        let (x, y) = (a[&name].to_f32_vec(), b[&name].to_f32_vec());
        assert!(
            x.iter().chain(&y).all(|v| v.is_finite()),
            "{name}: {x:?}\nvs\n{y:?}"
        );
        let err = x
            .iter()
            .zip(&y)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        let big = y.iter().map(|y| y.abs()).fold(0f32, f32::max);
        assert!(big > 0.1, "{name} is all but zero: {y:?}");
        assert!(err <= 1e-5 * big.max(1.0), "{name}: {x:?}\nvs\n{y:?}");
    }
}
