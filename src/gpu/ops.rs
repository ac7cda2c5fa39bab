//! One function per kernel: each records a dispatch (parameters, bindings, grid) into a
//! [`DispatchBuilder`]. Parameter structs mirror the WGSL `Params` structs byte for byte.

use bytemuck::{Pod, Zeroable};

use super::dispatch::{grid_1d, Bind, DispatchBuilder};
use super::kernels::Kernel;
use super::tensor::{Matrix, Vector};

/// Tokens per thread in the prefill mat-mul: each dequantized weight chunk is reused this often.
pub const PREFILL_TOKENS_PER_THREAD: u32 = 8;

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
}

/// How a mat-mul writes its output.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Write {
    Store,
    /// y += W·x (fused residual add).
    Accumulate,
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
    let tokens = if n_tokens == 1 {
        1
    } else {
        PREFILL_TOKENS_PER_THREAD
    };
    for s in &w.shards {
        let flags = bias.is_some() as u32 | if write == Write::Accumulate { 2 } else { 0 };
        let p = MatmulParams {
            k: w.cols as u32,
            n_rows: s.n_rows,
            row_offset: s.row_start,
            y_stride: w.rows as u32,
            n_tokens,
            x_stride: w.cols as u32,
            flags,
            x_row0,
        };
        let bias_buf = bias.map(|v| &*v.buffer).unwrap_or(dummy);
        b.push(
            Kernel::Matmul {
                dtype: w.dtype,
                tokens,
            },
            &p,
            vec![
                Bind::whole(1, &s.buffer),
                Bind::whole(2, x),
                Bind::whole(3, y),
                Bind::whole(4, bias_buf),
            ],
            [s.n_rows.div_ceil(64), n_tokens.div_ceil(tokens), 1],
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

/// y[t, :] = table[ids[t], :].
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

/// y[t] = rmsnorm(x[x_row0 + t]) * weight.
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
    _pad: [u32; 2],
}

/// out[t, h] = softmax(q[t, h] · K[0..=pos] / sqrt(d)) · V, causal, GQA.
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
) {
    let p = AttnParams {
        n_head: shape.n_head,
        n_kv_head: shape.n_kv_head,
        head_dim: shape.head_dim,
        ctx: shape.ctx,
        n_tokens,
        scale: 1.0 / (shape.head_dim as f32).sqrt(),
        _pad: [0; 2],
    };
    b.push(
        Kernel::Attention {
            head_dim: shape.head_dim,
        },
        &p,
        vec![
            Bind::whole(1, step),
            Bind::whole(2, q),
            Bind::whole(3, kc),
            Bind::whole(4, vc),
            Bind::whole(5, out),
        ],
        [shape.n_head.div_ceil(32), n_tokens, 1],
    );
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct ElemParams {
    n: u32,
}

/// a = silu(a) * b over n elements.
pub fn swiglu(b: &mut DispatchBuilder, a: &wgpu::Buffer, other: &wgpu::Buffer, n: u32) {
    b.push(
        Kernel::SwiGlu,
        &ElemParams { n },
        vec![Bind::whole(1, a), Bind::whole(2, other)],
        grid_1d(n, 64),
    );
}

/// a = a + b over n elements.
pub fn add(b: &mut DispatchBuilder, a: &wgpu::Buffer, other: &wgpu::Buffer, n: u32) {
    b.push(
        Kernel::Add,
        &ElemParams { n },
        vec![Bind::whole(1, a), Bind::whole(2, other)],
        grid_1d(n, 64),
    );
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct RowParams {
    n: u32,
    x_row0: u32,
}

/// Buffers the row-reduction kernels bind (unused ones get a dummy).
pub struct RowBuffers<'a> {
    pub x: &'a wgpu::Buffer,
    pub targets: &'a wgpu::Buffer,
    pub out_f: &'a wgpu::Buffer,
    pub out_u: &'a wgpu::Buffer,
}

/// A row reduction (argmax, softmax or nll) over `rows` rows of length `n`.
pub fn row_op(
    b: &mut DispatchBuilder,
    kernel: Kernel,
    bufs: &RowBuffers,
    n: u32,
    x_row0: u32,
    rows: u32,
) {
    b.push(
        kernel,
        &RowParams { n, x_row0 },
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
