//! Derivative rules that the model fixtures do not isolate, checked on the interpreter:
//! `stop_gradient` blocks the gradient, and gather and scatter_add are each other's adjoint.

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
