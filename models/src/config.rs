//! `LlamaConfig`: the hyper-parameters that fix a LLaMA-style model's graph, read from a
//! Hugging Face `config.json` or a GGUF header, and checked for consistency.

use egret_runtime::gguf::GgufValue;
use serde::Serialize;
use serde_json::Value;

use crate::ModelError;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// How the rotary frequencies are rescaled for longer contexts (`rope_scaling`).
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

/// A rescaling of the rotary frequencies `inv_freq[i] = theta^(-2i/D)`, as Hugging Face's
/// `rope_scaling` (`rope_type`) spells it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Plain RoPE.
    #[default]
    Default,
    /// `inv_freq / factor` (position interpolation).
    Linear { factor: f64 },
    /// Llama 3.1's: with wavelengths `λ = 2π / inv_freq` against the original context `L`,
    /// `inv_freq / factor` where `λ > L / low_freq_factor`, `inv_freq` where `λ < L /
    /// high_freq_factor`, and between them `(1 − s)·inv_freq / factor + s·inv_freq` with
    /// `s = (L / λ − low_freq_factor) / (high_freq_factor − low_freq_factor)`.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

impl RopeScaling {
    /// From a `rope_scaling` (or `rope_parameters`) object: its `rope_type` (or `type`) and
    /// that type's fields. `original`: the configuration's own original context, and whether
    /// it overrides the object's (a top-level `original_max_position_embeddings` does; the
    /// `max_position_embeddings` fallback only stands in for a missing one).
    fn from_hf(
        s: Option<&Value>,
        original: Option<(u64, bool)>,
        src: &str,
    ) -> Result<RopeScaling, ModelError> {
        let Some(s) = s.filter(|s| !s.is_null()) else {
            return Ok(RopeScaling::Default);
        };
        let kind = s
            .get("rope_type")
            .or_else(|| s.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let num = |k: &str| -> Result<f64, ModelError> {
            s.get(k)
                .and_then(Value::as_f64)
                .filter(|x| x.is_finite() && *x > 0.0)
                .ok_or_else(|| {
                    cfg_err(
                        src,
                        format!("RoPE scaling `{kind}` needs a positive number `{k}`"),
                    )
                })
        };
        match kind {
            "default" => Ok(RopeScaling::Default),
            "linear" => Ok(RopeScaling::Linear {
                factor: num("factor")?,
            }),
            "llama3" => {
                let (low, high) = (num("low_freq_factor")?, num("high_freq_factor")?);
                if high <= low {
                    return Err(cfg_err(
                        src,
                        "RoPE scaling `llama3` needs high_freq_factor above low_freq_factor",
                    ));
                }
                let context = match original {
                    Some((top, true)) => top as f64,
                    Some((fallback, false)) => {
                        num("original_max_position_embeddings").unwrap_or(fallback as f64)
                    }
                    None => num("original_max_position_embeddings")?,
                };
                if !(context >= 1.0) {
                    return Err(cfg_err(
                        src,
                        "RoPE scaling `llama3` needs a positive original_max_position_embeddings",
                    ));
                }
                Ok(RopeScaling::Llama3 {
                    factor: num("factor")?,
                    low_freq_factor: low,
                    high_freq_factor: high,
                    original_max_position_embeddings: context as usize,
                })
            }
            other => Err(cfg_err(
                src,
                format!(
                    "RoPE scaling `{other}` is not supported yet (plain, `linear` and `llama3` are)"
                ),
            )),
        }
    }

    /// The `rope_scaling` object of a Hugging Face `config.json` (null for plain RoPE).
    pub fn to_hf_json(&self) -> Value {
        match self {
            RopeScaling::Default => Value::Null,
            other => serde_json::to_value(other).unwrap_or(Value::Null),
        }
    }
}

fn cfg_err(src: &str, msg: impl Into<String>) -> ModelError {
    ModelError::Config {
        source_desc: src.to_string(),
        msg: msg.into(),
    }
}

/// Limits on a configuration's sizes: the largest LLaMA-family models stay far inside
/// them, and within them the shapes and parameter counts built from a configuration cannot
/// overflow. A dimension of a configuration at most `MAX_CONFIG_DIM`.
pub const MAX_CONFIG_DIM: usize = 1 << 24;
/// At most this many layers.
pub const MAX_CONFIG_LAYERS: usize = 1 << 12;
/// At most this many parameters, 4.4 × 10¹².
pub const MAX_CONFIG_PARAMETERS: u64 = 1 << 42;

impl LlamaConfig {
    /// Parses a Hugging Face `config.json`. `src` names the file in errors.
    pub fn from_hf_json(text: &str, src: &str) -> Result<LlamaConfig, ModelError> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| cfg_err(src, format!("not valid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| cfg_err(src, "expected a JSON object"))?;
        if let Some(mt) = obj.get("model_type").and_then(Value::as_str) {
            if !matches!(mt, "llama" | "mistral") {
                return Err(cfg_err(
                    src,
                    format!("model_type `{mt}` is not a LLaMA-style model (expected `llama`)"),
                ));
            }
        }
        if let Some(act) = obj.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(cfg_err(
                    src,
                    format!("hidden_act `{act}` is not supported (LLaMA uses `silu`)"),
                ));
            }
        }
        let req = |k: &str| -> Result<usize, ModelError> {
            obj.get(k)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| cfg_err(src, format!("missing or non-integer `{k}`")))
        };
        let opt = |k: &str| obj.get(k).and_then(Value::as_u64).map(|x| x as usize);
        let heads = req("num_attention_heads")?;
        let hidden = req("hidden_size")?;
        let rope_params = obj.get("rope_parameters").and_then(Value::as_object);
        let rope_theta = obj
            .get("rope_theta")
            .and_then(Value::as_f64)
            .or_else(|| {
                rope_params
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(Value::as_f64)
            })
            .unwrap_or(10000.0);
        // (an empty `rope_scaling` falls through to `rope_parameters`, as in transformers 5;
        // llama3's original context may come from the top level, which wins, or default to
        // `max_position_embeddings`)
        let top = |k: &str| obj.get(k).and_then(Value::as_u64);
        let original = top("original_max_position_embeddings")
            .map(|x| (x, true))
            .or_else(|| top("max_position_embeddings").map(|x| (x, false)));
        let rope_scaling = RopeScaling::from_hf(
            obj.get("rope_scaling")
                .filter(|s| s.as_object().is_some_and(|o| !o.is_empty()))
                .or_else(|| rope_params.map(|_| &v["rope_parameters"])),
            original,
            src,
        )?;
        let ids = |k: &str| -> Vec<u32> {
            match obj.get(k) {
                Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(Value::as_u64)
                    .map(|x| x as u32)
                    .collect(),
                _ => vec![],
            }
        };
        let cfg = LlamaConfig {
            vocab_size: req("vocab_size")?,
            hidden_size: hidden,
            intermediate_size: req("intermediate_size")?,
            num_hidden_layers: req("num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: opt("num_key_value_heads").unwrap_or(heads),
            head_dim: opt("head_dim").unwrap_or(if heads > 0 { hidden / heads } else { 0 }),
            rms_norm_eps: obj
                .get("rms_norm_eps")
                .and_then(Value::as_f64)
                .unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: obj
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            max_position_embeddings: opt("max_position_embeddings").unwrap_or(2048),
            attention_bias: obj
                .get("attention_bias")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            mlp_bias: obj
                .get("mlp_bias")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            bos_token_id: ids("bos_token_id").first().copied(),
            eos_token_ids: ids("eos_token_id"),
        };
        cfg.validate(src)?;
        Ok(cfg)
    }

    /// Reads the `llama.*` keys of a GGUF header.
    pub fn from_gguf(
        g: &egret_runtime::gguf::GgufFile,
        src: &str,
    ) -> Result<LlamaConfig, ModelError> {
        let arch = g.architecture().unwrap_or("");
        if arch != "llama" {
            return Err(cfg_err(
                src,
                format!("GGUF architecture `{arch}` is not supported (expected `llama`)"),
            ));
        }
        // Each key absent (`None`: a default applies, or for `req` an error) or of its type:
        // a value of another type is an error, not taken for a missing key.
        let int = |k: &str| -> Result<Option<usize>, ModelError> {
            g.typed(k, "a non-negative integer", GgufValue::as_u64)
                .map(|v| v.map(|x| x as usize))
                .map_err(|e| cfg_err(src, e))
        };
        let float = |k: &str| -> Result<Option<f64>, ModelError> {
            g.typed(k, "a float", GgufValue::as_f32)
                .map(|v| v.map(f64::from))
                .map_err(|e| cfg_err(src, e))
        };
        let req = |k: &str| -> Result<usize, ModelError> {
            int(k)?.ok_or_else(|| cfg_err(src, format!("missing GGUF key `{k}`")))
        };
        let hidden = req("llama.embedding_length")?;
        let heads = req("llama.attention.head_count")?;
        let tokens = g
            .typed("tokenizer.ggml.tokens", "an array", GgufValue::as_array)
            .map_err(|e| cfg_err(src, e))?;
        let vocab = match (int("llama.vocab_size")?, tokens) {
            (Some(v), _) => v,
            (None, Some(a)) => a.len(),
            (None, None) => {
                return Err(cfg_err(
                    src,
                    "missing `llama.vocab_size` and `tokenizer.ggml.tokens`",
                ))
            }
        };
        let head_dim =
            int("llama.attention.key_length")?.unwrap_or(hidden.checked_div(heads).unwrap_or(0));
        let has_output = g.tensors().iter().any(|t| t.name == "output.weight");
        let scaling_type = g
            .typed("llama.rope.scaling.type", "a string", GgufValue::as_str)
            .map_err(|e| cfg_err(src, e))?;
        let token_id = |k: &str| -> Result<Option<u32>, ModelError> {
            int(k)?
                .map(|x| {
                    u32::try_from(x).map_err(|_| {
                        cfg_err(src, format!("GGUF key `{k}`: token id {x} is too large"))
                    })
                })
                .transpose()
        };
        let cfg = LlamaConfig {
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: req("llama.feed_forward_length")?,
            num_hidden_layers: req("llama.block_count")?,
            num_attention_heads: heads,
            num_key_value_heads: int("llama.attention.head_count_kv")?.unwrap_or(heads),
            head_dim,
            rms_norm_eps: float("llama.attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
            rope_theta: float("llama.rope.freq_base")?.unwrap_or(10000.0),
            // As llama.cpp reads them: the type defaults to linear, the factor to the older
            // `rope.scale_linear`, then to 1 (none).
            rope_scaling: match scaling_type.unwrap_or("linear") {
                "none" => RopeScaling::Default,
                "linear" => {
                    let factor = match float("llama.rope.scaling.factor")? {
                        Some(f) => f,
                        None => float("llama.rope.scale_linear")?.unwrap_or(1.0),
                    };
                    if !(factor.is_finite() && factor > 0.0) {
                        return Err(cfg_err(
                            src,
                            format!("linear RoPE scaling needs a positive factor, not {factor}"),
                        ));
                    }
                    if factor == 1.0 {
                        RopeScaling::Default
                    } else {
                        RopeScaling::Linear { factor }
                    }
                }
                other => {
                    return Err(cfg_err(
                        src,
                        format!("RoPE scaling `{other}` is not supported yet"),
                    ))
                }
            },
            tie_word_embeddings: !has_output,
            max_position_embeddings: int("llama.context_length")?.unwrap_or(2048),
            attention_bias: g.tensors().iter().any(|t| t.name == "blk.0.attn_q.bias"),
            mlp_bias: false,
            bos_token_id: token_id("tokenizer.ggml.bos_token_id")?,
            eos_token_ids: token_id("tokenizer.ggml.eos_token_id")?
                .map(|x| vec![x])
                .unwrap_or_default(),
        };
        // Llama 3.1's scaling travels as per-dimension divisors of the frequencies, a tensor
        // this loader does not apply yet: refused rather than run with plain RoPE.
        if g.tensors().iter().any(|t| t.name == "rope_freqs.weight") {
            return Err(cfg_err(
                src,
                "per-dimension RoPE frequency factors (`rope_freqs.weight`, Llama 3.1 and later) \
                 are not supported yet in GGUF files; the Hugging Face checkpoint's `llama3` \
                 scaling is",
            ));
        }
        cfg.validate(src)?;
        Ok(cfg)
    }

    fn validate(&self, src: &str) -> Result<(), ModelError> {
        let sizes = [
            ("vocab_size", self.vocab_size, MAX_CONFIG_DIM),
            ("hidden_size", self.hidden_size, MAX_CONFIG_DIM),
            ("intermediate_size", self.intermediate_size, MAX_CONFIG_DIM),
            (
                "num_hidden_layers",
                self.num_hidden_layers,
                MAX_CONFIG_LAYERS,
            ),
            (
                "num_attention_heads",
                self.num_attention_heads,
                MAX_CONFIG_DIM,
            ),
            (
                "num_key_value_heads",
                self.num_key_value_heads,
                MAX_CONFIG_DIM,
            ),
            ("head_dim", self.head_dim, MAX_CONFIG_DIM),
        ];
        for (k, v, max) in sizes {
            if v == 0 {
                return Err(cfg_err(src, format!("`{k}` must be positive")));
            }
            if v > max {
                return Err(cfg_err(
                    src,
                    format!("`{k}` ({v}) is over the limit of {max}"),
                ));
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(cfg_err(
                src,
                format!(
                    "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                    self.num_attention_heads, self.num_key_value_heads
                ),
            ));
        }
        if self.head_dim % 2 != 0 {
            return Err(cfg_err(
                src,
                format!(
                    "head_dim ({}) must be even for rotary embeddings",
                    self.head_dim
                ),
            ));
        }
        if !(self.rope_theta > 0.0) || !(self.rms_norm_eps >= 0.0) {
            return Err(cfg_err(
                src,
                "rope_theta must be positive and rms_norm_eps non-negative",
            ));
        }
        match self.parameter_count() {
            Some(n) if n <= MAX_CONFIG_PARAMETERS => Ok(()),
            _ => Err(cfg_err(
                src,
                format!("the model would have over {MAX_CONFIG_PARAMETERS} parameters"),
            )),
        }
    }

    /// How many parameters the model has (`parameters()`; `None` if the count overflows).
    /// Within the size limits no dimension of a shape overflows, only their products.
    fn parameter_count(&self) -> Option<u64> {
        self.parameters()
            .iter()
            .try_fold(0u64, |total, (_, shape)| {
                let n = shape
                    .iter()
                    .try_fold(1u64, |a, d| a.checked_mul(*d as u64))?;
                total.checked_add(n)
            })
    }

    /// Every parameter of the model: Hugging Face name and shape.
    pub fn parameters(&self) -> Vec<(String, Vec<usize>)> {
        let (h, d) = (self.hidden_size, self.head_dim);
        let (q, kv, f) = (
            self.num_attention_heads * d,
            self.num_key_value_heads * d,
            self.intermediate_size,
        );
        let mut p = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, h],
        )];
        for i in 0..self.num_hidden_layers {
            let l = format!("model.layers.{i}");
            p.push((format!("{l}.input_layernorm.weight"), vec![h]));
            p.push((format!("{l}.self_attn.q_proj.weight"), vec![q, h]));
            p.push((format!("{l}.self_attn.k_proj.weight"), vec![kv, h]));
            p.push((format!("{l}.self_attn.v_proj.weight"), vec![kv, h]));
            if self.attention_bias {
                p.push((format!("{l}.self_attn.q_proj.bias"), vec![q]));
                p.push((format!("{l}.self_attn.k_proj.bias"), vec![kv]));
                p.push((format!("{l}.self_attn.v_proj.bias"), vec![kv]));
            }
            p.push((format!("{l}.self_attn.o_proj.weight"), vec![h, q]));
            if self.attention_bias {
                p.push((format!("{l}.self_attn.o_proj.bias"), vec![h]));
            }
            p.push((format!("{l}.post_attention_layernorm.weight"), vec![h]));
            p.push((format!("{l}.mlp.gate_proj.weight"), vec![f, h]));
            p.push((format!("{l}.mlp.up_proj.weight"), vec![f, h]));
            p.push((format!("{l}.mlp.down_proj.weight"), vec![h, f]));
            if self.mlp_bias {
                p.push((format!("{l}.mlp.gate_proj.bias"), vec![f]));
                p.push((format!("{l}.mlp.up_proj.bias"), vec![f]));
                p.push((format!("{l}.mlp.down_proj.bias"), vec![h]));
            }
        }
        p.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            p.push(("lm_head.weight".to_string(), vec![self.vocab_size, h]));
        }
        p
    }

    /// The config as a Hugging Face `config.json` object (for `egret convert`).
    pub fn to_hf_json(&self) -> Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.to_hf_json(),
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": match self.eos_token_ids.as_slice() { [one] => serde_json::json!(one), many => serde_json::json!(many) },
            "torch_dtype": "float32",
        })
    }
}
