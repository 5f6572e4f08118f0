//! Training on the IR: the loss graph (`egret_models::build_training`) differentiated by
//! `egret_passes::autodiff`, optimised, and run on the interpreter or the CPU backend.
//! `egret grad` prints the loss and writes every gradient.

use std::collections::HashMap;
use std::path::Path;

use egret_backends::llvm::CpuOptions;
use egret_ir::{Graph, Interpreter, Tensor};
use egret_models::{build_training, LlamaConfig};
use egret_passes::{pipeline, PassCx, PassManager};
use egret_runtime::cpu::{HostData, HostValue};
use egret_runtime::generate::check_ids;
use egret_runtime::tokenizer::Tokenizer;
use egret_runtime::weights::{save_safetensors, SaveDType, Weights};
use egret_runtime::HostTensor;

use crate::{EgretError, Result};

/// An activation-memory budget for checkpoint placement, with the batch shape it is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryBudget {
    pub bytes: u64,
    pub batch: usize,
    pub seq: usize,
}

/// Places checkpoints in a training graph (`egret_backends::remat::place`) when a budget
/// is given.
fn place(g: Graph, budget: Option<MemoryBudget>) -> Result<Graph> {
    let Some(m) = budget else { return Ok(g) };
    let b = HashMap::from([
        ("B".to_string(), m.batch as i64),
        ("T".to_string(), m.seq as i64),
    ]);
    Ok(egret_backends::remat::place(&g, m.bytes, &b)
        .map_err(|e| EgretError::Usage(e.to_string()))?
        .graph)
}

/// The loss graph with a `grad.<p>` output per parameter, not yet optimised as a whole.
/// When `passes` fuse, the forward graph is fused first, so that what becomes attention is
/// differentiated as attention (FlashAttention-2's backward: `egret_passes::autodiff`);
/// the other passes run once, on the whole graph, where they see the forward and the
/// backward together.
pub fn differentiated(cfg: &LlamaConfig, passes: &str) -> Result<Graph> {
    let mut fwd = build_training(cfg)?;
    let fuse: Vec<_> = pipeline(passes)?
        .into_iter()
        .filter(|p| p.name() == "fuse")
        .collect();
    PassManager::new(fuse).run(&mut fwd, &mut PassCx::default(), |_, _| {})?;
    Ok(egret_passes::autodiff::differentiate(&fwd, "loss")?)
}

/// The loss-and-gradients graph of a model: outputs `loss` and `grad.<name>` for every
/// parameter, after the pipeline `passes` and checkpoint placement under `budget`.
pub fn grad_graph(cfg: &LlamaConfig, passes: &str, budget: Option<MemoryBudget>) -> Result<Graph> {
    grad_graph_of(differentiated(cfg, passes)?, passes, budget)
}

/// `grad_graph` from the differentiated graph (`differentiated`).
fn grad_graph_of(mut g: Graph, passes: &str, budget: Option<MemoryBudget>) -> Result<Graph> {
    let pm = PassManager::new(pipeline(passes)?);
    pm.run(&mut g, &mut PassCx::default(), |_, _| {})?;
    place(g, budget)
}

/// The targets of a sequence for next-token prediction: `tokens[t + 1]`, and -1 (none) at
/// the last position.
pub fn targets(ids: &[u32]) -> Vec<i64> {
    ids.iter()
        .skip(1)
        .map(|&i| i as i64)
        .chain(std::iter::once(-1))
        .collect()
}

/// The loss and each parameter's gradient, by Hugging Face name (sorted).
pub use egret_runtime::GradOut as Grads;

/// Where gradients are computed.
pub enum GradBackend<'a> {
    Interp,
    Cpu {
        opts: &'a CpuOptions,
        threads: usize,
        /// `Trainer` takes its compiled step from the compile cache (else compiles afresh).
        cache: bool,
    },
    /// PTX on GPU 0 (no GPU: one clear error before compiling).
    Gpu {
        opts: &'a egret_backends::ptx::PtxOptions,
        cache: bool,
    },
    /// The GPU's kernels on the SIMT simulator (`egret_backends::simt`): no GPU needed;
    /// gradients only (the simulator runs graphs, not training sessions).
    Simt {
        opts: &'a egret_backends::ptx::PtxOptions,
    },
}

/// A sequence the loss is defined on: at least two tokens, each in the vocabulary.
fn check_sequence(cfg: &LlamaConfig, ids: &[u32]) -> Result<()> {
    if ids.len() < 2 {
        return Err(EgretError::Usage(
            "the loss needs at least two tokens (one to predict from, one to predict)".into(),
        ));
    }
    Ok(check_ids(ids, cfg.vocab_size)?)
}

/// `grads` from a training artifact compiled beforehand (`egret compile --mode training`,
/// `egret grad --artifact DIR`): its `grads` entry point, on `backend` (CPU or GPU, as its
/// target). The artifact must be for this configuration.
pub fn grads_from_artifact(
    cfg: &LlamaConfig,
    params: &HashMap<String, Tensor>,
    ids: &[u32],
    dir: &Path,
    backend: GradBackend,
) -> Result<Grads> {
    check_sequence(cfg, ids)?;
    let (art, threads) = training_artifact(cfg, dir, backend)?;
    let get = |n: &str| crate::cpu::param(params, n);
    let mut s = egret_runtime::GradSession::with_params(&art, &get, "the weights", threads)?;
    Ok(s.grads(ids, &targets(ids), 1, ids.len())?)
}

/// Loss and gradients of one sequence (batch 1) of at least two tokens.
pub fn grads(
    cfg: &LlamaConfig,
    params: &HashMap<String, Tensor>,
    ids: &[u32],
    passes: &str,
    backend: GradBackend,
    budget: Option<u64>,
) -> Result<Grads> {
    check_sequence(cfg, ids)?;
    let budget = budget.map(|bytes| MemoryBudget {
        bytes,
        batch: 1,
        seq: ids.len(),
    });
    let g = grad_graph(cfg, passes, budget)?;
    let t = ids.len();
    let tokens: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let positions: Vec<i64> = (0..t as i64).collect();
    let tg = targets(ids);
    let out: HashMap<String, HostValue> = match backend {
        GradBackend::Interp => {
            let i64t = |v: Vec<i64>| Tensor::from_i64(vec![1, t], v);
            let inputs = HashMap::from([
                ("tokens".to_string(), i64t(tokens)?),
                ("positions".to_string(), i64t(positions)?),
                ("targets".to_string(), i64t(tg)?),
            ]);
            Interpreter::new(&g)?
                .run(&inputs, params)?
                .into_iter()
                .map(|(k, v)| {
                    let data = HostData::F32(v.to_f32_vec());
                    let shape = v.shape().to_vec();
                    (k, HostValue { shape, data })
                })
                .collect()
        }
        GradBackend::Cpu { .. } | GradBackend::Gpu { .. } | GradBackend::Simt { .. } => {
            let host = |v: Vec<i64>| HostValue {
                shape: vec![1, t],
                data: HostData::I64(v),
            };
            let inputs = HashMap::from([
                ("tokens".to_string(), host(tokens)),
                ("positions".to_string(), host(positions)),
                ("targets".to_string(), host(tg)),
            ]);
            match backend {
                GradBackend::Gpu { opts, .. } => {
                    crate::gpu::executor(&g, params, opts)?.run(&inputs)?
                }
                GradBackend::Simt { opts } => {
                    crate::gpu::simt_executor(&g, params, opts)?.run(&inputs)?
                }
                GradBackend::Cpu { opts, threads, .. } => {
                    crate::cpu::executor(&g, params, opts, threads)?
                        .0
                        .run(&inputs)?
                }
                GradBackend::Interp => unreachable!("handled above"),
            }
        }
    };
    Ok(Grads::from_outputs(out)?)
}

/// Hyper-parameters of `egret train` that shape the compiled step.
pub use egret_passes::optim::AdamW;

/// The train-step graph: loss, gradients (clipped) and the AdamW update, after `passes`.
/// Inputs: `tokens`, `positions`, `targets` (`i64[B, T]`), `lr`, `bc1`, `bc2`, `m.<p>`,
/// `v.<p>`; outputs `loss`, `grad_norm`, `new.<p>`, `new_m.<p>`, `new_v.<p>`.
pub fn step_graph(
    cfg: &LlamaConfig,
    passes: &str,
    opt: &AdamW,
    budget: Option<MemoryBudget>,
) -> Result<Graph> {
    step_graph_of(differentiated(cfg, passes)?, passes, opt, budget)
}

/// `step_graph` from the differentiated graph (`differentiated`).
fn step_graph_of(
    mut g: Graph,
    passes: &str,
    opt: &AdamW,
    budget: Option<MemoryBudget>,
) -> Result<Graph> {
    egret_passes::optim::append_adamw(&mut g, opt)?;
    g.outputs.retain(|(n, _)| !n.starts_with("grad."));
    let pm = PassManager::new(pipeline(passes)?);
    pm.run(&mut g, &mut PassCx::default(), |_, _| {})?;
    place(g, budget)
}

/// Hugging Face's initialisation: linear and embedding weights `N(0, 0.02²)`, norm weights
/// 1; deterministic in `seed` (SplitMix64 and Box-Muller).
pub fn random_init(cfg: &LlamaConfig, seed: u64) -> Result<HashMap<String, Tensor>> {
    let mut state = seed ^ 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let mut out = HashMap::new();
    for (name, shape) in cfg.parameters() {
        // (a validated configuration's shapes do not overflow; memory may still run out)
        let n: usize = shape.iter().product();
        let mut data: Vec<f32> = Vec::new();
        data.try_reserve_exact(n).map_err(|_| {
            EgretError::Usage(format!(
                "out of memory: `{name}` {shape:?} needs {} bytes",
                n as u128 * 4
            ))
        })?;
        if name.ends_with("norm.weight") {
            data.resize(n, 1.0);
        } else {
            data.extend((0..n).map(|_| {
                let u1 = ((next() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
                let u2 = (next() >> 11) as f64 / (1u64 << 53) as f64;
                (0.02 * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
            }));
        }
        out.insert(name, Tensor::from_f32(shape, data)?);
    }
    Ok(out)
}

enum Exec {
    Interp {
        it: Box<Interpreter>,
        params: HashMap<String, Tensor>,
        m: HashMap<String, Vec<f32>>,
        v: HashMap<String, Vec<f32>>,
    },
    /// A compiled `train_step` artifact (CPU or GPU) run by the runtime.
    Compiled(Box<egret_runtime::TrainSession>),
}

/// One model in training: a compiled step with the parameters and AdamW's state.
pub struct Trainer {
    pub cfg: LlamaConfig,
    pub opt: AdamW,
    /// Steps taken (the next step is `step + 1`).
    pub step: usize,
    exec: Exec,
}

pub use egret_runtime::StepOut;

/// AdamW as `egret train` and `egret compile --mode training` run it: β = (0.9, 0.999),
/// ε = 1e-8, gradients clipped to a norm of 1, the weight decay given.
pub fn cli_adamw(weight_decay: f64) -> AdamW {
    AdamW {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay,
        max_grad_norm: Some(1.0),
    }
}

/// The AdamW constants as an artifact records them.
fn adamw_spec(o: &AdamW) -> egret_runtime::artifact::AdamWSpec {
    egret_runtime::artifact::AdamWSpec {
        beta1: o.beta1,
        beta2: o.beta2,
        eps: o.eps,
        weight_decay: o.weight_decay,
        max_grad_norm: o.max_grad_norm,
    }
}

/// Which entry points a training artifact has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrainEntries {
    /// `train_step` alone: what `Trainer` runs (from the compile cache).
    Step,
    /// `train_step` and `grads` (loss and gradients, as `egret grad` prints them): what
    /// `egret compile --mode training` writes.
    StepAndGrads,
}

/// Compiles a model's training artifact at `dir`: the entry point `train_step` (loss,
/// gradients, AdamW) and, as `entries` says, `grads`.
pub fn compile_train_artifact(
    cfg: &LlamaConfig,
    passes: &str,
    opts: &CpuOptions,
    opt: &AdamW,
    entries: TrainEntries,
    budget: Option<MemoryBudget>,
    dir: &Path,
) -> Result<std::path::PathBuf> {
    let t0 = std::time::Instant::now();
    let sopts = egret_backends::schedule::ScheduleOptions {
        panel: egret_backends::llvm::panel_width(&opts.cpu),
        weights: opts.weights,
        states: false,
        deep_first: true,
        // New parameters every step: matmuls pack their slices as they go.
        pack_weights: false,
        ..egret_backends::schedule::ScheduleOptions::default()
    };
    let (progs, spec, model) = train_programs(cfg, passes, opt, entries, budget, sopts)?;
    let out =
        egret_backends::artifact::write_cpu_artifact(&entry_refs(&progs), opts, model, &spec, dir)
            .map_err(|e| EgretError::Usage(e.to_string()))?;
    if std::env::var_os("EGRET_PROFILE").is_some() {
        let names: Vec<&str> = progs.iter().map(|(n, _)| *n).collect();
        eprintln!(
            "compile\t{}\t{:.1} ms\t{} kernel calls",
            names.join(" and "),
            t0.elapsed().as_secs_f64() * 1e3,
            progs.iter().map(|(_, p)| p.kernels.len()).sum::<usize>()
        );
    }
    Ok(out)
}

/// `compile_train_artifact` for the GPU: the entry points scheduled for it and compiled to PTX.
pub fn compile_train_artifact_ptx(
    cfg: &LlamaConfig,
    passes: &str,
    opts: &egret_backends::ptx::PtxOptions,
    opt: &AdamW,
    entries: TrainEntries,
    budget: Option<MemoryBudget>,
    dir: &Path,
) -> Result<std::path::PathBuf> {
    let sopts = egret_backends::schedule::ScheduleOptions {
        deep_first: true,
        ..egret_backends::ptx::schedule_options(opts)
    };
    let (progs, spec, model) = train_programs(cfg, passes, opt, entries, budget, sopts)?;
    egret_backends::artifact::write_ptx_artifact(&entry_refs(&progs), opts, model, &spec, dir)
        .map_err(|e| EgretError::Usage(e.to_string()))
}

/// A training artifact's named programs, what it is for, and the configuration it records.
type TrainPrograms = (
    Vec<(&'static str, egret_backends::kernel::Program)>,
    egret_backends::artifact::EntrySpec,
    serde_json::Value,
);

/// A training artifact's programs scheduled with `sopts` (`train_step`, then with `entries`
/// `grads`: one differentiated graph, optimised once with AdamW and once without, their
/// symbols unified), the artifact's mode and optimizer, and the configuration to record.
fn train_programs(
    cfg: &LlamaConfig,
    passes: &str,
    opt: &AdamW,
    entries: TrainEntries,
    budget: Option<MemoryBudget>,
    sopts: egret_backends::schedule::ScheduleOptions,
) -> Result<TrainPrograms> {
    let d = differentiated(cfg, passes)?;
    let mut graphs = vec![("train_step", step_graph_of(d.clone(), passes, opt, budget)?)];
    if entries == TrainEntries::StepAndGrads {
        let g = grad_graph_of(d, passes, budget)?;
        graphs.push((egret_runtime::session::GRADS_ENTRY, g));
    }
    let refs: Vec<&Graph> = graphs.iter().map(|(_, g)| g).collect();
    let progs = crate::cpu::schedule_graphs(&refs, sopts)?;
    let spec = egret_backends::artifact::EntrySpec {
        mode: "training".into(),
        optimizer: Some(adamw_spec(opt)),
    };
    let named = graphs.iter().map(|(n, _)| *n).zip(progs).collect();
    Ok((named, spec, serde_json::to_value(cfg).unwrap_or_default()))
}

/// Entry points as the artifact writers take them.
fn entry_refs<'a>(
    progs: &'a [(&'a str, egret_backends::kernel::Program)],
) -> Vec<(&'a str, &'a egret_backends::kernel::Program)> {
    progs.iter().map(|(n, p)| (*n, p)).collect()
}

/// A training artifact (`egret compile --mode training`) to run on `backend` (CPU or GPU, as
/// its target), checked to be for the configuration `cfg`; with the threads to run it on.
fn training_artifact(
    cfg: &LlamaConfig,
    dir: &Path,
    backend: GradBackend,
) -> Result<(egret_runtime::Artifact, usize)> {
    let (kind, threads) = match backend {
        GradBackend::Cpu { threads, .. } => ("cpu", threads),
        GradBackend::Gpu { .. } => {
            egret_runtime::gpu::gpu_available()?;
            ("ptx", 1)
        }
        GradBackend::Interp | GradBackend::Simt { .. } => {
            return Err(EgretError::Usage(
                "--artifact runs compiled code: use it with --backend cpu or gpu".into(),
            ))
        }
    };
    let art = crate::cpu::artifact_for(dir, kind)?;
    let m = art.manifest();
    let at = dir.display();
    if m.mode != "training" {
        return Err(EgretError::Usage(format!(
            "{at}: an artifact for {}, not training: compile one with --mode training",
            m.mode
        )));
    }
    let ours = serde_json::to_value(cfg).unwrap_or_default();
    if m.model != ours {
        let keys: Vec<&str> = match (m.model.as_object(), ours.as_object()) {
            (Some(a), Some(b)) => a
                .keys()
                .chain(b.keys())
                .filter(|k| a.get(*k) != b.get(*k))
                .map(String::as_str)
                .collect(),
            _ => vec![],
        };
        let mut keys = keys;
        keys.sort_unstable();
        keys.dedup();
        return Err(EgretError::Usage(format!(
            "{at}: compiled for another model configuration than this run's (differs in: {})",
            keys.join(", ")
        )));
    }
    Ok((art, threads))
}

impl Trainer {
    /// Compiles the step for `backend` (CPU or GPU: through the compile cache, keyed also by
    /// the AdamW constants and the memory budget, unless told not to) and starts from
    /// `params` with zero moments.
    pub fn new(
        cfg: LlamaConfig,
        params: HashMap<String, Tensor>,
        opt: AdamW,
        passes: &str,
        backend: GradBackend,
        budget: Option<MemoryBudget>,
    ) -> Result<Trainer> {
        let exec = match backend {
            GradBackend::Interp => {
                let g = step_graph(&cfg, passes, &opt, budget)?;
                let zeros = |p: &HashMap<String, Tensor>| {
                    p.iter()
                        .map(|(k, t)| (k.clone(), vec![0.0f32; t.shape().iter().product()]))
                        .collect()
                };
                Exec::Interp {
                    it: Box::new(Interpreter::new(&g)?),
                    m: zeros(&params),
                    v: zeros(&params),
                    params,
                }
            }
            GradBackend::Simt { .. } => {
                return Err(EgretError::Usage(
                    "the SIMT simulator computes gradients (`grads`), not training steps".into(),
                ))
            }
            GradBackend::Cpu { .. } | GradBackend::Gpu { .. } => {
                let what = format!("train_step {opt:?} {budget:?}");
                // Per backend: threads, whether to use the cache, its key, and the compiler.
                type Compile<'c> = Box<dyn Fn(&Path) -> Result<std::path::PathBuf> + 'c>;
                let (threads, cache, key, compile): (usize, bool, String, Compile) = match backend {
                    GradBackend::Cpu {
                        opts,
                        threads,
                        cache,
                    } => (
                        threads,
                        cache,
                        crate::cpu::cache_key(&cfg, passes, opts, &what),
                        Box::new(|d: &Path| {
                            let e = TrainEntries::Step;
                            compile_train_artifact(&cfg, passes, opts, &opt, e, budget, d)
                        }),
                    ),
                    GradBackend::Gpu { opts, cache } => {
                        egret_runtime::gpu::gpu_available()?;
                        (
                            1,
                            cache,
                            crate::gpu::cache_key(&cfg, passes, opts, &what),
                            Box::new(|d: &Path| {
                                let e = TrainEntries::Step;
                                compile_train_artifact_ptx(&cfg, passes, opts, &opt, e, budget, d)
                            }),
                        )
                    }
                    GradBackend::Interp | GradBackend::Simt { .. } => {
                        unreachable!("handled above")
                    }
                };
                let get = |n: &str| crate::cpu::param(&params, n);
                let session = |art: &egret_runtime::Artifact| {
                    egret_runtime::TrainSession::with_params(art, &get, "the weights", threads)
                };
                let s = if cache {
                    session(&crate::cpu::cached(&key, |d| compile(d))?)?
                } else {
                    crate::cpu::with_fresh_artifact(|d| compile(d), |a| Ok(session(a)?))?
                };
                Exec::Compiled(Box::new(s))
            }
        };
        Ok(Trainer {
            cfg,
            opt,
            step: 0,
            exec,
        })
    }

    /// The step of a training artifact compiled beforehand (`egret compile --mode
    /// training`, `--artifact DIR`) on `backend` (CPU or GPU, as its target), starting from
    /// `params` with zero moments. The artifact must be for this configuration and these
    /// AdamW constants, which its step has built in.
    pub fn from_artifact(
        cfg: LlamaConfig,
        params: HashMap<String, Tensor>,
        opt: AdamW,
        dir: &Path,
        backend: GradBackend,
    ) -> Result<Trainer> {
        let (art, threads) = training_artifact(&cfg, dir, backend)?;
        let m = art.manifest();
        let at = dir.display();
        let want = adamw_spec(&opt);
        if m.optimizer != Some(want) {
            let show = |o: &egret_runtime::artifact::AdamWSpec| {
                format!(
                    "β1 {}, β2 {}, ε {}, weight decay {}, clip {:?}",
                    o.beta1, o.beta2, o.eps, o.weight_decay, o.max_grad_norm
                )
            };
            return Err(EgretError::Usage(format!(
                "{at}: its step was compiled with AdamW {}, this run's is {} (its \
                 --weight-decay, or the checkpoint's under --resume)",
                m.optimizer.as_ref().map_or("(none)".into(), show),
                show(&want)
            )));
        }
        let get = |n: &str| crate::cpu::param(&params, n);
        let s = egret_runtime::TrainSession::with_params(&art, &get, "the weights", threads)?;
        Ok(Trainer {
            cfg,
            opt,
            step: 0,
            exec: Exec::Compiled(Box::new(s)),
        })
    }

    /// A parameter's current values.
    pub fn param(&self, name: &str) -> Option<Vec<f32>> {
        match &self.exec {
            Exec::Interp { params, .. } => params.get(name).map(|t| t.to_f32_vec()),
            Exec::Compiled(s) => s.param(name),
        }
    }

    /// AdamW's first and second moments of a parameter.
    pub fn moments(&self, name: &str) -> Option<(Vec<f32>, Vec<f32>)> {
        match &self.exec {
            Exec::Interp { m, v, .. } => Some((m.get(name)?.clone(), v.get(name)?.clone())),
            Exec::Compiled(s) => s.moments(name),
        }
    }

    /// Continues from saved optimizer state.
    pub fn restore(
        &mut self,
        step: usize,
        m: HashMap<String, Vec<f32>>,
        v: HashMap<String, Vec<f32>>,
    ) -> Result<()> {
        match &mut self.exec {
            Exec::Interp { m: mm, v: vv, .. } => {
                *mm = m;
                *vv = v;
            }
            Exec::Compiled(s) => s.restore(step, m, v)?,
        }
        self.step = step;
        Ok(())
    }

    /// One AdamW step on a batch: `tokens` and `targets` hold `b` rows of `t`.
    pub fn train_step(
        &mut self,
        tokens: &[u32],
        targets: &[i64],
        b: usize,
        t: usize,
        lr: f64,
    ) -> Result<StepOut> {
        check_step_shape(b as u64, t as u64, "train_step")?;
        if tokens.len() != b * t || targets.len() != b * t {
            return Err(EgretError::Usage(format!(
                "a batch of {b}×{t} needs {} tokens and targets, got {} and {}",
                b * t,
                tokens.len(),
                targets.len()
            )));
        }
        check_ids(tokens, self.cfg.vocab_size)?;
        let out = match &mut self.exec {
            Exec::Compiled(s) => s.train_step(tokens, targets, b, t, lr)?,
            Exec::Interp { it, params, m, v } => {
                let k = (self.step + 1) as i32;
                let bc1 = 1.0 - self.opt.beta1.powi(k);
                let bc2 = 1.0 - self.opt.beta2.powi(k);
                let mut inputs = HashMap::new();
                let ids: Vec<i64> = tokens.iter().map(|&i| i as i64).collect();
                let pos: Vec<i64> = (0..b).flat_map(|_| 0..t as i64).collect();
                for (n, x) in [
                    ("tokens", ids),
                    ("positions", pos),
                    ("targets", targets.to_vec()),
                ] {
                    inputs.insert(n.to_string(), Tensor::from_i64(vec![b, t], x)?);
                }
                for (n, x) in [("lr", lr), ("bc1", bc1), ("bc2", bc2)] {
                    inputs.insert(n.to_string(), Tensor::from_f32(vec![1], vec![x as f32])?);
                }
                for (name, p) in params.iter() {
                    let s = p.shape().to_vec();
                    inputs.insert(
                        format!("m.{name}"),
                        Tensor::from_f32(s.clone(), m[name].clone())?,
                    );
                    inputs.insert(format!("v.{name}"), Tensor::from_f32(s, v[name].clone())?);
                }
                let mut out = it.run(&inputs, params)?;
                let mut take = |name: &str| {
                    out.remove(name).ok_or_else(|| {
                        EgretError::Usage(format!("the train step returned no `{name}`"))
                    })
                };
                let loss = take("loss")?.to_f32_vec()[0];
                let grad_norm = take("grad_norm")?.to_f32_vec()[0];
                let names: Vec<String> = params.keys().cloned().collect();
                for name in &names {
                    let p = take(&format!("new.{name}"))?;
                    m.insert(name.clone(), take(&format!("new_m.{name}"))?.to_f32_vec());
                    v.insert(name.clone(), take(&format!("new_v.{name}"))?.to_f32_vec());
                    params.insert(name.clone(), p);
                }
                StepOut { loss, grad_norm }
            }
        };
        self.step += 1;
        Ok(out)
    }
}

/// Learning rate at step `k` (from 1): linear warmup over `warmup` steps to `peak`, then
/// cosine decay to `peak / 10` at step `total`.
pub fn lr_at(k: usize, peak: f64, warmup: usize, total: usize) -> f64 {
    if warmup > 0 && k <= warmup {
        return peak * k as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let done = ((k - warmup) as f64 / span).min(1.0);
    let min = peak / 10.0;
    min + 0.5 * (peak - min) * (1.0 + (std::f64::consts::PI * done).cos())
}

/// What `egret train` keeps beside a checkpoint (`trainer_state.json`) to resume exactly.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainerState {
    /// Steps taken.
    pub step: usize,
    pub seed: u64,
    pub batch: usize,
    pub seq: usize,
    pub lr: f64,
    pub warmup: usize,
    pub total_steps: usize,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub max_grad_norm: Option<f64>,
}

/// The most tokens (batch × sequence) one training step may take: far past what one device
/// holds, and small enough that the token-indexed sizes (inputs, activations) cannot
/// overflow. (No schedule keeps a size that grows with T²: attention is fused.)
pub const MAX_STEP_TOKENS: u64 = 1 << 24;

/// A step of `batch` windows of `seq` tokens: each at least 1, at most `MAX_STEP_TOKENS`
/// tokens together (`what` says where the two came from, for the error).
pub fn check_step_shape(batch: u64, seq: u64, what: &str) -> Result<()> {
    if batch == 0 || seq == 0 {
        return Err(EgretError::Usage(format!(
            "{what}: batch and seq must be at least 1"
        )));
    }
    match batch.checked_mul(seq) {
        Some(n) if n <= MAX_STEP_TOKENS => Ok(()),
        _ => Err(EgretError::Usage(format!(
            "{what}: batch {batch} × seq {seq} is over the limit of {MAX_STEP_TOKENS} tokens a step"
        ))),
    }
}

/// Batch `step` (from 1) of `b` windows of `t + 1` tokens at offsets drawn from a generator
/// seeded by `(seed, step)`, so a resumed run sees the same batches: inputs `w[..t]`,
/// targets `w[1..]`.
pub fn batch_at(data: &[u32], step: usize, seed: u64, b: usize, t: usize) -> (Vec<u32>, Vec<i64>) {
    let span = data.len().saturating_sub(t + 1) + 1;
    let mut state = seed
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add((step as u64).wrapping_mul(0xd1b5_4a32_d192_ed03));
    let (mut toks, mut tg) = (Vec::with_capacity(b * t), Vec::with_capacity(b * t));
    for _ in 0..b {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        let off = ((z ^ (z >> 31)) % span as u64) as usize;
        toks.extend_from_slice(&data[off..off + t]);
        tg.extend(data[off + 1..off + t + 1].iter().map(|&x| x as i64));
    }
    (toks, tg)
}

/// Writes a directory whole or not at all (`egret_runtime::fsutil::write_dir_atomic`).
pub fn write_dir_atomic(
    dir: &Path,
    replace: egret_runtime::fsutil::Replace,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    egret_runtime::fsutil::write_dir_atomic(dir, replace, fill, |p, e| {
        EgretError::Usage(format!("cannot write {}: {e}", p.display()))
    })
}

fn weights_of(
    names: &[(String, Vec<usize>)],
    get: impl Fn(&str) -> Vec<f32>,
    prefix: &str,
) -> Weights {
    let mut w = Weights::new();
    for (n, s) in names {
        w.insert(format!("{prefix}{n}"), HostTensor::new(s.clone(), get(n)));
    }
    w
}

/// Saves a checkpoint in Hugging Face layout (`config.json`, `model.safetensors`, and the
/// tokenizer if known) plus `optimizer.safetensors` (`m.<p>`, `v.<p>`) and
/// `trainer_state.json`, atomically, into a new or empty directory, or one whose other
/// entries are kept (`CHECKPOINT_REPLACE`).
pub fn save_checkpoint(
    dir: &Path,
    tr: &Trainer,
    state: &TrainerState,
    tokenizer: Option<&Tokenizer>,
) -> Result<()> {
    let names = tr.cfg.parameters();
    write_dir_atomic(dir, CHECKPOINT_REPLACE, |d| {
        let model = weights_of(&names, |n| tr.param(n).unwrap_or_default(), "");
        save_safetensors(&d.join("model.safetensors"), &model, SaveDType::F32)?;
        let mut opt = weights_of(&names, |n| tr.moments(n).unwrap_or_default().0, "m.");
        for (k, t) in weights_of(&names, |n| tr.moments(n).unwrap_or_default().1, "v.") {
            opt.insert(k, t);
        }
        save_safetensors(&d.join("optimizer.safetensors"), &opt, SaveDType::F32)?;
        let mut cfg = tr.cfg.to_hf_json();
        cfg["torch_dtype"] = serde_json::json!("float32");
        let write = |name: &str, text: String| {
            std::fs::write(d.join(name), text)
                .map_err(|e| EgretError::Usage(format!("cannot write {name}: {e}")))
        };
        write(
            "config.json",
            serde_json::to_string_pretty(&cfg).unwrap_or_default(),
        )?;
        write(
            "trainer_state.json",
            serde_json::to_string_pretty(state).unwrap_or_default(),
        )?;
        if let Some(t) = tokenizer {
            write("tokenizer.json", t.to_tokenizer_json().to_string())?;
        }
        Ok(())
    })
}

/// The files of a checkpoint (`save_checkpoint`).
const CHECKPOINT_FILES: [&str; 5] = [
    "model.safetensors",
    "optimizer.safetensors",
    "config.json",
    "trainer_state.json",
    "tokenizer.json",
];

/// Whether a checkpoint may be written into `dir`: it holds none of a checkpoint's files
/// (a folder of `--save-every`'s checkpoints, a log, notes), or it is an egret checkpoint
/// (its `trainer_state.json` is egret's). Another program's files of the same names are
/// the user's.
fn checkpoint_dir_ours(dir: &Path) -> bool {
    let none = CHECKPOINT_FILES.iter().all(|f| !dir.join(f).exists());
    none || std::fs::read(dir.join("trainer_state.json"))
        .ok()
        .is_some_and(|b| serde_json::from_slice::<TrainerState>(&b).is_ok())
}

/// How a checkpoint is written over a directory: one that `checkpoint_dir_ours` accepts,
/// whose other entries (intermediate checkpoints, a log, notes) stay.
const CHECKPOINT_REPLACE: egret_runtime::fsutil::Replace = egret_runtime::fsutil::Replace {
    what: "an egret checkpoint",
    ours: &checkpoint_dir_ours,
    keep_others: true,
};

/// Whether `save_checkpoint` may write into `dir` (`--save`, checked before training).
pub fn check_checkpoint_dir(dir: &Path) -> Result<()> {
    egret_runtime::fsutil::check_dir_target(dir, CHECKPOINT_REPLACE)
        .map_err(|e| EgretError::Usage(format!("--save {}: {e}", dir.display())))
}

/// A checkpoint written by `save_checkpoint`: configuration, parameters, moments, state.
pub struct Checkpoint {
    pub config: LlamaConfig,
    pub params: HashMap<String, Tensor>,
    pub m: HashMap<String, Vec<f32>>,
    pub v: HashMap<String, Vec<f32>>,
    pub state: TrainerState,
}

pub fn load_checkpoint(dir: &Path) -> Result<Checkpoint> {
    let src = crate::ModelSource::HfDir(dir.to_path_buf());
    let loaded = crate::load_model(&src)?;
    let st = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&st).map_err(|e| {
        EgretError::Usage(format!("{}: {e} (not an egret checkpoint?)", st.display()))
    })?;
    let state: TrainerState = serde_json::from_str(&text)
        .map_err(|e| EgretError::Usage(format!("{}: {e}", st.display())))?;
    let opt = egret_runtime::weights::load(&dir.join("optimizer.safetensors"))?;
    let (mut m, mut v) = (HashMap::new(), HashMap::new());
    for (name, shape) in loaded.config.parameters() {
        m.insert(
            name.clone(),
            opt.expect(&format!("m.{name}"), &shape)?.data.clone(),
        );
        v.insert(
            name.clone(),
            opt.expect(&format!("v.{name}"), &shape)?.data.clone(),
        );
    }
    Ok(Checkpoint {
        config: loaded.config,
        params: loaded.params,
        m,
        v,
        state,
    })
}

/// The loss curve as an SVG line chart (step on x, loss on y).
pub fn loss_curve_svg(points: &[(usize, f32)]) -> String {
    let (w, h, pad) = (640.0f64, 360.0f64, 48.0f64);
    let xs = points.iter().map(|p| p.0 as f64);
    let ys = points.iter().map(|p| p.1 as f64).filter(|y| y.is_finite());
    let (x0, x1) = (
        xs.clone().fold(f64::INFINITY, f64::min),
        xs.fold(f64::NEG_INFINITY, f64::max),
    );
    let (y0, y1) = (
        ys.clone().fold(f64::INFINITY, f64::min),
        ys.fold(f64::NEG_INFINITY, f64::max),
    );
    let sx = |x: f64| pad + (x - x0) / (x1 - x0).max(1e-9) * (w - 2.0 * pad);
    let sy = |y: f64| h - pad - (y - y0) / (y1 - y0).max(1e-9) * (h - 2.0 * pad);
    let pts: Vec<String> = points
        .iter()
        .filter(|p| p.1.is_finite())
        .map(|p| format!("{:.1},{:.1}", sx(p.0 as f64), sy(p.1 as f64)))
        .collect();
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<line x1="{pad}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/>
<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{b}" stroke="black"/>
<text x="{pad}" y="{ty}" text-anchor="middle">{x0}</text>
<text x="{r}" y="{ty}" text-anchor="middle">{x1}</text>
<text x="{lx}" y="{b}" text-anchor="end">{y0:.3}</text>
<text x="{lx}" y="{pad}" text-anchor="end">{y1:.3}</text>
<text x="{cx}" y="{ty}" text-anchor="middle">step</text>
<text x="12" y="{cy}" transform="rotate(-90 12 {cy})" text-anchor="middle">loss</text>
<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="{pts}"/>
</svg>
"##,
        b = h - pad,
        r = w - pad,
        ty = h - pad + 18.0,
        lx = pad - 4.0,
        cx = w / 2.0,
        cy = h / 2.0,
        pts = pts.join(" "),
    )
}
