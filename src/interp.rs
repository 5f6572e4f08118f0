//! Running a model on the reference interpreter: the prefill and decode graphs (after the
//! requested passes) evaluated by `egret_ir::Interpreter`, with the KV cache kept between
//! steps. This is the `interp` backend of `generate` and `logits`.

use std::collections::HashMap;

use egret_ir::{Graph, Interpreter, Tensor};
use egret_models::{build, GraphKind, LlamaConfig};
use egret_passes::{pipeline, PassCx, PassManager};
use egret_runtime::generate::{check_ids, LanguageModel};
use egret_runtime::RuntimeError;

use crate::Result;

/// Builds a model graph and runs the pipeline `passes` (`default`, `none`, or a list) on it.
pub fn optimized_graph(cfg: &LlamaConfig, kind: GraphKind, passes: &str) -> Result<Graph> {
    let mut g = build(cfg, kind)?;
    let pm = PassManager::new(pipeline(passes)?);
    pm.run(&mut g, &mut PassCx::default(), |_, _| {})?;
    Ok(g)
}

pub struct InterpModel {
    cfg: LlamaConfig,
    prefill: Interpreter,
    decode: Interpreter,
    params: HashMap<String, Tensor>,
    /// Per layer: keys and values `[1, Hkv, P, D]` of every position so far.
    cache: Vec<(Tensor, Tensor)>,
    pos: usize,
}

fn to_runtime(e: egret_ir::IrError) -> RuntimeError {
    RuntimeError::Invalid(e.to_string())
}

impl InterpModel {
    pub fn new(
        cfg: LlamaConfig,
        params: HashMap<String, Tensor>,
        passes: &str,
    ) -> Result<InterpModel> {
        let mut prefill = Interpreter::new(&optimized_graph(&cfg, GraphKind::Prefill, passes)?)?;
        let mut decode = Interpreter::new(&optimized_graph(&cfg, GraphKind::Decode, passes)?)?;
        prefill.prepare(&params)?;
        decode.prepare(&params)?;
        Ok(InterpModel {
            cfg,
            prefill,
            decode,
            params,
            cache: Vec::new(),
            pos: 0,
        })
    }

    /// Logits of every position of `ids` (batch 1): `T` rows of `V`.
    pub fn logits_all(&mut self, ids: &[u32]) -> Result<Vec<Vec<f32>>> {
        let out = self.run_prefill(ids)?;
        let v = self.cfg.vocab_size;
        Ok(out.chunks(v).map(<[f32]>::to_vec).collect())
    }

    fn tokens(ids: &[u32], start: usize) -> Result<HashMap<String, Tensor>> {
        let t = ids.len();
        let mut m = HashMap::new();
        m.insert(
            "tokens".to_string(),
            Tensor::from_i64(vec![1, t], ids.iter().map(|&i| i as i64).collect())?,
        );
        m.insert(
            "positions".to_string(),
            Tensor::from_i64(vec![1, t], (start..start + t).map(|p| p as i64).collect())?,
        );
        Ok(m)
    }

    fn take_cache(&mut self, out: &mut HashMap<String, Tensor>) -> Result<()> {
        self.cache.clear();
        for i in 0..self.cfg.num_hidden_layers {
            let k = out.remove(&format!("present_key.{i}"));
            let v = out.remove(&format!("present_value.{i}"));
            match (k, v) {
                (Some(k), Some(v)) => self.cache.push((k, v)),
                _ => {
                    return Err(RuntimeError::Invalid(format!(
                        "graph did not return the cache of layer {i}"
                    ))
                    .into())
                }
            }
        }
        Ok(())
    }

    fn run_prefill(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        check_ids(ids, self.cfg.vocab_size)?;
        let inputs = Self::tokens(ids, 0)?;
        let mut out = self.prefill.run(&inputs, &self.params)?;
        self.take_cache(&mut out)?;
        self.pos = ids.len();
        Ok(out["logits"].to_f32_vec())
    }
}

impl LanguageModel for InterpModel {
    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn prefill(&mut self, ids: &[u32]) -> egret_runtime::Result<Vec<f32>> {
        let all = self
            .run_prefill(ids)
            .map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        let v = self.cfg.vocab_size;
        Ok(all[all.len() - v..].to_vec())
    }

    fn decode(&mut self, id: u32) -> egret_runtime::Result<Vec<f32>> {
        check_ids(&[id], self.cfg.vocab_size)?;
        let mut inputs =
            Self::tokens(&[id], self.pos).map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        for (i, (k, v)) in self.cache.iter().enumerate() {
            inputs.insert(format!("past_key.{i}"), k.clone());
            inputs.insert(format!("past_value.{i}"), v.clone());
        }
        let mut out = self.decode.run(&inputs, &self.params).map_err(to_runtime)?;
        self.take_cache(&mut out)
            .map_err(|e| RuntimeError::Invalid(e.to_string()))?;
        self.pos += 1;
        Ok(out["logits"].to_f32_vec())
    }
}
