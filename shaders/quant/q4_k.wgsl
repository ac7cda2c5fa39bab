// Q4_K (144 bytes = 9 vec4s, already aligned): [d, dmin: f16] [scales: 12 bytes] [qs: 128
// bytes]. Chunk c uses 6-bit scale/min c; its quants are the low (c even) or high (c odd)
// nibbles of qs[32 * (c / 2) ..]. value = d * sc * q - dmin * m.
const CHUNKS_PER_BLOCK: u32 = 8u;
const BLOCK_WORDS: u32 = 36u;

struct Chunk {
    s: vec2<f32>,
    lo: vec4<u32>,
    hi: vec4<u32>,
    shift: u32,
}

fn load_chunk(base: u32, c: u32) -> Chunk {
    let q = base >> 2u;
    let qs = q + 1u + 2u * (c >> 1u);
    return Chunk(k_scale(w[q], c), w[qs], w[qs + 1u], (c & 1u) * 4u);
}

fn chunk_scale(ch: Chunk) -> vec4<f32> {
    return vec4<f32>(ch.s, ch.s);
}

fn chunk_q(ch: Chunk, i: u32) -> vec4<f32> {
    return bytes4((word8(ch.lo, ch.hi, i) >> ch.shift) & 0x0F0F0F0Fu);
}
