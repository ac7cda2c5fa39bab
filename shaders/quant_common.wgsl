// Shared helpers for reading quantized blocks from a u32 weight buffer `w`.
// Every per-type file in quant/ defines:
//   const CHUNKS_PER_BLOCK: u32;  // 32-element chunks per block (8 for K-quants)
//   const BLOCK_WORDS: u32;       // u32 words per block in the GPU layout
//   fn chunk_scale(base: u32, c: u32) -> vec4<f32>;
//       (scale, offset) of elements 0..15 of chunk c in .xy, of elements 16..31 in .zw
//   fn chunk_q(base: u32, c: u32, i: u32) -> vec4<f32>;
//       raw quant values of elements 4i..4i+3 of chunk c
// so that element value = q * scale + offset. Kernels fold the offset in through sum(x),
// as llama.cpp does for the K-quant mins.

// Byte `i` of the block starting at word `base`.
fn byte_at(base: u32, i: u32) -> u32 {
    return (w[base + (i >> 2u)] >> ((i & 3u) * 8u)) & 0xFFu;
}

// The four bytes of a word as floats (unsigned).
fn bytes4(v: u32) -> vec4<f32> {
    return vec4<f32>(f32(v & 0xFFu), f32((v >> 8u) & 0xFFu), f32((v >> 16u) & 0xFFu), f32(v >> 24u));
}

// The four bytes of a word as floats (signed i8).
fn sbytes4(v: u32) -> vec4<f32> {
    let s = bitcast<i32>(v);
    return vec4<f32>(f32((s << 24u) >> 24u), f32((s << 16u) >> 24u), f32((s << 8u) >> 24u), f32(s >> 24u));
}

fn f16_lo(v: u32) -> f32 {
    return unpack2x16float(v).x;
}

// K-quants (Q4_K, Q5_K): // The 6-bit scale and min of sub-block j (scales start at byte 4 of the block).
fn scale_min_k4(base: u32, j: u32) -> vec2<f32> {
    if (j < 4u) {
        return vec2<f32>(f32(byte_at(base, 4u + j) & 63u), f32(byte_at(base, 8u + j) & 63u));
    }
    let a = byte_at(base, 8u + j);
    let s = (a & 0xFu) | ((byte_at(base, j) >> 6u) << 4u);
    let m = (a >> 4u) | ((byte_at(base, 4u + j) >> 6u) << 4u);
    return vec2<f32>(f32(s), f32(m));
}

// Dequantized elements 4i..4i+3 of chunk c (for embedding rows and tests).
fn dequant4(base: u32, c: u32, i: u32) -> vec4<f32> {
    let s = chunk_scale(base, c);
    let q = chunk_q(base, c, i);
    if (i < 4u) {
        return q * s.x + s.y;
    }
    return q * s.z + s.w;
}
