//! The CPU backend's shared-library path (the payload artifacts will carry): a program
//! compiled to a `.so`, loaded by the runtime without LLVM, computes what the JIT computes.

mod common;

use std::collections::HashMap;

use common::TempDir;
use egret_backends::llvm::{compile_shared_library, CpuOptions};
use egret_backends::schedule::schedule;
use egret_runtime::cpu::{load_kernel_library, CpuExecutor, HostData, HostValue};

#[test]
fn shared_library_matches_the_interpreter() {
    let src = "graph lib {\n  %x = input \"x\" : f32[T, 8]\n  %w = param \"w\" : f32[4, 8]\n  %g = param \"g\" : f32[8]\n  %wt = permute[perm=[1, 0]](%w) : f32[8, 4]\n  %y = rms_norm_matmul[eps=1e-5](%x, %g, %wt) : f32[T, 4]\n  %t = tanh(%y) : f32[T, 4]\n  output \"y\" = %t\n}";
    let g = egret_ir::parse(src).unwrap();
    let tmp = TempDir::new("solib");
    let so = tmp.0.join("kernels.so");
    let prog = schedule(&g).unwrap();
    let plan = compile_shared_library(&[&prog], &CpuOptions::default(), &so)
        .unwrap()
        .remove(0);
    assert!(so.is_file());
    let lib = load_kernel_library(&so, &plan).unwrap();
    let mut ex = CpuExecutor::new(plan, lib.fns.clone(), 2).unwrap();
    let w: Vec<f32> = (0..32).map(|i| (i as f32 * 0.37).sin()).collect();
    let gw: Vec<f32> = (0..8).map(|i| 1.0 + i as f32 * 0.1).collect();
    let x: Vec<f32> = (0..24).map(|i| (i as f32 * 0.61).cos()).collect();
    let params: HashMap<String, (Vec<usize>, std::sync::Arc<Vec<f32>>)> = [
        (
            "w".to_string(),
            (vec![4, 8], std::sync::Arc::new(w.clone())),
        ),
        ("g".to_string(), (vec![8], std::sync::Arc::new(gw.clone()))),
    ]
    .into_iter()
    .collect();
    ex.bind_params(&|n: &str| params.get(n).cloned()).unwrap();
    let mut inputs = HashMap::new();
    inputs.insert(
        "x".to_string(),
        HostValue {
            shape: vec![3, 8],
            data: HostData::F32(x.clone()),
        },
    );
    let out = ex.run(&inputs).unwrap();
    let HostData::F32(got) = &out["y"].data else {
        panic!("f32 output")
    };
    // Reference: the interpreter.
    let it = egret_ir::Interpreter::new(&g).unwrap();
    let mut ti = HashMap::new();
    ti.insert(
        "x".to_string(),
        egret_ir::Tensor::from_f32(vec![3, 8], x).unwrap(),
    );
    let mut tp = HashMap::new();
    tp.insert(
        "w".to_string(),
        egret_ir::Tensor::from_f32(vec![4, 8], w).unwrap(),
    );
    tp.insert(
        "g".to_string(),
        egret_ir::Tensor::from_f32(vec![8], gw).unwrap(),
    );
    let want = it.run(&ti, &tp).unwrap()["y"].to_f32_vec();
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-5, "{a} vs {b}");
    }
    // A missing library is a clear error.
    let err = load_kernel_library(&tmp.0.join("missing.so"), ex.plan())
        .err()
        .expect("missing library must fail")
        .to_string();
    assert!(err.contains("cannot load kernel library"), "{err}");
}
