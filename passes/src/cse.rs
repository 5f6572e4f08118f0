//! Common-subexpression elimination: two nodes with the same op, operands and type compute
//! the same value, so later uses are redirected to the first. Inputs and params are unique
//! by name and never merge with anything else.

use std::collections::HashMap;

use egret_ir::{Graph, Op, TensorType, ValueId};

use crate::{Changed, Pass, PassCx, PassError};

pub struct Cse;

impl Pass for Cse {
    fn name(&self) -> &'static str {
        "cse"
    }

    fn summary(&self) -> &'static str {
        "merge nodes that compute the same value (same op, operands and type)"
    }

    fn run(&self, g: &mut Graph, cx: &mut PassCx) -> Result<Changed, PassError> {
        let order = g.live_topo_order().map_err(|v| PassError::Failed {
            pass: "cse".into(),
            source: egret_ir::IrError::Verify {
                value: Some(v),
                msg: "cycle".into(),
            },
        })?;
        let mut replace: Vec<ValueId> = g.values().collect();
        let mut seen: HashMap<(Op, Vec<ValueId>, TensorType), ValueId> = HashMap::new();
        let mut merged = 0u64;
        for v in order {
            let node = &mut g.nodes[v.index()];
            for u in node.inputs.iter_mut() {
                *u = replace[u.index()];
            }
            if matches!(node.op, Op::Input { .. } | Op::Param { .. }) {
                continue;
            }
            let key = (node.op.clone(), node.inputs.clone(), node.ty.clone());
            match seen.get(&key) {
                Some(&first) => {
                    replace[v.index()] = first;
                    merged += 1;
                }
                None => {
                    seen.insert(key, v);
                }
            }
        }
        for (_, v) in g.outputs.iter_mut() {
            *v = replace[v.index()];
        }
        *cx.counters.entry("cse.merged".into()).or_default() += merged;
        if merged > 0 {
            g.compact().map_err(|e| PassError::Failed {
                pass: "cse".into(),
                source: e,
            })?;
            Ok(Changed::Yes)
        } else {
            Ok(Changed::No)
        }
    }
}
