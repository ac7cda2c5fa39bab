//! Where the VRAM goes, computed before anything is allocated: resident weights by part,
//! the KV cache for the context, and activations. With a `--vram-budget`, this decides the
//! context length that fits, or explains in bytes why the model does not fit.

use crate::error::{Error, Result};
use crate::format::GgufFile;
use crate::quant::DType;

use super::config::ModelConfig;
use super::session::{DEFAULT_UBATCH, TOPK_CAP};

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
}

impl MemoryPlan {
    pub fn weights(&self) -> u64 {
        self.embedding + self.attention + self.ffn + self.norms + self.lm_head
    }

    pub fn total(&self) -> u64 {
        self.weights() + self.kv_cache + self.activations
    }

    /// One line for the start of a run.
    pub fn summary(&self, budget: Option<u64>) -> String {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let budget = budget
            .map(|b| format!(" of a {:.1} MiB budget", mib(b)))
            .unwrap_or_default();
        format!(
            "VRAM plan: weights {:.1} MiB (embedding {:.1}, attention {:.1}, ffn {:.1}, lm_head {:.1}), KV cache {:.1} MiB for {} tokens, activations {:.1} MiB; total {:.1} MiB{budget}; expert slots: 0 (dense model)",
            mib(self.weights()),
            mib(self.embedding),
            mib(self.attention),
            mib(self.ffn),
            mib(self.lm_head),
            mib(self.kv_cache),
            self.ctx,
            mib(self.activations),
            mib(self.total()),
        )
    }
}

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

/// Bytes of KV cache per token of context.
pub fn kv_bytes_per_token(c: &ModelConfig) -> u64 {
    2 * c.n_layer as u64 * (c.n_kv_head * c.head_dim) as u64 * 4
}

/// Plans a session of `ctx` tokens.
pub fn plan(f: &GgufFile, c: &ModelConfig, ctx: usize) -> MemoryPlan {
    let mut p = MemoryPlan {
        embedding: gpu_bytes(f, "token_embd.weight"),
        lm_head: gpu_bytes(f, "output.weight"),
        norms: gpu_bytes(f, "output_norm.weight"),
        ctx,
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
        ] {
            p.attention += gpu_bytes(f, &n(t));
        }
        // Dense FFN, or experts, shared expert and router: every ffn_* tensor but the norm.
        let prefix = n("ffn_");
        for t in f.tensors.iter().filter(|t| t.name.starts_with(&prefix)) {
            if t.name != n("ffn_norm.weight") {
                p.ffn += gpu_bytes(f, &t.name);
            }
        }
        // The selection bias is a vector uploaded as f32.
        p.ffn += gpu_bytes(f, &n("exp_probs_b.bias"));
        p.norms += gpu_bytes(f, &n("attn_norm.weight")) + gpu_bytes(f, &n("ffn_norm.weight"));
    }
    p.kv_cache = kv_bytes_per_token(c) * ctx as u64;
    let ub = DEFAULT_UBATCH.min(ctx) as u64;
    let (d, qd, kvd, ff) = (
        c.d_model as u64,
        (c.n_head * c.head_dim) as u64,
        (c.n_kv_head * c.head_dim) as u64,
        c.ffn_width() as u64,
    );
    let experts = c.moe.as_ref().map_or(1, |m| m.n_expert) as u64;
    // x, xn, q, k, v, attn, gate, up per row; one row of logits; readback; small buffers.
    // Plus each plan's packed dispatch parameters (256 bytes a dispatch): an allowance.
    p.activations = ub * 4 * (2 * d + 2 * qd + 2 * kvd + 2 * ff)
        + 2 * c.vocab as u64 * 4
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
pub fn fit_context(
    f: &GgufFile,
    c: &ModelConfig,
    requested: usize,
    budget: Option<u64>,
) -> Result<MemoryPlan> {
    let default_ctx = c.ctx_train.min(4096);
    let ctx = if requested == 0 {
        default_ctx
    } else {
        requested
    };
    let full = plan(f, c, ctx);
    let Some(budget) = budget else {
        return Ok(full);
    };
    if full.total() <= budget {
        return Ok(full);
    }
    let min_ctx = 256.min(ctx);
    let fixed = plan(f, c, min_ctx);
    if requested == 0 && fixed.total() <= budget {
        let room = (budget - fixed.total()) / kv_bytes_per_token(c);
        let ctx = (min_ctx + room as usize).min(default_ctx);
        return Ok(plan(f, c, ctx));
    }
    let p = if requested == 0 { fixed } else { full };
    Err(Error::BudgetTooSmall {
        needed: p.total(),
        budget,
        detail: p.summary(Some(budget)),
    })
}
