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

const SIZES: &[i64] = &[1, 3, 17, 63, 65, 1000];
const TOLERANCE: f32 = 1e-5;

/// Each case: a name and IR text over the symbol `N`. Inputs are uniform in [-1, 1]
/// (integers in [0, 4)); ops with restricted domains take `abs(x) + 1` first.
const CASES: &[(&str, &str)] = &[
    (
        "unary",
        r#"
  %x = input "x" : f32[N, 3]
  %a = abs(%x) : f32[N, 3]
  %one = const[value=1.0] : f32[N, 3]
  %p = add(%a, %one) : f32[N, 3]
  %e = exp(%x) : f32[N, 3]
  %l = log(%p) : f32[N, 3]
  %s = sqrt(%a) : f32[N, 3]
  %r = rsqrt(%p) : f32[N, 3]
  %c = recip(%p) : f32[N, 3]
  %g = sigmoid(%x) : f32[N, 3]
  %t = tanh(%x) : f32[N, 3]
  %si = sin(%x) : f32[N, 3]
  %co = cos(%x) : f32[N, 3]
  %n = neg(%x) : f32[N, 3]
  %u = silu(%x) : f32[N, 3]
  %y = concat[axis=1](%e, %l, %s, %r, %c, %g, %t, %si, %co, %n, %u) : f32[N, 33]
  output "y" = %y"#,
    ),
    (
        "binary-compare-select",
        r#"
  %x = input "x" : f32[N, 5]
  %z = input "z" : f32[N, 5]
  %a = abs(%x) : f32[N, 5]
  %one = const[value=1.0] : f32[N, 5]
  %p = add(%a, %one) : f32[N, 5]
  %s = sub(%x, %z) : f32[N, 5]
  %m = mul(%x, %z) : f32[N, 5]
  %d = div(%z, %p) : f32[N, 5]
  %mx = max(%x, %z) : f32[N, 5]
  %mn = min(%x, %z) : f32[N, 5]
  %pw = pow(%p, %z) : f32[N, 5]
  %lt = lt(%x, %z) : bool[N, 5]
  %sel = select(%lt, %x, %z) : f32[N, 5]
  %ge = ge(%x, %z) : bool[N, 5]
  %sel2 = select(%ge, %s, %m) : f32[N, 5]
  %y = concat[axis=1](%s, %m, %d, %mx, %mn, %pw, %sel, %sel2) : f32[N, 40]
  output "y" = %y"#,
    ),
    (
        "casts-iota-const",
        r#"
  %x = input "x" : f32[N, 4]
  %k = const[value=7.5] : f32[N, 4]
  %xk = mul(%x, %k) : f32[N, 4]
  %i = cast(%xk) : i64[N, 4]
  %f = cast(%i) : f32[N, 4]
  %b = cast(%xk) : bf16[N, 4]
  %bf = cast(%b) : f32[N, 4]
  %h = cast(%xk) : f16[N, 4]
  %hf = cast(%h) : f32[N, 4]
  %io = iota[axis=0] : f32[N, 4]
  %y = concat[axis=1](%f, %bf, %hf, %io) : f32[N, 16]
  output "y" = %y"#,
    ),
    (
        "reductions",
        r#"
  %x = input "x" : f32[N, 7]
  %s0 = reduce_sum[axis=0](%x) : f32[1, 7]
  %m0 = reduce_max[axis=0](%x) : f32[1, 7]
  %a0 = reduce_mean[axis=0](%x) : f32[1, 7]
  %s1 = reduce_sum[axis=1](%x) : f32[N, 1]
  %m1 = reduce_max[axis=1](%x) : f32[N, 1]
  %a1 = reduce_mean[axis=1](%x) : f32[N, 1]
  %r0 = concat[axis=0](%s0, %m0, %a0) : f32[3, 7]
  %r1 = concat[axis=1](%s1, %m1, %a1) : f32[N, 3]
  output "r0" = %r0
  output "r1" = %r1"#,
    ),
    (
        "softmax",
        r#"
  %x = input "x" : f32[3, N]
  %a = softmax[axis=1](%x) : f32[3, N]
  %b = softmax[axis=0](%x) : f32[3, N]
  output "a" = %a
  output "b" = %b"#,
    ),
    (
        "matmul-weights",
        r#"
  %x = input "x" : f32[N, 17]
  %w = param "w" : f32[9, 17]
  %wt = permute[perm=[1, 0]](%w) : f32[17, 9]
  %y = matmul(%x, %wt) : f32[N, 9]
  %v = param "v" : f32[9, 5]
  %z = matmul(%y, %v) : f32[N, 5]
  output "z" = %z"#,
    ),
    (
        "matmul-batched",
        r#"
  %a = input "a" : f32[2, N, 5]
  %b = input "b" : f32[2, 5, N]
  %y = matmul(%a, %b) : f32[2, N, N]
  output "y" = %y"#,
    ),
    (
        "matmul-long-k",
        r#"
  %a = input "a" : f32[3, N]
  %b = input "b" : f32[N, 4]
  %y = matmul(%a, %b) : f32[3, 4]
  output "y" = %y"#,
    ),
    (
        "rms-norm-swiglu",
        r#"
  %x = input "x" : f32[N, 6]
  %g = param "g" : f32[6]
  %n = rms_norm[eps=1e-5](%x, %g) : f32[N, 6]
  %w = param "w" : f32[6, 8]
  %m = rms_norm_matmul[eps=1e-6](%x, %g, %w) : f32[N, 8]
  %u = input "u" : f32[N, 8]
  %s = swiglu(%m, %u) : f32[N, 8]
  output "n" = %n
  output "s" = %s"#,
    ),
    (
        "attention-gqa",
        r#"
  %q = input "q" : f32[1, 4, N, 8]
  %k = input "k" : f32[1, 2, N, 8]
  %v = input "v" : f32[1, 2, N, 8]
  %pos = iota[axis=1] : i64[1, N]
  %o = fused_attention[scale=0.35](%q, %k, %v, %pos) : f32[1, 4, N, 8]
  output "o" = %o"#,
    ),
    (
        // Few query rows over many keys: the split-KV path (at N = 1000, 7 splits, the
        // first row's later splits see no visible key at all).
        "attention-decode",
        r#"
  %q = input "q" : f32[1, 4, 2, 8]
  %k = input "k" : f32[1, 2, N, 8]
  %v = input "v" : f32[1, 2, N, 8]
  %i = iota[axis=1] : i64[1, 2]
  %a = const[value=600.0] : i64[1, 2]
  %b = const[value=300.0] : i64[1, 2]
  %m = mul(%i, %a) : i64[1, 2]
  %pos = add(%m, %b) : i64[1, 2]
  %o = fused_attention[scale=0.35](%q, %k, %v, %pos) : f32[1, 4, 2, 8]
  output "o" = %o"#,
    ),
    (
        "views",
        r#"
  %x = input "x" : f32[2, N, 3]
  %p = permute[perm=[2, 0, 1]](%x) : f32[3, 2, N]
  %s = slice[axis=0, start=1, end=3](%p) : f32[2, 2, N]
  %r = reshape(%s) : f32[4, N]
  %c = input "c" : f32[1, N]
  %b = broadcast(%c) : f32[4, N]
  %y = add(%r, %b) : f32[4, N]
  %t = permute[perm=[1, 0]](%y) : f32[N, 4]
  output "t" = %t"#,
    ),
    (
        "gather",
        r#"
  %t = input "table" : f32[4, N]
  %i = input "ids" : i64[N]
  %y = gather[axis=0](%t, %i) : f32[N, N]
  output "y" = %y"#,
    ),
];

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

/// Every case's PTX (which does not depend on `N`) assembles for sm_80 and sm_90.
#[test]
fn ptx_of_every_case_assembles() {
    for (name, body) in CASES {
        let g = graph(name, body);
        for arch in ["sm_80", "sm_90"] {
            let (ptx, _) =
                egret::gpu::compile_graphs(&[&g], &PtxOptions { arch: arch.into() }, false)
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
            common::assemble_ptx(name, &ptx, arch);
        }
    }
}

#[test]
fn interpreter_matches_itself_trivially_and_cases_parse() {
    check("interp", run_interp);
}
