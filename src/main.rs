//! The `egret` command line: a thin layer over the facade library. Every failure prints one
//! `error: …` line and exits with status 1; nothing panics on bad input.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use egret::interp::InterpModel;
use egret::{load_config, load_model, load_tokenizer, ModelSource};
use egret_models::GraphKind;
use egret_passes::{all_passes, pipeline, PassCx, PassManager, PrintAfter};
use egret_runtime::generate::{generate_while, GenerateOptions};
use egret_runtime::sampler::SamplerConfig;
use egret_runtime::weights::{save_safetensors, SaveDType, Weights};
use egret_runtime::HostTensor;

#[derive(Parser)]
#[command(
    name = "egret",
    version,
    about = "A compiler for neural-network graphs (LLaMA in a tensor IR)",
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Backend {
    Cpu,
    Gpu,
    Interp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    Inference,
    Training,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Which {
    Prefill,
    /// Prefill with logits only at the positions of input `logits_at`.
    PrefillAt,
    Decode,
    /// Decode with logits only at `logits_at`: what `--backend cpu` runs for prompt and tokens.
    Step,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum RematBaseline {
    Layers,
    Sqrt,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum InitArg {
    Random,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Target {
    Cpu,
    Ptx,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DTypeArg {
    F32,
    Bf16,
    F16,
}

/// How the CPU backend stores matmul weights (`kernel::PanelType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum WeightsArg {
    F32,
    Bf16,
    F16,
    /// int8 with an f32 scale per 32 rows of each column (like llama.cpp's Q8_0).
    Q8,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from a prompt.
    Generate {
        model: String,
        #[arg(long, conflicts_with = "tokens")]
        prompt: Option<String>,
        /// Prompt as comma-separated token ids.
        #[arg(long)]
        tokens: Option<String>,
        #[arg(long, default_value_t = 32)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 0.0)]
        temperature: f32,
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[command(flatten)]
        run: RunOpts,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run one forward pass and print the logits of every position as JSON.
    Logits {
        model: String,
        #[arg(long)]
        tokens: String,
        #[command(flatten)]
        run: RunOpts,
    },
    /// Encode text with the model's tokenizer.
    Tokenize {
        model: String,
        #[arg(long, required_unless_present = "file", conflicts_with = "file")]
        text: Option<String>,
        /// Encode the contents of this file (UTF-8) instead of `--text`.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Add BOS/EOS as the tokenizer's configuration asks.
        #[arg(long)]
        add_special: bool,
    },
    /// Loss (mean next-token cross-entropy) and the gradient of every parameter.
    Grad {
        model: String,
        /// The sequence, as comma-separated token ids (at least two).
        #[arg(long)]
        tokens: String,
        #[arg(long, value_enum, default_value_t = Backend::Cpu)]
        backend: Backend,
        #[arg(long, default_value = "default")]
        passes: String,
        /// Threads for the CPU backend (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Activation memory budget for checkpoint placement.
        #[arg(long)]
        memory_budget: Option<u64>,
        /// Write the gradients here (safetensors, `grad.<name>`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Run this training artifact's `grads` entry point (`egret compile --mode
        /// training`) instead of compiling; MODEL gives the weights.
        #[arg(long, conflicts_with_all = ["passes", "memory_budget"])]
        artifact: Option<PathBuf>,
    },
    /// Train with AdamW on a text file (next-token prediction), or fine-tune a checkpoint.
    Train {
        /// A model to fine-tune, or (with `--init random`) a config.json / directory / preset.
        model: String,
        /// Training text (UTF-8).
        #[arg(long)]
        data: PathBuf,
        /// Start from random weights (Hugging Face's initialisation) instead of MODEL's.
        #[arg(long, value_enum)]
        init: Option<InitArg>,
        /// Tokenizer: a tokenizer.json, a GGUF file or a model directory (default: MODEL's).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Total steps (a resumed run continues up to this many).
        #[arg(long, default_value_t = 100)]
        steps: usize,
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Tokens per sequence.
        #[arg(long, default_value_t = TRAIN_SEQ)]
        seq: usize,
        /// Peak learning rate (linear warmup, then cosine decay to a tenth).
        #[arg(long, default_value_t = 3e-4)]
        lr: f64,
        #[arg(long, default_value_t = 0)]
        warmup: usize,
        #[arg(long, default_value_t = TRAIN_WEIGHT_DECAY)]
        weight_decay: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        memory_budget: Option<u64>,
        /// Write the final checkpoint here (Hugging Face layout plus optimizer state).
        #[arg(long)]
        save: Option<PathBuf>,
        /// Also write `SAVE/checkpoint-<step>` every this many steps.
        #[arg(long)]
        save_every: Option<usize>,
        /// Continue from a checkpoint (its weights, optimizer state and hyper-parameters).
        #[arg(long)]
        resume: Option<PathBuf>,
        /// JSONL log (`step`, `loss`, `lr`, `tok_s`, `grad_norm`); the loss curve is drawn
        /// beside it as SVG at the end.
        #[arg(long)]
        log: Option<PathBuf>,
        #[arg(long, value_enum, default_value_t = Backend::Cpu)]
        backend: Backend,
        #[arg(long, default_value = "default")]
        passes: String,
        /// Threads for the CPU backend (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// Compile the step afresh instead of reusing it from the compile cache.
        #[arg(long)]
        no_cache: bool,
        /// Run this training artifact (`egret compile --mode training`) instead of
        /// compiling the step; MODEL (or --resume) gives the weights.
        #[arg(long, conflicts_with_all = ["no_cache", "passes"])]
        artifact: Option<PathBuf>,
    },
    /// Compile a model into an artifact directory (manifest.json + kernel payload).
    Compile {
        model: String,
        #[arg(long, value_enum, default_value_t = Target::Cpu)]
        target: Target,
        #[arg(long, value_enum, default_value_t = Mode::Inference)]
        mode: Mode,
        #[arg(long, default_value = "default")]
        passes: String,
        /// With `--target cpu`: the LLVM CPU name (`native`: this machine) [default: native].
        #[arg(long)]
        cpu: Option<String>,
        /// With `--target cpu`: storage of matmul weights (compute is f32) [default: f32].
        #[arg(long, value_enum)]
        weights_dtype: Option<WeightsArg>,
        /// GPU architecture for `--target ptx` (sm_80, sm_86, sm_89, sm_90; sm_90a: sm_90
        /// cards alone, with `wgmma` for `--tensor-cores`) [default: sm_80].
        #[arg(long)]
        gpu_arch: Option<String>,
        /// With `--target ptx`: matmuls in bf16 (operands rounded, f32 sums), the large
        /// ones and prompt attention on tensor cores.
        #[arg(long)]
        tensor_cores: bool,
        /// With `--mode training`: AdamW's weight decay, built into the step (as `egret
        /// train --weight-decay`, whose default it has).
        #[arg(long)]
        weight_decay: Option<f64>,
        /// With `--mode training`: place activation checkpoints so that a step of `--batch`
        /// rows of `--seq` tokens keeps at most this many bytes of activations.
        #[arg(long)]
        memory_budget: Option<u64>,
        /// The batch the memory budget is for [default: 1, as `egret train`'s].
        #[arg(long, requires = "memory_budget")]
        batch: Option<usize>,
        /// The tokens per sequence the memory budget is for [default: 128, as `egret
        /// train`'s].
        #[arg(long, requires = "memory_budget")]
        seq: Option<usize>,
        #[arg(short, long)]
        out: PathBuf,
    },
    /// Write a Hugging Face directory (config.json, model.safetensors, tokenizer.json).
    Convert {
        model: String,
        #[arg(short, long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value_t = DTypeArg::F32)]
        dtype: DTypeArg,
    },
    /// Show the IR of a model (or of an IR text file `*.ir`), optionally after passes.
    Ir {
        model: String,
        #[arg(long, value_enum, default_value_t = Mode::Inference)]
        mode: Mode,
        /// Which inference graph to show.
        #[arg(long, value_enum, default_value_t = Which::Prefill)]
        graph: Which,
        /// Fix the batch dim `B`.
        #[arg(long)]
        batch: Option<i64>,
        /// Fix the sequence dim `T`.
        #[arg(long)]
        seq: Option<i64>,
        /// With --mode training: activation memory budget in bytes for checkpoint placement.
        #[arg(long)]
        memory_budget: Option<u64>,
        /// With --mode training: recompute as a classic baseline does instead (`layers`: keep
        /// each layer's input; `sqrt`: every ⌈√layers⌉-th layer's).
        #[arg(long, value_enum)]
        remat_baseline: Option<RematBaseline>,
        #[arg(long, default_value = "none")]
        passes: String,
        /// Print the IR after this pass (or `all`).
        #[arg(long)]
        print_after: Option<String>,
        #[arg(long, conflicts_with = "dot")]
        stats: bool,
        /// Print the rewrite rules that fired, with counts (to stderr with IR output).
        #[arg(long)]
        explain: bool,
        #[arg(long)]
        dot: bool,
    },
    /// List the passes.
    Passes,
    /// Measure: a matmul kernel, or a model's prefill and decode speed.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// `[N, N] x [N, N]` f32 matmul (weights as a linear layer stores them).
    Matmul {
        #[arg(long, default_value_t = 2048)]
        size: usize,
        #[arg(long, value_enum, default_value_t = Backend::Cpu)]
        backend: Backend,
        #[arg(long)]
        threads: Option<usize>,
        #[arg(long, default_value = "native")]
        cpu: String,
        /// Timed repetitions (the best is reported, as the numpy anchor does over its 10).
        #[arg(long, default_value_t = 10)]
        reps: usize,
        #[arg(long)]
        json: bool,
    },
    /// Prefill a prompt of `--prompt-len` tokens, then decode `--gen` tokens.
    Model {
        model: String,
        #[arg(long, default_value_t = 64)]
        prompt_len: usize,
        #[arg(long, default_value_t = 64)]
        gen: usize,
        #[command(flatten)]
        run: RunOpts,
        #[arg(long)]
        json: bool,
    },
}

/// AdamW's weight decay unless `--weight-decay` says otherwise (`egret train`, `egret
/// compile --mode training`).
const TRAIN_WEIGHT_DECAY: f64 = 0.01;
/// Tokens per training sequence unless `--seq` says otherwise (`egret train`, and the shape
/// `egret compile --mode training --memory-budget` places checkpoints for).
const TRAIN_SEQ: usize = 128;

/// `println!` that returns a failed write to stdout (a closed pipe, a full disk) as an error
/// instead of panicking.
macro_rules! outln {
    ($($t:tt)*) => {
        writeln!(std::io::stdout(), $($t)*).map_err(|e| anyhow!("cannot write the output: {e}"))
    };
}

/// `print!` as `outln!` does `println!`.
macro_rules! out {
    ($($t:tt)*) => {
        write!(std::io::stdout(), $($t)*).map_err(|e| anyhow!("cannot write the output: {e}"))
    };
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    if let Err(e) = run(cli) {
        eprintln!("error: {}", one_line(&e));
        std::process::exit(1);
    }
}

/// An error and its causes as one line, each cause once: a message that already quotes its
/// cause (`cannot read F: No such file…` over the I/O error itself) is not followed by it
/// again.
fn one_line(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !msg.contains(&c) {
            msg.push_str(": ");
            msg.push_str(&c);
        }
    }
    msg.replace('\n', " ")
}

/// AdamW's weight decay: finite, 0 or more.
fn check_weight_decay(w: f64) -> Result<()> {
    if !(w.is_finite() && w >= 0.0) {
        bail!("--weight-decay {w}: a finite number, 0 or more");
    }
    Ok(())
}

/// A text file, which must be UTF-8 (a tokenizer's input: replacing bad bytes would train
/// or tokenize text that is not in the file).
fn read_utf8(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        anyhow!(
            "{} is not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

fn parse_ids(s: &str) -> Result<Vec<u32>> {
    if s.trim().is_empty() {
        bail!("--tokens: no token ids given");
    }
    s.split(',')
        .map(str::trim)
        .enumerate()
        .map(|(i, t)| match t {
            "" => Err(anyhow!("--tokens: entry {} is empty (expected comma-separated non-negative integers)", i + 1)),
            _ => t.parse::<u32>().map_err(|_| anyhow!("--tokens: `{t}` is not a token id (expected comma-separated non-negative integers)")),
        })
        .collect()
}

/// How to run the model: the backend and its options (shared by `generate`, `logits` and
/// `bench model`).
#[derive(clap::Args)]
struct RunOpts {
    #[arg(long, value_enum, default_value_t = Backend::Cpu)]
    backend: Backend,
    /// The passes to compile with: `default`, `none` or a comma-separated list [default:
    /// default].
    #[arg(long)]
    passes: Option<String>,
    /// Threads for the CPU backend (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// LLVM CPU name for the CPU backend (`native`: this machine) [default: native].
    #[arg(long)]
    cpu: Option<String>,
    /// Storage of matmul weights on the CPU backend (compute is f32) [default: f32].
    #[arg(long, value_enum)]
    weights_dtype: Option<WeightsArg>,
    /// GPU architecture the GPU backend generates PTX for (it runs on that GPU and later;
    /// sm_90a on sm_90 alone, with `wgmma` for `--tensor-cores`) [default: sm_80].
    #[arg(long)]
    gpu_arch: Option<String>,
    /// GPU matmuls in bf16 (operands rounded, f32 sums), the large ones and prompt attention
    /// on tensor cores.
    #[arg(long)]
    tensor_cores: bool,
    /// Run this artifact (from `egret compile`) instead of compiling; MODEL gives the weights.
    #[arg(long, conflicts_with = "no_cache")]
    artifact: Option<PathBuf>,
    /// Compile afresh instead of reusing an artifact from the compile cache.
    #[arg(long)]
    no_cache: bool,
}

impl RunOpts {
    fn threads(&self) -> usize {
        self.threads.unwrap_or_else(default_threads).max(1)
    }

    fn passes(&self) -> &str {
        self.passes.as_deref().unwrap_or("default")
    }

    /// Refuses the options that would do nothing with this backend (or with `--artifact`,
    /// whose code was compiled with its own), so that none is silently ignored.
    fn check_used(&self) -> Result<()> {
        let (cpu, weights) = (self.cpu.is_some(), self.weights_dtype.is_some());
        let (arch, tc) = (self.gpu_arch.is_some(), self.tensor_cores);
        if self.backend == Backend::Gpu && self.threads.is_some() {
            bail!("--threads has no effect with --backend gpu (for --backend cpu only)");
        }
        if self.artifact.is_some() {
            let fixed = [
                ("--passes", self.passes.is_some()),
                ("--cpu", cpu),
                ("--weights-dtype", weights),
                ("--gpu-arch", arch),
                ("--tensor-cores", tc),
            ];
            return refuse_unused(
                &fixed,
                "with --artifact (fixed when the artifact was compiled)",
            );
        }
        match self.backend {
            Backend::Interp => refuse_unused(
                &[
                    ("--cpu", cpu),
                    ("--weights-dtype", weights),
                    ("--gpu-arch", arch),
                    ("--tensor-cores", tc),
                    ("--no-cache", self.no_cache),
                ],
                "with --backend interp (nothing is compiled)",
            ),
            Backend::Cpu => refuse_unused(
                &[("--gpu-arch", arch), ("--tensor-cores", tc)],
                "with --backend cpu (for --backend gpu only)",
            ),
            Backend::Gpu => refuse_unused(
                &[("--cpu", cpu), ("--weights-dtype", weights)],
                "with --backend gpu (for --backend cpu only)",
            ),
        }
    }
}

/// One error naming every option given (`(flag, given)`) that would have no effect, and why.
fn refuse_unused(flags: &[(&str, bool)], why: &str) -> Result<()> {
    let given: Vec<&str> = flags.iter().filter(|f| f.1).map(|f| f.0).collect();
    match given.len() {
        0 => Ok(()),
        1 => bail!("{} has no effect {why}", given[0]),
        _ => bail!("{} have no effect {why}", given.join(", ")),
    }
}

fn panel_type(d: WeightsArg) -> egret_backends::kernel::PanelType {
    match d {
        WeightsArg::F32 => egret_backends::kernel::PanelType::F32,
        WeightsArg::Bf16 => egret_backends::kernel::PanelType::BF16,
        WeightsArg::F16 => egret_backends::kernel::PanelType::F16,
        WeightsArg::Q8 => egret_backends::kernel::PanelType::Q8,
    }
}

/// A loaded model on the chosen backend.
enum Runner {
    Interp(InterpModel),
    /// CPU or GPU code from an artifact.
    Compiled(egret::cpu::CompiledModel),
}

impl Runner {
    fn new(
        loaded: egret::LoadedModel,
        o: &RunOpts,
    ) -> Result<(
        Runner,
        Option<egret_runtime::tokenizer::Tokenizer>,
        Vec<u32>,
    )> {
        o.check_used()?;
        let stop = loaded.config.eos_token_ids.clone();
        let tok = loaded.tokenizer;
        let r = match o.backend {
            Backend::Interp if o.artifact.is_some() => {
                bail!("--artifact runs compiled code: use it with --backend cpu or gpu")
            }
            Backend::Interp => {
                Runner::Interp(InterpModel::new(loaded.config, loaded.params, o.passes())?)
            }
            Backend::Cpu => Runner::Compiled(egret::cpu::CompiledModel::with_source(
                loaded.config,
                loaded.params,
                o.passes(),
                &egret_backends::llvm::CpuOptions {
                    cpu: o.cpu.clone().unwrap_or_else(|| "native".into()),
                    weights: panel_type(o.weights_dtype.unwrap_or(WeightsArg::F32)),
                },
                o.threads(),
                &match (&o.artifact, o.no_cache) {
                    (Some(d), _) => egret::cpu::CodeSource::Artifact(d.clone()),
                    (None, true) => egret::cpu::CodeSource::Fresh,
                    (None, false) => egret::cpu::CodeSource::Cache,
                },
            )?),
            Backend::Gpu => Runner::Compiled(egret::gpu::model(
                loaded.config,
                loaded.params,
                o.passes(),
                &egret_backends::ptx::PtxOptions {
                    arch: o.gpu_arch.clone().unwrap_or_else(|| "sm_80".into()),
                    tensor_cores: o.tensor_cores,
                    tma: false,
                },
                &match (&o.artifact, o.no_cache) {
                    (Some(d), _) => egret::cpu::CodeSource::Artifact(d.clone()),
                    (None, true) => egret::cpu::CodeSource::Fresh,
                    (None, false) => egret::cpu::CodeSource::Cache,
                },
            )?),
        };
        Ok((r, tok, stop))
    }

    fn model(&mut self) -> &mut dyn egret_runtime::generate::LanguageModel {
        match self {
            Runner::Interp(m) => m,
            Runner::Compiled(m) => m,
        }
    }

    fn logits_all(&mut self, ids: &[u32]) -> Result<Vec<Vec<f32>>> {
        Ok(match self {
            Runner::Interp(m) => m.logits_all(ids)?,
            Runner::Compiled(m) => m.logits_all(ids)?,
        })
    }
}

fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Generate {
            model,
            prompt,
            tokens,
            max_new_tokens,
            temperature,
            top_p,
            seed,
            run: ro,
            json,
        } => {
            if !(temperature >= 0.0) || !(top_p > 0.0 && top_p <= 1.0) {
                bail!("--temperature must be >= 0 and --top-p in (0, 1]");
            }
            let src = ModelSource::resolve(&model)?;
            let loaded = load_model(&src)?;
            let prompt_ids = match (&prompt, &tokens) {
                (Some(text), None) => {
                    let tok = loaded.tokenizer.as_ref().ok_or_else(|| {
                        anyhow!("{model}: no tokenizer; pass --tokens instead of --prompt")
                    })?;
                    tok.encode(text, true)?
                }
                (None, Some(t)) => parse_ids(t)?,
                _ => bail!("give --prompt TEXT or --tokens 1,2,3"),
            };
            let (mut m, tokenizer, stop_ids) = Runner::new(loaded, &ro)?;
            let opts = GenerateOptions {
                max_new_tokens,
                sampler: SamplerConfig {
                    temperature,
                    top_p,
                    seed,
                },
                stop_ids,
            };
            let stdout = std::io::stdout();
            let mut printed = String::new();
            let mut so_far: Vec<u32> = Vec::new();
            // A failed write of the streamed text (a closed pipe, a full disk) stops the
            // generation; it is reported once it has ended.
            let mut failed: Option<std::io::Error> = None;
            let gen = generate_while(m.model(), &prompt_ids, &opts, |id| {
                if json {
                    return true;
                }
                so_far.push(id);
                if let Some(tok) = &tokenizer {
                    if let Ok(text) = tok.decode(&so_far) {
                        // Print only complete characters: hold back a trailing replacement char.
                        let stable = text.trim_end_matches('\u{FFFD}');
                        if stable.len() > printed.len() && stable.starts_with(printed.as_str()) {
                            let mut out = stdout.lock();
                            let r = write!(out, "{}", &stable[printed.len()..])
                                .and_then(|_| out.flush());
                            if let Err(e) = r {
                                failed = Some(e);
                                return false;
                            }
                            printed = stable.to_string();
                        }
                    }
                }
                true
            })?;
            if let Some(e) = failed {
                bail!("cannot write the output: {e}");
            }
            let text = match &tokenizer {
                Some(t) => t.decode(&gen.ids)?,
                None => String::new(),
            };
            if json {
                let obj = serde_json::json!({
                    "prompt_ids": prompt_ids,
                    "ids": gen.ids,
                    "text": text,
                    "prefill_tok_s": gen.prefill_tok_s(),
                    "decode_tok_s": gen.decode_tok_s(),
                });
                outln!("{obj}")?;
            } else if tokenizer.is_none() {
                outln!(
                    "{}",
                    gen.ids
                        .iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                )?;
            } else {
                if text.len() > printed.len() && text.starts_with(&printed) {
                    out!("{}", &text[printed.len()..])?;
                }
                outln!()?;
            }
            Ok(())
        }
        Cmd::Logits {
            model,
            tokens,
            run: ro,
        } => {
            let ids = parse_ids(&tokens)?;
            let loaded = load_model(&ModelSource::resolve(&model)?)?;
            let v = loaded.config.vocab_size;
            let (mut m, _, _) = Runner::new(loaded, &ro)?;
            let rows = m.logits_all(&ids)?;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            write!(out, "{{\"shape\":[{},{}],\"logits\":[", rows.len(), v)?;
            for (i, row) in rows.iter().enumerate() {
                out.write_all(if i == 0 { b"[" } else { b",[" })?;
                for (j, x) in row.iter().enumerate() {
                    if j > 0 {
                        out.write_all(b",")?;
                    }
                    if x.is_finite() {
                        write!(out, "{x}")?;
                    } else {
                        out.write_all(b"null")?;
                    }
                }
                out.write_all(b"]")?;
            }
            writeln!(out, "]}}")?;
            // (a failed write in the buffer's last flush is an error too, not lost in its drop)
            out.flush()
                .map_err(|e| anyhow!("cannot write the output: {e}"))?;
            Ok(())
        }
        Cmd::Tokenize {
            model,
            text,
            file,
            add_special,
        } => {
            let tok = load_tokenizer(&ModelSource::resolve(&model)?)?;
            let text = match (text, file) {
                (Some(t), _) => t,
                (None, Some(f)) => read_utf8(&f)?,
                (None, None) => bail!("give --text or --file"),
            };
            let ids = tok.encode(&text, add_special)?;
            outln!("{}", serde_json::json!({ "ids": ids }))?;
            Ok(())
        }
        Cmd::Convert { model, out, dtype } => convert(&model, &out, dtype),
        Cmd::Train {
            model,
            data,
            init,
            tokenizer,
            steps,
            batch,
            seq,
            lr,
            warmup,
            weight_decay,
            seed,
            memory_budget,
            save,
            save_every,
            resume,
            log,
            backend,
            passes,
            threads,
            no_cache,
            artifact,
        } => {
            egret::train::check_step_shape(batch as u64, seq as u64, "--batch and --seq")?;
            if artifact.is_some() && memory_budget.is_some() {
                bail!("--memory-budget places activation checkpoints as the step is compiled: a compiled artifact's are fixed");
            }
            if !(lr.is_finite() && lr >= 0.0) {
                bail!("--lr {lr}: a learning rate is a finite number, 0 or more");
            }
            check_weight_decay(weight_decay)?;
            let opts = egret_backends::llvm::CpuOptions::default();
            let gpu = egret_backends::ptx::PtxOptions::default();
            let be = grad_backend(backend, &opts, &gpu, threads, !no_cache)?;
            let adamw = egret::train::cli_adamw(weight_decay);
            let run = TrainRun {
                model,
                data,
                random: init.is_some(),
                tokenizer,
                state: egret::train::TrainerState {
                    step: 0,
                    seed,
                    batch,
                    seq,
                    lr,
                    warmup,
                    total_steps: steps,
                    beta1: adamw.beta1,
                    beta2: adamw.beta2,
                    eps: adamw.eps,
                    weight_decay: adamw.weight_decay,
                    max_grad_norm: adamw.max_grad_norm,
                },
                artifact,
                save,
                save_every,
                resume,
                log,
                passes,
                memory_budget,
            };
            train(run, be)
        }
        Cmd::Grad {
            model,
            tokens,
            backend,
            passes,
            threads,
            memory_budget,
            out,
            artifact,
        } => {
            let ids = parse_ids(&tokens)?;
            let loaded = load_model(&ModelSource::resolve(&model)?)?;
            let opts = egret_backends::llvm::CpuOptions::default();
            let gpu = egret_backends::ptx::PtxOptions::default();
            let be = grad_backend(backend, &opts, &gpu, threads, true)?;
            let (cfg, params) = (&loaded.config, &loaded.params);
            let r = match &artifact {
                Some(dir) => egret::train::grads_from_artifact(cfg, params, &ids, dir, be)?,
                None => egret::train::grads(cfg, params, &ids, &passes, be, memory_budget)?,
            };
            if let Some(path) = out {
                let mut w = egret_runtime::weights::Weights::new().with_source("gradients");
                for (name, t) in r.grads {
                    w.insert(format!("grad.{name}"), t);
                }
                egret_runtime::weights::save_safetensors(
                    &path,
                    &w,
                    egret_runtime::weights::SaveDType::F32,
                )?;
            }
            outln!("{}", serde_json::json!({ "loss": r.loss }))?;
            Ok(())
        }
        Cmd::Compile {
            model,
            target,
            mode,
            passes,
            cpu,
            weights_dtype,
            gpu_arch,
            tensor_cores,
            weight_decay,
            memory_budget,
            batch,
            seq,
            out,
        } => {
            let cfg = egret::load_config(&ModelSource::resolve(&model)?)?;
            if mode == Mode::Inference {
                refuse_unused(
                    &[
                        ("--weight-decay", weight_decay.is_some()),
                        ("--memory-budget", memory_budget.is_some()),
                    ],
                    "without --mode training (for training steps only)",
                )?;
            }
            let budget = match memory_budget {
                Some(bytes) => {
                    let (batch, seq) = (batch.unwrap_or(1), seq.unwrap_or(TRAIN_SEQ));
                    egret::train::check_step_shape(batch as u64, seq as u64, "--batch and --seq")?;
                    Some(egret::train::MemoryBudget { bytes, batch, seq })
                }
                None => None,
            };
            if let Some(w) = weight_decay {
                check_weight_decay(w)?;
            }
            match target {
                Target::Cpu => refuse_unused(
                    &[
                        ("--gpu-arch", gpu_arch.is_some()),
                        ("--tensor-cores", tensor_cores),
                    ],
                    "with --target cpu (for --target ptx only)",
                )?,
                Target::Ptx => refuse_unused(
                    &[
                        ("--cpu", cpu.is_some()),
                        ("--weights-dtype", weights_dtype.is_some()),
                    ],
                    "with --target ptx (for --target cpu only)",
                )?,
            }
            let weights_dtype = weights_dtype.unwrap_or(WeightsArg::F32);
            if mode == Mode::Training && weights_dtype != WeightsArg::F32 {
                bail!("--weights-dtype: a training step keeps its weights in f32");
            }
            // (a training artifact's step has AdamW built in, as `egret train` runs it)
            let adamw = egret::train::cli_adamw(weight_decay.unwrap_or(TRAIN_WEIGHT_DECAY));
            let dir = if target == Target::Ptx {
                let opts = egret_backends::ptx::PtxOptions {
                    arch: gpu_arch.unwrap_or_else(|| "sm_80".into()),
                    tensor_cores,
                    tma: false,
                };
                match mode {
                    Mode::Inference => egret::gpu::compile_artifact(&cfg, &passes, &opts, &out)?,
                    Mode::Training => egret::train::compile_train_artifact_ptx(
                        &cfg,
                        &passes,
                        &opts,
                        &adamw,
                        egret::train::TrainEntries::StepAndGrads,
                        budget,
                        &out,
                    )?,
                }
            } else {
                let opts = egret_backends::llvm::CpuOptions {
                    cpu: cpu.unwrap_or_else(|| "native".into()),
                    weights: panel_type(weights_dtype),
                };
                match mode {
                    Mode::Inference => egret::cpu::compile_artifact(&cfg, &passes, &opts, &out)?,
                    Mode::Training => egret::train::compile_train_artifact(
                        &cfg,
                        &passes,
                        &opts,
                        &adamw,
                        egret::train::TrainEntries::StepAndGrads,
                        budget,
                        &out,
                    )?,
                }
            };
            outln!("{}", dir.display())?;
            Ok(())
        }
        Cmd::Ir {
            model,
            mode,
            graph,
            batch,
            seq,
            memory_budget,
            remat_baseline,
            passes,
            print_after,
            stats,
            explain,
            dot,
        } => {
            if memory_budget.is_some() && mode != Mode::Training {
                bail!("--memory-budget places checkpoints in training graphs: add --mode training");
            }
            if remat_baseline.is_some() && (mode != Mode::Training || memory_budget.is_some()) {
                bail!("--remat-baseline is for --mode training without --memory-budget");
            }
            let mut g = if mode == Mode::Training {
                let cfg = load_config(&ModelSource::resolve(&model)?)?;
                egret::train::differentiated(&cfg, &passes)?
            } else if model.ends_with(".ir") {
                // IR text: parse (errors give line:column) and verify.
                let text = std::fs::read_to_string(&model)
                    .with_context(|| format!("cannot read {model}"))?;
                egret_ir::parse(&text).with_context(|| format!("{model}"))?
            } else {
                let cfg = load_config(&ModelSource::resolve(&model)?)?;
                let kind = match graph {
                    Which::Prefill => GraphKind::Prefill,
                    Which::PrefillAt => GraphKind::PrefillLogitsAt,
                    Which::Decode => GraphKind::Decode,
                    Which::Step => GraphKind::Step,
                };
                egret_models::build(&cfg, kind)?
            };
            let mut bind = HashMap::new();
            if let Some(b) = batch {
                bind.insert("B".to_string(), b);
            }
            if let Some(t) = seq {
                bind.insert("T".to_string(), t);
            }
            if batch.is_some_and(|b| b < 1) || seq.is_some_and(|t| t < 1) {
                bail!("--batch and --seq must be at least 1");
            }
            // Dims the training memory plan needs: those given, else batch 1 and 2048 tokens.
            let (plan_b, plan_t) = (batch.unwrap_or(1), seq.unwrap_or(2048));
            egret::train::check_step_shape(plan_b as u64, plan_t as u64, "--batch and --seq")?;
            g.bind_dims(&bind);
            egret_ir::verify(&g)?;
            let pa = match print_after.as_deref() {
                None => PrintAfter::Nothing,
                Some("all") => PrintAfter::All,
                Some(list) => {
                    PrintAfter::Passes(list.split(',').map(|s| s.trim().to_string()).collect())
                }
            };
            let pm = PassManager::new(pipeline(&passes)?).print_after(pa)?;
            let mut cx = PassCx::default();
            // (the first failed write to stdout, reported once the passes are done)
            let mut dump_err: Option<std::io::Error> = None;
            let reports = pm.run(&mut g, &mut cx, |name, g| {
                if dump_err.is_none() {
                    let mut o = std::io::stdout().lock();
                    let r = writeln!(o, "; IR after {name}")
                        .and_then(|_| write!(o, "{}", egret_ir::print(g)));
                    dump_err = r.err();
                }
            })?;
            if let Some(e) = dump_err {
                bail!("cannot write the output: {e}");
            }
            let mut memory = serde_json::Value::Null;
            if mode == Mode::Training {
                let b = HashMap::from([("B".to_string(), plan_b), ("T".to_string(), plan_t)]);
                use egret_backends::remat;
                let p = match (memory_budget, remat_baseline) {
                    (Some(budget), _) => remat::place(&g, budget, &b)?,
                    (None, Some(RematBaseline::Layers)) => {
                        remat::evaluate(&g, &remat::layer_checkpoints(&g, 1)?, &b)?
                    }
                    (None, Some(RematBaseline::Sqrt)) => {
                        let layers = load_config(&ModelSource::resolve(&model)?)?.num_hidden_layers;
                        let every = (layers as f64).sqrt().ceil() as usize;
                        remat::evaluate(&g, &remat::layer_checkpoints(&g, every)?, &b)?
                    }
                    (None, None) => remat::evaluate(&g, &Default::default(), &b)?,
                };
                memory = serde_json::json!({
                    "peak_activation_bytes": p.peak_activation_bytes,
                    "budget_bytes": memory_budget,
                    "recompute_flops_ratio": p.recompute_flops_ratio,
                    "recomputed_values": p.recomputed,
                });
                g = p.graph;
            }
            if stats {
                let mut ops: BTreeMap<&str, usize> = BTreeMap::new();
                for n in &g.nodes {
                    *ops.entry(n.op.name()).or_default() += 1;
                }
                let passes: Vec<_> = reports
                    .iter()
                    .map(|r| serde_json::json!({"name": r.name, "ms": r.ms}))
                    .collect();
                let mut j = serde_json::json!({ "ops": ops, "passes": passes, "nodes": g.len(), "counters": cx.counters, "rules": cx.rules_fired });
                if !memory.is_null() {
                    j["memory"] = memory;
                }
                outln!("{j}")?;
            } else if explain {
                for (rule, n) in &cx.rules_fired {
                    outln!("{rule:<28} {n}")?;
                }
            } else if dot {
                out!("{}", g.to_dot())?;
            } else {
                out!("{}", egret_ir::print(&g))?;
            }
            Ok(())
        }
        Cmd::Bench { what } => bench(what),
        Cmd::Passes => {
            for p in all_passes() {
                outln!("{:<12} {}", p.name(), p.summary())?;
            }
            Ok(())
        }
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory, then renames it,
/// so an existing file is replaced whole or not at all.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// The files `convert` writes: a directory of these and nothing else (an earlier
/// conversion) may be written over.
const CONVERT_FILES: [&str; 3] = ["config.json", "model.safetensors", "tokenizer.json"];

fn convert(model: &str, out: &Path, dtype: DTypeArg) -> Result<()> {
    let ours = |d: &Path| egret_runtime::fsutil::holds_only(d, &CONVERT_FILES);
    let replace = egret_runtime::fsutil::Replace {
        what: "a model converted by egret",
        ours: &ours,
        keep_others: false,
    };
    egret_runtime::fsutil::check_dir_target(out, replace)
        .map_err(|e| anyhow!("cannot write {}: {e}", out.display()))?;
    let src = ModelSource::resolve(model)?;
    let loaded = load_model(&src)?;
    let mut w = Weights::new();
    for (name, shape) in loaded.config.parameters() {
        let t = &loaded.params[&name];
        w.insert(name, HostTensor::new(shape, t.to_f32_vec()));
    }
    let dt = match dtype {
        DTypeArg::F32 => SaveDType::F32,
        DTypeArg::Bf16 => SaveDType::BF16,
        DTypeArg::F16 => SaveDType::F16,
    };
    let mut cfg = loaded.config.to_hf_json();
    cfg["torch_dtype"] = serde_json::json!(match dtype {
        DTypeArg::F32 => "float32",
        DTypeArg::Bf16 => "bfloat16",
        DTypeArg::F16 => "float16",
    });
    egret::train::write_dir_atomic(out, replace, |tmp| {
        save_safetensors(&tmp.join(CONVERT_FILES[1]), &w, dt)?;
        let write = |name: &str, text: String| {
            let p = tmp.join(name);
            std::fs::write(&p, text)
                .map_err(|e| egret::EgretError::Usage(format!("cannot write {}: {e}", p.display())))
        };
        write(
            CONVERT_FILES[0],
            serde_json::to_string_pretty(&cfg).unwrap_or_default(),
        )?;
        if let Some(tok) = &loaded.tokenizer {
            let json = serde_json::to_string(&tok.to_tokenizer_json()).unwrap_or_default();
            write(CONVERT_FILES[2], json)?;
        }
        Ok(())
    })?;
    outln!("{}", out.display())?;
    Ok(())
}

/// The largest `bench matmul --size`: three f32 matrices of 1 GiB each.
const MAX_BENCH_SIZE: usize = 1 << 14;
/// The longest `bench model --prompt-len`.
const MAX_BENCH_PROMPT: usize = 1 << 20;

fn bench(what: BenchCmd) -> Result<()> {
    match what {
        BenchCmd::Matmul {
            size,
            backend,
            threads,
            cpu,
            reps,
            json,
        } => {
            if backend != Backend::Cpu {
                bail!("bench matmul measures the cpu backend (the GPU's matmul is timed by bench/gpu-check.sh; the interpreter is a reference, not a fast path)");
            }
            if !(1..=MAX_BENCH_SIZE).contains(&size) {
                bail!("--size must be 1 to {MAX_BENCH_SIZE}");
            }
            let n = size as i64;
            let src = format!("graph mm {{\n  %a = input \"a\" : f32[{n}, {n}]\n  %w = param \"w\" : f32[{n}, {n}]\n  %wt = permute[perm=[1, 0]](%w) : f32[{n}, {n}]\n  %y = matmul(%a, %wt) : f32[{n}, {n}]\n  output \"y\" = %y\n}}");
            let g = egret_ir::parse(&src)?;
            let mut params = HashMap::new();
            let vals: Vec<f32> = (0..size * size)
                .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
                .collect();
            params.insert(
                "w".to_string(),
                egret_ir::Tensor::from_f32(vec![size, size], vals.clone())?,
            );
            let threads = threads.unwrap_or_else(default_threads).max(1);
            let (mut ex, _code) = egret::cpu::executor(
                &g,
                &params,
                &egret_backends::llvm::CpuOptions {
                    cpu,
                    ..Default::default()
                },
                threads,
            )?;
            let mut inputs = HashMap::new();
            inputs.insert(
                "a".to_string(),
                egret_runtime::cpu::HostValue {
                    shape: vec![size, size],
                    data: egret_runtime::cpu::HostData::F32(vals),
                },
            );
            // The first run allocates `y`; the timed runs write into it in place, as the
            // numpy anchor does with `out=`.
            let mut outs = HashMap::new();
            ex.run_into(&inputs, &mut outs)?;
            let mut best = f64::INFINITY;
            for _ in 0..reps.max(1) {
                let t0 = std::time::Instant::now();
                ex.run_into(&inputs, &mut outs)?;
                best = best.min(t0.elapsed().as_secs_f64());
            }
            let gflops = 2.0 * (size as f64).powi(3) / best / 1e9;
            if json {
                outln!("{}", serde_json::json!({ "gflops": gflops }))?;
            } else {
                outln!("matmul {size}x{size}x{size}: {gflops:.1} GFLOP/s ({:.2} ms, {threads} threads)", best * 1e3)?;
            }
            Ok(())
        }
        BenchCmd::Model {
            model,
            prompt_len,
            gen,
            run: ro,
            json,
        } => {
            let loaded = load_model(&ModelSource::resolve(&model)?)?;
            let vocab = loaded.config.vocab_size as u64;
            if !(1..=MAX_BENCH_PROMPT).contains(&prompt_len) {
                bail!("--prompt-len must be 1 to {MAX_BENCH_PROMPT}");
            }
            let (mut m, _, _) = Runner::new(loaded, &ro)?;
            // A fixed pseudo-random prompt (the speed does not depend on the ids).
            let prompt: Vec<u32> = (0..prompt_len as u64)
                .map(|i| ((i * 2654435761 + 12345) % vocab) as u32)
                .collect();
            let run = |m: &mut Runner| -> Result<(f64, f64)> {
                let lm = m.model();
                let t0 = std::time::Instant::now();
                let logits = lm.prefill(&prompt)?;
                let t_prefill = t0.elapsed().as_secs_f64();
                let mut next = egret_runtime::sampler::argmax(&logits);
                let t1 = std::time::Instant::now();
                for _ in 0..gen {
                    let l = lm.decode(next)?;
                    next = egret_runtime::sampler::argmax(&l);
                }
                let t_decode = t1.elapsed().as_secs_f64();
                Ok((
                    prompt_len as f64 / t_prefill,
                    if gen > 0 { gen as f64 / t_decode } else { 0.0 },
                ))
            };
            run(&mut m)?; // warm-up: first-touch of weights and arena
            let (p, d) = run(&mut m)?;
            if json {
                outln!(
                    "{}",
                    serde_json::json!({ "prefill_tok_s": p, "decode_tok_s": d })
                )?;
            } else {
                outln!("prefill {p:.1} tok/s ({prompt_len} tokens), decode {d:.1} tok/s ({gen} tokens)")?;
            }
            Ok(())
        }
    }
}

/// Where `grad` and `train` run.
fn grad_backend<'a>(
    backend: Backend,
    opts: &'a egret_backends::llvm::CpuOptions,
    gpu: &'a egret_backends::ptx::PtxOptions,
    threads: Option<usize>,
    cache: bool,
) -> Result<egret::train::GradBackend<'a>> {
    Ok(match backend {
        Backend::Interp => egret::train::GradBackend::Interp,
        Backend::Cpu => egret::train::GradBackend::Cpu {
            opts,
            threads: threads.unwrap_or_else(default_threads).max(1),
            cache,
        },
        Backend::Gpu => {
            egret_runtime::gpu::gpu_available()?;
            egret::train::GradBackend::Gpu { opts: gpu, cache }
        }
    })
}

struct TrainRun {
    /// A training artifact to run (`--artifact`) instead of compiling the step.
    artifact: Option<PathBuf>,
    model: String,
    data: PathBuf,
    random: bool,
    tokenizer: Option<PathBuf>,
    state: egret::train::TrainerState,
    save: Option<PathBuf>,
    save_every: Option<usize>,
    resume: Option<PathBuf>,
    log: Option<PathBuf>,
    passes: String,
    memory_budget: Option<u64>,
}

fn load_tokenizer_at(p: &Path) -> Result<egret_runtime::tokenizer::Tokenizer> {
    use egret_runtime::tokenizer::Tokenizer;
    Ok(if p.is_dir() {
        Tokenizer::from_tokenizer_json(&p.join("tokenizer.json"))?
    } else if p.extension().is_some_and(|e| e == "json") {
        Tokenizer::from_tokenizer_json(p)?
    } else {
        Tokenizer::from_gguf_metadata(egret_runtime::gguf::GgufFile::open(p)?.metadata())?
    })
}

fn train(run: TrainRun, be: egret::train::GradBackend) -> Result<()> {
    use egret::train::{batch_at, lr_at, save_checkpoint, AdamW, Trainer};
    // (where the result goes, checked before the training it would hold)
    if let Some(dir) = &run.save {
        egret::train::check_checkpoint_dir(dir)?;
    }
    let total = run.state.total_steps;
    let (cfg, params, resumed, mut state) = match &run.resume {
        Some(dir) => {
            let ck = egret::train::load_checkpoint(dir)?;
            let mut st = ck.state.clone();
            st.total_steps = total;
            (ck.config, ck.params, Some((ck.m, ck.v)), st)
        }
        None if run.random => {
            let cfg = egret::load_config(&ModelSource::resolve(&run.model)?)?;
            let p = egret::train::random_init(&cfg, run.state.seed)?;
            (cfg, p, None, run.state.clone())
        }
        None => {
            let m = load_model(&ModelSource::resolve(&run.model)?)?;
            (m.config, m.params, None, run.state.clone())
        }
    };
    let tokenizer = match (&run.tokenizer, &run.resume) {
        (Some(p), _) => load_tokenizer_at(p)?,
        (None, Some(d)) if d.join("tokenizer.json").is_file() => load_tokenizer_at(d)?,
        _ => egret::load_tokenizer(&ModelSource::resolve(&run.model)?)?,
    };
    if !(state.lr.is_finite() && state.lr >= 0.0) {
        bail!(
            "the learning rate {} (from the checkpoint) is not a finite number, 0 or more",
            state.lr
        );
    }
    check_weight_decay(state.weight_decay)?;
    let data = tokenizer.encode(&read_utf8(&run.data)?, false)?;
    egret::train::check_step_shape(state.batch as u64, state.seq as u64, "the trainer state")?;
    if data.len() < state.seq + 1 {
        bail!(
            "{} has {} tokens; --seq {} needs at least {}",
            run.data.display(),
            data.len(),
            state.seq,
            state.seq + 1
        );
    }
    egret_runtime::generate::check_ids(&data, cfg.vocab_size)?;
    let opt = AdamW {
        beta1: state.beta1,
        beta2: state.beta2,
        eps: state.eps,
        weight_decay: state.weight_decay,
        max_grad_norm: state.max_grad_norm,
    };
    let budget = run.memory_budget.map(|bytes| egret::train::MemoryBudget {
        bytes,
        batch: state.batch,
        seq: state.seq,
    });
    let mut tr = match &run.artifact {
        Some(dir) => Trainer::from_artifact(cfg, params, opt, dir, be)?,
        None => Trainer::new(cfg, params, opt, &run.passes, be, budget)?,
    };
    if let Some((m, v)) = resumed {
        tr.restore(state.step, m, v)?;
    }
    let mut log = match &run.log {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(run.resume.is_some())
                .truncate(run.resume.is_none())
                .open(p)
                .with_context(|| format!("cannot write {}", p.display()))?,
        ),
        None => None,
    };
    let (b, t) = (state.batch, state.seq);
    let start = tr.step;
    let t_all = std::time::Instant::now();
    let mut last = None;
    for k in start + 1..=total {
        let (toks, tg) = batch_at(&data, k, state.seed, b, t);
        let lr = lr_at(k, state.lr, state.warmup, total);
        let t0 = std::time::Instant::now();
        let out = tr.train_step(&toks, &tg, b, t, lr)?;
        let tok_s = (b * t) as f64 / t0.elapsed().as_secs_f64();
        last = Some(out.loss);
        if let Some(f) = &mut log {
            let line = serde_json::json!({
                "step": k, "loss": out.loss, "lr": lr, "tok_s": tok_s, "grad_norm": out.grad_norm,
            });
            writeln!(f, "{line}")?;
        }
        let width = 30;
        let done = (k * width) / total.max(1);
        // (progress only: a closed stderr must not stop the run before it saves)
        let _ = write!(
            std::io::stderr(),
            "\rstep {k}/{total} [{}{}] loss {:.4} lr {:.2e} {:.0} tok/s ",
            "#".repeat(done),
            ".".repeat(width - done),
            out.loss,
            lr,
            tok_s
        );
        state.step = k;
        if let (Some(dir), Some(every)) = (&run.save, run.save_every) {
            if every > 0 && k % every == 0 {
                save_checkpoint(
                    &dir.join(format!("checkpoint-{k}")),
                    &tr,
                    &state,
                    Some(&tokenizer),
                )?;
            }
        }
    }
    let _ = writeln!(std::io::stderr());
    if let Some(dir) = &run.save {
        save_checkpoint(dir, &tr, &state, Some(&tokenizer))?;
    }
    if let Some(p) = &run.log {
        drop(log);
        let pts: Vec<(usize, f32)> = std::fs::read_to_string(p)?
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| Some((v["step"].as_u64()? as usize, v["loss"].as_f64()? as f32)))
            .collect();
        let svg = p.with_extension("svg");
        write_atomic(&svg, egret::train::loss_curve_svg(&pts).as_bytes())?;
    }
    let steps = total.saturating_sub(start);
    outln!(
        "{}",
        serde_json::json!({
            "steps": steps,
            "loss": last,
            "tok_s": (steps * b * t) as f64 / t_all.elapsed().as_secs_f64().max(1e-9),
        })
    )?;
    Ok(())
}
