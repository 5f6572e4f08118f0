//! Every pass and every named pipeline, in one place. `default` is what `egret` runs unless
//! told otherwise; `none` runs nothing; any comma-separated list of pass names is a pipeline.

use crate::cse::Cse;
use crate::dce::Dce;
use crate::fuse::{Canonicalize, Fuse, MergeMatmuls};
use crate::{Pass, PassError};

/// All passes, in the order `egret passes` lists them.
pub fn all_passes() -> Vec<Box<dyn Pass>> {
    vec![
        Box::new(Canonicalize),
        Box::new(Fuse),
        Box::new(MergeMatmuls),
        Box::new(Cse),
        Box::new(Dce),
    ]
}

/// The default pipeline, step by step.
pub const DEFAULT: &[&str] = &["fuse", "merge-matmuls", "cse", "dce"];

/// Resolves `default`, `none` or `a,b,c` into passes.
pub fn pipeline(spec: &str) -> Result<Vec<Box<dyn Pass>>, PassError> {
    let names: Vec<&str> = match spec.trim() {
        "default" => DEFAULT.to_vec(),
        "none" | "" => vec![],
        list => list.split(',').map(str::trim).collect(),
    };
    names
        .into_iter()
        .map(|n| {
            all_passes()
                .into_iter()
                .find(|p| p.name() == n)
                .ok_or_else(|| PassError::UnknownPass {
                    name: n.to_string(),
                    known: all_passes()
                        .iter()
                        .map(|p| p.name())
                        .collect::<Vec<_>>()
                        .join(", "),
                })
        })
        .collect()
}
