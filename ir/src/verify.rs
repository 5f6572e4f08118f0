//! The verifier: a graph is well formed when every operand exists, nothing depends on
//! itself, every node's declared type is what its op gives, and names are unique.
//! The pass manager runs it after every pass.

use std::collections::HashSet;

use crate::graph::{Graph, ValueId};
use crate::infer::infer_type;
use crate::op::Op;
use crate::IrError;

fn err(value: Option<ValueId>, msg: String) -> IrError {
    IrError::Verify { value, msg }
}

/// Checks `g`; the first problem found is returned with the value it concerns.
pub fn verify(g: &Graph) -> Result<(), IrError> {
    let n = g.nodes.len();
    for (i, node) in g.nodes.iter().enumerate() {
        let v = ValueId(i as u32);
        for u in &node.inputs {
            if u.index() >= n {
                return Err(err(
                    Some(v),
                    format!("{} uses {u}, which is not defined", node.op.name()),
                ));
            }
        }
    }
    if g.outputs.is_empty() {
        return Err(err(None, "graph has no outputs".into()));
    }
    let mut out_names = HashSet::new();
    for (name, v) in &g.outputs {
        if v.index() >= n {
            return Err(err(
                None,
                format!("output `{name}` is {v}, which is not defined"),
            ));
        }
        if !out_names.insert(name.as_str()) {
            return Err(err(None, format!("output `{name}` is named twice")));
        }
    }
    // Cycles, anywhere in the graph (not only among live nodes).
    let mut all = g.clone();
    all.outputs = (0..n).map(|i| (String::new(), ValueId(i as u32))).collect();
    if let Err(v) = all.live_topo_order() {
        return Err(err(Some(v), "value depends on itself (cycle)".into()));
    }
    let mut in_names = HashSet::new();
    let mut param_names = HashSet::new();
    for (i, node) in g.nodes.iter().enumerate() {
        let v = ValueId(i as u32);
        match &node.op {
            Op::Input { name } if !in_names.insert(name.as_str()) => {
                return Err(err(Some(v), format!("input `{name}` is declared twice")));
            }
            Op::Param { name } if !param_names.insert(name.as_str()) => {
                return Err(err(Some(v), format!("param `{name}` is declared twice")));
            }
            _ => {}
        }
        let tys: Vec<_> = node.inputs.iter().map(|u| g.ty(*u)).collect();
        let declared = node.op.declares_type().then_some(&node.ty);
        let ty = infer_type(&node.op, &tys, declared)
            .map_err(|m| err(Some(v), format!("{}: {m}", node.op.name())))?;
        if ty != node.ty {
            return Err(err(
                Some(v),
                format!(
                    "{} gives {ty}, but the node declares {}",
                    node.op.name(),
                    node.ty
                ),
            ));
        }
    }
    Ok(())
}
