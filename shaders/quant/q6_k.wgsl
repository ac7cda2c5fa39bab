// Q6_K (GPU layout, 53 words): [ql: 128 bytes] [qh: 64] [scales: 16 x i8] [d: f16 | pad].
// Chunk c: half n = c / 4, quarter q = c % 4. Element l takes the nibble (q / 2) of
// ql[64n + 32(q % 2) + l], two bits (2q) of qh[32n + l], scale 8n + 2q + l / 16; value = d * sc * (q6 - 32).
const CHUNKS_PER_BLOCK: u32 = 8u;
const BLOCK_WORDS: u32 = 53u;

fn dequant_chunk(base: u32, c: u32) -> array<vec4<f32>, 8> {
    let d = f16_lo(w[base + 52u]);
    let n = c >> 2u;
    let q = c & 3u;
    let ql = base + 16u * n + 8u * (q & 1u);
    let qh = base + 32u + 8u * n;
    let nib = 4u * (q >> 1u);
    let s0 = d * sbytes4(w[base + 48u + ((8u * n + 2u * q) >> 2u)])[(2u * q) & 3u];
    let s1 = d * sbytes4(w[base + 48u + ((8u * n + 2u * q + 1u) >> 2u)])[(2u * q + 1u) & 3u];
    var r: array<vec4<f32>, 8>;
    for (var i = 0u; i < 8u; i++) {
        let lo = (w[ql + i] >> nib) & 0x0F0F0F0Fu;
        let hi = ((w[qh + i] >> (2u * q)) & 0x03030303u) << 4u;
        let s = select(s1, s0, i < 4u);
        r[i] = s * (bytes4(lo | hi) - 32.0);
    }
    return r;
}
