// Q4_0 (GPU layout, 5 words): [d:f16 | pad] [qs: 16 bytes]; element j is the low nibble of
// byte j, element j+16 the high nibble; value = (q - 8) * d.
const CHUNKS_PER_BLOCK: u32 = 1u;
const BLOCK_WORDS: u32 = 5u;

fn dequant_chunk(base: u32, c: u32) -> array<vec4<f32>, 8> {
    let d = f16_lo(w[base]);
    var r: array<vec4<f32>, 8>;
    for (var i = 0u; i < 4u; i++) {
        let q = w[base + 1u + i];
        r[i] = d * (lo_nibbles(q) - 8.0);
        r[i + 4u] = d * (hi_nibbles(q) - 8.0);
    }
    return r;
}
