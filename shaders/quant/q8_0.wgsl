// Q8_0 (GPU layout, 9 words): [d:f16 | pad] [qs: 32 x i8]; value = q * d. A block starts at
// any word: its 9 words lie in the 3 vec4s from base & ~3.
const CHUNKS_PER_BLOCK: u32 = 1u;
const BLOCK_WORDS: u32 = 9u;

struct Chunk {
    d: f32,
    lo: vec4<u32>,
    hi: vec4<u32>,
}

fn load_chunk(base: u32, c: u32) -> Chunk {
    let q = base >> 2u;
    let s = base & 3u;
    let a = w[q];
    let b = w[q + 1u];
    let e = w[q + 2u];
    return Chunk(f16_lo(a[s]), shift4(a, b, s + 1u), shift4(b, e, s + 1u));
}

fn chunk_scale(ch: Chunk) -> vec4<f32> {
    return vec4<f32>(ch.d, 0.0, ch.d, 0.0);
}

fn chunk_q(ch: Chunk, i: u32) -> vec4<f32> {
    return sbytes4(word8(ch.lo, ch.hi, i));
}
