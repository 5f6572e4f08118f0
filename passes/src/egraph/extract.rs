//! Extraction: pick one e-node per needed e-class and rebuild a `Graph`, keeping sharing
//! (each e-class becomes one value however many users it has).
//!
//! egg's stock extractor sums tree costs, which double-counts shared values: on an 80-layer
//! model the residual stream's cost doubles per layer and local differences vanish in the
//! rounding. Here a node costs its own roofline time plus, for each operand class, that
//! class's best cost divided by the number of e-nodes using it (its users share it).
//! To rule out cycles, a node is eligible only if every operand's *level* (the height of
//! the shallowest term the class holds) is below its own class's level.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use egg::Id;
use egret_ir::{Graph, Op, TensorType, ValueId};

use super::cost::{node_cost, Target};
use super::lang::{ENode, EG};

pub struct Extraction {
    pub best: HashMap<Id, ENode>,
    pub cost: HashMap<Id, f64>,
}

/// Shallowest-term height of every class (Knuth's generalisation of Dijkstra).
fn levels(eg: &EG) -> HashMap<Id, u32> {
    let mut users: HashMap<Id, Vec<(Id, usize)>> = HashMap::new(); // child -> (class, node index)
    let mut pending: HashMap<(Id, usize), usize> = HashMap::new();
    let mut heap = BinaryHeap::new();
    for class in eg.classes() {
        for (i, n) in class.nodes.iter().enumerate() {
            let mut kids: Vec<Id> = n.children.iter().map(|c| eg.find(*c)).collect();
            kids.sort();
            kids.dedup();
            if kids.is_empty() {
                heap.push(Reverse((0u32, class.id)));
            }
            pending.insert((class.id, i), kids.len());
            for k in kids {
                users.entry(k).or_default().push((class.id, i));
            }
        }
    }
    let mut level: HashMap<Id, u32> = HashMap::new();
    while let Some(Reverse((l, id))) = heap.pop() {
        if level.contains_key(&id) {
            continue;
        }
        level.insert(id, l);
        for &(parent, i) in users.get(&id).map(Vec::as_slice).unwrap_or(&[]) {
            let p = pending.get_mut(&(parent, i)).expect("node registered");
            *p -= 1;
            if *p == 0 && !level.contains_key(&parent) {
                let node = &eg[parent].nodes[i];
                let h = 1 + node
                    .children
                    .iter()
                    .map(|c| level[&eg.find(*c)])
                    .max()
                    .unwrap_or(0);
                heap.push(Reverse((h, parent)));
            }
        }
    }
    level
}

/// Refinement rounds after the first greedy choice (each kept only if it lowers the cost
/// of the whole extracted DAG; two rounds settle every case seen).
const REFINE_ROUNDS: usize = 3;

/// Picks the best node per class, then refines: a class already in the extracted DAG is
/// computed anyway, so a second pass treats it as free, which lets a user switch to a form
/// that reuses it (e.g. `y * rsqrt(x)` when `rsqrt(x)` is an output anyway).
pub fn extract(eg: &EG, target: &Target, roots: &[Id]) -> Extraction {
    let level = levels(eg);
    let mut best = greedy(eg, target, &level, None);
    let mut best_cost = dag_cost(eg, target, &best, roots);
    for _ in 0..REFINE_ROUNDS {
        let live = reachable(eg, &best, roots);
        let next = greedy(eg, target, &level, Some((&live, &best)));
        let c = dag_cost(eg, target, &next, roots);
        if c < best_cost {
            best = next;
            best_cost = c;
        } else {
            break;
        }
    }
    best
}

/// Classes the chosen nodes reach from the roots.
fn reachable(eg: &EG, ex: &Extraction, roots: &[Id]) -> std::collections::HashSet<Id> {
    let mut seen = std::collections::HashSet::new();
    let mut stack: Vec<Id> = roots.iter().map(|r| eg.find(*r)).collect();
    while let Some(c) = stack.pop() {
        if seen.insert(c) {
            if let Some(n) = ex.best.get(&c) {
                stack.extend(n.children.iter().map(|k| eg.find(*k)));
            }
        }
    }
    seen
}

/// The cost of computing every class the chosen nodes reach, each once.
fn dag_cost(eg: &EG, target: &Target, ex: &Extraction, roots: &[Id]) -> f64 {
    reachable(eg, ex, roots)
        .into_iter()
        .map(|c| {
            let n = &ex.best[&c];
            let tys: Vec<&TensorType> = n
                .children
                .iter()
                .map(|k| &eg[eg.find(*k)].data.ty)
                .collect();
            node_cost(target, &n.op, &tys, &eg[c].data.ty)
        })
        .sum()
}

fn greedy(
    eg: &EG,
    target: &Target,
    level: &HashMap<Id, u32>,
    prev: Option<(&std::collections::HashSet<Id>, &Extraction)>,
) -> Extraction {
    let mut users: HashMap<Id, f64> = HashMap::new();
    for class in eg.classes() {
        for n in &class.nodes {
            let mut kids: Vec<Id> = n.children.iter().map(|c| eg.find(*c)).collect();
            kids.sort();
            kids.dedup();
            for k in kids {
                *users.entry(k).or_default() += 1.0;
            }
        }
    }
    let mut order: Vec<Id> = eg.classes().map(|c| c.id).collect();
    order.sort_by_key(|id| (level.get(id).copied().unwrap_or(u32::MAX), *id));
    let mut best: HashMap<Id, ENode> = HashMap::new();
    let mut cost: HashMap<Id, f64> = HashMap::new();
    for id in order {
        let Some(&lv) = level.get(&id) else { continue };
        let class = &eg[id];
        let mut choice: Option<(f64, &ENode)> = None;
        for n in &class.nodes {
            let kids: Vec<Id> = n.children.iter().map(|c| eg.find(*c)).collect();
            if kids
                .iter()
                .any(|k| level.get(k).is_none_or(|&l| l >= lv) || !cost.contains_key(k))
            {
                continue;
            }
            let tys: Vec<&TensorType> = kids.iter().map(|k| &eg[*k].data.ty).collect();
            let mut c = node_cost(target, &n.op, &tys, &class.data.ty);
            let mut seen: Vec<Id> = Vec::new();
            for k in kids {
                if !seen.contains(&k) {
                    c += match prev {
                        Some((live, _)) if live.contains(&k) => 0.0,
                        _ => cost[&k] / users.get(&k).copied().unwrap_or(1.0).max(1.0),
                    };
                    seen.push(k);
                }
            }
            if choice.is_none_or(|(bc, bn)| c < bc || (c == bc && n < bn)) {
                choice = Some((c, n));
            }
        }
        if let Some((c, n)) = choice {
            cost.insert(id, c);
            best.insert(id, n.clone());
        }
    }
    Extraction { best, cost }
}

/// Rebuilds a graph from the chosen nodes for `roots` (name, class), in topological order.
pub fn build_graph(eg: &EG, ex: &Extraction, name: &str, roots: &[(String, Id)]) -> Graph {
    let mut g = Graph::new(name);
    let mut memo: HashMap<Id, ValueId> = HashMap::new();
    for (out, root) in roots {
        let v = build(eg, ex, eg.find(*root), &mut g, &mut memo);
        g.output(out, v);
    }
    g
}

fn build(
    eg: &EG,
    ex: &Extraction,
    id: Id,
    g: &mut Graph,
    memo: &mut HashMap<Id, ValueId>,
) -> ValueId {
    // Iterative post-order: levels strictly decrease along chosen edges, so this ends.
    let mut stack = vec![(id, false)];
    while let Some((c, expanded)) = stack.pop() {
        if memo.contains_key(&c) {
            continue;
        }
        let node = &ex.best[&c];
        if !expanded {
            stack.push((c, true));
            for k in node.children.iter().rev() {
                let k = eg.find(*k);
                if !memo.contains_key(&k) {
                    stack.push((k, false));
                }
            }
        } else {
            let inputs = node.children.iter().map(|k| memo[&eg.find(*k)]).collect();
            let ty = eg[c].data.ty.clone();
            let op: Op = node.op.clone();
            let v = g.push(op, inputs, ty);
            memo.insert(c, v);
        }
    }
    memo[&id]
}
