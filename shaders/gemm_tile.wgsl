// Workgroup-tiled mat-mul core for GPUs, shared by the dense prefill mat-mul
// (matmul_tiled.wgsl) and the expert-grouped prefill kernel (moe.wgsl `grouped_tiled`).
// A workgroup of 256 threads computes a tile of BM = 64 weight rows x BN = 64 tokens. Per
// 32-element chunk of the rows:
// - each thread dequantizes 8 weights of one row into `w_tile` (4 threads a row), so the
//   block is decoded once per 64 tokens rather than once per token;
// - each thread copies 2 vec4s of activations into `x_tile`, 8 neighbouring threads
//   covering one token's 32 contiguous floats (coalesced);
// - after a barrier each thread accumulates 4 rows x 4 tokens in registers, reading its
//   rows and tokens from workgroup memory.
// Both tiles are stored [vec4 of the chunk][row or token]: the 16 rows a group of threads
// reads at once are neighbouring vec4s, so the reads do not collide in memory banks, and
// the two tiles fill 16 KiB, the workgroup memory every WebGPU adapter has.
// The including file defines, for the workgroup it runs:
//   fn tile_w_base(r: u32) -> u32  // word where weight row r of the tile's matrix starts
//   fn tile_x_base(t: u32) -> u32  // vec4 index where token t's activations start
// and reads the per-type load_chunk/dequant4 (quant_common.wgsl, quant/*.wgsl).

const BM: u32 = 64u;
const BN: u32 = 64u;
const TILE_THREADS: u32 = 256u;

var<workgroup> w_tile: array<vec4<f32>, 512>;  // [8 vec4s of the chunk][BM rows]
var<workgroup> x_tile: array<vec4<f32>, 512>;  // [8 vec4s of the chunk][BN tokens]

// acc[i][j]: row tr + 16i, token tc + 16j of the tile, where tr = lid % 16, tc = lid / 16.
// Rows (tokens) of the tile at or past n_rows (n_tokens) re-read the last valid one and
// must not be stored by the caller. k: elements per row, a multiple of 32.
fn gemm_tile(lid: u32, k: u32, row0: u32, n_rows: u32, tok0: u32, n_tokens: u32) -> array<vec4<f32>, 4> {
    let tr = lid % 16u;
    let tc = lid / 16u;
    // This thread's share of the loads: row lr, vec4s 2q and 2q + 1 of each weight chunk;
    // vec4 lid % 8 of tokens lid / 8 and lid / 8 + 32 of each activation chunk.
    let lr = lid % BM;
    let q = lid / BM;
    let w_base = tile_w_base(row0 + min(lr, n_rows - 1u));
    let xk = lid % 8u;
    let xt = lid / 8u;
    let x_base0 = tile_x_base(tok0 + min(xt, n_tokens - 1u)) + xk;
    let x_base1 = tile_x_base(tok0 + min(xt + 32u, n_tokens - 1u)) + xk;
    var acc: array<vec4<f32>, 4>;
    for (var c = 0u; c < k / 32u; c++) {
        let ch = load_chunk(w_base + (c / CHUNKS_PER_BLOCK) * BLOCK_WORDS, c % CHUNKS_PER_BLOCK);
        w_tile[(2u * q) * BM + lr] = dequant4(ch, 2u * q);
        w_tile[(2u * q + 1u) * BM + lr] = dequant4(ch, 2u * q + 1u);
        x_tile[xk * BN + xt] = x[x_base0 + c * 8u];
        x_tile[xk * BN + xt + 32u] = x[x_base1 + c * 8u];
        workgroupBarrier();
        for (var v = 0u; v < 8u; v++) {
            let xv = array<vec4<f32>, 4>(
                x_tile[v * BN + tc],
                x_tile[v * BN + tc + 16u],
                x_tile[v * BN + tc + 32u],
                x_tile[v * BN + tc + 48u],
            );
            for (var i = 0u; i < 4u; i++) {
                let wv = w_tile[v * BM + tr + 16u * i];
                acc[i] += vec4<f32>(dot(wv, xv[0]), dot(wv, xv[1]), dot(wv, xv[2]), dot(wv, xv[3]));
            }
        }
        workgroupBarrier();
    }
    return acc;
}
