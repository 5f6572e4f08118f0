//! The generation loop, independent of how a forward pass runs: any `LanguageModel`
//! (interpreter, compiled CPU code, GPU) prefills the prompt, then decodes one token at a
//! time from its KV cache, sampling each next token, until `max_new_tokens` or a stop id.

use std::time::Instant;

use crate::error::{Result, RuntimeError};
use crate::sampler::{Sampler, SamplerConfig};

/// A causal language model with a KV cache.
pub trait LanguageModel {
    fn vocab_size(&self) -> usize;
    /// Clears the cache, runs `ids` and returns the logits after the last of them.
    fn prefill(&mut self, ids: &[u32]) -> Result<Vec<f32>>;
    /// Appends one token to the cache and returns the logits after it.
    fn decode(&mut self, id: u32) -> Result<Vec<f32>>;
}

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampler: SamplerConfig,
    /// Generation stops after emitting one of these (end-of-sequence ids).
    pub stop_ids: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// Generated ids only (a stop id, if reached, is the last).
    pub ids: Vec<u32>,
    pub prompt_tokens: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
    /// Tokens produced by decode steps (the first new token comes from prefill).
    pub decode_steps: usize,
}

impl Generation {
    pub fn prefill_tok_s(&self) -> f64 {
        if self.prefill_secs > 0.0 {
            self.prompt_tokens as f64 / self.prefill_secs
        } else {
            0.0
        }
    }

    pub fn decode_tok_s(&self) -> f64 {
        if self.decode_secs > 0.0 {
            self.decode_steps as f64 / self.decode_secs
        } else {
            0.0
        }
    }
}

/// Checks that every id is inside the vocabulary.
pub fn check_ids(ids: &[u32], vocab: usize) -> Result<()> {
    match ids.iter().find(|&&id| id as usize >= vocab) {
        Some(&id) => Err(RuntimeError::TokenOutOfRange {
            id: id as u64,
            vocab,
        }),
        None => Ok(()),
    }
}

/// Generates up to `opts.max_new_tokens` tokens after `prompt`, calling `on_token` with each.
pub fn generate(
    model: &mut dyn LanguageModel,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32),
) -> Result<Generation> {
    generate_while(model, prompt, opts, |id| {
        on_token(id);
        true
    })
}

/// `generate`, stopping early after a token for which `on_token` returns false (its reader
/// has gone, say): the generation then ends with that token.
pub fn generate_while(
    model: &mut dyn LanguageModel,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(RuntimeError::Invalid(
            "the prompt is empty: give at least one token".into(),
        ));
    }
    check_ids(prompt, model.vocab_size())?;
    let mut sampler = Sampler::new(opts.sampler.clone());
    let mut gen = Generation {
        ids: Vec::new(),
        prompt_tokens: prompt.len(),
        prefill_secs: 0.0,
        decode_secs: 0.0,
        decode_steps: 0,
    };
    if opts.max_new_tokens == 0 {
        return Ok(gen);
    }
    let t0 = Instant::now();
    let logits = model.prefill(prompt)?;
    gen.prefill_secs = t0.elapsed().as_secs_f64();
    let mut next = sampler.sample(&logits);
    let t1 = Instant::now();
    loop {
        gen.ids.push(next);
        let go_on = on_token(next);
        if !go_on || gen.ids.len() >= opts.max_new_tokens || opts.stop_ids.contains(&next) {
            break;
        }
        let logits = model.decode(next)?;
        gen.decode_steps += 1;
        next = sampler.sample(&logits);
    }
    gen.decode_secs = t1.elapsed().as_secs_f64();
    Ok(gen)
}
