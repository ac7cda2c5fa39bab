// Element-wise ops over n floats. swiglu: a = silu(a) * b. swiglu_into: c = silu(a) * b
// (idempotent, so an expert-cache wave can rerun it). add: a = a + b.
// copy: a[off + i] = b[i] (captures activations for carving).
// copy_u32: ua[off + i] = ub[i] (records expert ids; ids must not pass through f32).
// sigmoid_scale: a[i] *= sigmoid(b[i / off]) (qwen2moe's gate on the shared expert).

struct Params {
    n: u32,
    off: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read_write> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> ua: array<u32>;
@group(0) @binding(4) var<storage, read> ub: array<u32>;
@group(0) @binding(5) var<storage, read_write> c: array<f32>;

@compute @workgroup_size(64)
fn swiglu(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * 65535u * 64u;
    if (i >= p.n) {
        return;
    }
    let g = a[i];
    a[i] = g / (1.0 + exp(-g)) * b[i];
}

@compute @workgroup_size(64)
fn swiglu_into(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * 65535u * 64u;
    if (i >= p.n) {
        return;
    }
    let g = a[i];
    c[i] = g / (1.0 + exp(-g)) * b[i];
}

@compute @workgroup_size(64)
fn add(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * 65535u * 64u;
    if (i >= p.n) {
        return;
    }
    a[i] = a[i] + b[i];
}

@compute @workgroup_size(64)
fn copy(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * 65535u * 64u;
    if (i >= p.n) {
        return;
    }
    a[p.off + i] = b[i];
}

@compute @workgroup_size(64)
fn sigmoid_scale(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * 65535u * 64u;
    if (i >= p.n) {
        return;
    }
    a[i] = a[i] / (1.0 + exp(-b[i / p.off]));
}

@compute @workgroup_size(64)
fn copy_u32(@builtin(global_invocation_id) gid: vec3<u32>) {
    let i = gid.x + gid.y * 65535u * 64u;
    if (i >= p.n) {
        return;
    }
    ua[p.off + i] = ub[i];
}
