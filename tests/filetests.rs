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

mod common;

use std::path::{Path, PathBuf};

use common::compare_numerically;
use egret_passes::{pipeline, PassCx, PassManager};

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

fn run_file(
    path: &Path,
    fired_anywhere: &mut std::collections::BTreeSet<String>,
) -> Result<(), String> {
    let src = std::fs::read_to_string(path).unwrap();
    let mut pipe = "default".to_string();
    let (mut fires, mut checks, mut nots) = (vec![], vec![], vec![]);
    for line in src.lines() {
        let Some(rest) = line.strip_prefix(';') else {
            continue;
        };
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
    PassManager::new(pipeline(&pipe).map_err(|e| e.to_string())?)
        .run(&mut g, &mut cx, |_, _| {})
        .map_err(|e| e.to_string())?;
    let text = egret_ir::print(&g);
    fired_anywhere.extend(
        cx.rules_fired
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(r, _)| r.clone()),
    );
    for f in &fires {
        if cx.rules_fired.get(f).copied().unwrap_or(0) == 0 {
            return Err(format!(
                "rule `{f}` did not fire (fired: {:?})\n{text}",
                cx.rules_fired
            ));
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
    files(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/filetests"),
        &mut all,
    );
    all.sort();
    assert!(
        all.len() >= 20,
        "expected the filetest suite, found {}",
        all.len()
    );
    let mut fired = std::collections::BTreeSet::new();
    let failures: Vec<String> = all
        .iter()
        .filter_map(|p| {
            run_file(p, &mut fired)
                .err()
                .map(|e| format!("{}: {e}", p.display()))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} filetests failed:\n{}",
        failures.len(),
        all.len(),
        failures.join("\n\n")
    );
    // Every rule is exercised (and so checked numerically) by some filetest.
    let never: Vec<String> = egret_passes::rules::all()
        .iter()
        .map(|r| r.name.to_string())
        .filter(|n| !fired.contains(n))
        .collect();
    assert!(never.is_empty(), "rules no filetest exercises: {never:?}");
}
