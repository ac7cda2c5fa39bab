// Q5_K (176 bytes): [d, dmin: f16] [scales: 12] [qh: 32] [qs: 128]. Like Q4_K, plus a fifth
// bit: bit c of qh[l] for element l of chunk c.
const CHUNKS_PER_BLOCK: u32 = 8u;
const BLOCK_WORDS: u32 = 44u;

// scale_min_k4 is in quant_common.wgsl (Q4_K and Q5_K share it).

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
