// Shared helpers for reading quantized blocks from the weight buffer `w`, which every kernel
// binds as array<vec4<u32>>: one load brings 16 bytes. On CPU Vulkan (lavapipe) a storage
// load costs per instruction, not per byte (it loops over the SIMD lanes), and on GPUs wide
// loads coalesce better. Weight buffers are padded to 16 bytes (Gpu::storage*).
// Every per-type file in quant/ defines:
//   const CHUNKS_PER_BLOCK: u32;  // 32-element chunks per block (8 for K-quants)
//   const BLOCK_WORDS: u32;       // u32 words per block in the GPU layout
//   struct Chunk;                 // the words of one chunk, loaded once
//   fn load_chunk(base: u32, c: u32) -> Chunk;  // chunk c of the block at word `base`
//   fn chunk_scale(ch: Chunk) -> vec4<f32>;
//       (scale, offset) of elements 0..15 of the chunk in .xy, of elements 16..31 in .zw
//   fn chunk_q(ch: Chunk, i: u32) -> vec4<f32>;
//       raw quant values of elements 4i..4i+3
// so that element value = q * scale + offset. Kernels fold the offset in through sum(x),
// as llama.cpp does for the K-quant mins.

// Words s..s+3 of a ++ b, for s in 0..=4: blocks that are not 16-byte aligned (Q4_0, Q8_0)
// load the vec4s around them and pick their words out with selects.
fn shift4(a: vec4<u32>, b: vec4<u32>, s: u32) -> vec4<u32> {
    var v = select(a, vec4<u32>(a.yzw, b.x), s == 1u);
    v = select(v, vec4<u32>(a.zw, b.xy), s == 2u);
    v = select(v, vec4<u32>(a.w, b.xyz), s == 3u);
    return select(v, b, s == 4u);
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

// Word i of vec4 q (i in 0..8 over the pair lo, hi).
fn word8(lo: vec4<u32>, hi: vec4<u32>, i: u32) -> u32 {
    return select(lo, hi, i >= 4u)[i & 3u];
}

// K-quants (Q4_K, Q5_K): the 6-bit scale and min of sub-block j from the 12 scale bytes
// (words 1..3 of the block).
fn scale_byte(sc: vec3<u32>, k: u32) -> u32 {
    return (sc[k >> 2u] >> ((k & 3u) * 8u)) & 0xFFu;
}

fn scale_min_k4(sc: vec3<u32>, j: u32) -> vec2<f32> {
    let low = vec2<u32>(scale_byte(sc, j) & 63u, scale_byte(sc, j + 4u) & 63u);
    // For j >= 4 (j ^ 4 == j - 4 there; below 4 the value is unused but in range).
    let a = scale_byte(sc, j + 4u);
    let high = vec2<u32>(
        (a & 0xFu) | ((scale_byte(sc, j ^ 4u) >> 6u) << 4u),
        (a >> 4u) | ((scale_byte(sc, j) >> 6u) << 4u),
    );
    return vec2<f32>(select(high, low, j < 4u));
}

// (d * scale, -dmin * min) of sub-block c from a Q4_K/Q5_K block's first vec4.
fn k_scale(head: vec4<u32>, c: u32) -> vec2<f32> {
    let dd = unpack2x16float(head.x);
    let sm = scale_min_k4(head.yzw, c);
    return vec2<f32>(dd.x * sm.x, -dd.y * sm.y);
}

// The 4 vec4s (16 words) from word `base` (F16, BF16 chunks).
fn quads4(base: u32) -> array<vec4<u32>, 4> {
    let q = base >> 2u;
    return array<vec4<u32>, 4>(w[q], w[q + 1u], w[q + 2u], w[q + 3u]);
}

// Dequantized elements 4i..4i+3 of a chunk (for embedding rows).
fn dequant4(ch: Chunk, i: u32) -> vec4<f32> {
    let s = chunk_scale(ch);
    let q = chunk_q(ch, i);
    if (i < 4u) {
        return q * s.x + s.y;
    }
    return q * s.z + s.w;
}
