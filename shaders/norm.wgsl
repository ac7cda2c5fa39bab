// RMSNorm: y[t] = x[x_row0 + t] / sqrt(mean(x^2) + eps) * weight. One workgroup per row.

struct Params {
    n: u32,
    n_tokens: u32,
    x_row0: u32,
    eps: f32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

const WG: u32 = 64u;
var<workgroup> partial: array<f32, WG>;

@compute @workgroup_size(WG)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let t = wid.x;
    let xo = (p.x_row0 + t) * p.n;
    var s = 0.0;
    for (var i = lid.x; i < p.n; i += WG) {
        let v = x[xo + i];
        s += v * v;
    }
    partial[lid.x] = s;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
        if (lid.x < stride) {
            partial[lid.x] += partial[lid.x + stride];
        }
        workgroupBarrier();
    }
    let inv = inverseSqrt(partial[0] / f32(p.n) + p.eps);
    let yo = t * p.n;
    for (var i = lid.x; i < p.n; i += WG) {
        y[yo + i] = x[xo + i] * inv * weight[i];
    }
}
