// Shared by matvec.wgsl (decode) and matmul.wgsl (prefill): parameters and bindings.
// The host fills {{X_DECL}} with a uniform or a storage declaration of x, and {{X_INPUT}}
// with what the decode mat-vec `split` does to x as it reads it, so that the op before it
// needs no dispatch of its own:
//   0: nothing;
//   1: RMSNorm: x * x_norm * aux (the norm weight), x_norm = 1 / rms(x) from input_scale;
//   2: SwiGLU: silu(x) * aux (x the gate projection, aux the up projection).

struct Params {
    k: u32,           // row length (input features)
    n_rows: u32,      // rows in this weight shard
    row_offset: u32,  // first output feature of this shard
    y_stride: u32,    // floats per output row
    n_tokens: u32,    // tokens to compute (prefill: in this tile)
    x_stride: u32,    // floats per input row
    flags: u32,       // 1: add bias, 2: accumulate into y (residual)
    x_row0: u32,      // first input row (storage x only; a uniform x is pre-offset)
    y_row0: u32,      // first output row to write
    eps: f32,         // the folded RMSNorm's epsilon (X_INPUT 1)
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<vec4<u32>>;
{{X_DECL}}
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;
// X_INPUT 1: the RMSNorm weight; 2: the up projection (bound to a dummy otherwise).
@group(0) @binding(5) var<storage, read> aux: array<vec4<f32>>;

const ONES = vec4<f32>(1.0);

const X_INPUT: u32 = {{X_INPUT}}u;

// Set by the entry point before it reads x: the row's first vec4 and, for X_INPUT 1, its
// 1 / rms.
var<private> x_base: u32;
var<private> x_norm: f32;

// vec4 i of x, as the mat-vec sees it (chunk_dot.wgsl's x_chunk reads through this).
fn x_at(i: u32) -> vec4<f32> {
    let v = x[i];
    if (X_INPUT == 1u) {
        return v * x_norm * aux[i - x_base];
    }
    if (X_INPUT == 2u) {
        return v / (1.0 + exp(-v)) * aux[i];
    }
    return v;
}
