//! Graph -> e-graph -> graph keeps sharing: a value used many times stays one value, and
//! identical subexpressions written twice become one.

use egret_passes::{pipeline, PassCx, PassManager};

#[test]
fn shared_values_stay_shared() {
    let src = r#"graph g {
  %x = input "x" : f32[T, 4]
  %e = exp(%x) : f32[T, 4]
  %e2 = exp(%x) : f32[T, 4]
  %a = add(%e, %e2) : f32[T, 4]
  %b = mul(%e, %a) : f32[T, 4]
  %c = sub(%b, %e) : f32[T, 4]
  output "c" = %c
  output "e" = %e
}"#;
    let mut g = egret_ir::parse(src).unwrap();
    PassManager::new(pipeline("fuse").unwrap())
        .run(&mut g, &mut PassCx::default(), |_, _| {})
        .unwrap();
    let text = egret_ir::print(&g);
    assert_eq!(text.matches("exp(").count(), 1, "{text}");
    assert_eq!(g.len(), 5, "{text}");
    assert_eq!(
        g.outputs[1].1,
        g.nodes
            .iter()
            .position(|n| n.op.name() == "exp")
            .map(|i| egret_ir::ValueId(i as u32))
            .unwrap()
    );
}

#[test]
fn deep_residual_chains_extract_in_linear_size() {
    // 200 layers of x = x + f(x): tree costs would double per layer; extraction must still
    // pick every fusion and keep one value per layer.
    let mut src = String::from("graph g {\n  %x0 = input \"x\" : f32[T, 4]\n");
    for i in 0..200 {
        src += &format!("  %s{i} = sigmoid(%x{i}) : f32[T, 4]\n  %m{i} = mul(%x{i}, %s{i}) : f32[T, 4]\n  %x{} = add(%x{i}, %m{i}) : f32[T, 4]\n", i + 1);
    }
    src += "  output \"y\" = %x200\n}\n";
    let mut g = egret_ir::parse(&src).unwrap();
    let mut cx = PassCx::default();
    PassManager::new(pipeline("fuse").unwrap())
        .run(&mut g, &mut cx, |_, _| {})
        .unwrap();
    let text = egret_ir::print(&g);
    assert_eq!(text.matches("silu(").count(), 200);
    assert_eq!(text.matches("sigmoid(").count(), 0);
    assert_eq!(g.len(), 401);
}
