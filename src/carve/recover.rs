//! Closed-form, training-free recovery on the calibration tokens (no gradient steps):
//! - a router fitted by ridge least squares to predict each routed expert's output norm
//!   from the FFN input (the oracle router picks the largest true norms);
//! - a linear map of the FFN input fitted to what the unchosen experts would have added
//!   (the runtime adds it to the MoE output; the default);
//! - a refit of the shared expert's down-projection so that shared + chosen experts
//!   reconstruct the dense FFN output, absorbing what the unchosen experts would have added
//!   (experimental: it did not carry over to other text).

use half::f16;
use nalgebra::DMatrix;

use super::partition::Partition;
use super::router;
use super::sequential::matmul_t;

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
    /// Refitted shared down-projection [d, n_shared_neurons] (None: keep the dense columns).
    pub shared_down: Option<Vec<f32>>,
    /// Each routed expert's output on every calibration token, [n, d] row-major.
    pub outputs: Vec<Vec<f32>>,
}

/// Columns `idx` of a row-major [rows, cols] matrix as a [rows, idx.len()] matrix
/// (indices past `cols` are padding: zero columns).
fn gather(src: &[f32], rows: usize, cols: usize, idx: &[usize]) -> DMatrix<f32> {
    DMatrix::from_fn(rows, idx.len(), |r, j| {
        let i = idx[j];
        if i < cols {
            src[r * cols + i]
        } else {
            0.0
        }
    })
}

/// AᵀB for A [n, p] and B [n, q], split across the cores (the carve's largest products).
fn at_b(a: &DMatrix<f32>, b: &DMatrix<f32>) -> DMatrix<f32> {
    // Column-major A is row-major Aᵀ [p, n]; matmul_t gives Aᵀ·(Bᵀ)ᵀ row-major [p, q].
    let v = matmul_t(a.as_slice(), b.as_slice(), a.nrows());
    DMatrix::from_row_slice(a.ncols(), b.ncols(), &v)
}

/// Solves (AᵀA + λI) X = AᵀB + λ X0 (ridge toward X0, or toward 0).
fn ridge(a: &DMatrix<f32>, b: &DMatrix<f32>, x0: Option<&DMatrix<f32>>, rel: f32) -> DMatrix<f32> {
    ridge_normal(at_b(a, a), at_b(a, b), x0, rel)
}

/// [`ridge`] from the normal equations: `gram` = AᵀA, `rhs` = AᵀB. λ is `rel` times the
/// mean diagonal of AᵀA, so one setting suits inputs of any scale.
fn ridge_normal(
    mut gram: DMatrix<f32>,
    mut rhs: DMatrix<f32>,
    x0: Option<&DMatrix<f32>>,
    rel: f32,
) -> DMatrix<f32> {
    let n = gram.nrows();
    let lambda = rel * (gram.trace() / n as f32).max(1e-12);
    for i in 0..n {
        gram[(i, i)] += lambda;
    }
    if let Some(x0) = x0 {
        rhs += x0 * lambda;
    }
    match gram.cholesky() {
        Some(c) => c.solve(&rhs),
        // Numerically singular even with the ridge: fall back to the prior.
        None => x0
            .cloned()
            .unwrap_or_else(|| DMatrix::zeros(n, rhs.ncols())),
    }
}

/// Fits the chosen recovery steps for one carved layer. `bias` is the representative
/// router's selection bias; `k` the routed experts each token uses.
pub fn recover(
    data: &LayerData,
    part: &Partition,
    rep_router: (&[f32], &[f32], &[f32]),
    k: usize,
    fit: RouterFit,
    refit_shared: bool,
) -> Recovered {
    let (d, d_ff) = (data.d, data.d_ff);
    let n = data.inputs.len() / d;
    let h16 = |idx: &[usize]| {
        DMatrix::from_fn(n, idx.len(), |r, j| {
            let i = idx[j];
            if i < d_ff {
                data.hidden[r * d_ff + i].to_f32()
            } else {
                0.0
            }
        })
    };
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
        ridge(&x, &norms, None, 1e-3)
            .iter()
            .copied()
            .collect::<Vec<f32>>()
    });
    let shared_down = (refit_shared && !part.shared.is_empty()).then(|| {
        let (rg, ru, bias) = rep_router;
        let hs = h16(&part.shared); // [n, s]
        let ds = gather(data.down, d, d_ff, &part.shared); // [d, s]
        let choose = |xt: &[f32]| match &router {
            Some(w) => top_k_linear(xt, w, k),
            None => router::select(&router::probabilities(xt, rg, ru), bias, k),
        };
        // Target: the shared expert's own output plus what the unchosen experts add.
        let missing = unchosen_output(data, part, &outputs, choose);
        let own = data.output_of(&part.shared);
        let target = DMatrix::from_row_slice(n, d, &own) + DMatrix::from_row_slice(n, d, &missing);
        let z = ridge(&hs, &target, Some(&ds.transpose()), 1e-2); // [s, d]
                                                                  // Row-major [d, s] = column-major of z.
        z.iter().copied().collect::<Vec<f32>>()
    });
    Recovered {
        router,
        shared_down,
        outputs,
    }
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
/// (`outputs`: each routed expert's, from [`recover`]). `choose` is the router.
pub fn unchosen_output(
    data: &LayerData,
    part: &Partition,
    outputs: &[Vec<f32>],
    choose: impl Fn(&[f32]) -> Vec<usize>,
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
        let chosen = choose(x);
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

/// A linear map of the FFN input that estimates what the unchosen experts would have
/// added: y ≈ W·x + b, fitted by ridge least squares on the calibration tokens.
pub struct LinearRecovery {
    /// [d, d] row-major: output j is row j · x.
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

/// Ridge strengths (relative to the mean diagonal of XᵀX) tried by cross-validation.
const RECOVERY_RIDGE: [f32; 7] = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0];

/// Fits [`LinearRecovery`] from FFN inputs `x` [n, d] to the unchosen experts' output
/// `missing` [n, d]. The ridge strength is picked on held-out data: fitted on the even
/// calibration windows of `window` tokens, scored on the odd ones (measured on the default
/// model: an unregularised fit explains the calibration text and hurts held-out text);
/// the final map is then fitted on every token.
pub fn fit_linear_recovery(x: &[f32], missing: &[f32], d: usize, window: usize) -> LinearRecovery {
    let n = x.len() / d.max(1);
    let rows =
        |keep: &dyn Fn(usize) -> bool| -> Vec<usize> { (0..n).filter(|&t| keep(t)).collect() };
    // Inputs with a constant column for the bias.
    let design = |ts: &[usize]| {
        DMatrix::from_fn(
            ts.len(),
            d + 1,
            |r, j| if j < d { x[ts[r] * d + j] } else { 1.0 },
        )
    };
    let target = |ts: &[usize]| DMatrix::from_fn(ts.len(), d, |r, j| missing[ts[r] * d + j]);
    let window = window.max(1);
    let train = rows(&|t| (t / window).is_multiple_of(2));
    let test = rows(&|t| !(t / window).is_multiple_of(2));
    let (a, b) = (design(&train), target(&train));
    let (mut gram, mut rhs) = (at_b(&a, &a), at_b(&a, &b));
    let mut best = (f32::INFINITY, 1.0);
    if !test.is_empty() {
        let (at, bt) = (design(&test), target(&test));
        let (gram_t, rhs_t) = (at_b(&at, &at), at_b(&at, &bt));
        // Held-out error ‖Bt − At W‖² = ‖Bt‖² − 2⟨W, AtᵀBt⟩ + ⟨W, AtᵀAt W⟩, from the
        // normal equations alone.
        let bt2 = bt.norm_squared();
        for rel in RECOVERY_RIDGE {
            let w = ridge_normal(gram.clone(), rhs.clone(), None, rel);
            let err = bt2 - 2.0 * w.dot(&rhs_t) + w.dot(&(&gram_t * &w));
            if err < best.0 {
                best = (err, rel);
            }
        }
        gram += gram_t;
        rhs += rhs_t;
    }
    let w = ridge_normal(gram, rhs, None, best.1); // [d + 1, d]
                                                   // Row j of the map is column j of w.
    let weight = (0..d)
        .flat_map(|j| (0..d).map(move |i| (i, j)))
        .map(|(i, j)| w[(i, j)])
        .collect();
    let bias = (0..d).map(|j| w[(d, j)]).collect();
    LinearRecovery { weight, bias }
}

#[cfg(test)]
mod tests {
    use super::fit_linear_recovery;

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
        let r = fit_linear_recovery(&x, &y, d, 50);
        for (got, want) in r.weight.iter().zip(&a).chain(r.bias.iter().zip(&b)) {
            assert!((got - want).abs() < 0.05, "{got} vs {want}");
        }
    }

    #[test]
    fn recovery_of_pure_noise_stays_small() {
        // The held-out choice of ridge strength keeps a map that explains nothing small.
        let (n, d) = (200, 16);
        let x = noise(n * d, 4);
        let y = noise(n * d, 5);
        let r = fit_linear_recovery(&x, &y, d, 20);
        let norm = r.weight.iter().map(|v| v * v).sum::<f32>().sqrt();
        // An unregularised least-squares fit of 200 noise rows on 17 columns has a norm
        // near sqrt(d * d * 1/3 / n * ...) ~ 0.4; the strongest ridge shrinks it below that.
        assert!(norm < 0.2, "{norm}");
    }
}
