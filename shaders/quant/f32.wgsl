// F32: a "block" is 32 floats.
const CHUNKS_PER_BLOCK: u32 = 1u;
const BLOCK_WORDS: u32 = 32u;

fn chunk_scale(base: u32, c: u32) -> vec4<f32> {
    return vec4<f32>(1.0, 0.0, 1.0, 0.0);
}

fn chunk_q(base: u32, c: u32, i: u32) -> vec4<f32> {
    let o = base + 4u * i;
    return vec4<f32>(bitcast<f32>(w[o]), bitcast<f32>(w[o + 1u]), bitcast<f32>(w[o + 2u]), bitcast<f32>(w[o + 3u]));
}
