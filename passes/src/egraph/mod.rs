//! Equality saturation with egg: the graph goes into an e-graph, rule sets rewrite it until
//! nothing new appears (or a named limit is hit), and the cheapest equivalent graph under
//! the roofline cost model comes back out.

pub mod cost;
pub mod extract;
pub mod lang;

use std::collections::BTreeMap;
use std::time::Duration;

use egg::{Id, Rewrite, Runner, SimpleScheduler, StopReason};
use egret_ir::Graph;

pub use cost::Target;
pub use lang::{add_typed, ENode, Info, TensorAnalysis, EG};

/// Iterations of rule application. Every rule points one way (toward a fused or simpler
/// form), so saturation takes a few rounds per fusion stage; 40 leaves ample headroom.
pub const ITER_LIMIT: usize = 40;
/// E-nodes. An 80-layer model starts near 10k nodes; rules at most triple that. A runaway
/// rule set is cut off here instead of eating memory.
pub const NODE_LIMIT: usize = 400_000;
/// Wall time for saturation: the whole default pipeline on llama-65b must stay well under 5 s.
pub const TIME_LIMIT: Duration = Duration::from_secs(20);

/// What saturation did: rules fired, e-graph size, why it stopped.
#[derive(Clone, Debug, Default)]
pub struct Saturation {
    pub fired: BTreeMap<String, usize>,
    pub iterations: usize,
    pub nodes: usize,
    pub classes: usize,
    pub saturated: bool,
    pub stop_reason: String,
}

/// Loads a graph into a fresh e-graph; returns it with the output roots.
pub fn to_egraph(g: &Graph) -> (EG, Vec<(String, Id)>) {
    let mut eg = EG::new(TensorAnalysis);
    let order = g.live_topo_order().expect("verified graph has no cycles");
    let mut ids: Vec<Option<Id>> = vec![None; g.len()];
    for v in order {
        let n = g.node(v);
        let children = n
            .inputs
            .iter()
            .map(|u| ids[u.index()].expect("topological order"))
            .collect();
        let id = eg.add(ENode::new(n.op.clone(), Some(n.ty.clone()), children));
        ids[v.index()] = Some(id);
    }
    let roots = g
        .outputs
        .iter()
        .map(|(name, v)| (name.clone(), ids[v.index()].expect("output computed")))
        .collect();
    (eg, roots)
}

/// Saturates `g` under `rules` and extracts the cheapest equivalent graph for `target`.
pub fn optimize(
    g: &Graph,
    rules: &[Rewrite<ENode, TensorAnalysis>],
    target: &Target,
) -> (Graph, Saturation) {
    let (eg, roots) = to_egraph(g);
    let runner = Runner::default()
        .with_egraph(eg)
        .with_scheduler(SimpleScheduler)
        .with_iter_limit(ITER_LIMIT)
        .with_node_limit(NODE_LIMIT)
        .with_time_limit(TIME_LIMIT)
        .run(rules);
    let mut sat = Saturation::default();
    for it in &runner.iterations {
        for (name, n) in &it.applied {
            *sat.fired.entry(name.to_string()).or_default() += n;
        }
    }
    sat.iterations = runner.iterations.len();
    sat.nodes = runner.egraph.total_number_of_nodes();
    sat.classes = runner.egraph.number_of_classes();
    sat.saturated = matches!(runner.stop_reason, Some(StopReason::Saturated));
    sat.stop_reason = match &runner.stop_reason {
        Some(StopReason::Saturated) => "saturated".to_string(),
        Some(StopReason::IterationLimit(n)) => format!("iteration limit {n}"),
        Some(StopReason::NodeLimit(n)) => format!("node limit {n}"),
        Some(StopReason::TimeLimit(t)) => format!("time limit {t}s"),
        Some(StopReason::Other(s)) => s.clone(),
        None => "not run".to_string(),
    };
    let root_ids: Vec<Id> = roots.iter().map(|(_, id)| *id).collect();
    let ex = extract::extract(&runner.egraph, target, &root_ids);
    let out = extract::build_graph(&runner.egraph, &ex, &g.name, &roots);
    (out, sat)
}
