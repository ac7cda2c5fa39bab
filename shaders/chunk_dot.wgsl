// Shared by the decode mat-vec and the expert kernels; expects binding `w` (raw blocks),
// `x_at(i)` (vec4 i of the activations), and the per-type load_chunk/chunk_scale/chunk_q.

// The 32 activations of one chunk, with the sums of each half (for the offsets).
struct XChunk {
    a: vec4<f32>, b: vec4<f32>, c: vec4<f32>, d: vec4<f32>,
    e: vec4<f32>, f: vec4<f32>, g: vec4<f32>, h: vec4<f32>,
    s0: f32, s1: f32,
}

fn x_chunk(x0: u32, c: u32) -> XChunk {
    let xb = x0 + c * 8u;
    var v: XChunk;
    v.a = x_at(xb);
    v.b = x_at(xb + 1u);
    v.c = x_at(xb + 2u);
    v.d = x_at(xb + 3u);
    v.e = x_at(xb + 4u);
    v.f = x_at(xb + 5u);
    v.g = x_at(xb + 6u);
    v.h = x_at(xb + 7u);
    v.s0 = dot(v.a + v.b + v.c + v.d, ONES);
    v.s1 = dot(v.e + v.f + v.g + v.h, ONES);
    return v;
}

// One chunk of a weight row, dequantized to raw quants plus (scale, offset) per half.
struct WeightChunk {
    s: vec4<f32>,
    q: array<vec4<f32>, 8>,
}

// Chunk c of the row starting at row_base.
fn weight_chunk(row_base: u32, c: u32) -> WeightChunk {
    let ch = load_chunk(row_base + (c / CHUNKS_PER_BLOCK) * BLOCK_WORDS, c % CHUNKS_PER_BLOCK);
    return WeightChunk(chunk_scale(ch), array<vec4<f32>, 8>(
        chunk_q(ch, 0u), chunk_q(ch, 1u), chunk_q(ch, 2u), chunk_q(ch, 3u),
        chunk_q(ch, 4u), chunk_q(ch, 5u), chunk_q(ch, 6u), chunk_q(ch, 7u)
    ));
}

fn weight_dot(wc: WeightChunk, xc: XChunk) -> f32 {
    let d0 = dot(wc.q[0], xc.a) + dot(wc.q[1], xc.b) + dot(wc.q[2], xc.c) + dot(wc.q[3], xc.d);
    let d1 = dot(wc.q[4], xc.e) + dot(wc.q[5], xc.f) + dot(wc.q[6], xc.g) + dot(wc.q[7], xc.h);
    return wc.s.x * d0 + wc.s.y * xc.s0 + wc.s.z * d1 + wc.s.w * xc.s1;
}

// The dot product of chunk c (32 weights) of the row starting at row_base with xc.
fn chunk_dot_x(row_base: u32, c: u32, xc: XChunk) -> f32 {
    return weight_dot(weight_chunk(row_base, c), xc);
}

fn chunk_dot(row_base: u32, c: u32, x0: u32) -> f32 {
    return chunk_dot_x(row_base, c, x_chunk(x0, c));
}
