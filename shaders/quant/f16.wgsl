// F16: 32 halves in 16 words.
const CHUNKS_PER_BLOCK: u32 = 1u;
const BLOCK_WORDS: u32 = 16u;

fn dequant_chunk(base: u32, c: u32) -> array<vec4<f32>, 8> {
    var r: array<vec4<f32>, 8>;
    for (var i = 0u; i < 8u; i++) {
        r[i] = vec4<f32>(unpack2x16float(w[base + 2u * i]), unpack2x16float(w[base + 2u * i + 1u]));
    }
    return r;
}
