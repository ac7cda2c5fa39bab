//! Closed-form, training-free recovery on the calibration tokens (no gradient steps):
//! - a router fitted by ridge least squares to predict each routed expert's output norm
//!   from the FFN input (the oracle router picks the largest true norms);
//! - a recovery fit of what the unchosen experts would have added: a linear map of the FFN
//!   input plus a correction of the shared expert's down-projection (the runtime uses both
//!   at the carved number of experts, the default).

use half::f16;
use nalgebra::DMatrix;

use super::partition::Partition;
use super::router;
use super::sequential::matmul_t;
use crate::model::config::COUNT_FIT_RANK;
use crate::router::PreGateRouter;

/// What the router scores experts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouterFit {
    /// CMoE as written: |u·silu(g)| of one representative neuron per expert.
    Representative,
    /// Ridge regression of each expert's output norm on the FFN input.
    LeastSquares,
}

/// One layer's calibration data and dense weights.
pub struct LayerData<'a> {
    /// FFN inputs [n, d].
    pub inputs: &'a [f32],
    /// silu(gate) * up of every neuron [n, d_ff].
    pub hidden: &'a [f16],
    /// The dense down-projection [d, d_ff], row-major.
    pub down: &'a [f32],
    pub d: usize,
    pub d_ff: usize,
}

impl LayerData<'_> {
    /// The output [n, d] row-major that neurons `idx` alone give on every token (indices
    /// past d_ff are padding and give nothing).
    pub fn output_of(&self, idx: &[usize]) -> Vec<f32> {
        let (d, d_ff) = (self.d, self.d_ff);
        let n = self.inputs.len() / d.max(1);
        let idx: Vec<usize> = idx.iter().copied().filter(|&i| i < d_ff).collect();
        let h: Vec<f32> = (0..n)
            .flat_map(|t| idx.iter().map(move |&i| self.hidden[t * d_ff + i].to_f32()))
            .collect();
        let down: Vec<f32> = (0..d)
            .flat_map(|r| idx.iter().map(move |&i| self.down[r * d_ff + i]))
            .collect();
        matmul_t(&h, &down, idx.len())
    }
}

pub struct Recovered {
    /// Least-squares router rows [n_expert, d] (None: keep the representative router).
    pub router: Option<Vec<f32>>,
    /// Each routed expert's output on every calibration token, [n, d] row-major.
    pub outputs: Vec<Vec<f32>>,
}

/// AᵀB for A [n, p] and B [n, q], split across the cores (the carve's largest products).
fn at_b(a: &DMatrix<f32>, b: &DMatrix<f32>) -> DMatrix<f32> {
    // Column-major A is row-major Aᵀ [p, n]; matmul_t gives Aᵀ·(Bᵀ)ᵀ row-major [p, q].
    let v = matmul_t(a.as_slice(), b.as_slice(), a.nrows());
    DMatrix::from_row_slice(a.ncols(), b.ncols(), &v)
}

/// Solves (AᵀA + λI) X = AᵀB (ridge toward 0).
fn ridge(a: &DMatrix<f32>, b: &DMatrix<f32>, rel: f32) -> DMatrix<f32> {
    ridge_normal(at_b(a, a), at_b(a, b), rel)
}

/// [`ridge`] from the normal equations: `gram` = AᵀA, `rhs` = AᵀB. λ is `rel` times the
/// mean diagonal of AᵀA, so one setting suits inputs of any scale.
fn ridge_normal(mut gram: DMatrix<f32>, rhs: DMatrix<f32>, rel: f32) -> DMatrix<f32> {
    let n = gram.nrows();
    let lambda = rel * (gram.trace() / n as f32).max(1e-12);
    for i in 0..n {
        gram[(i, i)] += lambda;
    }
    match gram.cholesky() {
        Some(c) => c.solve(&rhs),
        // Numerically singular even with the ridge: fit nothing.
        None => DMatrix::zeros(n, rhs.ncols()),
    }
}

/// Each routed expert's output on the calibration tokens, and the least-squares router
/// when `fit` asks for it.
pub fn recover(data: &LayerData, part: &Partition, fit: RouterFit) -> Recovered {
    let d = data.d;
    let n = data.inputs.len() / d;
    // Each routed expert's output on every token: H_e D_eᵀ, [n, d] row-major.
    let outputs: Vec<Vec<f32>> = part.experts.iter().map(|e| data.output_of(e)).collect();
    let x = DMatrix::from_row_slice(n, d, data.inputs);
    let router = (fit == RouterFit::LeastSquares).then(|| {
        let norms = DMatrix::from_fn(n, outputs.len(), |t, e| {
            outputs[e][t * d..(t + 1) * d]
                .iter()
                .map(|v| v * v)
                .sum::<f32>()
                .sqrt()
        });
        // [d, n_expert], column-major: column e is expert e's router row.
        ridge(&x, &norms, 1e-3)
            .iter()
            .copied()
            .collect::<Vec<f32>>()
    });
    Recovered { router, outputs }
}

/// The `k` experts of largest linear score x·w_e (ties to the lower index).
pub fn top_k_linear(x: &[f32], w: &[f32], k: usize) -> Vec<usize> {
    let d = x.len();
    let scores: Vec<f32> = w
        .chunks_exact(d)
        .map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum())
        .collect();
    router::select(&scores, &vec![0.0; scores.len()], k)
}

/// What the experts each token does not use would add to its FFN output, [n, d]
/// row-major: the dense output minus the shared expert's and the chosen experts'
/// (`outputs`: each routed expert's, from [`recover`]). `choose` picks token `t`'s
/// experts from its position and FFN input.
pub fn unchosen_output(
    data: &LayerData,
    part: &Partition,
    outputs: &[Vec<f32>],
    choose: impl Fn(usize, &[f32]) -> Vec<usize>,
) -> Vec<f32> {
    let (d, d_ff) = (data.d, data.d_ff);
    let mut uses = vec![0u32; d_ff];
    for &i in part.shared.iter().chain(part.experts.iter().flatten()) {
        if i < d_ff {
            uses[i] += 1;
        }
    }
    // cmoe's experts split the neurons: what is left out is the unchosen experts' sum.
    // Read-ME's overlap (a neuron kept by several clusters), so start from every neuron
    // outside the shared expert and take the chosen experts away.
    let partition = uses.iter().all(|&u| u == 1);
    let mut missing = match partition {
        true => vec![0f32; data.inputs.len()],
        false => {
            let mut routed = vec![true; d_ff];
            part.shared
                .iter()
                .filter(|&&i| i < d_ff)
                .for_each(|&i| routed[i] = false);
            let idx: Vec<usize> = (0..d_ff).filter(|&i| routed[i]).collect();
            data.output_of(&idx)
        }
    };
    let rows = missing.chunks_exact_mut(d).zip(data.inputs.chunks_exact(d));
    for (t, (m, x)) in rows.enumerate() {
        let chosen = choose(t, x);
        for (e, y) in outputs.iter().enumerate() {
            let y = &y[t * d..(t + 1) * d];
            match (partition, chosen.contains(&e)) {
                (true, false) => m.iter_mut().zip(y).for_each(|(m, y)| *m += y),
                (false, true) => m.iter_mut().zip(y).for_each(|(m, y)| *m -= y),
                _ => {}
            }
        }
    }
    missing
}

/// The pre-gating router's choices for the calibration tokens, every layer: the experts
/// `--routing pregate` would run them with, so a recovery fit can be made for those.
pub struct RouterPlan {
    /// `[token][layer][k]`, flattened.
    choices: Vec<u16>,
    n_layer: usize,
    k: usize,
}

impl RouterPlan {
    /// Plans `tokens`, calibration windows of `window` tokens each planned on its own (as
    /// a prompt would be), with `k` experts a token.
    pub fn new(router: &PreGateRouter, tokens: &[u32], window: usize, k: usize) -> RouterPlan {
        let choices = tokens
            .chunks(window.max(1))
            .flat_map(|w| router.plan_top(w, k))
            .collect();
        RouterPlan {
            choices,
            n_layer: router.config.n_layer,
            k,
        }
    }

    /// Token `t`'s experts in layer `l`.
    pub fn choices(&self, t: usize, l: usize) -> Vec<usize> {
        let at = (t * self.n_layer + l) * self.k;
        self.choices[at..at + self.k]
            .iter()
            .map(|&e| e as usize)
            .collect()
    }
}

/// What the recovery fit adds to a carved layer, an estimate of what the unchosen
/// experts would have added: y ≈ W·x + b + C·h_s, with x the FFN input and h_s the shared
/// expert's activations (free nonlinear features: the runtime computes them anyway). C is
/// folded into a second copy of the shared down-projection, so the runtime reads no more
/// than with the map alone.
pub struct LinearRecovery {
    /// W, [d, d] row-major: output j is row j · x.
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    /// The shared expert's down-projection plus C, [d, n_shared] row-major (None: no
    /// shared expert).
    pub shared_down: Option<Vec<f32>>,
}

/// Ridge strengths (relative to the mean diagonal of XᵀX) tried by cross-validation.
const RECOVERY_RIDGE: [f32; 7] = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0];

/// Fits [`LinearRecovery`] on the calibration tokens of `data` to `missing` [n, d], what
/// the unchosen experts would add (from [`unchosen_output`]); `shared` are the shared
/// expert's neurons and `window` the calibration sequence length.
pub fn fit_recovery(
    data: &LayerData,
    shared: &[usize],
    missing: &[f32],
    window: usize,
) -> LinearRecovery {
    let (d, d_ff) = (data.d, data.d_ff);
    let n = data.inputs.len() / d.max(1);
    let d_in = d + shared.len();
    let mut features = Vec::with_capacity(n * d_in);
    for (x, h) in data
        .inputs
        .chunks_exact(d)
        .zip(data.hidden.chunks_exact(d_ff))
    {
        features.extend_from_slice(x);
        features.extend(shared.iter().map(|&i| h.get(i).map_or(0.0, |v| v.to_f32())));
    }
    let (w, bias) = fit_ridge_map(&features, d_in, missing, d, window);
    let weight = w
        .chunks_exact(d_in)
        .flat_map(|r| &r[..d])
        .copied()
        .collect();
    let shared_down = (!shared.is_empty()).then(|| {
        let mut c: Vec<f32> = w
            .chunks_exact(d_in)
            .flat_map(|r| &r[d..])
            .copied()
            .collect();
        for (row, out) in c.chunks_exact_mut(shared.len()).enumerate() {
            for (v, &i) in out.iter_mut().zip(shared) {
                *v += if i < d_ff {
                    data.down[row * d_ff + i]
                } else {
                    0.0
                };
            }
        }
        c
    });
    LinearRecovery {
        weight,
        bias,
        shared_down,
    }
}

/// The recovery fit's correction for tokens that run `k` experts instead of the fitted
/// number (adaptive gating, `--experts-per-token`): what the experts between the two
/// counts add (taken away below the fitted count, where they no longer run; added above
/// it, where they do and the fit would count them twice), as a rank-r linear map of the
/// FFN input: y += U·(V·x) + b.
pub struct CountFit {
    pub k: usize,
    /// V, [r, d] row-major.
    pub input: Vec<f32>,
    /// U, [d, r] row-major.
    pub output: Vec<f32>,
    pub bias: Vec<f32>,
}

/// Fits a [`CountFit`] of rank at most [`COUNT_FIT_RANK`] for each of `counts`. `missing` is what the
/// unchosen experts add at the fitted count ([`unchosen_output`]) and `choose(x, k)` a
/// token's k experts. Reduced-rank ridge regression: the full ridge map, projected on the
/// leading eigenvectors of its outputs' second moment on the calibration tokens.
pub fn fit_count_fits(
    data: &LayerData,
    part: &Partition,
    outputs: &[Vec<f32>],
    missing: &[f32],
    counts: &[usize],
    choose: impl Fn(&[f32], usize) -> Vec<usize>,
    window: usize,
) -> Vec<CountFit> {
    if counts.is_empty() {
        return Vec::new();
    }
    let d = data.d;
    // The same inputs for every count: their Gram matrices once.
    let design = RidgeDesign::new(data.inputs, d, window);
    let gram = design.input_gram();
    let r = COUNT_FIT_RANK.min(d);
    counts
        .iter()
        .map(|&k| {
            let other = unchosen_output(data, part, outputs, |_, x| choose(x, k));
            let target: Vec<f32> = other.iter().zip(missing).map(|(a, b)| a - b).collect();
            let (w, bias) = design.fit(&target, d);
            // [out, in]; the second moment of its outputs is W XᵀX Wᵀ.
            let w = DMatrix::from_row_slice(d, d, &w);
            let eig = (&w * &gram * w.transpose()).symmetric_eigen();
            let mut order: Vec<usize> = (0..d).collect();
            order.sort_by(|&a, &b| eig.eigenvalues[b].total_cmp(&eig.eigenvalues[a]));
            let u = DMatrix::from_fn(d, r, |i, j| eig.eigenvectors[(i, order[j])]);
            let v = u.transpose() * &w;
            // Column-major storage of the transpose is the row-major matrix.
            CountFit {
                k,
                input: v.transpose().as_slice().to_vec(),
                output: u.transpose().as_slice().to_vec(),
                bias,
            }
        })
        .collect()
}

/// The point of smallest `f` on `grid`, walking downhill from its middle: the
/// held-out error is unimodal in the ridge strength in practice, and each evaluation is a
/// solve of the normal equations (the carve's costliest step with the shared features).
fn downhill(grid: &[f32], mut f: impl FnMut(f32) -> f32) -> f32 {
    let mid = grid.len() / 2;
    let mut best = (f(grid[mid]), mid);
    for step in [-1isize, 1] {
        let mut i = mid as isize + step;
        let start = best.1;
        while let Some(&rel) = grid.get(i as usize).filter(|_| i >= 0) {
            let e = f(rel);
            if e >= best.0 {
                break;
            }
            best = (e, i as usize);
            i += step;
        }
        if best.1 != start {
            break; // Improved going down: no need to look up.
        }
    }
    grid[best.1]
}

/// A ridge map y ≈ W·x + b from `x` [n, d_in] to `y` [n, d]: W [d, d_in] row-major and b.
/// Each input column is scaled to unit RMS first, so that features of different scales
/// (the FFN input, the shared activations) are shrunk alike. The ridge strength is picked
/// on held-out data: fitted on the even calibration windows of `window` tokens, scored on
/// the odd ones (measured on the default model: an unregularised fit explains the
/// calibration text and hurts held-out text); the final map is then fitted on every token.
pub fn fit_ridge_map(
    x: &[f32],
    d_in: usize,
    y: &[f32],
    d: usize,
    window: usize,
) -> (Vec<f32>, Vec<f32>) {
    RidgeDesign::new(x, d_in, window).fit(y, d)
}

/// The input side of [`fit_ridge_map`], built once for fits of several targets to the same
/// inputs: the scaled inputs with their bias column, split into training and held-out
/// windows, and their Gram matrices (the costly part).
pub struct RidgeDesign {
    d_in: usize,
    scale: Vec<f32>,
    train: Vec<usize>,
    a: DMatrix<f32>,
    gram: DMatrix<f32>,
    /// The held-out windows' rows, design and Gram matrix (None: a single short sequence).
    held_out: Option<(Vec<usize>, DMatrix<f32>, DMatrix<f32>)>,
}

impl RidgeDesign {
    pub fn new(x: &[f32], d_in: usize, window: usize) -> RidgeDesign {
        let n = x.len() / d_in.max(1);
        let mut scale = vec![0f32; d_in];
        for row in x.chunks_exact(d_in) {
            scale.iter_mut().zip(row).for_each(|(s, v)| *s += v * v);
        }
        scale
            .iter_mut()
            .for_each(|s| *s = (*s / n.max(1) as f32).sqrt().max(1e-12));
        let rows =
            |keep: &dyn Fn(usize) -> bool| -> Vec<usize> { (0..n).filter(|&t| keep(t)).collect() };
        // Scaled inputs with a constant column for the bias.
        let design = |ts: &[usize]| {
            DMatrix::from_fn(ts.len(), d_in + 1, |r, j| match j < d_in {
                true => x[ts[r] * d_in + j] / scale[j],
                false => 1.0,
            })
        };
        let window = window.max(1);
        let train = rows(&|t| (t / window).is_multiple_of(2));
        let test = rows(&|t| !(t / window).is_multiple_of(2));
        let a = design(&train);
        let gram = at_b(&a, &a);
        let held_out = (!test.is_empty()).then(|| {
            let at = design(&test);
            let gram_t = at_b(&at, &at);
            (test, at, gram_t)
        });
        RidgeDesign {
            d_in,
            scale,
            train,
            a,
            gram,
            held_out,
        }
    }

    /// XᵀX of the inputs as given (unscaled, no bias column) over every token, from the
    /// Gram matrices already built.
    pub fn input_gram(&self) -> DMatrix<f32> {
        let d_in = self.d_in;
        let mut g = self.gram.view((0, 0), (d_in, d_in)).into_owned();
        if let Some((_, _, gram_t)) = &self.held_out {
            g += gram_t.view((0, 0), (d_in, d_in));
        }
        DMatrix::from_fn(d_in, d_in, |i, j| g[(i, j)] * self.scale[i] * self.scale[j])
    }

    /// The ridge map from these inputs to `y` [n, d]: W [d, d_in] row-major and b.
    pub fn fit(&self, y: &[f32], d: usize) -> (Vec<f32>, Vec<f32>) {
        let d_in = self.d_in;
        let target = |ts: &[usize]| DMatrix::from_fn(ts.len(), d, |r, j| y[ts[r] * d + j]);
        let b = target(&self.train);
        let mut rhs = at_b(&self.a, &b);
        let mut gram = self.gram.clone();
        // Without held-out windows (a single short sequence), a middling strength.
        let mut rel = 0.3;
        if let Some((test, at, gram_t)) = &self.held_out {
            let bt = target(test);
            let rhs_t = at_b(at, &bt);
            // Held-out error ‖Bt − At W‖² = ‖Bt‖² − 2⟨W, AtᵀBt⟩ + ⟨W, AtᵀAt W⟩, from the
            // normal equations alone.
            let bt2 = bt.norm_squared();
            let held_out = |rel: f32| {
                let w = ridge_normal(gram.clone(), rhs.clone(), rel);
                bt2 - 2.0 * w.dot(&rhs_t) + w.dot(&at_b(gram_t, &w))
            };
            rel = downhill(&RECOVERY_RIDGE, held_out);
            gram += gram_t;
            rhs += rhs_t;
        }
        // [d_in + 1, d]: row j of the map is column j of w, unscaled.
        let w = ridge_normal(gram, rhs, rel);
        let weight = (0..d)
            .flat_map(|j| (0..d_in).map(move |i| (i, j)))
            .map(|(i, j)| w[(i, j)] / self.scale[i])
            .collect();
        let bias = (0..d).map(|j| w[(d_in, j)]).collect();
        (weight, bias)
    }
}

#[cfg(test)]
mod tests {
    use super::{fit_recovery, fit_ridge_map, LayerData, RidgeDesign};
    use half::f16;
    use nalgebra::DMatrix;

    /// Deterministic pseudo-random values in [-1, 1).
    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn recovery_finds_a_linear_map_in_the_data() {
        let (n, d) = (400, 6);
        let x = noise(n * d, 1);
        let a = noise(d * d, 2);
        let b = noise(d, 3);
        let mut y = Vec::with_capacity(n * d);
        for xt in x.chunks_exact(d) {
            for j in 0..d {
                y.push((0..d).map(|i| a[j * d + i] * xt[i]).sum::<f32>() + b[j]);
            }
        }
        let (weight, bias) = fit_ridge_map(&x, d, &y, d, 50);
        for (got, want) in weight.iter().zip(&a).chain(bias.iter().zip(&b)) {
            assert!((got - want).abs() < 0.05, "{got} vs {want}");
        }
    }

    #[test]
    fn recovery_of_pure_noise_stays_small() {
        // The held-out choice of ridge strength keeps a map that explains nothing small.
        let (n, d) = (200, 16);
        let x = noise(n * d, 4);
        let y = noise(n * d, 5);
        let (weight, _) = fit_ridge_map(&x, d, &y, d, 20);
        let norm = weight.iter().map(|v| v * v).sum::<f32>().sqrt();
        // An unregularised least-squares fit of 200 noise rows on 17 columns has a norm
        // near sqrt(d * d * 1/3 / n * ...) ~ 0.4; the strongest ridge shrinks it below that.
        assert!(norm < 0.2, "{norm}");
    }

    #[test]
    fn recovery_folds_the_shared_activations_part_into_the_shared_down() {
        // missing = A·x + c·h_2 + b, with neuron 2 the shared expert: the fit finds A and
        // b for the map, and adds c to the shared expert's dense down column.
        let (n, d, d_ff) = (600, 4, 3);
        let x = noise(n * d, 6);
        let h: Vec<f16> = noise(n * d_ff, 7).into_iter().map(f16::from_f32).collect();
        let down = noise(d * d_ff, 8);
        let (a, c, b) = (noise(d * d, 9), noise(d, 10), noise(d, 11));
        let mut missing = Vec::with_capacity(n * d);
        for t in 0..n {
            let h2 = h[t * d_ff + 2].to_f32();
            for j in 0..d {
                let ax: f32 = (0..d).map(|i| a[j * d + i] * x[t * d + i]).sum();
                missing.push(ax + c[j] * h2 + b[j]);
            }
        }
        let data = LayerData {
            inputs: &x,
            hidden: &h,
            down: &down,
            d,
            d_ff,
        };
        let r = fit_recovery(&data, &[2], &missing, 50);
        let shared = r.shared_down.expect("a shared expert");
        let want_shared: Vec<f32> = (0..d).map(|j| down[j * d_ff + 2] + c[j]).collect();
        let pairs = r.weight.iter().zip(&a).chain(r.bias.iter().zip(&b));
        for (got, want) in pairs.chain(shared.iter().zip(&want_shared)) {
            assert!((got - want).abs() < 0.05, "{got} vs {want}");
        }
        // No shared expert: the map alone.
        assert!(fit_recovery(&data, &[], &missing, 50).shared_down.is_none());
    }

    #[test]
    fn the_designs_input_gram_is_the_inputs_own() {
        let (n, d) = (40, 3);
        let x: Vec<f32> = noise(n * d, 7)
            .iter()
            .enumerate()
            .map(|(i, v)| v * (1 + i % d) as f32)
            .collect();
        let design = RidgeDesign::new(&x, d, 8);
        let m = DMatrix::from_row_slice(n, d, &x);
        let want = m.transpose() * &m;
        let got = design.input_gram();
        assert!(
            (got - &want).abs().max() <= 1e-4 * want.abs().max(),
            "{want}"
        );
    }

    #[test]
    fn downhill_finds_the_minimum_of_a_unimodal_grid() {
        let grid = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0];
        for target in grid {
            let mut calls = 0;
            let at = super::downhill(&grid, |r| {
                calls += 1;
                (r.ln() - target.ln()).abs()
            });
            assert_eq!(at, target);
            assert!(calls <= 5, "{calls} evaluations for {target}");
        }
    }
}
