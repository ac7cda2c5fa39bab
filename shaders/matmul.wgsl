// Prefill mat-mul over a tile of TB tokens: y[t, row_offset + r] (+)= sum_k W[r, k] * x[t, k]
// (+ bias[r]) for t < n_tokens (<= TB). One thread per output row: each dequantized chunk
// of the weight row is reused for every token of the tile. x is a uniform buffer holding
// just this tile when it fits (see matvec.wgsl for why), else a storage buffer.

const TB: u32 = {{TB}}u;

// Params and bindings: matmul_common.wgsl, prepended by the host.

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.x;
    if (r >= p.n_rows) {
        return;
    }
    let nt = p.n_tokens;
    let n_chunks = p.k / 32u;
    let row_base = r * (n_chunks / CHUNKS_PER_BLOCK) * BLOCK_WORDS;
    let xs = p.x_stride / 4u;
    let x0 = {{X_ROW0}};
    var acc: array<f32, TB>;
    for (var c = 0u; c < n_chunks; c++) {
        let blk = row_base + (c / CHUNKS_PER_BLOCK) * BLOCK_WORDS;
        let cc = c % CHUNKS_PER_BLOCK;
        let s = chunk_scale(blk, cc);
        let q0 = chunk_q(blk, cc, 0u);
        let q1 = chunk_q(blk, cc, 1u);
        let q2 = chunk_q(blk, cc, 2u);
        let q3 = chunk_q(blk, cc, 3u);
        let q4 = chunk_q(blk, cc, 4u);
        let q5 = chunk_q(blk, cc, 5u);
        let q6 = chunk_q(blk, cc, 6u);
        let q7 = chunk_q(blk, cc, 7u);
        // A constant trip count lets the compiler unroll this loop and keep acc[] in
        // registers; a dynamic index would spill it to memory.
        for (var t = 0u; t < TB; t++) {
            if (t >= nt) {
                break;
            }
            let xb = x0 + t * xs + c * 8u;
            let xa = x[xb];
            let xb1 = x[xb + 1u];
            let xc = x[xb + 2u];
            let xd = x[xb + 3u];
            let xe = x[xb + 4u];
            let xf = x[xb + 5u];
            let xg = x[xb + 6u];
            let xh = x[xb + 7u];
            let d0 = dot(q0, xa) + dot(q1, xb1) + dot(q2, xc) + dot(q3, xd);
            let d1 = dot(q4, xe) + dot(q5, xf) + dot(q6, xg) + dot(q7, xh);
            let sx0 = dot(xa + xb1 + xc + xd, ONES);
            let sx1 = dot(xe + xf + xg + xh, ONES);
            acc[t] += s.x * d0 + s.y * sx0 + s.z * d1 + s.w * sx1;
        }
    }
    var b = 0.0;
    if ((p.flags & 1u) != 0u) {
        b = bias[p.row_offset + r];
    }
    for (var t = 0u; t < nt; t++) {
        let o = (p.y_row0 + t) * p.y_stride + p.row_offset + r;
        if ((p.flags & 2u) != 0u) {
            y[o] += acc[t] + b;
        } else {
            y[o] = acc[t] + b;
        }
    }
}
