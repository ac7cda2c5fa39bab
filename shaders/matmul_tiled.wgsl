// Prefill mat-mul for GPUs: y[y_row0 + t, row_offset + r] (+)= sum_k W[r, k] * x[x_row0 + t, k]
// (+ bias[r]) for every token t < n_tokens of the dispatch, one 64 x 64 tile of (rows,
// tokens) a workgroup (gemm_tile.wgsl). CPU adapters use matmul.wgsl instead: without
// workgroup memory close to the cores, its per-thread rows are faster there.

// Params and bindings: matmul_common.wgsl (x a storage buffer), prepended by the host.

fn tile_w_base(r: u32) -> u32 {
    return r * (p.k / 32u / CHUNKS_PER_BLOCK) * BLOCK_WORDS;
}

fn tile_x_base(t: u32) -> u32 {
    return (p.x_row0 + t) * (p.x_stride / 4u);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row0 = wid.x * BM;
    let tok0 = wid.y * BN;
    let n_rows = min(BM, p.n_rows - row0);
    let n_tok = min(BN, p.n_tokens - tok0);
    let acc = gemm_tile(lid, p.k, row0, n_rows, tok0, n_tok);
    let tr = lid % 16u;
    let tc = lid / 16u;
    for (var i = 0u; i < 4u; i++) {
        let r = tr + 16u * i;
        if (r >= n_rows) {
            break;
        }
        let col = p.row_offset + row0 + r;
        var b = 0.0;
        if ((p.flags & 1u) != 0u) {
            b = bias[col];
        }
        for (var j = 0u; j < 4u; j++) {
            let t = tc + 16u * j;
            if (t >= n_tok) {
                break;
            }
            let o = (p.y_row0 + tok0 + t) * p.y_stride + col;
            let v = acc[i][j] + b;
            if ((p.flags & 2u) != 0u) {
                y[o] += v;
            } else {
                y[o] = v;
            }
        }
    }
}
