//! A running model from a compiled artifact: `Session` binds weights to an artifact's `step`
//! entry point and runs it on the CPU executor (target `cpu`) or the CUDA executor (target
//! `ptx`), the KV cache held in the executor's states.
//! It implements `LanguageModel`, so `generate` drives it like any other backend.
//! A training artifact has two entry points: `train_step`, run by `TrainSession` (loss,
//! gradients and the AdamW update in one run), and `grads`, run by `GradSession` (the loss
//! and every gradient, parameters unchanged).
//!
//! ```no_run
//! use egret_runtime::{Artifact, Session};
//! use egret_runtime::generate::GenerateOptions;
//! let art = Artifact::load("smollm2.egret")?;
//! let weights = egret_runtime::weights::load("SmolLM2-135M-Instruct.Q4_1.gguf".as_ref())?;
//! let mut s = Session::new(&art, weights, 0)?;
//! let opts = GenerateOptions { max_new_tokens: 20, sampler: Default::default(), stop_ids: vec![] };
//! let out = s.generate(&[504, 3575, 282, 4649, 314], &opts, |_| {})?;
//! # Ok::<(), egret_runtime::RuntimeError>(())
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use crate::artifact::Artifact;
use crate::cpu::{load_kernel_library, CpuExecutor, HostData, HostValue, KernelLibrary};
use crate::generate::{check_ids, LanguageModel};
use crate::gpu::GpuExecutor;
use crate::weights::Weights;
use crate::{HostTensor, Result, RuntimeError};

/// Where a parameter's data comes from: by Hugging Face name, its shape and f32 values.
pub type ParamSource<'a> = &'a dyn Fn(&str) -> Option<(Vec<usize>, Arc<Vec<f32>>)>;

/// `weights` as a parameter source (moved, not copied) and its description.
fn weight_params(weights: Weights) -> (String, HashMap<String, (Vec<usize>, Arc<Vec<f32>>)>) {
    let source = weights.source().to_string();
    let params = weights
        .into_iter()
        .map(|(n, t)| (n, (t.shape, Arc::new(t.data))))
        .collect();
    (source, params)
}

/// The executor of a session: native kernels on the CPU's thread pool, or PTX on a GPU.
enum Exec {
    Cpu {
        exec: CpuExecutor,
        // Declared after `exec`: the code stays loaded while the executor can call it.
        _lib: KernelLibrary,
    },
    Gpu(GpuExecutor),
}

impl Exec {
    fn run(&mut self, inputs: &HashMap<String, HostValue>) -> Result<HashMap<String, HostValue>> {
        match self {
            Exec::Cpu { exec, .. } => exec.run(inputs),
            Exec::Gpu(g) => g.run(inputs),
        }
    }

    fn reset_states(&mut self) {
        match self {
            Exec::Cpu { exec, .. } => exec.reset_states(),
            Exec::Gpu(g) => g.reset_states(),
        }
    }

    fn bind_params(&mut self, get: ParamSource) -> Result<()> {
        match self {
            Exec::Cpu { exec, .. } => exec.bind_params(get),
            Exec::Gpu(g) => g.bind_params(get),
        }
    }

    fn set_feedback(&mut self, pairs: Vec<(String, String)>) -> Result<()> {
        match self {
            Exec::Cpu { exec, .. } => exec.set_feedback(pairs),
            Exec::Gpu(g) => g.set_feedback(pairs),
        }
    }

    /// The current value of a parameter or of an input kept by `set_feedback`.
    fn read(&self, name: &str) -> Option<Vec<f32>> {
        match self {
            Exec::Cpu { exec, .. } => exec.read(name),
            Exec::Gpu(g) => g.read(name).ok().flatten(),
        }
    }
}

/// What every session does first: checks the target and that `get` supplies each manifest
/// parameter with its shape, loads the entry point's kernels (a shared library for the CPU,
/// a PTX module for the GPU) and binds the parameters. `threads == 0` means all cores.
fn bind(art: &Artifact, entry: &str, get: ParamSource, from: &str, threads: usize) -> Result<Exec> {
    let gpu = art.manifest().target.kind == "ptx";
    if gpu {
        art.check_gpu_target()?;
    } else {
        art.check_cpu_target()?;
    }
    for p in &art.manifest().parameters {
        match get(&p.name) {
            None => {
                return Err(RuntimeError::MissingTensor {
                    name: p.name.clone(),
                    source_desc: from.to_string(),
                })
            }
            Some((shape, _)) if shape != p.shape => {
                return Err(RuntimeError::ShapeMismatch {
                    name: p.name.clone(),
                    got: shape,
                    expected: p.shape.clone(),
                })
            }
            _ => {}
        }
    }
    let entry = art.entry(entry)?;
    let payload = art.dir().join(&entry.payload);
    let mut exec = if gpu {
        let ptx = std::fs::read_to_string(&payload).map_err(|e| RuntimeError::Io {
            path: payload.clone(),
            source: e,
        })?;
        Exec::Gpu(GpuExecutor::new(entry.plan.clone(), &ptx)?)
    } else {
        let lib = load_kernel_library(&payload, &entry.plan)?;
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        Exec::Cpu {
            exec: CpuExecutor::new(entry.plan.clone(), lib.fns.clone(), threads)?,
            _lib: lib,
        }
    };
    exec.bind_params(get)?;
    Ok(exec)
}

pub struct Session {
    exec: Exec,
    vocab: usize,
    pos: usize,
}

// SAFETY: the kernel library is immutable code; the executor is Send.
unsafe impl Send for Session {}

impl Session {
    /// Binds `weights` to the artifact's `step` entry point; `threads == 0` means all cores.
    pub fn new(art: &Artifact, weights: Weights, threads: usize) -> Result<Session> {
        let (source, params) = weight_params(weights);
        Session::with_params(art, &|n| params.get(n).cloned(), &source, threads)
    }

    /// As `new`, with parameters from any source (`from` names it in errors).
    pub fn with_params(
        art: &Artifact,
        get: ParamSource,
        from: &str,
        threads: usize,
    ) -> Result<Session> {
        let entry = art.entry("step")?;
        let plan = &entry.plan;
        let bad = |reason: &str| RuntimeError::Artifact {
            path: art.dir().to_path_buf(),
            reason: reason.to_string(),
        };
        let logits = plan
            .outputs
            .iter()
            .find(|(n, _)| n == "logits")
            .ok_or_else(|| bad("the step entry point has no `logits` output"))?;
        let vocab = plan.buffers[logits.1 as usize]
            .dims
            .last()
            .filter(|d| d.terms.is_empty() && d.constant > 0)
            .ok_or_else(|| bad("the logits have no fixed vocabulary dimension"))?
            .constant as usize;
        let exec = bind(art, "step", get, from, threads)?;
        Ok(Session {
            exec,
            vocab,
            pos: 0,
        })
    }

    /// The CUDA executor, when the session runs on the GPU (for profiling).
    pub fn gpu_executor(&mut self) -> Option<&mut GpuExecutor> {
        match &mut self.exec {
            Exec::Gpu(g) => Some(g),
            Exec::Cpu { .. } => None,
        }
    }

    /// Tokens already in the cache.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Runs `ids` at positions `pos..` over the cache and returns the logits at the given
    /// offsets into `ids`; the cache grows by `ids.len()`.
    pub fn step(&mut self, ids: &[u32], at: &[usize]) -> Result<Vec<Vec<f32>>> {
        check_ids(ids, self.vocab)?;
        if let Some(&a) = at.iter().find(|&&a| a >= ids.len()) {
            return Err(RuntimeError::Invalid(format!(
                "logits asked at offset {a} of {} tokens",
                ids.len()
            )));
        }
        let (t, start) = (ids.len(), self.pos);
        let i64s = |shape: Vec<usize>, v: Vec<i64>| HostValue {
            shape,
            data: HostData::I64(v),
        };
        let inputs = HashMap::from([
            (
                "tokens".to_string(),
                i64s(vec![1, t], ids.iter().map(|&i| i as i64).collect()),
            ),
            (
                "positions".to_string(),
                i64s(vec![1, t], (start..start + t).map(|p| p as i64).collect()),
            ),
            (
                "logits_at".to_string(),
                i64s(vec![at.len()], at.iter().map(|&p| p as i64).collect()),
            ),
        ]);
        let out = self.exec.run(&inputs)?;
        self.pos += t;
        match out.get("logits").map(|v| &v.data) {
            Some(HostData::F32(v)) => Ok(v.chunks(self.vocab).map(<[f32]>::to_vec).collect()),
            _ => Err(RuntimeError::Invalid(
                "the plan returned no f32 logits".into(),
            )),
        }
    }

    /// Empties the cache.
    pub fn reset(&mut self) {
        self.exec.reset_states();
        self.pos = 0;
    }

    /// Logits of every position of `ids`, from an empty cache.
    pub fn logits(&mut self, ids: &[u32]) -> Result<Vec<Vec<f32>>> {
        self.reset();
        self.step(ids, &(0..ids.len()).collect::<Vec<_>>())
    }

    /// Empties the cache, runs the prompt and returns the logits after its last token.
    pub fn prefill(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        LanguageModel::prefill(self, ids)
    }

    /// Appends one token to the cache and returns the logits after it.
    pub fn decode(&mut self, id: u32) -> Result<Vec<f32>> {
        LanguageModel::decode(self, id)
    }

    /// Generates after `prompt` (see `generate::generate`), calling `on_token` with each id.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        opts: &crate::generate::GenerateOptions,
        on_token: impl FnMut(u32),
    ) -> Result<crate::generate::Generation> {
        crate::generate::generate(self, prompt, opts, on_token)
    }
}

impl LanguageModel for Session {
    fn vocab_size(&self) -> usize {
        self.vocab
    }

    fn prefill(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        self.reset();
        let last = ids.len().saturating_sub(1);
        Ok(self.step(ids, &[last])?.pop().unwrap_or_default())
    }

    fn decode(&mut self, id: u32) -> Result<Vec<f32>> {
        Ok(self.step(&[id], &[0])?.pop().unwrap_or_default())
    }
}

/// The first value of an f32 output.
fn scalar(out: &mut HashMap<String, HostValue>, name: &str) -> Result<f32> {
    match out.remove(name).map(|v| v.data) {
        Some(HostData::F32(d)) if !d.is_empty() => Ok(d[0]),
        _ => Err(RuntimeError::Invalid(format!(
            "the compiled step returned no f32 `{name}`"
        ))),
    }
}

/// The parameter whose rows the token ids pick: its row count is the vocabulary.
const EMBEDDING: &str = "model.embed_tokens.weight";

/// The vocabulary a training artifact was compiled for, which bounds the token ids and
/// targets its entry points are given: the embedding's rows (a parameter, covered by the
/// content hash), else the recorded configuration's `vocab_size`.
fn training_vocab(art: &Artifact) -> Result<usize> {
    let m = art.manifest();
    let rows = m
        .parameters
        .iter()
        .find(|p| p.name == EMBEDDING && p.shape.len() == 2)
        .map(|p| p.shape[0] as u64);
    rows.or_else(|| {
        m.model
            .get("vocab_size")
            .and_then(serde_json::Value::as_u64)
    })
    .filter(|&v| v > 0)
    .map(|v| v as usize)
    .ok_or_else(|| RuntimeError::Artifact {
        path: art.dir().to_path_buf(),
        reason: format!("it has no `{EMBEDDING}` parameter and no model vocab_size"),
    })
}

/// The inputs every training entry point takes: `b` rows of `t` tokens (ids below `vocab`),
/// their positions, and their targets (below `vocab`, or negative: none), all `i64[b, t]`.
fn batch_inputs(
    tokens: &[u32],
    targets: &[i64],
    b: usize,
    t: usize,
    vocab: usize,
) -> Result<HashMap<String, HostValue>> {
    let n = b.checked_mul(t).filter(|_| t > 0);
    if n.is_none_or(|n| tokens.len() != n || targets.len() != n) {
        return Err(RuntimeError::Invalid(format!(
            "a batch of {b}×{t} needs as many tokens and targets as it has positions, got {} and {}",
            tokens.len(),
            targets.len()
        )));
    }
    check_ids(tokens, vocab)?;
    if let Some(&id) = targets.iter().find(|&&x| x >= vocab as i64) {
        return Err(RuntimeError::TokenOutOfRange {
            id: id as u64,
            vocab,
        });
    }
    let i64v = |v: Vec<i64>| HostValue {
        shape: vec![b, t],
        data: HostData::I64(v),
    };
    Ok(HashMap::from([
        (
            "tokens".to_string(),
            i64v(tokens.iter().map(|&i| i as i64).collect()),
        ),
        (
            "positions".to_string(),
            i64v((0..b).flat_map(|_| 0..t as i64).collect()),
        ),
        ("targets".to_string(), i64v(targets.to_vec())),
    ]))
}

/// What one training step measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepOut {
    pub loss: f32,
    /// The gradients' global norm, before clipping.
    pub grad_norm: f32,
}

/// A model in training from an artifact's `train_step` entry point (mode `training`): each
/// `train_step` computes the loss, the gradients and the AdamW update in one run of the
/// compiled step. The parameters and moments live in the executor (on the device for the
/// GPU): the step's new values are fed back as the next step's (`set_feedback`), never
/// copied out unless asked for (`param`, `moments`).
pub struct TrainSession {
    exec: Exec,
    opt: crate::artifact::AdamWSpec,
    vocab: usize,
    shapes: Vec<(String, Vec<usize>)>,
    /// Moments still to send (zeros at first, or restored ones) until the next step does.
    m: HashMap<String, Vec<f32>>,
    v: HashMap<String, Vec<f32>>,
    step: usize,
    upload_moments: bool,
}

// SAFETY: as for `Session`.
unsafe impl Send for TrainSession {}

impl TrainSession {
    /// Binds `weights` to the artifact's `train_step`, moments zero; `threads == 0`: all cores.
    pub fn new(art: &Artifact, weights: Weights, threads: usize) -> Result<TrainSession> {
        let (source, params) = weight_params(weights);
        TrainSession::with_params(art, &|n| params.get(n).cloned(), &source, threads)
    }

    /// As `new`, with parameters from any source (`from` names it in errors).
    pub fn with_params(
        art: &Artifact,
        get: ParamSource,
        from: &str,
        threads: usize,
    ) -> Result<TrainSession> {
        let opt = art
            .manifest()
            .optimizer
            .ok_or_else(|| RuntimeError::Artifact {
                path: art.dir().to_path_buf(),
                reason: "it is not a training artifact (no optimizer)".into(),
            })?;
        let vocab = training_vocab(art)?;
        let mut exec = bind(art, "train_step", get, from, threads)?;
        let shapes: Vec<(String, Vec<usize>)> = art
            .manifest()
            .parameters
            .iter()
            .map(|p| (p.name.clone(), p.shape.clone()))
            .collect();
        exec.set_feedback(
            shapes
                .iter()
                .flat_map(|(n, _)| {
                    [
                        (format!("new.{n}"), n.clone()),
                        (format!("new_m.{n}"), format!("m.{n}")),
                        (format!("new_v.{n}"), format!("v.{n}")),
                    ]
                })
                .collect(),
        )?;
        let zeros = |s: &[(String, Vec<usize>)]| -> HashMap<String, Vec<f32>> {
            s.iter()
                .map(|(n, d)| (n.clone(), vec![0.0; d.iter().product()]))
                .collect()
        };
        Ok(TrainSession {
            exec,
            opt,
            vocab,
            m: zeros(&shapes),
            v: zeros(&shapes),
            shapes,
            step: 0,
            upload_moments: true,
        })
    }

    /// The CUDA executor, when the session trains on the GPU (for profiling).
    pub fn gpu_executor(&mut self) -> Option<&mut GpuExecutor> {
        match &mut self.exec {
            Exec::Gpu(g) => Some(g),
            Exec::Cpu { .. } => None,
        }
    }

    /// Steps taken.
    pub fn step(&self) -> usize {
        self.step
    }

    /// A parameter's current values (read back from the device on the GPU).
    pub fn param(&self, name: &str) -> Option<Vec<f32>> {
        self.exec.read(name)
    }

    /// AdamW's first and second moments of a parameter.
    pub fn moments(&self, name: &str) -> Option<(Vec<f32>, Vec<f32>)> {
        if self.upload_moments {
            return Some((self.m.get(name)?.clone(), self.v.get(name)?.clone()));
        }
        let m = self.exec.read(&format!("m.{name}"))?;
        let v = self.exec.read(&format!("v.{name}"))?;
        Some((m, v))
    }

    /// Continues from saved optimizer state: steps taken and each parameter's moments.
    pub fn restore(
        &mut self,
        step: usize,
        mut m: HashMap<String, Vec<f32>>,
        mut v: HashMap<String, Vec<f32>>,
    ) -> Result<()> {
        for (name, shape) in &self.shapes {
            let n: usize = shape.iter().product();
            let (Some(a), Some(b)) = (m.remove(name), v.remove(name)) else {
                return Err(RuntimeError::Invalid(format!(
                    "optimizer state lacks the moments of `{name}`"
                )));
            };
            if a.len() != n || b.len() != n {
                return Err(RuntimeError::Invalid(format!(
                    "optimizer state of `{name}` has the wrong size"
                )));
            }
            self.m.insert(name.clone(), a);
            self.v.insert(name.clone(), b);
        }
        self.step = step;
        self.upload_moments = true;
        Ok(())
    }

    /// One AdamW step on `b` rows of `t` tokens with their targets (negative: none).
    pub fn train_step(
        &mut self,
        tokens: &[u32],
        targets: &[i64],
        b: usize,
        t: usize,
        lr: f64,
    ) -> Result<StepOut> {
        let mut inputs = batch_inputs(tokens, targets, b, t, self.vocab)?;
        let k = (self.step + 1) as i32;
        let f32v = |shape: Vec<usize>, v: Vec<f32>| HostValue {
            shape,
            data: HostData::F32(v),
        };
        inputs.extend([
            ("lr".to_string(), f32v(vec![1], vec![lr as f32])),
            (
                "bc1".to_string(),
                f32v(vec![1], vec![(1.0 - self.opt.beta1.powi(k)) as f32]),
            ),
            (
                "bc2".to_string(),
                f32v(vec![1], vec![(1.0 - self.opt.beta2.powi(k)) as f32]),
            ),
        ]);
        if self.upload_moments {
            for (name, shape) in &self.shapes {
                let (m, v) = (self.m.remove(name), self.v.remove(name));
                inputs.insert(
                    format!("m.{name}"),
                    f32v(shape.clone(), m.unwrap_or_default()),
                );
                inputs.insert(
                    format!("v.{name}"),
                    f32v(shape.clone(), v.unwrap_or_default()),
                );
            }
        }
        let mut out = match self.exec.run(&inputs) {
            Ok(out) => out,
            Err(e) => {
                if self.upload_moments {
                    // Kept for a retry until a run has taken them in.
                    for (name, _) in &self.shapes {
                        for (pre, map) in [("m", &mut self.m), ("v", &mut self.v)] {
                            if let Some(HostValue {
                                data: HostData::F32(d),
                                ..
                            }) = inputs.remove(&format!("{pre}.{name}"))
                            {
                                map.insert(name.clone(), d);
                            }
                        }
                    }
                }
                return Err(e);
            }
        };
        // The new parameters and moments are in place in the executor.
        self.upload_moments = false;
        self.m.clear();
        self.v.clear();
        let loss = scalar(&mut out, "loss")?;
        let grad_norm = scalar(&mut out, "grad_norm")?;
        self.step += 1;
        Ok(StepOut { loss, grad_norm })
    }
}

/// The loss and every parameter's gradient, from a training artifact's `grads` entry point.
#[derive(Clone, Debug, PartialEq)]
pub struct GradOut {
    /// The mean cross-entropy over the positions with a target.
    pub loss: f32,
    /// Each parameter's gradient, by parameter name, sorted by name.
    pub grads: Vec<(String, HostTensor)>,
}

impl GradOut {
    /// From the outputs of a loss-and-gradients program: `loss`, and `grad.<p>` for each
    /// parameter `p` (other outputs ignored).
    pub fn from_outputs(mut out: HashMap<String, HostValue>) -> Result<GradOut> {
        let loss = scalar(&mut out, "loss")?;
        let mut grads = Vec::new();
        for (name, v) in out {
            let Some(p) = name.strip_prefix("grad.") else {
                continue;
            };
            let HostData::F32(data) = v.data else {
                return Err(RuntimeError::Invalid(format!(
                    "the gradient of `{p}` is not f32"
                )));
            };
            grads.push((
                p.to_string(),
                HostTensor {
                    shape: v.shape,
                    data,
                },
            ));
        }
        grads.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(GradOut { loss, grads })
    }
}

/// Gradients from a training artifact's `grads` entry point (what `egret grad --artifact`
/// runs): the loss and each parameter's gradient for a batch, the parameters unchanged.
pub struct GradSession {
    exec: Exec,
    vocab: usize,
}

// SAFETY: as for `Session`.
unsafe impl Send for GradSession {}

impl GradSession {
    /// Binds `weights` to the artifact's `grads` entry point; `threads == 0`: all cores.
    pub fn new(art: &Artifact, weights: Weights, threads: usize) -> Result<GradSession> {
        let (source, params) = weight_params(weights);
        GradSession::with_params(art, &|n| params.get(n).cloned(), &source, threads)
    }

    /// As `new`, with parameters from any source (`from` names it in errors).
    pub fn with_params(
        art: &Artifact,
        get: ParamSource,
        from: &str,
        threads: usize,
    ) -> Result<GradSession> {
        let bad = |reason: String| RuntimeError::Artifact {
            path: art.dir().to_path_buf(),
            reason,
        };
        let m = art.manifest();
        if m.mode != "training" {
            return Err(bad(format!(
                "an artifact for {}, not training: gradients come from one compiled with \
                 --mode training",
                m.mode
            )));
        }
        if !m.entry_points.iter().any(|e| e.name == GRADS_ENTRY) {
            return Err(bad(format!(
                "it has no `{GRADS_ENTRY}` entry point (compiled by an older egret): compile \
                 it again"
            )));
        }
        let vocab = training_vocab(art)?;
        let exec = bind(art, GRADS_ENTRY, get, from, threads)?;
        Ok(GradSession { exec, vocab })
    }

    /// The loss and gradients of `b` rows of `t` tokens with their targets (negative: none).
    pub fn grads(
        &mut self,
        tokens: &[u32],
        targets: &[i64],
        b: usize,
        t: usize,
    ) -> Result<GradOut> {
        let inputs = batch_inputs(tokens, targets, b, t, self.vocab)?;
        GradOut::from_outputs(self.exec.run(&inputs)?)
    }
}

/// The entry point of a training artifact that computes the loss and gradients only.
pub const GRADS_ENTRY: &str = "grads";
