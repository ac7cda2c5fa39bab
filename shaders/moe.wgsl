// Expert kernels. The router wrote, per token, the ids of its experts and their weights
// (moe_route.wgsl); these kernels read them from the GPU, so routing never goes through the
// host. Experts are stacked: expert e owns rows e*m .. e*m + m of W.
// - rows: y[t, j*m + r] = W[ids[t, j] * m + r] · x[t]                  (gate and up)
// - down: y[t, r] += sum_j wts[t, j] * W[ids[t, j] * m + r] · x[t, j*k ..] (down, weighted sum)
// The per-type `chunk_scale`/`chunk_q` and `chunk_dot` are prepended by the host.

struct Params {
    k: u32,         // input row length (weights per row)
    m: u32,         // rows per expert
    n_used: u32,    // experts per token
    n_tokens: u32,
    x_stride: u32,  // floats per token of x
    y_stride: u32,  // floats per token of y
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read> ids: array<u32>;
@group(0) @binding(5) var<storage, read> wts: array<f32>;

const ONES = vec4<f32>(1.0);

fn row_dot(e: u32, r: u32, x0: u32) -> f32 {
    let n_chunks = p.k / 32u;
    let row_base = (e * p.m + r) * (n_chunks / CHUNKS_PER_BLOCK) * BLOCK_WORDS;
    var acc = 0.0;
    for (var c = 0u; c < n_chunks; c++) {
        acc += chunk_dot(row_base, c, x0);
    }
    return acc;
}

@compute @workgroup_size(64)
fn rows(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x;
    let t = gid.y;
    if (i >= p.n_used * p.m || t >= p.n_tokens) {
        return;
    }
    let j = i / p.m;
    let e = ids[t * p.n_used + j];
    y[t * p.y_stride + i] = row_dot(e, i % p.m, t * p.x_stride / 4u);
}

@compute @workgroup_size(64)
fn down(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.x;
    let t = gid.y;
    if (r >= p.m || t >= p.n_tokens) {
        return;
    }
    var total = 0.0;
    for (var j = 0u; j < p.n_used; j++) {
        let e = ids[t * p.n_used + j];
        total += wts[t * p.n_used + j] * row_dot(e, r, (t * p.x_stride + j * p.k) / 4u);
    }
    y[t * p.y_stride + r] += total;
}
