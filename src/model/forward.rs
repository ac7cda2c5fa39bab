//! The forward pass as a fixed plan of GPU dispatches, built once per batch shape and
//! replayed every step. Read top to bottom, it is the architecture:
//! embed → [norm → q,k,v → rope → attention → o (+x) → norm → gate, up → swiglu → down (+x)] × L
//! → norm → lm_head → (argmax | nll).

use crate::error::Result;
use crate::gpu::ops::{self, AttnShape, RowBuffers, Write};
use crate::gpu::{DispatchBuilder, DispatchList, Kernel};

use super::session::{StateBuffers, TOPK_CAP};
use super::weights::Model;

/// What a step must leave for the host to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Output {
    /// Nothing: an intermediate prefill chunk only fills the KV cache.
    None,
    /// The last token's argmax id.
    Argmax,
    /// The last token's logits.
    Logits,
    /// Every token's negative log-likelihood of `targets` (perplexity).
    Nll,
    /// The last token's k largest logits with their ids (sampling without reading all logits).
    TopK(u32),
}

pub fn build(
    model: &Model,
    s: &StateBuffers,
    n_tokens: u32,
    output: Output,
) -> Result<DispatchList> {
    let c = &model.config;
    let w = &model.weights;
    let n = n_tokens;
    let eps = c.rms_eps;
    let shape = AttnShape {
        n_head: c.n_head as u32,
        n_kv_head: c.n_kv_head as u32,
        head_dim: c.head_dim as u32,
        ctx: s.ctx as u32,
    };
    let mut b = DispatchBuilder::new(&model.gpu);

    ops::embed(&mut b, &w.embed, &s.ids, n, &s.x);
    for (l, lw) in w.layers.iter().enumerate() {
        // Attention block.
        ops::rms_norm(&mut b, &s.x, 0, n, &lw.attn_norm, eps, &s.xn);
        ops::matmul(
            &mut b,
            &lw.q,
            &s.xn,
            0,
            n,
            &s.q,
            lw.q_bias.as_ref(),
            Write::Store,
            &s.dummy,
        );
        ops::matmul(
            &mut b,
            &lw.k,
            &s.xn,
            0,
            n,
            &s.k,
            lw.k_bias.as_ref(),
            Write::Store,
            &s.dummy,
        );
        ops::matmul(
            &mut b,
            &lw.v,
            &s.xn,
            0,
            n,
            &s.v,
            lw.v_bias.as_ref(),
            Write::Store,
            &s.dummy,
        );
        ops::rope_store_kv(
            &mut b,
            shape,
            c.rope_mode,
            c.rope_base,
            n,
            &s.step,
            &s.q,
            &s.k,
            &s.v,
            &s.kc[l],
            &s.vc[l],
        );
        ops::attention(&mut b, shape, n, &s.step, &s.q, &s.kc[l], &s.vc[l], &s.attn);
        ops::matmul(
            &mut b,
            &lw.o,
            &s.attn,
            0,
            n,
            &s.x,
            None,
            Write::Accumulate,
            &s.dummy,
        );
        // Feed-forward block (SwiGLU).
        ops::rms_norm(&mut b, &s.x, 0, n, &lw.ffn_norm, eps, &s.xn);
        ops::matmul(
            &mut b,
            &lw.gate,
            &s.xn,
            0,
            n,
            &s.gate,
            None,
            Write::Store,
            &s.dummy,
        );
        ops::matmul(
            &mut b,
            &lw.up,
            &s.xn,
            0,
            n,
            &s.up,
            None,
            Write::Store,
            &s.dummy,
        );
        ops::swiglu(&mut b, &s.gate, &s.up, n * c.d_ff as u32);
        ops::matmul(
            &mut b,
            &lw.down,
            &s.gate,
            0,
            n,
            &s.x,
            None,
            Write::Accumulate,
            &s.dummy,
        );
    }

    // Head: only the rows whose logits are needed.
    let (row0, rows) = match output {
        Output::None => return b.finish(&model.gpu),
        Output::Argmax | Output::Logits | Output::TopK(_) => (n - 1, 1),
        Output::Nll => (0, n),
    };
    ops::rms_norm(&mut b, &s.x, row0, rows, &w.out_norm, eps, &s.xn);
    ops::matmul(
        &mut b,
        w.lm_head(),
        &s.xn,
        0,
        rows,
        &s.logits,
        None,
        Write::Store,
        &s.dummy,
    );
    let rb = RowBuffers {
        x: &s.logits,
        targets: &s.targets,
        out_f: &s.nll,
        out_u: &s.argmax,
    };
    match output {
        Output::Argmax => ops::row_op(&mut b, Kernel::Argmax, &rb, c.vocab as u32, 0, 1),
        Output::Nll => ops::row_op(&mut b, Kernel::Nll, &rb, c.vocab as u32, 0, rows),
        Output::TopK(k) => {
            let tk = RowBuffers {
                x: &s.logits,
                targets: &s.targets,
                out_f: &s.topk_val,
                out_u: &s.topk_idx,
            };
            ops::top_k(&mut b, &tk, c.vocab as u32, 0, k, TOPK_CAP as u32);
        }
        _ => {}
    }
    b.finish(&model.gpu)
}
