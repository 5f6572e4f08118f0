//! Named model shapes for compile-only work: the LLaMA paper's Table 2 models and SmolLM2-135M.

use crate::config::{LlamaConfig, RopeScaling};
use crate::ModelError;

pub const NAMES: &[&str] = &[
    "llama-7b",
    "llama-13b",
    "llama-33b",
    "llama-65b",
    "smollm2-135m",
];

/// LLaMA-1 (Touvron et al. 2023, Table 2): dim, heads, layers; FFN width is
/// 2/3·4·dim rounded up to a multiple of 256, as in the released checkpoints.
fn llama1(dim: usize, heads: usize, layers: usize, ffn: usize) -> LlamaConfig {
    LlamaConfig {
        vocab_size: 32000,
        hidden_size: dim,
        intermediate_size: ffn,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: heads,
        head_dim: dim / heads,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        rope_scaling: RopeScaling::Default,
        tie_word_embeddings: false,
        max_position_embeddings: 2048,
        attention_bias: false,
        mlp_bias: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    }
}

pub fn preset(name: &str) -> Result<LlamaConfig, ModelError> {
    Ok(match name {
        "llama-7b" => llama1(4096, 32, 32, 11008),
        "llama-13b" => llama1(5120, 40, 40, 13824),
        "llama-33b" => llama1(6656, 52, 60, 17920),
        "llama-65b" => llama1(8192, 64, 80, 22016),
        "smollm2-135m" => LlamaConfig {
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            head_dim: 64,
            rms_norm_eps: 1e-5,
            rope_theta: 100000.0,
            rope_scaling: RopeScaling::Default,
            tie_word_embeddings: true,
            max_position_embeddings: 8192,
            attention_bias: false,
            mlp_bias: false,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
        },
        other => return Err(ModelError::UnknownPreset(other.to_string())),
    })
}
