// Quantized matrix product: y[t, row_offset + r] (+)= sum_k W[r, k] * x[t, k] (+ bias[r]).
// One thread per output row, each covering TB tokens, so a dequantized chunk of the weight
// row is reused TB times (TB = 1 for decode, larger for prefill). The per-type
// `dequant_chunk` is prepended by the host (quant_common.wgsl + quant/<type>.wgsl).

const TB: u32 = {{TB}}u;

struct Params {
    k: u32,           // row length (input features)
    n_rows: u32,      // rows in this weight shard
    row_offset: u32,  // first output feature of this shard
    y_stride: u32,    // floats per output row
    n_tokens: u32,
    x_stride: u32,    // floats per input row
    flags: u32,       // 1: add bias, 2: accumulate into y (residual)
    x_row0: u32,      // first input row to read
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.x;
    if (r >= p.n_rows) {
        return;
    }
    let t0 = gid.y * TB;
    let nt = min(TB, p.n_tokens - t0);
    let n_chunks = p.k / 32u;
    let row_base = r * (n_chunks / CHUNKS_PER_BLOCK) * BLOCK_WORDS;
    var acc: array<f32, TB>;
    for (var c = 0u; c < n_chunks; c++) {
        let wv = dequant_chunk(row_base + (c / CHUNKS_PER_BLOCK) * BLOCK_WORDS, c % CHUNKS_PER_BLOCK);
        for (var t = 0u; t < nt; t++) {
            let xb = ((p.x_row0 + t0 + t) * p.x_stride + c * 32u) / 4u;
            var s = dot(wv[0], x[xb]) + dot(wv[1], x[xb + 1u]);
            s += dot(wv[2], x[xb + 2u]) + dot(wv[3], x[xb + 3u]);
            s += dot(wv[4], x[xb + 4u]) + dot(wv[5], x[xb + 5u]);
            s += dot(wv[6], x[xb + 6u]) + dot(wv[7], x[xb + 7u]);
            acc[t] += s;
        }
    }
    var b = 0.0;
    if ((p.flags & 1u) != 0u) {
        b = bias[p.row_offset + r];
    }
    for (var t = 0u; t < nt; t++) {
        let o = (t0 + t) * p.y_stride + p.row_offset + r;
        if ((p.flags & 2u) != 0u) {
            y[o] += acc[t] + b;
        } else {
            y[o] = acc[t] + b;
        }
    }
}
