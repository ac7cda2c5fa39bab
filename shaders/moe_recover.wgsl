// A carve's recovery fit estimates what the experts a token skips would add, for tokens
// that run the carved number of experts. A token that runs k others (adaptive gating
// dropped or added some, or --experts-per-token) adds the carve's correction for k, a
// low-rank map of the FFN input: x[t] += U_k · (V_k · xn[t]) + b_k. k is counted from the
// token's expert ids (SKIP marks a dropped slot); counts without a correction (bit k of
// `mask` clear, the fitted count among them) add nothing. The corrections are stacked in
// the order of their counts, so count k's block is the number of mask bits below k.

const SKIP: u32 = 0xffffffffu;
const MAX_RANK: u32 = 256u;

struct Params {
    n_slots: u32,
    n_tokens: u32,
    d_model: u32,
    rank: u32,
    mask: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;         // [n_tokens, n_slots]
@group(0) @binding(2) var<storage, read> xn: array<f32>;          // [n_tokens, d_model]
@group(0) @binding(3) var<storage, read> v_in: array<f32>;        // [blocks][rank][d_model]
@group(0) @binding(4) var<storage, read> u_out: array<f32>;       // [blocks][d_model][rank]
@group(0) @binding(5) var<storage, read> bias: array<f32>;        // [blocks][d_model]
@group(0) @binding(6) var<storage, read_write> x: array<f32>;     // [n_tokens, d_model]

var<workgroup> z: array<f32, MAX_RANK>;
var<workgroup> kept: u32;

// One workgroup per token.
@compute @workgroup_size(64)
fn recover_count(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let t = wg.x;
    let lid = lid3.x;
    if (lid == 0u) {
        var k = 0u;
        for (var j = 0u; j < p.n_slots; j++) {
            if (ids[t * p.n_slots + j] != SKIP) {
                k++;
            }
        }
        kept = k;
    }
    let k = workgroupUniformLoad(&kept);
    if (k == 0u || k >= 32u || (p.mask & (1u << k)) == 0u) {
        return;
    }
    let block = countOneBits(p.mask & ((1u << k) - 1u));
    let xr = t * p.d_model;
    for (var r = lid; r < p.rank; r += 64u) {
        let row = (block * p.rank + r) * p.d_model;
        var s = 0.0;
        for (var i = 0u; i < p.d_model; i++) {
            s += v_in[row + i] * xn[xr + i];
        }
        z[r] = s;
    }
    workgroupBarrier();
    for (var i = lid; i < p.d_model; i += 64u) {
        let row = (block * p.d_model + i) * p.rank;
        var s = bias[block * p.d_model + i];
        for (var r = 0u; r < p.rank; r++) {
            s += u_out[row + r] * z[r];
        }
        x[xr + i] += s;
    }
}
