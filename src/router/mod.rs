//! The pre-gating router (Read-ME): a small model over token ids, decoupled from the
//! backbone, that predicts every MoE layer's experts as soon as a token is known, so that
//! the runtime can load them before any layer asks.
//!
//! Both architectures read the same causal features: hashed ids of the token, the bigram
//! and the trigram ending at it (design.md §4's simple-gradient alternative to Read-ME's
//! tiny transformer). `ngram` is softmax regression: each feature owns a row of expert
//! logits per layer, so a prediction is three row lookups per layer. `mlp` is a tiny
//! neural model of Read-ME's size: each feature owns a 64-wide embedding, one hidden layer
//! of 64 (ReLU) is shared by all layers, and each layer has its own linear head, so what
//! one layer learns about a token helps the others. `train.rs` fits either to the carved
//! model's own routing; BENCHMARKS.md compares them.

pub mod adaptive;
pub mod mlp;
pub mod train;

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

pub use mlp::MlpBody;
pub use train::{train, Accuracy, TrainOptions, TrainReport};

/// Feature families: the token, the bigram and the trigram ending at it.
pub const FAMILIES: usize = 3;

const KIND_NGRAM: &str = "ngram-softmax";
const KIND_MLP: &str = "ngram-mlp";
/// Metadata: the routers' fingerprint of the model the router was trained on.
const MODEL_KEY: &str = "pregate.model_routers";

/// The router's architecture (`train-router --arch`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RouterArch {
    /// Softmax regression over hashed n-grams, per layer.
    #[default]
    Ngram,
    /// n-gram embeddings → one shared hidden layer → a head per layer.
    Mlp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RouterConfig {
    pub n_layer: usize,
    pub n_expert: usize,
    /// Experts the backbone uses per token (the size of a predicted set).
    pub n_used: usize,
    /// Hash buckets per feature family.
    pub buckets: usize,
    pub arch: RouterArch,
    /// `mlp`: the embedding and hidden width (0 for `ngram`).
    pub hidden: usize,
}

/// The parameters behind the per-layer logits.
pub(crate) enum Body {
    /// [n_layer][FAMILIES * buckets][n_expert] logit contributions.
    Table(Vec<f32>),
    Mlp(MlpBody),
}

/// The pre-gating router: per position, every layer's expert distribution.
pub struct PreGateRouter {
    pub config: RouterConfig,
    pub(crate) body: Body,
    /// [n_layer][n_expert]
    pub(crate) bias: Vec<f32>,
    /// The routers of the model it learned to predict
    /// ([`crate::carve::routers_fingerprint`]; None: trained before pregate
    /// recorded it).
    pub model: Option<String>,
}

fn mix(a: u64, b: u64) -> u64 {
    (a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .rotate_left(29)
        .wrapping_mul(0xBF58_476D_1CE4_E5B9)
}

impl PreGateRouter {
    /// A router of zeros (`ngram`) or small random weights (`mlp`, from `seed`).
    pub fn new(config: RouterConfig, seed: u64) -> Result<PreGateRouter> {
        let RouterConfig {
            n_layer,
            n_expert,
            n_used,
            buckets,
            arch,
            hidden,
        } = config;
        let mlp_bad = arch == RouterArch::Mlp && !(1..=1024).contains(&hidden);
        if n_layer == 0
            || n_expert == 0
            || buckets == 0
            || n_used == 0
            || n_used > n_expert
            || mlp_bad
        {
            return Err(Error::InvalidArgument(format!(
                "router config {config:?} is empty or inconsistent"
            )));
        }
        let body = match arch {
            RouterArch::Ngram => Body::Table(vec![0.0; n_layer * FAMILIES * buckets * n_expert]),
            RouterArch::Mlp => Body::Mlp(MlpBody::new(&config, seed)),
        };
        Ok(PreGateRouter {
            config,
            body,
            bias: vec![0.0; n_layer * n_expert],
            model: None,
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

    /// Every layer's expert logits for a position with features `f`: `[n_layer][n_expert]`
    /// into `out`; for `mlp`, also the activations a training step needs.
    pub(crate) fn logits_into(
        &self,
        f: &[usize; FAMILIES],
        out: &mut [f32],
    ) -> Option<mlp::Forward> {
        let (e, layers) = (self.config.n_expert, self.config.n_layer);
        let rows = FAMILIES * self.config.buckets;
        out.copy_from_slice(&self.bias);
        match &self.body {
            Body::Table(w) => {
                for layer in 0..layers {
                    let o = &mut out[layer * e..(layer + 1) * e];
                    for &row in f {
                        let at = (layer * rows + row) * e;
                        for (o, v) in o.iter_mut().zip(&w[at..at + e]) {
                            *o += v;
                        }
                    }
                }
                None
            }
            Body::Mlp(m) => Some(m.add_logits(f, out)),
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
        let e = self.config.n_expert;
        let mut logits = vec![0f32; self.config.n_layer * e];
        self.logits_into(&f, &mut logits);
        logits
            .chunks_exact(e)
            .map(|l| {
                let mx = l.iter().fold(f32::MIN, |a, b| a.max(*b));
                let sum: f32 = l.iter().map(|z| (z - mx).exp()).sum();
                top_k(l, k)
                    .into_iter()
                    .map(|i| (i, (l[i as usize] - mx).exp() / sum))
                    .collect()
            })
            .collect()
    }

    /// The plan for a whole text: `[token][layer][n_used]` predicted experts, flattened
    /// as an expert trace lays out its choices.
    pub fn plan(&self, tokens: &[u32]) -> Vec<u16> {
        self.plan_top(tokens, self.config.n_used)
    }

    /// As [`PreGateRouter::plan`], with `k` experts a token and layer.
    pub fn plan_top(&self, tokens: &[u32], k: usize) -> Vec<u16> {
        (0..tokens.len())
            .flat_map(|t| self.predict(tokens, t, k))
            .flat_map(|layer| layer.into_iter().map(|e| e as u16))
            .collect()
    }

    /// What identifies this router's decisions: a sha256 of its config and parameters
    /// (a model records the router its `ffn_recover_pregate` fit was made for).
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        h.update(format!("{:?}", self.config));
        let mut params = vec![&self.bias];
        match &self.body {
            Body::Table(w) => params.push(w),
            Body::Mlp(m) => params.extend(m.tensors(&self.config).into_iter().map(|(_, v, _)| v)),
        }
        for p in params {
            h.update(bytemuck::cast_slice::<f32, u8>(p));
        }
        crate::format::hex_digest(h)
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
        let bytes = |v: &[f32]| -> Vec<u8> { bytemuck::cast_slice(v).to_vec() };
        let mut data: Vec<(&str, Vec<u8>, Vec<usize>)> =
            vec![("bias", bytes(&self.bias), vec![c.n_layer, c.n_expert])];
        let kind = match &self.body {
            Body::Table(w) => {
                let rows = FAMILIES * c.buckets;
                data.push(("weights", bytes(w), vec![c.n_layer, rows, c.n_expert]));
                KIND_NGRAM
            }
            Body::Mlp(m) => {
                for (name, v, shape) in m.tensors(c) {
                    data.push((name, bytes(v), shape));
                }
                KIND_MLP
            }
        };
        let tensors = data
            .iter()
            .map(|(name, d, shape)| {
                TensorView::new(Dtype::F32, shape.clone(), d)
                    .map(|v| (*name, v))
                    .map_err(|e| Error::InvalidArgument(format!("router: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let meta: HashMap<String, String> = [
            ("pregate.router", kind.to_string()),
            ("n_layer", c.n_layer.to_string()),
            ("n_expert", c.n_expert.to_string()),
            ("n_used", c.n_used.to_string()),
            ("buckets", c.buckets.to_string()),
            ("hidden", c.hidden.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .chain(
            self.model
                .iter()
                .map(|m| (MODEL_KEY.to_string(), m.clone())),
        )
        .collect();
        let bytes = safetensors::serialize(tensors, Some(meta))
            .map_err(|e| Error::InvalidArgument(format!("router: {e}")))?;
        crate::format::write_atomic(path, &bytes)
    }

    pub fn load(path: &Path) -> Result<PreGateRouter> {
        let bytes = crate::format::read_all(path)?;
        let bad = |why: String| Error::BadFile {
            what: format!("router {}", path.display()),
            why,
        };
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
        let m = meta.metadata().clone().unwrap_or_default();
        let arch = match m.get("pregate.router").map(String::as_str) {
            Some(KIND_NGRAM) => RouterArch::Ngram,
            Some(KIND_MLP) => RouterArch::Mlp,
            _ => return Err(bad("not a pregate router".into())),
        };
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
            arch,
            hidden: match arch {
                RouterArch::Ngram => 0,
                RouterArch::Mlp => num("hidden")?,
            },
        };
        let mut r = PreGateRouter::new(config, 0)?;
        r.model = m.get(MODEL_KEY).cloned();
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let mut dsts: Vec<(&str, &mut Vec<f32>)> = vec![("bias", &mut r.bias)];
        match &mut r.body {
            Body::Table(w) => dsts.push(("weights", w)),
            Body::Mlp(mb) => dsts.extend(mb.tensors_mut()),
        }
        for (name, dst) in dsts {
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
