//! Dead-code elimination: keeps only what the outputs need, renumbered in topological order.

use egret_ir::Graph;

use crate::{Changed, Pass, PassCx, PassError};

pub struct Dce;

impl Pass for Dce {
    fn name(&self) -> &'static str {
        "dce"
    }

    fn summary(&self) -> &'static str {
        "remove nodes no output depends on and renumber values in topological order"
    }

    fn run(&self, g: &mut Graph, cx: &mut PassCx) -> Result<Changed, PassError> {
        let before = g.nodes.clone();
        let removed = g.compact().map_err(|e| PassError::Failed {
            pass: "dce".into(),
            source: e,
        })?;
        *cx.counters.entry("dce.removed".into()).or_default() += removed as u64;
        Ok(if removed > 0 || g.nodes != before {
            Changed::Yes
        } else {
            Changed::No
        })
    }
}
