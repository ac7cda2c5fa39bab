// BF16: 32 bfloat16 in 16 words; a bf16 is the top half of an f32.
const CHUNKS_PER_BLOCK: u32 = 1u;
const BLOCK_WORDS: u32 = 16u;

fn bf16x2(v: u32) -> vec2<f32> {
    return vec2<f32>(bitcast<f32>(v << 16u), bitcast<f32>(v & 0xFFFF0000u));
}

fn dequant_chunk(base: u32, c: u32) -> array<vec4<f32>, 8> {
    var r: array<vec4<f32>, 8>;
    for (var i = 0u; i < 8u; i++) {
        r[i] = vec4<f32>(bf16x2(w[base + 2u * i]), bf16x2(w[base + 2u * i + 1u]));
    }
    return r;
}
