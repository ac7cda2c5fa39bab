//! Token sampling on the host: greedy, temperature, top-k, top-p, min-p and a repetition
//! penalty, seeded for reproducible output. Greedy runs on the GPU (argmax kernel) instead.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Clone, Debug)]
pub struct SamplerConfig {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1.0 disables.
    pub top_p: f32,
    /// 0 disables.
    pub min_p: f32,
    /// 1.0 disables.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.0,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 42,
        }
    }
}

impl SamplerConfig {
    /// Greedy sampling needs only the argmax, which the GPU computes.
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 && self.repeat_penalty == 1.0
    }
}

pub struct Sampler {
    pub config: SamplerConfig,
    rng: StdRng,
}

impl Sampler {
    pub fn new(config: SamplerConfig) -> Sampler {
        let rng = StdRng::seed_from_u64(config.seed);
        Sampler { config, rng }
    }

    /// Picks the next token from `logits`, given the recent history.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let c = &self.config;
        if c.repeat_penalty != 1.0 {
            let start = history.len().saturating_sub(c.repeat_last_n);
            for &t in &history[start..] {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / c.repeat_penalty
                    } else {
                        *l * c.repeat_penalty
                    };
                }
            }
        }
        if c.temperature <= 0.0 {
            return argmax(logits);
        }
        let cand = logits
            .iter()
            .enumerate()
            .map(|(i, l)| (i as u32, *l))
            .collect();
        self.sample_candidates(cand)
    }

    /// The k for which the GPU's top-k gives the same distribution as all logits: no
    /// penalty to apply first, and a k the kernel can return.
    pub fn gpu_top_k(&self) -> Option<usize> {
        let c = &self.config;
        let ok = c.temperature > 0.0
            && c.repeat_penalty == 1.0
            && (1..=super::session::TOPK_CAP).contains(&c.top_k);
        ok.then_some(c.top_k)
    }

    /// Samples from (id, logit) candidates: temperature, top-k, min-p, top-p.
    pub fn sample_candidates(&mut self, cand: Vec<(u32, f32)>) -> u32 {
        let c = &self.config;
        // Candidates sorted by logit, cut by top-k.
        let mut cand: Vec<(u32, f32)> = cand
            .into_iter()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, l)| (i, l / c.temperature.max(1e-6)))
            .collect();
        if cand.is_empty() {
            return 0;
        }
        let k = if c.top_k == 0 {
            cand.len()
        } else {
            c.top_k.min(cand.len())
        };
        if k < cand.len() {
            cand.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
            cand.truncate(k);
        }
        cand.sort_by(|a, b| b.1.total_cmp(&a.1));
        // Softmax.
        let max = cand[0].1;
        let mut probs: Vec<f32> = cand.iter().map(|(_, l)| (l - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        // min-p: drop tokens below min_p × the top probability.
        let mut keep = probs.len();
        if c.min_p > 0.0 {
            let floor = probs[0] * c.min_p;
            keep = probs.iter().take_while(|p| **p >= floor).count().max(1);
        }
        // top-p: the smallest prefix whose mass reaches top_p.
        if c.top_p < 1.0 {
            let mut acc = 0.0;
            let mut n = 0;
            for p in &probs[..keep] {
                acc += p;
                n += 1;
                if acc >= c.top_p {
                    break;
                }
            }
            keep = n.max(1);
        }
        let total: f32 = probs[..keep].iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for i in 0..keep {
            r -= probs[i];
            if r <= 0.0 {
                return cand[i].0;
            }
        }
        cand[keep - 1].0
    }
}

pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_max_and_penalty_demotes_repeats() {
        let mut s = Sampler::new(SamplerConfig {
            temperature: 0.0,
            repeat_penalty: 4.0,
            ..Default::default()
        });
        let mut l = vec![0.1, 2.0, 1.0];
        assert_eq!(s.sample(&mut l.clone(), &[]), 1);
        assert_eq!(s.sample(&mut l, &[1]), 2);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_respects_top_k() {
        let cfg = SamplerConfig {
            temperature: 1.0,
            top_k: 2,
            top_p: 1.0,
            min_p: 0.0,
            seed: 7,
            ..Default::default()
        };
        let logits = vec![3.0, 2.9, -1.0, 2.8];
        let draw = |cfg: &SamplerConfig| {
            let mut s = Sampler::new(cfg.clone());
            (0..50)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        let a = draw(&cfg);
        assert_eq!(a, draw(&cfg));
        assert!(a.iter().all(|t| *t == 0 || *t == 1));
        assert!(a.contains(&0) && a.contains(&1));
    }

    #[test]
    fn min_p_and_top_p_cut_the_tail() {
        let cfg = SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            min_p: 0.0,
            seed: 1,
            ..Default::default()
        };
        let mut s = Sampler::new(cfg);
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [5.0, 1.0, 1.0, 1.0], &[]), 0);
        }
    }
}
