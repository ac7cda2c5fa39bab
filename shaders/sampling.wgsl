// Row reductions over logits, one workgroup per row:
//   argmax:  out_u[row] = index of the largest logit (ties: lowest index)
//   softmax: x[row] = softmax(x[row]) in place
//   nll:     out_f[row] = logsumexp(x[row]) - x[row][targets[row]]  (for perplexity)

struct Params {
    n: u32,       // row length (vocabulary)
    x_row0: u32,  // first row to read
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<u32>;
@group(0) @binding(3) var<storage, read_write> out_f: array<f32>;
@group(0) @binding(4) var<storage, read_write> out_u: array<u32>;

const WG: u32 = 256u;
var<workgroup> red_v: array<f32, WG>;
var<workgroup> red_i: array<u32, WG>;

// Max (and its index) of the row, left in red_v[0] / red_i[0].
fn row_max(base: u32, lid: u32) {
    var best = -3.4e38;
    var bi = 0xFFFFFFFFu;
    for (var i = lid; i < p.n; i += WG) {
        let v = x[base + i];
        if (v > best) {
            best = v;
            bi = i;
        }
    }
    red_v[lid] = best;
    red_i[lid] = bi;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s /= 2u) {
        if (lid < s) {
            let ov = red_v[lid + s];
            let oi = red_i[lid + s];
            if (ov > red_v[lid] || (ov == red_v[lid] && oi < red_i[lid])) {
                red_v[lid] = ov;
                red_i[lid] = oi;
            }
        }
        workgroupBarrier();
    }
}

// Sum of exp(x - m) over the row, left in red_v[0].
fn row_sum_exp(base: u32, m: f32, lid: u32) {
    var s = 0.0;
    for (var i = lid; i < p.n; i += WG) {
        s += exp(x[base + i] - m);
    }
    workgroupBarrier();
    red_v[lid] = s;
    workgroupBarrier();
    for (var st = WG / 2u; st > 0u; st /= 2u) {
        if (lid < st) {
            red_v[lid] += red_v[lid + st];
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(WG)
fn argmax(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    row_max((p.x_row0 + wid.x) * p.n, lid.x);
    if (lid.x == 0u) {
        out_u[wid.x] = red_i[0];
    }
}

@compute @workgroup_size(WG)
fn softmax(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let base = (p.x_row0 + wid.x) * p.n;
    row_max(base, lid.x);
    let m = red_v[0];
    row_sum_exp(base, m, lid.x);
    let inv = 1.0 / red_v[0];
    for (var i = lid.x; i < p.n; i += WG) {
        x[base + i] = exp(x[base + i] - m) * inv;
    }
}

@compute @workgroup_size(WG)
fn nll(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let base = (p.x_row0 + wid.x) * p.n;
    row_max(base, lid.x);
    let m = red_v[0];
    row_sum_exp(base, m, lid.x);
    if (lid.x == 0u) {
        out_f[wid.x] = m + log(red_v[0]) - x[base + targets[wid.x]];
    }
}
