// Decode mat-vec: y[row_offset + r] (+)= sum_k W[r, k] * x[k] (+ bias[r]).
// One thread per row. x is bound as a uniform buffer when it fits (the host picks the
// declaration): every thread reads the same x, and drivers serve uniform reads from one
// scalar load where storage reads cost a gather per thread on CPU Vulkan (lavapipe).
// The per-type `chunk_scale`/`chunk_q` are prepended by the host.

struct Params {
    k: u32,           // row length (input features)
    n_rows: u32,      // rows in this weight shard
    row_offset: u32,  // first output feature of this shard
    y_stride: u32,    // floats per output row
    n_tokens: u32,
    x_stride: u32,    // floats per input row
    flags: u32,       // 1: add bias, 2: accumulate into y (residual)
    x_row0: u32,      // first input row to read (storage x only; a uniform x is pre-offset)
    y_row0: u32,      // first output row to write
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;
{{X_DECL}}
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;

const ONES = vec4<f32>(1.0);

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.x;
    if (r >= p.n_rows) {
        return;
    }
    let n_chunks = p.k / 32u;
    let row_base = r * (n_chunks / CHUNKS_PER_BLOCK) * BLOCK_WORDS;
    let x0 = {{X_ROW0}};
    var acc = 0.0;
    for (var c = 0u; c < n_chunks; c++) {
        let blk = row_base + (c / CHUNKS_PER_BLOCK) * BLOCK_WORDS;
        let cc = c % CHUNKS_PER_BLOCK;
        let s = chunk_scale(blk, cc);
        let xb = x0 + c * 8u;
        let xa = x[xb];
        let xb1 = x[xb + 1u];
        let xc = x[xb + 2u];
        let xd = x[xb + 3u];
        let xe = x[xb + 4u];
        let xf = x[xb + 5u];
        let xg = x[xb + 6u];
        let xh = x[xb + 7u];
        let d0 = dot(chunk_q(blk, cc, 0u), xa) + dot(chunk_q(blk, cc, 1u), xb1)
               + dot(chunk_q(blk, cc, 2u), xc) + dot(chunk_q(blk, cc, 3u), xd);
        let d1 = dot(chunk_q(blk, cc, 4u), xe) + dot(chunk_q(blk, cc, 5u), xf)
               + dot(chunk_q(blk, cc, 6u), xg) + dot(chunk_q(blk, cc, 7u), xh);
        let sx0 = dot(xa + xb1 + xc + xd, ONES);
        let sx1 = dot(xe + xf + xg + xh, ONES);
        acc += s.x * d0 + s.y * sx0 + s.z * d1 + s.w * sx1;
    }
    if ((p.flags & 1u) != 0u) {
        acc += bias[p.row_offset + r];
    }
    let o = p.y_row0 * p.y_stride + p.row_offset + r;
    if ((p.flags & 2u) != 0u) {
        y[o] += acc;
    } else {
        y[o] = acc;
    }
}
