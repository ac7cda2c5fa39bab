//! One function per kernel: each records a dispatch (parameters, bindings, grid) into a
//! [`DispatchBuilder`]. Parameter structs mirror the WGSL `Params` structs byte for byte.

use bytemuck::{Pod, Zeroable};

use super::dispatch::{grid_1d, Bind, DispatchBuilder};
use super::kernels::{AttnVariant, Kernel, XInput, GEMM_TILE_DIM, MATVEC_TPR};

mod moe;
use super::tensor::{Matrix, Shard, Vector};
pub use moe::*;

/// Largest token tile of the prefill mat-mul (its per-thread accumulator array).
pub const MAX_TOKEN_TILE: u32 = 16;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct MatmulParams {
    k: u32,
    n_rows: u32,
    row_offset: u32,
    y_stride: u32,
    n_tokens: u32,
    x_stride: u32,
    flags: u32,
    x_row0: u32,
    y_row0: u32,
    eps: f32,
    _pad: [u32; 2],
}

impl MatmulParams {
    /// Shard `s` of `w` over `n_tokens` rows of x from `x_row0`, written from row `y_row0`.
    fn shard(w: &Matrix, s: &Shard, n_tokens: u32, (x_row0, y_row0): (u32, u32)) -> Self {
        MatmulParams {
            k: w.cols as u32,
            n_rows: s.n_rows,
            row_offset: s.row_start,
            y_stride: w.rows as u32,
            n_tokens,
            x_stride: w.cols as u32,
            flags: 0,
            x_row0,
            y_row0,
            eps: 0.0,
            _pad: [0; 2],
        }
    }
}

/// How a mat-mul writes its output.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Write {
    Store,
    /// y += W·x (fused residual add).
    Accumulate,
}

/// The bias buffer to bind (`dummy` without one: WGSL needs every binding filled) and
/// matmul_common.wgsl's flags (1: add the bias, 2: accumulate into y).
fn bias_flags<'a>(
    bias: Option<&'a Vector>,
    write: Write,
    dummy: &'a wgpu::Buffer,
) -> (&'a wgpu::Buffer, u32) {
    let flags = bias.is_some() as u32 | if write == Write::Accumulate { 2 } else { 0 };
    (bias.map(|v| &*v.buffer).unwrap_or(dummy), flags)
}

/// Smallest token tile worth a uniform x binding: below it the weights are dequantized for
/// too few tokens, and a storage x with the full tile is faster (lavapipe, down projection
/// K = 4864: 2 tokens per uniform tile, prefill 17-19 -> 23-24 tok/s with storage tiles of 16).
const MIN_UNIFORM_TILE: u32 = 8;

/// Tokens per prefill tile for rows of `k` floats: the largest power of two whose x tile
/// fits one uniform binding (reads of x are then cheap gathers on CPU adapters), if that is
/// at least MIN_UNIFORM_TILE tokens; else MAX_TOKEN_TILE with a storage binding.
fn token_tile(k: usize, limits: &wgpu::Limits) -> (u32, bool) {
    let max = limits.max_uniform_buffer_binding_size as usize;
    let mut tb = MAX_TOKEN_TILE;
    while tb > 1 && tb as usize * k * 4 > max {
        tb /= 2;
    }
    if tb as usize * k * 4 <= max && tb >= MIN_UNIFORM_TILE {
        (tb, true)
    } else {
        (MAX_TOKEN_TILE, false)
    }
}

/// y[t, :] (+)= W · x[x_row0 + t, :] (+ bias), for `n_tokens` rows of x. `dummy` is bound
/// when there is no bias (WGSL needs every binding filled).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    b: &mut DispatchBuilder,
    w: &Matrix,
    x: &wgpu::Buffer,
    x_row0: u32,
    n_tokens: u32,
    y: &wgpu::Buffer,
    bias: Option<&Vector>,
    write: Write,
    dummy: &wgpu::Buffer,
) {
    let (bias_buf, flags) = bias_flags(bias, write, dummy);
    if n_tokens > 1 && !b.cpu_layout {
        return matmul_tiled(b, w, x, (x_row0, n_tokens), y, (bias_buf, flags));
    }
    let k = w.cols;
    let row_bytes = (k * 4) as u64;
    let (tile, uniform_ok) = if n_tokens == 1 {
        (1, row_bytes <= b.limits.max_uniform_buffer_binding_size)
    } else {
        token_tile(k, &b.limits)
    };
    let align = b.limits.min_uniform_buffer_offset_alignment as u64;
    let mut t0 = 0;
    while t0 < n_tokens {
        let nt = tile.min(n_tokens - t0);
        let x_offset = (x_row0 + t0) as u64 * row_bytes;
        // A uniform x binds exactly this tile: it must start aligned and lie inside x.
        let x_len = tile as u64 * row_bytes;
        let uniform = uniform_ok && x_offset.is_multiple_of(align) && x_offset + x_len <= x.size();
        let kernel = Kernel::Matmul {
            dtype: w.dtype,
            tokens: tile,
            uniform_x: if uniform { (x_len / 16) as u32 } else { 0 },
            split: tile == 1 && !b.cpu_layout,
            input: XInput::Plain,
        };
        let x_bind = if uniform {
            Bind {
                binding: 2,
                buffer: x.clone(),
                offset: x_offset,
                size: Some(x_len),
            }
        } else {
            Bind::whole(2, x)
        };
        for s in &w.shards {
            let p = MatmulParams {
                flags,
                ..MatmulParams::shard(w, s, nt, (x_row0 + t0, t0))
            };
            b.push(
                kernel,
                &p,
                vec![
                    Bind::whole(1, &s.buffer),
                    x_bind.clone(),
                    Bind::whole(3, y),
                    Bind::whole(4, bias_buf),
                    Bind::whole(5, dummy),
                ],
                [
                    s.n_rows.div_ceil(if kernel.is_split_matvec() {
                        64 / MATVEC_TPR
                    } else if tile == 1 {
                        64 * super::kernels::MATVEC_RPT
                    } else {
                        64 * super::kernels::MATMUL_ROWS
                    }),
                    1,
                    1,
                ],
            );
        }
        t0 += nt;
    }
}

/// `matmul` on GPUs for more than one token: one dispatch per shard covers every token, in
/// 64 x 64 tiles of (rows, tokens). `tokens`: (x_row0, n_tokens); `bias`: (buffer, flags).
fn matmul_tiled(
    b: &mut DispatchBuilder,
    w: &Matrix,
    x: &wgpu::Buffer,
    (x_row0, n_tokens): (u32, u32),
    y: &wgpu::Buffer,
    (bias_buf, flags): (&wgpu::Buffer, u32),
) {
    let kernel = Kernel::MatmulTiled { dtype: w.dtype };
    for s in &w.shards {
        let p = MatmulParams {
            flags,
            ..MatmulParams::shard(w, s, n_tokens, (x_row0, 0))
        };
        let binds = vec![
            Bind::whole(1, &s.buffer),
            Bind::whole(2, x),
            Bind::whole(3, y),
            Bind::whole(4, bias_buf),
        ];
        let grid = [
            s.n_rows.div_ceil(GEMM_TILE_DIM),
            n_tokens.div_ceil(GEMM_TILE_DIM),
            1,
        ];
        b.push(kernel, &p, binds, grid);
    }
}

/// x of a decode mat-vec with the op before it folded in (GPU layout; see [`XInput`]).
#[derive(Clone, Copy)]
pub enum FusedInput<'a> {
    /// RMSNorm(x) * weight, x the raw residual stream.
    Normed { weight: &'a Vector, eps: f32 },
    /// silu(x) * up, x the gate projection.
    SwiGlu { up: &'a wgpu::Buffer },
}

/// `y (+)= W · f(x) (+ bias)` for one token (row 0 of x), `f` the folded op of `input`: one
/// dispatch per shard of the split mat-vec instead of the op's own dispatch and then
/// [`matmul`]'s. For GPUs; CPU adapters run the op and the mat-vec apart.
pub fn matvec_fused(
    b: &mut DispatchBuilder,
    w: &Matrix,
    (x, input): (&wgpu::Buffer, FusedInput),
    y: &wgpu::Buffer,
    bias: Option<&Vector>,
    write: Write,
    dummy: &wgpu::Buffer,
) {
    let (bias_buf, flags) = bias_flags(bias, write, dummy);
    let (kind, aux, eps) = match input {
        FusedInput::Normed { weight, eps } => (XInput::Normed, &*weight.buffer, eps),
        FusedInput::SwiGlu { up } => (XInput::SwiGlu, up, 0.0),
    };
    let kernel = Kernel::Matmul {
        dtype: w.dtype,
        tokens: 1,
        uniform_x: 0,
        split: true,
        input: kind,
    };
    for s in &w.shards {
        let p = MatmulParams {
            flags,
            eps,
            ..MatmulParams::shard(w, s, 1, (0, 0))
        };
        let binds = vec![
            Bind::whole(1, &s.buffer),
            Bind::whole(2, x),
            Bind::whole(3, y),
            Bind::whole(4, bias_buf),
            Bind::whole(5, aux),
        ];
        b.push(
            kernel,
            &p,
            binds,
            [s.n_rows.div_ceil(64 / MATVEC_TPR), 1, 1],
        );
    }
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct EmbedParams {
    k: u32,
    n_rows: u32,
    row_offset: u32,
    n_tokens: u32,
}

/// `y[t, :] = table[ids[t], :]`.
pub fn embed(
    b: &mut DispatchBuilder,
    table: &Matrix,
    ids: &wgpu::Buffer,
    n_tokens: u32,
    y: &wgpu::Buffer,
) {
    for s in &table.shards {
        let p = EmbedParams {
            k: table.cols as u32,
            n_rows: s.n_rows,
            row_offset: s.row_start,
            n_tokens,
        };
        b.push(
            Kernel::Embed { dtype: table.dtype },
            &p,
            vec![
                Bind::whole(1, &s.buffer),
                Bind::whole(2, ids),
                Bind::whole(3, y),
            ],
            [(table.cols as u32 / 32).div_ceil(64), n_tokens, 1],
        );
    }
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct NormParams {
    n: u32,
    n_tokens: u32,
    x_row0: u32,
    eps: f32,
}

/// `y[t] = rmsnorm(x[x_row0 + t]) * weight`.
pub fn rms_norm(
    b: &mut DispatchBuilder,
    x: &wgpu::Buffer,
    x_row0: u32,
    n_tokens: u32,
    weight: &Vector,
    eps: f32,
    y: &wgpu::Buffer,
) {
    let p = NormParams {
        n: weight.len as u32,
        n_tokens,
        x_row0,
        eps,
    };
    b.push(
        Kernel::RmsNorm,
        &p,
        vec![
            Bind::whole(1, x),
            Bind::whole(2, &weight.buffer),
            Bind::whole(3, y),
        ],
        [n_tokens, 1, 1],
    );
}

/// RoPE style: how rotated pairs are formed within a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeMode {
    /// Pairs (2i, 2i+1): Llama.
    Normal = 0,
    /// Pairs (i, i + d/2): Qwen2, GPT-NeoX.
    Neox = 2,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct RopeParams {
    n_head: u32,
    n_kv_head: u32,
    head_dim: u32,
    mode: u32,
    freq_base: f32,
    ctx: u32,
    n_tokens: u32,
    _pad: u32,
}

/// Shapes shared by the attention kernels.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_head: u32,
    pub n_kv_head: u32,
    pub head_dim: u32,
    pub ctx: u32,
}

/// Rotates q in place, rotates k, and stores k and v into the caches at step.pos0 + t.
#[allow(clippy::too_many_arguments)]
pub fn rope_store_kv(
    b: &mut DispatchBuilder,
    shape: AttnShape,
    mode: RopeMode,
    freq_base: f32,
    n_tokens: u32,
    step: &wgpu::Buffer,
    q: &wgpu::Buffer,
    k: &wgpu::Buffer,
    v: &wgpu::Buffer,
    kc: &wgpu::Buffer,
    vc: &wgpu::Buffer,
) {
    let p = RopeParams {
        n_head: shape.n_head,
        n_kv_head: shape.n_kv_head,
        head_dim: shape.head_dim,
        mode: mode as u32,
        freq_base,
        ctx: shape.ctx,
        n_tokens,
        _pad: 0,
    };
    let threads = (shape.n_head + shape.n_kv_head) * shape.head_dim / 2;
    b.push(
        Kernel::Rope,
        &p,
        vec![
            Bind::whole(1, step),
            Bind::whole(2, q),
            Bind::whole(3, k),
            Bind::whole(4, v),
            Bind::whole(5, kc),
            Bind::whole(6, vc),
        ],
        [threads.div_ceil(64), n_tokens, 1],
    );
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct AttnParams {
    n_head: u32,
    n_kv_head: u32,
    head_dim: u32,
    ctx: u32,
    n_tokens: u32,
    scale: f32,
    n_spans: u32,
    _pad: u32,
}

/// Queries a workgroup of the GPU prefill attention (attention.wgsl's FQ).
const FLASH_QUERIES: u32 = 64;

/// Keys per span of the split decode attention (attention.wgsl's SPAN).
pub const ATTN_SPAN: u32 = 256;

/// Floats of scratch the split decode attention needs for `shape`.
pub fn attention_scratch_floats(shape: AttnShape) -> u64 {
    let spans = shape.ctx.div_ceil(ATTN_SPAN) as u64;
    shape.n_head as u64 * spans * (shape.head_dim as u64 + 4)
}

/// out[t, h] = softmax(q[t, h] · K[0..=pos] / sqrt(d)) · V, causal, GQA. `scratch` holds
/// the per-span partial results of the GPU decode variant.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    b: &mut DispatchBuilder,
    shape: AttnShape,
    n_tokens: u32,
    step: &wgpu::Buffer,
    q: &wgpu::Buffer,
    kc: &wgpu::Buffer,
    vc: &wgpu::Buffer,
    out: &wgpu::Buffer,
    scratch: &wgpu::Buffer,
) {
    let n_spans = shape.ctx.div_ceil(ATTN_SPAN);
    let p = AttnParams {
        n_head: shape.n_head,
        n_kv_head: shape.n_kv_head,
        head_dim: shape.head_dim,
        ctx: shape.ctx,
        n_tokens,
        scale: 1.0 / (shape.head_dim as f32).sqrt(),
        n_spans,
        _pad: 0,
    };
    let kernel = |variant| Kernel::Attention {
        head_dim: shape.head_dim,
        variant,
    };
    let io = vec![
        Bind::whole(1, step),
        Bind::whole(2, q),
        Bind::whole(3, kc),
        Bind::whole(4, vc),
    ];
    if b.cpu_layout {
        let mut binds = io;
        binds.push(Bind::whole(5, out));
        let groups = [shape.n_head.div_ceil(32), n_tokens, 1];
        b.push(kernel(AttnVariant::Serial), &p, binds, groups);
    } else if n_tokens == 1 {
        let mut binds = io;
        binds.push(Bind::whole(6, scratch));
        b.push(
            kernel(AttnVariant::SplitKeys),
            &p,
            binds,
            [shape.n_head, n_spans, 1],
        );
        let binds = vec![Bind::whole(5, out), Bind::whole(6, scratch)];
        b.push(
            kernel(AttnVariant::Combine),
            &p,
            binds,
            [shape.n_head, 1, 1],
        );
    } else {
        let mut binds = io;
        binds.push(Bind::whole(5, out));
        let groups = [shape.n_head, n_tokens.div_ceil(FLASH_QUERIES), 1];
        b.push(kernel(AttnVariant::Flash), &p, binds, groups);
    }
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct ElemParams {
    n: u32,
    off: u32,
}

/// a = silu(a) * b over n elements.
pub fn swiglu(b: &mut DispatchBuilder, a: &wgpu::Buffer, other: &wgpu::Buffer, n: u32) {
    b.push(
        Kernel::SwiGlu,
        &ElemParams { n, off: 0 },
        vec![Bind::whole(1, a), Bind::whole(2, other)],
        grid_1d(n, 64),
    );
}

/// out = silu(a) * b over n elements (leaves a and b as they were).
pub fn swiglu_into(
    b: &mut DispatchBuilder,
    a: &wgpu::Buffer,
    other: &wgpu::Buffer,
    out: &wgpu::Buffer,
    n: u32,
) {
    b.push(
        Kernel::SwiGluInto,
        &ElemParams { n, off: 0 },
        vec![
            Bind::whole(1, a),
            Bind::whole(2, other),
            Bind::whole(5, out),
        ],
        grid_1d(n, 64),
    );
}

/// a = a + b over n elements.
pub fn add(b: &mut DispatchBuilder, a: &wgpu::Buffer, other: &wgpu::Buffer, n: u32) {
    b.push(
        Kernel::Add,
        &ElemParams { n, off: 0 },
        vec![Bind::whole(1, a), Bind::whole(2, other)],
        grid_1d(n, 64),
    );
}

/// `a[i] *= sigmoid(gate[i / row_len])` for i < n: scales each row by its token's gate.
pub fn sigmoid_scale(
    b: &mut DispatchBuilder,
    a: &wgpu::Buffer,
    gate: &wgpu::Buffer,
    n: u32,
    row_len: u32,
) {
    b.push(
        Kernel::SigmoidScale,
        &ElemParams { n, off: row_len },
        vec![Bind::whole(1, a), Bind::whole(2, gate)],
        grid_1d(n, 64),
    );
}

/// `dst[off + i] = src[i]` for i < n, as u32 (expert ids).
pub fn copy_u32(b: &mut DispatchBuilder, dst: &wgpu::Buffer, off: u32, src: &wgpu::Buffer, n: u32) {
    b.push(
        Kernel::CopyU32,
        &ElemParams { n, off },
        vec![Bind::whole(3, dst), Bind::whole(4, src)],
        grid_1d(n, 64),
    );
}

/// `dst[i] = src[i]` for i < n, reading `src` from byte `src_off` (a multiple of the
/// device's storage offset alignment, 256 bytes).
pub fn copy_from(
    b: &mut DispatchBuilder,
    kernel: Kernel,
    dst: &wgpu::Buffer,
    src: &wgpu::Buffer,
    src_off: u64,
    n: u32,
) {
    let (d, s) = if kernel == Kernel::CopyU32 {
        (3, 4)
    } else {
        (1, 2)
    };
    let src = Bind {
        binding: s,
        buffer: src.clone(),
        offset: src_off,
        size: Some(4 * n as u64),
    };
    b.push(
        kernel,
        &ElemParams { n, off: 0 },
        vec![Bind::whole(d, dst), src],
        grid_1d(n, 64),
    );
}

/// `dst[off + i] = src[i]` for i < n.
pub fn copy(b: &mut DispatchBuilder, dst: &wgpu::Buffer, off: u32, src: &wgpu::Buffer, n: u32) {
    b.push(
        Kernel::Copy,
        &ElemParams { n, off },
        vec![Bind::whole(1, dst), Bind::whole(2, src)],
        grid_1d(n, 64),
    );
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct RowParams {
    n: u32,
    x_row0: u32,
    k: u32,
    cap: u32,
}

/// Buffers the row-reduction kernels bind (unused ones get a dummy).
pub struct RowBuffers<'a> {
    pub x: &'a wgpu::Buffer,
    pub targets: &'a wgpu::Buffer,
    pub out_f: &'a wgpu::Buffer,
    pub out_u: &'a wgpu::Buffer,
}

/// A row reduction (argmax, softmax or nll) over `rows` rows of length `n`. For nll,
/// targets and outputs start at row `out_row0` (a block of a longer batch).
pub fn row_op(
    b: &mut DispatchBuilder,
    kernel: Kernel,
    bufs: &RowBuffers,
    n: u32,
    x_row0: u32,
    rows: u32,
    out_row0: u32,
) {
    b.push(
        kernel,
        &RowParams {
            n,
            x_row0,
            k: out_row0,
            cap: 0,
        },
        // Auto-derived layouts hold only the bindings an entry point uses.
        match kernel {
            Kernel::Argmax => vec![Bind::whole(1, bufs.x), Bind::whole(4, bufs.out_u)],
            Kernel::Nll => vec![
                Bind::whole(1, bufs.x),
                Bind::whole(2, bufs.targets),
                Bind::whole(3, bufs.out_f),
            ],
            _ => vec![Bind::whole(1, bufs.x)],
        },
        [rows, 1, 1],
    );
}

/// The `k` largest values of row `x_row0` (length n): `out_u[0]` = count, `out_u[1..]` = indices,
/// out_f[..] = values, at most `cap` pairs (ties at the k-th value may add a few beyond k).
pub fn top_k(b: &mut DispatchBuilder, bufs: &RowBuffers, n: u32, x_row0: u32, k: u32, cap: u32) {
    b.push(
        Kernel::TopK,
        &RowParams { n, x_row0, k, cap },
        vec![
            Bind::whole(1, bufs.x),
            Bind::whole(3, bufs.out_f),
            Bind::whole(4, bufs.out_u),
        ],
        [1, 1, 1],
    );
}
