// Shared helpers for reading quantized blocks from a u32 weight buffer `w`.
// Every per-type file in quant/ defines:
//   const CHUNKS_PER_BLOCK: u32;  // 32-element chunks per block (8 for K-quants)
//   const BLOCK_WORDS: u32;       // u32 words per block in the GPU layout
//   fn dequant_chunk(base: u32, c: u32) -> array<vec4<f32>, 8>;  // block at word `base`, chunk c

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

// Low and high nibbles of each byte of a word.
fn lo_nibbles(v: u32) -> vec4<f32> {
    return bytes4(v & 0x0F0F0F0Fu);
}
fn hi_nibbles(v: u32) -> vec4<f32> {
    return bytes4((v >> 4u) & 0x0F0F0F0Fu);
}

fn f16_lo(v: u32) -> f32 {
    return unpack2x16float(v).x;
}
