// Causal attention over the KV cache, with GQA: query head h reads kv head
// h / (n_head / n_kv_head). Every variant keeps an online softmax (running max and sum), so
// no score matrix is ever stored. One variant per kind of step and device:
// - `flash` (GPU prefill): a workgroup per (head, 64 queries) stages blocks of keys and
//   values in workgroup memory for all its queries.
// - `split_keys` + `combine` (GPU decode): a workgroup per (head, span of keys) walks its
//   span in chunks of WG keys, each thread scoring one key of the chunk and accumulating one
//   vec4 of the output over a subset of the chunk's values; `combine` merges the spans.
// - `serial` (CPU adapters, prefill and decode): one thread per (head, token). On lavapipe
//   the workgroup's redundant chunk scans cost more than the parallelism gains (8.8 vs 32
//   ms/token, decode).

const HD4: u32 = {{HD4}}u;  // head_dim / 4, at most WG
const WG: u32 = 64u;
const R: u32 = WG / HD4;    // key subsets accumulated in parallel per output vec4

struct Params {
    n_head: u32,
    n_kv_head: u32,
    head_dim: u32,
    ctx: u32,
    n_tokens: u32,
    scale: f32,
    n_spans: u32,   // split_keys / combine: key spans per head
    _pad1: u32,
}
struct Step {
    pos0: u32,
    n_tokens: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> kc: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> vc: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> out: array<vec4<f32>>;

var<workgroup> score: array<f32, WG>;
var<workgroup> weight: array<f32, WG>;
var<workgroup> partial: array<vec4<f32>, WG>;

// What one workgroup's walk over keys first..=last leaves: the running max and sum of the
// online softmax, and this thread's share of the output (summed over R subsets later).
struct Walk {
    m: f32,
    l: f32,
    acc: vec4<f32>,
}

fn walk_keys(lid: u32, qv: ptr<function, array<vec4<f32>, HD4>>, base: u32, first: u32, last: u32) -> Walk {
    let d = lid % HD4;      // the output vec4 this thread accumulates
    let r = lid / HD4;      // its key subset (threads with r >= R only score)
    var w = Walk(-3.0e38, 0.0, vec4<f32>(0.0));
    for (var c0 = first; c0 <= last; c0 += WG) {
        let j = c0 + lid;
        var s = -3.0e38;
        if (j <= last) {
            s = 0.0;
            let ko = base + j * HD4;
            for (var i = 0u; i < HD4; i++) {
                s += dot((*qv)[i], kc[ko + i]);
            }
        }
        score[lid] = s;
        workgroupBarrier();
        var cm = w.m;
        for (var k = 0u; k < WG; k++) {
            cm = max(cm, score[k]);
        }
        let corr = exp(w.m - cm);
        w.m = cm;
        // Key c0 is always valid, so cm is a real score and invalid keys get weight 0.
        weight[lid] = exp(s - cm);
        workgroupBarrier();
        var sum = 0.0;
        for (var k = 0u; k < WG; k++) {
            sum += weight[k];
        }
        w.l = w.l * corr + sum;
        w.acc *= corr;
        if (r < R) {
            let n = min(WG, last + 1u - c0);
            for (var k = r; k < n; k += R) {
                w.acc += weight[k] * vc[base + (c0 + k) * HD4 + d];
            }
        }
    }
    return w;
}

// Sums the R key subsets' shares: thread lid < HD4 gets output vec4 lid.
fn gather_subsets(lid: u32, acc: vec4<f32>) -> vec4<f32> {
    partial[lid] = acc;
    workgroupBarrier();
    var total = vec4<f32>(0.0);
    if (lid < HD4) {
        for (var k = 0u; k < R; k++) {
            total += partial[k * HD4 + lid];
        }
    }
    return total;
}

fn load_q(qo: u32) -> array<vec4<f32>, HD4> {
    var qv: array<vec4<f32>, HD4>;
    for (var i = 0u; i < HD4; i++) {
        qv[i] = q[qo + i] * p.scale;
    }
    return qv;
}

// Prefill on GPUs (flash attention): one workgroup per (head, FQ queries), a query a
// thread. The workgroup stages BKV keys and values at a time in workgroup memory with
// coalesced loads, and every query of the block reads them from there, so K and V are read
// from memory once per FQ queries instead of once per query. Each thread keeps its own
// online softmax (running max, sum and output), so no score matrix is ever stored.
const FQ: u32 = 64u;
const BKV: u32 = {{BKV}}u;  // keys a stage: the K and V tiles fill at most 16 KiB

var<workgroup> k_tile: array<vec4<f32>, BKV * HD4>;
var<workgroup> v_tile: array<vec4<f32>, BKV * HD4>;

@compute @workgroup_size(64)
fn flash(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wid.x;
    let t0 = wid.y * FQ;
    let base = (h / (p.n_head / p.n_kv_head)) * p.ctx * HD4;
    // Threads past the last token run the last one's query and store nothing.
    let t = min(t0 + lid, p.n_tokens - 1u);
    let pos = step.pos0 + t;
    // The last key any query of this workgroup sees.
    let last = step.pos0 + min(t0 + FQ, p.n_tokens) - 1u;
    let qo = (t * p.n_head + h) * HD4;
    var qv = load_q(qo);
    var acc: array<vec4<f32>, HD4>;
    var m = -3.0e38;
    var l = 0.0;
    for (var j0 = 0u; j0 <= last; j0 += BKV) {
        for (var i = lid; i < BKV * HD4; i += WG) {
            let o = base + min(j0 + i / HD4, last) * HD4 + i % HD4;
            k_tile[i] = kc[o];
            v_tile[i] = vc[o];
        }
        workgroupBarrier();
        // Keys j0 .. j0 + n of the stage are at or before this query's position.
        let n = select(0u, min(BKV, pos + 1u - j0), pos >= j0);
        for (var jj = 0u; jj < n; jj++) {
            var s = 0.0;
            for (var i = 0u; i < HD4; i++) {
                s += dot(qv[i], k_tile[jj * HD4 + i]);
            }
            if (s > m) {
                let corr = exp(m - s);
                l *= corr;
                for (var i = 0u; i < HD4; i++) {
                    acc[i] *= corr;
                }
                m = s;
            }
            let e = exp(s - m);
            l += e;
            for (var i = 0u; i < HD4; i++) {
                acc[i] += e * v_tile[jj * HD4 + i];
            }
        }
        workgroupBarrier();
    }
    if (t0 + lid < p.n_tokens) {
        for (var i = 0u; i < HD4; i++) {
            out[qo + i] = acc[i] / l;
        }
    }
}

// Decode on GPUs (flash-decoding): one head's keys are split into spans of SPAN, one
// workgroup each, so a single token keeps n_head * n_spans workgroups busy instead of
// n_head. Each span writes its (max, sum, output share) to `spans`; `combine` merges them.
const SPAN: u32 = 256u;

@group(0) @binding(6) var<storage, read_write> spans: array<vec4<f32>>;

@compute @workgroup_size(64)
fn split_keys(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wid.x;
    let sp = wid.y;
    let n_spans = p.n_spans;
    let kvh = h / (p.n_head / p.n_kv_head);
    let pos = step.pos0;
    let first = sp * SPAN;
    let o = (h * n_spans + sp) * (HD4 + 1u);
    if (first > pos) {
        // Past the last position: an empty span.
        if (lid <= HD4) {
            spans[o + lid] = select(vec4<f32>(0.0), vec4<f32>(-3.0e38, 0.0, 0.0, 0.0), lid == HD4);
        }
        return;
    }
    var qv = load_q(h * HD4);
    let w = walk_keys(lid, &qv, kvh * p.ctx * HD4, first, min(first + SPAN - 1u, pos));
    let total = gather_subsets(lid, w.acc);
    if (lid < HD4) {
        spans[o + lid] = total;
    }
    if (lid == 0u) {
        spans[o + HD4] = vec4<f32>(w.m, w.l, 0.0, 0.0);
    }
}

@compute @workgroup_size(64)
fn combine(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let h = wid.x;
    if (lid >= HD4) {
        return;
    }
    let n_spans = p.n_spans;
    var mx = -3.0e38;
    for (var sp = 0u; sp < n_spans; sp++) {
        mx = max(mx, spans[(h * n_spans + sp) * (HD4 + 1u) + HD4].x);
    }
    var acc = vec4<f32>(0.0);
    var l = 0.0;
    for (var sp = 0u; sp < n_spans; sp++) {
        let o = (h * n_spans + sp) * (HD4 + 1u);
        let ml = spans[o + HD4];
        let f = exp(ml.x - mx);
        acc += f * spans[o + lid];
        l += f * ml.y;
    }
    out[h * HD4 + lid] = acc / l;
}

@compute @workgroup_size(32)
fn serial(@builtin(global_invocation_id) gid: vec3<u32>) {
    let h = gid.x;
    let t = gid.y;
    if (h >= p.n_head || t >= p.n_tokens) {
        return;
    }
    let kvh = h / (p.n_head / p.n_kv_head);
    let pos = step.pos0 + t;
    let qo = (t * p.n_head + h) * HD4;
    var qv: array<vec4<f32>, HD4>;
    for (var i = 0u; i < HD4; i++) {
        qv[i] = q[qo + i] * p.scale;
    }
    var acc: array<vec4<f32>, HD4>;
    var m = -3.0e38;
    var l = 0.0;
    let base = kvh * p.ctx * HD4;
    for (var j = 0u; j <= pos; j++) {
        let ko = base + j * HD4;
        var s = 0.0;
        for (var i = 0u; i < HD4; i++) {
            s += dot(qv[i], kc[ko + i]);
        }
        let m_new = max(m, s);
        let corr = exp(m - m_new);
        let e = exp(s - m_new);
        l = l * corr + e;
        for (var i = 0u; i < HD4; i++) {
            acc[i] = acc[i] * corr + e * vc[ko + i];
        }
        m = m_new;
    }
    let inv = 1.0 / l;
    for (var i = 0u; i < HD4; i++) {
        out[qo + i] = acc[i] * inv;
    }
}
