//! Training against transformers: the loss (mean next-token cross-entropy) and the gradient
//! of every parameter, from `tools/make_fixtures.py` (`LlamaForCausalLM(labels=tokens)` and
//! `loss.backward()` in float32), on the interpreter and the CPU backend. Loss within 1e-5
//! relative, each gradient within 1e-4 relative L2.

mod common;

use common::{egret_err, egret_ok, fixture, TempDir};
use egret::train::{grads, GradBackend};
use egret_backends::llvm::CpuOptions;

const MODELS: &[&str] = &["gqa_untied", "mha_tied_rope_parameters", "odd_head_dim_mqa"];

fn reference(name: &str) -> (Vec<u32>, f32, egret_runtime::weights::Weights) {
    let d = fixture(&format!("tiny/{name}"));
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("grads.json")).unwrap()).unwrap();
    let toks = j["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let w = egret_runtime::weights::load(&d.join("grads.safetensors")).unwrap();
    (toks, j["loss"].as_f64().unwrap() as f32, w)
}

fn rel_l2(a: &[f32], b: &[f32]) -> f32 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num.sqrt() / den.sqrt().max(1e-30)) as f32
}

fn check(backend: &str, passes: &str) {
    let opts = CpuOptions::default();
    for name in MODELS {
        let (toks, want_loss, want) = reference(name);
        let src = egret::ModelSource::resolve(fixture(&format!("tiny/{name}")).to_str().unwrap())
            .unwrap();
        let m = egret::load_model(&src).unwrap();
        let be = match backend {
            "interp" => GradBackend::Interp,
            _ => GradBackend::Cpu {
                opts: &opts,
                threads: 2,
            },
        };
        let got = grads(&m.config, &m.params, &toks, passes, be).unwrap();
        let lrel = (got.loss - want_loss).abs() / want_loss.abs();
        assert!(
            lrel <= 1e-5,
            "{name} {backend} {passes}: loss {} vs {want_loss}",
            got.loss
        );
        assert_eq!(got.grads.len(), want.len(), "{name}: gradient count");
        for (pname, g) in &got.grads {
            let r = want
                .get(&format!("grad.{pname}"))
                .unwrap_or_else(|| panic!("{name}: transformers has no gradient for {pname}"));
            assert_eq!(g.shape, r.shape, "{name} {pname}");
            let e = rel_l2(&g.data, &r.data);
            assert!(
                e <= 1e-4,
                "{name} {backend} {passes}: {pname} relative L2 {e}"
            );
        }
    }
}

#[test]
fn gradients_match_transformers_on_the_interpreter() {
    check("interp", "none");
    check("interp", "default");
}

#[test]
fn gradients_match_transformers_on_the_cpu_backend() {
    check("cpu", "default");
}

#[test]
fn grad_cli_prints_the_loss_and_writes_every_gradient() {
    let t = TempDir::new("grad-cli");
    let d = fixture("tiny/gqa_untied");
    let (toks, want_loss, want) = reference("gqa_untied");
    let ids: Vec<String> = toks.iter().map(|x| x.to_string()).collect();
    let out = t.0.join("g.safetensors");
    let line = egret_ok(&[
        "grad",
        d.to_str().unwrap(),
        "--tokens",
        &ids.join(","),
        "--backend",
        "interp",
        "--out",
        out.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert!((v["loss"].as_f64().unwrap() as f32 - want_loss).abs() <= 1e-5 * want_loss);
    let w = egret_runtime::weights::load(&out).unwrap();
    assert_eq!(w.len(), want.len());
    for (n, r) in want.iter() {
        let g = w.get(n).unwrap_or_else(|| panic!("missing {n}"));
        assert!(rel_l2(&g.data, &r.data) <= 1e-4, "{n}");
    }
    // Bad input: one token, an id out of range.
    let e = egret_err(&["grad", d.to_str().unwrap(), "--tokens", "3"]);
    assert!(e.contains("at least two tokens"), "{e}");
    let e = egret_err(&["grad", d.to_str().unwrap(), "--tokens", "3,1000"]);
    assert!(e.contains("out of range"), "{e}");
}

/// One `egret` AdamW step (clipping at 1.0) against `torch.optim.AdamW`: the new parameters,
/// and the updates themselves (`p' - p`, about `lr` per element) within 1e-3 relative L2.
fn adamw_step(backend: &str) {
    let opts = CpuOptions::default();
    for name in MODELS {
        let d = fixture(&format!("tiny/{name}"));
        let j: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("grads.json")).unwrap()).unwrap();
        let want = egret_runtime::weights::load(&d.join("adamw_step.safetensors")).unwrap();
        let (toks, want_loss, _) = reference(name);
        let m =
            egret::load_model(&egret::ModelSource::resolve(d.to_str().unwrap()).unwrap()).unwrap();
        let before = m.params.clone();
        let be = match backend {
            "interp" => GradBackend::Interp,
            _ => GradBackend::Cpu {
                opts: &opts,
                threads: 2,
            },
        };
        let mut tr = egret::train::Trainer::new(
            m.config,
            m.params,
            egret::train::AdamW::default(),
            "default",
            be,
        )
        .unwrap();
        let t = toks.len();
        let out = tr
            .train_step(&toks, &egret::train::targets(&toks), 1, t, 1e-3)
            .unwrap();
        assert!((out.loss - want_loss).abs() <= 1e-5 * want_loss, "{name}");
        let gn = j["grad_norm"].as_f64().unwrap() as f32;
        assert!(
            (out.grad_norm - gn).abs() <= 1e-4 * gn,
            "{name}: {} vs {gn}",
            out.grad_norm
        );
        assert_eq!(tr.step, 1);
        for (pname, w) in want.iter() {
            let got = tr.params[pname].to_f32_vec();
            let old = before[pname].to_f32_vec();
            assert!(rel_l2(&got, &w.data) <= 1e-6, "{name} {backend}: {pname}");
            let du: Vec<f32> = got.iter().zip(&old).map(|(a, b)| a - b).collect();
            let dw: Vec<f32> = w.data.iter().zip(&old).map(|(a, b)| a - b).collect();
            let e = rel_l2(&du, &dw);
            assert!(
                e <= 1e-3,
                "{name} {backend}: update of {pname} relative L2 {e}"
            );
        }
    }
}

#[test]
fn one_adamw_step_matches_torch_on_the_interpreter() {
    adamw_step("interp");
}

#[test]
fn one_adamw_step_matches_torch_on_the_cpu_backend() {
    adamw_step("cpu");
}
