// RoPE on q and k, then k and v stored into this layer's KV cache at their positions.
// Position of token t is step.pos0 + t. mode 0: normal (pairs 2i, 2i+1, Llama);
// mode 2: neox (pairs i, i + d/2, Qwen2). One thread per (token, head, pair).
// Caches are laid out [kv_head][ctx][head_dim] so attention reads keys contiguously.

struct Params {
    n_head: u32,
    n_kv_head: u32,
    head_dim: u32,
    mode: u32,
    freq_base: f32,
    ctx: u32,
    n_tokens: u32,
    _pad: u32,
}
struct Step {
    pos0: u32,
    n_tokens: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<uniform> step: Step;
@group(0) @binding(2) var<storage, read_write> q: array<f32>;
@group(0) @binding(3) var<storage, read> k: array<f32>;
@group(0) @binding(4) var<storage, read> v: array<f32>;
@group(0) @binding(5) var<storage, read_write> kc: array<f32>;
@group(0) @binding(6) var<storage, read_write> vc: array<f32>;

fn rotate(a: f32, b: f32, pos: u32, i: u32) -> vec2<f32> {
    let theta = f32(pos) * pow(p.freq_base, -2.0 * f32(i) / f32(p.head_dim));
    let cs = cos(theta);
    let sn = sin(theta);
    return vec2<f32>(a * cs - b * sn, a * sn + b * cs);
}

// Element indices of pair i within a head.
fn pair(i: u32) -> vec2<u32> {
    if (p.mode == 2u) {
        return vec2<u32>(i, i + p.head_dim / 2u);
    }
    return vec2<u32>(2u * i, 2u * i + 1u);
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let half = p.head_dim / 2u;
    let i = gid.x % half;
    let h = gid.x / half;
    let t = gid.y;
    if (h >= p.n_head + p.n_kv_head || t >= p.n_tokens) {
        return;
    }
    let pos = step.pos0 + t;
    let e = pair(i);
    if (h < p.n_head) {
        let o = (t * p.n_head + h) * p.head_dim;
        let r = rotate(q[o + e.x], q[o + e.y], pos, i);
        q[o + e.x] = r.x;
        q[o + e.y] = r.y;
    } else {
        let kh = h - p.n_head;
        let o = (t * p.n_kv_head + kh) * p.head_dim;
        let r = rotate(k[o + e.x], k[o + e.y], pos, i);
        let c = (kh * p.ctx + pos) * p.head_dim;
        kc[c + e.x] = r.x;
        kc[c + e.y] = r.y;
        vc[c + e.x] = v[o + e.x];
        vc[c + e.y] = v[o + e.y];
    }
}
