//! Closed-form, training-free recovery on the calibration tokens (no gradient steps):
//! - a router fitted by ridge least squares to predict each routed expert's output norm
//!   from the FFN input (the oracle router picks the largest true norms);
//! - a refit of the shared expert's down-projection so that shared + chosen experts
//!   reconstruct the dense FFN output, absorbing what the unchosen experts would have added.

use half::f16;
use nalgebra::DMatrix;

use super::partition::Partition;
use super::router;

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

pub struct Recovered {
    /// Least-squares router rows [n_expert, d] (None: keep the representative router).
    pub router: Option<Vec<f32>>,
    /// Refitted shared down-projection [d, n_shared_neurons] (None: keep the dense columns).
    pub shared_down: Option<Vec<f32>>,
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

/// Solves (AᵀA + λI) X = AᵀB + λ X0 (ridge toward X0, or toward 0).
fn ridge(a: &DMatrix<f32>, b: &DMatrix<f32>, x0: Option<&DMatrix<f32>>, rel: f32) -> DMatrix<f32> {
    let mut gram = a.transpose() * a;
    let n = gram.nrows();
    let lambda = rel * (gram.trace() / n as f32).max(1e-12);
    for i in 0..n {
        gram[(i, i)] += lambda;
    }
    let mut rhs = a.transpose() * b;
    if let Some(x0) = x0 {
        rhs += x0 * lambda;
    }
    match gram.clone().cholesky() {
        Some(c) => c.solve(&rhs),
        // Numerically singular even with the ridge: fall back to the prior.
        None => x0.cloned().unwrap_or_else(|| DMatrix::zeros(n, b.ncols())),
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
    // Each routed expert's output on every token: H_e D_eᵀ, [n, d].
    let outputs: Vec<DMatrix<f32>> = part
        .experts
        .iter()
        .map(|e| h16(e) * gather(data.down, d, d_ff, e).transpose())
        .collect();
    let x = DMatrix::from_row_slice(n, d, data.inputs);
    let router = (fit == RouterFit::LeastSquares).then(|| {
        let norms = DMatrix::from_fn(n, outputs.len(), |t, e| outputs[e].row(t).norm());
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
                                                           // Target: the shared expert's own output plus every unchosen expert's.
        let mut target = &hs * ds.transpose(); // [n, d]
        for t in 0..n {
            let xt = &data.inputs[t * d..(t + 1) * d];
            let chosen = match &router {
                Some(w) => top_k_linear(xt, w, k),
                None => router::select(&router::probabilities(xt, rg, ru), bias, k),
            };
            for (e, y) in outputs.iter().enumerate() {
                if !chosen.contains(&e) {
                    let mut row = target.row_mut(t);
                    row += y.row(t);
                }
            }
        }
        let z = ridge(&hs, &target, Some(&ds.transpose()), 1e-2); // [s, d]
                                                                  // Row-major [d, s] = column-major of z.
        z.iter().copied().collect::<Vec<f32>>()
    });
    Recovered {
        router,
        shared_down,
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
