//! Backend conformance: every op and fused op, at odd sizes (1, 3, 17, 63, 65, 1000 bound to
//! the symbol `N`), run on the reference interpreter and on each compiled backend; results
//! agree within 1e-5 relative to the largest magnitude. Written once: a backend is a
//! function from (graph, inputs, params) to outputs.

mod common;

use std::collections::HashMap;

use common::Rng;
use egret_backends::llvm::CpuOptions;
use egret_backends::ptx::PtxOptions;
use egret_ir::{DType, Graph, Interpreter, Op, Tensor};
use egret_runtime::cpu::{HostData, HostValue};
use egret_runtime::plan::ElemType;

const SIZES: &[i64] = &[1, 3, 17, 63, 65, 1000];
const TOLERANCE: f32 = 1e-5;

include!("common/conformance_cases.rs");

fn graph(name: &str, body: &str) -> Graph {
    egret_ir::parse(&format!("graph {} {{{body}\n}}", name.replace('-', "_")))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn bindings(g: &Graph, n: i64, seed: u64) -> (HashMap<String, Tensor>, HashMap<String, Tensor>) {
    let mut rng = Rng(seed | 1);
    let mut b = HashMap::new();
    b.insert("N".to_string(), n);
    let (mut inputs, mut params) = (HashMap::new(), HashMap::new());
    for node in &g.nodes {
        let (map, name) = match &node.op {
            Op::Input { name } => (&mut inputs, name),
            Op::Param { name } => (&mut params, name),
            _ => continue,
        };
        let shape = node.ty.shape.eval(&b).unwrap();
        let len: usize = shape.iter().product();
        let t = match node.ty.dtype {
            DType::I64 | DType::I32 => {
                Tensor::from_i64(shape, (0..len).map(|_| (rng.next() % 4) as i64).collect())
                    .unwrap()
            }
            _ => Tensor::from_f32(shape, (0..len).map(|_| rng.uniform()).collect()).unwrap(),
        };
        map.insert(name.clone(), t);
    }
    (inputs, params)
}

type Outputs = HashMap<String, Vec<f32>>;

fn run_interp(
    g: &Graph,
    inputs: &HashMap<String, Tensor>,
    params: &HashMap<String, Tensor>,
) -> Outputs {
    let out = Interpreter::new(g).unwrap().run(inputs, params).unwrap();
    out.into_iter().map(|(k, v)| (k, v.to_f32_vec())).collect()
}

fn run_cpu(
    g: &Graph,
    inputs: &HashMap<String, Tensor>,
    params: &HashMap<String, Tensor>,
) -> Outputs {
    let (mut ex, _code) = egret::cpu::executor(g, params, &CpuOptions::default(), 2).unwrap();
    let out = ex.run(&host_inputs(inputs)).unwrap();
    outputs_f32(out)
}

fn host_inputs(inputs: &HashMap<String, Tensor>) -> HashMap<String, HostValue> {
    inputs
        .iter()
        .map(|(k, t)| {
            let data = if t.dtype().is_float() {
                HostData::F32(t.to_f32_vec())
            } else {
                HostData::I64(t.to_i64_vec())
            };
            (
                k.clone(),
                HostValue {
                    shape: t.shape().to_vec(),
                    data,
                },
            )
        })
        .collect()
}

fn outputs_f32(out: HashMap<String, HostValue>) -> Outputs {
    out.into_iter()
        .map(|(k, v)| {
            let f = match v.data {
                HostData::F32(x) => x,
                HostData::I64(x) => x.into_iter().map(|i| i as f32).collect(),
            };
            (k, f)
        })
        .collect()
}

fn check(
    backend: &str,
    run: fn(&Graph, &HashMap<String, Tensor>, &HashMap<String, Tensor>) -> Outputs,
) {
    let mut failures = vec![];
    for (name, body) in CASES {
        let g = graph(name, body);
        egret_ir::verify(&g).unwrap_or_else(|e| panic!("{name}: {e}"));
        for &n in SIZES {
            let (inputs, params) = bindings(&g, n, n as u64 * 31 + name.len() as u64);
            let want = run_interp(&g, &inputs, &params);
            let got = run(&g, &inputs, &params);
            for (out, w) in &want {
                let gv = &got[out];
                assert_eq!(gv.len(), w.len(), "{name} n={n} {out}");
                let scale = w
                    .iter()
                    .filter(|x| x.is_finite())
                    .fold(1f32, |m, x| m.max(x.abs()));
                let worst = w
                    .iter()
                    .zip(gv)
                    .map(|(a, b)| if a == b { 0.0 } else { (a - b).abs() / scale })
                    .fold(0f32, f32::max);
                if !(worst <= TOLERANCE) {
                    failures.push(format!(
                        "{backend}: {name} N={n} output {out}: relative difference {worst}"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn cpu_backend_matches_the_interpreter() {
    check("cpu", run_cpu);
}

fn run_gpu(
    g: &Graph,
    inputs: &HashMap<String, Tensor>,
    params: &HashMap<String, Tensor>,
) -> Outputs {
    let mut ex = egret::gpu::executor(g, params, &PtxOptions::default()).unwrap();
    let out = ex.run(&host_inputs(inputs)).unwrap();
    outputs_f32(out)
}

/// Runs on a GPU when this machine has one (a CUDA driver and a device); says it was
/// skipped otherwise.
#[test]
fn gpu_backend_matches_the_interpreter() {
    if common::gpu_or_skip("gpu_backend_matches_the_interpreter") {
        check("gpu", run_gpu);
    }
}

fn run_simt(
    g: &Graph,
    inputs: &HashMap<String, Tensor>,
    params: &HashMap<String, Tensor>,
) -> Outputs {
    let mut ex = egret::gpu::simt_executor(g, params, &PtxOptions::default()).unwrap();
    let out = ex.run(&host_inputs(inputs)).unwrap();
    outputs_f32(out)
}

/// The GPU's kernels, run thread for thread on the SIMT simulator (no GPU needed).
#[test]
fn simulated_gpu_kernels_match_the_interpreter() {
    check("simt", run_simt);
}

/// Every case's PTX (which does not depend on `N`) assembles for sm_80 and sm_90, with and
/// without tensor-core matmuls.
#[test]
fn ptx_of_every_case_assembles() {
    for (name, body) in CASES {
        let g = graph(name, body);
        for arch in ["sm_80", "sm_90"] {
            for tensor_cores in [false, true] {
                let opts = PtxOptions {
                    arch: arch.into(),
                    tensor_cores,
                    tma: false,
                };
                let (ptx, _) = egret::gpu::compile_graphs(&[&g], &opts, false)
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                common::assemble_ptx(name, &ptx, arch);
            }
        }
    }
}

/// `‖got − want‖ / ‖want‖`.
fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let num: f64 = want
        .iter()
        .zip(got)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|a| (*a as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Runs `g` on the interpreter and, with tensor cores, on the SIMT simulator, its inputs
/// (and with `params_too` its parameters) redrawn by `draw`; returns both outputs.
fn interp_and_simulated(
    name: &str,
    body: &str,
    seed: u64,
    (params_too, tensor_cores): (bool, bool),
    draw: impl FnMut(&mut Rng) -> f32,
) -> (Outputs, Outputs) {
    let opts = PtxOptions {
        tensor_cores,
        ..PtxOptions::default()
    };
    interp_and_simulated_with(name, body, seed, params_too, &opts, draw)
}

/// `interp_and_simulated` for the kernels of `opts`.
fn interp_and_simulated_with(
    name: &str,
    body: &str,
    seed: u64,
    params_too: bool,
    opts: &PtxOptions,
    mut draw: impl FnMut(&mut Rng) -> f32,
) -> (Outputs, Outputs) {
    let g = graph(name, body);
    let (mut inputs, mut params) = bindings(&g, 1, name.len() as u64);
    let mut rng = Rng(seed ^ name.len() as u64);
    let redraw = |t: &mut Tensor, rng: &mut Rng, draw: &mut dyn FnMut(&mut Rng) -> f32| {
        let len = t.shape().iter().product::<usize>();
        let v = (0..len).map(|_| draw(rng)).collect();
        *t = Tensor::from_f32(t.shape().to_vec(), v).unwrap();
    };
    for t in inputs.values_mut() {
        redraw(t, &mut rng, &mut draw);
    }
    if params_too {
        for t in params.values_mut() {
            redraw(t, &mut rng, &mut draw);
        }
    }
    let want = run_interp(&g, &inputs, &params);
    let mut ex = egret::gpu::simt_executor(&g, &params, opts).unwrap();
    let got = outputs_f32(ex.run(&host_inputs(&inputs)).unwrap());
    (want, got)
}

/// With tensor cores, matmuls round their operands to bf16: every output of every matmul
/// case within 1e-2 relative L2 of the interpreter's, on executors that `make` builds.
fn check_tensor_cores(
    make: fn(
        &Graph,
        &HashMap<String, Tensor>,
        &PtxOptions,
    ) -> egret::Result<Box<dyn FnMut(&HashMap<String, HostValue>) -> Outputs>>,
) {
    let opts = PtxOptions {
        tensor_cores: true,
        ..PtxOptions::default()
    };
    for (name, body) in CASES.iter().filter(|(n, _)| n.contains("matmul")) {
        let g = graph(name, body);
        for &n in SIZES {
            let (inputs, params) = bindings(&g, n, n as u64 * 31 + name.len() as u64);
            let want = run_interp(&g, &inputs, &params);
            let mut run = make(&g, &params, &opts).unwrap();
            let got = run(&host_inputs(&inputs));
            for (out, w) in &want {
                let rel = rel_l2(&got[out], w);
                assert!(rel <= 1e-2, "{name} N={n} {out}: relative L2 {rel}");
            }
        }
    }
}

/// Tensor-core matmuls on a GPU (skipped without one).
#[test]
fn gpu_tensor_core_matmuls_are_within_bf16_tolerance() {
    if common::gpu_or_skip("gpu_tensor_core_matmuls_are_within_bf16_tolerance") {
        check_tensor_cores(|g, params, opts| {
            let mut ex = egret::gpu::executor(g, params, opts)?;
            Ok(Box::new(move |i: &HashMap<String, HostValue>| {
                outputs_f32(ex.run(i).unwrap())
            }))
        });
    }
}

/// Tensor-core matmuls on the SIMT simulator: the fragment layouts and staging are right.
#[test]
fn simulated_tensor_core_matmuls_are_within_bf16_tolerance() {
    check_tensor_cores(|g, params, opts| {
        let mut ex = egret::gpu::simt_executor(g, params, opts)?;
        Ok(Box::new(move |i: &HashMap<String, HostValue>| {
            outputs_f32(ex.run(i).unwrap())
        }))
    });
}

/// Tensor-core matmuls at shapes with enough 128 × 128 tiles for the tensor-core kernel: its
/// four-float and element-wise staging (unit-stride and transposed operands, a row stride
/// that is not a multiple of 4), and tails in m, n and k (k shorter than one step, too).
const EXACT_MMA_CASES: &[(&str, &str)] = &[
    (
        "batched-tails",
        r#"
  %x = input "x" : f32[2, 1000, 40]
  %w = param "w" : f32[40, 1100]
  %y = matmul(%x, %w) : f32[2, 1000, 1100]
  output "y" = %y"#,
    ),
    (
        "transposed",
        r#"
  %x = input "x" : f32[70, 1500]
  %xt = permute[perm=[1, 0]](%x) : f32[1500, 70]
  %w = param "w" : f32[1500, 70]
  %wt = permute[perm=[1, 0]](%w) : f32[70, 1500]
  %y = matmul(%xt, %wt) : f32[1500, 1500]
  output "y" = %y"#,
    ),
    (
        "odd-row-stride-short-k",
        r#"
  %x = input "x" : f32[2, 1000, 42]
  %w = param "w" : f32[42, 1100]
  %y = matmul(%x, %w) : f32[2, 1000, 1100]
  %u = input "u" : f32[2100, 20]
  %v = param "v" : f32[20, 1100]
  %z = matmul(%u, %v) : f32[2100, 1100]
  output "y" = %y
  output "z" = %z"#,
    ),
    (
        // With tensor cores, `A` computed by an elementwise kernel (stored bf16 by it) and a
        // weight (a bf16 copy at load), both with rows of a multiple of 8 elements: the
        // `cp.async` ring, with tails in m, n and k and more k steps than ring stages.
        "bf16-ring-tails",
        r#"
  %x = input "x" : f32[2, 1000, 136]
  %a = neg(%x) : f32[2, 1000, 136]
  %w = param "w" : f32[136, 1104]
  %y = matmul(%a, %w) : f32[2, 1000, 1104]
  output "y" = %y"#,
    ),
    (
        // The same with more k steps than the `wgmma` ring's stages (9 slices of 64, the
        // last 8 long), so that every stage is refilled.
        "bf16-ring-long-k",
        r#"
  %x = input "x" : f32[2, 900, 520]
  %a = neg(%x) : f32[2, 900, 520]
  %w = param "w" : f32[520, 1104]
  %y = matmul(%a, %w) : f32[2, 900, 1104]
  output "y" = %y"#,
    ),
    (
        "residual-tails",
        r#"
  %x = input "x" : f32[2, 1000, 40]
  %w = param "w" : f32[40, 1100]
  %y = matmul(%x, %w) : f32[2, 1000, 1100]
  %r = input "r" : f32[2, 1000, 1100]
  %z = add(%r, %y) : f32[2, 1000, 1100]
  output "z" = %z"#,
    ),
];

/// Matmuls of more than 32 rows and fewer than 132 tiles of 128 × 128 but at least 64 of
/// 64 × 64, which take the 64 × 64 tiles of `gpu_tiled_matmul` (with tensor cores too, their
/// operands rounded to bf16): tails in m, n and k, more tiles than simulated blocks, a
/// transposed (element-wise staged) and an unaligned-row operand, a residual.
const EXACT_MID_CASES: &[(&str, &str)] = &[
    (
        "mid-batched-tails-residual",
        r#"
  %x = input "x" : f32[2, 300, 40]
  %w = param "w" : f32[40, 500]
  %y = matmul(%x, %w) : f32[2, 300, 500]
  %r = input "r" : f32[2, 300, 500]
  %z = add(%r, %y) : f32[2, 300, 500]
  output "z" = %z"#,
    ),
    (
        "mid-transposed-odd-stride",
        r#"
  %x = input "x" : f32[30, 200]
  %xt = permute[perm=[1, 0]](%x) : f32[200, 30]
  %w = param "w" : f32[30, 1100]
  %y = matmul(%xt, %w) : f32[200, 1100]
  %u = input "u" : f32[2, 200, 42]
  %v = param "v" : f32[42, 520]
  %z = matmul(%u, %v) : f32[2, 200, 520]
  output "y" = %y
  output "z" = %z"#,
    ),
];

/// On inputs that bf16 holds exactly (multiples of 1/8 up to 1 in size), whose products and
/// sums f32 holds exactly too, the tensor-core matmuls must give the interpreter's results
/// bit for bit: any misplaced fragment, staged element or k step shows.
#[test]
fn simulated_tensor_core_matmuls_are_exact_on_bf16_exact_inputs() {
    for (name, body) in EXACT_MMA_CASES.iter().chain(EXACT_MID_CASES) {
        let (want, got) = interp_and_simulated(name, body, 0x5eed, (true, true), |rng| {
            (rng.next() % 17) as f32 / 8.0 - 1.0
        });
        for (out, w) in &want {
            let bad = w.iter().zip(&got[out]).filter(|(a, b)| a != b).count();
            assert_eq!(bad, 0, "{name} {out}: {bad} of {} elements differ", w.len());
        }
    }
}

/// The same on sm_90a, whose tensor-core matmuls take `wgmma` where both operands are bf16
/// in memory (`bf16-ring-tails`), `mma.sync` elsewhere: bit for bit the interpreter's, so a
/// misplaced core matrix, descriptor offset or accumulator shows; with the ring filled by
/// `cp.async` and by the tensor memory accelerator (`tma`: its boxes, swizzle, zero-filled
/// edges and barrier phases).
#[test]
fn simulated_wgmma_matmuls_are_exact_on_bf16_exact_inputs() {
    for tma in [false, true] {
        let opts = PtxOptions {
            arch: "sm_90a".into(),
            tensor_cores: true,
            tma,
        };
        for (name, body) in EXACT_MMA_CASES.iter().chain(EXACT_MID_CASES) {
            let (want, got) = interp_and_simulated_with(name, body, 0x5eed, true, &opts, |rng| {
                (rng.next() % 17) as f32 / 8.0 - 1.0
            });
            for (out, w) in &want {
                let bad = w.iter().zip(&got[out]).filter(|(a, b)| a != b).count();
                assert_eq!(
                    bad,
                    0,
                    "tma {tma}: {name} {out}: {bad} of {} elements differ",
                    w.len()
                );
            }
        }
    }
}

/// Graph inputs declared bf16 and used only by a matmul are stored bf16 with tensor cores
/// (the executor rounds the f32 values it is given): the matmul reads them through the
/// `cp.async` ring (`mma.sync`), or `wgmma` on sm_90a. Its bf16 output, which nothing else
/// reads, is stored bf16 too (`stored_bf16_outputs`): on exactly summable inputs, bit for bit
/// the interpreter's product rounded to bf16. A bf16 result that another op reads stays f32.
#[test]
fn simulated_bf16_inputs_feed_tensor_core_matmuls() {
    // (`y` on the large tiles, `y2` on 64 × 64 tiles, `y3` on `gpu_gemv`)
    let body = r#"
  %a = input "a" : bf16[2, 1000, 136]
  %w = input "w" : bf16[136, 1104]
  %y = matmul(%a, %w) : bf16[2, 1000, 1104]
  %b = input "b" : bf16[300, 136]
  %y2 = matmul(%b, %w) : bf16[300, 1104]
  %c = input "c" : bf16[20, 136]
  %y3 = matmul(%c, %w) : bf16[20, 1104]
  output "y" = %y
  output "y2" = %y2
  output "y3" = %y3"#;
    for (arch, tma) in [("sm_80", false), ("sm_90a", false), ("sm_90a", true)] {
        let opts = PtxOptions {
            arch: arch.into(),
            tensor_cores: true,
            tma,
        };
        let (want, got) = interp_and_simulated_with("bf16-inputs", body, 3, false, &opts, |rng| {
            (rng.next() % 17) as f32 / 8.0 - 1.0
        });
        for out in ["y", "y2", "y3"] {
            let bad = want[out]
                .iter()
                .zip(&got[out])
                .filter(|(a, b)| a != b)
                .count();
            assert_eq!(
                bad,
                0,
                "{arch} (tma {tma}) {out}: {bad} of {} elements differ",
                want[out].len()
            );
        }
    }
    let stored = |body: &str| {
        let prog = egret_backends::schedule::schedule_with(
            &graph("bf16-out", body),
            egret_backends::ptx::schedule_options(&PtxOptions {
                tensor_cores: true,
                ..PtxOptions::default()
            }),
        )
        .unwrap();
        let out = prog.outputs.iter().find(|(n, _)| n == "y").unwrap().1;
        prog.buffers[out as usize].elem
    };
    assert_eq!(stored(body), ElemType::BF16);
    let read_again =
        format!("{body}\n  %z = add(%y, %y) : bf16[2, 1000, 1104]\n  output \"z\" = %z");
    assert_eq!(stored(&read_again), ElemType::F32);
}

/// The f32 tiled matmul (`gpu_tiled_matmul`, no tensor cores) at the same shapes and on the
/// same exactly-summable inputs: bit for bit the interpreter's, so a misplaced element of its
/// four-float staging or shared-memory quads shows.
#[test]
fn simulated_tiled_matmuls_are_exact_on_bf16_exact_inputs() {
    for (name, body) in EXACT_MMA_CASES.iter().chain(EXACT_MID_CASES) {
        let (want, got) = interp_and_simulated(name, body, 0x5eed, (true, false), |rng| {
            (rng.next() % 17) as f32 / 8.0 - 1.0
        });
        for (out, w) in &want {
            let bad = w.iter().zip(&got[out]).filter(|(a, b)| a != b).count();
            assert_eq!(bad, 0, "{name} {out}: {bad} of {} elements differ", w.len());
        }
    }
}

/// The tiled matmuls' fused RMSNorm (row scales, the norm weight on `A`'s columns as they
/// load) with enough tiles for the large-tile kernels, and with few enough for the 64 × 64
/// tiles (whose rows take four threads each for the scales), f32 and on tensor cores: within
/// 1e-5 and 1e-2 relative L2 of the interpreter's.
#[test]
fn simulated_tiled_rms_norm_matmuls_match_the_interpreter() {
    for (m, n) in [(1000, 2100), (300, 1000)] {
        let body = format!(
            r#"
  %x = input "x" : f32[{m}, 136]
  %g = param "g" : f32[136]
  %w = param "w" : f32[136, {n}]
  %y = rms_norm_matmul[eps=1e-5](%x, %g, %w) : f32[{m}, {n}]
  output "y" = %y"#
        );
        for (tc, tol) in [(false, 1e-5), (true, 1e-2)] {
            let (want, got) =
                interp_and_simulated("tiled-norm", &body, 7, (true, tc), |rng| rng.uniform());
            let rel = rel_l2(&got["y"], &want["y"]);
            assert!(rel <= tol, "{m}x{n}, tensor cores {tc}: relative L2 {rel}");
        }
    }
}

/// Attention on tensor cores (prompts of at least 64 query rows, head sizes 16 to 128):
/// grouped heads, query rows past a 128-row tile, keys past a 64-key step, a KV cache
/// (positions offset by the past), strided (permuted) operands, differing query and value
/// head sizes. Within bf16 tolerance (1e-2 relative L2) of the interpreter's.
const MMA_ATTENTION_CASES: &[(&str, &str)] = &[
    (
        "gqa-prefill-d64",
        r#"
  %q = input "q" : f32[1, 4, 150, 64]
  %k = input "k" : f32[1, 2, 150, 64]
  %v = input "v" : f32[1, 2, 150, 64]
  %pos = iota[axis=1] : i64[1, 150]
  %o = fused_attention[scale=0.125](%q, %k, %v, %pos) : f32[1, 4, 150, 64]
  output "o" = %o"#,
    ),
    (
        "cache-d128-dv32-batch2",
        r#"
  %q = input "q" : f32[2, 2, 70, 128]
  %k = input "k" : f32[2, 1, 200, 128]
  %v = input "v" : f32[2, 1, 200, 32]
  %i = iota[axis=1] : i64[2, 70]
  %past = const[value=130.0] : i64[2, 70]
  %pos = add(%i, %past) : i64[2, 70]
  %o = fused_attention[scale=0.09](%q, %k, %v, %pos) : f32[2, 2, 70, 32]
  output "o" = %o"#,
    ),
    (
        // Keys and values sliced from wider rows at an offset of one element: unit stride,
        // strides multiples of 4, but rows not 16-byte aligned (element-wise staging).
        "offset-views-d64",
        r#"
  %q = input "q" : f32[1, 2, 100, 64]
  %kw = input "kw" : f32[1, 2, 100, 68]
  %k = slice[axis=3, start=1, end=65](%kw) : f32[1, 2, 100, 64]
  %vw = input "vw" : f32[1, 2, 100, 68]
  %v = slice[axis=3, start=3, end=67](%vw) : f32[1, 2, 100, 64]
  %pos = iota[axis=1] : i64[1, 100]
  %o = fused_attention[scale=0.125](%q, %k, %v, %pos) : f32[1, 2, 100, 64]
  output "o" = %o"#,
    ),
    (
        "permuted-d16",
        r#"
  %x = input "x" : f32[1, 300, 3, 16]
  %q = permute[perm=[0, 2, 1, 3]](%x) : f32[1, 3, 300, 16]
  %y = input "y" : f32[1, 300, 3, 16]
  %k = permute[perm=[0, 2, 1, 3]](%y) : f32[1, 3, 300, 16]
  %z = input "z" : f32[1, 300, 3, 16]
  %v = permute[perm=[0, 2, 1, 3]](%z) : f32[1, 3, 300, 16]
  %pos = iota[axis=1] : i64[1, 300]
  %o = fused_attention[scale=0.25](%q, %k, %v, %pos) : f32[1, 3, 300, 16]
  output "o" = %o"#,
    ),
];

#[test]
fn simulated_tensor_core_attention_is_within_bf16_tolerance() {
    for (name, body) in MMA_ATTENTION_CASES {
        let (want, got) =
            interp_and_simulated(name, body, 0xa77e, (false, true), |rng| rng.uniform() * 2.0);
        for (out, w) in &want {
            let rel = rel_l2(&got[out], w);
            assert!(rel <= 1e-2, "{name} {out}: relative L2 {rel}");
            eprintln!("{name} {out}: relative L2 {rel:.2e}");
        }
    }
}

/// Attention on query, keys and values declared bf16, stored bf16 with tensor cores (the
/// executor rounds the values it is given): keys and values through the `cp.async` ring,
/// with tails in the 64-key steps and 128-row tiles, more steps than ring stages, grouped
/// heads, positions offset by a cache, differing head sizes, and tiles of fewer 16-byte
/// chunks than threads (head size 16); and a short prompt, on the warp-per-row kernel. The
/// flag: on sm_90a both products run on `wgmma` (head sizes multiples of 64), which the
/// test checks in the PTX it also assembles.
const BF16_ATTENTION_CASES: &[(&str, bool, &str)] = &[
    (
        // (three query rows: the warp-per-row kernel, its bf16 output stored bf16)
        "bf16-decode-d64",
        false,
        r#"
  %q = input "q" : bf16[1, 4, 3, 64]
  %k = input "k" : bf16[1, 2, 40, 64]
  %v = input "v" : bf16[1, 2, 40, 64]
  %i = iota[axis=1] : i64[1, 3]
  %past = const[value=37.0] : i64[1, 3]
  %pos = add(%i, %past) : i64[1, 3]
  %o = fused_attention[scale=0.125](%q, %k, %v, %pos) : bf16[1, 4, 3, 64]
  output "o" = %o"#,
    ),
    (
        "bf16-gqa-prefill-d64",
        true,
        r#"
  %q = input "q" : bf16[1, 4, 300, 64]
  %k = input "k" : bf16[1, 2, 300, 64]
  %v = input "v" : bf16[1, 2, 300, 64]
  %pos = iota[axis=1] : i64[1, 300]
  %o = fused_attention[scale=0.125](%q, %k, %v, %pos) : bf16[1, 4, 300, 64]
  output "o" = %o"#,
    ),
    (
        "bf16-cache-d128-dv32-batch2",
        false,
        r#"
  %q = input "q" : bf16[2, 2, 70, 128]
  %k = input "k" : bf16[2, 1, 200, 128]
  %v = input "v" : bf16[2, 1, 200, 32]
  %i = iota[axis=1] : i64[2, 70]
  %past = const[value=130.0] : i64[2, 70]
  %pos = add(%i, %past) : i64[2, 70]
  %o = fused_attention[scale=0.09](%q, %k, %v, %pos) : bf16[2, 2, 70, 32]
  output "o" = %o"#,
    ),
    (
        "bf16-cache-d128-batch2",
        true,
        r#"
  %q = input "q" : bf16[2, 4, 90, 128]
  %k = input "k" : bf16[2, 2, 250, 128]
  %v = input "v" : bf16[2, 2, 250, 128]
  %i = iota[axis=1] : i64[2, 90]
  %past = const[value=160.0] : i64[2, 90]
  %pos = add(%i, %past) : i64[2, 90]
  %o = fused_attention[scale=0.088](%q, %k, %v, %pos) : bf16[2, 4, 90, 128]
  output "o" = %o"#,
    ),
    (
        "bf16-d64-dv128",
        true,
        r#"
  %q = input "q" : bf16[1, 2, 200, 64]
  %k = input "k" : bf16[1, 2, 200, 64]
  %v = input "v" : bf16[1, 2, 200, 128]
  %pos = iota[axis=1] : i64[1, 200]
  %o = fused_attention[scale=0.125](%q, %k, %v, %pos) : bf16[1, 2, 200, 128]
  output "o" = %o"#,
    ),
    (
        "bf16-d16",
        false,
        r#"
  %q = input "q" : bf16[1, 3, 300, 16]
  %k = input "k" : bf16[1, 3, 300, 16]
  %v = input "v" : bf16[1, 3, 300, 16]
  %pos = iota[axis=1] : i64[1, 300]
  %o = fused_attention[scale=0.25](%q, %k, %v, %pos) : bf16[1, 3, 300, 16]
  output "o" = %o"#,
    ),
    (
        "bf16-short-prompt",
        false,
        r#"
  %q = input "q" : bf16[1, 4, 20, 64]
  %k = input "k" : bf16[1, 2, 20, 64]
  %v = input "v" : bf16[1, 2, 20, 64]
  %pos = iota[axis=1] : i64[1, 20]
  %o = fused_attention[scale=0.125](%q, %k, %v, %pos) : bf16[1, 4, 20, 64]
  output "o" = %o"#,
    ),
];

#[test]
fn simulated_bf16_inputs_feed_tensor_core_attention() {
    for arch in ["sm_80", "sm_90a"] {
        let opts = PtxOptions {
            arch: arch.into(),
            tensor_cores: true,
            tma: false,
        };
        for (name, wgmma, body) in BF16_ATTENTION_CASES {
            let (want, got) = interp_and_simulated_with(name, body, 0xa77e, false, &opts, |rng| {
                rng.uniform() * 2.0
            });
            let rel = rel_l2(&got["o"], &want["o"]);
            assert!(rel <= 1e-2, "{arch} {name}: relative L2 {rel}");
            eprintln!("{arch} {name}: relative L2 {rel:.2e}");
            let (ptx, _) = egret::gpu::compile_graphs(&[&graph(name, body)], &opts, false)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let on_wgmma = ptx.contains("wgmma.mma_async");
            assert_eq!(on_wgmma, *wgmma && arch == "sm_90a", "{arch} {name}");
            common::assemble_ptx(name, &ptx, arch);
        }
    }
}

/// Attention's backward on tensor cores (`mma_attn_bwd`) in the simulator, against the
/// interpreter. Operands exact in bf16 (sixteenths, and a scale whose product with log2 e is
/// 1/4), so what differs is the kernels' own rounding of `P` and `dS` to bf16: given the
/// interpreter's log-sum-exp and `delta`, `dq`, `dk` and `dv` within 5e-3 relative L2; with
/// all computed in the simulator (the forward's bf16 probabilities make its `delta` differ
/// from the backward's), within 2e-2, and the log-sum-exp within 1e-6 and infinite (a row
/// that sees no key) where the interpreter's is. Several 128-row tiles on both sides with
/// tails (T 150 queries, S 200 keys), GQA (4 heads on 2), the query strided (tokens first,
/// permuted) and the values a slice of a wider tensor, a cache offset (batch 0: causal from
/// key 50) and positions in no order (batch 1: rows that see few keys next to rows that see
/// all, two that see none, one past the last key); head sizes `(d, dv)` of 64 and 32, of 16
/// and 128, and of 128 and 128 (the device check's). Every attention kernel of the PTX runs
/// `mma`, and the PTX assembles for sm_80 and sm_90. The f32 kernels (attention's warp
/// backward, its gradients a block a row) match too, within 1e-5, for the first two pairs of
/// head sizes.
#[test]
fn simulated_tensor_core_attention_backward_matches_the_interpreter() {
    let (t, s) = (150usize, 200usize);
    // (the scale times log2 e is 1/4: the pre-scaled operands stay exact in bf16)
    let sc = 0.25 / std::f64::consts::LOG2_E;
    for (d, dv) in [(64usize, 32usize), (16, 128), (128, 128)] {
        let w = 2 * dv + 8;
        // The operands, and the forward quantities the gradients read (`delta` from the
        // output), given or computed.
        let operands = format!(
            "
  %qt = input \"q\" : f32[2, {t}, 4, {d}]
  %q = permute[perm=[0, 2, 1, 3]](%qt) : f32[2, 4, {t}, {d}]
  %k = input \"k\" : f32[2, 2, {s}, {d}]
  %kv = input \"v\" : f32[2, 2, {s}, {w}]
  %v = slice[axis=3, start=8, end={e}](%kv) : f32[2, 2, {s}, {dv}]
  %pos = input \"pos\" : i64[2, {t}]
  %do = input \"do\" : f32[2, 4, {t}, {dv}]",
            e = 8 + dv
        );
        let forward = format!(
            "
  %o = fused_attention[scale={sc}](%q, %k, %v, %pos) : f32[2, 4, {t}, {dv}]
  %lse = attention_lse[scale={sc}](%q, %k, %pos) : f32[2, 4, {t}]
  %m = mul(%do, %o) : f32[2, 4, {t}, {dv}]
  %r = reduce_sum[axis=3](%m) : f32[2, 4, {t}, 1]
  %delta = reshape(%r) : f32[2, 4, {t}]
  output \"lse\" = %lse
  output \"delta\" = %delta"
        );
        let given = format!(
            "
  %lse = input \"lse\" : f32[2, 4, {t}]
  %delta = input \"delta\" : f32[2, 4, {t}]"
        );
        let grads = format!(
            "
  %dq = attention_grad_q[scale={sc}](%q, %k, %v, %pos, %do, %lse, %delta) : f32[2, 4, {t}, {d}]
  %dk = attention_grad_k[scale={sc}](%q, %k, %v, %pos, %do, %lse, %delta) : f32[2, 2, {s}, {d}]
  %dv = attention_grad_v[scale={sc}](%q, %k, %v, %pos, %do, %lse, %delta) : f32[2, 2, {s}, {dv}]
  output \"dq\" = %dq
  output \"dk\" = %dk
  output \"dv\" = %dv"
        );
        let full = graph("full", &format!("{operands}{forward}{grads}"));
        let backward = graph("backward", &format!("{operands}{given}{grads}"));
        let mut rng = Rng(0xbac4 + d as u64);
        let mut f32s = |shape: Vec<usize>| {
            let n = shape.iter().product();
            let v = (0..n).map(|_| (rng.uniform() * 32.0).round() / 16.0 - 1.0);
            Tensor::from_f32(shape, v.collect()).unwrap()
        };
        let pos: Vec<i64> = (0..t as i64)
            .map(|i| i + 50)
            .chain((0..t).map(|i| match i {
                3 => -1,
                5 => s as i64 + 7,
                9 => -4,
                _ => ((i * 37) % s) as i64,
            }))
            .collect();
        let mut inputs = HashMap::from([
            ("q".to_string(), f32s(vec![2, t, 4, d])),
            ("k".to_string(), f32s(vec![2, 2, s, d])),
            ("v".to_string(), f32s(vec![2, 2, s, w])),
            ("do".to_string(), f32s(vec![2, 4, t, dv])),
            (
                "pos".to_string(),
                Tensor::from_i64(vec![2, t], pos).unwrap(),
            ),
        ]);
        let want_full = run_interp(&full, &inputs, &HashMap::new());
        for x in ["lse", "delta"] {
            let v = want_full[x].clone();
            inputs.insert(x.into(), Tensor::from_f32(vec![2, 4, t], v).unwrap());
        }
        let want = run_interp(&backward, &inputs, &HashMap::new());
        // (the PTX targets with tensor cores, then the f32 kernels: attention's warp
        // backward, whose gradient blocks get pairs for all their warps at these lengths;
        // head sizes of 16 to 128 lanes' elements without the third pair of sizes)
        let f32_too = d < 128;
        for (arch, tensor_cores) in [("sm_80", true), ("sm_90", true), ("sm_90", false)] {
            if !tensor_cores && !f32_too {
                continue;
            }
            let opts = PtxOptions {
                arch: arch.into(),
                tensor_cores,
                tma: false,
            };
            let tols = if tensor_cores {
                [2e-2, 5e-3]
            } else {
                [1e-5, 1e-5]
            };
            for (g, want, tol) in [(&full, &want_full, tols[0]), (&backward, &want, tols[1])] {
                let mut ex = egret::gpu::simt_executor(g, &HashMap::new(), &opts).unwrap();
                let got = outputs_f32(ex.run(&host_inputs(&inputs)).unwrap());
                for (out, w) in want.iter().filter(|(k, _)| *k != "delta") {
                    let x = &got[out];
                    let what = format!("{arch} {tensor_cores} d {d} dv {dv} {} {out}", g.name);
                    let inf: Vec<usize> = (0..w.len()).filter(|&i| w[i].is_infinite()).collect();
                    let got_inf: Vec<usize> =
                        (0..x.len()).filter(|&i| x[i].is_infinite()).collect();
                    assert_eq!(got_inf, inf, "{what}: infinite entries");
                    let finite = |v: &[f32]| -> Vec<f32> {
                        v.iter().copied().filter(|a| a.is_finite()).collect()
                    };
                    let (fw, fx) = (finite(w), finite(x));
                    assert_eq!(
                        fw.len() + inf.len(),
                        w.len(),
                        "{what}: NaN in the interpreter's"
                    );
                    assert_eq!(fx.len(), fw.len(), "{what}: NaN");
                    let rel = rel_l2(&fx, &fw);
                    eprintln!("{what}: relative L2 {rel:.2e}");
                    let tol = if out == "lse" { 1e-6 } else { tol };
                    assert!(rel <= tol, "{what}: relative L2 {rel}");
                }
            }
            if !tensor_cores {
                continue;
            }
            let (ptx, _) = egret::gpu::compile_graphs(&[&full], &opts, false).unwrap();
            let on_mma = ptx
                .split(".entry")
                .filter(|k| k.contains("mma.sync"))
                .count();
            assert_eq!(
                on_mma, 5,
                "{arch}: attention, its lse and three gradients on mma"
            );
            common::assemble_ptx("attention-backward-mma", &ptx, arch);
        }
    }
}

/// Sibling elementwise kernels merge (`schedule::merge_elementwise`) where each element
/// reads what its group stored there: in the case `elementwise-siblings`, the AdamW-like
/// update's three outputs share one kernel (with the token shift's stored product, which
/// reads none of theirs), while the shift itself, which reads that product a column back
/// through a concat, keeps a kernel of its own, and so do an output read transposed and its
/// reader.
#[test]
fn sibling_elementwise_kernels_merge_only_where_each_element_reads_its_own() {
    let name = "elementwise-siblings";
    let (_, body) = CASES.iter().find(|(n, _)| *n == name).expect("the case");
    let prog =
        egret_backends::schedule::schedule_with(&graph(name, body), Default::default()).unwrap();
    let mut kernels: Vec<String> = prog.kernels.iter().map(|k| k.describe()).collect();
    kernels.sort();
    assert_eq!(
        kernels,
        [
            "elementwise [9, 9]",
            "elementwise [9, 9]",
            "elementwise [N, 37]",
            "elementwise [N, 37] (4 outputs)",
        ]
    );
}

#[test]
fn interpreter_matches_itself_trivially_and_cases_parse() {
    check("interp", run_interp);
}
