// Shared by matvec.wgsl (decode) and matmul.wgsl (prefill): parameters and bindings.
// The host fills {{X_DECL}} with a uniform or a storage declaration of x.

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
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<vec4<u32>>;
{{X_DECL}}
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;

const ONES = vec4<f32>(1.0);
