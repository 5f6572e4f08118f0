//! Running a model on the CPU backend: the optimised `Step` graph is scheduled, compiled
//! through LLVM into an artifact (kept in a content-addressed compile cache, so a second
//! start skips optimisation and LLVM), and run by the runtime's `Session` on a thread pool.
//! One graph serves the prompt and each new token; the KV cache is a state of the executor,
//! grown in place. `executor`/`executors` JIT-compile any graph (tests, `bench matmul`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use egret_backends::artifact::{write_cpu_artifact, EntrySpec};
use egret_backends::llvm::{compile_many, panel_width, unify_symbols, Compiled, CpuOptions};
use egret_backends::schedule::{schedule_with, ScheduleOptions};
use egret_ir::{Graph, Tensor};
use egret_models::{GraphKind, LlamaConfig};
use egret_runtime::cpu::CpuExecutor;
use egret_runtime::generate::LanguageModel;
use egret_runtime::{Artifact, Session};

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
        deep_first: false,
        pack_weights: true,
        ..ScheduleOptions::default()
    };
    let progs = schedule_graphs(gs, sopts)?;
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
    let get = |name: &str| param(params, name);
    let mut out = Vec::new();
    for c in compiled {
        let mut ex = CpuExecutor::new(c.plan.clone(), c.fns.clone(), threads)?;
        ex.bind_params(&get)?;
        out.push((ex, c));
    }
    Ok(out)
}

/// Schedules graphs of one model to be compiled together (their symbols unified). Training
/// graphs (with a `loss`) are ordered deepest operand first, so recomputed activations are
/// made just before the gradients that read them.
pub(crate) fn schedule_graphs(
    gs: &[&Graph],
    sopts: ScheduleOptions,
) -> Result<Vec<egret_backends::kernel::Program>> {
    let sopts = ScheduleOptions {
        deep_first: gs
            .iter()
            .any(|g| g.outputs.iter().any(|(n, _)| n == "loss")),
        ..sopts
    };
    let mut progs = gs
        .iter()
        .map(|g| schedule_with(g, sopts))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| EgretError::Usage(e.to_string()))?;
    unify_symbols(&mut progs);
    Ok(progs)
}

/// Where `CompiledModel` gets its compiled code.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CodeSource {
    /// The compile cache: an artifact keyed by configuration, passes, target and compiler
    /// build, compiled there first if missing (`$EGRET_CACHE/artifacts/`).
    Cache,
    /// Compile afresh into a temporary artifact (`--no-cache`).
    Fresh,
    /// An artifact compiled by `egret compile` (`--artifact DIR`).
    Artifact(PathBuf),
}

/// A fingerprint of the compiler's sources (from `build.rs`): artifacts in the cache are
/// keyed by it, so a changed compiler never reuses an old artifact.
pub const BUILD_ID: &str = env!("EGRET_BUILD_ID");

/// The compile cache's directory: `$EGRET_CACHE/artifacts`, by default under
/// `~/.cache/egret`.
pub fn cache_dir() -> PathBuf {
    let root = std::env::var_os("EGRET_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/egret")))
        .unwrap_or_else(|| std::env::temp_dir().join("egret-cache"));
    root.join("artifacts")
}

/// The cache key of a compilation: SHA-256 over everything the artifact depends on.
pub fn cache_key(cfg: &LlamaConfig, passes: &str, opts: &CpuOptions, what: &str) -> String {
    let (cpu, features) = egret_backends::llvm::target_cpu(&opts.cpu);
    let text = format!(
        "{what}\nformat {}\ncompiler {} {BUILD_ID}\nconfig {}\npasses {passes}\ncpu {cpu} {}\nweights {:?}\n",
        egret_runtime::artifact::FORMAT_VERSION,
        env!("CARGO_PKG_VERSION"),
        serde_json::to_string(cfg).unwrap_or_default(),
        features.join(","),
        opts.weights,
    );
    egret_runtime::artifact::sha256_hex(text.as_bytes())[..32].to_string()
}

/// Optimises the model's `Step` graph and compiles it for the CPU into an artifact at `dir`
/// (replacing one already there). This is `egret compile --target cpu`.
pub fn compile_artifact(
    cfg: &LlamaConfig,
    passes: &str,
    opts: &CpuOptions,
    dir: &Path,
) -> Result<PathBuf> {
    let t0 = std::time::Instant::now();
    let g = optimized_graph(cfg, GraphKind::Step, passes)?;
    let sopts = ScheduleOptions {
        panel: panel_width(&opts.cpu),
        weights: opts.weights,
        states: true,
        deep_first: false,
        pack_weights: true,
        ..ScheduleOptions::default()
    };
    let prog = schedule_with(&g, sopts).map_err(|e| EgretError::Usage(e.to_string()))?;
    let model = serde_json::to_value(cfg).unwrap_or_default();
    let out = write_cpu_artifact(
        &[("step", &prog)],
        opts,
        model,
        &EntrySpec::inference(),
        dir,
    )
    .map_err(|e| EgretError::Usage(e.to_string()))?;
    if std::env::var_os("EGRET_PROFILE").is_some() {
        eprintln!(
            "compile\tartifact\t{:.1} ms\t{} kernel calls",
            t0.elapsed().as_secs_f64() * 1e3,
            prog.kernels.len()
        );
    }
    Ok(out)
}

/// The artifact of cache key `key`, compiled by `compile` into the cache first if it is not
/// there (or does not load). Compilation goes to a private directory renamed into place, so
/// processes and threads racing for one key never see a half-written artifact.
pub fn cached(key: &str, compile: impl FnOnce(&Path) -> Result<PathBuf>) -> Result<Artifact> {
    let dir = cache_dir().join(key);
    if let Ok(a) = Artifact::load(&dir) {
        return Ok(a);
    }
    std::fs::create_dir_all(cache_dir()).map_err(|e| {
        EgretError::Usage(format!(
            "cannot create the compile cache {}: {e} (set EGRET_CACHE, or pass --no-cache)",
            cache_dir().display()
        ))
    })?;
    let mine = cache_dir().join(private_name(&format!(".{key}.new")));
    compile(&mine)?;
    if dir.exists() {
        // A damaged entry (it did not load above) makes way; a fresh one from a racing
        // compilation is kept.
        if Artifact::load(&dir).is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    if std::fs::rename(&mine, &dir).is_err() {
        let _ = std::fs::remove_dir_all(&mine);
    }
    Ok(Artifact::load(&dir)?)
}

/// An artifact given with `--artifact`, which must be for the backend asked for (`cpu` or
/// `ptx`): a PTX artifact under `--backend cpu` is an error, not a silent switch to the GPU.
pub fn artifact_for(dir: &Path, kind: &str) -> Result<Artifact> {
    let art = Artifact::load(dir)?;
    let got = &art.manifest().target.kind;
    if got != kind {
        let backend = if got == "ptx" { "gpu" } else { got.as_str() };
        return Err(EgretError::Usage(format!(
            "{}: its target is `{got}`, not `{kind}`: run it with --backend {backend}",
            dir.display()
        )));
    }
    Ok(art)
}

/// `prefix-<pid>-<serial>`: a name no other process or thread uses at the same time.
fn private_name(prefix: &str) -> String {
    static SERIAL: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

/// Compiles an artifact into a private temporary directory (`--no-cache`), hands it to
/// `open`, and removes the directory: what `open` loads stays mapped.
pub fn with_fresh_artifact<T>(
    compile: impl FnOnce(&Path) -> Result<PathBuf>,
    open: impl FnOnce(&Artifact) -> Result<T>,
) -> Result<T> {
    let dir = std::env::temp_dir().join(private_name("egret-fresh"));
    let r = compile(&dir).and_then(|_| open(&Artifact::load(&dir)?));
    let _ = std::fs::remove_dir_all(&dir);
    r
}

/// The cached inference artifact for this compilation.
pub fn cached_artifact(cfg: &LlamaConfig, passes: &str, opts: &CpuOptions) -> Result<Artifact> {
    cached(&cache_key(cfg, passes, opts, "step"), |d| {
        compile_artifact(cfg, passes, opts, d)
    })
}

/// A compiled model bound to its weights: a runtime `Session` (the KV cache a state of its
/// executor), on the CPU (`--backend cpu`) or, from a PTX artifact, the GPU (`--backend gpu`,
/// `crate::gpu`).
pub struct CompiledModel {
    session: Session,
}

impl CompiledModel {
    /// Compiles (through the cache) and binds parameters; `threads` as the executor takes.
    pub fn new(
        cfg: LlamaConfig,
        params: HashMap<String, Tensor>,
        passes: &str,
        opts: &CpuOptions,
        threads: usize,
    ) -> Result<CompiledModel> {
        CompiledModel::with_source(cfg, params, passes, opts, threads, &CodeSource::Cache)
    }

    pub fn with_source(
        cfg: LlamaConfig,
        params: HashMap<String, Tensor>,
        passes: &str,
        opts: &CpuOptions,
        threads: usize,
        source: &CodeSource,
    ) -> Result<CompiledModel> {
        let art = match source {
            CodeSource::Cache => cached_artifact(&cfg, passes, opts)?,
            CodeSource::Artifact(dir) => artifact_for(dir, "cpu")?,
            CodeSource::Fresh => {
                let session = with_fresh_artifact(
                    |d| compile_artifact(&cfg, passes, opts, d),
                    |a| {
                        Ok(Session::with_params(
                            a,
                            &|n| param(&params, n),
                            "the weights",
                            threads,
                        )?)
                    },
                )?;
                return Ok(CompiledModel { session });
            }
        };
        CompiledModel::from_artifact(&art, &params, threads)
    }

    /// Binds `params` to a loaded artifact (CPU or PTX).
    pub fn from_artifact(
        art: &Artifact,
        params: &HashMap<String, Tensor>,
        threads: usize,
    ) -> Result<CompiledModel> {
        let session = Session::with_params(art, &|n| param(params, n), "the weights", threads)?;
        Ok(CompiledModel { session })
    }

    /// Logits of every position of `ids`, from an empty cache.
    pub fn logits_all(&mut self, ids: &[u32]) -> Result<Vec<Vec<f32>>> {
        Ok(self.session.logits(ids)?)
    }
}

/// A parameter's shape and data, as executors bind them.
pub(crate) fn param(
    params: &HashMap<String, Tensor>,
    name: &str,
) -> Option<(Vec<usize>, Arc<Vec<f32>>)> {
    params
        .get(name)
        .and_then(|t| Some((t.shape().to_vec(), t.f32_arc()?)))
}

impl LanguageModel for CompiledModel {
    fn vocab_size(&self) -> usize {
        self.session.vocab_size()
    }

    fn prefill(&mut self, ids: &[u32]) -> egret_runtime::Result<Vec<f32>> {
        self.session.prefill(ids)
    }

    fn decode(&mut self, id: u32) -> egret_runtime::Result<Vec<f32>> {
        self.session.decode(id)
    }
}
