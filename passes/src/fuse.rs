//! The e-graph passes: `canonicalize` (algebra and layout rules only) and `fuse` (those plus
//! the fusion rules), and `merge-matmuls`. Each records the rules that fired and the e-graph
//! size in the pass context, which `egret ir --stats` and `--explain` show.

use egret_ir::Graph;

use crate::egraph::{optimize, Saturation};
use crate::rules::{self, merge::merge_matmuls};
use crate::{Changed, Pass, PassCx, PassError};

fn record(cx: &mut PassCx, pass: &str, sat: &Saturation) {
    for (rule, n) in &sat.fired {
        *cx.rules_fired.entry(rule.clone()).or_default() += *n as u64;
    }
    cx.counters
        .insert(format!("{pass}.egraph_nodes"), sat.nodes as u64);
    cx.counters
        .insert(format!("{pass}.egraph_classes"), sat.classes as u64);
    cx.counters
        .insert(format!("{pass}.iterations"), sat.iterations as u64);
    cx.counters
        .insert(format!("{pass}.saturated"), sat.saturated as u64);
}

fn run_rules(
    name: &str,
    g: &mut Graph,
    cx: &mut PassCx,
    rules: &[rules::Rw],
) -> Result<Changed, PassError> {
    let (out, sat) = optimize(g, rules, &cx.target);
    record(cx, name, &sat);
    let changed = out != *g;
    *g = out;
    Ok(if changed { Changed::Yes } else { Changed::No })
}

pub struct Canonicalize;

impl Pass for Canonicalize {
    fn name(&self) -> &'static str {
        "canonicalize"
    }

    fn summary(&self) -> &'static str {
        "e-graph with the algebra and layout rules: fold constants, drop identities, one spelling per idea"
    }

    fn run(&self, g: &mut Graph, cx: &mut PassCx) -> Result<Changed, PassError> {
        run_rules(self.name(), g, cx, &rules::canonical())
    }
}

pub struct Fuse;

impl Pass for Fuse {
    fn name(&self) -> &'static str {
        "fuse"
    }

    fn summary(&self) -> &'static str {
        "e-graph with every rule: softmax, RMSNorm(+matmul), SwiGLU and causal attention fusion, extracted by roofline cost"
    }

    fn run(&self, g: &mut Graph, cx: &mut PassCx) -> Result<Changed, PassError> {
        run_rules(self.name(), g, cx, &rules::all())
    }
}

pub struct MergeMatmuls;

impl Pass for MergeMatmuls {
    fn name(&self) -> &'static str {
        "merge-matmuls"
    }

    fn summary(&self) -> &'static str {
        "matmuls sharing an input (Q/K/V, gate/up) become one against concatenated weights, where the cost model says so"
    }

    fn run(&self, g: &mut Graph, cx: &mut PassCx) -> Result<Changed, PassError> {
        let n = merge_matmuls(g, &cx.target);
        *cx.rules_fired.entry("merge-matmuls".into()).or_default() += n as u64;
        Ok(if n > 0 { Changed::Yes } else { Changed::No })
    }
}
