// BF16: 32 bfloat16 in 16 words; a bf16 is the top half of an f32.
const CHUNKS_PER_BLOCK: u32 = 1u;
const BLOCK_WORDS: u32 = 16u;

fn bf16x2(v: u32) -> vec2<f32> {
    return vec2<f32>(bitcast<f32>(v << 16u), bitcast<f32>(v & 0xFFFF0000u));
}

fn chunk_scale(base: u32, c: u32) -> vec4<f32> {
    return vec4<f32>(1.0, 0.0, 1.0, 0.0);
}

fn chunk_q(base: u32, c: u32, i: u32) -> vec4<f32> {
    return vec4<f32>(bf16x2(w[base + 2u * i]), bf16x2(w[base + 2u * i + 1u]));
}
