//! Running a model on the GPU backend: the optimised `Step` graph is scheduled for the GPU
//! (plain matmuls), compiled to PTX through LLVM's NVPTX target into an artifact (kept in the
//! compile cache like the CPU's), and run by the runtime's `Session` on the CUDA executor.
//! Without a CUDA driver every entry point here fails with one clear error, before compiling.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use egret_backends::artifact::{write_ptx_artifact, EntrySpec};
use egret_backends::ptx::{compile_ptx, schedule_options, PtxOptions};
use egret_backends::schedule::schedule_with;
use egret_ir::{Graph, Tensor};
use egret_models::{GraphKind, LlamaConfig};
use egret_runtime::gpu::GpuExecutor;
use egret_runtime::plan::Plan;

use crate::cpu::{artifact_for, cached, with_fresh_artifact, CodeSource, CompiledModel, BUILD_ID};
use crate::interp::optimized_graph;
use crate::{EgretError, Result};

/// PTX for graphs of one model (scheduled for the GPU, compiled together) and their plans.
pub fn compile_graphs(
    gs: &[&Graph],
    opts: &PtxOptions,
    states: bool,
) -> Result<(String, Vec<Plan>)> {
    let progs = schedule_for_gpu(gs, opts, states)?;
    let refs: Vec<&egret_backends::kernel::Program> = progs.iter().collect();
    compile_ptx(&refs, opts).map_err(|e| EgretError::Usage(e.to_string()))
}

/// Graphs of one model scheduled as the GPU wants them (`ptx::schedule_options`), with or
/// without KV-cache states.
fn schedule_for_gpu(
    gs: &[&Graph],
    opts: &PtxOptions,
    states: bool,
) -> Result<Vec<egret_backends::kernel::Program>> {
    let sopts = egret_backends::schedule::ScheduleOptions {
        states,
        ..schedule_options(opts)
    };
    crate::cpu::schedule_graphs(gs, sopts)
}

/// Compiles a graph to PTX and binds parameters on GPU 0: an executor ready to run.
pub fn executor(
    g: &Graph,
    params: &HashMap<String, Tensor>,
    opts: &PtxOptions,
) -> Result<GpuExecutor> {
    egret_runtime::gpu::gpu_available()?;
    let (ptx, mut plans) = compile_graphs(&[g], opts, false)?;
    let mut ex = GpuExecutor::new(plans.remove(0), &ptx)?;
    ex.bind_params(&|name: &str| crate::cpu::param(params, name))?;
    Ok(ex)
}

/// Compiles a graph as the GPU's kernels for this CPU and binds parameters: an executor
/// that runs them on the SIMT simulator (`egret_backends::simt`), thread for thread as a GPU
/// would. Needs no GPU: this is how the GPU kernels are tested without one.
pub fn simt_executor(
    g: &Graph,
    params: &HashMap<String, Tensor>,
    opts: &PtxOptions,
) -> Result<egret_runtime::cpu::CpuExecutor> {
    let progs = schedule_for_gpu(&[g], opts, false)?;
    let mut compiled = egret_backends::simt::compile_many(
        &[&progs[0]],
        opts.tensor_cores,
        opts.wgmma(),
        opts.tma(),
    )
    .map_err(|e| EgretError::Usage(e.to_string()))?;
    let mut ex = egret_backends::simt::executor(compiled.remove(0))
        .map_err(|e| EgretError::Usage(e.to_string()))?;
    ex.bind_params(&|name: &str| crate::cpu::param(params, name))?;
    Ok(ex)
}

/// Optimises the model's `Step` graph and compiles it to PTX into an artifact at `dir`. This
/// is `egret compile --target ptx`.
pub fn compile_artifact(
    cfg: &LlamaConfig,
    passes: &str,
    opts: &PtxOptions,
    dir: &Path,
) -> Result<PathBuf> {
    let g = optimized_graph(cfg, GraphKind::Step, passes)?;
    let sopts = egret_backends::schedule::ScheduleOptions {
        states: true,
        ..schedule_options(opts)
    };
    let prog = schedule_with(&g, sopts).map_err(|e| EgretError::Usage(e.to_string()))?;
    let model = serde_json::to_value(cfg).unwrap_or_default();
    write_ptx_artifact(
        &[("step", &prog)],
        opts,
        model,
        &EntrySpec::inference(),
        dir,
    )
    .map_err(|e| EgretError::Usage(e.to_string()))
}

/// The compile-cache key of a PTX compilation.
pub fn cache_key(cfg: &LlamaConfig, passes: &str, opts: &PtxOptions, what: &str) -> String {
    let text = format!(
        "{what}\nformat {}\ncompiler {} {BUILD_ID}\nconfig {}\npasses {passes}\nptx {} {} {}\n",
        egret_runtime::artifact::FORMAT_VERSION,
        env!("CARGO_PKG_VERSION"),
        serde_json::to_string(cfg).unwrap_or_default(),
        opts.arch,
        opts.tensor_cores,
        opts.tma(),
    );
    egret_runtime::artifact::sha256_hex(text.as_bytes())[..32].to_string()
}

/// A model on the GPU: `--backend gpu`. Checks for a GPU first, so a machine without one
/// gets that error rather than a compilation.
pub fn model(
    cfg: LlamaConfig,
    params: HashMap<String, Tensor>,
    passes: &str,
    opts: &PtxOptions,
    source: &CodeSource,
) -> Result<CompiledModel> {
    let given = match source {
        CodeSource::Artifact(dir) => Some(artifact_for(dir, "ptx")?),
        _ => None,
    };
    egret_runtime::gpu::gpu_available()?;
    let art = match source {
        CodeSource::Cache => cached(&cache_key(&cfg, passes, opts, "step"), |d| {
            compile_artifact(&cfg, passes, opts, d)
        })?,
        CodeSource::Artifact(_) => given.expect("loaded above"),
        CodeSource::Fresh => {
            return with_fresh_artifact(
                |d| compile_artifact(&cfg, passes, opts, d),
                |a| CompiledModel::from_artifact(a, &params, 1),
            )
        }
    };
    CompiledModel::from_artifact(&art, &params, 1)
}
