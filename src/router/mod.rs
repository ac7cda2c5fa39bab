//! The pre-gating router (Read-ME): a small model over token ids, decoupled from the
//! backbone, that predicts every MoE layer's experts as soon as a token is known, so that
//! the runtime can load them before any layer asks.
//!
//! The architecture is the one design.md §4 offers as the simple-gradient alternative to
//! Read-ME's tiny transformer: per layer, softmax regression over hashed n-gram features of
//! the token ids (the token, the bigram and the trigram ending at it). Each feature owns a
//! row of expert logits, so a prediction is three row lookups per layer and training is
//! exact sparse gradient steps. `train.rs` fits it to the carved model's own routing.

pub mod adaptive;
pub mod train;

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};

use crate::error::{Error, Result};

pub use train::{train, Accuracy, TrainOptions, TrainReport};

/// Feature families: the token, the bigram and the trigram ending at it.
pub const FAMILIES: usize = 3;

const KIND: &str = "ngram-softmax";

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RouterConfig {
    pub n_layer: usize,
    pub n_expert: usize,
    /// Experts the backbone uses per token (the size of a predicted set).
    pub n_used: usize,
    /// Hash buckets per feature family.
    pub buckets: usize,
}

/// Per-layer softmax regression over hashed n-grams of the token ids.
pub struct PreGateRouter {
    pub config: RouterConfig,
    /// [n_layer][FAMILIES * buckets][n_expert] logit contributions.
    pub(crate) weights: Vec<f32>,
    /// [n_layer][n_expert]
    pub(crate) bias: Vec<f32>,
}

fn mix(a: u64, b: u64) -> u64 {
    (a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .rotate_left(29)
        .wrapping_mul(0xBF58_476D_1CE4_E5B9)
}

impl PreGateRouter {
    pub fn new(config: RouterConfig) -> Result<PreGateRouter> {
        let RouterConfig {
            n_layer,
            n_expert,
            n_used,
            buckets,
        } = config;
        if n_layer == 0 || n_expert == 0 || buckets == 0 || n_used == 0 || n_used > n_expert {
            return Err(Error::InvalidArgument(format!(
                "router config {config:?} is empty or inconsistent"
            )));
        }
        Ok(PreGateRouter {
            config,
            weights: vec![0.0; n_layer * FAMILIES * buckets * n_expert],
            bias: vec![0.0; n_layer * n_expert],
        })
    }

    /// The feature rows of position `t` (which sees tokens ..=t only: the router is causal).
    pub fn features(&self, tokens: &[u32], t: usize) -> [usize; FAMILIES] {
        let b = self.config.buckets as u64;
        let tok = |i: usize| tokens[i] as u64 + 1;
        let prev = |back: usize| if t >= back { tok(t - back) } else { 0 };
        let h1 = mix(1, tok(t));
        let h2 = mix(h1, prev(1));
        let h3 = mix(h2, prev(2));
        [
            (h1 % b) as usize,
            (b + h2 % b) as usize,
            (2 * b + h3 % b) as usize,
        ]
    }

    /// Layer `layer`'s expert logits for a position with features `f`, into `out`.
    pub(crate) fn logits_into(&self, layer: usize, f: &[usize; FAMILIES], out: &mut [f32]) {
        let e = self.config.n_expert;
        let rows = FAMILIES * self.config.buckets;
        out.copy_from_slice(&self.bias[layer * e..(layer + 1) * e]);
        for &row in f {
            let w = &self.weights[(layer * rows + row) * e..(layer * rows + row + 1) * e];
            for (o, v) in out.iter_mut().zip(w) {
                *o += v;
            }
        }
    }

    /// The `k` most likely experts of every layer for position `t`, best first:
    /// `[layer][k]`.
    pub fn predict(&self, tokens: &[u32], t: usize, k: usize) -> Vec<Vec<u32>> {
        self.predict_scored(tokens, t, k)
            .into_iter()
            .map(|l| l.into_iter().map(|(e, _)| e).collect())
            .collect()
    }

    /// As [`PreGateRouter::predict`], with each expert's probability.
    pub fn predict_scored(&self, tokens: &[u32], t: usize, k: usize) -> Vec<Vec<(u32, f32)>> {
        let f = self.features(tokens, t);
        let mut logits = vec![0f32; self.config.n_expert];
        (0..self.config.n_layer)
            .map(|l| {
                self.logits_into(l, &f, &mut logits);
                let mx = logits.iter().fold(f32::MIN, |a, b| a.max(*b));
                let sum: f32 = logits.iter().map(|z| (z - mx).exp()).sum();
                top_k(&logits, k)
                    .into_iter()
                    .map(|e| (e, (logits[e as usize] - mx).exp() / sum))
                    .collect()
            })
            .collect()
    }

    /// The plan for a whole text: `[token][layer][n_used]` predicted experts, flattened
    /// as an expert trace lays out its choices.
    pub fn plan(&self, tokens: &[u32]) -> Vec<u16> {
        let k = self.config.n_used;
        (0..tokens.len())
            .flat_map(|t| self.predict(tokens, t, k))
            .flat_map(|layer| layer.into_iter().map(|e| e as u16))
            .collect()
    }

    /// Checks that this router was trained for a model of `n_layer` MoE layers of
    /// `n_expert` experts.
    pub fn check_fits(&self, n_layer: usize, n_expert: usize) -> Result<()> {
        let c = &self.config;
        if (c.n_layer, c.n_expert) != (n_layer, n_expert) {
            return Err(Error::InvalidArgument(format!(
                "the router predicts {} layers of {} experts; the model has {n_layer} of {n_expert}",
                c.n_layer, c.n_expert
            )));
        }
        Ok(())
    }

    /// Saves as safetensors, the config in the metadata; written to a temporary file and
    /// renamed.
    pub fn save(&self, path: &Path) -> Result<()> {
        let c = &self.config;
        let rows = FAMILIES * c.buckets;
        let w: Vec<u8> = bytemuck::cast_slice(&self.weights).to_vec();
        let b: Vec<u8> = bytemuck::cast_slice(&self.bias).to_vec();
        fn view(data: &[u8], shape: Vec<usize>) -> Result<TensorView<'_>> {
            TensorView::new(Dtype::F32, shape, data)
                .map_err(|e| Error::InvalidArgument(format!("router: {e}")))
        }
        let tensors = vec![
            ("weights", view(&w, vec![c.n_layer, rows, c.n_expert])?),
            ("bias", view(&b, vec![c.n_layer, c.n_expert])?),
        ];
        let meta: HashMap<String, String> = [
            ("pregate.router", KIND.to_string()),
            ("n_layer", c.n_layer.to_string()),
            ("n_expert", c.n_expert.to_string()),
            ("n_used", c.n_used.to_string()),
            ("buckets", c.buckets.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let bytes = safetensors::serialize(tensors, Some(meta))
            .map_err(|e| Error::InvalidArgument(format!("router: {e}")))?;
        crate::format::write_atomic(path, &bytes)
    }

    pub fn load(path: &Path) -> Result<PreGateRouter> {
        let bytes = std::fs::read(path).map_err(|cause| Error::Open {
            path: path.to_path_buf(),
            cause,
        })?;
        let bad = |why: String| Error::Malformed {
            what: format!("router {}", path.display()),
            why,
        };
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let m = meta.metadata().clone().unwrap_or_default();
        if m.get("pregate.router").map(String::as_str) != Some(KIND) {
            return Err(bad(format!("not a pregate {KIND} router")));
        }
        let num = |k: &str| -> Result<usize> {
            m.get(k)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad(format!("metadata '{k}' is missing or not a number")))
        };
        let config = RouterConfig {
            n_layer: num("n_layer")?,
            n_expert: num("n_expert")?,
            n_used: num("n_used")?,
            buckets: num("buckets")?,
        };
        let mut r = PreGateRouter::new(config)?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        for (name, dst) in [("weights", &mut r.weights), ("bias", &mut r.bias)] {
            let t = st.tensor(name).map_err(|e| bad(e.to_string()))?;
            if t.dtype() != Dtype::F32 || t.data().len() != 4 * dst.len() {
                return Err(bad(format!("tensor '{name}' has the wrong type or size")));
            }
            for (d, c) in dst.iter_mut().zip(t.data().chunks_exact(4)) {
                *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Ok(r)
    }
}

/// Indices of the `k` largest values, largest first (ties: lower index first).
pub fn top_k(values: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..values.len() as u32).collect();
    idx.sort_by(|a, b| {
        values[*b as usize]
            .total_cmp(&values[*a as usize])
            .then(a.cmp(b))
    });
    idx.truncate(k);
    idx
}
