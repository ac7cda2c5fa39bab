// Q8_0 (GPU layout, 9 words): [d:f16 | pad] [qs: 32 x i8]; value = q * d.
const CHUNKS_PER_BLOCK: u32 = 1u;
const BLOCK_WORDS: u32 = 9u;

fn chunk_scale(base: u32, c: u32) -> vec4<f32> {
    let d = f16_lo(w[base]);
    return vec4<f32>(d, 0.0, d, 0.0);
}

fn chunk_q(base: u32, c: u32, i: u32) -> vec4<f32> {
    return sbytes4(w[base + 1u + i]);
}
