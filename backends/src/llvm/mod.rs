//! CPU code generation through LLVM (inkwell): every kernel of a `Program` becomes one
//! function with the runtime's kernel ABI (`runtime::cpu`), the module is optimised at O3
//! for the chosen CPU (host by default) and JIT-compiled; the runtime's executor calls the
//! functions. Each kernel splits its outermost parallel loop across `nthreads` by `tid`.
//!
//! The kernels are straightforward loop nests whose inner loops LLVM vectorises: reductions
//! and dot products carry `reassoc`/`contract` fast-math flags so they vectorise and use FMA.

mod kernels;
pub use kernels::{kernel_buffers, Flavor, SIMT_HOOKS};

use std::collections::HashMap;

use inkwell::context::Context;
use inkwell::execution_engine::ExecutionEngine;
use inkwell::module::Module;
use inkwell::passes::PassBuilderOptions;
use inkwell::targets::{
    CodeModel, FileType, InitializationConfig, RelocMode, Target, TargetMachine,
};
use inkwell::OptimizationLevel;

use egret_runtime::cpu::KernelFn;
use egret_runtime::plan::{KernelCall, LightEntry, Plan, TileDim, TileGrid};

use crate::kernel::Program;
use crate::BackendError;

/// Options of the CPU backend.
#[derive(Clone, Debug)]
pub struct CpuOptions {
    /// LLVM CPU name; `native` means this machine's.
    pub cpu: String,
    /// Storage of the packed matmul weights (compute stays f32).
    pub weights: crate::kernel::PanelType,
}

impl Default for CpuOptions {
    fn default() -> Self {
        CpuOptions {
            cpu: "native".into(),
            weights: crate::kernel::PanelType::F32,
        }
    }
}

fn llvm_err(e: impl std::fmt::Display) -> BackendError {
    BackendError::Llvm(e.to_string())
}

/// The CPU name and feature string for `cpu` (`native`: the host's).
/// The LLVM CPU name and the features the code may use, for an artifact's manifest: this
/// machine's for `native`; for the `x86-64-v*` levels their defining features; otherwise
/// none listed (the CPU name alone says what the code needs).
pub fn target_cpu(cpu: &str) -> (String, Vec<String>) {
    let (name, features) = cpu_and_features(cpu);
    let mut list: Vec<String> = features
        .split(',')
        .filter_map(|f| f.strip_prefix('+'))
        .map(str::to_string)
        .collect();
    if list.is_empty() {
        let v2 = ["sse3", "ssse3", "sse4.1", "sse4.2", "popcnt"];
        let v3 = [
            "avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "lzcnt", "movbe",
        ];
        let v4 = ["avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"];
        let levels: &[&[&str]] = match name.as_str() {
            "x86-64-v2" => &[&v2],
            "x86-64-v3" => &[&v2, &v3],
            "x86-64-v4" => &[&v2, &v3, &v4],
            _ => &[],
        };
        list = levels
            .iter()
            .flat_map(|l| l.iter().map(|f| f.to_string()))
            .collect();
    }
    list.sort();
    (name, list)
}

fn cpu_and_features(cpu: &str) -> (String, String) {
    if cpu == "native" {
        (
            TargetMachine::get_host_cpu_name().to_string(),
            TargetMachine::get_host_cpu_features().to_string(),
        )
    } else {
        (cpu.to_string(), String::new())
    }
}

/// GEMM panel width for a CPU: two vectors of its widest float registers.
pub fn panel_width(cpu: &str) -> i64 {
    let (name, features) = cpu_and_features(cpu);
    let has = |f: &str| features.split(',').any(|x| x == f);
    if has("+avx512f")
        || (features.is_empty()
            && matches!(
                name.as_str(),
                "x86-64-v4"
                    | "skylake-avx512"
                    | "icelake-server"
                    | "sapphirerapids"
                    | "emeraldrapids"
                    | "znver4"
                    | "znver5"
            ))
    {
        32
    } else if has("+avx")
        || (features.is_empty()
            && matches!(
                name.as_str(),
                "x86-64-v3" | "haswell" | "skylake" | "znver2" | "znver3"
            ))
    {
        16
    } else {
        8
    }
}

/// The CPU names LLVM 22 generates 64-bit x86 code for: `llc -march=x86-64 -mcpu=help`
/// less the 32-bit processors (i686, pentium4, prescott, athlon-xp, …), which LLVM aborts on
/// for 64-bit code. Any other name would reach LLVM, which prints its own warnings and then
/// aborts the process, so `target_machine` refuses it first.
const X86_64_CPUS: &[&str] = &[
    "alderlake",
    "amdfam10",
    "arrowlake",
    "arrowlake-s",
    "arrowlake_s",
    "athlon-fx",
    "athlon64",
    "athlon64-sse3",
    "atom",
    "atom_sse4_2",
    "atom_sse4_2_movbe",
    "barcelona",
    "bdver1",
    "bdver2",
    "bdver3",
    "bdver4",
    "bonnell",
    "broadwell",
    "btver1",
    "btver2",
    "cannonlake",
    "cascadelake",
    "clearwaterforest",
    "cooperlake",
    "core-avx-i",
    "core-avx2",
    "core2",
    "core_2_duo_sse4_1",
    "core_2_duo_ssse3",
    "core_2nd_gen_avx",
    "core_3rd_gen_avx",
    "core_4th_gen_avx",
    "core_4th_gen_avx_tsx",
    "core_5th_gen_avx",
    "core_5th_gen_avx_tsx",
    "core_aes_pclmulqdq",
    "core_i7_sse4_2",
    "corei7",
    "corei7-avx",
    "diamondrapids",
    "emeraldrapids",
    "generic",
    "goldmont",
    "goldmont-plus",
    "goldmont_plus",
    "gracemont",
    "grandridge",
    "graniterapids",
    "graniterapids-d",
    "graniterapids_d",
    "haswell",
    "icelake-client",
    "icelake-server",
    "icelake_client",
    "icelake_server",
    "ivybridge",
    "k8",
    "k8-sse3",
    "knl",
    "knm",
    "lunarlake",
    "meteorlake",
    "mic_avx512",
    "nehalem",
    "nocona",
    "novalake",
    "opteron",
    "opteron-sse3",
    "pantherlake",
    "penryn",
    "raptorlake",
    "rocketlake",
    "sandybridge",
    "sapphirerapids",
    "sierraforest",
    "silvermont",
    "skx",
    "skylake",
    "skylake-avx512",
    "skylake_avx512",
    "slm",
    "tigerlake",
    "tremont",
    "westmere",
    "wildcatlake",
    "x86-64",
    "x86-64-v2",
    "x86-64-v3",
    "x86-64-v4",
    "znver1",
    "znver2",
    "znver3",
    "znver4",
    "znver5",
];

/// Whether `cpu` (an LLVM CPU name, or `native`) is one this backend can compile for.
pub fn check_cpu(cpu: &str) -> Result<(), BackendError> {
    if cpu == "native" || X86_64_CPUS.contains(&cpu) {
        return Ok(());
    }
    Err(BackendError::Target(format!(
        "unknown CPU `{cpu}`: give `native` or an x86-64 CPU LLVM knows, such as x86-64-v3, \
         skylake-avx512, znver4 (`llc -march=x86-64 -mcpu=help` lists them)"
    )))
}

fn target_machine(cpu: &str) -> Result<TargetMachine, BackendError> {
    check_cpu(cpu)?;
    Target::initialize_native(&InitializationConfig::default()).map_err(llvm_err)?;
    let triple = TargetMachine::get_default_triple();
    let target = Target::from_triple(&triple).map_err(llvm_err)?;
    let (name, features) = cpu_and_features(cpu);
    target
        .create_target_machine(
            &triple,
            &name,
            &features,
            OptimizationLevel::Aggressive,
            RelocMode::PIC,
            CodeModel::Default,
        )
        .ok_or_else(|| BackendError::Llvm(format!("LLVM does not know the CPU `{cpu}`")))
}

/// Kernel function names in the module.
pub fn kernel_symbol(prog: &Program, i: usize) -> String {
    format!("egret_{}_k{i}", prog.name)
}

/// Generates the (unoptimised) LLVM module of a program.
pub fn codegen<'ctx>(
    ctx: &'ctx Context,
    prog: &Program,
    cpu: &str,
) -> Result<(Module<'ctx>, Vec<KernelCall>), BackendError> {
    let (module, mut calls) = codegen_many(ctx, &[prog], cpu)?;
    Ok((module, calls.remove(0)))
}

/// Generates one module for several programs of one model (prefill and decode). Kernels
/// that differ only in which buffers they touch — the same layer's kernels in every layer,
/// and most kernels of prefill and decode — share one function. The programs must use the
/// same symbol list (`unify_symbols`).
pub fn codegen_many<'ctx>(
    ctx: &'ctx Context,
    progs: &[&Program],
    cpu: &str,
) -> Result<(Module<'ctx>, Vec<Vec<KernelCall>>), BackendError> {
    let (cpu, features) = cpu_and_features(cpu);
    codegen_flavor(ctx, progs, &Flavor::Cpu { cpu, features })
}

/// `codegen_many` for either flavor: for the GPU each kernel is a private body and an entry
/// point (`kernels::gpu_entry`), and each call records its thread count.
pub(crate) fn codegen_flavor<'ctx>(
    ctx: &'ctx Context,
    progs: &[&Program],
    flavor: &Flavor,
) -> Result<(Module<'ctx>, Vec<Vec<KernelCall>>), BackendError> {
    let module = ctx.create_module(&format!(
        "egret_{}",
        progs.first().map(|p| p.name.as_str()).unwrap_or("empty")
    ));
    let gpu = flavor.gpu();
    // Kernels equal under renaming, with arguments of the same element types, share a
    // function.
    type Key = (crate::kernel::Kernel, Vec<egret_runtime::plan::ElemType>);
    let mut seen: Vec<(Key, String, usize, Option<LightEntry>)> = Vec::new();
    let mut all = Vec::new();
    for prog in progs {
        if prog.symbols != progs[0].symbols {
            return Err(BackendError::Unsupported(
                "programs compiled together must share their symbols".into(),
            ));
        }
        let mut calls = Vec::new();
        for (i, k) in prog.kernels.iter().enumerate() {
            if gpu && matches!(k, crate::kernel::Kernel::AttentionCombine { .. }) {
                // `gpu_attention` never splits the keys: the merge would be a launch that
                // does nothing.
                continue;
            }
            let (canon, args) = kernels::canonical(k);
            let elems = args
                .iter()
                .map(|b| prog.buffers[*b as usize].elem)
                .collect();
            let canon = (canon, elems);
            let (sym, scratch, light) = match seen.iter().find(|(c, ..)| *c == canon) {
                Some((_, sym, scratch, light)) => (sym.clone(), *scratch, light.clone()),
                None => {
                    let sym = format!("egret_{}_k{}", progs[0].name, seen.len());
                    let tc = matches!(
                        flavor,
                        Flavor::Gpu {
                            tensor_cores: true,
                            ..
                        } | Flavor::Simt {
                            tensor_cores: true,
                            ..
                        }
                    );
                    // The kernel's entry point, and where it has one (`gpu_light`) its light
                    // one: a GPU entry wrapping a private body, or the simulator's body.
                    let emit_entry = |sym: &str, light: bool| -> Result<usize, BackendError> {
                        if !matches!(flavor, Flavor::Gpu { .. }) {
                            return Ok(kernels::emit(ctx, &module, prog, k, sym, flavor, light)?.1);
                        }
                        let body_name = format!("{sym}_body");
                        let (_, scratch) =
                            kernels::emit(ctx, &module, prog, k, &body_name, flavor, light)?;
                        let body = module.get_function(&body_name).expect("just emitted");
                        let blocks = if light {
                            kernels::GPU_LIGHT_MIN_BLOCKS
                        } else {
                            kernels::gpu_min_blocks(k, tc)
                        };
                        kernels::gpu_entry(ctx, &module, body, sym, scratch, blocks)?;
                        Ok(scratch)
                    };
                    let mut scratch = emit_entry(&sym, false)?;
                    let light = if gpu && kernels::gpu_light(k, tc) {
                        let light_sym = format!("{sym}_light");
                        scratch = scratch.max(emit_entry(&light_sym, true)?);
                        Some(LightEntry {
                            symbol: light_sym,
                            shared_bytes: 0,
                        })
                    } else {
                        None
                    };
                    seen.push((canon, sym.clone(), scratch, light.clone()));
                    (sym, scratch, light)
                }
            };
            let to_sym = |ds: Vec<egret_ir::Dim>| {
                ds.iter()
                    .map(|d| crate::kernel::symdim(&prog.symbols, d))
                    .collect()
            };
            let work = to_sym(k.work());
            let threads = if gpu {
                to_sym(kernels::gpu_threads(k))
            } else {
                vec![]
            };
            calls.push(KernelCall {
                symbol: sym,
                args,
                init: prog.init[i],
                scratch_floats: scratch,
                what: k.describe(),
                work,
                threads,
                shared_bytes: match flavor {
                    Flavor::Gpu {
                        tensor_cores,
                        wgmma,
                        ..
                    } => kernels::gpu_shared_bytes(k, *tensor_cores, *wgmma),
                    _ => 0,
                },
                // (the simulator's launches take the same paths, up to `SIM_MAX_BLOCKS`
                // blocks of them)
                tiles: match flavor {
                    Flavor::Gpu {
                        tensor_cores,
                        wgmma,
                        ..
                    }
                    | Flavor::Simt {
                        tensor_cores,
                        wgmma,
                        ..
                    } => {
                        let elem = |b: u32| prog.buffers[b as usize].elem;
                        let tiles = |ds: kernels::DimTiles| {
                            ds.iter()
                                .map(|(d, tile)| TileDim {
                                    extent: crate::kernel::symdim(&prog.symbols, d),
                                    tile: *tile,
                                })
                                .collect()
                        };
                        kernels::gpu_tiles(k, &elem, *tensor_cores, *wgmma)
                            .into_iter()
                            .map(|t| TileGrid {
                                blocks: tiles(t.blocks),
                                when: t.when.into_iter().map(|(d, b)| (tiles(d), b)).collect(),
                            })
                            .collect()
                    }
                    Flavor::Cpu { .. } => vec![],
                },
                light,
            });
        }
        all.push(calls);
    }
    module
        .verify()
        .map_err(|e| BackendError::Llvm(format!("generated module is invalid: {e}")))?;
    Ok((module, all))
}

/// Gives every program the union of their symbols (sorted), renumbering buffer dims, so
/// they can be compiled together. A symbol a program does not use is simply never read.
pub fn unify_symbols(progs: &mut [Program]) {
    let mut all: Vec<String> = progs
        .iter()
        .flat_map(|p| p.symbols.iter().cloned())
        .collect();
    all.sort();
    all.dedup();
    for p in progs.iter_mut() {
        let map: Vec<u32> = p
            .symbols
            .iter()
            .map(|s| all.iter().position(|x| x == s).expect("in union") as u32)
            .collect();
        let remap = |d: &mut egret_runtime::plan::SymDim| {
            for t in &mut d.terms {
                t.0 = map[t.0 as usize];
            }
        };
        for b in &mut p.buffers {
            b.dims.iter_mut().for_each(remap);
        }
        for st in &mut p.states {
            st.dims
                .iter_mut()
                .chain(st.out_dims.iter_mut())
                .for_each(remap);
            st.capacity = map[st.capacity as usize];
        }
        p.symbols = all.clone();
    }
}

/// The program's LLVM IR after O3 for `cpu` (for snapshots and `--emit llvm`).
pub fn optimized_ir(prog: &Program, cpu: &str) -> Result<String, BackendError> {
    let ctx = Context::create();
    let (module, _) = codegen(&ctx, prog, cpu)?;
    let tm = target_machine(cpu)?;
    module.set_triple(&tm.get_triple());
    module.set_data_layout(&tm.get_target_data().get_data_layout());
    module
        .run_passes("default<O3>", &tm, PassBuilderOptions::create())
        .map_err(llvm_err)?;
    Ok(module.print_to_string().to_string())
}

/// A JIT-compiled program: the executable plan and one function per kernel.
pub struct Compiled {
    pub plan: Plan,
    pub fns: Vec<KernelFn>,
    /// The light entry point of each call that has one (`KernelCall::light`): the
    /// simulator's.
    pub light_fns: Vec<Option<KernelFn>>,
    /// The simulator's shared arrays (`kernels::SIM_SHARED`) by kernel function: address
    /// and bytes of each.
    pub shared: HashMap<String, Vec<(usize, usize)>>,
    // The engine owns the machine code the function pointers point into (shared by the
    // programs compiled together).
    _engine: ExecutionEngine<'static>,
}

/// Compiles a program for this machine and JITs it.
pub fn compile(prog: &Program, opts: &CpuOptions) -> Result<Compiled, BackendError> {
    Ok(compile_many(&[prog], opts)?.remove(0))
}

/// Compiles programs of one model together (one module, shared kernels) and JITs them.
pub fn compile_many(progs: &[&Program], opts: &CpuOptions) -> Result<Vec<Compiled>, BackendError> {
    let (cpu, features) = cpu_and_features(&opts.cpu);
    jit(progs, &Flavor::Cpu { cpu, features }, &opts.cpu, &[])
}

/// Generates `progs` in `flavor`, optimises the module at O3 for `cpu` and JITs it, with
/// `bindings` giving the addresses of functions the code calls by name (the simulator's
/// hooks).
pub(crate) fn jit(
    progs: &[&Program],
    flavor: &Flavor,
    cpu: &str,
    bindings: &[(&str, usize)],
) -> Result<Vec<Compiled>, BackendError> {
    // The LLVM context must outlive the engine and its code, which the caller keeps for as
    // long as it runs the model: give it static lifetime (one small context per compile).
    let ctx: &'static Context = Box::leak(Box::new(Context::create()));
    let (module, all) = codegen_flavor(ctx, progs, flavor)?;
    let tm = target_machine(cpu)?;
    module.set_triple(&tm.get_triple());
    module.set_data_layout(&tm.get_target_data().get_data_layout());
    module
        .run_passes("default<O3>", &tm, PassBuilderOptions::create())
        .map_err(llvm_err)?;
    let engine = module
        .create_jit_execution_engine(OptimizationLevel::Aggressive)
        .map_err(llvm_err)?;
    for (name, addr) in bindings {
        if let Some(f) = module.get_function(name) {
            engine.add_global_mapping(&f, *addr);
        }
    }
    let mut shared: HashMap<String, Vec<(usize, usize)>> = HashMap::new();
    for g in module.get_globals() {
        let name = g.get_name().to_string_lossy().into_owned();
        let Some((kernel, _)) = name.split_once(kernels::SIM_SHARED) else {
            continue;
        };
        let cname = std::ffi::CString::new(name.as_str()).map_err(llvm_err)?;
        // SAFETY: the engine is live and the name a NUL-terminated string.
        let addr = unsafe {
            inkwell::llvm_sys::execution_engine::LLVMGetGlobalValueAddress(
                engine.as_mut_ptr(),
                cname.as_ptr(),
            )
        };
        if addr == 0 {
            return Err(BackendError::Llvm(format!("the JIT lacks `{name}`")));
        }
        let bytes = engine.get_target_data().get_abi_size(&g.get_value_type());
        shared
            .entry(kernel.to_string())
            .or_default()
            .push((addr as usize, bytes as usize));
    }
    let mut out = Vec::new();
    for (prog, calls) in progs.iter().zip(all) {
        let resolve = |symbol: &str| -> Result<KernelFn, BackendError> {
            // (kernels sharing a function resolve to the same address)
            let addr = engine.get_function_address(symbol).map_err(llvm_err)?;
            // SAFETY: the function was generated with exactly the KernelFn signature.
            Ok(unsafe { std::mem::transmute::<usize, KernelFn>(addr) })
        };
        let mut fns = Vec::new();
        let mut light_fns = Vec::new();
        for c in &calls {
            fns.push(resolve(&c.symbol)?);
            light_fns.push(c.light.as_ref().map(|l| resolve(&l.symbol)).transpose()?);
        }
        let plan = plan_of(prog, calls);
        out.push(Compiled {
            plan,
            fns,
            light_fns,
            shared: shared.clone(),
            _engine: engine.clone(),
        });
    }
    Ok(out)
}

/// Compiles programs of one model (an artifact's entry points, which share their symbols and
/// kernels: `codegen_many`) to a shared library at `path` (an object file from LLVM, linked
/// by the system C compiler `cc`): the CPU payload of an artifact. The library is written to
/// a temporary name and renamed, so an existing file is replaced whole or not at all.
/// Returns each program's plan, whose `KernelCall::symbol`s the library exports.
pub fn compile_shared_library(
    progs: &[&Program],
    opts: &CpuOptions,
    path: &std::path::Path,
) -> Result<Vec<Plan>, BackendError> {
    let ctx = Context::create();
    let (module, all) = codegen_many(&ctx, progs, &opts.cpu)?;
    let tm = target_machine(&opts.cpu)?;
    module.set_triple(&tm.get_triple());
    module.set_data_layout(&tm.get_target_data().get_data_layout());
    module
        .run_passes("default<O3>", &tm, PassBuilderOptions::create())
        .map_err(llvm_err)?;
    let pid = std::process::id();
    let obj = path.with_extension(format!("o.tmp-{pid}"));
    let tmp = path.with_extension(format!("so.tmp-{pid}"));
    tm.write_to_file(&module, FileType::Object, &obj)
        .map_err(llvm_err)?;
    let status = std::process::Command::new("cc")
        .arg("-shared")
        .arg("-o")
        .arg(&tmp)
        .arg(&obj)
        .arg("-lm")
        .status();
    let _ = std::fs::remove_file(&obj);
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(BackendError::Llvm(format!(
                "linking the kernels with `cc -shared` failed ({s})"
            )));
        }
        Err(e) => {
            return Err(BackendError::Llvm(format!(
                "cannot run the C compiler `cc` to link the kernels: {e}"
            )))
        }
    }
    std::fs::rename(&tmp, path)
        .map_err(|e| BackendError::Llvm(format!("cannot write {}: {e}", path.display())))?;
    Ok(progs
        .iter()
        .zip(all)
        .map(|(prog, calls)| plan_of(prog, calls))
        .collect())
}

/// The runtime's plan of a program whose kernels compiled to `calls`.
pub(crate) fn plan_of(prog: &Program, calls: Vec<KernelCall>) -> Plan {
    Plan {
        name: prog.name.clone(),
        symbols: prog.symbols.clone(),
        buffers: prog.buffers.clone(),
        kernels: calls,
        outputs: prog.outputs.clone(),
        states: prog.states.clone(),
    }
}
