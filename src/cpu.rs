//! Running a model on the CPU backend: the optimised prefill and decode graphs are scheduled,
//! compiled through LLVM for this machine, and run by the runtime's executor on a thread
//! pool, with the KV cache kept between steps. This is `--backend cpu`.

use std::collections::HashMap;

use egret_backends::llvm::{compile_many, panel_width, unify_symbols, Compiled, CpuOptions};
use egret_backends::schedule::{schedule_with, ScheduleOptions};
use egret_ir::{Graph, Tensor};
use egret_models::{GraphKind, LlamaConfig};
use egret_runtime::cpu::{CpuExecutor, HostData, HostValue};
use egret_runtime::generate::{check_ids, LanguageModel};
use egret_runtime::RuntimeError;

use crate::interp::optimized_graph;
use crate::{EgretError, Result};

/// Compiles a graph and binds parameters: an executor ready to run.
pub fn executor(
    g: &Graph,
    params: &HashMap<String, Tensor>,
    opts: &CpuOptions,
    threads: usize,
) -> Result<(CpuExecutor, Compiled)> {
    Ok(executors(&[g], params, opts, threads)?.remove(0))
}

/// Compiles graphs of one model together (one LLVM module, kernels shared between them) and
/// binds parameters: one executor per graph.
pub fn executors(
    gs: &[&Graph],
    params: &HashMap<String, Tensor>,
    opts: &CpuOptions,
    threads: usize,
) -> Result<Vec<(CpuExecutor, Compiled)>> {
    let t0 = std::time::Instant::now();
    let sopts = ScheduleOptions {
        panel: panel_width(&opts.cpu),
        weights: opts.weights,
    };
    let mut progs = gs
        .iter()
        .map(|g| schedule_with(g, sopts))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| EgretError::Usage(e.to_string()))?;
    unify_symbols(&mut progs);
    let refs: Vec<&egret_backends::kernel::Program> = progs.iter().collect();
    let compiled = compile_many(&refs, opts).map_err(|e| EgretError::Usage(e.to_string()))?;
    if std::env::var_os("EGRET_PROFILE").is_some() {
        let distinct: std::collections::BTreeSet<&str> = compiled
            .iter()
            .flat_map(|c| c.plan.kernels.iter().map(|k| k.symbol.as_str()))
            .collect();
        let calls: usize = compiled.iter().map(|c| c.plan.kernels.len()).sum();
        eprintln!(
            "compile\t{} graph(s)\t{:.1} ms\t{calls} kernel calls, {} functions",
            gs.len(),
            t0.elapsed().as_secs_f64() * 1e3,
            distinct.len()
        );
    }
    let get = |name: &str| {
        params
            .get(name)
            .and_then(|t| Some((t.shape().to_vec(), t.f32_arc()?)))
    };
    let mut out = Vec::new();
    for c in compiled {
        let mut ex = CpuExecutor::new(c.plan.clone(), c.fns.clone(), threads)?;
        ex.bind_params(&get)?;
        out.push((ex, c));
    }
    Ok(out)
}

pub struct CpuModel {
    cfg: LlamaConfig,
    prefill: CpuExecutor,
    decode: CpuExecutor,
    // Keep the machine code alive as long as the executors.
    _code: (Compiled, Compiled),
    cache: Vec<(HostValue, HostValue)>,
    pos: usize,
}

// SAFETY: the compiled code is immutable and the executors are Send.
unsafe impl Send for CpuModel {}

fn rt(e: EgretError) -> RuntimeError {
    match e {
        EgretError::Runtime(r) => r,
        e => RuntimeError::Invalid(e.to_string()),
    }
}

impl CpuModel {
    pub fn new(
        cfg: LlamaConfig,
        params: HashMap<String, Tensor>,
        passes: &str,
        opts: &CpuOptions,
        threads: usize,
    ) -> Result<CpuModel> {
        let (gp, gd) = (
            optimized_graph(&cfg, GraphKind::PrefillLogitsAt, passes)?,
            optimized_graph(&cfg, GraphKind::Decode, passes)?,
        );
        let mut ex = executors(&[&gp, &gd], &params, opts, threads)?;
        let (decode, c2) = ex.pop().expect("two executors");
        let (prefill, c1) = ex.pop().expect("two executors");
        Ok(CpuModel {
            cfg,
            prefill,
            decode,
            _code: (c1, c2),
            cache: vec![],
            pos: 0,
        })
    }

    fn ids(ids: &[u32], start: usize) -> HashMap<String, HostValue> {
        let t = ids.len();
        let mut m = HashMap::new();
        m.insert(
            "tokens".into(),
            HostValue {
                shape: vec![1, t],
                data: HostData::I64(ids.iter().map(|&i| i as i64).collect()),
            },
        );
        m.insert(
            "positions".into(),
            HostValue {
                shape: vec![1, t],
                data: HostData::I64((start..start + t).map(|p| p as i64).collect()),
            },
        );
        m
    }

    fn take_cache(&mut self, out: &mut HashMap<String, HostValue>) -> Result<()> {
        self.cache.clear();
        for i in 0..self.cfg.num_hidden_layers {
            match (
                out.remove(&format!("present_key.{i}")),
                out.remove(&format!("present_value.{i}")),
            ) {
                (Some(k), Some(v)) => self.cache.push((k, v)),
                _ => {
                    return Err(RuntimeError::Invalid(format!(
                        "graph did not return the cache of layer {i}"
                    ))
                    .into())
                }
            }
        }
        Ok(())
    }

    fn logits(out: &HashMap<String, HostValue>) -> Result<Vec<f32>> {
        match out.get("logits").map(|v| &v.data) {
            Some(HostData::F32(v)) => Ok(v.clone()),
            _ => Err(RuntimeError::Invalid("graph returned no f32 logits".into()).into()),
        }
    }

    /// Logits of every position of `ids`.
    pub fn logits_all(&mut self, ids: &[u32]) -> Result<Vec<Vec<f32>>> {
        self.logits_at(ids, (0..ids.len()).collect())
    }

    /// Runs the prompt (filling the cache) and returns the logits at the given positions.
    fn logits_at(&mut self, ids: &[u32], at: Vec<usize>) -> Result<Vec<Vec<f32>>> {
        check_ids(ids, self.cfg.vocab_size)?;
        let mut inputs = Self::ids(ids, 0);
        inputs.insert(
            "logits_at".into(),
            HostValue {
                shape: vec![at.len()],
                data: HostData::I64(at.iter().map(|&p| p as i64).collect()),
            },
        );
        let mut out = self.prefill.run(&inputs)?;
        self.take_cache(&mut out)?;
        self.pos = ids.len();
        Ok(Self::logits(&out)?
            .chunks(self.cfg.vocab_size)
            .map(<[f32]>::to_vec)
            .collect())
    }
}

impl LanguageModel for CpuModel {
    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn prefill(&mut self, ids: &[u32]) -> egret_runtime::Result<Vec<f32>> {
        let last = ids.len().saturating_sub(1);
        let rows = self.logits_at(ids, vec![last]).map_err(rt)?;
        Ok(rows.last().cloned().unwrap_or_default())
    }

    fn decode(&mut self, id: u32) -> egret_runtime::Result<Vec<f32>> {
        check_ids(&[id], self.cfg.vocab_size)?;
        let mut inputs = Self::ids(&[id], self.pos);
        for (i, (k, v)) in self.cache.drain(..).enumerate() {
            inputs.insert(format!("past_key.{i}"), k);
            inputs.insert(format!("past_value.{i}"), v);
        }
        let mut out = self.decode.run(&inputs)?;
        self.take_cache(&mut out).map_err(rt)?;
        self.pos += 1;
        Self::logits(&out).map_err(rt)
    }
}
