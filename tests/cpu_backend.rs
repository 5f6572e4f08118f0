//! CPU-backend behaviour beyond the conformance suite: half-precision weight storage stays
//! within its rounding of the f32 result, and a kernel that meets bad data reports it as an
//! error instead of reading out of bounds.

mod common;

use std::collections::HashMap;

use common::{egret_ok, fixture};
use egret_backends::kernel::PanelType;
use egret_backends::llvm::CpuOptions;
use egret_ir::Tensor;
use egret_runtime::cpu::{HostData, HostValue};

fn logits(weights: PanelType) -> Vec<Vec<f32>> {
    let src = egret::ModelSource::resolve(fixture("tiny/gqa_untied").to_str().unwrap()).unwrap();
    let m = egret::load_model(&src).unwrap();
    let opts = CpuOptions {
        weights,
        ..Default::default()
    };
    let mut cm = egret::cpu::CpuModel::new(m.config, m.params, "default", &opts, 2).unwrap();
    cm.logits_all(&[3, 17, 0, 42, 42, 9, 25, 1, 30]).unwrap()
}

#[test]
fn half_precision_weights_stay_within_their_rounding() {
    let full = logits(PanelType::F32);
    for (w, tol) in [(PanelType::BF16, 2e-2f32), (PanelType::F16, 2e-3)] {
        let half = logits(w);
        let scale = full.iter().flatten().fold(1f32, |m, x| m.max(x.abs()));
        let worst = full
            .iter()
            .flatten()
            .zip(half.iter().flatten())
            .map(|(a, b)| (a - b).abs() / scale)
            .fold(0f32, f32::max);
        assert!(
            worst < tol,
            "{w:?}: relative difference {worst} (tolerance {tol})"
        );
        assert!(worst > 0.0, "{w:?}: the weights were not actually rounded");
    }
}

#[test]
fn bf16_generation_of_the_tiny_model_runs_from_the_cli() {
    let d = fixture("tiny/gqa_untied");
    let out = egret_ok(&[
        "generate",
        d.to_str().unwrap(),
        "--tokens",
        "3,17,0",
        "--max-new-tokens",
        "5",
        "--weights-dtype",
        "bf16",
        "--json",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ids"].as_array().unwrap().len(), 5);
}

#[test]
fn out_of_range_index_in_a_kernel_is_an_error() {
    let g = egret_ir::parse("graph g {\n  %t = param \"table\" : f32[4, 3]\n  %i = input \"ids\" : i64[N]\n  %y = gather[axis=0](%t, %i) : f32[N, 3]\n  output \"y\" = %y\n}").unwrap();
    let mut params = HashMap::new();
    params.insert(
        "table".to_string(),
        Tensor::from_f32(vec![4, 3], vec![0.5; 12]).unwrap(),
    );
    let (mut ex, _code) = egret::cpu::executor(&g, &params, &CpuOptions::default(), 2).unwrap();
    let mut inputs = HashMap::new();
    inputs.insert(
        "ids".to_string(),
        HostValue {
            shape: vec![2],
            data: HostData::I64(vec![1, 4]),
        },
    );
    let err = ex
        .run(&inputs)
        .err()
        .expect("index 4 of 4 rows must fail")
        .to_string();
    assert!(err.contains("out of range"), "{err}");
    inputs.insert(
        "ids".to_string(),
        HostValue {
            shape: vec![2],
            data: HostData::I64(vec![1, 3]),
        },
    );
    let ok = ex.run(&inputs).unwrap();
    assert_eq!(ok["y"].data, HostData::F32(vec![0.5; 6]));
    // Inputs of the wrong shape or element type are refused before any kernel runs.
    inputs.insert(
        "ids".to_string(),
        HostValue {
            shape: vec![2],
            data: HostData::F32(vec![1.0, 3.0]),
        },
    );
    assert!(ex.run(&inputs).is_err());
    inputs.insert(
        "ids".to_string(),
        HostValue {
            shape: vec![3],
            data: HostData::I64(vec![1, 3]),
        },
    );
    assert!(ex.run(&inputs).is_err());
}
