//! A running model from a compiled artifact: `Session` binds weights to an artifact's `step`
//! entry point and runs it on the CPU executor, the KV cache held in the executor's states.
//! It implements `LanguageModel`, so `generate` drives it like any other backend.
//!
//! ```no_run
//! use egret_runtime::{Artifact, Session};
//! use egret_runtime::generate::{generate, GenerateOptions};
//! let art = Artifact::load("smollm2.egret")?;
//! let weights = egret_runtime::weights::load("SmolLM2-135M-Instruct.Q4_1.gguf".as_ref())?;
//! let mut s = Session::new(&art, weights, 0)?;
//! let opts = GenerateOptions { max_new_tokens: 20, sampler: Default::default(), stop_ids: vec![] };
//! let out = generate(&mut s, &[504, 3575, 282, 4649, 314], &opts, |_| {})?;
//! # Ok::<(), egret_runtime::RuntimeError>(())
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use crate::artifact::Artifact;
use crate::cpu::{load_kernel_library, CpuExecutor, HostData, HostValue, KernelLibrary};
use crate::generate::{check_ids, LanguageModel};
use crate::weights::Weights;
use crate::{Result, RuntimeError};

/// Where a parameter's data comes from: by Hugging Face name, its shape and f32 values.
pub type ParamSource<'a> = &'a dyn Fn(&str) -> Option<(Vec<usize>, Arc<Vec<f32>>)>;

pub struct Session {
    exec: CpuExecutor,
    // Declared after `exec`: the code stays loaded while the executor can call it.
    _lib: KernelLibrary,
    vocab: usize,
    pos: usize,
}

// SAFETY: the kernel library is immutable code; the executor is Send.
unsafe impl Send for Session {}

impl Session {
    /// Binds `weights` to the artifact's `step` entry point; `threads == 0` means all cores.
    pub fn new(art: &Artifact, weights: Weights, threads: usize) -> Result<Session> {
        let source = weights.source().to_string();
        let params: HashMap<String, (Vec<usize>, Arc<Vec<f32>>)> = weights
            .into_iter()
            .map(|(n, t)| (n, (t.shape, Arc::new(t.data))))
            .collect();
        Session::with_params(art, &|n| params.get(n).cloned(), &source, threads)
    }

    /// As `new`, with parameters from any source (`from` names it in errors).
    pub fn with_params(
        art: &Artifact,
        get: ParamSource,
        from: &str,
        threads: usize,
    ) -> Result<Session> {
        art.check_cpu_target()?;
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
        let lib = load_kernel_library(&art.dir().join(&entry.payload), plan)?;
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        let mut exec = CpuExecutor::new(plan.clone(), lib.fns.clone(), threads)?;
        exec.bind_params(get)?;
        Ok(Session {
            exec,
            _lib: lib,
            vocab,
            pos: 0,
        })
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
