// Shared by the decode mat-vec and the expert kernels; expects bindings `w` (raw blocks)
// and `x` (vec4 activations), and the per-type load_chunk/chunk_scale/chunk_q.

// The 32 activations of one chunk, with the sums of each half (for the offsets).
struct XChunk {
    a: vec4<f32>, b: vec4<f32>, c: vec4<f32>, d: vec4<f32>,
    e: vec4<f32>, f: vec4<f32>, g: vec4<f32>, h: vec4<f32>,
    s0: f32, s1: f32,
}

fn x_chunk(x0: u32, c: u32) -> XChunk {
    let xb = x0 + c * 8u;
    var v: XChunk;
    v.a = x[xb];
    v.b = x[xb + 1u];
    v.c = x[xb + 2u];
    v.d = x[xb + 3u];
    v.e = x[xb + 4u];
    v.f = x[xb + 5u];
    v.g = x[xb + 6u];
    v.h = x[xb + 7u];
    v.s0 = dot(v.a + v.b + v.c + v.d, ONES);
    v.s1 = dot(v.e + v.f + v.g + v.h, ONES);
    return v;
}

// The dot product of chunk c (32 weights) of the row starting at row_base with xc.
fn chunk_dot_x(row_base: u32, c: u32, xc: XChunk) -> f32 {
    let blk = row_base + (c / CHUNKS_PER_BLOCK) * BLOCK_WORDS;
    let cc = c % CHUNKS_PER_BLOCK;
    let ch = load_chunk(blk, cc);
    let s = chunk_scale(ch);
    let d0 = dot(chunk_q(ch, 0u), xc.a) + dot(chunk_q(ch, 1u), xc.b)
           + dot(chunk_q(ch, 2u), xc.c) + dot(chunk_q(ch, 3u), xc.d);
    let d1 = dot(chunk_q(ch, 4u), xc.e) + dot(chunk_q(ch, 5u), xc.f)
           + dot(chunk_q(ch, 6u), xc.g) + dot(chunk_q(ch, 7u), xc.h);
    return s.x * d0 + s.y * xc.s0 + s.z * d1 + s.w * xc.s1;
}

fn chunk_dot(row_base: u32, c: u32, x0: u32) -> f32 {
    return chunk_dot_x(row_base, c, x_chunk(x0, c));
}
