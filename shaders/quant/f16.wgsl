// F16: 32 halves in 16 words (4 vec4s).
const CHUNKS_PER_BLOCK: u32 = 1u;
const BLOCK_WORDS: u32 = 16u;

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
    return vec4<f32>(unpack2x16float(h.x), unpack2x16float(h.y));
}
