// Q5_K (176 bytes = 11 vec4s): [d, dmin: f16] [scales: 12] [qh: 32] [qs: 128]. Like Q4_K,
// plus a fifth bit: bit c of qh[l] for element l of chunk c.
const CHUNKS_PER_BLOCK: u32 = 8u;
const BLOCK_WORDS: u32 = 44u;

struct Chunk {
    s: vec2<f32>,
    lo: vec4<u32>,
    hi: vec4<u32>,
    qh_lo: vec4<u32>,
    qh_hi: vec4<u32>,
    c: u32,
}

fn load_chunk(base: u32, c: u32) -> Chunk {
    let q = base >> 2u;
    let qs = q + 3u + 2u * (c >> 1u);
    return Chunk(k_scale(w[q], c), w[qs], w[qs + 1u], w[q + 1u], w[q + 2u], c);
}

fn chunk_scale(ch: Chunk) -> vec4<f32> {
    return vec4<f32>(ch.s, ch.s);
}

fn chunk_q(ch: Chunk, i: u32) -> vec4<f32> {
    let lo = (word8(ch.lo, ch.hi, i) >> ((ch.c & 1u) * 4u)) & 0x0F0F0F0Fu;
    let h = ((word8(ch.qh_lo, ch.qh_hi, i) >> ch.c) & 0x01010101u) << 4u;
    return bytes4(lo | h);
}
