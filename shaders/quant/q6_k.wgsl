// Q6_K (GPU layout, 53 words): [ql: 128 bytes] [qh: 64] [scales: 16 x i8] [d: f16 | pad].
// Chunk c: half n = c / 4, quarter q = c % 4. Element l takes the nibble (q / 2) of
// ql[64n + 32(q % 2) + l], two bits (2q) of qh[32n + l], scale 8n + 2q + l / 16;
// value = d * sc * (q6 - 32).
const CHUNKS_PER_BLOCK: u32 = 8u;
const BLOCK_WORDS: u32 = 53u;

fn chunk_scale(base: u32, c: u32) -> vec4<f32> {
    let d = f16_lo(w[base + 52u]);
    // Scales 8n + 2q and 8n + 2q + 1 share a word: byte offset 2(c % 2) within word 48 + c / 2.
    let sw = sbytes4(w[base + 48u + (c >> 1u)]);
    let s0 = d * select(sw.x, sw.z, (c & 1u) == 1u);
    let s1 = d * select(sw.y, sw.w, (c & 1u) == 1u);
    return vec4<f32>(s0, -32.0 * s0, s1, -32.0 * s1);
}

fn chunk_q(base: u32, c: u32, i: u32) -> vec4<f32> {
    let n = c >> 2u;
    let q = c & 3u;
    let lo = (w[base + 16u * n + 8u * (q & 1u) + i] >> (4u * (q >> 1u))) & 0x0F0F0F0Fu;
    let hi = ((w[base + 32u + 8u * n + i] >> (2u * q)) & 0x03030303u) << 4u;
    return bytes4(lo | hi);
}
