//! Next-token sampling: greedy (temperature 0) or seeded temperature + nucleus (top-p)
//! sampling. The generator is SplitMix64, so a seed gives the same tokens on every machine.

/// How to pick the next token from logits.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerConfig {
    /// 0 means greedy (argmax, lowest id on ties).
    pub temperature: f32,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1 = all).
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

pub struct Sampler {
    cfg: SamplerConfig,
    state: u64,
}

impl Sampler {
    pub fn new(cfg: SamplerConfig) -> Sampler {
        let state = cfg.seed;
        Sampler { cfg, state }
    }

    /// SplitMix64 (Steele et al.): a full-period 64-bit generator.
    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.cfg.temperature <= 0.0 || logits.len() <= 1 {
            return argmax(logits);
        }
        let t = self.cfg.temperature as f64;
        let max = logits
            .iter()
            .fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
        let mut probs: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &x)| (i as u32, ((x as f64 - max) / t).exp()))
            .collect();
        let total: f64 = probs.iter().map(|p| p.1).sum();
        if !(total > 0.0) || !total.is_finite() {
            return argmax(logits);
        }
        probs.iter_mut().for_each(|p| p.1 /= total);
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let top_p = self.cfg.top_p.clamp(0.0, 1.0) as f64;
        let mut keep = probs.len();
        if top_p < 1.0 {
            let mut acc = 0.0;
            for (i, p) in probs.iter().enumerate() {
                acc += p.1;
                if acc >= top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        let kept = &probs[..keep.max(1)];
        let mass: f64 = kept.iter().map(|p| p.1).sum();
        let mut r = self.next_f64() * mass;
        for p in kept {
            if r < p.1 {
                return p.0;
            }
            r -= p.1;
        }
        kept[kept.len() - 1].0
    }
}

/// Index of the largest logit; NaNs never win; the lowest index wins ties.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_with_lowest_tie() {
        let mut s = Sampler::new(SamplerConfig::default());
        assert_eq!(s.sample(&[0.0, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn seeded_sampling_repeats_and_follows_probabilities() {
        let cfg = SamplerConfig {
            temperature: 1.0,
            top_p: 1.0,
            seed: 7,
        };
        let logits = [0.0f32, (3.0f32).ln(), f32::NEG_INFINITY];
        let draw = |cfg: &SamplerConfig| {
            let mut s = Sampler::new(cfg.clone());
            (0..4000).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        let a = draw(&cfg);
        assert_eq!(a, draw(&cfg));
        let ones = a.iter().filter(|&&x| x == 1).count() as f64 / a.len() as f64;
        assert!((ones - 0.75).abs() < 0.03, "P(1) = {ones}");
        assert!(!a.contains(&2));
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        let cfg = SamplerConfig {
            temperature: 1.0,
            top_p: 0.5,
            seed: 1,
        };
        let mut s = Sampler::new(cfg);
        let logits = [(0.6f32).ln(), (0.3f32).ln(), (0.1f32).ln()];
        assert!((0..500).all(|_| s.sample(&logits) == 0));
    }
}
