// F16: 32 halves in 16 words.
const CHUNKS_PER_BLOCK: u32 = 1u;
const BLOCK_WORDS: u32 = 16u;

fn chunk_scale(base: u32, c: u32) -> vec4<f32> {
    return vec4<f32>(1.0, 0.0, 1.0, 0.0);
}

fn chunk_q(base: u32, c: u32, i: u32) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(w[base + 2u * i]), unpack2x16float(w[base + 2u * i + 1u]));
}
