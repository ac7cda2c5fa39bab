// Row reductions over logits, one workgroup per row:
//   argmax:  out_u[row] = index of the largest logit (ties: lowest index)
//   softmax: x[row] = softmax(x[row]) in place
//   nll:     out_f[k + row] = logsumexp(x[row]) - x[row][targets[k + row]]  (perplexity;
//            k offsets a block of rows scored at a time)
//   topk:    the k largest of one row, as (index, value) pairs (see below)

struct Params {
    n: u32,       // row length (vocabulary)
    x_row0: u32,  // first row to read
    k: u32,       // top-k: how many to keep; nll: first target/output row
    cap: u32,     // top-k only: most pairs written (ties at the threshold may add a few)
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
        out_f[p.k + wid.x] = m + log(red_v[0]) - x[base + targets[p.k + wid.x]];
    }
}

// top-k: writes the k largest logits of row x_row0 as (index, value) pairs to out_u/out_f,
// preceded by their count in out_u[0] (ties at the threshold may add a few, up to `cap`).
// The threshold is found by bisection on order-preserving integer keys of the floats: 32
// counting passes over the row, no sort and no scratch memory.
var<workgroup> wg_count: atomic<u32>;

fn order_key(v: f32) -> u32 {
    let b = bitcast<u32>(v);
    return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}

@compute @workgroup_size(WG)
fn topk(@builtin(local_invocation_id) lid: vec3<u32>) {
    let base = p.x_row0 * p.n;
    var t = 0u;
    for (var bit = 31i; bit >= 0; bit--) {
        let cand = t | (1u << u32(bit));
        if (lid.x == 0u) {
            atomicStore(&wg_count, 0u);
        }
        workgroupBarrier();
        var c = 0u;
        for (var i = lid.x; i < p.n; i += WG) {
            c += select(0u, 1u, order_key(x[base + i]) >= cand);
        }
        atomicAdd(&wg_count, c);
        let total = workgroupUniformLoad(&wg_count);
        if (total >= p.k) {
            t = cand;
        }
    }
    if (lid.x == 0u) {
        atomicStore(&wg_count, 0u);
    }
    workgroupBarrier();
    for (var i = lid.x; i < p.n; i += WG) {
        let v = x[base + i];
        if (order_key(v) >= t) {
            let slot = atomicAdd(&wg_count, 1u);
            if (slot < p.cap) {
                out_u[1u + slot] = i;
                out_f[slot] = v;
            }
        }
    }
    workgroupBarrier();
    if (lid.x == 0u) {
        out_u[0] = min(atomicLoad(&wg_count), p.cap);
    }
}
