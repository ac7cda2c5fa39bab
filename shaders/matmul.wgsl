// Prefill mat-mul over a tile of TB tokens: y[t, row_offset + r] (+)= sum_k W[r, k] * x[t, k]
// (+ bias[r]) for t < n_tokens (<= TB). Each thread computes RR = 4 rows for the whole
// tile: a dequantized weight chunk serves every token, and each x chunk it loads serves 4
// rows. x is a uniform buffer holding just this tile when it fits (see matvec.wgsl for
// why), else a storage buffer. weight_chunk/weight_dot/x_chunk: chunk_dot.wgsl.

const TB: u32 = {{TB}}u;
const RR: u32 = {{RR}}u;

// Params and bindings: matmul_common.wgsl, prepended by the host.

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r0 = gid.x * RR;
    if (r0 >= p.n_rows) {
        return;
    }
    // Rows past the shard re-read the last row; they are never stored.
    let last = p.n_rows - 1u;
    let nt = p.n_tokens;
    let row_words = (p.k / 32u / CHUNKS_PER_BLOCK) * BLOCK_WORDS;
    let xs = p.x_stride / 4u;
    let x0 = {{X_ROW0}};
    // One accumulator array per row, indexed by token: the rows are written out by hand
    // because llvmpipe turns a private array indexed by a loop variable into per-lane
    // memory operations.
    var acc0: array<f32, TB>;
    var acc1: array<f32, TB>;
    var acc2: array<f32, TB>;
    var acc3: array<f32, TB>;
    for (var c = 0u; c < p.k / 32u; c++) {
        let w0 = weight_chunk(r0 * row_words, c);
        let w1 = weight_chunk(min(r0 + 1u, last) * row_words, c);
        let w2 = weight_chunk(min(r0 + 2u, last) * row_words, c);
        let w3 = weight_chunk(min(r0 + 3u, last) * row_words, c);
        for (var t = 0u; t < nt; t++) {
            let xc = x_chunk(x0 + t * xs, c);
            acc0[t] += weight_dot(w0, xc);
            acc1[t] += weight_dot(w1, xc);
            acc2[t] += weight_dot(w2, xc);
            acc3[t] += weight_dot(w3, xc);
        }
    }
    for (var t = 0u; t < nt; t++) {
        let o = (p.y_row0 + t) * p.y_stride + p.row_offset + r0;
        let accs = array<f32, RR>(acc0[t], acc1[t], acc2[t], acc3[t]);
        for (var i = 0u; i < RR; i++) {
            if (r0 + i >= p.n_rows) {
                break;
            }
            var v = accs[i];
            if ((p.flags & 1u) != 0u) {
                v += bias[p.row_offset + r0 + i];
            }
            if ((p.flags & 2u) != 0u) {
                y[o + i] += v;
            } else {
                y[o + i] = v;
            }
        }
    }
}
