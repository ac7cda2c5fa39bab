// Q8_0 (GPU layout, 9 words): [d:f16 | pad] [qs: 32 x i8].
const CHUNKS_PER_BLOCK: u32 = 1u;
const BLOCK_WORDS: u32 = 9u;

fn dequant_chunk(base: u32, c: u32) -> array<vec4<f32>, 8> {
    let d = f16_lo(w[base]);
    var r: array<vec4<f32>, 8>;
    for (var i = 0u; i < 8u; i++) {
        r[i] = d * sbytes4(w[base + 1u + i]);
    }
    return r;
}
