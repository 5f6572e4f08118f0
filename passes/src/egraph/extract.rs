//! Extraction: pick one e-node per needed e-class and rebuild a `Graph`, keeping sharing
//! (each e-class becomes one value however many users it has).
//!
//! egg's stock extractor sums tree costs, which double-counts shared values: on an 80-layer
//! model the residual stream's cost doubles per layer and local differences vanish in the
//! rounding. Here a node costs its own roofline time plus, for each operand class, that
//! class's best cost divided by the number of e-nodes using it (its users share it).
//! To rule out cycles, a node is eligible only if every operand's *level* (the height of
//! the shallowest term the class holds) is below its own class's level.

use std::collections::{BinaryHeap, HashMap};
use std::cmp::Reverse;

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
                let h = 1 + node.children.iter().map(|c| level[&eg.find(*c)]).max().unwrap_or(0);
                heap.push(Reverse((h, parent)));
            }
        }
    }
    level
}

pub fn extract(eg: &EG, target: &Target) -> Extraction {
    let level = levels(eg);
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
            if kids.iter().any(|k| level.get(k).is_none_or(|&l| l >= lv) || !cost.contains_key(k)) {
                continue;
            }
            let tys: Vec<&TensorType> = kids.iter().map(|k| &eg[*k].data.ty).collect();
            let mut c = node_cost(target, &n.op, &tys, &class.data.ty);
            let mut seen: Vec<Id> = Vec::new();
            for k in kids {
                if !seen.contains(&k) {
                    c += cost[&k] / users.get(&k).copied().unwrap_or(1.0).max(1.0);
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

fn build(eg: &EG, ex: &Extraction, id: Id, g: &mut Graph, memo: &mut HashMap<Id, ValueId>) -> ValueId {
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
