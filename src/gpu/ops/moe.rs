//! The mixture-of-experts kernels' host side: routing (ids and weights written on the GPU),
//! the expert mat-vecs for decode, and the expert-major grouped path for prefill.

use bytemuck::{Pod, Zeroable};

use crate::gpu::dispatch::{Bind, DispatchBuilder};
use crate::gpu::kernels::{GroupedLayout, Kernel, GEMM_TILE_DIM, MATVEC_RPT, MATVEC_TPR};
use crate::gpu::tensor::Matrix;

/// How the router turns its outputs into expert choices (moe_route.wgsl).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteScore {
    /// CMoE's training-free score |u · silu(g)| from two representative-neuron rows.
    Cmoe = 0,
    /// Plain router logits (native MoE models).
    Logits = 1,
}

/// How the chosen experts' outputs are weighted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteWeights {
    Ones = 0,
    Renormalised = 1,
    Probabilities = 2,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct RouteParams {
    n_expert: u32,
    n_used: u32,
    n_tokens: u32,
    score_mode: u32,
    weights_mode: u32,
    d_model: u32,
    layer: u32,
    flags: u32,
    n_base: u32,
    _pad: [u32; 3],
}

/// Where the router's decision goes: per token its experts' ids and weights and its top-1
/// share of their probability (`conf`); `keep[layer]` is adaptive gating's threshold
/// (above 1 keeps the fixed top-k), and with `count` the kept experts are added to `active`.
pub struct RouteOut<'a> {
    pub ids: &'a wgpu::Buffer,
    pub wts: &'a wgpu::Buffer,
    pub conf: &'a wgpu::Buffer,
    pub keep: &'a wgpu::Buffer,
    pub active: &'a wgpu::Buffer,
    pub layer: u32,
    /// The fixed top-k: of the `n_used` slots, the experts kept without adaptive gating
    /// (which may keep more where a token is unsure; see `MoeConfig::n_slots`).
    pub base: u32,
    pub count: bool,
    /// The residual stream [n_tokens, d_model], for the norm signal (None: the top-1
    /// share).
    pub residual: Option<(&'a wgpu::Buffer, u32)>,
}

/// Writes each token's `n_used` expert ids and weights from router outputs `g` (and `u`).
#[allow(clippy::too_many_arguments)]
pub fn moe_route(
    b: &mut DispatchBuilder,
    score: RouteScore,
    weights: RouteWeights,
    n_expert: u32,
    n_used: u32,
    n_tokens: u32,
    g: &wgpu::Buffer,
    u: &wgpu::Buffer,
    bias: &wgpu::Buffer,
    out: &RouteOut,
) {
    let p = RouteParams {
        n_expert,
        n_used,
        n_tokens,
        score_mode: score as u32,
        weights_mode: weights as u32,
        d_model: out.residual.map_or(0, |(_, d)| d),
        layer: out.layer,
        flags: u32::from(out.count) | if out.residual.is_some() { 2 } else { 0 },
        n_base: out.base,
        _pad: [0; 3],
    };
    b.push(
        Kernel::MoeRoute,
        &p,
        vec![
            Bind::whole(1, g),
            Bind::whole(2, u),
            Bind::whole(3, bias),
            Bind::whole(4, out.ids),
            Bind::whole(5, out.wts),
            Bind::whole(10, out.keep),
            Bind::whole(11, out.active),
            Bind::whole(12, out.conf),
            // Unread without the norm signal: any read-only buffer (`dummy` may be `conf`).
            Bind::whole(13, out.residual.map_or(g, |(x, _)| x)),
        ],
        [n_tokens, 1, 1],
    );
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct ExpertParams {
    k: u32,
    m: u32,
    n_used: u32,
    n_tokens: u32,
    x_stride: u32,
    y_stride: u32,
    down: u32,
    table_off: u32,
}

/// Where a layer's experts sit in its weight buffer: `table[off + e]` is expert e's slot
/// (the identity when every expert is resident; see moe/cache.rs).
#[derive(Clone, Copy)]
pub struct ExpertSlots<'a> {
    pub table: &'a wgpu::Buffer,
    pub off: u32,
}

/// Buffers shared by the expert kernels: the routing decision and the activations.
pub struct ExpertIo<'a> {
    pub slots: ExpertSlots<'a>,
    pub ids: &'a wgpu::Buffer,
    pub wts: &'a wgpu::Buffer,
    pub x: &'a wgpu::Buffer,
    pub y: &'a wgpu::Buffer,
}

/// Gate or up rows of each token's experts: `y[t, j*m + r] = W[ids[t, j]*m + r] · x[t]`.
/// `w` stacks the experts' `m` rows each.
pub fn moe_rows(
    b: &mut DispatchBuilder,
    w: &Matrix,
    m: u32,
    n_used: u32,
    n_tokens: u32,
    io: &ExpertIo,
) {
    expert_matvec(b, w, m, n_used, n_tokens, io, false);
}

/// `y[t] += sum_j wts[t, j] * W_e · x[t, j*k ..]`, with `w` stacking `m`-row experts of
/// `k = w.cols` columns (the down-projection).
pub fn moe_down(
    b: &mut DispatchBuilder,
    w: &Matrix,
    m: u32,
    n_used: u32,
    n_tokens: u32,
    io: &ExpertIo,
) {
    expert_matvec(b, w, m, n_used, n_tokens, io, true);
}

/// The decode expert kernels. `rows` writes every chosen expert's m rows per token;
/// `down` sums the chosen experts' m-row outputs, weighted, into y. The pipeline layouts are
/// derived from what each entry point uses: `rows` never reads the weights, so it does not
/// bind them.
fn expert_matvec(
    b: &mut DispatchBuilder,
    w: &Matrix,
    m: u32,
    n_used: u32,
    n_tokens: u32,
    io: &ExpertIo,
    down: bool,
) {
    let k = w.cols as u32;
    let p = ExpertParams {
        k,
        m,
        n_used,
        n_tokens,
        x_stride: if down { n_used * k } else { k },
        y_stride: if down { m } else { n_used * m },
        down: down as u32,
        table_off: io.slots.off,
    };
    let split = !b.cpu_layout;
    let dtype = w.dtype;
    let kernel = if down {
        Kernel::MoeDown { dtype, split }
    } else {
        Kernel::MoeRows { dtype, split }
    };
    // Threads: TPR per row (split), else one per RPT rows of one expert.
    let threads = match (split, down) {
        (true, true) => m * MATVEC_TPR,
        (true, false) => n_used * m * MATVEC_TPR,
        (false, true) => m.div_ceil(MATVEC_RPT),
        (false, false) => n_used * m.div_ceil(MATVEC_RPT),
    };
    let mut binds = vec![
        Bind::whole(1, &w.shards[0].buffer),
        Bind::whole(2, io.x),
        Bind::whole(3, io.y),
        Bind::whole(4, io.ids),
        Bind::whole(10, io.slots.table),
    ];
    if down {
        binds.push(Bind::whole(5, io.wts));
    }
    b.push(kernel, &p, binds, [threads.div_ceil(64), n_tokens, 1]);
}

/// The per-expert token lists of a prefill chunk: which slots (t * n_used + j) chose each
/// expert, and how many.
pub struct ExpertGroups<'a> {
    pub slots: ExpertSlots<'a>,
    pub lists: &'a wgpu::Buffer,
    pub counts: &'a wgpu::Buffer,
}

fn route_params(n_expert: u32, n_used: u32, n_tokens: u32, d_model: u32) -> RouteParams {
    RouteParams {
        n_expert,
        n_used,
        n_tokens,
        score_mode: 0,
        weights_mode: 0,
        d_model,
        layer: 0,
        flags: 0,
        n_base: n_used,
        _pad: [0; 3],
    }
}

/// Fills `groups` from the router's expert ids.
pub fn moe_group(
    b: &mut DispatchBuilder,
    n_expert: u32,
    n_used: u32,
    n_tokens: u32,
    ids: &wgpu::Buffer,
    groups: &ExpertGroups,
) {
    b.push(
        Kernel::MoeGroup,
        &route_params(n_expert, n_used, n_tokens, 0),
        vec![
            Bind::whole(4, ids),
            Bind::whole(6, groups.lists),
            Bind::whole(7, groups.counts),
        ],
        [n_expert.div_ceil(64), 1, 1],
    );
}

/// Rows a thread of moe.wgsl's `grouped_rows` (written out by hand there).
const GROUPED_ROWS: u32 = 4;

/// Expert-major mat-mul over a prefill chunk: y[slot * m + r] = W[e*m + r] · x[row(slot)],
/// where row(slot) is the token (gate/up, `down` false) or the slot itself (down).
#[allow(clippy::too_many_arguments)]
pub fn moe_grouped(
    b: &mut DispatchBuilder,
    w: &Matrix,
    m: u32,
    n_expert: u32,
    n_used: u32,
    n_tokens: u32,
    down: bool,
    x: &wgpu::Buffer,
    y: &wgpu::Buffer,
    groups: &ExpertGroups,
) {
    let p = ExpertParams {
        k: w.cols as u32,
        m,
        n_used,
        n_tokens,
        x_stride: 0,
        y_stride: 0,
        down: down as u32,
        table_off: groups.slots.off,
    };
    // CPU adapters: several rows a thread, so each gathered x chunk serves them all. GPUs:
    // 64 x 64 tiles, as many token tiles as the fullest expert could need.
    let (layout, grid) = if b.cpu_layout {
        (
            GroupedLayout::Rows,
            [m.div_ceil(64 * GROUPED_ROWS), n_expert, 1],
        )
    } else {
        (
            GroupedLayout::Tiled,
            [
                m.div_ceil(GEMM_TILE_DIM),
                n_tokens.div_ceil(GEMM_TILE_DIM),
                n_expert,
            ],
        )
    };
    b.push(
        Kernel::MoeGrouped {
            dtype: w.dtype,
            layout,
        },
        &p,
        vec![
            Bind::whole(1, &w.shards[0].buffer),
            Bind::whole(2, x),
            Bind::whole(3, y),
            Bind::whole(6, groups.lists),
            Bind::whole(7, groups.counts),
            Bind::whole(10, groups.slots.table),
        ],
        grid,
    );
}

/// `x[t] += sum_j wts[t, j] * parts[t * n_used + j]` over d_model columns.
pub fn moe_combine(
    b: &mut DispatchBuilder,
    n_used: u32,
    n_tokens: u32,
    d_model: u32,
    wts: &wgpu::Buffer,
    parts: &wgpu::Buffer,
    x: &wgpu::Buffer,
) {
    b.push(
        Kernel::MoeCombine,
        &route_params(0, n_used, n_tokens, d_model),
        vec![
            Bind::whole(5, wts),
            Bind::whole(8, parts),
            Bind::whole(9, x),
        ],
        [d_model.div_ceil(64), n_tokens, 1],
    );
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct RecoverCountParams {
    n_slots: u32,
    n_tokens: u32,
    d_model: u32,
    rank: u32,
    mask: u32,
    _pad: [u32; 3],
}

/// A carve's count corrections, stacked in the order of their counts: V [rank, d_model],
/// U `[d_model, rank]` and b `[d_model]` per block; bit k of `mask` says count k has one
/// (moe_recover.wgsl).
pub struct CountCorrections<'a> {
    pub input: &'a wgpu::Buffer,
    pub output: &'a wgpu::Buffer,
    pub bias: &'a wgpu::Buffer,
    pub rank: u32,
    pub mask: u32,
}

/// `x[t] += U_k · (V_k · xn[t]) + b_k`, k the experts token t kept of its `n_slots` ids.
#[allow(clippy::too_many_arguments)]
pub fn moe_recover_count(
    b: &mut DispatchBuilder,
    n_slots: u32,
    n_tokens: u32,
    d_model: u32,
    ids: &wgpu::Buffer,
    xn: &wgpu::Buffer,
    fits: &CountCorrections,
    x: &wgpu::Buffer,
) {
    let p = RecoverCountParams {
        n_slots,
        n_tokens,
        d_model,
        rank: fits.rank,
        mask: fits.mask,
        _pad: [0; 3],
    };
    b.push(
        Kernel::MoeRecoverCount,
        &p,
        vec![
            Bind::whole(1, ids),
            Bind::whole(2, xn),
            Bind::whole(3, fits.input),
            Bind::whole(4, fits.output),
            Bind::whole(5, fits.bias),
            Bind::whole(6, x),
        ],
        [n_tokens, 1, 1],
    );
}
