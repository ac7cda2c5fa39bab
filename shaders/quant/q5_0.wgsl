// Q5_0 (GPU layout, 6 words): [d:f16 | pad] [qh: u32] [qs: 16 bytes]; the fifth bit of
// element j is bit j of qh; value = (q - 16) * d. Rows are whole blocks of 6 words, so a
// block starts at an even word: it fills the 2 vec4s from base & ~3, from word 0 or 2.
const CHUNKS_PER_BLOCK: u32 = 1u;
const BLOCK_WORDS: u32 = 6u;

struct Chunk {
    d: f32,
    qh: u32,
    qs: vec4<u32>,
}

fn load_chunk(base: u32, c: u32) -> Chunk {
    let a = w[base >> 2u];
    let b = w[(base >> 2u) + 1u];
    let odd = (base & 2u) != 0u;
    let head = select(a.xy, a.zw, odd);
    return Chunk(f16_lo(head.x), head.y, select(vec4<u32>(a.zw, b.xy), b, odd));
}

fn chunk_scale(ch: Chunk) -> vec4<f32> {
    return vec4<f32>(ch.d, -16.0 * ch.d, ch.d, -16.0 * ch.d);
}

fn chunk_q(ch: Chunk, i: u32) -> vec4<f32> {
    let q = (ch.qs[i & 3u] >> (4u * (i >> 2u))) & 0x0F0F0F0Fu;
    // Bits 4i..4i+3 of qh, spread to bit 4 of each byte: the multiply puts bit b at
    // b, b+7, b+14 and b+21 with no carries, and the mask keeps bit b of byte b.
    let hb = (ch.qh >> (4u * i)) & 0xFu;
    let h = ((hb * 0x204081u) & 0x01010101u) << 4u;
    return bytes4(q | h);
}
