//! Hyper-parameters of a llama-family model, read from GGUF metadata.

use crate::error::{Error, Result};
use crate::format::GgufFile;
use crate::gpu::ops::{RopeMode, RouteScore, RouteWeights};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Qwen2 / Qwen2.5 (and Qwen1.5/2 MoE): q/k/v biases, neox RoPE.
    Qwen2,
    /// Llama 2/3, Mistral: no biases, normal RoPE.
    Llama,
    /// Qwen3 / Qwen3-MoE: no biases, per-head RMSNorm of q and k, neox RoPE.
    Qwen3,
}

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub arch: Arch,
    pub n_layer: usize,
    pub d_model: usize,
    pub d_ff: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub rope_base: f32,
    pub rope_mode: RopeMode,
    pub rms_eps: f32,
    /// Context length the model was trained for.
    pub ctx_train: usize,
    pub vocab: usize,
    /// Present when the FFN layers are mixtures of experts.
    pub moe: Option<MoeConfig>,
}

/// The mixture-of-experts shape of a model (carved by pregate or native).
#[derive(Clone, Debug)]
pub struct MoeConfig {
    /// Routed experts per layer.
    pub n_expert: usize,
    /// Experts each token uses (the model's default, or --experts-per-token).
    pub n_used: usize,
    /// Expert slots a token has in the kernels and buffers: `n_used`, or more where
    /// adaptive gating may give a token its router is unsure of extra experts
    /// ([`ModelConfig::set_adaptive_slots`]).
    pub n_slots: usize,
    /// Experts each token uses as the file says: a carved model's recovery map
    /// (`ffn_recover`) was fitted for this many ([`recovery_applies`] says when it is used).
    pub fitted_used: usize,
    /// Neurons per routed expert.
    pub expert_ff: usize,
    /// Neurons of the shared expert (0: none).
    pub shared_ff: usize,
    pub score: RouteScore,
    pub weights: RouteWeights,
    /// Which of the carve's recovery fits runs (the engine picks the pre-gate's own when
    /// `--routing pregate` runs with the router it was fitted for).
    pub fit: RecoveryFit,
    /// What adaptive gating measures a token's confidence by (moe_route.wgsl).
    pub confidence: Confidence,
}

/// Adaptive gating's per-token signal: where it is high, the experts after the top-1 go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Confidence {
    /// The top-1 expert's share of the chosen experts' mass (probabilities; a carved
    /// model's raw scores).
    Share,
    /// One less the sum of the other chosen experts' scores over the residual's norm: a
    /// least-squares router predicts each expert's output norm, so this is how far
    /// dropping them would move the stream, relative to its size.
    Norm,
}

/// A carve's recovery fits: one for the layers' own routers, and optionally one for a
/// pre-gating router's choices (`carve --pregate-router`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RecoveryFit {
    #[default]
    Layers,
    Pregate,
}

impl RecoveryFit {
    /// Layer `l`'s tensors of this fit: the map, its bias, and the corrected shared
    /// down-projection.
    pub fn tensors(self, l: usize) -> [String; 3] {
        let p = match self {
            RecoveryFit::Layers => "ffn_recover",
            RecoveryFit::Pregate => "ffn_recover_pregate",
        };
        [".weight", ".bias", "_shexp.weight"].map(|s| format!("blk.{l}.{p}{s}"))
    }
}

/// Layer `l`'s correction of the layers' recovery fit for tokens that run `k` experts
/// (see [`count_fit_counts`]): the map's input rows V, its output columns U, and its bias.
pub fn count_fit_tensors(l: usize, k: usize) -> [String; 3] {
    ["_in.weight", "_out.weight", ".bias"].map(|s| format!("blk.{l}.ffn_recover_k{k}{s}"))
}

/// Rank of a count correction (at most d_model): the part of what the experts between two
/// counts add that a linear map of the FFN input predicts lies mostly in a few directions.
pub const COUNT_FIT_RANK: usize = 64;

/// The expert counts a carve fitted for `fitted` experts a token (of `n_routed`) also
/// fits a correction for: every other count up to twice the fitted one (adaptive gating's
/// room) where the recovery fit applies at all. A token that drops to one expert then
/// gets an estimate of what its second would have added, and one given a third no longer
/// has that expert's share counted twice.
pub fn count_fit_counts(fitted: usize, n_routed: usize) -> Vec<usize> {
    (1..=2 * fitted)
        .filter(|&k| k != fitted && recovery_applies(k, fitted, n_routed))
        .collect()
}

/// Most routed experts a layer may have (moe_route.wgsl's MAX_EXPERTS).
pub const MAX_EXPERTS: usize = 128;

/// Whether a carve's recovery fit (fitted for `fitted` of `n_expert` routed experts a
/// token) is used when tokens use `k`. It estimates what the experts past the first
/// `fitted` add, so it helps at any fewer (measured on the default model, S2A2E16 at k = 1:
/// perplexity 64.8 with it, 169 without) and at a few more, until the experts that run
/// cover what it adds: past a quarter of the remaining experts it hurts (S2A2E16: better
/// at k 3-4, worse at 5; S2A6E16: better below 8, even at 8). With every expert running
/// the MoE is the dense FFN and needs none.
pub fn recovery_applies(k: usize, fitted: usize, n_expert: usize) -> bool {
    k < n_expert && (k <= fitted || k < fitted + n_expert.saturating_sub(fitted) / 4)
}

impl MoeConfig {
    /// Slots a token has past the top-k: experts adaptive gating may add.
    pub fn extra_slots(&self) -> usize {
        self.n_slots - self.n_used
    }

    /// The most experts adaptive gating gives a token by default: twice the top-k
    /// (fewer where the carve's recovery fit stops helping: see
    /// [`ModelConfig::set_adaptive_slots`]).
    pub fn default_room_cap(&self) -> usize {
        (2 * self.n_used).min(self.n_expert)
    }

    /// The most experts a token may keep: its slots now, or adaptive gating's default room
    /// when that is set later (the memory plan is made before it).
    pub fn most_slots(&self) -> usize {
        self.n_slots.max(self.default_room_cap())
    }

    /// Whether a carve's recovery fit applies at this many experts a token.
    pub fn recovering(&self) -> bool {
        recovery_applies(self.n_used, self.fitted_used, self.n_expert)
    }

    /// Layer `l`'s tensors of the fit in use: the map, its bias, and the corrected shared
    /// down-projection.
    pub fn recovery_tensors(&self, l: usize) -> [String; 3] {
        self.fit.tensors(l)
    }

    fn from_gguf(f: &GgufFile, arch: &str) -> Result<Option<MoeConfig>> {
        let key = |k: &str| format!("{arch}.{k}");
        let Some(n) = f.get(&key("expert_count")).and_then(|v| v.as_u64()) else {
            return Ok(None);
        };
        let n_expert = n as usize;
        let n_used = f.get_u64(&key("expert_used_count"))? as usize;
        if n_expert == 0 || n_expert > MAX_EXPERTS || n_used == 0 || n_used > n_expert {
            return Err(Error::Malformed {
                what: key("expert_count"),
                why: format!(
                    "{n_expert} experts with {n_used} used (need 1..={MAX_EXPERTS}, used <= experts)"
                ),
            });
        }
        // pregate's carved routers: "cmoe" scores representative rows, "lsq" is linear; both
        // weight every chosen expert 1 (with all experts active, the dense FFN).
        let router = match f.get("pregate.moe.router") {
            None => None,
            // Any other value would run the experts as a native MoE's, wrong and silent.
            Some(v) => match v.as_str() {
                Some(r @ ("cmoe" | "lsq")) => Some(r),
                _ => {
                    return Err(Error::Malformed {
                        what: "metadata 'pregate.moe.router'".into(),
                        why: format!(
                            "{} is not a router this build knows (cmoe, lsq)",
                            v.display_short()
                        ),
                    })
                }
            },
        };
        let carved = router.is_some();
        let cmoe = router == Some("cmoe");
        Ok(Some(MoeConfig {
            n_expert,
            n_used,
            n_slots: n_used,
            fitted_used: n_used,
            fit: RecoveryFit::Layers,
            confidence: match router {
                Some("lsq") => Confidence::Norm,
                _ => Confidence::Share,
            },
            expert_ff: match f.get_u64(&key("expert_feed_forward_length"))? {
                0 => {
                    return Err(Error::Malformed {
                        what: key("expert_feed_forward_length"),
                        why: "a width of 0".into(),
                    })
                }
                v => v as usize,
            },
            shared_ff: f
                .get(&key("expert_shared_feed_forward_length"))
                .and_then(|v| v.as_u64())
                .unwrap_or(0) as usize,
            score: if cmoe {
                RouteScore::Cmoe
            } else {
                RouteScore::Logits
            },
            weights: if carved {
                RouteWeights::Ones
            } else if f
                .get(&key("expert_weights_norm"))
                .and_then(|v| v.as_bool())
                // llama.cpp renormalises qwen3moe's top-k weights (norm_topk_prob).
                .unwrap_or(arch == "qwen3moe")
            {
                RouteWeights::Renormalised
            } else {
                RouteWeights::Probabilities
            },
        }))
    }
}

impl ModelConfig {
    /// Routes each token to `k` experts (clamped to the routed count; `usize::MAX`: all).
    pub fn set_experts_per_token(&mut self, k: usize) -> Result<()> {
        let Some(moe) = self.moe.as_mut() else {
            return Err(Error::InvalidArgument(
                "--experts-per-token needs a mixture-of-experts model (see `pregate carve`)".into(),
            ));
        };
        if k == 0 {
            return Err(Error::InvalidArgument(
                "--experts-per-token must be at least 1".into(),
            ));
        }
        moe.n_used = k.min(moe.n_expert);
        moe.n_slots = moe.n_used;
        Ok(())
    }

    /// Lets adaptive gating add experts where a token's router is unsure, as well as drop
    /// them where it is sure: up to `max` a token (None: as many as the carve's recovery
    /// fit still helps at, at most twice the top-k; `has_fit` says whether the model has
    /// one). Only for the norm signal, where a least-squares router's score estimates each
    /// expert's own output, so each can be judged alone; others keep the top-k as the
    /// most. Returns the slots a token now has.
    pub fn set_adaptive_slots(&mut self, max: Option<usize>, has_fit: bool) -> Result<usize> {
        let Some(moe) = self.moe.as_mut() else {
            return Ok(0);
        };
        if let Some(m) = max {
            if m < moe.n_used {
                return Err(Error::InvalidArgument(format!(
                    "--adaptive-max-experts {m} is below the {} experts a token uses",
                    moe.n_used
                )));
            }
            if m > moe.n_used && moe.confidence != Confidence::Norm {
                return Err(Error::InvalidArgument(
                    "--adaptive-max-experts above the top-k needs a carve with a least-squares router (its scores estimate each expert's output)".into(),
                ));
            }
        }
        moe.n_slots = match max {
            Some(m) => m.min(moe.n_expert),
            None if moe.confidence != Confidence::Norm => moe.n_used,
            None => (moe.n_used..=moe.default_room_cap())
                .take_while(|&k| !has_fit || recovery_applies(k, moe.fitted_used, moe.n_expert))
                .last()
                .unwrap_or(moe.n_used),
        };
        Ok(moe.n_slots)
    }

    /// Floats per token the FFN's intermediate buffers must hold.
    pub fn ffn_width(&self) -> usize {
        match &self.moe {
            Some(m) => self.d_ff.max(m.shared_ff).max(m.n_expert * m.expert_ff),
            None => self.d_ff,
        }
    }
}

impl ModelConfig {
    pub fn from_gguf(f: &GgufFile) -> Result<ModelConfig> {
        let arch_name = f.architecture()?.to_string();
        let arch = match arch_name.as_str() {
            "qwen2" | "qwen2moe" => Arch::Qwen2,
            "llama" | "mistral" => Arch::Llama,
            "qwen3" | "qwen3moe" => Arch::Qwen3,
            other => return Err(Error::UnsupportedArch(other.to_string())),
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        // A width every buffer and kernel grid is sized by: zero would divide by zero.
        let width = |k: &str| -> Result<usize> {
            match f.get_u64(&key(k))? {
                0 => Err(Error::Malformed {
                    what: key(k),
                    why: "a width of 0".into(),
                }),
                v => Ok(v as usize),
            }
        };
        let n_head = f.get_u64(&key("attention.head_count"))? as usize;
        let d_model = width("embedding_length")?;
        if n_head == 0 || !d_model.is_multiple_of(n_head) {
            return Err(Error::Malformed {
                what: key("attention.head_count"),
                why: format!("{n_head} heads do not divide {d_model}"),
            });
        }
        let n_kv_head = match f.get(&key("attention.head_count_kv")) {
            Some(_) => f.get_u64(&key("attention.head_count_kv"))? as usize,
            None => n_head,
        };
        if n_kv_head == 0 || !n_head.is_multiple_of(n_kv_head) {
            return Err(Error::Malformed {
                what: key("attention.head_count_kv"),
                why: format!("{n_kv_head} kv heads do not divide {n_head} heads"),
            });
        }
        let head_dim = match f.get(&key("attention.key_length")) {
            Some(_) => width("attention.key_length")?,
            None => d_model / n_head,
        };
        if head_dim % 4 != 0 || head_dim > 256 || head_dim == 0 {
            return Err(Error::Malformed {
                what: "head dimension".into(),
                why: format!("{head_dim} is not supported (multiple of 4, at most 256)"),
            });
        }
        let embd = f.require("token_embd.weight")?;
        let vocab = embd.rows_cols().0;
        // Every layer has tensors of its own: a count past the file's tensors is corrupt
        // (and would make every per-layer loop run for billions of steps).
        let n_layer = f.get_u64(&key("block_count"))? as usize;
        if n_layer == 0 || n_layer > f.tensors.len() {
            return Err(Error::Malformed {
                what: key("block_count"),
                why: format!("{n_layer} layers in a file of {} tensors", f.tensors.len()),
            });
        }
        // A number the forward pass divides by or takes powers of: NaN or a negative
        // value would give NaN logits with no error.
        let positive = |k: &str, default: f64, zero_ok: bool| -> Result<f64> {
            let v = f.get(&key(k)).and_then(|v| v.as_f64()).unwrap_or(default);
            if v.is_finite() && (v > 0.0 || (zero_ok && v == 0.0)) {
                Ok(v)
            } else {
                Err(Error::Malformed {
                    what: key(k),
                    why: format!("{v} is not a usable value"),
                })
            }
        };
        let ctx_train = f
            .get(&key("context_length"))
            .and_then(|v| v.as_u64())
            .unwrap_or(4096) as usize;
        if ctx_train == 0 {
            return Err(Error::Malformed {
                what: key("context_length"),
                why: "a context of 0 tokens".into(),
            });
        }
        Ok(ModelConfig {
            arch,
            n_layer,
            d_model,
            d_ff: width("feed_forward_length")?,
            n_head,
            n_kv_head,
            head_dim,
            rope_base: positive("rope.freq_base", 10000.0, false)? as f32,
            rope_mode: match arch {
                Arch::Qwen2 | Arch::Qwen3 => RopeMode::Neox,
                Arch::Llama => RopeMode::Normal,
            },
            rms_eps: positive("attention.layer_norm_rms_epsilon", 1e-5, true)? as f32,
            ctx_train,
            vocab,
            moe: MoeConfig::from_gguf(f, &arch_name)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// S2A2E16's shape: 14 routed experts, top-2, with the signal `confidence`.
    fn carved(confidence: Confidence) -> ModelConfig {
        ModelConfig {
            arch: Arch::Qwen2,
            n_layer: 2,
            d_model: 8,
            d_ff: 32,
            n_head: 2,
            n_kv_head: 1,
            head_dim: 4,
            rope_base: 1e4,
            rope_mode: RopeMode::Neox,
            rms_eps: 1e-6,
            ctx_train: 64,
            vocab: 16,
            moe: Some(MoeConfig {
                n_expert: 14,
                n_used: 2,
                n_slots: 2,
                fitted_used: 2,
                expert_ff: 2,
                shared_ff: 4,
                score: RouteScore::Logits,
                weights: RouteWeights::Ones,
                fit: RecoveryFit::Layers,
                confidence,
            }),
        }
    }

    #[test]
    fn adaptive_room_is_bounded_by_the_recovery_fit_and_needs_the_norm_signal() {
        let slots = |c: Confidence, max, fit| carved(c).set_adaptive_slots(max, fit);
        // The fit helps up to 4 of 14 when fitted for 2; without one, twice the top-k.
        assert_eq!(slots(Confidence::Norm, None, true).unwrap(), 4);
        assert_eq!(slots(Confidence::Norm, None, false).unwrap(), 4);
        assert_eq!(slots(Confidence::Norm, Some(8), true).unwrap(), 8);
        assert_eq!(slots(Confidence::Norm, Some(99), true).unwrap(), 14);
        assert!(slots(Confidence::Norm, Some(1), true).is_err());
        // The share signal judges the experts together: no room by default, an error asked.
        assert_eq!(slots(Confidence::Share, None, true).unwrap(), 2);
        assert_eq!(slots(Confidence::Share, Some(2), true).unwrap(), 2);
        assert!(slots(Confidence::Share, Some(3), true).is_err());
        // --experts-per-token resets the room.
        let mut c = carved(Confidence::Norm);
        c.set_adaptive_slots(None, true).unwrap();
        c.set_experts_per_token(3).unwrap();
        assert_eq!(c.moe.as_ref().map(|m| m.n_slots), Some(3));
    }

    #[test]
    fn the_recovery_fit_applies_at_fewer_experts_and_a_few_more() {
        // S2A2E16: 14 routed, fitted for 2.
        for k in 1..=4 {
            assert!(recovery_applies(k, 2, 14), "k {k}");
        }
        for k in 5..=14 {
            assert!(!recovery_applies(k, 2, 14), "k {k}");
        }
        // S2A6E16: fitted for 6 of 14.
        assert!(recovery_applies(7, 6, 14));
        assert!(!recovery_applies(8, 6, 14));
        // Few experts: the fitted k still applies, all of them never.
        assert!(recovery_applies(2, 2, 4));
        assert!(!recovery_applies(4, 2, 4));
    }

    #[test]
    fn count_corrections_cover_the_counts_adaptive_gating_reaches() {
        // The default carve: one expert, and adaptive gating's room up to 4.
        assert_eq!(count_fit_counts(2, 14), vec![1, 3, 4]);
        // The tiny test carve (7 routed): the fit applies at 1 and 2 only.
        assert_eq!(count_fit_counts(2, 7), vec![1]);
        // Read-ME's one expert a token: none past 1 applies with 8 clusters.
        assert!(count_fit_counts(1, 8).is_empty());
        assert_eq!(count_fit_counts(6, 14), vec![1, 2, 3, 4, 5, 7]);
        assert_eq!(
            count_fit_tensors(3, 1),
            [
                "blk.3.ffn_recover_k1_in.weight",
                "blk.3.ffn_recover_k1_out.weight",
                "blk.3.ffn_recover_k1.bias"
            ]
        );
    }
}
