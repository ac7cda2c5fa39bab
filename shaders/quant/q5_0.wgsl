// Q5_0 (GPU layout, 6 words): [d:f16 | pad] [qh: u32] [qs: 16 bytes]; the fifth bit of
// element j is bit j of qh; value = (q - 16) * d.
const CHUNKS_PER_BLOCK: u32 = 1u;
const BLOCK_WORDS: u32 = 6u;

fn high_bits(qh: u32, first: u32) -> vec4<f32> {
    let b = qh >> first;
    return vec4<f32>(f32((b & 1u) << 4u), f32(((b >> 1u) & 1u) << 4u), f32(((b >> 2u) & 1u) << 4u), f32(((b >> 3u) & 1u) << 4u));
}

fn dequant_chunk(base: u32, c: u32) -> array<vec4<f32>, 8> {
    let d = f16_lo(w[base]);
    let qh = w[base + 1u];
    var r: array<vec4<f32>, 8>;
    for (var i = 0u; i < 4u; i++) {
        let q = w[base + 2u + i];
        r[i] = d * (lo_nibbles(q) + high_bits(qh, 4u * i) - 16.0);
        r[i + 4u] = d * (hi_nibbles(q) + high_bits(qh, 16u + 4u * i) - 16.0);
    }
    return r;
}
