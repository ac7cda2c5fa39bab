//! CMoE's training-free router, on the CPU: the same score the GPU's moe_route.wgsl
//! computes, used to tune the selection bias for load balance at carve time.

/// x · sigmoid(x), the SwiGLU gate activation.
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// Softmax over experts of |(x·u_e) · silu(x·g_e)| for one input `x`.
pub fn probabilities(x: &[f32], rg: &[f32], ru: &[f32]) -> Vec<f32> {
    let d = x.len();
    let dot = |w: &[f32]| w.iter().zip(x).map(|(a, b)| a * b).sum::<f32>();
    let scores: Vec<f32> = rg
        .chunks_exact(d)
        .zip(ru.chunks_exact(d))
        .map(|(g, u)| (dot(u) * silu(dot(g))).abs())
        .collect();
    let m = scores.iter().copied().fold(f32::MIN, f32::max);
    let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
    let sum: f32 = e.iter().sum();
    e.iter().map(|v| v / sum).collect()
}

/// The `k` experts of largest probability + bias (ties to the lower index, as on the GPU).
pub fn select(p: &[f32], bias: &[f32], k: usize) -> Vec<usize> {
    let mut taken = vec![false; p.len()];
    let mut out = Vec::with_capacity(k);
    for _ in 0..k.min(p.len()) {
        let mut best = usize::MAX;
        let mut best_v = f32::NEG_INFINITY;
        for e in 0..p.len() {
            // NaN (broken weights) ranks lowest, so an expert is always chosen.
            let v = p[e] + bias[e];
            let v = if v.is_nan() { f32::NEG_INFINITY } else { v };
            if !taken[e] && (best == usize::MAX || v > best_v) {
                best = e;
                best_v = v;
            }
        }
        taken[best] = true;
        out.push(best);
    }
    out
}

/// A per-expert bias that evens out how often each expert is selected on the calibration
/// inputs (sign updates toward the mean load, as in loss-free balancing). It changes which
/// experts are chosen, never their output weights.
pub fn balance_bias(inputs: &[f32], d: usize, rg: &[f32], ru: &[f32], k: usize) -> Vec<f32> {
    let n_expert = rg.len() / d;
    // A few thousand tokens estimate the load well enough.
    let step = (inputs.len() / d / 4096).max(1);
    let probs: Vec<Vec<f32>> = inputs
        .chunks_exact(d)
        .step_by(step)
        .map(|x| probabilities(x, rg, ru))
        .collect();
    let mut bias = vec![0f32; n_expert];
    if probs.is_empty() {
        return bias;
    }
    let target = (probs.len() * k) as f32 / n_expert as f32;
    let rate = 0.5 / n_expert as f32 / 100.0;
    for _ in 0..100 {
        let mut load = vec![0f32; n_expert];
        for p in &probs {
            for e in select(p, &bias, k) {
                load[e] += 1.0;
            }
        }
        for e in 0..n_expert {
            bias[e] += rate * (target - load[e]).signum();
        }
    }
    bias
}

#[cfg(test)]
mod tests {
    use super::select;

    #[test]
    fn select_takes_the_top_k_with_bias() {
        assert_eq!(select(&[0.1, 0.5, 0.3, 0.2], &[0.0; 4], 2), vec![1, 2]);
        assert_eq!(
            select(&[0.1, 0.5, 0.3, 0.2], &[0.0, 0.0, 0.0, 0.4], 2),
            vec![3, 1]
        );
    }

    #[test]
    fn select_survives_nan_and_infinite_scores() {
        let nan = f32::NAN;
        assert_eq!(select(&[nan, 0.2, nan, 0.1], &[0.0; 4], 3), vec![1, 3, 0]);
        assert_eq!(select(&[nan; 3], &[0.0; 3], 2), vec![0, 1]);
        let ninf = f32::NEG_INFINITY;
        assert_eq!(select(&[ninf, ninf], &[0.0; 2], 2), vec![0, 1]);
    }
}
