// Prefill mat-mul over a tile of TB tokens: y[t, row_offset + r] (+)= sum_k W[r, k] * x[t, k]
// (+ bias[r]) for t < n_tokens (<= TB). Each thread computes RR rows for the whole tile: a
// dequantized weight chunk serves every token, and each x chunk it loads serves RR rows.
// x is a uniform buffer holding just this tile when it fits (see matvec.wgsl for why),
// else a storage buffer.

const TB: u32 = {{TB}}u;
const RR: u32 = 2u;

// Params and bindings: matmul_common.wgsl, prepended by the host.

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r0 = gid.x * RR;
    if (r0 >= p.n_rows) {
        return;
    }
    // The second row re-reads the first when past the shard; it is never stored.
    let r1 = min(r0 + 1u, p.n_rows - 1u);
    let nt = p.n_tokens;
    let n_chunks = p.k / 32u;
    let row_words = (n_chunks / CHUNKS_PER_BLOCK) * BLOCK_WORDS;
    let xs = p.x_stride / 4u;
    let x0 = {{X_ROW0}};
    var acc0: array<f32, TB>;
    var acc1: array<f32, TB>;
    for (var c = 0u; c < n_chunks; c++) {
        let cb = (c / CHUNKS_PER_BLOCK) * BLOCK_WORDS;
        let cc = c % CHUNKS_PER_BLOCK;
        let ba = r0 * row_words + cb;
        let bb = r1 * row_words + cb;
        let cha = load_chunk(ba, cc);
        let chb = load_chunk(bb, cc);
        let sa = chunk_scale(cha);
        let sb = chunk_scale(chb);
        let a0 = chunk_q(cha, 0u); let a1 = chunk_q(cha, 1u);
        let a2 = chunk_q(cha, 2u); let a3 = chunk_q(cha, 3u);
        let a4 = chunk_q(cha, 4u); let a5 = chunk_q(cha, 5u);
        let a6 = chunk_q(cha, 6u); let a7 = chunk_q(cha, 7u);
        let b0 = chunk_q(chb, 0u); let b1 = chunk_q(chb, 1u);
        let b2 = chunk_q(chb, 2u); let b3 = chunk_q(chb, 3u);
        let b4 = chunk_q(chb, 4u); let b5 = chunk_q(chb, 5u);
        let b6 = chunk_q(chb, 6u); let b7 = chunk_q(chb, 7u);
        for (var t = 0u; t < nt; t++) {
            let xb = x0 + t * xs + c * 8u;
            let x0v = x[xb];
            let x1v = x[xb + 1u];
            let x2v = x[xb + 2u];
            let x3v = x[xb + 3u];
            let x4v = x[xb + 4u];
            let x5v = x[xb + 5u];
            let x6v = x[xb + 6u];
            let x7v = x[xb + 7u];
            let sx0 = dot(x0v + x1v + x2v + x3v, ONES);
            let sx1 = dot(x4v + x5v + x6v + x7v, ONES);
            let da0 = dot(a0, x0v) + dot(a1, x1v) + dot(a2, x2v) + dot(a3, x3v);
            let da1 = dot(a4, x4v) + dot(a5, x5v) + dot(a6, x6v) + dot(a7, x7v);
            let db0 = dot(b0, x0v) + dot(b1, x1v) + dot(b2, x2v) + dot(b3, x3v);
            let db1 = dot(b4, x4v) + dot(b5, x5v) + dot(b6, x6v) + dot(b7, x7v);
            acc0[t] += sa.x * da0 + sa.y * sx0 + sa.z * da1 + sa.w * sx1;
            acc1[t] += sb.x * db0 + sb.y * sx0 + sb.z * db1 + sb.w * sx1;
        }
    }
    let has_second = r0 + 1u < p.n_rows;
    var bias0 = 0.0;
    var bias1 = 0.0;
    if ((p.flags & 1u) != 0u) {
        bias0 = bias[p.row_offset + r0];
        bias1 = bias[p.row_offset + r1];
    }
    for (var t = 0u; t < nt; t++) {
        let o = (p.y_row0 + t) * p.y_stride + p.row_offset + r0;
        if ((p.flags & 2u) != 0u) {
            y[o] += acc0[t] + bias0;
            if (has_second) {
                y[o + 1u] += acc1[t] + bias1;
            }
        } else {
            y[o] = acc0[t] + bias0;
            if (has_second) {
                y[o + 1u] = acc1[t] + bias1;
            }
        }
    }
}
