//! The forward pass as a fixed plan of GPU dispatches, built once per batch shape and
//! replayed every step. Read top to bottom, it is the architecture:
//! embed → [norm → q,k,v → rope → attention → o (+x) → norm → gate, up → swiglu → down (+x)] × L
//! → norm → lm_head → (argmax | nll).
//! On GPUs a decode step folds each norm into the mat-vecs that read it, and the SwiGLU into
//! the down projection (`BlockInput`): a dense layer is 10 dispatches instead of 13.

use crate::error::Result;
use crate::gpu::ops::{
    self, AttnShape, ExpertGroups, ExpertIo, ExpertSlots, FusedInput, RouteOut, RowBuffers, Write,
};
use crate::gpu::{DispatchBuilder, DispatchList, Kernel, Mark, Matrix, Vector};

use super::config::{Confidence, MoeConfig};
use super::offload::next_moe_layer;
use super::session::{StateBuffers, SCORE_ROWS, TOPK_CAP};
use super::weights::{Ffn, Mlp, Model, MoeWeights, Weights};
use crate::moe::{Prefetch, Routing};

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
    /// Every dense layer's FFN input and gate/up pre-activations, for carving.
    Capture,
    /// Every MoE layer's chosen expert ids, for expert traces.
    Route,
}

/// A block's input, RMSNorm(x) * weight. A GPU decode step folds the norm into each
/// mat-vec that reads it (`Folded`: one dispatch fewer per block); otherwise the norm runs
/// once into `xn` (`Stored`), which every other consumer (routers, captures) reads.
#[derive(Clone, Copy)]
enum BlockInput<'a> {
    Stored,
    Folded(&'a Vector, f32),
}

impl<'a> BlockInput<'a> {
    /// Folds when `fold` and the step is a GPU decode step; else dispatches the norm.
    fn new(
        b: &mut DispatchBuilder,
        s: &StateBuffers,
        (norm, eps): (&'a Vector, f32),
        n: u32,
        fold: bool,
    ) -> Self {
        if fold && n == 1 && !b.cpu_layout {
            return BlockInput::Folded(norm, eps);
        }
        ops::rms_norm(b, &s.x, 0, n, norm, eps, &s.xn);
        BlockInput::Stored
    }

    /// `y (+)= m · input (+ bias)` for `n` tokens.
    fn matmul(self, b: &mut DispatchBuilder, s: &StateBuffers, m: &Matrix, n: u32, out: Out) {
        let (y, bias, write) = out;
        match self {
            BlockInput::Stored => ops::matmul(b, m, &s.xn, 0, n, y, bias, write, &s.dummy),
            BlockInput::Folded(weight, eps) => {
                let input = FusedInput::Normed { weight, eps };
                ops::matvec_fused(b, m, (&s.x, input), y, bias, write, &s.dummy)
            }
        }
    }
}

/// Where a mat-mul writes: the buffer, the bias to add, store or accumulate.
type Out<'a> = (&'a wgpu::Buffer, Option<&'a Vector>, Write);

/// gate, up → swiglu → down (+x). With `capture` (buffer, d_model), the FFN input is
/// already at its start; gate and up pre-activations are copied after it. With `out_gate`
/// (qwen2moe's shared expert), the output is scaled by sigmoid(out_gate · x) per token.
/// A folded input (GPU decode) also folds the SwiGLU into the down projection.
fn ffn_dense(
    b: &mut DispatchBuilder,
    s: &StateBuffers,
    mlp: &Mlp,
    (input, n): (BlockInput, u32),
    capture: Option<(&wgpu::Buffer, usize)>,
    out_gate: Option<&Matrix>,
) {
    let ff = mlp.gate.rows as u32;
    let store = Write::Store;
    input.matmul(b, s, &mlp.gate, n, (&s.gate, None, store));
    input.matmul(b, s, &mlp.up, n, (&s.up, None, store));
    if let Some((cap, d_model)) = capture {
        let rows = s.capture_rows() as u32;
        ops::copy(b, cap, rows * d_model as u32, &s.gate, n * ff);
        ops::copy(b, cap, rows * (d_model as u32 + ff), &s.up, n * ff);
    }
    if let BlockInput::Folded(..) = input {
        let h = (&*s.gate, FusedInput::SwiGlu { up: &s.up });
        ops::matvec_fused(b, &mlp.down, h, &s.x, None, Write::Accumulate, &s.dummy);
        return;
    }
    ops::swiglu(b, &s.gate, &s.up, n * ff);
    if let Some(g) = out_gate {
        ops::matmul(b, g, &s.xn, 0, n, &s.shared_gate, None, store, &s.dummy);
        ops::sigmoid_scale(b, &s.gate, &s.shared_gate, n * ff, ff);
    }
    ops::matmul(
        b,
        &mlp.down,
        &s.gate,
        0,
        n,
        &s.x,
        None,
        Write::Accumulate,
        &s.dummy,
    );
}

/// The router's matmuls and top-k for `layer`: `n` tokens' expert ids, weights and top-1
/// shares into `ids`, `wts`, `conf`. Only the layer's own decision (`count`) adds to the
/// active-expert counter; a next-layer prediction does not.
#[allow(clippy::too_many_arguments)]
fn route(
    b: &mut DispatchBuilder,
    s: &StateBuffers,
    w: &Weights,
    m: &MoeWeights,
    moe: &MoeConfig,
    layer: usize,
    n: u32,
    (ids, wts, conf): (&wgpu::Buffer, &wgpu::Buffer, &wgpu::Buffer),
    count: bool,
) {
    let store = Write::Store;
    ops::matmul(
        b,
        &m.router_gate,
        &s.xn,
        0,
        n,
        &s.router_g,
        None,
        store,
        &s.dummy,
    );
    if let Some(ru) = &m.router_up {
        ops::matmul(b, ru, &s.xn, 0, n, &s.router_u, None, store, &s.dummy);
    }
    let (e, k) = (moe.n_expert as u32, moe.n_slots as u32);
    let out = RouteOut {
        ids,
        wts,
        conf,
        keep: &w.adaptive_keep,
        active: &w.active_experts,
        layer: layer as u32,
        base: moe.n_used as u32,
        count,
        residual: (moe.confidence == Confidence::Norm).then_some((&*s.x, m.gate_exps.cols as u32)),
    };
    ops::moe_route(
        b,
        moe.score,
        moe.weights,
        e,
        k,
        n,
        &s.router_g,
        &s.router_u,
        &m.bias.buffer,
        &out,
    );
}

/// How a layer's expert kernels find their weights, and what the host does around them.
struct ExpertPlan<'a> {
    layer: usize,
    weights: &'a Weights,
    slots: ExpertSlots<'a>,
    /// Experts live in a cache: mark the plan so the host can load them.
    offloaded: bool,
    /// The next MoE layer and its router, to apply to this layer's input (next-layer
    /// prefetch).
    predict: Option<(usize, &'a MoeWeights)>,
    /// `--routing pregate`: the experts come from the host's plan, not this layer's router.
    pregate: bool,
}

/// router → top-k ids and weights (on the GPU) → the chosen experts' gate, up → swiglu →
/// weighted down (+x).
fn ffn_experts(
    b: &mut DispatchBuilder,
    s: &StateBuffers,
    m: &MoeWeights,
    moe: &MoeConfig,
    n: u32,
    p: &ExpertPlan,
) {
    let (e, k, ff) = (moe.n_expert as u32, moe.n_slots as u32, m.expert_ff as u32);
    if p.pregate {
        // The pre-gating router decided on the host: this layer's row of its plan.
        let off = (p.layer * s.plan_stride * 4) as u64;
        ops::copy_from(b, Kernel::CopyU32, &s.expert_ids, &s.plan_ids, off, n * k);
        ops::copy_from(b, Kernel::Copy, &s.expert_wts, &s.plan_wts, off, n * k);
    } else {
        let out = (&*s.expert_ids, &*s.expert_wts, &*s.expert_conf);
        route(b, s, p.weights, m, moe, p.layer, n, out, true);
    }
    // Rows per expert of down: d_model (the pools hold fewer experts than the model).
    let d = m.gate_exps.cols as u32;
    let groups = ExpertGroups {
        slots: p.slots,
        lists: &s.expert_lists,
        counts: &s.expert_counts,
    };
    if n > 1 {
        ops::moe_group(b, e, k, n, &s.expert_ids, &groups);
    }
    if let Some((nl, next)) = p.predict {
        // Decode only (n == 1): the prediction's confidence goes to `dummy`.
        let out = (&*s.pred_ids, &*s.pred_wts, &*s.dummy);
        route(b, s, p.weights, next, moe, nl, n, out, false);
    }
    if p.offloaded {
        b.mark(Mark::Routed(p.layer));
    }
    if n > 1 {
        // Prefill: expert-major, so each expert's weights are read once per token tile.
        // swiglu writes apart from gate and up, so that a wave of experts can rerun it.
        ops::moe_grouped(b, &m.gate_exps, ff, e, k, n, false, &s.xn, &s.gate, &groups);
        ops::moe_grouped(b, &m.up_exps, ff, e, k, n, false, &s.xn, &s.up, &groups);
        ops::swiglu_into(b, &s.gate, &s.up, &s.expert_h, n * k * ff);
        let (h, out) = (&s.expert_h, &s.expert_out);
        ops::moe_grouped(b, &m.down_exps, d, e, k, n, true, h, out, &groups);
    } else {
        let io = |x, y| ExpertIo {
            slots: p.slots,
            ids: &s.expert_ids,
            wts: &s.expert_wts,
            x,
            y,
        };
        ops::moe_rows(b, &m.gate_exps, ff, k, n, &io(&s.xn, &s.gate));
        ops::moe_rows(b, &m.up_exps, ff, k, n, &io(&s.xn, &s.up));
        ops::swiglu(b, &s.gate, &s.up, n * k * ff);
        ops::moe_down(b, &m.down_exps, d, k, n, &io(&s.gate, &s.x));
    }
    if p.offloaded {
        b.mark(Mark::ExpertsDone(p.layer));
    }
    if n > 1 {
        ops::moe_combine(b, k, n, d, &s.expert_wts, &s.expert_out, &s.x);
    }
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
        let input = BlockInput::new(&mut b, s, (&lw.attn_norm, eps), n, true);
        // q and k; Qwen3 normalises each head (via `attn`, free until attention runs).
        for (m, bias, norm, out, heads) in [
            (&lw.q, &lw.q_bias, &lw.q_norm, &s.q, c.n_head),
            (&lw.k, &lw.k_bias, &lw.k_norm, &s.k, c.n_kv_head),
        ] {
            let dst = if norm.is_some() { &s.attn } else { out };
            input.matmul(&mut b, s, m, n, (dst, bias.as_ref(), Write::Store));
            if let Some(w) = norm {
                ops::rms_norm(&mut b, &s.attn, 0, n * heads as u32, w, eps, out);
            }
        }
        input.matmul(
            &mut b,
            s,
            &lw.v,
            n,
            (&s.v, lw.v_bias.as_ref(), Write::Store),
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
        ops::attention(
            &mut b,
            shape,
            n,
            &s.step,
            &s.q,
            &s.kc[l],
            &s.vc[l],
            &s.attn,
            &s.attn_spans,
        );
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
        // Feed-forward block (SwiGLU), dense or a mixture of experts. Only a dense block
        // reads its input through the mat-vecs alone, so only it may fold the norm.
        let dense = matches!(lw.ffn, Ffn::Dense(_)) && output != Output::Capture;
        let input = BlockInput::new(&mut b, s, (&lw.ffn_norm, eps), n, dense);
        if output == Output::Capture {
            let cap = &s.capture[l];
            ops::copy(&mut b, cap, 0, &s.xn, n * c.d_model as u32);
        }
        match &lw.ffn {
            Ffn::Dense(mlp) => {
                let capture = (output == Output::Capture).then(|| (&*s.capture[l], c.d_model));
                ffn_dense(&mut b, s, mlp, (input, n), capture, None);
            }
            Ffn::Moe(m) => {
                let moe = c.moe.as_ref().expect("an MoE layer implies an MoE config");
                if let Some(shared) = &m.shared {
                    let gate = m.shared_gate.as_ref();
                    ffn_dense(&mut b, s, shared, (input, n), None, gate);
                }
                let offload = model.offload.as_ref();
                let predict = offload
                    .filter(|o| o.prefetch == Prefetch::NextLayer && n == 1)
                    .and_then(|_| next_moe_layer(model, l))
                    .and_then(|nl| match &w.layers[nl].ffn {
                        Ffn::Moe(next) => Some((nl, &**next)),
                        Ffn::Dense(_) => None,
                    });
                let plan = ExpertPlan {
                    layer: l,
                    weights: w,
                    slots: ExpertSlots {
                        table: &w.slot_table,
                        off: (l * moe.n_expert) as u32,
                    },
                    offloaded: offload.is_some(),
                    predict,
                    pregate: model.routing == Routing::Pregate,
                };
                ffn_experts(&mut b, s, m, moe, n, &plan);
                if let Some((w, bias)) = &m.recover {
                    let add = Write::Accumulate;
                    ops::matmul(&mut b, w, &s.xn, 0, n, &s.x, bias.as_ref(), add, &s.dummy);
                }
                if let Some(cf) = &m.count_fits {
                    let fits = ops::CountCorrections {
                        input: &cf.input.buffer,
                        output: &cf.output.buffer,
                        bias: &cf.bias.buffer,
                        rank: cf.rank as u32,
                        mask: cf.mask,
                    };
                    let (k, d) = (moe.n_slots as u32, c.d_model as u32);
                    ops::moe_recover_count(&mut b, k, n, d, &s.expert_ids, &s.xn, &fits, &s.x);
                }
                if output == Output::Route {
                    // Ids [n_layer, ub, k], then confidences [n_layer, ub] (as bits).
                    let (k, ub, layers) = (moe.n_slots as u32, s.ub as u32, c.n_layer as u32);
                    ops::copy_u32(&mut b, &s.route, l as u32 * ub * k, &s.expert_ids, n * k);
                    let conf_at = layers * ub * k + l as u32 * ub;
                    ops::copy_u32(&mut b, &s.route, conf_at, &s.expert_conf, n);
                }
            }
        }
    }

    // Head: only the rows whose logits are needed; scoring goes SCORE_ROWS rows at a time
    // so that the logits buffer stays small.
    let rb = RowBuffers {
        x: &s.logits,
        targets: &s.targets,
        out_f: &s.nll,
        out_u: &s.argmax,
    };
    let head = |b: &mut DispatchBuilder, row0: u32, rows: u32| {
        let out = (&*s.logits, None, Write::Store);
        // The folded norm reads row 0 of x: only a one-token step folds it.
        if n == 1 {
            let input = BlockInput::new(b, s, (&w.out_norm, eps), rows, true);
            input.matmul(b, s, w.lm_head(), rows, out);
        } else {
            ops::rms_norm(b, &s.x, row0, rows, &w.out_norm, eps, &s.xn);
            BlockInput::Stored.matmul(b, s, w.lm_head(), rows, out);
        }
    };
    let vocab = c.vocab as u32;
    match output {
        Output::None | Output::Capture | Output::Route => {}
        Output::Argmax => {
            head(&mut b, n - 1, 1);
            ops::row_op(&mut b, Kernel::Argmax, &rb, vocab, 0, 1, 0);
        }
        Output::Logits => head(&mut b, n - 1, 1),
        Output::TopK(k) => {
            head(&mut b, n - 1, 1);
            let tk = RowBuffers {
                x: &s.logits,
                targets: &s.targets,
                out_f: &s.topk_val,
                out_u: &s.topk_idx,
            };
            ops::top_k(&mut b, &tk, vocab, 0, k, TOPK_CAP as u32);
        }
        Output::Nll => {
            for row0 in (0..n).step_by(SCORE_ROWS) {
                let rows = (n - row0).min(SCORE_ROWS as u32);
                head(&mut b, row0, rows);
                ops::row_op(&mut b, Kernel::Nll, &rb, vocab, 0, rows, row0);
            }
        }
    }
    b.finish(&model.gpu)
}
