//! The LLaMA graph, spelled from IR primitives exactly as Hugging Face's `LlamaForCausalLM`
//! computes it: pre-norm RMSNorm, rotary embeddings (rotate-half form), causal grouped-query
//! attention with a max-subtracted softmax, SwiGLU MLP, residual adds, final norm, LM head.
//!
//! One definition serves both graphs. `Prefill` takes `tokens` and `positions` (`i64[B, T]`)
//! and returns `logits` (`f32[B, T, V]`) and each layer's keys and values
//! (`present_key.{i}`, `present_value.{i}`: `f32[B, Hkv, T, D]`). `Decode` also takes the
//! cache `past_key.{i}`/`past_value.{i}` (`f32[B, Hkv, P, D]`) and attends over `P+T` keys.
//! Key `j` is visible to query `i` iff `j <= positions[i]` (the cache holds positions `0..P`).
//! `PrefillLogitsAt` and `Step` (prefill and decode) compute logits only at the positions
//! in `logits_at`.

use egret_ir::{BinaryOp, CompareOp, DType, Dim, Graph, ReduceOp, UnaryOp, ValueId};

use crate::config::{LlamaConfig, RopeScaling};
use crate::ModelError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GraphKind {
    /// Logits at every position.
    Prefill,
    /// Logits only at the positions in the input `logits_at` (`i64[L]`): generation needs
    /// the last one alone, and the LM head over every prompt position is a fifth of a short
    /// prompt's work.
    PrefillLogitsAt,
    /// Also takes the cache (`past_key.{i}`, `past_value.{i}`) and attends over `P+T` keys.
    Decode,
    /// `Decode` with logits only at `logits_at`: one graph for a whole generation, the
    /// prompt (`P = 0`) and then each new token (`T = 1`) over the cache.
    Step,
}

impl GraphKind {
    pub fn name(self) -> &'static str {
        match self {
            GraphKind::Prefill => "prefill",
            GraphKind::PrefillLogitsAt => "prefill_at",
            GraphKind::Decode => "decode",
            GraphKind::Step => "step",
        }
    }
}

type R<T> = Result<T, ModelError>;

struct Builder<'a> {
    g: Graph,
    cfg: &'a LlamaConfig,
    b: Dim,
    t: Dim,
}

impl Builder<'_> {
    fn c(&self, v: usize) -> Dim {
        Dim::c(v as i64)
    }

    /// `x @ Wᵀ (+ bias)` for a Hugging Face linear weight `W: [out, in]`.
    fn linear(&mut self, x: ValueId, name: &str, out: usize, inp: usize, bias: bool) -> R<ValueId> {
        let w = self.g.param(
            &format!("{name}.weight"),
            DType::F32,
            vec![self.c(out), self.c(inp)],
        );
        let wt = self.g.permute(w, vec![1, 0])?;
        let y = self.g.matmul(x, wt)?;
        if !bias {
            return Ok(y);
        }
        let bv = self
            .g
            .param(&format!("{name}.bias"), DType::F32, vec![self.c(out)]);
        let shape = self.g.shape(y).to_vec();
        let bb = self.g.broadcast_to(bv, &shape)?;
        Ok(self.g.binary(BinaryOp::Add, y, bb)?)
    }

    /// RMSNorm over the last axis: `w * (x * rsqrt(mean(x²) + eps))`.
    fn rms_norm(&mut self, x: ValueId, name: &str) -> R<ValueId> {
        let h = self.cfg.hidden_size;
        let shape = self.g.shape(x).to_vec();
        let axis = shape.len() - 1;
        let sq = self.g.binary(BinaryOp::Mul, x, x)?;
        let var = self.g.reduce(ReduceOp::Mean, sq, axis)?;
        let eps = self.g.constant_like(self.cfg.rms_norm_eps, var);
        let var = self.g.binary(BinaryOp::Add, var, eps)?;
        let r = self.g.unary(UnaryOp::Rsqrt, var)?;
        let r = self.g.broadcast(r, shape.clone())?;
        let xn = self.g.binary(BinaryOp::Mul, x, r)?;
        let w = self
            .g
            .param(&format!("{name}.weight"), DType::F32, vec![self.c(h)]);
        let w = self.g.broadcast_to(w, &shape)?;
        Ok(self.g.binary(BinaryOp::Mul, w, xn)?)
    }

    /// `cos` and `sin` of the rotary angles, `[B, 1, T, D]`:
    /// `angle[b, t, i] = positions[b, t] / theta^(2(i mod D/2)/D)`.
    fn rope_tables(&mut self, positions: ValueId) -> R<(ValueId, ValueId)> {
        let d = self.cfg.head_dim;
        let half = self.c(d / 2);
        let i = self.g.iota(0, DType::F32, vec![half.clone()])?;
        let two = self.g.constant_like(2.0, i);
        let i2 = self.g.binary(BinaryOp::Mul, i, two)?;
        let dd = self.g.constant_like(d as f64, i);
        let expo = self.g.binary(BinaryOp::Div, i2, dd)?;
        let theta = self.g.constant_like(self.cfg.rope_theta, i);
        let denom = self.g.binary(BinaryOp::Pow, theta, expo)?;
        let inv_freq = self.g.unary(UnaryOp::Recip, denom)?;
        let inv_freq = self.rope_scaled(inv_freq)?;
        let (b, t) = (self.b.clone(), self.t.clone());
        let pos = self.g.cast(positions, DType::F32)?;
        let pos = self.g.reshape(pos, vec![b.clone(), t.clone(), Dim::c(1)])?;
        let grid = vec![b.clone(), t.clone(), half];
        let pos = self.g.broadcast(pos, grid.clone())?;
        let inv = self.g.broadcast_to(inv_freq, &grid)?;
        let freqs = self.g.binary(BinaryOp::Mul, pos, inv)?;
        let emb = self.g.concat(&[freqs, freqs], 2)?;
        let emb = self.g.reshape(emb, vec![b, Dim::c(1), t, self.c(d)])?;
        let cos = self.g.unary(UnaryOp::Cos, emb)?;
        let sin = self.g.unary(UnaryOp::Sin, emb)?;
        Ok((cos, sin))
    }

    /// The frequencies `inv` rescaled by the configuration's `RopeScaling`, in f32 in the
    /// order Hugging Face's `rope_init_fn`s compute them.
    fn rope_scaled(&mut self, inv: ValueId) -> R<ValueId> {
        let g = &mut self.g;
        match self.cfg.rope_scaling {
            RopeScaling::Default => Ok(inv),
            RopeScaling::Linear { factor } => {
                let f = g.constant_like(factor, inv);
                Ok(g.binary(BinaryOp::Div, inv, f)?)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: old,
            } => {
                let old = old as f64;
                let c = |g: &mut Graph, v: f64| g.constant_like(v, inv);
                // (`c / x` as torch computes a scalar over a tensor: `c · (1 / x)`)
                let recip = g.unary(UnaryOp::Recip, inv)?;
                let two_pi = c(g, std::f64::consts::TAU);
                let wavelen = g.binary(BinaryOp::Mul, recip, two_pi)?;
                let f = c(g, factor);
                let divided = g.binary(BinaryOp::Div, inv, f)?;
                // s = (L / λ − low) / (high − low)
                let l = c(g, old);
                let per_wave = g.unary(UnaryOp::Recip, wavelen)?;
                let ratio = g.binary(BinaryOp::Mul, per_wave, l)?;
                let lo = c(g, low);
                let num = g.binary(BinaryOp::Sub, ratio, lo)?;
                let span = c(g, high - low);
                let s = g.binary(BinaryOp::Div, num, span)?;
                // (1 − s)·inv / factor + s·inv
                let one = c(g, 1.0);
                let rest = g.binary(BinaryOp::Sub, one, s)?;
                let a = g.binary(BinaryOp::Mul, rest, inv)?;
                let a = g.binary(BinaryOp::Div, a, f)?;
                let b = g.binary(BinaryOp::Mul, s, inv)?;
                let smoothed = g.binary(BinaryOp::Add, a, b)?;
                let high_wl = c(g, old / high);
                let short = g.compare(CompareOp::Lt, wavelen, high_wl)?;
                let mid_or_short = g.select(short, inv, smoothed)?;
                let low_wl = c(g, old / low);
                let long = g.compare(CompareOp::Gt, wavelen, low_wl)?;
                Ok(g.select(long, divided, mid_or_short)?)
            }
        }
    }

    /// `x * cos + rotate_half(x) * sin`, `rotate_half(x) = concat(-x[.., D/2:], x[.., :D/2])`.
    fn rope(&mut self, x: ValueId, cos: ValueId, sin: ValueId) -> R<ValueId> {
        let d = self.cfg.head_dim;
        let shape = self.g.shape(x).to_vec();
        let x1 = self.g.slice(x, 3, 0, d / 2)?;
        let x2 = self.g.slice(x, 3, d / 2, d)?;
        let nx2 = self.g.unary(UnaryOp::Neg, x2)?;
        let rot = self.g.concat(&[nx2, x1], 3)?;
        let cos = self.g.broadcast(cos, shape.clone())?;
        let sin = self.g.broadcast(sin, shape)?;
        let a = self.g.binary(BinaryOp::Mul, x, cos)?;
        let r = self.g.binary(BinaryOp::Mul, rot, sin)?;
        Ok(self.g.binary(BinaryOp::Add, a, r)?)
    }

    /// `[B, T, H·D] -> [B, H, T, D]`.
    fn split_heads(&mut self, x: ValueId, heads: usize) -> R<ValueId> {
        let d = self.cfg.head_dim;
        let x = self.g.reshape(
            x,
            vec![self.b.clone(), self.t.clone(), self.c(heads), self.c(d)],
        )?;
        Ok(self.g.permute(x, vec![0, 2, 1, 3])?)
    }

    /// Repeats each KV head `rep` times: `[B, Hkv, S, D] -> [B, Hkv·rep, S, D]`.
    fn repeat_kv(&mut self, x: ValueId, rep: usize) -> R<ValueId> {
        if rep == 1 {
            return Ok(x);
        }
        let s = self.g.shape(x).to_vec();
        let x = self.g.reshape(
            x,
            vec![
                s[0].clone(),
                s[1].clone(),
                Dim::c(1),
                s[2].clone(),
                s[3].clone(),
            ],
        )?;
        let x = self.g.broadcast(
            x,
            vec![
                s[0].clone(),
                s[1].clone(),
                self.c(rep),
                s[2].clone(),
                s[3].clone(),
            ],
        )?;
        let heads = self.c(self.cfg.num_attention_heads);
        Ok(self
            .g
            .reshape(x, vec![s[0].clone(), heads, s[2].clone(), s[3].clone()])?)
    }

    fn layer(
        &mut self,
        i: usize,
        x: ValueId,
        rope: (ValueId, ValueId),
        mask: ValueId,
        kind: GraphKind,
    ) -> R<ValueId> {
        let cfg = self.cfg;
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (hq, hkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let l = format!("model.layers.{i}");
        let xn = self.rms_norm(x, &format!("{l}.input_layernorm"))?;
        let q = self.linear(
            xn,
            &format!("{l}.self_attn.q_proj"),
            hq * d,
            h,
            cfg.attention_bias,
        )?;
        let k = self.linear(
            xn,
            &format!("{l}.self_attn.k_proj"),
            hkv * d,
            h,
            cfg.attention_bias,
        )?;
        let v = self.linear(
            xn,
            &format!("{l}.self_attn.v_proj"),
            hkv * d,
            h,
            cfg.attention_bias,
        )?;
        let q = self.split_heads(q, hq)?;
        let k = self.split_heads(k, hkv)?;
        let v = self.split_heads(v, hkv)?;
        let q = self.rope(q, rope.0, rope.1)?;
        let k = self.rope(k, rope.0, rope.1)?;
        let (k, v) = match kind {
            GraphKind::Prefill | GraphKind::PrefillLogitsAt => (k, v),
            GraphKind::Decode | GraphKind::Step => {
                let cache = vec![self.b.clone(), self.c(hkv), Dim::sym("P"), self.c(d)];
                let pk = self
                    .g
                    .input(&format!("past_key.{i}"), DType::F32, cache.clone());
                let pv = self.g.input(&format!("past_value.{i}"), DType::F32, cache);
                (self.g.concat(&[pk, k], 2)?, self.g.concat(&[pv, v], 2)?)
            }
        };
        self.g.output(&format!("present_key.{i}"), k);
        self.g.output(&format!("present_value.{i}"), v);
        let k = self.repeat_kv(k, hq / hkv)?;
        let v = self.repeat_kv(v, hq / hkv)?;
        let kt = self.g.permute(k, vec![0, 1, 3, 2])?;
        let scores = self.g.matmul(q, kt)?;
        let scale = self.g.constant_like(1.0 / (d as f64).sqrt(), scores);
        let scores = self.g.binary(BinaryOp::Mul, scores, scale)?;
        let sshape = self.g.shape(scores).to_vec();
        let mask = self.g.broadcast(mask, sshape)?;
        let neg_inf = self.g.constant_like(f64::NEG_INFINITY, scores);
        let scores = self.g.select(mask, scores, neg_inf)?;
        let probs = self.softmax(scores)?;
        let o = self.g.matmul(probs, v)?;
        let o = self.g.permute(o, vec![0, 2, 1, 3])?;
        let o = self
            .g
            .reshape(o, vec![self.b.clone(), self.t.clone(), self.c(hq * d)])?;
        let o = self.linear(
            o,
            &format!("{l}.self_attn.o_proj"),
            h,
            hq * d,
            cfg.attention_bias,
        )?;
        let x = self.g.binary(BinaryOp::Add, x, o)?;
        let xn = self.rms_norm(x, &format!("{l}.post_attention_layernorm"))?;
        let f = cfg.intermediate_size;
        let gate = self.linear(xn, &format!("{l}.mlp.gate_proj"), f, h, cfg.mlp_bias)?;
        let up = self.linear(xn, &format!("{l}.mlp.up_proj"), f, h, cfg.mlp_bias)?;
        let sig = self.g.unary(UnaryOp::Sigmoid, gate)?;
        let silu = self.g.binary(BinaryOp::Mul, gate, sig)?;
        let act = self.g.binary(BinaryOp::Mul, silu, up)?;
        let down = self.linear(act, &format!("{l}.mlp.down_proj"), h, f, cfg.mlp_bias)?;
        Ok(self.g.binary(BinaryOp::Add, x, down)?)
    }

    /// Softmax over the last axis, max-subtracted: `exp(x - max x) / Σ exp(x - max x)`.
    fn softmax(&mut self, x: ValueId) -> R<ValueId> {
        let shape = self.g.shape(x).to_vec();
        let axis = shape.len() - 1;
        let m = self.g.reduce(ReduceOp::Max, x, axis)?;
        let m = self.g.broadcast(m, shape.clone())?;
        let z = self.g.binary(BinaryOp::Sub, x, m)?;
        let e = self.g.unary(UnaryOp::Exp, z)?;
        let s = self.g.reduce(ReduceOp::Sum, e, axis)?;
        let s = self.g.broadcast(s, shape)?;
        Ok(self.g.binary(BinaryOp::Div, e, s)?)
    }
}

/// Builds the prefill or decode graph of a LLaMA model.
pub fn build(cfg: &LlamaConfig, kind: GraphKind) -> Result<Graph, ModelError> {
    let (b, t) = (Dim::sym("B"), Dim::sym("T"));
    let mut bd = Builder {
        g: Graph::new(kind.name()),
        cfg,
        b: b.clone(),
        t: t.clone(),
    };
    let tokens = bd.g.input("tokens", DType::I64, vec![b.clone(), t.clone()]);
    let positions =
        bd.g.input("positions", DType::I64, vec![b.clone(), t.clone()]);
    let embed = bd.g.param(
        "model.embed_tokens.weight",
        DType::F32,
        vec![bd.c(cfg.vocab_size), bd.c(cfg.hidden_size)],
    );
    let mut x = bd.g.gather(embed, tokens, 0)?;
    let rope = bd.rope_tables(positions)?;
    // Causal mask [B, 1, T, S]: key position (iota over S) <= query position.
    let s = match kind {
        GraphKind::Prefill | GraphKind::PrefillLogitsAt => t.clone(),
        GraphKind::Decode | GraphKind::Step => Dim::sym("P").add(&t),
    };
    let grid = vec![b.clone(), Dim::c(1), t.clone(), s.clone()];
    let kpos = bd.g.iota(3, DType::I64, grid.clone())?;
    let qpos =
        bd.g.reshape(positions, vec![b.clone(), Dim::c(1), t.clone(), Dim::c(1)])?;
    let qpos = bd.g.broadcast(qpos, grid)?;
    let mask = bd.g.compare(CompareOp::Le, kpos, qpos)?;
    for i in 0..cfg.num_hidden_layers {
        x = bd.layer(i, x, rope, mask, kind)?;
    }
    if matches!(kind, GraphKind::PrefillLogitsAt | GraphKind::Step) {
        let at = bd.g.input("logits_at", DType::I64, vec![Dim::sym("L")]);
        x = bd.g.gather(x, at, 1)?;
    }
    let x = bd.rms_norm(x, "model.norm")?;
    let logits = if cfg.tie_word_embeddings {
        let wt = bd.g.permute(embed, vec![1, 0])?;
        bd.g.matmul(x, wt)?
    } else {
        bd.linear(x, "lm_head", cfg.vocab_size, cfg.hidden_size, false)?
    };
    // Outputs: logits first, then the caches in layer order.
    let mut g = bd.g;
    let caches = std::mem::take(&mut g.outputs);
    g.output("logits", logits);
    g.outputs.extend(caches);
    egret_ir::verify(&g)?;
    Ok(g)
}

/// The training graph: `Prefill`'s forward pass and `loss` (`f32[1, 1, 1]`), the mean
/// next-token cross-entropy. Input `targets` (`i64[B, T]`) holds the token each position
/// should predict (`tokens[t + 1]`), negative where there is none (the last position):
/// `loss = Σ_valid (logsumexp(logits) − logits[target]) / #valid`, with the log-sum-exp
/// taken after subtracting the row max. Differentiate it with `egret_passes::autodiff`.
pub fn build_training(cfg: &LlamaConfig) -> Result<Graph, ModelError> {
    let mut g = build(cfg, GraphKind::Prefill)?;
    g.name = "train".into();
    let logits = g
        .outputs
        .iter()
        .find(|(n, _)| n == "logits")
        .map(|(_, v)| *v)
        .expect("the forward graph returns logits");
    g.outputs.clear();
    let (b, t) = (Dim::sym("B"), Dim::sym("T"));
    let targets = g.input("targets", DType::I64, vec![b.clone(), t.clone()]);
    let loss = cross_entropy(&mut g, logits, targets)?;
    g.output("loss", loss);
    egret_ir::verify(&g)?;
    Ok(g)
}

/// Mean cross-entropy of `logits` (`[B, T, V]`) against `targets` (`[B, T]`, negative =
/// ignored), as `[1, 1, 1]`.
fn cross_entropy(g: &mut Graph, x: ValueId, targets: ValueId) -> Result<ValueId, ModelError> {
    let shape = g.shape(x).to_vec();
    let (b, t) = (shape[0].clone(), shape[1].clone());
    // The shift by the row maximum keeps exp in range; the result does not depend on it, so
    // no gradient flows through it (`stop_gradient`), which saves the backward its passes.
    let m = g.reduce(ReduceOp::Max, x, 2)?;
    let m = g.stop_gradient(m)?;
    let mb = g.broadcast(m, shape.clone())?;
    let d = g.binary(BinaryOp::Sub, x, mb)?;
    let e = g.unary(UnaryOp::Exp, d)?;
    let s = g.reduce(ReduceOp::Sum, e, 2)?;
    let ls = g.unary(UnaryOp::Log, s)?;
    let lse = g.binary(BinaryOp::Add, ls, m)?;
    let vocab = g.iota(2, DType::I64, shape.clone())?;
    let t1 = g.reshape(targets, vec![b.clone(), t.clone(), Dim::c(1)])?;
    let tb = g.broadcast(t1, shape)?;
    let hit = g.compare(CompareOp::Eq, vocab, tb)?;
    let zero = g.constant_like(0.0, x);
    let picked = g.select(hit, x, zero)?;
    let picked = g.reduce(ReduceOp::Sum, picked, 2)?;
    let nll = g.binary(BinaryOp::Sub, lse, picked)?;
    let z = g.constant(0.0, DType::I64, vec![b.clone(), t.clone(), Dim::c(1)]);
    let valid = g.compare(CompareOp::Ge, t1, z)?;
    let w = g.cast(valid, DType::F32)?;
    let nll = g.binary(BinaryOp::Mul, nll, w)?;
    let (mut total, mut count) = (nll, w);
    for axis in 0..2 {
        total = g.reduce(ReduceOp::Sum, total, axis)?;
        count = g.reduce(ReduceOp::Sum, count, axis)?;
    }
    Ok(g.binary(BinaryOp::Div, total, count)?)
}
