//! Graph passes. A pass is a named unit (`name()` is also its CLI name) that rewrites a
//! `Graph` in place; the `PassManager` runs a pipeline, verifies the graph after every pass,
//! times each one and can print the IR after any of them.

pub mod autodiff;
pub mod cse;
pub mod dce;
pub mod egraph;
pub mod fuse;
pub mod manager;
pub mod optim;
pub mod pipelines;
pub mod rules;

pub use manager::{PassManager, PassReport, PrintAfter};
pub use pipelines::{all_passes, pipeline};

use egret_ir::{Graph, IrError};

/// Whether a pass changed the graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Changed {
    Yes,
    No,
}

/// Context shared by the passes of one pipeline run: the target the cost model describes,
/// and what the passes did.
#[derive(Debug)]
pub struct PassCx {
    pub target: egraph::Target,
    /// Counters a pass may bump (`cse.merged`, e-graph sizes, …), shown by `egret ir --stats`.
    pub counters: std::collections::BTreeMap<String, u64>,
    /// How many times each rewrite rule fired (`--explain`).
    pub rules_fired: std::collections::BTreeMap<String, u64>,
}

impl Default for PassCx {
    fn default() -> Self {
        PassCx {
            target: egraph::Target::cpu(),
            counters: Default::default(),
            rules_fired: Default::default(),
        }
    }
}

pub trait Pass {
    /// Kebab-case name, used on the command line.
    fn name(&self) -> &'static str;
    /// One line for `egret passes`.
    fn summary(&self) -> &'static str;
    fn run(&self, g: &mut Graph, cx: &mut PassCx) -> Result<Changed, PassError>;
}

#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("unknown pass `{name}` (known passes: {known})")]
    UnknownPass { name: String, known: String },
    #[error("--print-after `{name}`: not a pass of this pipeline (it runs: {pipeline})")]
    UnknownPrintAfter { name: String, pipeline: String },
    #[error("pass `{pass}` produced an invalid graph: {source}")]
    Invalid { pass: String, source: IrError },
    #[error("pass `{pass}` failed: {source}")]
    Failed { pass: String, source: IrError },
}
