// Router top-k: per token, probabilities over the routed experts, then the n_used experts of
// largest probability + bias (the bias balances load and affects selection only). The fixed
// top-k keeps the first n_base of them (n_used > n_base leaves adaptive gating room to add).
// score_mode 0 (CMoE, training-free): score_e = |u_e * silu(g_e)|, softmax over e.
// score_mode 1 (native MoE): g holds the router logits, softmax over e.
// weights_mode 0: every weight 1 (CMoE: all experts active == the dense FFN);
// 1: selected probabilities renormalised to sum 1; 2: raw probabilities.
// Adaptive gating (AdapMoE): after the top-k, expert j > 0 is dropped (id SKIP, weight 0)
// once the experts before it hold at least `keep[layer]` of the chosen experts' mass (their
// probabilities; for carved models, whose experts all weigh 1, their raw scores); keep > 1
// keeps all (fixed top-k). With flags & 2 (the norm signal, least-squares carved routers,
// whose scores predict each expert's output norm) each expert after the top-1 is judged on
// its own: dropped once 1 - its score / |x| reaches `keep` (x the residual stream), so
// dropping it moves the stream little; the experts past n_base are kept where it does not
// (a token the router is unsure of gets more than the fixed top-k).
// `conf` gets each token's confidence (the top-1 share, or that norm signal), and
// with flags & 1 `n_active` counts [kept experts, routed tokens] for the run's metrics.
// For prefill, `group` lists each expert's (token, slot) pairs so the grouped expert kernels
// (moe.wgsl) read each expert's weights once per tile of tokens, and `combine` adds each
// token's weighted expert outputs to the residual.

const MAX_EXPERTS: u32 = 128u;

struct Params {
    n_expert: u32,
    n_used: u32,
    n_tokens: u32,
    score_mode: u32,
    weights_mode: u32,
    d_model: u32,
    layer: u32,
    flags: u32,
    n_base: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> g: array<f32>;
@group(0) @binding(2) var<storage, read> u: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> ids: array<u32>;
@group(0) @binding(5) var<storage, read_write> wts: array<f32>;
@group(0) @binding(6) var<storage, read_write> lists: array<u32>;  // [n_expert, n_tokens] slots
@group(0) @binding(7) var<storage, read_write> counts: array<u32>; // [n_expert]
@group(0) @binding(8) var<storage, read> parts: array<f32>;        // [n_tokens * n_used, d_model]
@group(0) @binding(9) var<storage, read_write> xout: array<f32>;   // [n_tokens, d_model]
@group(0) @binding(10) var<storage, read> keep: array<f32>;        // [n_layer]
@group(0) @binding(11) var<storage, read_write> n_active: array<atomic<u32>, 2>;
@group(0) @binding(12) var<storage, read_write> conf: array<f32>;  // [n_tokens]
@group(0) @binding(13) var<storage, read> xres: array<f32>;        // [n_tokens, d_model]

const SKIP: u32 = 0xffffffffu;

var<workgroup> prob: array<f32, MAX_EXPERTS>;
var<workgroup> key: array<f32, MAX_EXPERTS>;
var<workgroup> score: array<f32, MAX_EXPERTS>;
var<workgroup> red_v: array<f32, 64>;
var<workgroup> red_i: array<u32, 64>;

// Tree reductions over the workgroup's 64 lanes (lane 0's slot holds the result).
fn reduce_max(lid: u32, v: f32) -> f32 {
    red_v[lid] = v;
    workgroupBarrier();
    for (var h = 32u; h > 0u; h /= 2u) {
        if (lid < h) {
            red_v[lid] = max(red_v[lid], red_v[lid + h]);
        }
        workgroupBarrier();
    }
    let r = red_v[0];
    workgroupBarrier();
    return r;
}

fn reduce_sum(lid: u32, v: f32) -> f32 {
    red_v[lid] = v;
    workgroupBarrier();
    for (var h = 32u; h > 0u; h /= 2u) {
        if (lid < h) {
            red_v[lid] += red_v[lid + h];
        }
        workgroupBarrier();
    }
    let r = red_v[0];
    workgroupBarrier();
    return r;
}

// The largest key and its expert; ties go to the lower id (as a serial scan would).
fn reduce_argmax(lid: u32, v: f32, i: u32) -> u32 {
    red_v[lid] = v;
    red_i[lid] = i;
    workgroupBarrier();
    for (var h = 32u; h > 0u; h /= 2u) {
        if (lid < h) {
            let ov = red_v[lid + h];
            let oi = red_i[lid + h];
            if (ov > red_v[lid] || (ov == red_v[lid] && oi < red_i[lid])) {
                red_v[lid] = ov;
                red_i[lid] = oi;
            }
        }
        workgroupBarrier();
    }
    let r = red_i[0];
    workgroupBarrier();
    return r;
}

const TAKEN: f32 = -3.4e38;

// One workgroup per token, one lane per expert (strided): a single thread per token with
// private arrays was 85 ms a layer on lavapipe.
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = wid.x;
    let n = p.n_expert;
    var local_max = -3.0e38;
    for (var e = lid; e < n; e += 64u) {
        var s = g[t * n + e];
        if (p.score_mode == 0u) {
            s = abs(u[t * n + e] * s / (1.0 + exp(-s)));
        }
        prob[e] = s;
        score[e] = max(s, 0.0);
        local_max = max(local_max, s);
    }
    let mx = reduce_max(lid, local_max);
    var local_sum = 0.0;
    for (var e = lid; e < n; e += 64u) {
        prob[e] = exp(prob[e] - mx);
        local_sum += prob[e];
    }
    let sum = reduce_sum(lid, local_sum);
    for (var e = lid; e < n; e += 64u) {
        key[e] = prob[e] / sum + bias[e];
    }
    workgroupBarrier();
    var picked_sum = 0.0;
    for (var j = 0u; j < p.n_used; j++) {
        var best_v = TAKEN;
        var best = 0u;
        for (var e = lid; e < n; e += 64u) {
            if (key[e] > best_v) {
                best_v = key[e];
                best = e;
            }
        }
        let b = reduce_argmax(lid, best_v, best);
        if (lid == 0u) {
            ids[t * p.n_used + j] = b;
            wts[t * p.n_used + j] = prob[b] / sum;
            picked_sum += prob[b] / sum;
            key[b] = TAKEN;
        }
        workgroupBarrier();
    }
    // The norm signal (flags & 2) compares the experts after the top-1 with the residual
    // stream: its norm, reduced over the workgroup.
    let norm_signal = (p.flags & 2u) != 0u;
    var local_ss = 0.0;
    if (norm_signal) {
        for (var i = lid; i < p.d_model; i += 64u) {
            let v = xres[t * p.d_model + i];
            local_ss += v * v;
        }
    }
    let xnorm = sqrt(reduce_sum(lid, local_ss));
    if (lid == 0u) {
        // The mass adaptive gating measures: the probabilities, or for a carved model
        // (every expert weighted 1) the raw scores, which estimate each expert's output
        // size (CMoE's |u·silu(g)|, the least-squares router's predicted norm).
        var total = 0.0;
        for (var j = 0u; j < p.n_base; j++) {
            total += mass_of(t * p.n_used + j);
        }
        let adaptive = keep[p.layer] <= 1.0;
        let enough = keep[p.layer] * total;
        var cum = 0.0;
        var kept = 0u;
        var kept_sum = 0.0;
        let top1 = mass_of(t * p.n_used);
        // The token's confidence: its top-1 share of the mass, or with the norm signal
        // one less how far the fixed top-k's experts after the top-1 would move the
        // residual (the sum of their scores, a least-squares router's predicted output
        // norms, over |x|), which adaptive gating's profile measures.
        var c = select(1.0, top1 / total, total > 0.0);
        if (norm_signal) {
            c = 1.0 - min(1.0, (total - top1) / max(xnorm, 1e-30));
        }
        for (var j = 0u; j < p.n_used; j++) {
            let o = t * p.n_used + j;
            let m = mass_of(o);
            // Without adaptive gating the slots past the fixed top-k hold nothing.
            var drop = j >= p.n_base;
            if (adaptive && j > 0u) {
                let c_j = 1.0 - min(1.0, m / max(xnorm, 1e-30));
                drop = select(drop || cum >= enough, c_j >= keep[p.layer], norm_signal);
            }
            if (drop) {
                ids[o] = SKIP;
                wts[o] = 0.0;
            } else {
                kept++;
                kept_sum += wts[o];
            }
            cum += m;
        }
        for (var j = 0u; j < p.n_used; j++) {
            let o = t * p.n_used + j;
            if (ids[o] == SKIP) {
                continue;
            }
            if (p.weights_mode == 0u) {
                wts[o] = 1.0;
            } else if (p.weights_mode == 1u) {
                wts[o] = wts[o] / kept_sum;
            }
        }
        conf[t] = c;
        if ((p.flags & 1u) != 0u) {
            atomicAdd(&n_active[0], kept);
            atomicAdd(&n_active[1], 1u);
        }
    }
}

// Slot o's share in adaptive gating (before the weights are rewritten).
fn mass_of(o: u32) -> f32 {
    if (p.weights_mode == 0u) {
        return score[ids[o]];
    }
    return wts[o];
}

// Slot t * n_used + j (token t's j-th expert) goes to the list of expert ids[slot], in
// token order.
@compute @workgroup_size(64)
fn group(@builtin(global_invocation_id) gid: vec3<u32>) {
    let e = gid.x;
    if (e >= p.n_expert) {
        return;
    }
    var c = 0u;
    for (var slot = 0u; slot < p.n_tokens * p.n_used; slot++) {
        if (ids[slot] == e) {
            lists[e * p.n_tokens + c] = slot;
            c++;
        }
    }
    counts[e] = c;
}

// x[t] += sum_j wts[t, j] * parts[t * n_used + j].
@compute @workgroup_size(64)
fn combine(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.x;
    let t = gid.y;
    if (r >= p.d_model || t >= p.n_tokens) {
        return;
    }
    var s = 0.0;
    for (var j = 0u; j < p.n_used; j++) {
        let slot = t * p.n_used + j;
        // A skipped expert's part was never written (adaptive gating).
        if (wts[slot] != 0.0) {
            s += wts[slot] * parts[slot * p.d_model + r];
        }
    }
    xout[t * p.d_model + r] += s;
}
