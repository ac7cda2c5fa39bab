// Q5_K (176 bytes): [d, dmin: f16] [scales: 12] [qh: 32] [qs: 128]. Like Q4_K, plus a fifth
// bit: bit c of qh[l] for element l of chunk c.
const CHUNKS_PER_BLOCK: u32 = 8u;
const BLOCK_WORDS: u32 = 44u;

fn scale_min_k4(base: u32, j: u32) -> vec2<f32> {
    if (j < 4u) {
        return vec2<f32>(f32(byte_at(base, 4u + j) & 63u), f32(byte_at(base, 8u + j) & 63u));
    }
    let a = byte_at(base, 8u + j);
    let s = (a & 0xFu) | ((byte_at(base, j) >> 6u) << 4u);
    let m = (a >> 4u) | ((byte_at(base, 4u + j) >> 6u) << 4u);
    return vec2<f32>(f32(s), f32(m));
}

fn chunk_scale(base: u32, c: u32) -> vec4<f32> {
    let dd = unpack2x16float(w[base]);
    let sm = scale_min_k4(base, c);
    let s = vec2<f32>(dd.x * sm.x, -dd.y * sm.y);
    return vec4<f32>(s, s);
}

fn chunk_q(base: u32, c: u32, i: u32) -> vec4<f32> {
    let lo = (w[base + 12u + 8u * (c >> 1u) + i] >> ((c & 1u) * 4u)) & 0x0F0F0F0Fu;
    let h = ((w[base + 4u + i] >> c) & 0x01010101u) << 4u;
    return bytes4(lo | h);
}
