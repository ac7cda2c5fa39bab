// Q6_K (GPU layout, 56 words = 14 vec4s): [ql: 128 bytes] [qh: 64] [scales: 16 x i8]
// [d: f16 | pad] [3 pad words, so that blocks stay 16-byte aligned]. Chunk c: half
// n = c / 4, quarter q = c % 4. Element l takes the nibble (q / 2) of
// ql[64n + 32(q % 2) + l], two bits (2q) of qh[32n + l], scale 8n + 2q + l / 16;
// value = d * sc * (q6 - 32).
const CHUNKS_PER_BLOCK: u32 = 8u;
const BLOCK_WORDS: u32 = 56u;

struct Chunk {
    s: vec2<f32>,
    ql_lo: vec4<u32>,
    ql_hi: vec4<u32>,
    qh_lo: vec4<u32>,
    qh_hi: vec4<u32>,
    c: u32,
}

fn load_chunk(base: u32, c: u32) -> Chunk {
    let q = base >> 2u;
    let n = c >> 2u;
    let ql = q + 4u * n + 2u * (c & 1u);
    let qh = q + 8u + 2u * n;
    let d = f16_lo(w[q + 13u].x);
    // Scales 8n + 2q and 8n + 2q + 1 share a word: bytes 2(c % 2) of word 48 + c / 2.
    let sw = sbytes4(w[q + 12u][c >> 1u]);
    let s = d * select(sw.xy, sw.zw, (c & 1u) == 1u);
    return Chunk(s, w[ql], w[ql + 1u], w[qh], w[qh + 1u], c);
}

fn chunk_scale(ch: Chunk) -> vec4<f32> {
    return vec4<f32>(ch.s.x, -32.0 * ch.s.x, ch.s.y, -32.0 * ch.s.y);
}

fn chunk_q(ch: Chunk, i: u32) -> vec4<f32> {
    let q = ch.c & 3u;
    let lo = (word8(ch.ql_lo, ch.ql_hi, i) >> (4u * (q >> 1u))) & 0x0F0F0F0Fu;
    let hi = ((word8(ch.qh_lo, ch.qh_hi, i) >> (2u * q)) & 0x03030303u) << 4u;
    return bytes4(lo | hi);
}
