//! Running a model on the CPU backend: the optimised graph is scheduled, compiled through
//! LLVM for this machine, and run by the runtime's executor on a thread pool. A generation
//! runs one `Step` graph for the prompt and for each new token; the KV cache is a state of
//! the executor, grown in place (never copied in or out). This is `--backend cpu`.

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
    Ok(executors(&[g], params, opts, threads, false)?.remove(0))
}

/// Compiles graphs of one model together (one LLVM module, kernels shared between them) and
/// binds parameters: one executor per graph. With `states`, outputs that grow an input
/// (`concat(past, new)`) stay in the executor between runs (`CpuExecutor::state`).
pub fn executors(
    gs: &[&Graph],
    params: &HashMap<String, Tensor>,
    opts: &CpuOptions,
    threads: usize,
    states: bool,
) -> Result<Vec<(CpuExecutor, Compiled)>> {
    let t0 = std::time::Instant::now();
    let sopts = ScheduleOptions {
        panel: panel_width(&opts.cpu),
        weights: opts.weights,
        states,
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
    step: CpuExecutor,
    // Keep the machine code alive as long as the executor.
    _code: Compiled,
    pos: usize,
}

// SAFETY: the compiled code is immutable and the executor is Send.
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
        let g = optimized_graph(&cfg, GraphKind::Step, passes)?;
        let (step, code) = executors(&[&g], &params, opts, threads, true)?.remove(0);
        if step.plan().states.len() != 2 * cfg.num_hidden_layers {
            return Err(RuntimeError::Invalid(format!(
                "the step graph keeps {} cache states, expected {}",
                step.plan().states.len(),
                2 * cfg.num_hidden_layers
            ))
            .into());
        }
        Ok(CpuModel {
            cfg,
            step,
            _code: code,
            pos: 0,
        })
    }

    /// Runs `ids` at positions `pos..` over the cache, returning the logits at the given
    /// offsets into `ids`; the cache grows by `ids.len()`.
    fn run(&mut self, ids: &[u32], at: &[usize]) -> Result<Vec<Vec<f32>>> {
        check_ids(ids, self.cfg.vocab_size)?;
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
        let out = self.step.run(&inputs)?;
        self.pos += t;
        match out.get("logits").map(|v| &v.data) {
            Some(HostData::F32(v)) => {
                Ok(v.chunks(self.cfg.vocab_size).map(<[f32]>::to_vec).collect())
            }
            _ => Err(RuntimeError::Invalid("graph returned no f32 logits".into()).into()),
        }
    }

    /// Logits of every position of `ids`, from an empty cache.
    pub fn logits_all(&mut self, ids: &[u32]) -> Result<Vec<Vec<f32>>> {
        self.step.reset_states();
        self.pos = 0;
        self.run(ids, &(0..ids.len()).collect::<Vec<_>>())
    }
}

impl LanguageModel for CpuModel {
    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn prefill(&mut self, ids: &[u32]) -> egret_runtime::Result<Vec<f32>> {
        self.step.reset_states();
        self.pos = 0;
        let last = ids.len().saturating_sub(1);
        let rows = self.run(ids, &[last]).map_err(rt)?;
        Ok(rows.last().cloned().unwrap_or_default())
    }

    fn decode(&mut self, id: u32) -> egret_runtime::Result<Vec<f32>> {
        let rows = self.run(&[id], &[0]).map_err(rt)?;
        Ok(rows.last().cloned().unwrap_or_default())
    }
}
