//! Text filetests: every `tests/filetests/**/*.ir` file is a header, then IR.
//!
//! ```text
//! ; pipeline: fuse                 passes to run (`default`, `none`, or a list)
//! ; fires: attention               a rule that must fire (repeatable)
//! ; check: fused_attention[        text the output IR must contain (repeatable)
//! ; check-not: softmax             text it must not contain (repeatable)
//! ```
//! Besides the checks, the interpreter runs the input and the output on the same random
//! inputs and parameters (symbols bound to small sizes) and the results must agree within
//! 1e-4 relative to the largest magnitude: every rewrite is checked numerically.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use egret_ir::{DType, Graph, Interpreter, Op, Tensor};
use egret_passes::{pipeline, PassCx, PassManager};

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
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// Random values for every input and param of `g` (ints in 0..4: valid indices/positions).
pub fn random_bindings(g: &Graph, seed: u64) -> (HashMap<String, Tensor>, HashMap<String, Tensor>) {
    let mut rng = Rng(seed | 1);
    let bind: HashMap<String, i64> = g
        .nodes
        .iter()
        .flat_map(|n| n.ty.shape.dims().iter().flat_map(|d| d.symbols().map(str::to_string).collect::<Vec<_>>()))
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
            DType::I32 | DType::I64 => Tensor::from_i64(shape, (0..numel).map(|_| (rng.next() % 4) as i64).collect()).unwrap(),
            DType::Bool => Tensor::from_bool(shape, (0..numel).map(|_| rng.next() % 2 == 0).collect()).unwrap(),
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
        let scale = x.iter().filter(|v| v.is_finite()).fold(1f32, |m, v| m.max(v.abs()));
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

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "ir") {
            out.push(p);
        }
    }
}

fn run_file(path: &Path) -> Result<(), String> {
    let src = std::fs::read_to_string(path).unwrap();
    let mut pipe = "default".to_string();
    let (mut fires, mut checks, mut nots) = (vec![], vec![], vec![]);
    for line in src.lines() {
        let Some(rest) = line.strip_prefix(';') else { continue };
        let rest = rest.trim();
        if let Some(v) = rest.strip_prefix("pipeline:") {
            pipe = v.trim().to_string();
        } else if let Some(v) = rest.strip_prefix("fires:") {
            fires.push(v.trim().to_string());
        } else if let Some(v) = rest.strip_prefix("check-not:") {
            nots.push(v.trim().to_string());
        } else if let Some(v) = rest.strip_prefix("check:") {
            checks.push(v.trim().to_string());
        }
    }
    let input = egret_ir::parse(&src).map_err(|e| format!("parse: {e}"))?;
    egret_ir::verify(&input).map_err(|e| format!("input: {e}"))?;
    let mut g = input.clone();
    let mut cx = PassCx::default();
    PassManager::new(pipeline(&pipe).map_err(|e| e.to_string())?).run(&mut g, &mut cx, |_, _| {}).map_err(|e| e.to_string())?;
    let text = egret_ir::print(&g);
    for f in &fires {
        if cx.rules_fired.get(f).copied().unwrap_or(0) == 0 {
            return Err(format!("rule `{f}` did not fire (fired: {:?})\n{text}", cx.rules_fired));
        }
    }
    for c in &checks {
        if !text.contains(c.as_str()) {
            return Err(format!("missing `{c}` in\n{text}"));
        }
    }
    for c in &nots {
        if text.contains(c.as_str()) {
            return Err(format!("unexpected `{c}` in\n{text}"));
        }
    }
    for seed in [1, 2, 3] {
        let d = compare_numerically(&input, &g, seed);
        if d > 1e-4 {
            return Err(format!("outputs differ by {d} (seed {seed})\n{text}"));
        }
    }
    Ok(())
}

#[test]
fn filetests() {
    let mut all = vec![];
    files(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/filetests"), &mut all);
    all.sort();
    assert!(all.len() >= 20, "expected the filetest suite, found {}", all.len());
    let failures: Vec<String> = all.iter().filter_map(|p| run_file(p).err().map(|e| format!("{}: {e}", p.display()))).collect();
    assert!(failures.is_empty(), "{} of {} filetests failed:\n{}", failures.len(), all.len(), failures.join("\n\n"));
}
