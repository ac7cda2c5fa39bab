// Causal attention over the KV cache, for decode (1 token) and prefill (many), with GQA:
// query head h reads kv head h / (n_head / n_kv_head). One thread per (token, head) runs an
// online softmax over positions 0..=pos, so no score matrix is ever stored.

const HD4: u32 = {{HD4}}u;  // head_dim / 4

struct Params {
    n_head: u32,
    n_kv_head: u32,
    head_dim: u32,
    ctx: u32,
    n_tokens: u32,
    scale: f32,
    _pad0: u32,
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

@compute @workgroup_size(32)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
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
