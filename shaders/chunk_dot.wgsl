// Shared by the decode mat-vec and the expert kernels; expects bindings `w` (raw blocks)
// and `x` (vec4 activations), and the per-type chunk_scale/chunk_q.

// The dot product of chunk c (32 weights) of the row starting at row_base with x.
fn chunk_dot(row_base: u32, c: u32, x0: u32) -> f32 {
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
    return s.x * d0 + s.y * sx0 + s.z * d1 + s.w * sx1;
}
