//! Fitting the pre-gating router to the carved model's own routing: the targets are the
//! experts each layer chose for each calibration token (a recorded expert trace). The loss
//! is Read-ME's: cross-entropy to the best-scoring expert plus a soft-label term spread
//! over the whole chosen set. Steps are Adagrad, sparse in the features (a position
//! touches three feature rows), so a pass over thousands of tokens takes about a second.

use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::{top_k, Body, PreGateRouter, RouterArch, RouterConfig, FAMILIES};
use crate::error::{Error, Result};
use crate::moe::ExpertTrace;

#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Passes over the training tokens.
    pub steps: usize,
    /// Adagrad's step (None: the architecture's default).
    pub learning_rate: Option<f32>,
    pub arch: RouterArch,
    /// `mlp`: embedding and hidden width (Read-ME's tiny router uses 64).
    pub hidden: usize,
    /// Share of the tokens (the last ones) kept out of training to measure accuracy.
    pub holdout: f64,
    /// Weight of the soft label over the chosen set (the rest goes to the best expert).
    pub soft_weight: f32,
    pub buckets: usize,
    pub seed: u64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            steps: 6,
            learning_rate: None,
            arch: RouterArch::Ngram,
            hidden: 64,
            holdout: 0.1,
            soft_weight: 0.5,
            buckets: 4096,
            seed: 7,
        }
    }
}

/// How often the predicted top-k set holds the experts the backbone chose (their recall).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Accuracy {
    pub per_layer: Vec<f64>,
    pub mean: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct TrainReport {
    pub config: RouterConfig,
    pub train_tokens: usize,
    pub heldout_tokens: usize,
    /// Mean loss over each pass (measured while it trains).
    pub loss: Vec<f64>,
    /// The router on held-out tokens.
    pub heldout: Accuracy,
    /// Always predicting each layer's most frequent experts (from the training tokens).
    pub baseline: Accuracy,
    /// CPU time to predict every layer's experts for one token (measured on the held-out
    /// tokens, one thread).
    pub predict_us_per_token: f64,
}

/// The chosen experts of token `t`, layer `l`.
fn chosen(trace: &ExpertTrace, t: usize, l: usize) -> &[u16] {
    let k = trace.k as usize;
    let at = (t * trace.n_layers as usize + l) * k;
    &trace.choices[at..at + k]
}

fn recall(predicted: &[u32], truth: &[u16]) -> f64 {
    let hit = truth
        .iter()
        .filter(|e| predicted.contains(&(**e as u32)))
        .count();
    hit as f64 / truth.len().max(1) as f64
}

fn accuracy(per_layer_sum: Vec<f64>, n: usize) -> Accuracy {
    let per_layer: Vec<f64> = per_layer_sum.iter().map(|s| s / n.max(1) as f64).collect();
    let mean = per_layer.iter().sum::<f64>() / per_layer.len().max(1) as f64;
    Accuracy { per_layer, mean }
}

/// Read-ME's loss for one layer: the target is the best expert (the backbone's first pick)
/// plus a soft share for each chosen one, summing to 1. Turns `logits` into dLoss/dlogits
/// (softmax minus target) and returns the loss.
fn readme_loss_grad(
    logits: &mut [f32],
    chosen: &[u16],
    opts: &TrainOptions,
    k: usize,
    target: &mut [f32],
) -> f64 {
    target.fill(0.0);
    for &ci in chosen {
        target[ci as usize] += opts.soft_weight / k as f32;
    }
    target[chosen[0] as usize] += 1.0 - opts.soft_weight;
    let mx = logits.iter().fold(f32::MIN, |a, b| a.max(*b));
    let sum: f32 = logits.iter().map(|z| (z - mx).exp()).sum();
    let mut loss = 0f64;
    for (z, tg) in logits.iter_mut().zip(target.iter()) {
        let p = (*z - mx).exp() / sum;
        if *tg > 0.0 {
            loss -= *tg as f64 * (p.max(1e-12) as f64).ln();
        }
        *z = p - tg;
    }
    loss
}

/// The router's accuracy on positions `range` of `tokens`.
pub fn evaluate(
    router: &PreGateRouter,
    tokens: &[u32],
    trace: &ExpertTrace,
    range: std::ops::Range<usize>,
) -> Accuracy {
    let k = trace.k as usize;
    let mut sums = vec![0f64; trace.n_layers as usize];
    for t in range.clone() {
        for (l, p) in router.predict(tokens, t, k).iter().enumerate() {
            sums[l] += recall(p, chosen(trace, t, l));
        }
    }
    accuracy(sums, range.len())
}

/// Trains a router on `tokens` and the experts `trace` recorded for them;
/// `progress(step, steps, loss)` after each pass.
pub fn train(
    tokens: &[u32],
    trace: &ExpertTrace,
    opts: &TrainOptions,
    mut progress: impl FnMut(usize, usize, f64),
) -> Result<(PreGateRouter, TrainReport)> {
    if trace.n_tokens() != tokens.len() {
        return Err(Error::InvalidArgument(format!(
            "the trace has {} tokens, the text {}",
            trace.n_tokens(),
            tokens.len()
        )));
    }
    let n_train = ((tokens.len() as f64) * (1.0 - opts.holdout)).round() as usize;
    if n_train < 16 || n_train >= tokens.len() {
        return Err(Error::InvalidArgument(format!(
            "{} tokens leave too few to train on or to hold out; give more text",
            tokens.len()
        )));
    }
    let config = RouterConfig {
        n_layer: trace.n_layers as usize,
        n_expert: trace.experts_per_layer as usize,
        n_used: trace.k as usize,
        buckets: opts.buckets,
        arch: opts.arch,
        hidden: match opts.arch {
            RouterArch::Ngram => 0,
            RouterArch::Mlp => opts.hidden,
        },
    };
    let mut r = PreGateRouter::new(config, opts.seed)?;
    let lr = opts.learning_rate.unwrap_or(match opts.arch {
        RouterArch::Ngram => 0.2,
        RouterArch::Mlp => 0.02,
    });
    let (layers, e, k) = (config.n_layer, config.n_expert, config.n_used);
    let rows = FAMILIES * config.buckets;
    let mut acc_bias = vec![0f32; r.bias.len()];
    let (mut acc_table, mut acc_mlp) = match &r.body {
        Body::Table(w) => (vec![0f32; w.len()], None),
        Body::Mlp(m) => (Vec::new(), Some(m.zeros_like())),
    };
    let mut order: Vec<usize> = (0..n_train).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    // Logits of every layer, then in place their gradient.
    let mut grad = vec![0f32; layers * e];
    let mut target = vec![0f32; e];
    let mut losses = Vec::with_capacity(opts.steps);
    let adagrad = |w: &mut f32, a: &mut f32, g: f32| {
        *a += g * g;
        *w -= lr * g / (a.sqrt() + 1e-6);
    };
    for step in 0..opts.steps.max(1) {
        order.shuffle(&mut rng);
        let mut loss_sum = 0f64;
        for &t in &order {
            let f = r.features(tokens, t);
            let fw = r.logits_into(&f, &mut grad);
            for l in 0..layers {
                let c = chosen(trace, t, l);
                loss_sum +=
                    readme_loss_grad(&mut grad[l * e..(l + 1) * e], c, opts, k, &mut target);
            }
            for (i, g) in grad.iter().enumerate() {
                adagrad(&mut r.bias[i], &mut acc_bias[i], *g);
            }
            match &mut r.body {
                Body::Table(w) => {
                    for l in 0..layers {
                        for &row in &f {
                            let at = (l * rows + row) * e;
                            for i in 0..e {
                                let g = grad[l * e + i];
                                adagrad(&mut w[at + i], &mut acc_table[at + i], g);
                            }
                        }
                    }
                }
                Body::Mlp(m) => {
                    if let (Some(acc), Some(fw)) = (acc_mlp.as_mut(), &fw) {
                        m.step(&f, fw, &grad, acc, lr);
                    }
                }
            }
        }
        let loss = loss_sum / (n_train * layers) as f64;
        losses.push(loss);
        progress(step + 1, opts.steps.max(1), loss);
    }
    // The majority baseline: each layer's k most frequent experts in the training tokens.
    let mut counts = vec![0f32; layers * e];
    for t in 0..n_train {
        for l in 0..layers {
            for &c in chosen(trace, t, l) {
                counts[l * e + c as usize] += 1.0;
            }
        }
    }
    let majority: Vec<Vec<u32>> = (0..layers)
        .map(|l| top_k(&counts[l * e..(l + 1) * e], k))
        .collect();
    let mut base = vec![0f64; layers];
    for t in n_train..tokens.len() {
        for (l, b) in base.iter_mut().enumerate() {
            *b += recall(&majority[l], chosen(trace, t, l));
        }
    }
    let t0 = std::time::Instant::now();
    let heldout = evaluate(&r, tokens, trace, n_train..tokens.len());
    let predict_us_per_token = t0.elapsed().as_secs_f64() * 1e6 / (tokens.len() - n_train) as f64;
    let report = TrainReport {
        config,
        train_tokens: n_train,
        heldout_tokens: tokens.len() - n_train,
        loss: losses,
        heldout,
        baseline: accuracy(base, tokens.len() - n_train),
        predict_us_per_token,
    };
    Ok((r, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A synthetic trace where each layer's experts are a function of the token (and, in
    /// layer 1, of the previous token too): learnable from n-grams.
    fn synthetic(n: usize) -> (Vec<u32>, ExpertTrace) {
        let mut s = 12345u64;
        let tokens: Vec<u32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) % 20) as u32
            })
            .collect();
        let mut choices = Vec::new();
        for t in 0..n {
            let prev = if t > 0 { tokens[t - 1] } else { 0 };
            let a = (tokens[t] % 8) as u16;
            choices.extend([a, (a + 1) % 8]);
            let b = ((tokens[t] + prev) % 8) as u16;
            choices.extend([b, (b + 3) % 8]);
        }
        let trace = ExpertTrace {
            n_layers: 2,
            experts_per_layer: 8,
            k: 2,
            choices,
            plan: None,
        };
        (tokens, trace)
    }

    #[test]
    fn training_lowers_the_loss_and_beats_the_majority_baseline() {
        let (tokens, trace) = synthetic(3000);
        let opts = TrainOptions {
            buckets: 512,
            ..Default::default()
        };
        let (router, report) = train(&tokens, &trace, &opts, |_, _, _| {}).unwrap();
        assert!(
            report.loss.last().unwrap() < &(0.8 * report.loss[0]),
            "{:?}",
            report.loss
        );
        assert!(report.heldout.mean > 0.9, "{report:?}");
        assert!(
            report.heldout.mean > report.baseline.mean + 0.3,
            "{report:?}"
        );
        // Saved and loaded, it predicts the same.
        let path =
            std::env::temp_dir().join(format!("pregate-router-{}.safetensors", std::process::id()));
        router.save(&path).unwrap();
        let back = PreGateRouter::load(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        for t in [0, 5, 2999] {
            assert_eq!(back.predict(&tokens, t, 2), router.predict(&tokens, t, 2));
        }
    }

    #[test]
    fn the_mlp_router_learns_too_and_survives_a_round_trip() {
        let (tokens, trace) = synthetic(3000);
        let opts = TrainOptions {
            buckets: 512,
            arch: RouterArch::Mlp,
            hidden: 32,
            ..Default::default()
        };
        let (router, report) = train(&tokens, &trace, &opts, |_, _, _| {}).unwrap();
        assert!(
            report.loss.last().unwrap() < &report.loss[0],
            "{:?}",
            report.loss
        );
        assert!(
            report.heldout.mean > report.baseline.mean + 0.3,
            "{report:?}"
        );
        let path =
            std::env::temp_dir().join(format!("pregate-mlp-{}.safetensors", std::process::id()));
        router.save(&path).unwrap();
        let back = PreGateRouter::load(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(back.config, router.config);
        for t in [0, 5, 2999] {
            assert_eq!(back.predict(&tokens, t, 2), router.predict(&tokens, t, 2));
        }
    }

    #[test]
    fn bad_input_is_an_error() {
        let (tokens, trace) = synthetic(100);
        assert!(train(
            &tokens[..50],
            &trace,
            &TrainOptions::default(),
            |_, _, _| {}
        )
        .is_err());
        assert!(train(
            &tokens[..10],
            &ExpertTrace {
                choices: trace.choices[..40].to_vec(),
                ..trace.clone()
            },
            &TrainOptions::default(),
            |_, _, _| {}
        )
        .is_err());
        let path = std::env::temp_dir().join(format!("pregate-not-router-{}", std::process::id()));
        std::fs::write(&path, b"not safetensors").unwrap();
        assert!(PreGateRouter::load(&path).is_err());
        std::fs::remove_file(&path).unwrap();
    }
}
