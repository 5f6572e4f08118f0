//! Prepares the GPU check bundle on a machine without a GPU: everything the runtime-only
//! `gpu_check` (runtime/examples/gpu_check.rs) needs on the lent GPU machine, which has no
//! Rust toolchain and no LLVM.
//!
//! ```text
//! cargo run --release --example gpu_bundle -- OUT
//! ```
//!
//! Writes under OUT:
//! - `conformance/<case>/`: the case's PTX artifact (entry `run`, sm_80) and, per size `N`,
//!   `n<N>.safetensors` with the inputs (`in.*`), parameters (`param.*`) and the reference
//!   interpreter's outputs (`want.*`), all as f32 (integer inputs are small and exact);
//! - `smollm2-ptx/` and `smollm2-cpu/`: SmolLM2-135M's `step` compiled for the GPU (sm_80) and
//!   for any x86-64-v3 CPU, to run on weights made on the GPU machine;
//! - `conformance-tc/<case>/`: the matmul cases compiled for tensor cores (bf16 operands);
//!   `conformance-wgmma/<case>/` the same for sm_90a (`wgmma` where operands are bf16), and
//!   `conformance-tma/<case>/` with the `wgmma` ring filled by the tensor memory accelerator;
//! - `bench-matmul/`, `bench-matmul-tc/`, `bench-attention/`, `bench-attention-tc/`: a
//!   matmul and a causal attention for timing (f32, and on tensor cores);
//!   `bench-matmul-bf16/` and `bench-attention-bf16/`: the same on tensor cores with their
//!   operands stored bf16, and `bench-matmul-wgmma/` and `bench-attention-wgmma/` the same
//!   for sm_90a (`wgmma`), `bench-matmul-tma/` the `wgmma` matmul fed by the tensor memory
//!   accelerator; `bench-attention-bwd/` and `bench-attention-bwd-tc/`: that
//!   attention's forward and backward (f32, and on tensor cores from bf16 operands);
//! - `grads/<fixture>/`: each tiny transformers fixture's gradient graph (PTX, entry `run`)
//!   with the fixture's weights, tokens and transformers' loss and gradients;
//!   `grads-bf16/<fixture>/` the same with bf16 matmuls and attention (`--tensor-cores`),
//!   and that program's own loss and gradients from the simulator (`grads-sim.safetensors`);
//! - `smollm2-train/`, `smollm2-train-tc/`, `smollm2-train-cpu/`: SmolLM2-135M's AdamW
//!   `train_step` for the GPU (f32, and with tensor cores) and the CPU: the GPU's losses are
//!   checked against the CPU's, and timed.

use std::collections::HashMap;
use std::path::Path;

use egret_backends::artifact::{write_ptx_artifact, EntrySpec};
use egret_backends::llvm::CpuOptions;
use egret_backends::ptx::{schedule_options, PtxOptions};
use egret_backends::schedule::schedule_with;
use egret_ir::{DType, Graph, Interpreter, Op, Tensor};
use egret_runtime::tensor::HostTensor;
use egret_runtime::weights::{save_safetensors, SaveDType, Weights};

include!("../tests/common/conformance_cases.rs");

const SIZES: &[i64] = &[1, 3, 17, 63, 65, 1000];

/// The most bytes of inputs and parameters one size of a conformance case carries in the
/// bundle: random f32s barely compress, and a call carries 64 MiB in all. Larger sizes are
/// left out (`matmul-split-k` at N = 1000, 35 MB; its splitting sizes are small).
const CASE_BYTES_MAX: usize = 8 << 20;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// SplitMix64: the inputs' random numbers.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

fn ptx_artifact(g: &Graph, dir: &Path) -> Res<()> {
    ptx_artifact_with(g, dir, &PtxOptions::default())
}

fn ptx_artifact_with(g: &Graph, dir: &Path, opts: &PtxOptions) -> Res<()> {
    let prog = schedule_with(g, schedule_options(opts))?;
    let spec = EntrySpec::inference();
    write_ptx_artifact(&[("run", &prog)], opts, serde_json::Value::Null, &spec, dir)?;
    Ok(())
}

fn host(t: &Tensor) -> HostTensor {
    HostTensor::new(t.shape().to_vec(), t.to_f32_vec())
}

fn conformance(out: &Path) -> Res<()> {
    for (name, body) in CASES {
        let g = egret_ir::parse(&format!("graph {} {{{body}\n}}", name.replace('-', "_")))?;
        let dir = out.join("conformance").join(name);
        ptx_artifact(&g, &dir)?;
        let tc = PtxOptions {
            tensor_cores: true,
            ..PtxOptions::default()
        };
        // The matmul cases again on tensor cores (checked at bf16 tolerance on the same
        // inputs, which stay in `conformance/<case>/`).
        let tc_dir = out.join("conformance-tc").join(name);
        if name.contains("matmul") {
            ptx_artifact_with(&g, &tc_dir, &tc)?;
            let wgmma = PtxOptions {
                arch: "sm_90a".into(),
                ..tc.clone()
            };
            ptx_artifact_with(&g, &out.join("conformance-wgmma").join(name), &wgmma)?;
            let tma = PtxOptions { tma: true, ..wgmma };
            ptx_artifact_with(&g, &out.join("conformance-tma").join(name), &tma)?;
        }
        for &n in SIZES {
            let mut rng = Rng(n as u64 * 7919 + name.len() as u64);
            let b = HashMap::from([("N".to_string(), n)]);
            // (the inputs and parameters with their shapes at this size)
            let mut bound = vec![];
            for node in &g.nodes {
                if matches!(node.op, Op::Input { .. } | Op::Param { .. }) {
                    bound.push((node, node.ty.shape.eval(&b)?));
                }
            }
            let bytes: usize = bound
                .iter()
                .map(|(_, s)| 4 * s.iter().product::<usize>())
                .sum();
            if bytes > CASE_BYTES_MAX {
                eprintln!("conformance case {name}: N = {n} left out ({bytes} bytes of inputs)");
                continue;
            }
            let (mut inputs, mut params) = (HashMap::new(), HashMap::new());
            for (node, shape) in bound {
                let (map, pname) = match &node.op {
                    Op::Input { name } => (&mut inputs, name),
                    Op::Param { name } => (&mut params, name),
                    _ => continue,
                };
                let len: usize = shape.iter().product();
                let t = match node.ty.dtype {
                    DType::I64 | DType::I32 => Tensor::from_i64(
                        shape,
                        (0..len).map(|_| (rng.next() % 4) as i64).collect(),
                    )?,
                    _ => Tensor::from_f32(shape, (0..len).map(|_| rng.uniform()).collect())?,
                };
                map.insert(pname.clone(), t);
            }
            let want = Interpreter::new(&g)?.run(&inputs, &params)?;
            let mut w = Weights::new();
            for (k, t) in &inputs {
                w.insert(format!("in.{k}"), host(t));
            }
            for (k, t) in &params {
                w.insert(format!("param.{k}"), host(t));
            }
            for (k, t) in &want {
                w.insert(format!("want.{k}"), host(t));
            }
            save_safetensors(&dir.join(format!("n{n}.safetensors")), &w, SaveDType::F32)?;
        }
        eprintln!("conformance case {name}");
    }
    Ok(())
}

fn main() -> Res<()> {
    let out = std::env::args().nth(1).ok_or("usage: gpu_bundle OUT_DIR")?;
    let out = Path::new(&out);
    std::fs::create_dir_all(out)?;
    conformance(out)?;
    let cfg = egret_models::presets::preset("smollm2-135m")?;
    egret::gpu::compile_artifact(
        &cfg,
        "default",
        &PtxOptions::default(),
        &out.join("smollm2-ptx"),
    )?;
    egret::cpu::compile_artifact(
        &cfg,
        "default",
        &CpuOptions {
            cpu: "x86-64-v3".into(),
            ..CpuOptions::default()
        },
        &out.join("smollm2-cpu"),
    )?;
    // `y = a·w` over `[M, K]·[K, N]` operands of `dtype`, as graph `name`.
    let matmul_graph = |name: &str, dtype: &str| {
        egret_ir::parse(&format!(
            "graph {name} {{\n  %a = input \"a\" : {dtype}[M, K]\n  %w = input \"w\" : {dtype}[K, N]\n  %y = matmul(%a, %w) : {dtype}[M, N]\n  output \"y\" = %y\n}}"
        ))
    };
    let tc = PtxOptions {
        tensor_cores: true,
        ..PtxOptions::default()
    };
    let matmul = matmul_graph("bench_matmul", "f32")?;
    ptx_artifact(&matmul, &out.join("bench-matmul"))?;
    ptx_artifact_with(&matmul, &out.join("bench-matmul-tc"), &tc)?;
    // bf16 operands in memory, as cuBLAS's bf16 matmul takes them: the `cp.async` ring; and
    // on sm_90a `wgmma` (a graph of its own name, so its kernel has one for profilers).
    let matmul_bf16 = matmul_graph("bench_matmul_bf16", "bf16")?;
    ptx_artifact_with(&matmul_bf16, &out.join("bench-matmul-bf16"), &tc)?;
    let matmul_wgmma = matmul_graph("bench_matmul_wgmma", "bf16")?;
    let wgmma = PtxOptions {
        arch: "sm_90a".into(),
        ..tc.clone()
    };
    ptx_artifact_with(&matmul_wgmma, &out.join("bench-matmul-wgmma"), &wgmma)?;
    // and with its ring filled by the tensor memory accelerator (`PtxOptions::tma`).
    let matmul_tma = matmul_graph("bench_matmul_tma", "bf16")?;
    let tma = PtxOptions {
        tma: true,
        ..wgmma.clone()
    };
    ptx_artifact_with(&matmul_tma, &out.join("bench-matmul-tma"), &tma)?;
    // Causal attention over `[1, 16, T, 128]` operands of `dtype`, as graph `name`.
    let attention_graph = |name: &str, dtype: &str| {
        egret_ir::parse(&format!(
            "graph {name} {{\n  %q = input \"q\" : {dtype}[1, 16, T, 128]\n  %k = input \"k\" : {dtype}[1, 16, T, 128]\n  %v = input \"v\" : {dtype}[1, 16, T, 128]\n  %pos = iota[axis=1] : i64[1, T]\n  %o = fused_attention[scale=0.08838834764831845](%q, %k, %v, %pos) : {dtype}[1, 16, T, 128]\n  output \"o\" = %o\n}}"
        ))
    };
    let attn = attention_graph("bench_attention", "f32")?;
    ptx_artifact(&attn, &out.join("bench-attention"))?;
    ptx_artifact_with(&attn, &out.join("bench-attention-tc"), &tc)?;
    // bf16 operands in memory, as SDPA takes them: keys and values through the `cp.async`
    // ring.
    let attn_bf16 = attention_graph("bench_attention_bf16", "bf16")?;
    ptx_artifact_with(&attn_bf16, &out.join("bench-attention-bf16"), &tc)?;
    // and on sm_90a, both products on `wgmma`.
    let attn_wgmma = attention_graph("bench_attention_wgmma", "bf16")?;
    ptx_artifact_with(&attn_wgmma, &out.join("bench-attention-wgmma"), &wgmma)?;
    // Attention's backward over the same sizes (the forward, the log-sum-exp, `delta` and
    // the three gradients, as a training step computes them): f32 (warp per row), and on
    // tensor cores with operands of `bf16` (`mma` tiles, `mma_attn_bwd`).
    let attention_backward_graph = |name: &str, dtype: &str| {
        egret_ir::parse(&format!(
            "graph {name} {{
  %q = input \"q\" : {dtype}[1, 16, T, 128]
  %k = input \"k\" : {dtype}[1, 16, T, 128]
  %v = input \"v\" : {dtype}[1, 16, T, 128]
  %do = input \"do\" : {dtype}[1, 16, T, 128]
  %pos = iota[axis=1] : i64[1, T]
  %o = fused_attention[scale=0.08838834764831845](%q, %k, %v, %pos) : {dtype}[1, 16, T, 128]
  %lse = attention_lse[scale=0.08838834764831845](%q, %k, %pos) : f32[1, 16, T]
  %o32 = cast(%o) : f32[1, 16, T, 128]
  %do32 = cast(%do) : f32[1, 16, T, 128]
  %m = mul(%do32, %o32) : f32[1, 16, T, 128]
  %r = reduce_sum[axis=3](%m) : f32[1, 16, T, 1]
  %delta = reshape(%r) : f32[1, 16, T]
  %dq = attention_grad_q[scale=0.08838834764831845](%q, %k, %v, %pos, %do, %lse, %delta) : {dtype}[1, 16, T, 128]
  %dk = attention_grad_k[scale=0.08838834764831845](%q, %k, %v, %pos, %do, %lse, %delta) : {dtype}[1, 16, T, 128]
  %dv = attention_grad_v[scale=0.08838834764831845](%q, %k, %v, %pos, %do, %lse, %delta) : {dtype}[1, 16, T, 128]
  output \"dq\" = %dq
  output \"dk\" = %dk
  output \"dv\" = %dv
}}"
        ))
    };
    let bwd = attention_backward_graph("bench_attention_bwd", "f32")?;
    ptx_artifact(&bwd, &out.join("bench-attention-bwd"))?;
    let bwd_tc = attention_backward_graph("bench_attention_bwd_tc", "bf16")?;
    ptx_artifact_with(&bwd_tc, &out.join("bench-attention-bwd-tc"), &tc)?;
    for name in ["gqa_untied", "mha_tied_rope_parameters", "odd_head_dim_mqa"] {
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tiny")
            .join(name);
        let cfg = egret::load_config(&egret::ModelSource::resolve(src.to_str().ok_or("path")?)?)?;
        let g = egret::train::grad_graph(&cfg, "default", None)?;
        for (sub, opts) in [("grads", PtxOptions::default()), ("grads-bf16", tc.clone())] {
            let dir = out.join(sub).join(name);
            ptx_artifact_with(&g, &dir, &opts)?;
            for f in ["model.safetensors", "grads.safetensors", "grads.json"] {
                std::fs::copy(src.join(f), dir.join(f))?;
            }
        }
        // The same bf16 program's loss and gradients on the simulator: what the GPU must
        // reproduce, its own rounding to bf16 included.
        let m = egret::load_model(&egret::ModelSource::resolve(src.to_str().ok_or("path")?)?)?;
        let j: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(src.join("grads.json"))?)?;
        let toks: Vec<u32> = j["tokens"]
            .as_array()
            .ok_or("tokens")?
            .iter()
            .filter_map(|x| x.as_u64().map(|t| t as u32))
            .collect();
        let sim = egret::train::grads(
            &m.config,
            &m.params,
            &toks,
            "default",
            egret::train::GradBackend::Simt { opts: &tc },
            None,
        )?;
        let mut w = Weights::new().with_source("simulated bf16 gradients");
        w.insert("loss".into(), HostTensor::new(vec![1], vec![sim.loss]));
        for (n, t) in sim.grads {
            w.insert(format!("grad.{n}"), t);
        }
        save_safetensors(
            &out.join("grads-bf16")
                .join(name)
                .join("grads-sim.safetensors"),
            &w,
            SaveDType::F32,
        )?;
    }
    egret::train::compile_train_artifact_ptx(
        &cfg,
        "default",
        &PtxOptions::default(),
        &egret::train::AdamW::default(),
        egret::train::TrainEntries::Step,
        None,
        &out.join("smollm2-train"),
    )?;
    // and with tensor cores (bf16 matmuls and attention, its backward in `mma` tiles).
    egret::train::compile_train_artifact_ptx(
        &cfg,
        "default",
        &tc,
        &egret::train::AdamW::default(),
        egret::train::TrainEntries::Step,
        None,
        &out.join("smollm2-train-tc"),
    )?;
    egret::train::compile_train_artifact(
        &cfg,
        "default",
        &CpuOptions {
            cpu: "x86-64-v3".into(),
            ..CpuOptions::default()
        },
        &egret::train::AdamW::default(),
        egret::train::TrainEntries::Step,
        None,
        &out.join("smollm2-train-cpu"),
    )?;
    println!("{}", out.display());
    Ok(())
}
