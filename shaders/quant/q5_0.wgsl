// Q5_0 (GPU layout, 6 words): [d:f16 | pad] [qh: u32] [qs: 16 bytes]; the fifth bit of
// element j is bit j of qh; value = (q - 16) * d.
const CHUNKS_PER_BLOCK: u32 = 1u;
const BLOCK_WORDS: u32 = 6u;

fn chunk_scale(base: u32, c: u32) -> vec4<f32> {
    let d = f16_lo(w[base]);
    return vec4<f32>(d, -16.0 * d, d, -16.0 * d);
}

fn chunk_q(base: u32, c: u32, i: u32) -> vec4<f32> {
    let q = (w[base + 2u + (i & 3u)] >> (4u * (i >> 2u))) & 0x0F0F0F0Fu;
    // Bits 4i..4i+3 of qh, spread to bit 4 of each byte: the multiply puts bit b at
    // b, b+7, b+14 and b+21 with no carries, and the mask keeps bit b of byte b.
    let hb = (w[base + 1u] >> (4u * i)) & 0xFu;
    let h = ((hb * 0x204081u) & 0x01010101u) << 4u;
    return bytes4(q | h);
}
