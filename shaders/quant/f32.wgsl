// F32: a "block" is 32 floats (8 vec4s).
const CHUNKS_PER_BLOCK: u32 = 1u;
const BLOCK_WORDS: u32 = 32u;

struct Chunk {
    v: array<vec4<u32>, 8>,
}

fn load_chunk(base: u32, c: u32) -> Chunk {
    let q = base >> 2u;
    return Chunk(array<vec4<u32>, 8>(
        w[q], w[q + 1u], w[q + 2u], w[q + 3u], w[q + 4u], w[q + 5u], w[q + 6u], w[q + 7u]
    ));
}

fn chunk_scale(ch: Chunk) -> vec4<f32> {
    return vec4<f32>(1.0, 0.0, 1.0, 0.0);
}

fn chunk_q(ch: Chunk, i: u32) -> vec4<f32> {
    return bitcast<vec4<f32>>(ch.v[i]);
}
