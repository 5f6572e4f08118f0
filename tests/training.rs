//! Training against transformers: the loss (mean next-token cross-entropy) and the gradient
//! of every parameter, from `tools/make_fixtures.py` (`LlamaForCausalLM(labels=tokens)` and
//! `loss.backward()` in float32), on the interpreter, the CPU backend, the GPU's kernels on
//! the SIMT simulator and (when there is one) a GPU. In f32: loss within 1e-5 relative, each
//! gradient within 1e-4 relative L2; with bf16 matmuls, within `BF16_GRAD_TOLERANCE`.

mod common;

use common::{egret_err, egret_ok, fixture, TempDir, TINY_MODELS as MODELS};
use egret::train::{grads, GradBackend};
use egret_backends::llvm::CpuOptions;

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
    check_with(backend, passes, None)
}

/// Gradient tolerance (relative L2 against transformers): f32 throughout.
const F32_GRAD_TOLERANCE: f32 = 1e-4;

fn check_with(backend: &str, passes: &str, budget: Option<&dyn Fn(&str) -> u64>) {
    check_within(backend, passes, budget, false, F32_GRAD_TOLERANCE);
}

/// `tensor_cores`: GPU matmuls with bf16 operands (`tol` should allow for it).
fn check_within(
    backend: &str,
    passes: &str,
    budget: Option<&dyn Fn(&str) -> u64>,
    tensor_cores: bool,
    tol: f32,
) {
    let opts = CpuOptions::default();
    let gpu = egret_backends::ptx::PtxOptions {
        tensor_cores,
        ..Default::default()
    };
    for name in MODELS {
        let (toks, want_loss, want) = reference(name);
        let src = egret::ModelSource::resolve(fixture(&format!("tiny/{name}")).to_str().unwrap())
            .unwrap();
        let m = egret::load_model(&src).unwrap();
        let be = match backend {
            "interp" => GradBackend::Interp,
            "gpu" => GradBackend::Gpu {
                opts: &gpu,
                cache: true,
            },
            "simt" => GradBackend::Simt { opts: &gpu },
            _ => GradBackend::Cpu {
                opts: &opts,
                threads: 2,
                cache: true,
            },
        };
        let got = grads(
            &m.config,
            &m.params,
            &toks,
            passes,
            be,
            budget.map(|f| f(name)),
        )
        .unwrap();
        let lrel = (got.loss - want_loss).abs() / want_loss.abs();
        assert!(
            lrel <= tol / 10.0,
            "{name} {backend} {passes}: loss {} vs {want_loss}",
            got.loss
        );
        assert_eq!(got.grads.len(), want.len(), "{name}: gradient count");
        let mut worst = (0f32, "");
        for (pname, g) in &got.grads {
            let r = want
                .get(&format!("grad.{pname}"))
                .unwrap_or_else(|| panic!("{name}: transformers has no gradient for {pname}"));
            assert_eq!(g.shape, r.shape, "{name} {pname}");
            let e = rel_l2(&g.data, &r.data);
            assert!(
                e <= tol,
                "{name} {backend} {passes}: {pname} relative L2 {e}"
            );
            if e >= worst.0 {
                worst = (e, pname);
            }
        }
        eprintln!(
            "{name} {backend} {passes}: loss within {lrel:.2e}, worst gradient {} at {:.2e}",
            worst.1, worst.0
        );
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

/// On a GPU when this machine has one; says it was skipped otherwise.
#[test]
fn gradients_match_transformers_on_the_gpu_backend() {
    if common::gpu_or_skip("gradients_match_transformers_on_the_gpu_backend") {
        check("gpu", "default");
    }
}

/// The GPU's kernels on the SIMT simulator (no GPU needed), f32 throughout.
#[test]
fn gradients_match_transformers_on_the_simulated_gpu() {
    check("simt", "default");
}

/// bf16 gradient tolerance (relative L2 against transformers in f32): PyTorch's own bf16
/// autocast lands up to 4.6e-2 from the f32 gradients on these fixtures (median 2.0-2.2e-2,
/// `tools/bf16_grad_error.py`); bf16 operands carry a relative rounding of 2^-9 each, so
/// 1e-3 is out of reach of any bf16 matmul.
const BF16_GRAD_TOLERANCE: f32 = 5e-2;

/// The same with every matmul in bf16 (tensor cores where large; operands rounded).
#[test]
fn gradients_with_bf16_matmuls_on_the_simulated_gpu() {
    check_within("simt", "default", None, true, BF16_GRAD_TOLERANCE);
}

/// Attention's backward on tensor cores inside a model (`mma_attn_bwd`: head size 16, GQA 4
/// heads on 2, 80 tokens, so both its query and its key units take tiles, one partial),
/// on the simulator with bf16 matmuls, against the CPU backend in f32: loss within 5e-3
/// relative, every gradient within `BF16_GRAD_TOLERANCE`. The weights are 5 times Hugging
/// Face's initialisation, so that attention is far from uniform and the query and key
/// projections' gradients (which only `dq` and `dk` feed) are not noise. Its training
/// step's PTX with tensor cores assembles.
#[test]
fn tensor_core_attention_backward_in_a_model_on_the_simulated_gpu() {
    let text = std::fs::read_to_string(fixture("tiny/gqa_untied").join("config.json")).unwrap();
    let mut cfg = egret_models::LlamaConfig::from_hf_json(&text, "gqa_untied").unwrap();
    (cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads) = (64, 16, 4);
    cfg.num_key_value_heads = 2;
    let mut params = egret::train::random_init(&cfg, 7).unwrap();
    for (name, t) in params.iter_mut() {
        if !name.ends_with("norm.weight") {
            let v = t.to_f32_vec().iter().map(|x| x * 5.0).collect();
            *t = egret_ir::Tensor::from_f32(t.shape().to_vec(), v).unwrap();
        }
    }
    let ids: Vec<u32> = (0..80u32)
        .map(|i| (i * 37 + 11) % cfg.vocab_size as u32)
        .collect();
    let cpu = CpuOptions::default();
    let want = grads(
        &cfg,
        &params,
        &ids,
        "default",
        GradBackend::Cpu {
            opts: &cpu,
            threads: 2,
            cache: false,
        },
        None,
    )
    .unwrap();
    let gpu = egret_backends::ptx::PtxOptions {
        tensor_cores: true,
        ..Default::default()
    };
    let got = grads(
        &cfg,
        &params,
        &ids,
        "default",
        GradBackend::Simt { opts: &gpu },
        None,
    )
    .unwrap();
    let lrel = (got.loss - want.loss).abs() / want.loss.abs();
    assert!(lrel <= 5e-3, "loss {} vs {}", got.loss, want.loss);
    for ((name, g), (wname, w)) in got.grads.iter().zip(&want.grads) {
        assert_eq!(name, wname);
        let e = rel_l2(&g.data, &w.data);
        eprintln!("{name}: relative L2 {e:.2e}");
        assert!(e <= BF16_GRAD_TOLERANCE, "{name}: relative L2 {e}");
    }
    // Its AdamW training step with tensor cores assembles for sm_80 and sm_90.
    for arch in ["sm_80", "sm_90"] {
        let t = TempDir::new(&format!("train-ptx-tc-{arch}"));
        let opts = egret_backends::ptx::PtxOptions {
            arch: arch.into(),
            tensor_cores: true,
            tma: false,
        };
        let adamw = egret::train::AdamW::default();
        let dir = egret::train::compile_train_artifact_ptx(
            &cfg,
            "default",
            &opts,
            &adamw,
            egret::train::TrainEntries::StepAndGrads,
            None,
            &t.0.join("a"),
        )
        .unwrap();
        let ptx = std::fs::read_to_string(dir.join("kernels.ptx")).unwrap();
        assert!(ptx.contains("mma.sync"), "{arch}: no tensor cores");
        common::assemble_ptx(&format!("train_step tensor cores {arch}"), &ptx, arch);
    }
}

/// bf16 matmuls on a GPU (skipped without one).
#[test]
fn gradients_with_bf16_matmuls_on_the_gpu_backend() {
    if common::gpu_or_skip("gradients_with_bf16_matmuls_on_the_gpu_backend") {
        check_within("gpu", "default", None, true, BF16_GRAD_TOLERANCE);
    }
}

/// Every training step's PTX assembles for sm_80 and sm_90 (no GPU needed).
#[test]
fn training_step_ptx_assembles() {
    for name in MODELS {
        let src = egret::ModelSource::resolve(fixture(&format!("tiny/{name}")).to_str().unwrap())
            .unwrap();
        let cfg = egret::load_config(&src).unwrap();
        for arch in ["sm_80", "sm_90"] {
            let t = TempDir::new(&format!("train-ptx-{name}-{arch}"));
            let opts = egret_backends::ptx::PtxOptions {
                arch: arch.into(),
                ..Default::default()
            };
            let dir = egret::train::compile_train_artifact_ptx(
                &cfg,
                "default",
                &opts,
                &egret::train::AdamW::default(),
                egret::train::TrainEntries::StepAndGrads,
                None,
                &t.0.join("a"),
            )
            .unwrap();
            let ptx = std::fs::read_to_string(dir.join("kernels.ptx")).unwrap();
            common::assemble_ptx(&format!("train_step {name}"), &ptx, arch);
        }
    }
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
    if egret_runtime::gpu::gpu_available().is_err() {
        let e = egret_err(&[
            "grad",
            d.to_str().unwrap(),
            "--tokens",
            "3,1",
            "--backend",
            "gpu",
        ]);
        assert!(e.contains("no CUDA driver"), "{e}");
    }
}

/// `egret grad --artifact` runs a training artifact's `grads` entry point (compiled with the
/// train step, sharing its kernels): transformers' loss and gradients, with nothing compiled.
/// An inference artifact, one for another configuration, one without the entry point (from
/// an older egret), and an id out of the artifact's vocabulary are one clear error each.
#[test]
fn grad_from_a_training_artifact_matches_transformers() {
    let t = TempDir::new("grad-artifact");
    for name in ["gqa_untied", "mha_tied_rope_parameters"] {
        let d = fixture(&format!("tiny/{name}"));
        let d = d.to_str().unwrap();
        let (toks, want_loss, want) = reference(name);
        let ids: Vec<String> = toks.iter().map(|x| x.to_string()).collect();
        let art = t.0.join(name);
        let a = art.to_str().unwrap();
        egret_ok(&["compile", d, "--mode", "training", "-o", a]);
        let out = t.0.join(format!("{name}.safetensors"));
        let cache = t.0.join(format!("{name}-cache"));
        let run = std::process::Command::new(env!("CARGO_BIN_EXE_egret"))
            .args(["grad", d, "--tokens", &ids.join(","), "--artifact", a])
            .args(["--out", out.to_str().unwrap(), "--threads", "2"])
            .env("EGRET_CACHE", &cache)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success(), "{name}: {stderr}");
        assert!(!cache.exists(), "{name}: --artifact compiled anyway");
        let v: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&run.stdout).trim()).unwrap();
        let loss = v["loss"].as_f64().unwrap() as f32;
        assert!(
            (loss - want_loss).abs() <= 1e-5 * want_loss,
            "{name}: loss {loss} vs {want_loss}"
        );
        let w = egret_runtime::weights::load(&out).unwrap();
        assert_eq!(w.len(), want.len(), "{name}: gradient count");
        for (n, r) in want.iter() {
            let g = w.get(n).unwrap_or_else(|| panic!("{name}: missing {n}"));
            assert_eq!(g.shape, r.shape, "{name} {n}");
            let e = rel_l2(&g.data, &r.data);
            assert!(e <= F32_GRAD_TOLERANCE, "{name} {n}: relative L2 {e}");
        }
    }
    let d = fixture("tiny/gqa_untied");
    let d = d.to_str().unwrap();
    let a = t.0.join("gqa_untied");
    let a = a.to_str().unwrap();
    let grad = |model: &str, art: &str, tokens: &str| {
        egret_err(&["grad", model, "--tokens", tokens, "--artifact", art])
    };
    let e = grad(d, a, "3,1000");
    assert!(e.contains("out of range"), "{e}");
    // Through the library (no configuration checked before): ids and targets past the
    // vocabulary are refused, negative targets (none) accepted.
    let art = egret_runtime::Artifact::load(a).unwrap();
    let w = egret_runtime::weights::load(&fixture("tiny/gqa_untied").join("model.safetensors"))
        .unwrap();
    let mut s = egret_runtime::GradSession::new(&art, w, 2).unwrap();
    let v = egret::load_config(&egret::ModelSource::resolve(d).unwrap())
        .unwrap()
        .vocab_size;
    let ok = s.grads(&[3, 1], &[1, -1], 1, 2).unwrap();
    assert!(ok.loss.is_finite() && !ok.grads.is_empty());
    for (tokens, targets) in [([3, v as u32], [1, -1]), ([3, 1], [v as i64, -1])] {
        let e = s.grads(&tokens, &targets, 1, 2).unwrap_err().to_string();
        assert!(e.contains(&format!("token id {v} is out of range")), "{e}");
    }
    let e = s.grads(&[3, 1], &[1], 1, 2).unwrap_err().to_string();
    assert!(e.contains("needs as many tokens and targets"), "{e}");
    let other = fixture("tiny/mha_tied_rope_parameters");
    let e = grad(other.to_str().unwrap(), a, "3,1");
    assert!(e.contains("another model configuration"), "{e}");
    let out = common::egret(&[
        "grad",
        d,
        "--tokens",
        "3,1",
        "--artifact",
        a,
        "--passes",
        "none",
    ]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && e.contains("cannot be used with"),
        "{e}"
    );
    let inference = t.0.join("inference");
    let i = inference.to_str().unwrap();
    egret_ok(&["compile", d, "-o", i]);
    let e = grad(d, i, "3,1");
    assert!(e.contains("not training"), "{e}");
    // A training artifact without `grads` (as egret wrote them before it had one), its
    // content hash made to match.
    let manifest = std::path::Path::new(a).join("manifest.json");
    let mut m: egret_runtime::Manifest =
        serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
    m.entry_points.retain(|e| e.name != "grads");
    m.content_sha256 = m.content_hash();
    std::fs::write(&manifest, serde_json::to_string(&m).unwrap()).unwrap();
    let e = grad(d, a, "3,1");
    assert!(e.contains("no `grads` entry point"), "{e}");
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
                cache: true,
            },
        };
        let mut tr = egret::train::Trainer::new(
            m.config,
            m.params,
            egret::train::AdamW::default(),
            "default",
            be,
            None,
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
            let got = tr.param(pname).unwrap();
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

const SMALL_CONFIG: &str = r#"{"architectures":["LlamaForCausalLM"],"model_type":"llama","vocab_size":49152,"hidden_size":32,"intermediate_size":64,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,"rms_norm_eps":1e-5,"rope_theta":10000.0,"tie_word_embeddings":true,"max_position_embeddings":256,"bos_token_id":1,"eos_token_id":2}"#;

fn losses(log: &std::path::Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

/// `egret train` from random weights with the SmolLM2 tokenizer: the loss falls; 20 steps
/// straight and 10 + resume + 10 give the same losses bit for bit; checkpoints are Hugging
/// Face directories egret can load; the loss curve is drawn beside the log.
#[test]
fn train_from_scratch_resumes_exactly() {
    let t = TempDir::new("train");
    let cfg = t.0.join("config.json");
    std::fs::write(&cfg, SMALL_CONFIG).unwrap();
    let data = t.0.join("data.txt");
    let words =
        "in the beginning god created the heaven and the earth and the earth was without form";
    let text: String = (0..400)
        .map(|i| words.split(' ').nth((i * 7 + i / 3) % 16).unwrap())
        .collect::<Vec<_>>()
        .join(" ");
    std::fs::write(&data, text).unwrap();
    let gguf = common::smollm2_gguf();
    let (c, d, g) = (
        cfg.to_str().unwrap(),
        data.to_str().unwrap(),
        gguf.to_str().unwrap(),
    );
    let ck = t.0.join("ck");
    let (la, lb) = (t.0.join("a.jsonl"), t.0.join("b.jsonl"));
    let common_args = ["--data", d, "--steps", "20", "--batch", "2", "--seq", "16"];
    let mut a = vec![
        "train",
        c,
        "--init",
        "random",
        "--tokenizer",
        g,
        "--lr",
        "3e-3",
    ];
    a.extend(common_args);
    a.extend([
        "--warmup",
        "2",
        "--save",
        ck.to_str().unwrap(),
        "--save-every",
        "10",
    ]);
    a.extend(["--log", la.to_str().unwrap()]);
    egret_ok(&a);
    let straight = losses(&la);
    assert_eq!(straight.len(), 20);
    assert!(
        straight[19].1 < straight[0].1 - 1.0,
        "the loss should fall: {straight:?}"
    );
    let resumed_from = ck.join("checkpoint-10");
    let mut b = vec!["train", c, "--resume", resumed_from.to_str().unwrap()];
    b.extend(common_args);
    b.extend(["--log", lb.to_str().unwrap()]);
    egret_ok(&b);
    let resumed = losses(&lb);
    assert_eq!(
        resumed,
        straight[10..].to_vec(),
        "resume must continue exactly"
    );
    // The final checkpoint is a model directory egret runs.
    for f in [
        "config.json",
        "model.safetensors",
        "optimizer.safetensors",
        "tokenizer.json",
    ] {
        assert!(ck.join(f).is_file(), "{f}");
    }
    let out = egret_ok(&[
        "logits",
        ck.to_str().unwrap(),
        "--tokens",
        "1,2,3",
        "--backend",
        "interp",
    ]);
    assert!(out.starts_with("{\"shape\":[3,49152]"));
    let svg = std::fs::read_to_string(la.with_extension("svg")).unwrap();
    assert!(svg.contains("<polyline") && svg.contains("loss"));
    // Bad input.
    let e = egret_err(&[
        "train",
        c,
        "--init",
        "random",
        "--tokenizer",
        g,
        "--data",
        "/nonexistent.txt",
    ]);
    assert!(e.contains("/nonexistent.txt"), "{e}");
    let e = egret_err(&[
        "train",
        c,
        "--init",
        "random",
        "--tokenizer",
        g,
        "--data",
        d,
        "--seq",
        "100000",
    ]);
    assert!(e.contains("--seq"), "{e}");
}

/// The memory plan of a tiny model's training graph at the fixture's sequence length, as
/// `egret ir --mode training --stats` reports it.
fn memory(name: &str, extra: &[&str]) -> serde_json::Value {
    let (toks, _, _) = reference(name);
    let d = fixture(&format!("tiny/{name}"));
    let seq = toks.len().to_string();
    let mut args = vec![
        "ir",
        d.to_str().unwrap(),
        "--mode",
        "training",
        "--passes",
        "default",
        "--seq",
        &seq,
        "--stats",
    ];
    args.extend_from_slice(extra);
    let v: serde_json::Value = serde_json::from_str(egret_ok(&args).trim()).unwrap();
    v["memory"].clone()
}

/// A budget below the no-recomputation peak: the per-layer checkpointing baseline's peak.
fn forcing_budget(name: &str) -> u64 {
    let none = memory(name, &[])["peak_activation_bytes"].as_u64().unwrap();
    let layers = memory(name, &["--remat-baseline", "layers"])["peak_activation_bytes"]
        .as_u64()
        .unwrap();
    assert!(
        layers < none,
        "{name}: per-layer checkpointing should save memory"
    );
    layers
}

#[test]
fn gradients_are_unchanged_by_a_budget_that_forces_recomputation() {
    for name in MODELS {
        let budget = forcing_budget(name);
        let m = memory(name, &["--memory-budget", &budget.to_string()]);
        assert!(
            m["peak_activation_bytes"].as_u64().unwrap() <= budget,
            "{name}: {m}"
        );
        assert!(
            m["recompute_flops_ratio"].as_f64().unwrap() > 0.0,
            "{name}: {m}"
        );
        assert_eq!(m["budget_bytes"].as_u64(), Some(budget));
    }
    check_with("interp", "default", Some(&forcing_budget));
    check_with("cpu", "default", Some(&forcing_budget));
}

#[test]
fn a_budget_below_the_smallest_peak_is_an_error_naming_it() {
    let d = fixture("tiny/gqa_untied");
    let e = egret_err(&[
        "ir",
        d.to_str().unwrap(),
        "--mode",
        "training",
        "--seq",
        "9",
        "--stats",
        "--memory-budget",
        "1000",
    ]);
    assert!(e.contains("smallest activation peak"), "{e}");
    let e = egret_err(&[
        "grad",
        d.to_str().unwrap(),
        "--tokens",
        "3,17,0,42",
        "--memory-budget",
        "1000",
    ]);
    assert!(e.contains("smallest activation peak"), "{e}");
}

/// `egret train` compiles its step into the compile cache once: a second start reuses it,
/// `--no-cache` bypasses it.
#[test]
fn train_reuses_the_compile_cache() {
    let t = TempDir::new("train-cache");
    let cfg = t.0.join("config.json");
    std::fs::write(&cfg, SMALL_CONFIG).unwrap();
    let data = t.0.join("data.txt");
    std::fs::write(
        &data,
        "and god said let there be light and there was light ".repeat(20),
    )
    .unwrap();
    let gguf = common::smollm2_gguf();
    let run = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_egret"))
            .args([
                "train",
                cfg.to_str().unwrap(),
                "--init",
                "random",
                "--tokenizer",
            ])
            .arg(&gguf)
            .args([
                "--data",
                data.to_str().unwrap(),
                "--steps",
                "2",
                "--seq",
                "8",
            ])
            .args(extra)
            .env("EGRET_CACHE", &t.0)
            .env("EGRET_PROFILE", "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).contains("compile\ttrain_step")
    };
    assert!(run(&[]), "a cold start compiles the train step");
    assert!(!run(&[]), "a warm start reuses it");
    assert!(run(&["--no-cache"]), "--no-cache compiles afresh");
}

/// Owned arguments as `egret_ok` and `egret_err` take them.
fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// `egret train CONFIG --init random --tokenizer GGUF --data DATA --steps N` (`small_run`'s
/// files).
fn train_from_random([c, d, g]: &[&String; 3], steps: usize) -> Vec<String> {
    let n = steps.to_string();
    [
        "train",
        c,
        "--init",
        "random",
        "--tokenizer",
        g,
        "--data",
        d,
        "--steps",
        &n,
    ]
    .map(String::from)
    .to_vec()
}

/// A temporary run's files: `SMALL_CONFIG` and a data file of `text` in `t`, and the SmolLM2
/// GGUF for its tokenizer, as paths.
fn small_run(t: &TempDir, text: &str) -> [String; 3] {
    let cfg = t.0.join("config.json");
    std::fs::write(&cfg, SMALL_CONFIG).unwrap();
    let data = t.0.join("data.txt");
    std::fs::write(&data, text).unwrap();
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
    [path(&cfg), path(&data), path(&common::smollm2_gguf())]
}

/// `egret compile --mode training` writes a training artifact, and `egret train --artifact`
/// runs it: the same losses, bit for bit, as the step compiled through the cache (the same
/// code), with nothing compiled; an artifact compiled with other AdamW constants, or an
/// inference artifact, is refused with one clear error.
#[test]
fn a_compiled_training_artifact_trains_as_the_cached_step_does() {
    let t = TempDir::new("train-artifact");
    let words = "and the evening and the morning were the first day and god saw the light";
    let text: String = (0..300)
        .map(|i| words.split(' ').nth((i * 5 + i / 4) % 15).unwrap())
        .collect::<Vec<_>>()
        .join(" ");
    let [c, d, g] = small_run(&t, &text);
    let art = t.0.join("art");
    let a = art.to_str().unwrap();
    let out = egret_ok(&["compile", &c, "--mode", "training", "-o", a]);
    assert_eq!(out.trim(), a);
    // `egret train` from random weights, 6 steps unless `extra` says otherwise.
    let train = |extra: &[&str]| -> Vec<String> {
        let mut args = train_from_random(&[&c, &d, &g], 6);
        args.extend(["--batch", "2", "--seq", "16", "--lr", "3e-3"].map(String::from));
        args.extend(extra.iter().map(|x| x.to_string()));
        args
    };
    let cached_log = t.0.join("cached.jsonl");
    egret_ok(&strs(&train(&["--log", cached_log.to_str().unwrap()])));
    let cached = losses(&cached_log);
    // (with a compile cache of its own, which the run must leave empty: it compiles nothing)
    let cache = t.0.join("cache");
    let log = t.0.join("artifact.jsonl");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_egret"))
        .args(train(&["--artifact", a, "--log", log.to_str().unwrap()]))
        .env("EGRET_CACHE", &cache)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !cache.join("artifacts").exists(),
        "--artifact compiled the step anyway"
    );
    let compiled = losses(&log);
    assert_eq!(cached.len(), 6);
    assert_eq!(cached, compiled);
    // Under a memory budget that forces recomputation (per-layer checkpointing's peak for a
    // batch of 2 × 64, where it saves memory: at 16 tokens the logits dominate), placed as
    // the artifact is compiled: the cached step's losses under that budget again.
    let shape = ["--batch", "2", "--seq", "64"];
    let stats = |extra: &[&str]| -> u64 {
        let mut args = vec!["ir", &c, "--mode", "training"];
        args.extend(shape);
        args.extend(extra);
        args.push("--stats");
        let v: serde_json::Value = serde_json::from_str(egret_ok(&args).trim()).unwrap();
        v["memory"]["peak_activation_bytes"].as_u64().unwrap()
    };
    let budget = stats(&["--remat-baseline", "layers"]);
    assert!(
        budget < stats(&[]),
        "per-layer checkpointing should save memory"
    );
    let budget = budget.to_string();
    let b = t.0.join("budget");
    let mut args = vec![
        "compile",
        &c,
        "--mode",
        "training",
        "--memory-budget",
        &budget,
    ];
    args.extend(shape);
    args.extend(["-o", b.to_str().unwrap()]);
    egret_ok(&args);
    let train_b = |extra: &[&str]| {
        let mut args = train_from_random(&[&c, &d, &g], 2);
        args.extend(shape.iter().chain(extra).map(|x| x.to_string()));
        egret_ok(&strs(&args));
    };
    let (cached_log, log) = (t.0.join("cached-b.jsonl"), t.0.join("artifact-b.jsonl"));
    train_b(&[
        "--memory-budget",
        &budget,
        "--log",
        cached_log.to_str().unwrap(),
    ]);
    train_b(&[
        "--artifact",
        b.to_str().unwrap(),
        "--log",
        log.to_str().unwrap(),
    ]);
    assert_eq!(losses(&cached_log).len(), 2);
    assert_eq!(losses(&cached_log), losses(&log));
    // (the budget was applied: the step recomputes, so it has more kernel calls)
    let calls = |d: &std::path::Path| {
        let m: egret_runtime::Manifest =
            serde_json::from_str(&std::fs::read_to_string(d.join("manifest.json")).unwrap())
                .unwrap();
        m.entry_points[0].plan.kernels.len()
    };
    assert!(calls(&b) > calls(&art), "{} vs {}", calls(&b), calls(&art));
    let e = egret_err(&strs(&train(&["--artifact", a, "--weight-decay", "0.1"])));
    assert!(e.contains("compiled with AdamW"), "{e}");
    let inference = t.0.join("inference");
    let i = inference.to_str().unwrap();
    egret_ok(&["compile", &c, "-o", i]);
    let e = egret_err(&strs(&train(&["--artifact", i])));
    assert!(e.contains("not training"), "{e}");
}

/// `--save` into a folder that holds other things keeps them (a log written there, notes,
/// `--save-every`'s checkpoints); a folder with another program's files of a checkpoint's
/// names (a `config.json` not from egret) is refused before any training.
#[test]
fn saving_a_checkpoint_keeps_what_else_is_in_its_folder() {
    let t = TempDir::new("save-keeps");
    let [c, d, g] = small_run(&t, &"the light was good and the light was day ".repeat(20));
    let run = t.0.join("run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("notes.txt"), "keep me").unwrap();
    let log = run.join("log.jsonl");
    let (l, r) = (log.to_str().unwrap(), run.to_str().unwrap());
    let args = |save: &str| -> Vec<String> {
        let mut args = train_from_random(&[&c, &d, &g], 4);
        args.extend(
            [
                "--seq",
                "16",
                "--save",
                save,
                "--save-every",
                "2",
                "--log",
                l,
            ]
            .map(String::from),
        );
        args
    };
    egret_ok(&strs(&args(r)));
    for kept in ["notes.txt", "log.jsonl", "checkpoint-2/model.safetensors"] {
        assert!(run.join(kept).is_file(), "{kept} is gone");
    }
    assert!(run.join("trainer_state.json").is_file());
    // (again over it: an egret checkpoint now, whose other entries stay)
    egret_ok(&strs(&args(r)));
    assert_eq!(
        std::fs::read_to_string(run.join("notes.txt")).unwrap(),
        "keep me"
    );
    let other = t.0.join("hf-trainer-output");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("config.json"), "{}").unwrap();
    let e = egret_err(&strs(&args(other.to_str().unwrap())));
    assert!(e.contains("not an egret checkpoint"), "{e}");
    assert_eq!(
        std::fs::read_to_string(other.join("config.json")).unwrap(),
        "{}"
    );
}
