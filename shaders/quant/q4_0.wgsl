// Q4_0 (GPU layout, 5 words): [d:f16 | pad] [qs: 16 bytes]; element j is the low nibble of
// byte j, element j+16 the high nibble; value = (q - 8) * d.
const CHUNKS_PER_BLOCK: u32 = 1u;
const BLOCK_WORDS: u32 = 5u;

fn chunk_scale(base: u32, c: u32) -> vec4<f32> {
    let d = f16_lo(w[base]);
    return vec4<f32>(d, -8.0 * d, d, -8.0 * d);
}

fn chunk_q(base: u32, c: u32, i: u32) -> vec4<f32> {
    let q = w[base + 1u + (i & 3u)];
    return bytes4((q >> (4u * (i >> 2u))) & 0x0F0F0F0Fu);
}
