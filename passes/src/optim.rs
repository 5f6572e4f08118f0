//! The AdamW update as graph ops, appended to a differentiated graph (outputs `grad.<p>`),
//! so one compiled train step computes the loss, the gradients and the new parameters.
//!
//! Per parameter `p` with gradient `g` (after global-norm clipping: `g·min(1, c / (‖g‖ +
//! 1e-6))`, `‖g‖` over every gradient, as `torch.nn.utils.clip_grad_norm_`), the update of
//! `torch.optim.AdamW`:
//! `m' = β1·m + (1-β1)·g`, `v' = β2·v + (1-β2)·g²`,
//! `p' = p·(1 - lr·wd) - (lr / bc1) · m' / (√v' / √bc2 + ε)`,
//! with `bc1 = 1 - β1^t`, `bc2 = 1 - β2^t` for step `t` (from 1).
//!
//! Inputs added: `lr`, `bc1`, `bc2` (`f32[1]`), and per parameter `m.<p>`, `v.<p>` (its
//! shape). Outputs added: `grad_norm` (`f32[1]`, before clipping) and per parameter
//! `new.<p>`, `new_m.<p>`, `new_v.<p>`. Every update is elementwise over its parameter, so
//! the backends fuse it into the kernels that produce the new values.

use egret_ir::{BinaryOp, DType, Dim, Graph, IrError, ReduceOp, UnaryOp, ValueId};

/// AdamW hyper-parameters that are fixed for a compiled step (the learning rate and the
/// bias corrections are inputs, since they change every step).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Global gradient-norm clipping (`None`: no clipping).
    pub max_grad_norm: Option<f64>,
}

impl Default for AdamW {
    /// `torch.optim.AdamW`'s defaults, with clipping at 1.0.
    fn default() -> Self {
        AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            max_grad_norm: Some(1.0),
        }
    }
}

/// `x` summed over every axis, as `f32[1]` (innermost axis first: contiguous rows).
fn sum_all(g: &mut Graph, x: ValueId) -> Result<ValueId, IrError> {
    let mut s = x;
    for axis in (0..g.shape(x).len()).rev() {
        s = g.reduce(ReduceOp::Sum, s, axis)?;
    }
    g.reshape(s, vec![Dim::c(1)])
}

/// Appends the AdamW update of every parameter that has a `grad.<p>` output.
pub fn append_adamw(g: &mut Graph, opt: &AdamW) -> Result<(), IrError> {
    let grads: Vec<(String, ValueId)> = g
        .outputs
        .iter()
        .filter_map(|(n, v)| Some((n.strip_prefix("grad.")?.to_string(), *v)))
        .collect();
    let params: Vec<(String, ValueId)> = g
        .params()
        .into_iter()
        .map(|(n, v)| (n.to_string(), v))
        .collect();
    let scalar = |g: &mut Graph, name: &str| g.input(name, DType::F32, vec![Dim::c(1)]);
    let (lr, bc1, bc2) = (scalar(g, "lr"), scalar(g, "bc1"), scalar(g, "bc2"));
    // Global norm of the gradients.
    let mut total: Option<ValueId> = None;
    for (_, gv) in &grads {
        let sq = g.binary(BinaryOp::Mul, *gv, *gv)?;
        let s = sum_all(g, sq)?;
        total = Some(match total {
            Some(t) => g.binary(BinaryOp::Add, t, s)?,
            None => s,
        });
    }
    let total = match total {
        Some(t) => t,
        None => g.constant(0.0, DType::F32, vec![Dim::c(1)]),
    };
    let norm = g.unary(UnaryOp::Sqrt, total)?;
    g.output("grad_norm", norm);
    let clip = match opt.max_grad_norm {
        Some(c) => {
            let tiny = g.constant_like(1e-6, norm);
            let d = g.binary(BinaryOp::Add, norm, tiny)?;
            let c = g.constant_like(c, norm);
            let coef = g.binary(BinaryOp::Div, c, d)?;
            let one = g.constant_like(1.0, norm);
            Some(g.binary(BinaryOp::Min, coef, one)?)
        }
        None => None,
    };
    // Per-step scalars: lr / bc1, √bc2, 1 - lr·wd.
    let step = g.binary(BinaryOp::Div, lr, bc1)?;
    let sbc2 = g.unary(UnaryOp::Sqrt, bc2)?;
    let wd = g.constant_like(opt.weight_decay, lr);
    let lwd = g.binary(BinaryOp::Mul, lr, wd)?;
    let one = g.constant_like(1.0, lr);
    let decay = g.binary(BinaryOp::Sub, one, lwd)?;
    for (name, gv) in grads {
        let Some(&(_, p)) = params.iter().find(|(n, _)| *n == name) else {
            continue;
        };
        let shape = g.shape(p).to_vec();
        let bc = |g: &mut Graph, s: ValueId| g.broadcast_to(s, &shape);
        let m = g.input(&format!("m.{name}"), DType::F32, shape.clone());
        let v = g.input(&format!("v.{name}"), DType::F32, shape.clone());
        let gr = match clip {
            Some(c) => {
                let c = bc(g, c)?;
                g.binary(BinaryOp::Mul, gv, c)?
            }
            None => gv,
        };
        let k = |g: &mut Graph, x: f64| g.constant(x, DType::F32, shape.clone());
        let (b1, nb1) = (k(g, opt.beta1), k(g, 1.0 - opt.beta1));
        let (b2, nb2) = (k(g, opt.beta2), k(g, 1.0 - opt.beta2));
        let t1 = g.binary(BinaryOp::Mul, b1, m)?;
        let t2 = g.binary(BinaryOp::Mul, nb1, gr)?;
        let m2 = g.binary(BinaryOp::Add, t1, t2)?;
        let gg = g.binary(BinaryOp::Mul, gr, gr)?;
        let t3 = g.binary(BinaryOp::Mul, b2, v)?;
        let t4 = g.binary(BinaryOp::Mul, nb2, gg)?;
        let v2 = g.binary(BinaryOp::Add, t3, t4)?;
        let sq = g.unary(UnaryOp::Sqrt, v2)?;
        let s2 = bc(g, sbc2)?;
        let den = g.binary(BinaryOp::Div, sq, s2)?;
        let eps = k(g, opt.eps);
        let den = g.binary(BinaryOp::Add, den, eps)?;
        let upd = g.binary(BinaryOp::Div, m2, den)?;
        let st = bc(g, step)?;
        let upd = g.binary(BinaryOp::Mul, st, upd)?;
        let dc = bc(g, decay)?;
        let pd = g.binary(BinaryOp::Mul, p, dc)?;
        let p2 = g.binary(BinaryOp::Sub, pd, upd)?;
        g.output(&format!("new.{name}"), p2);
        g.output(&format!("new_m.{name}"), m2);
        g.output(&format!("new_v.{name}"), v2);
    }
    Ok(())
}
