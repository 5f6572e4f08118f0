//! GPU code generation: the kernel IR lowered through LLVM's NVPTX target to PTX text
//! (`nvptx64-nvidia-cuda`, sm_80 and later), which the CUDA driver assembles at load.
//!
//! Every kernel is the CPU backend's loop nest (`llvm::kernels`, flavor `Gpu`) wrapped in a
//! grid entry point (`kernels::gpu_entry`): thread `tid` of `nthreads` takes its share of the
//! kernel's parallel loop, and each kernel's parallel loop is cut so neighbouring threads
//! touch neighbouring elements (elementwise: one element each; matmul: one column of a block
//! of rows each). The launch size is recorded per call (`KernelCall::threads`). The GPU
//! schedule keeps plain matmuls (no packed CPU panels).

use inkwell::context::Context;
use inkwell::passes::PassBuilderOptions;
use inkwell::targets::{
    CodeModel, FileType, InitializationConfig, RelocMode, Target, TargetMachine, TargetTriple,
};
use inkwell::OptimizationLevel;

use egret_runtime::plan::Plan;

use crate::kernel::{PanelType, Program};
use crate::llvm::{codegen_flavor, Flavor};
use crate::schedule::ScheduleOptions;
use crate::BackendError;

/// The GPU architectures PTX is generated for (`--gpu`); the PTX of one runs on it and on
/// every later one (the driver compiles it for the card at load), except `sm_90a`'s, which
/// runs on sm_90 cards alone: with `tensor_cores`, its matmuls use Hopper's `wgmma`.
pub const GPU_ARCHS: &[&str] = &["sm_80", "sm_86", "sm_89", "sm_90", "sm_90a"];

/// The PTX ISA version the code declares: 8.0 (CUDA 12.0), enough for sm_90.
const PTX_FEATURES: &str = "+ptx80";
/// The version with the tensor memory accelerator (`PtxOptions::tma`): 8.7 (CUDA 12.8).
/// `tensormap.replace` and the tensor-map proxy fences need 8.3, but the `ptxas` of drivers
/// before CUDA 12.5-12.6 reads a map's strides in 16-byte units where the ISA says bytes
/// (`llvm::kernels` `tma`); a driver too old for 8.7 refuses the module instead.
const PTX_FEATURES_TMA: &str = "+ptx87";

/// The triple of 64-bit CUDA.
pub const PTX_TRIPLE: &str = "nvptx64-nvidia-cuda";

/// Options of the GPU backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PtxOptions {
    /// The GPU architecture, one of `GPU_ARCHS`.
    pub arch: String,
    /// Matmuls with bf16 operands and f32 sums: large ones on tensor cores
    /// (`mma.sync.m16n8k16`), the others rounding their operands as they load them, so every
    /// matmul computes alike; attention over prompts of 64+ rows (head sizes 16-128) and
    /// its backward on tensor cores too, flash-style. Off, every matmul and attention is f32
    /// throughout.
    pub tensor_cores: bool,
    /// With `wgmma`, its matmuls' operands copied to shared memory by the tensor memory
    /// accelerator (`cp.async.bulk.tensor`, tensor maps made on the device, `mbarrier`
    /// waits) instead of by every thread's `cp.async`: not yet measured on a card, so off
    /// unless asked for (`bench/gpu-check.sh` times both).
    pub tma: bool,
}

impl Default for PtxOptions {
    fn default() -> Self {
        PtxOptions {
            arch: "sm_80".into(),
            tensor_cores: false,
            tma: false,
        }
    }
}

impl PtxOptions {
    /// Whether tensor-core matmuls use `wgmma.mma_async` (sm_90a only).
    pub fn wgmma(&self) -> bool {
        self.tensor_cores && self.arch == "sm_90a"
    }

    /// Whether `wgmma` matmuls are fed by the tensor memory accelerator (`tma`).
    pub fn tma(&self) -> bool {
        self.wgmma() && self.tma
    }
}

/// The target features a PTX artifact records (what its code does beyond f32).
pub fn ptx_features(opts: &PtxOptions) -> Vec<String> {
    match (opts.tensor_cores, opts.wgmma()) {
        (true, true) if opts.tma() => vec!["bf16-mma".into(), "wgmma".into(), "tma".into()],
        (true, true) => vec!["bf16-mma".into(), "wgmma".into()],
        (true, false) => vec!["bf16-mma".into()],
        _ => vec![],
    }
}

/// How the GPU wants graphs scheduled: plain matmul kernels (no packed panels), f32, right
/// operands `N`-contiguous, residual adds folded into the matmuls before them, attention
/// output tokens first; with tensor cores, matmul operands stored bf16 where they can be.
pub fn schedule_options(opts: &PtxOptions) -> ScheduleOptions {
    ScheduleOptions {
        panel: 0,
        weights: PanelType::F32,
        n_major: true,
        matmul_residual: true,
        bf16_operands: opts.tensor_cores,
        attn_tokens_first: true,
        split_k: true,
        ..ScheduleOptions::default()
    }
}

fn llvm_err(e: impl std::fmt::Display) -> BackendError {
    BackendError::Llvm(e.to_string())
}

fn target_machine(arch: &str, features: &str) -> Result<TargetMachine, BackendError> {
    if !GPU_ARCHS.contains(&arch) {
        return Err(BackendError::Unsupported(format!(
            "unknown GPU architecture `{arch}` (expected one of {})",
            GPU_ARCHS.join(", ")
        )));
    }
    Target::initialize_nvptx(&InitializationConfig::default());
    let triple = TargetTriple::create(PTX_TRIPLE);
    let target = Target::from_triple(&triple).map_err(llvm_err)?;
    target
        .create_target_machine(
            &triple,
            arch,
            features,
            OptimizationLevel::Aggressive,
            RelocMode::Default,
            CodeModel::Default,
        )
        .ok_or_else(|| BackendError::Llvm(format!("LLVM cannot target NVPTX {arch}")))
}

/// Programs of one model compiled together to one PTX module: the PTX text and each
/// program's plan (its calls name the module's entry points).
pub fn compile_ptx(
    progs: &[&Program],
    opts: &PtxOptions,
) -> Result<(String, Vec<Plan>), BackendError> {
    let features = if opts.tma() {
        PTX_FEATURES_TMA
    } else {
        PTX_FEATURES
    };
    let tm = target_machine(&opts.arch, features)?;
    let ctx = Context::create();
    let flavor = Flavor::Gpu {
        tensor_cores: opts.tensor_cores,
        wgmma: opts.wgmma(),
        tma: opts.tma(),
    };
    let (module, all) = codegen_flavor(&ctx, progs, &flavor)?;
    module.set_triple(&tm.get_triple());
    module.set_data_layout(&tm.get_target_data().get_data_layout());
    module
        .run_passes("default<O3>", &tm, PassBuilderOptions::create())
        .map_err(llvm_err)?;
    let buf = tm
        .write_to_memory_buffer(&module, FileType::Assembly)
        .map_err(llvm_err)?;
    let ptx = String::from_utf8_lossy(buf.as_slice())
        .trim_end_matches('\0')
        .to_string();
    let plans = progs
        .iter()
        .zip(all)
        .map(|(prog, calls)| crate::llvm::plan_of(prog, calls))
        .collect();
    Ok((ptx, plans))
}
