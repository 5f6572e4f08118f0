//! The GPU check, run on a lent GPU machine by `bench/gpu-check.sh`: links `egret-runtime`
//! only (no LLVM, no Rust toolchain needed there) and runs the bundle `gpu_bundle` wrote:
//!
//! 1. the conformance cases on the GPU against the interpreter's outputs (f32, 1e-5 of the
//!    largest magnitude, as on the CPU);
//! 2. SmolLM2-135M (weights from WEIGHTS, made on that machine) on the GPU and on the CPU:
//!    prompt logits compared, greedy ids compared, GPU prefill and decode timed;
//! 3. a 4096³ f32 matmul and a causal attention (16 heads, 4096 tokens, head 128) timed, and
//!    that attention's forward and backward (its gradients on tensor cores checked against
//!    f32's), each by its device time (events on the stream), the median of `BENCH_REPS`
//!    runs; the `wgmma` matmul also in turn with cuBLAS's bf16 GEMM in this process (where
//!    a cuBLAS library is found), for a ratio under the same clocks;
//! 4. the tiny transformers fixtures' loss and gradients on the GPU (1e-5 / 1e-4 relative L2,
//!    as on the CPU), and SmolLM2's AdamW training step (batch 1 × 256) timed, in f32 and
//!    with tensor cores.
//!
//! ```text
//! gpu_check BUNDLE WEIGHTS [STEP,...] > results.json
//! ```
//!
//! With STEP names (`gpu_check --steps` lists them: `conformance`, `conformance-tc`,
//! `conformance-wgmma` (sm_90 cards), `gradients`, `smollm2`, `matmul benches`, `matmul pair
//! benches`, `attention benches`, `attention backward benches`, `train step`,
//! `conformance-tma` and `matmul pair benches tma` (sm_90 cards: the `wgmma` matmul fed by
//! the tensor memory accelerator, last, as it has not yet run on a card)), only those
//! run: `benches` names the four benches, which run alone under a profiler.
//!
//! Prints one JSON object per line (a result each) and a table last, on stderr.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use egret_runtime::cpu::{HostData, HostValue};
use egret_runtime::gpu::GpuExecutor;
use egret_runtime::plan::{BufferRole, ElemType};
use egret_runtime::tensor::HostTensor;
use egret_runtime::{Artifact, Session};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

const TOLERANCE: f32 = 1e-5;

/// The prompt both sides use: 64 ids spread over the vocabulary.
fn prompt(vocab: usize) -> Vec<u32> {
    (0..64u64)
        .map(|i| ((i * 7919 + 13) % vocab as u64) as u32)
        .collect()
}

fn executor(dir: &Path) -> Res<GpuExecutor> {
    let art = Artifact::load(dir)?;
    art.check_gpu_target()?;
    let entry = art.entry("run")?;
    let ptx = std::fs::read_to_string(dir.join(&entry.payload))?;
    Ok(GpuExecutor::new(entry.plan.clone(), &ptx)?)
}

/// The conformance cases under `dir`: `bf16` (tensor cores) judges each output by relative
/// L2 against 1e-2; otherwise the largest difference over the largest magnitude against
/// `TOLERANCE`, as the CPU tests do.
fn conformance(bundle: &Path, dir: &str, bf16: bool, table: &mut Vec<String>) -> Res<bool> {
    let mut all_ok = true;
    let mut cases: Vec<_> = std::fs::read_dir(bundle.join(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    cases.sort();
    for case in cases {
        let name = case
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let mut ex = executor(&case)?;
        // Inputs and expected outputs are the f32 cases' (one copy for both builds).
        let mut files: Vec<_> = std::fs::read_dir(bundle.join("conformance").join(&name))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        let mut worst_all = 0f32;
        for f in files {
            let w = egret_runtime::weights::load(&f)?;
            let elem_of = |n: &str| {
                ex.plan()
                    .buffers
                    .iter()
                    .find(|b| b.role == BufferRole::Input(n.to_string()))
                    .map(|b| b.elem)
            };
            let mut inputs = HashMap::new();
            let mut params: HashMap<String, (Vec<usize>, Arc<Vec<f32>>)> = HashMap::new();
            let mut want = vec![];
            for (k, t) in w.iter() {
                if let Some(n) = k.strip_prefix("in.") {
                    let data = match elem_of(n) {
                        Some(ElemType::I64) => {
                            HostData::I64(t.data.iter().map(|&x| x as i64).collect())
                        }
                        _ => HostData::F32(t.data.clone()),
                    };
                    inputs.insert(
                        n.to_string(),
                        HostValue {
                            shape: t.shape.clone(),
                            data,
                        },
                    );
                } else if let Some(n) = k.strip_prefix("param.") {
                    params.insert(n.to_string(), (t.shape.clone(), Arc::new(t.data.clone())));
                } else if let Some(n) = k.strip_prefix("want.") {
                    want.push((n.to_string(), t.data.clone()));
                }
            }
            ex.bind_params(&|n| params.get(n).cloned())?;
            let got = ex.run(&inputs)?;
            for (out, wv) in want {
                let gv: Vec<f32> = match &got.get(&out).ok_or("missing output")?.data {
                    HostData::F32(v) => v.clone(),
                    HostData::I64(v) => v.iter().map(|&x| x as f32).collect(),
                };
                let scale = wv
                    .iter()
                    .filter(|x| x.is_finite())
                    .fold(1f32, |m, x| m.max(x.abs()));
                let worst = wv
                    .iter()
                    .zip(&gv)
                    .map(|(a, b)| {
                        // (NaN where the reference has NaN matches, as in the tests)
                        if a == b || (a.is_nan() && b.is_nan()) {
                            0.0
                        } else {
                            let d = (a - b).abs() / scale;
                            if d.is_nan() {
                                f32::INFINITY
                            } else {
                                d
                            }
                        }
                    })
                    .fold(0f32, f32::max);
                let worst = if gv.len() != wv.len() {
                    f32::INFINITY
                } else if bf16 {
                    rel_l2(&gv, &wv) as f32
                } else {
                    worst
                };
                worst_all = worst_all.max(worst);
                println!(
                    "{}",
                    serde_json::json!({"check": dir, "case": name, "file": f.file_name().unwrap_or_default().to_string_lossy(), "output": out, "worst": worst})
                );
            }
        }
        let ok = worst_all <= if bf16 { 1e-2 } else { TOLERANCE };
        all_ok &= ok;
        table.push(format!(
            "{dir} {name:<24} worst {worst_all:.2e} {}",
            if ok { "ok" } else { "FAIL" }
        ));
    }
    Ok(all_ok)
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &x)| if x > b.1 { (i, x) } else { b },
        )
        .0 as u32
}

/// Greedy ids after `ids`, `n` of them, and the logits after the prompt.
fn greedy(s: &mut Session, ids: &[u32], n: usize) -> Res<(Vec<u32>, Vec<f32>, f64, f64)> {
    let t0 = Instant::now();
    let first = s.prefill(ids)?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let mut out = vec![argmax(&first)];
    let t1 = Instant::now();
    while out.len() < n {
        let l = s.decode(*out.last().expect("one"))?;
        out.push(argmax(&l));
    }
    let decode_s = t1.elapsed().as_secs_f64();
    Ok((out, first, prefill_s, decode_s))
}

fn smollm2(bundle: &Path, weights: &Path, table: &mut Vec<String>) -> Res<bool> {
    let w = egret_runtime::weights::load(weights)?;
    let params: HashMap<String, (Vec<usize>, Arc<Vec<f32>>)> = w
        .into_iter()
        .map(|(n, t)| (n, (t.shape, Arc::new(t.data))))
        .collect();
    let get = |n: &str| params.get(n).cloned();
    let gpu_art = Artifact::load(bundle.join("smollm2-ptx"))?;
    let cpu_art = Artifact::load(bundle.join("smollm2-cpu"))?;
    let mut gpu = Session::with_params(&gpu_art, &get, "weights", 0)?;
    let mut cpu = Session::with_params(&cpu_art, &get, "weights", 0)?;
    let ids = prompt(egret_runtime::generate::LanguageModel::vocab_size(&gpu));
    let n = 64;
    // Warm-up: module load and first allocations stay out of the timings.
    let _ = greedy(&mut gpu, &ids, 4)?;
    let (g_ids, g_first, g_pre, g_dec) = greedy(&mut gpu, &ids, n)?;
    let (c_ids, c_first, c_pre, c_dec) = greedy(&mut cpu, &ids, n)?;
    // The same without CUDA graphs (each launch on its own): same ids, and what graphs save.
    gpu.gpu_executor().ok_or("gpu session")?.set_graphs(false);
    let (plain_ids, _, _, plain_dec) = greedy(&mut gpu, &ids, n)?;
    gpu.gpu_executor().ok_or("gpu session")?.set_graphs(true);
    if let Some(ex) = gpu.gpu_executor() {
        ex.set_profiling(true);
    }
    for (what, run) in [("prefill", 0usize), ("decode", 1)] {
        if run == 0 {
            gpu.prefill(&ids)?;
        } else {
            gpu.decode(ids[0])?;
        }
        let ex = gpu.gpu_executor().ok_or("gpu session")?;
        summarize_profile(what, ex.profile(), table);
    }
    if let Some(ex) = gpu.gpu_executor() {
        ex.set_profiling(false);
    }
    let num: f64 = g_first
        .iter()
        .zip(&c_first)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let den: f64 = c_first.iter().map(|b| (*b as f64).powi(2)).sum();
    let rel = (num / den.max(1e-30)).sqrt();
    let same = g_ids.iter().zip(&c_ids).take_while(|(a, b)| a == b).count();
    let res = serde_json::json!({
        "check": "smollm2", "prompt_logits_rel_l2": rel, "greedy_equal_prefix": same, "n": n,
        "gpu_ids": g_ids, "cpu_ids": c_ids,
        "gpu_prefill_tok_s": ids.len() as f64 / g_pre, "gpu_decode_tok_s": (n - 1) as f64 / g_dec,
        "cpu_prefill_tok_s": ids.len() as f64 / c_pre, "cpu_decode_tok_s": (n - 1) as f64 / c_dec,
        "gpu_decode_tok_s_without_graphs": (n - 1) as f64 / plain_dec,
        "same_ids_without_graphs": plain_ids == g_ids,
    });
    println!("{res}");
    table.push(format!(
        "smollm2 prompt logits rel L2 {rel:.2e}; greedy ids equal for {same}/{n}"
    ));
    table.push(format!(
        "smollm2 gpu prefill {:.0} tok/s, decode {:.1} tok/s (cpu here: {:.0}, {:.1})",
        ids.len() as f64 / g_pre,
        (n - 1) as f64 / g_dec,
        ids.len() as f64 / c_pre,
        (n - 1) as f64 / c_dec
    ));
    table.push(format!(
        "smollm2 gpu decode without CUDA graphs {:.1} tok/s, same ids: {}",
        (n - 1) as f64 / plain_dec,
        plain_ids == g_ids
    ));
    Ok(rel < 1e-4 && same == n && plain_ids == g_ids)
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Timed runs of each bench: their median is its figure, as PyTorch's side takes the median
/// of its runs (`bench/gpu/torch_timing.py`).
const BENCH_REPS: usize = 10;

/// The median of a list of seconds (of the middle two, their mean).
fn median(mut t: Vec<f64>) -> f64 {
    t.sort_by(|a, b| a.total_cmp(b));
    let n = t.len();
    if n % 2 == 0 {
        (t[n / 2 - 1] + t[n / 2]) / 2.0
    } else {
        t[n / 2]
    }
}

/// Median device time of `reps` runs after one warm-up: the kernels' time on the stream by
/// events (`GpuExecutor::last_device_seconds`), as PyTorch's is taken.
fn time_runs(ex: &mut GpuExecutor, inputs: &HashMap<String, HostValue>, reps: usize) -> Res<f64> {
    ex.run(inputs)?;
    let mut t = vec![];
    for _ in 0..reps {
        ex.run(inputs)?;
        t.push(ex.last_device_seconds());
    }
    Ok(median(t))
}

/// A host f32 tensor of `shape` with `random` values from `seed`.
fn f32v(shape: Vec<usize>, seed: u64) -> HostValue {
    HostValue {
        data: HostData::F32(random(shape.iter().product(), seed)),
        shape,
    }
}

/// The 4096³ matmuls timed (f32, tensor cores on f32 and bf16 operands, `wgmma`), each
/// tensor-core result checked against the f32 one.
fn matmul_benches(bundle: &Path, table: &mut Vec<String>) -> Res<bool> {
    let n = 4096;
    let inputs = HashMap::from([
        ("a".to_string(), f32v(vec![n, n], 1)),
        ("w".to_string(), f32v(vec![n, n], 2)),
    ]);
    let (mut results, mut ok) = (vec![], true);
    for (dir, what) in [
        ("bench-matmul", "matmul f32 4096^3"),
        (
            "bench-matmul-tc",
            "matmul tensor cores (bf16 operands, f32 sums) 4096^3",
        ),
        (
            "bench-matmul-bf16",
            "matmul tensor cores, operands stored bf16 (as cuBLAS's) 4096^3",
        ),
        (
            "bench-matmul-wgmma",
            "matmul wgmma (sm_90a), operands stored bf16 4096^3",
        ),
    ] {
        let mut mm = executor(&bundle.join(dir))?;
        let out = mm.run(&inputs)?;
        if let Some(HostValue {
            data: HostData::F32(y),
            ..
        }) = out.get("y")
        {
            results.push(y.clone());
        }
        let s = time_runs(&mut mm, &inputs, BENCH_REPS)?;
        let tflops = 2.0 * (n as f64).powi(3) / s / 1e12;
        println!(
            "{}",
            serde_json::json!({"check": "bench", "what": what, "seconds": s, "tflops": tflops})
        );
        table.push(format!(
            "egret {what}: {:.2} ms, {tflops:.2} TFLOP/s",
            s * 1e3
        ));
    }
    if let [f32_out, tc_outs @ ..] = results.as_slice() {
        for (tc_out, what) in tc_outs
            .iter()
            .zip(["tensor cores", "bf16 operands", "wgmma"])
        {
            let rel = rel_l2(tc_out, f32_out);
            ok &= rel <= 1e-2;
            println!(
                "{}",
                serde_json::json!({"check": "bench", "what": format!("matmul {what} vs f32"), "rel_l2": rel})
            );
            table.push(format!(
                "egret matmul 4096^3 {what} vs f32: relative L2 {rel:.2e} {}",
                if rel <= 1e-2 { "ok" } else { "FAIL" }
            ));
        }
    }
    Ok(ok)
}

/// cuBLAS, loaded at run time (from `EGRET_CUBLAS`, a path `bench/gpu-check.sh` finds beside
/// PyTorch, or else from the loader's search path): the bf16 GEMM `torch.matmul` calls
/// (`cublasGemmEx`, f32 sums), run in this process beside egret's so that both are timed on
/// one stream, under the same clocks, in turn.
struct Cublas {
    handle: *mut std::ffi::c_void,
    gemm: GemmEx,
    destroy: unsafe extern "C" fn(*mut std::ffi::c_void) -> i32,
    _lib: libloading::Library,
}

/// `cublasGemmEx`'s signature (cuBLAS 12).
type GemmEx = unsafe extern "C" fn(
    *mut std::ffi::c_void,
    i32,
    i32,
    i32,
    i32,
    i32,
    *const std::ffi::c_void,
    *const std::ffi::c_void,
    i32,
    i32,
    *const std::ffi::c_void,
    i32,
    i32,
    *const std::ffi::c_void,
    *mut std::ffi::c_void,
    i32,
    i32,
    i32,
    i32,
) -> i32;

/// cuBLAS's constants this uses: no transpose, bf16 data, f32 compute, its default algorithm.
const CUBLAS_OP_N: i32 = 0;
const CUDA_R_16BF: i32 = 14;
const CUBLAS_COMPUTE_32F: i32 = 68;
const CUBLAS_GEMM_DEFAULT: i32 = -1;

impl Cublas {
    /// cuBLAS on the current context, its work on `stream`.
    fn load(stream: &cudarc::driver::CudaStream) -> Res<Cublas> {
        let names = match std::env::var("EGRET_CUBLAS") {
            Ok(p) if !p.is_empty() => vec![p],
            _ => vec!["libcublas.so.12".to_string(), "libcublas.so".to_string()],
        };
        // SAFETY: cuBLAS's initialisers only set up the library.
        let lib = names
            .iter()
            .find_map(|n| unsafe { libloading::Library::new(n) }.ok())
            .ok_or_else(|| format!("no cuBLAS library found (tried {})", names.join(", ")))?;
        // SAFETY: each symbol has the signature cuBLAS 12's header gives it.
        unsafe {
            let create: libloading::Symbol<
                unsafe extern "C" fn(*mut *mut std::ffi::c_void) -> i32,
            > = lib.get(b"cublasCreate_v2\0")?;
            let set_stream: libloading::Symbol<
                unsafe extern "C" fn(*mut std::ffi::c_void, *mut std::ffi::c_void) -> i32,
            > = lib.get(b"cublasSetStream_v2\0")?;
            let gemm = *lib.get::<GemmEx>(b"cublasGemmEx\0")?;
            let destroy = *lib.get(b"cublasDestroy_v2\0")?;
            stream.context().bind_to_thread()?;
            let mut handle = std::ptr::null_mut();
            cublas_ok("cublasCreate", create(&mut handle))?;
            cublas_ok(
                "cublasSetStream",
                set_stream(handle, stream.cu_stream() as *mut _),
            )?;
            Ok(Cublas {
                handle,
                gemm,
                destroy,
                _lib: lib,
            })
        }
    }

    /// `y = a·w` of row-major bf16 `[m, k]·[k, n]` at device addresses, enqueued: in
    /// cuBLAS's column-major terms `yᵀ = wᵀ·aᵀ`, as PyTorch calls it.
    fn matmul_bf16(&self, (m, n, k): (usize, usize, usize), a: u64, w: u64, y: u64) -> Res<()> {
        let (alpha, beta) = (1f32, 0f32);
        let p = |x: u64| x as *const std::ffi::c_void;
        let (m, n, k) = (m as i32, n as i32, k as i32);
        // SAFETY: the three buffers hold `m·k`, `k·n` and `m·n` bf16 elements.
        let status = unsafe {
            (self.gemm)(
                self.handle,
                CUBLAS_OP_N,
                CUBLAS_OP_N,
                n,
                m,
                k,
                (&alpha as *const f32).cast(),
                p(w),
                CUDA_R_16BF,
                n,
                p(a),
                CUDA_R_16BF,
                k,
                (&beta as *const f32).cast(),
                y as *mut std::ffi::c_void,
                CUDA_R_16BF,
                n,
                CUBLAS_COMPUTE_32F,
                CUBLAS_GEMM_DEFAULT,
            )
        };
        cublas_ok("cublasGemmEx", status)
    }
}

/// A cuBLAS call's status as a result (0 is success).
fn cublas_ok(what: &str, status: i32) -> Res<()> {
    if status == 0 {
        Ok(())
    } else {
        Err(format!("{what} failed: cuBLAS status {status}").into())
    }
}

impl Drop for Cublas {
    fn drop(&mut self) {
        // SAFETY: the handle was created by this library and is not used after this.
        unsafe { (self.destroy)(self.handle) };
    }
}

/// The `wgmma` matmul goal (`variant` `wgmma`: its ring filled by `cp.async`; `tma`: by the
/// tensor memory accelerator), timed in turn with cuBLAS in this process: `BENCH_REPS` rounds
/// of egret's run (its device time) and cuBLAS's GEMM on the same bf16 operands (timed with
/// events on its stream), each side's operands uploaded afresh before each of its runs, as
/// egret's run uploads its inputs. Both sides meet the card's clocks alike, which drift over
/// a call (G19's cuBLAS figures moved by 11% between the call's two ends). Each result is
/// checked against the other (relative L2, as the other benches).
fn matmul_pair(bundle: &Path, variant: &str, table: &mut Vec<String>) -> Res<bool> {
    use cudarc::driver::{sys, CudaContext, DevicePtr};
    let n = 4096;
    let inputs = HashMap::from([
        ("a".to_string(), f32v(vec![n, n], 1)),
        ("w".to_string(), f32v(vec![n, n], 2)),
    ]);
    let operand = |name: &str| match &inputs[name].data {
        HostData::F32(v) => Ok(v),
        _ => Err(format!("input `{name}` is not f32")),
    };
    let (a, w) = (operand("a")?, operand("w")?);
    let mut mm = executor(&bundle.join(format!("bench-matmul-{variant}")))?;
    let ctx = CudaContext::new(0)?;
    let stream = ctx.new_stream()?;
    let cublas = match Cublas::load(&stream) {
        Ok(c) => c,
        Err(e) => {
            table.push(format!(
                "egret matmul {variant} paired with cuBLAS: skipped ({e})"
            ));
            return Ok(true);
        }
    };
    let bf16 = |v: &[f32]| -> Vec<u16> {
        v.iter()
            .map(|x| half::bf16::from_f32(*x).to_bits())
            .collect()
    };
    let (ab, wb) = (bf16(a), bf16(w));
    let (mut da, mut dw) = (
        stream.alloc_zeros::<u16>(n * n)?,
        stream.alloc_zeros::<u16>(n * n)?,
    );
    let dy = stream.alloc_zeros::<u16>(n * n)?;
    let timed = || ctx.new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT));
    let (e0, e1) = (timed()?, timed()?);
    let mut cublas_run = || -> Res<f64> {
        stream.memcpy_htod(&ab, &mut da)?;
        stream.memcpy_htod(&wb, &mut dw)?;
        let ptr = |s: &cudarc::driver::CudaSlice<u16>| s.device_ptr(&stream).0;
        e0.record(&stream)?;
        cublas.matmul_bf16((n, n, n), ptr(&da), ptr(&dw), ptr(&dy))?;
        e1.record(&stream)?;
        Ok(f64::from(e0.elapsed_ms(&e1)?) / 1e3)
    };
    // (one warm-up each; then the rounds)
    let y = mm.run(&inputs)?;
    cublas_run()?;
    let (mut te, mut tc) = (vec![], vec![]);
    for _ in 0..BENCH_REPS {
        mm.run(&inputs)?;
        te.push(mm.last_device_seconds());
        tc.push(cublas_run()?);
    }
    let pair_ratios: Vec<f64> = te.iter().zip(&tc).map(|(e, c)| c / e).collect();
    let (lo, hi) = pair_ratios
        .iter()
        .fold((f64::MAX, f64::MIN), |(l, h), r| (l.min(*r), h.max(*r)));
    let (se, sc) = (median(te), median(tc));
    let flops = 2.0 * (n as f64).powi(3);
    let ratio = sc / se;
    // Each side's result against the other's.
    let theirs: Vec<f32> = stream
        .clone_dtoh(&dy)?
        .into_iter()
        .map(|b| half::bf16::from_bits(b).to_f32())
        .collect();
    let rel = match y.get("y") {
        Some(HostValue {
            data: HostData::F32(ours),
            ..
        }) => rel_l2(ours, &theirs),
        _ => return Err("the matmul bench gave no f32 output `y`".into()),
    };
    let ok = rel <= 1e-2;
    println!(
        "{}",
        serde_json::json!({"check": "bench",
            "what": format!("matmul {variant} paired with cuBLAS bf16 4096^3"),
            "seconds": se, "tflops": flops / se / 1e12, "cublas_seconds": sc,
            "cublas_tflops": flops / sc / 1e12, "ratio": ratio, "ratio_min": lo, "ratio_max": hi,
            "rel_l2": rel})
    );
    table.push(format!(
        "egret matmul {variant} 4096^3 paired with cuBLAS ({BENCH_REPS} rounds): {:.1} against {:.1} TFLOP/s, {ratio:.3}x (rounds {lo:.3}-{hi:.3}); results within {rel:.2e} {}",
        flops / se / 1e12,
        flops / sc / 1e12,
        if ok { "ok" } else { "FAIL" }
    ));
    Ok(ok)
}

/// The causal attentions (16 heads, 4096 tokens, head 128) timed (f32, tensor cores on f32
/// and bf16 operands, `wgmma`), each tensor-core result checked against the f32 one.
fn attention_benches(bundle: &Path, table: &mut Vec<String>) -> Res<bool> {
    let t = 4096;
    let inputs = HashMap::from([
        ("q".to_string(), f32v(vec![1, 16, t, 128], 3)),
        ("k".to_string(), f32v(vec![1, 16, t, 128], 4)),
        ("v".to_string(), f32v(vec![1, 16, t, 128], 5)),
    ]);
    let (mut outs, mut ok) = (vec![], true);
    for (dir, what) in [
        ("bench-attention", "f32"),
        ("bench-attention-tc", "tensor cores (bf16 operands)"),
        ("bench-attention-bf16", "bf16 operands in memory"),
        (
            "bench-attention-wgmma",
            "wgmma (sm_90a), bf16 operands in memory",
        ),
    ] {
        let mut at = executor(&bundle.join(dir))?;
        if let Some(HostValue {
            data: HostData::F32(o),
            ..
        }) = at.run(&inputs)?.get("o")
        {
            outs.push(o.clone());
        }
        let s = time_runs(&mut at, &inputs, BENCH_REPS)?;
        // Causal: half the score matrix, QKᵀ and PV each 2·d flops per score.
        let flops = 16.0 * (t as f64) * (t as f64) / 2.0 * 128.0 * 4.0;
        let tflops = flops / s / 1e12;
        println!(
            "{}",
            serde_json::json!({"check": "bench", "what": format!("attention causal 16x4096x128 {what}"), "seconds": s, "tflops": tflops})
        );
        table.push(format!(
            "egret attention causal h16 t4096 d128 {what}: {:.2} ms, {tflops:.2} TFLOP/s",
            s * 1e3
        ));
    }
    if let [f32_out, tc_outs @ ..] = outs.as_slice() {
        for (tc_out, what) in tc_outs
            .iter()
            .zip(["tensor cores", "bf16 operands", "wgmma"])
        {
            let rel = rel_l2(tc_out, f32_out);
            ok &= rel <= 1e-2;
            println!(
                "{}",
                serde_json::json!({"check": "bench", "what": format!("attention {what} vs f32"), "rel_l2": rel})
            );
            table.push(format!(
                "egret attention {what} vs f32: relative L2 {rel:.2e} {}",
                if rel <= 1e-2 { "ok" } else { "FAIL" }
            ));
        }
    }
    Ok(ok)
}

/// The causal attention's forward and backward (16 heads, 4096 tokens, head 128: the
/// forward, the log-sum-exp, `delta`, `dq`, `dk`, `dv`) timed in f32 and on tensor cores
/// (bf16 operands), the tensor cores' gradients checked against the f32 ones. TFLOP/s count
/// FlashAttention's flops (the backward 2.5 times the forward's), not the kernels' own.
fn attention_backward_bench(bundle: &Path, table: &mut Vec<String>) -> Res<bool> {
    let t = 4096;
    let inputs = HashMap::from([
        ("q".to_string(), f32v(vec![1, 16, t, 128], 3)),
        ("k".to_string(), f32v(vec![1, 16, t, 128], 4)),
        ("v".to_string(), f32v(vec![1, 16, t, 128], 5)),
        ("do".to_string(), f32v(vec![1, 16, t, 128], 6)),
    ]);
    let flops = 16.0 * (t as f64) * (t as f64) / 2.0 * 128.0 * 4.0 * 3.5;
    let mut outs = vec![];
    for (dir, what) in [
        ("bench-attention-bwd", "f32"),
        ("bench-attention-bwd-tc", "tensor cores, bf16 operands"),
    ] {
        let mut at = executor(&bundle.join(dir))?;
        outs.push(at.run(&inputs)?);
        let s = time_runs(&mut at, &inputs, BENCH_REPS)?;
        let tflops = flops / s / 1e12;
        println!(
            "{}",
            serde_json::json!({"check": "bench", "what": format!("attention forward+backward causal 16x4096x128 {what}"), "seconds": s, "tflops": tflops})
        );
        table.push(format!(
            "egret attention forward+backward causal h16 t4096 d128 {what}: {:.2} ms, {tflops:.2} TFLOP/s",
            s * 1e3
        ));
    }
    let mut ok = true;
    for g in ["dq", "dk", "dv"] {
        let f32_of = |o: &HashMap<String, HostValue>| match o.get(g) {
            Some(HostValue {
                data: HostData::F32(x),
                ..
            }) => Ok(x.clone()),
            _ => Err(format!("no f32 output {g}")),
        };
        let rel = rel_l2(&f32_of(&outs[1])?, &f32_of(&outs[0])?);
        ok &= rel <= 5e-2;
        println!(
            "{}",
            serde_json::json!({"check": "bench", "what": format!("attention backward tensor cores vs f32 {g}"), "rel_l2": rel})
        );
        table.push(format!(
            "egret attention backward tensor cores vs f32 {g}: relative L2 {rel:.2e} {}",
            if rel <= 5e-2 { "ok" } else { "FAIL" }
        ));
    }
    Ok(ok)
}

/// The most kernels (by what they compute) a profile lists with their total time.
const PROFILE_SHAPES: usize = 30;

/// A profile's kernels grouped by `key` of what they compute: each group's seconds and
/// launches, most seconds first.
fn group_profile(
    profile: &[(String, f64)],
    key: impl Fn(&str) -> String,
) -> Vec<(String, (f64, usize))> {
    let mut by: HashMap<String, (f64, usize)> = HashMap::new();
    for (w, t) in profile {
        let e = by.entry(key(w)).or_default();
        e.0 += t;
        e.1 += 1;
    }
    let mut v: Vec<_> = by.into_iter().collect();
    v.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0).then_with(|| a.0.cmp(&b.0)));
    v
}

/// The kernels of a profiled run grouped by kind (the first word of what they compute),
/// and by what they compute (`shapes`: the layers' kernels of one shape together).
fn summarize_profile(what: &str, profile: &[(String, f64)], table: &mut Vec<String>) {
    let v = group_profile(profile, |w| w.split_whitespace().take(1).collect());
    let shapes = group_profile(profile, str::to_string);
    let total: f64 = v.iter().map(|x| x.1 .0).sum();
    let mut slow: Vec<&(String, f64)> = profile.iter().collect();
    slow.sort_by(|a, b| b.1.total_cmp(&a.1));
    println!(
        "{}",
        serde_json::json!({"check": "profile", "step": what, "total_s": total,
        "kinds": v.iter().map(|(k, (t, n))| serde_json::json!([k, t, n])).collect::<Vec<_>>(),
        "slowest": slow.iter().take(12).map(|(w, t)| serde_json::json!([w, t])).collect::<Vec<_>>(),
        "shapes": shapes.iter().take(PROFILE_SHAPES).map(|(k, (t, n))| serde_json::json!([k, t, n])).collect::<Vec<_>>()})
    );
    let top: Vec<String> = v
        .iter()
        .take(5)
        .map(|(k, (t, n))| format!("{k} {:.2} ms/{n}", t * 1e3))
        .collect();
    table.push(format!(
        "profile {what} (synchronised launches, {:.2} ms): {}",
        total * 1e3,
        top.join(", ")
    ));
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Gradient tolerances (relative L2 to transformers in f32): f32 kernels, and bf16 matmuls
/// and attention (PyTorch's own bf16 autocast lands up to 4.6e-2 away on these fixtures;
/// `tools/bf16_grad_error.py`).
const GRAD_TOL: [(&str, f64, f64); 2] = [("grads", 1e-5, 1e-4), ("grads-bf16", 1e-2, 5e-2)];

/// The bf16 gradients' tolerance (relative L2, and the loss's relative error) against the
/// same bf16 program on the simulator (`grads-sim.safetensors`), its roundings included:
/// what remains is the order of the f32 sums and the roundings that order tips over.
const SIM_GRAD_TOL: f64 = 1e-3;

fn gradients(bundle: &Path, table: &mut Vec<String>) -> Res<bool> {
    let mut ok = true;
    for (sub, loss_tol, grad_tol) in GRAD_TOL {
        ok &= gradients_in(bundle, sub, loss_tol, grad_tol, table)?;
    }
    Ok(ok)
}

fn gradients_in(
    bundle: &Path,
    sub: &str,
    loss_tol: f64,
    grad_tol: f64,
    table: &mut Vec<String>,
) -> Res<bool> {
    let mut ok = true;
    let mut dirs: Vec<_> = std::fs::read_dir(bundle.join(sub))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    dirs.sort();
    for d in dirs {
        let name = d
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .to_string();
        let mut ex = executor(&d)?;
        let w = egret_runtime::weights::load(&d.join("model.safetensors"))?;
        let params: HashMap<String, (Vec<usize>, Arc<Vec<f32>>)> = w
            .into_iter()
            .map(|(n, t)| (n, (t.shape, Arc::new(t.data))))
            .collect();
        ex.bind_params(&|n| params.get(n).cloned())?;
        let j: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("grads.json"))?)?;
        let toks: Vec<i64> = j["tokens"]
            .as_array()
            .ok_or("tokens")?
            .iter()
            .filter_map(|x| x.as_i64())
            .collect();
        let t = toks.len();
        let targets: Vec<i64> = toks.iter().skip(1).copied().chain([-1]).collect();
        let i64v = |v: Vec<i64>| HostValue {
            shape: vec![1, t],
            data: HostData::I64(v),
        };
        let inputs = HashMap::from([
            ("tokens".to_string(), i64v(toks.clone())),
            ("positions".to_string(), i64v((0..t as i64).collect())),
            ("targets".to_string(), i64v(targets)),
        ]);
        let out = ex.run(&inputs)?;
        let want = egret_runtime::weights::load(&d.join("grads.safetensors"))?;
        let want_loss = j["loss"].as_f64().ok_or("loss")? as f32;
        let row = format!("{sub} {name:<24} ");
        let (good, compared) = judge_grads(
            (sub, &name, &row),
            &out,
            (want_loss, want.iter().collect()),
            (loss_tol, grad_tol),
            table,
        )?;
        ok &= good;
        // Against the same program on the simulator, where the bundle has it.
        let sim_path = d.join("grads-sim.safetensors");
        if sim_path.exists() {
            let sim = egret_runtime::weights::load(&sim_path)?;
            let sim_loss = sim.get("loss").ok_or("grads-sim: no loss")?.data[0];
            let grads = sim.iter().filter(|(k, _)| k.starts_with("grad.")).collect();
            let (good, sim_compared) = judge_grads(
                (
                    &format!("{sub}-vs-simulated"),
                    &name,
                    &format!("{row}vs the simulator: "),
                ),
                &out,
                (sim_loss, grads),
                (SIM_GRAD_TOL, SIM_GRAD_TOL),
                table,
            )?;
            if sim_compared != compared {
                return Err(format!(
                    "{name}: grads-sim has {sim_compared} gradients, the fixture {compared}"
                )
                .into());
            }
            ok &= good;
        }
    }
    Ok(ok)
}

/// Fixture `name`'s loss and gradients from a run (`out`) against a reference's, within
/// `(loss, gradient)` tolerances (relative error, worst relative L2): a JSON line (`check`)
/// and a table row (starting `row`). Whether it passed, and how many gradients it compared.
fn judge_grads(
    (check, name, row): (&str, &str, &str),
    out: &HashMap<String, HostValue>,
    (ref_loss, grads): (f32, Vec<(&str, &HostTensor)>),
    (loss_tol, grad_tol): (f64, f64),
    table: &mut Vec<String>,
) -> Res<(bool, usize)> {
    let f = |v: &HostValue| match &v.data {
        HostData::F32(x) => x.clone(),
        HostData::I64(x) => x.iter().map(|&i| i as f32).collect(),
    };
    let loss = f(out.get("loss").ok_or("no loss")?)[0];
    let lrel = ((loss - ref_loss).abs() / ref_loss.abs()) as f64;
    let mut worst = 0f64;
    for (k, r) in &grads {
        let g = out.get(*k).ok_or_else(|| format!("{name}: no {k}"))?;
        worst = worst.max(rel_l2(&f(g), &r.data));
    }
    let good = lrel <= loss_tol && worst <= grad_tol;
    println!(
        "{}",
        serde_json::json!({"check": check, "fixture": name, "loss_rel": lrel, "worst_grad_rel_l2": worst})
    );
    table.push(format!(
        "{row}loss rel {lrel:.1e}, worst gradient rel L2 {worst:.1e} {}",
        if good { "ok" } else { "FAIL" }
    ));
    Ok((good, grads.len()))
}

/// Two AdamW steps of SmolLM2 (batch 1 × 256) on the GPU (f32, and with tensor cores) and
/// on the CPU from the same weights: the losses agree; then each GPU step is timed.
fn train_step(bundle: &Path, weights: &Path, table: &mut Vec<String>) -> Res<bool> {
    let (b, t) = (1, 256);
    let toks: Vec<u32> = (0..(b * t) as u64)
        .map(|i| ((i * 7919 + 13) % 49152) as u32)
        .collect();
    let targets: Vec<i64> = toks.iter().skip(1).map(|&x| x as i64).chain([-1]).collect();
    let session = |dir: &str| -> Res<(egret_runtime::TrainSession, Vec<f32>)> {
        let art = Artifact::load(bundle.join(dir))?;
        let mut s =
            egret_runtime::TrainSession::new(&art, egret_runtime::weights::load(weights)?, 0)?;
        let l: Vec<f32> = (0..2)
            .map(|_| s.train_step(&toks, &targets, b, t, 1e-4).map(|o| o.loss))
            .collect::<Result<_, _>>()?;
        Ok((s, l))
    };
    let (cpu, cpu_losses) = session("smollm2-train-cpu")?;
    let mut ok = true;
    // f32, checked to 1e-4 (and its state after the two steps); with tensor cores (bf16
    // matmuls and attention), its losses to 1e-2.
    for (dir, what, tol) in [
        ("smollm2-train", "f32", 1e-4),
        ("smollm2-train-tc", "tensor cores", 1e-2),
    ] {
        let (mut s, losses) = session(dir)?;
        if dir == "smollm2-train" {
            // The parameters and moments after two steps, read back from the device.
            let name = "model.layers.0.self_attn.q_proj.weight";
            let p = (
                s.param(name).ok_or("param")?,
                cpu.param(name).ok_or("param")?,
            );
            let m = (s.moments(name).ok_or("m")?, cpu.moments(name).ok_or("m")?);
            let (prel, mrel) = (rel_l2(&p.0, &p.1), rel_l2(&m.0 .0, &m.1 .0));
            table.push(format!(
                "train state after 2 steps, gpu vs cpu: {name} rel L2 {prel:.1e}, its m {mrel:.1e}"
            ));
            ok &= prel <= 1e-4 && mrel <= 1e-3;
        }
        let mut times = vec![];
        for _ in 0..3 {
            let t0 = Instant::now();
            s.train_step(&toks, &targets, b, t, 1e-4)?;
            times.push(t0.elapsed().as_secs_f64());
        }
        times.sort_by(|a, b| a.total_cmp(b));
        let sec = times[1];
        // The last step's time from its first launch to its last kernel's end (the rest of
        // the step is the host's: inputs, launch tables, outputs).
        let device_s = s.gpu_executor().map_or(0.0, |ex| ex.last_kernel_seconds());
        if let Some(ex) = s.gpu_executor() {
            ex.set_profiling(true);
        }
        s.train_step(&toks, &targets, b, t, 1e-4)?;
        if let Some(ex) = s.gpu_executor() {
            summarize_profile(&format!("train step {what}"), ex.profile(), table);
        }
        let rel = losses
            .iter()
            .zip(&cpu_losses)
            .map(|(g, c)| ((g - c) / c).abs())
            .fold(0f32, f32::max);
        ok &= rel <= tol;
        println!(
            "{}",
            serde_json::json!({"check": "bench", "what": format!("train step smollm2 {what} 1x256"), "seconds": sec, "kernel_seconds": device_s, "tok_s": (b * t) as f64 / sec, "gpu_losses": losses, "cpu_losses": cpu_losses})
        );
        table.push(format!(
            "egret train step smollm2 {what} 1x256: {:.1} ms ({:.1} ms launching and running kernels), {:.0} tok/s; losses gpu {:?} cpu {:?} (rel {rel:.1e}{})",
            sec * 1e3,
            device_s * 1e3,
            (b * t) as f64 / sec,
            losses,
            cpu_losses,
            if rel <= tol { "" } else { ", FAIL" }
        ));
    }
    Ok(ok)
}

/// The steps, in the order they run (`bench/gpu-check.sh` runs each in a process of its
/// own, so that a fault in one, which leaves the CUDA context unusable, spares the others).
const STEPS: [&str; 12] = [
    "conformance",
    "conformance-tc",
    "conformance-wgmma",
    "gradients",
    "smollm2",
    "matmul benches",
    "matmul pair benches",
    "attention benches",
    "attention backward benches",
    "train step",
    "conformance-tma",
    "matmul pair benches tma",
];

/// Whether step `what` is among those named: by its name, or `benches` for both benches.
fn named(only: &[&str], what: &str) -> bool {
    only.contains(&what) || (what.ends_with(" benches") && only.contains(&"benches"))
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args == ["--steps"] {
        for s in STEPS {
            println!("{s}");
        }
        return;
    }
    let (bundle, weights, only) = match args.as_slice() {
        [b, w] => (b, w, None),
        [b, w, only] => (b, w, Some(only.split(',').collect::<Vec<_>>())),
        _ => {
            eprintln!("usage: gpu_check BUNDLE WEIGHTS [STEP,...] | gpu_check --steps");
            std::process::exit(2);
        }
    };
    let (bundle, weights) = (Path::new(bundle), Path::new(weights));
    let mut table = vec![];
    match egret_runtime::gpu::device_info() {
        Ok((name, cc)) => table.push(format!("device {name} (sm_{}{})", cc.0, cc.1)),
        Err(e) => {
            eprintln!("gpu_check: {e}");
            std::process::exit(1);
        }
    }
    let mut ok = true;
    let steps: [(&str, &dyn Fn(&mut Vec<String>) -> Res<bool>); STEPS.len()] = [
        ("conformance", &|t| {
            conformance(bundle, "conformance", false, t)
        }),
        ("conformance-tc", &|t| {
            conformance(bundle, "conformance-tc", true, t)
        }),
        ("conformance-wgmma", &|t| {
            conformance(bundle, "conformance-wgmma", true, t)
        }),
        ("gradients", &|t| gradients(bundle, t)),
        ("smollm2", &|t| smollm2(bundle, weights, t)),
        ("matmul benches", &|t| matmul_benches(bundle, t)),
        ("matmul pair benches", &|t| matmul_pair(bundle, "wgmma", t)),
        ("attention benches", &|t| attention_benches(bundle, t)),
        ("attention backward benches", &|t| {
            attention_backward_bench(bundle, t)
        }),
        ("train step", &|t| train_step(bundle, weights, t)),
        ("conformance-tma", &|t| {
            conformance(bundle, "conformance-tma", true, t)
        }),
        ("matmul pair benches tma", &|t| {
            matmul_pair(bundle, "tma", t)
        }),
    ];
    for (what, step) in steps {
        debug_assert!(STEPS.contains(&what));
        if only.as_ref().is_some_and(|o| !named(o, what)) {
            continue;
        }
        let t0 = Instant::now();
        match step(&mut table) {
            Ok(r) => ok &= r,
            Err(e) => {
                ok = false;
                table.push(format!("{what}: ERROR {e}"));
            }
        }
        eprintln!("gpu_check: {what} took {:.1} s", t0.elapsed().as_secs_f64());
    }
    eprintln!("\n{}", table.join("\n"));
    std::process::exit(if ok { 0 } else { 1 });
}
