//! `PassManager`: runs a pipeline, verifies after every pass (a pass that breaks the graph
//! is named in the error), records each pass's wall time, and hands the IR after the passes
//! the user asked to see to a callback.

use std::time::Instant;

use egret_ir::Graph;

use crate::{Changed, Pass, PassCx, PassError};

/// Which passes to print the IR after.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum PrintAfter {
    #[default]
    Nothing,
    All,
    Passes(Vec<String>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct PassReport {
    pub name: String,
    pub ms: f64,
    pub changed: bool,
}

pub struct PassManager {
    passes: Vec<Box<dyn Pass>>,
    print_after: PrintAfter,
}

impl PassManager {
    pub fn new(passes: Vec<Box<dyn Pass>>) -> PassManager {
        PassManager {
            passes,
            print_after: PrintAfter::Nothing,
        }
    }

    /// Asks for the IR after the named passes; an unknown name (not in this pipeline) is an error.
    pub fn print_after(mut self, p: PrintAfter) -> Result<PassManager, PassError> {
        if let PrintAfter::Passes(names) = &p {
            for n in names {
                if !self.passes.iter().any(|q| q.name() == n) {
                    let names: Vec<&str> = self.passes.iter().map(|q| q.name()).collect();
                    return Err(PassError::UnknownPrintAfter {
                        name: n.clone(),
                        pipeline: match names.is_empty() {
                            true => "no passes".into(),
                            false => names.join(", "),
                        },
                    });
                }
            }
        }
        self.print_after = p;
        Ok(self)
    }

    /// Runs every pass; `dump(pass_name, graph)` is called where printing was requested.
    pub fn run(
        &self,
        g: &mut Graph,
        cx: &mut PassCx,
        mut dump: impl FnMut(&str, &Graph),
    ) -> Result<Vec<PassReport>, PassError> {
        let mut reports = Vec::new();
        for p in &self.passes {
            let t0 = Instant::now();
            let changed = p.run(g, cx)?;
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            egret_ir::verify(g).map_err(|e| PassError::Invalid {
                pass: p.name().into(),
                source: e,
            })?;
            reports.push(PassReport {
                name: p.name().into(),
                ms,
                changed: changed == Changed::Yes,
            });
            let wanted = match &self.print_after {
                PrintAfter::Nothing => false,
                PrintAfter::All => true,
                PrintAfter::Passes(n) => n.iter().any(|n| n == p.name()),
            };
            if wanted {
                dump(p.name(), g);
            }
        }
        Ok(reports)
    }
}
