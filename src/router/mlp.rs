//! The `mlp` router's parameters and their gradients: the three n-gram features' embeddings
//! are concatenated (x, 3H wide), h = relu(W1 x + b1) (H wide) is shared by every layer,
//! and layer l's logits are W2_l h (plus the router's bias). Backpropagation through one
//! hidden layer is a few lines, so no autodiff library is needed.

use rand::{Rng, SeedableRng};

use super::{RouterConfig, FAMILIES};

pub struct MlpBody {
    hidden: usize,
    /// [FAMILIES * buckets][hidden]
    pub(crate) emb: Vec<f32>,
    /// [hidden][FAMILIES * hidden]
    pub(crate) w1: Vec<f32>,
    pub(crate) b1: Vec<f32>,
    /// [n_layer * n_expert][hidden]
    pub(crate) w2: Vec<f32>,
}

/// The activations of one position, kept for the backward pass.
pub struct Forward {
    pub x: Vec<f32>,
    pub h: Vec<f32>,
}

impl MlpBody {
    pub fn new(c: &RouterConfig, seed: u64) -> MlpBody {
        let h = c.hidden;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut init = |n: usize, scale: f32| -> Vec<f32> {
            (0..n).map(|_| rng.random_range(-scale..scale)).collect()
        };
        let emb = init(FAMILIES * c.buckets * h, 0.1);
        let w1 = init(h * FAMILIES * h, (3.0 / (FAMILIES * h) as f32).sqrt());
        let w2 = init(c.n_layer * c.n_expert * h, (3.0 / h as f32).sqrt());
        MlpBody {
            hidden: h,
            emb,
            w1,
            b1: vec![0.0; h],
            w2,
        }
    }

    pub fn forward(&self, f: &[usize; FAMILIES]) -> Forward {
        let h = self.hidden;
        let mut x = Vec::with_capacity(FAMILIES * h);
        for &row in f {
            x.extend_from_slice(&self.emb[row * h..(row + 1) * h]);
        }
        let hid = self
            .w1
            .chunks_exact(FAMILIES * h)
            .zip(&self.b1)
            .map(|(w, b)| (dot(w, &x) + b).max(0.0))
            .collect();
        Forward { x, h: hid }
    }

    /// Adds every layer's W2_l h to `out` ([n_layer * n_expert], holding the bias) and
    /// returns the activations (training steps from them).
    pub fn add_logits(&self, f: &[usize; FAMILIES], out: &mut [f32]) -> Forward {
        let fw = self.forward(f);
        self.add_head(&fw.h, out);
        fw
    }

    fn add_head(&self, h: &[f32], out: &mut [f32]) {
        for (o, w) in out.iter_mut().zip(self.w2.chunks_exact(self.hidden)) {
            *o += dot(w, h);
        }
    }

    /// One Adagrad step from `grad` (dLoss/dlogits, [n_layer * n_expert]) at features `f`
    /// whose forward pass was `fw`; `acc` holds the squared-gradient sums (same layout as
    /// [`MlpBody::tensors`]).
    pub fn step(
        &mut self,
        f: &[usize; FAMILIES],
        fw: &Forward,
        grad: &[f32],
        acc: &mut MlpBody,
        lr: f32,
    ) {
        let h = self.hidden;
        let upd = |w: &mut f32, a: &mut f32, g: f32| {
            *a += g * g;
            *w -= lr * g / (a.sqrt() + 1e-6);
        };
        // Hidden gradient through the heads (before they change), then the heads.
        let mut dh = vec![0f32; h];
        for (o, &g) in grad.iter().enumerate() {
            if g == 0.0 {
                continue;
            }
            let w = &mut self.w2[o * h..(o + 1) * h];
            let a = &mut acc.w2[o * h..(o + 1) * h];
            for (((d, w), a), hj) in dh.iter_mut().zip(w).zip(a).zip(&fw.h) {
                *d += g * *w;
                upd(w, a, g * hj);
            }
        }
        // Through the ReLU into W1, b1 and the input embeddings.
        let mut dx = vec![0f32; FAMILIES * h];
        for (j, (&hj, &g)) in fw.h.iter().zip(&dh).enumerate() {
            if hj <= 0.0 {
                continue;
            }
            let w = &mut self.w1[j * FAMILIES * h..(j + 1) * FAMILIES * h];
            let a = &mut acc.w1[j * FAMILIES * h..(j + 1) * FAMILIES * h];
            for (((d, w), a), xi) in dx.iter_mut().zip(w).zip(a).zip(&fw.x) {
                *d += g * *w;
                upd(w, a, g * xi);
            }
            upd(&mut self.b1[j], &mut acc.b1[j], g);
        }
        for (fam, &row) in f.iter().enumerate() {
            for j in 0..h {
                let i = row * h + j;
                upd(&mut self.emb[i], &mut acc.emb[i], dx[fam * h + j]);
            }
        }
    }

    /// The same shapes, zeroed (for Adagrad's accumulators).
    pub fn zeros_like(&self) -> MlpBody {
        MlpBody {
            hidden: self.hidden,
            emb: vec![0.0; self.emb.len()],
            w1: vec![0.0; self.w1.len()],
            b1: vec![0.0; self.b1.len()],
            w2: vec![0.0; self.w2.len()],
        }
    }

    /// Named tensors with their shapes, for saving.
    pub fn tensors(&self, c: &RouterConfig) -> Vec<(&'static str, &Vec<f32>, Vec<usize>)> {
        let h = self.hidden;
        vec![
            ("embedding", &self.emb, vec![FAMILIES * c.buckets, h]),
            ("w1", &self.w1, vec![h, FAMILIES * h]),
            ("b1", &self.b1, vec![h]),
            ("w2", &self.w2, vec![c.n_layer * c.n_expert, h]),
        ]
    }

    pub fn tensors_mut(&mut self) -> Vec<(&'static str, &mut Vec<f32>)> {
        vec![
            ("embedding", &mut self.emb),
            ("w1", &mut self.w1),
            ("b1", &mut self.b1),
            ("w2", &mut self.w2),
        ]
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
