//! Logits of tiny random LLaMA models against Hugging Face transformers (fixtures made by
//! `tools/make_fixtures.py`): max-abs diff ≤ 1e-4 × max(1, max|ref|), with and without passes.

mod common;

use common::{egret_ok, fixture, TINY_MODELS as MODELS};
use egret::{load_model, InterpModel, ModelSource};

struct Fixture {
    tokens: Vec<u32>,
    logits: Vec<Vec<f32>>,
}

fn read(name: &str) -> Fixture {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture(&format!("tiny/{name}/logits.json"))).unwrap(),
    )
    .unwrap();
    let tokens = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let logits = v["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    Fixture { tokens, logits }
}

/// A tiny model compiled for this CPU (2 threads).
fn cpu_model(name: &str, passes: &str) -> egret::cpu::CompiledModel {
    let src = ModelSource::resolve(fixture(&format!("tiny/{name}")).to_str().unwrap()).unwrap();
    let m = load_model(&src).unwrap();
    let opts = egret_backends::llvm::CpuOptions::default();
    egret::cpu::CompiledModel::new(m.config, m.params, passes, &opts, 2).unwrap()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let mut d = 0f32;
    let mut m = 0f32;
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.len(), y.len());
        for (p, q) in x.iter().zip(y) {
            d = d.max((p - q).abs());
            m = m.max(q.abs());
        }
    }
    (d, m)
}

#[test]
fn tiny_models_match_transformers_on_the_interpreter() {
    for name in MODELS {
        let fx = read(name);
        for passes in ["none", "default"] {
            let src =
                ModelSource::resolve(fixture(&format!("tiny/{name}")).to_str().unwrap()).unwrap();
            let m = load_model(&src).unwrap();
            let mut im = InterpModel::new(m.config, m.params, passes).unwrap();
            let got = im.logits_all(&fx.tokens).unwrap();
            let (d, maxref) = max_diff(&got, &fx.logits);
            let tol = 1e-4 * maxref.max(1.0);
            assert!(d <= tol, "{name} ({passes}): max |diff| {d} > {tol}");
        }
    }
}

#[test]
fn tiny_models_match_transformers_on_the_cpu_backend() {
    for name in MODELS {
        let fx = read(name);
        for passes in ["none", "default"] {
            let got = cpu_model(name, passes).logits_all(&fx.tokens).unwrap();
            let (d, maxref) = max_diff(&got, &fx.logits);
            let tol = 1e-4 * maxref.max(1.0);
            assert!(d <= tol, "{name} ({passes}, cpu): max |diff| {d} > {tol}");
        }
    }
}

#[test]
fn long_prompts_on_the_cpu_backend_match_the_interpreter() {
    // 40 tokens: prompt attention takes the tiled kernel (at least a micro-kernel block of
    // query rows, several row blocks and key blocks), which the fixtures' short prompts do
    // not reach.
    let tokens: Vec<u32> = (0..40u32).map(|i| (i * 37 + 5) % 60 + 1).collect();
    for name in MODELS {
        let src = ModelSource::resolve(fixture(&format!("tiny/{name}")).to_str().unwrap()).unwrap();
        let m = load_model(&src).unwrap();
        let mut im = InterpModel::new(m.config, m.params, "default").unwrap();
        let want = im.logits_all(&tokens).unwrap();
        let got = cpu_model(name, "default").logits_all(&tokens).unwrap();
        let (d, maxref) = max_diff(&got, &want);
        let tol = 1e-4 * maxref.max(1.0);
        assert!(d <= tol, "{name}: max |diff| {d} > {tol}");
    }
}

#[test]
fn cpu_decode_with_kv_cache_matches_full_prefill() {
    use egret_runtime::generate::LanguageModel;
    let fx = read("gqa_untied");
    let mut cm = cpu_model("gqa_untied", "default");
    let k = 3;
    let mut rows = vec![cm.prefill(&fx.tokens[..k]).unwrap()];
    for &t in &fx.tokens[k..] {
        rows.push(cm.decode(t).unwrap());
    }
    let (d, maxref) = max_diff(&rows, &fx.logits[k - 1..]);
    assert!(d <= 1e-4 * maxref.max(1.0), "max |diff| {d}");
}

#[test]
fn logits_cli_prints_every_position() {
    let fx = read("gqa_untied");
    let toks: Vec<String> = fx.tokens.iter().map(|t| t.to_string()).collect();
    let dir = fixture("tiny/gqa_untied");
    let out = egret_ok(&[
        "logits",
        dir.to_str().unwrap(),
        "--tokens",
        &toks.join(","),
        "--backend",
        "interp",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["shape"], serde_json::json!([fx.tokens.len(), 101]));
    let got: Vec<Vec<f32>> = v["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect();
    let (d, maxref) = max_diff(&got, &fx.logits);
    assert!(d <= 1e-4 * maxref.max(1.0), "max |diff| {d}");
}

#[test]
fn decode_with_kv_cache_matches_full_prefill() {
    // Logits after prefill(t[..k]) + decode(t[k]) ... equal the full-sequence logits.
    use egret_runtime::generate::LanguageModel;
    let fx = read("odd_head_dim_mqa");
    let src = ModelSource::resolve(fixture("tiny/odd_head_dim_mqa").to_str().unwrap()).unwrap();
    let m = load_model(&src).unwrap();
    let mut im = InterpModel::new(m.config, m.params, "default").unwrap();
    let k = 4;
    let mut rows = vec![im.prefill(&fx.tokens[..k]).unwrap()];
    for &t in &fx.tokens[k..] {
        rows.push(im.decode(t).unwrap());
    }
    let (d, maxref) = max_diff(&rows, &fx.logits[k - 1..]);
    assert!(d <= 1e-4 * maxref.max(1.0), "max |diff| {d}");
}
