// Q4_0 (GPU layout, 5 words): [d:f16 | pad] [qs: 16 bytes]; element j is the low nibble of
// byte j, element j+16 the high nibble; value = (q - 8) * d. A block starts at any word:
// its 5 words lie in the 2 vec4s from base & ~3.
const CHUNKS_PER_BLOCK: u32 = 1u;
const BLOCK_WORDS: u32 = 5u;

struct Chunk {
    d: f32,
    qs: vec4<u32>,
}

fn load_chunk(base: u32, c: u32) -> Chunk {
    let q = base >> 2u;
    let s = base & 3u;
    let a = w[q];
    let b = w[q + 1u];
    return Chunk(f16_lo(a[s]), shift4(a, b, s + 1u));
}

fn chunk_scale(ch: Chunk) -> vec4<f32> {
    return vec4<f32>(ch.d, -8.0 * ch.d, ch.d, -8.0 * ch.d);
}

fn chunk_q(ch: Chunk, i: u32) -> vec4<f32> {
    return bytes4((ch.qs[i & 3u] >> (4u * (i >> 2u))) & 0x0F0F0F0Fu);
}
