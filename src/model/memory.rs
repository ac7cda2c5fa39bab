//! Where the VRAM goes, computed before anything is allocated: resident weights by part,
//! the KV cache for the context, activations, and (for MoE models) the routed experts. With
//! a `--vram-budget`, resident parts are placed first; what is left becomes expert cache
//! slots (moe/cache.rs). This decides the context length and the slots that fit, or explains
//! in bytes why the model does not fit.

use crate::error::{Error, Result};
use crate::format::GgufFile;
use crate::quant::DType;

use super::config::{count_fit_tensors, ModelConfig};
use super::session::TOPK_CAP;

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct MemoryPlan {
    pub embedding: u64,
    pub attention: u64,
    pub ffn: u64,
    pub norms: u64,
    pub lm_head: u64,
    pub kv_cache: u64,
    pub activations: u64,
    pub ctx: usize,
    /// Routed expert weights of every layer, all resident (MoE models; 0 for dense).
    pub experts: u64,
    /// One expert's gate, up and down on the GPU (the largest over layers): a slot's size.
    pub slot_bytes: u64,
    pub n_expert: usize,
    pub n_moe_layers: usize,
    /// Expert cache slots per layer; `None` when every expert is resident.
    pub expert_slots: Option<usize>,
    /// Staging buffers of `slot_bytes` each, with an expert cache.
    pub staging_buffers: usize,
    /// Sessions open at once that `kv_cache` and `activations` hold room for (at least 1).
    pub sessions: usize,
}

/// What `--vram-budget` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub enum VramBudget {
    /// No limit: everything resident.
    #[default]
    All,
    /// A total for every GPU allocation.
    Bytes(u64),
    /// Resident parts, plus cache slots for this share (0..1) of the expert bytes.
    ExpertShare(f64),
}

impl VramBudget {
    /// Parses `all`, a size (`192MiB`, `1.5GiB`, `4096`) or a share of the expert bytes
    /// (`25%`).
    pub fn parse(s: &str) -> Result<VramBudget> {
        let t = s.trim();
        if let Some(p) = t.strip_suffix('%') {
            let v: f64 = p.trim().parse().map_err(|_| {
                Error::InvalidArgument(format!("'{s}' is not a percentage (try 25%)"))
            })?;
            if !(v > 0.0 && v <= 100.0) {
                return Err(Error::InvalidArgument(format!(
                    "'{s}': a share of the expert bytes must be in (0%, 100%]"
                )));
            }
            return Ok(VramBudget::ExpertShare(v / 100.0));
        }
        Ok(match crate::gpu::parse_size(t)? {
            None => VramBudget::All,
            Some(b) => VramBudget::Bytes(b),
        })
    }
}

impl MemoryPlan {
    /// Weights that always live on the GPU (everything but the routed experts).
    pub fn weights(&self) -> u64 {
        self.embedding + self.attention + self.ffn + self.norms + self.lm_head
    }

    /// Bytes for the routed experts: all of them, or the cache slots, their slot table and
    /// the staging ring.
    pub fn expert_bytes(&self) -> u64 {
        match self.expert_slots {
            None => self.experts,
            Some(s) => {
                self.n_moe_layers as u64 * (s as u64 * self.slot_bytes + 4 * self.n_expert as u64)
                    + self.staging_buffers as u64 * self.slot_bytes
            }
        }
    }

    pub fn total(&self) -> u64 {
        self.weights() + self.expert_bytes() + self.kv_cache + self.activations
    }

    /// A one-session plan with room for `n` sessions at once instead: each has its own
    /// KV cache and activations; weights and the expert cache are shared.
    fn for_sessions(self, n: usize) -> MemoryPlan {
        debug_assert_eq!(self.sessions, 1, "for_sessions scales a one-session plan");
        let n = n.max(1);
        MemoryPlan {
            kv_cache: self.kv_cache * n as u64,
            activations: self.activations * n as u64,
            sessions: n,
            ..self
        }
    }

    /// The same plan with `slots` per layer (`None`: all resident).
    fn with_slots(&self, slots: Option<usize>) -> MemoryPlan {
        MemoryPlan {
            expert_slots: slots.filter(|s| *s < self.n_expert),
            ..self.clone()
        }
    }

    /// One line for the start of a run.
    pub fn summary(&self, budget: Option<u64>) -> String {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let budget = budget
            .map(|b| format!(" of a {:.1} MiB budget", mib(b)))
            .unwrap_or_default();
        let experts = match (self.n_expert, self.expert_slots) {
            (0, _) => "expert slots: 0 (dense model)".to_string(),
            (_, None) => format!(
                "experts {:.1} MiB, all resident",
                mib(self.experts)
            ),
            (e, Some(s)) => format!(
                "expert cache {:.1} MiB: {s} of {e} slots per layer x {} layers, {:.2} MiB a slot ({:.0}% of {:.1} MiB of experts)",
                mib(self.expert_bytes()),
                self.n_moe_layers,
                mib(self.slot_bytes),
                100.0 * s as f64 / e as f64,
                mib(self.experts)
            ),
        };
        format!(
            "VRAM plan: resident weights {:.1} MiB (embedding {:.1}, attention {:.1}, ffn {:.1}, lm_head {:.1}), KV cache {:.1} MiB for {}, activations {:.1} MiB; {experts}; total {:.1} MiB{budget}",
            mib(self.weights()),
            mib(self.embedding),
            mib(self.attention),
            mib(self.ffn),
            mib(self.lm_head),
            mib(self.kv_cache),
            match self.sessions {
                0 | 1 => format!("{} tokens", self.ctx),
                n => format!("{n} sessions of {} tokens", self.ctx),
            },
            mib(self.activations),
            mib(self.total()),
        )
    }
}

/// Host-mapped staging buffers (one expert each) for uploads into cache slots: enough for
/// two tokens' worth of one layer's experts, at most 8.
pub fn staging_buffers(n_slots: usize) -> usize {
    (2 * n_slots).clamp(2, 8)
}

/// The routed expert tensors of a layer: `blk.N.ffn_{part}_exps.weight`.
pub const EXPERT_PARTS: [&str; 3] = ["gate", "up", "down"];

/// Bytes a tensor takes on the GPU (quant blocks repacked to u32 alignment; vectors as f32).
fn gpu_bytes(f: &GgufFile, name: &str) -> u64 {
    match f.tensor(name) {
        None => 0,
        Some(t) if t.dims.len() == 1 => t.n_elements() * 4,
        Some(t) => {
            let d = t.dtype;
            let words = t.n_elements() / d.gpu_block_len() as u64 * d.gpu_block_words() as u64;
            if d == DType::F32 {
                t.n_elements() * 4
            } else {
                words * 4
            }
        }
    }
}

/// Bytes of one layer's K (or V) cache per token of context (f32).
pub fn k_cache_bytes_per_token(c: &ModelConfig) -> u64 {
    (c.n_kv_head * c.head_dim) as u64 * 4
}

/// Bytes of KV cache per token of context, every layer's K and V.
pub fn kv_bytes_per_token(c: &ModelConfig) -> u64 {
    2 * c.n_layer as u64 * k_cache_bytes_per_token(c)
}

/// Plans a session of `ctx` tokens.
pub fn plan(f: &GgufFile, c: &ModelConfig, ctx: usize, ubatch: usize) -> MemoryPlan {
    let mut p = MemoryPlan {
        n_expert: c.moe.as_ref().map_or(0, |m| m.n_expert),
        staging_buffers: staging_buffers(c.moe.as_ref().map_or(0, |m| m.n_slots)),
        embedding: gpu_bytes(f, "token_embd.weight"),
        lm_head: gpu_bytes(f, "output.weight"),
        norms: gpu_bytes(f, "output_norm.weight"),
        ctx,
        sessions: 1,
        ..Default::default()
    };
    for l in 0..c.n_layer {
        let n = |s: &str| format!("blk.{l}.{s}");
        for t in [
            "attn_q.weight",
            "attn_k.weight",
            "attn_v.weight",
            "attn_output.weight",
            "attn_q.bias",
            "attn_k.bias",
            "attn_v.bias",
            "attn_q_norm.weight",
            "attn_k_norm.weight",
        ] {
            p.attention += gpu_bytes(f, &n(t));
        }
        // Dense FFN, or shared expert and router: every ffn_* tensor but the norm and the
        // routed experts, which are counted apart (they may live in cache slots).
        let prefix = n("ffn_");
        let routed = EXPERT_PARTS.map(|part| n(&format!("ffn_{part}_exps.weight")));
        // A carve's recovery tensors load only where its fit applies, and only the fit in
        // use; the shared expert's down-projection from one of its tensors
        // (model/weights.rs).
        let fit = c
            .moe
            .as_ref()
            .filter(|m| m.recovering())
            .map(|m| m.recovery_tensors(l));
        let shared_down = c
            .moe
            .as_ref()
            .map(|m| super::weights::shared_down_name(f, l, m));
        let recovery = |name: &str| name.starts_with(&n("ffn_recover"));
        let loaded = |name: &str| match name {
            _ if name == n("ffn_down_shexp.weight")
                || recovery(name) && name.ends_with("_shexp.weight") =>
            {
                shared_down.as_deref() == Some(name)
            }
            _ if recovery(name) => fit
                .as_ref()
                .is_some_and(|f| f[..2].iter().any(|t| t == name)),
            _ => name != n("ffn_norm.weight"),
        };
        // The count corrections load as f32, whatever the file stores, up to the most
        // experts a token may keep.
        if let Some(m) = &c.moe {
            for k in super::weights::loaded_count_fits(f, l, m, m.most_slots()) {
                for name in count_fit_tensors(l, k) {
                    p.ffn += f.tensor(&name).map_or(0, |t| t.n_elements() * 4);
                }
            }
        }
        for t in f.tensors.iter().filter(|t| t.name.starts_with(&prefix)) {
            if routed.contains(&t.name) {
                p.experts += gpu_bytes(f, &t.name);
            } else if loaded(&t.name) {
                p.ffn += gpu_bytes(f, &t.name);
            }
        }
        if let Some(m) = &c.moe {
            let layer: u64 = routed.iter().map(|t| gpu_bytes(f, t)).sum();
            if layer > 0 {
                p.n_moe_layers += 1;
                p.slot_bytes = p.slot_bytes.max(layer / m.n_expert as u64);
            }
        }
        // The selection bias is a vector uploaded as f32.
        p.ffn += gpu_bytes(f, &n("exp_probs_b.bias"));
        p.norms += gpu_bytes(f, &n("attn_norm.weight")) + gpu_bytes(f, &n("ffn_norm.weight"));
    }
    p.kv_cache = kv_bytes_per_token(c) * ctx as u64;
    let ub = ubatch.min(ctx) as u64;
    let (d, qd, kvd, ff) = (
        c.d_model as u64,
        (c.n_head * c.head_dim) as u64,
        (c.n_kv_head * c.head_dim) as u64,
        c.ffn_width() as u64,
    );
    let experts = c.moe.as_ref().map_or(1, |m| m.n_expert) as u64;
    // x, xn, q, k, v, attn, gate, up, expert h per row; one row of logits; readback; small
    // buffers; the route readback and predicted ids.
    // Plus each plan's packed dispatch parameters (256 bytes a dispatch): an allowance.
    p.activations = ub * 4 * (2 * d + 2 * qd + 2 * kvd + 3 * ff)
        + 4 * (ub + 3) * experts
        + 2 * 4 * c.n_layer as u64 * (ub * experts).next_multiple_of(64)
        + (super::session::SCORE_ROWS.min(ctx) as u64 + 1) * c.vocab as u64 * 4
        + (2 * TOPK_CAP as u64 + 16) * 4
        + ub * 12
        + 4 * crate::gpu::ops::attention_scratch_floats(crate::gpu::ops::AttnShape {
            n_head: c.n_head as u32,
            n_kv_head: c.n_kv_head as u32,
            head_dim: c.head_dim as u32,
            ctx: ctx as u32,
        })
        + ub * 4 * 5 * experts
        + c.moe
            .as_ref()
            .map_or(0, |m| ub * 4 * (m.n_expert * c.d_model) as u64)
        + 64 * 1024 * c.n_layer as u64;
    p
}

/// The context length to use: `requested` (0: the model's, capped at 4096) if it fits the
/// budget; with no explicit request, the longest context that fits (at least 256 tokens).
/// MoE models under a budget get expert cache slots for what remains after the resident
/// parts: at least `n_slots` per layer, so that one token's experts fit at once. Each of
/// `sessions` open at once gets its own KV cache and activations for `ubatch` tokens.
pub fn fit(
    f: &GgufFile,
    c: &ModelConfig,
    requested: usize,
    budget: VramBudget,
    (sessions, ubatch): (usize, usize),
) -> Result<MemoryPlan> {
    let planned = |ctx: usize| plan(f, c, ctx, ubatch).for_sessions(sessions);
    let default_ctx = c.ctx_train.min(4096);
    let ctx = if requested == 0 {
        default_ctx
    } else {
        requested
    };
    let full = planned(ctx);
    let n_slots = c.moe.as_ref().map_or(0, |m| m.n_slots);
    let budget = match budget {
        VramBudget::All => return Ok(full),
        VramBudget::ExpertShare(share) => {
            if full.n_moe_layers == 0 {
                return Err(Error::InvalidArgument(
                    "a percentage --vram-budget is a share of the expert bytes, and this model has no experts; give a size (e.g. 512MiB) or all".into(),
                ));
            }
            let slots =
                ((share * full.n_expert as f64).round() as usize).clamp(n_slots, full.n_expert);
            return Ok(full.with_slots(Some(slots)));
        }
        VramBudget::Bytes(b) => b,
    };
    if full.total() <= budget {
        return Ok(full);
    }
    // Experts go to cache slots: as many as fit beside everything resident.
    let slots_in = |p: &MemoryPlan| -> Option<usize> {
        if p.n_moe_layers == 0 {
            return None;
        }
        let base = p.with_slots(Some(0)).total();
        let per_slot = p.n_moe_layers as u64 * p.slot_bytes;
        let slots = (budget.checked_sub(base)? / per_slot.max(1)) as usize;
        (slots >= n_slots.max(1)).then_some(slots)
    };
    if let Some(slots) = slots_in(&full) {
        return Ok(full.with_slots(Some(slots)));
    }
    // Shrink the context (when the user did not ask for one) to what fits.
    let min_ctx = 256.min(ctx);
    let min_slots = (full.n_moe_layers > 0).then_some(n_slots.max(1));
    let fixed = planned(min_ctx).with_slots(min_slots);
    if requested == 0 && fixed.total() <= budget {
        let room = (budget - fixed.total()) / (kv_bytes_per_token(c) * fixed.sessions as u64);
        let ctx = (min_ctx + room as usize).min(default_ctx);
        let p = planned(ctx);
        return Ok(match slots_in(&p) {
            Some(s) => p.with_slots(Some(s)),
            None => p,
        });
    }
    let p = if requested == 0 {
        fixed
    } else {
        full.with_slots(min_slots)
    };
    Err(Error::BudgetTooSmall {
        needed: p.total(),
        budget,
        detail: p.summary(Some(budget)),
    })
}
