//! Training on the IR: the loss graph (`egret_models::build_training`) differentiated by
//! `egret_passes::autodiff`, optimised, and run on the interpreter or the CPU backend.
//! `egret grad` prints the loss and writes every gradient.

use std::collections::HashMap;

use egret_backends::llvm::CpuOptions;
use egret_ir::{Graph, Interpreter, Tensor};
use egret_models::{build_training, LlamaConfig};
use egret_passes::{pipeline, PassCx, PassManager};
use egret_runtime::cpu::{HostData, HostValue};
use egret_runtime::generate::check_ids;
use egret_runtime::HostTensor;

use crate::{EgretError, Result};

/// The loss-and-gradients graph of a model: outputs `loss` and `grad.<name>` for every
/// parameter, after the pipeline `passes`.
pub fn grad_graph(cfg: &LlamaConfig, passes: &str) -> Result<Graph> {
    let fwd = build_training(cfg)?;
    let mut g = egret_passes::autodiff::differentiate(&fwd, "loss")?;
    let pm = PassManager::new(pipeline(passes)?);
    pm.run(&mut g, &mut PassCx::default(), |_, _| {})?;
    Ok(g)
}

/// The targets of a sequence for next-token prediction: `tokens[t + 1]`, and -1 (none) at
/// the last position.
pub fn targets(ids: &[u32]) -> Vec<i64> {
    ids.iter()
        .skip(1)
        .map(|&i| i as i64)
        .chain(std::iter::once(-1))
        .collect()
}

/// The loss and each parameter's gradient, by Hugging Face name.
pub struct Grads {
    pub loss: f32,
    pub grads: Vec<(String, HostTensor)>,
}

/// Where gradients are computed.
pub enum GradBackend<'a> {
    Interp,
    Cpu {
        opts: &'a CpuOptions,
        threads: usize,
    },
}

/// Loss and gradients of one sequence (batch 1) of at least two tokens.
pub fn grads(
    cfg: &LlamaConfig,
    params: &HashMap<String, Tensor>,
    ids: &[u32],
    passes: &str,
    backend: GradBackend,
) -> Result<Grads> {
    if ids.len() < 2 {
        return Err(EgretError::Usage(
            "the loss needs at least two tokens (one to predict from, one to predict)".into(),
        ));
    }
    check_ids(ids, cfg.vocab_size)?;
    let g = grad_graph(cfg, passes)?;
    let t = ids.len();
    let tokens: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let positions: Vec<i64> = (0..t as i64).collect();
    let tg = targets(ids);
    let mut out: HashMap<String, (Vec<usize>, Vec<f32>)> = match backend {
        GradBackend::Interp => {
            let i64t = |v: Vec<i64>| Tensor::from_i64(vec![1, t], v);
            let inputs = HashMap::from([
                ("tokens".to_string(), i64t(tokens)?),
                ("positions".to_string(), i64t(positions)?),
                ("targets".to_string(), i64t(tg)?),
            ]);
            Interpreter::new(&g)?
                .run(&inputs, params)?
                .into_iter()
                .map(|(k, v)| (k, (v.shape().to_vec(), v.to_f32_vec())))
                .collect()
        }
        GradBackend::Cpu { opts, threads } => {
            let (mut ex, _code) = crate::cpu::executor(&g, params, opts, threads)?;
            let host = |v: Vec<i64>| HostValue {
                shape: vec![1, t],
                data: HostData::I64(v),
            };
            let inputs = HashMap::from([
                ("tokens".to_string(), host(tokens)),
                ("positions".to_string(), host(positions)),
                ("targets".to_string(), host(tg)),
            ]);
            ex.run(&inputs)?
                .into_iter()
                .map(|(k, v)| {
                    let d = match v.data {
                        HostData::F32(x) => x,
                        HostData::I64(x) => x.into_iter().map(|i| i as f32).collect(),
                    };
                    (k, (v.shape, d))
                })
                .collect()
        }
    };
    let loss = out
        .remove("loss")
        .and_then(|(_, d)| d.first().copied())
        .ok_or_else(|| EgretError::Usage("the gradient graph returned no loss".into()))?;
    let mut grads: Vec<(String, HostTensor)> = out
        .into_iter()
        .filter_map(|(k, (shape, data))| {
            let name = k.strip_prefix("grad.")?.to_string();
            Some((name, HostTensor::new(shape, data)))
        })
        .collect();
    grads.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Grads { loss, grads })
}
