// Q4_K (144 bytes, already word aligned): [d, dmin: f16] [scales: 12 bytes] [qs: 128 bytes].
// Chunk c uses 6-bit scale/min c; its quants are the low (c even) or high (c odd) nibbles of
// qs[32 * (c / 2) ..]. value = d * sc * q - dmin * m.
const CHUNKS_PER_BLOCK: u32 = 8u;
const BLOCK_WORDS: u32 = 36u;

// scale_min_k4 is in quant_common.wgsl (Q4_K and Q5_K share it).

fn chunk_scale(base: u32, c: u32) -> vec4<f32> {
    let dd = unpack2x16float(w[base]);
    let sm = scale_min_k4(base, c);
    let s = vec2<f32>(dd.x * sm.x, -dd.y * sm.y);
    return vec4<f32>(s, s);
}

fn chunk_q(base: u32, c: u32, i: u32) -> vec4<f32> {
    return bytes4((w[base + 4u + 8u * (c >> 1u) + i] >> ((c & 1u) * 4u)) & 0x0F0F0F0Fu);
}
