// BF16: 32 bfloat16 in 16 words (4 vec4s); a bf16 is the top half of an f32.
const CHUNKS_PER_BLOCK: u32 = 1u;
const BLOCK_WORDS: u32 = 16u;

fn bf16x2(v: u32) -> vec2<f32> {
    return vec2<f32>(bitcast<f32>(v << 16u), bitcast<f32>(v & 0xFFFF0000u));
}

struct Chunk {
    v: array<vec4<u32>, 4>,
}

fn load_chunk(base: u32, c: u32) -> Chunk {
    return Chunk(quads4(base));
}

fn chunk_scale(ch: Chunk) -> vec4<f32> {
    return vec4<f32>(1.0, 0.0, 1.0, 0.0);
}

fn chunk_q(ch: Chunk, i: u32) -> vec4<f32> {
    let v = ch.v[i >> 1u];
    let h = select(v.xy, v.zw, (i & 1u) == 1u);
    return vec4<f32>(bf16x2(h.x), bf16x2(h.y));
}
