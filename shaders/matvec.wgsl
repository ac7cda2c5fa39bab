// Decode mat-vec: y[row_offset + r] (+)= sum_k W[r, k] * x[k] (+ bias[r]).
// Two layouts of threads, one per kind of device:
// - `main`, one thread per row (CPU adapters): x is bound as a uniform buffer when it fits
//   (the host picks the declaration): every thread reads the same x, and drivers serve
//   uniform reads from one scalar load where storage reads cost a gather per thread on CPU
//   Vulkan (lavapipe).
// - `split`, TPR threads per row (GPUs): neighbouring threads read neighbouring 32-element
//   chunks of one row, so loads coalesce; with one thread per row they are a row apart and
//   an H100 reached 130-290 GB/s of 3000.
// The per-type `chunk_scale`/`chunk_q` are prepended by the host.

// Params and bindings: matmul_common.wgsl, prepended by the host.

const TPR: u32 = {{TPR}}u;

// The dot product of chunk c (32 weights) of the row starting at row_base with x.
fn chunk_dot(row_base: u32, c: u32, x0: u32) -> f32 {
    let blk = row_base + (c / CHUNKS_PER_BLOCK) * BLOCK_WORDS;
    let cc = c % CHUNKS_PER_BLOCK;
    let s = chunk_scale(blk, cc);
    let xb = x0 + c * 8u;
    let xa = x[xb];
    let xb1 = x[xb + 1u];
    let xc = x[xb + 2u];
    let xd = x[xb + 3u];
    let xe = x[xb + 4u];
    let xf = x[xb + 5u];
    let xg = x[xb + 6u];
    let xh = x[xb + 7u];
    let d0 = dot(chunk_q(blk, cc, 0u), xa) + dot(chunk_q(blk, cc, 1u), xb1)
           + dot(chunk_q(blk, cc, 2u), xc) + dot(chunk_q(blk, cc, 3u), xd);
    let d1 = dot(chunk_q(blk, cc, 4u), xe) + dot(chunk_q(blk, cc, 5u), xf)
           + dot(chunk_q(blk, cc, 6u), xg) + dot(chunk_q(blk, cc, 7u), xh);
    let sx0 = dot(xa + xb1 + xc + xd, ONES);
    let sx1 = dot(xe + xf + xg + xh, ONES);
    return s.x * d0 + s.y * sx0 + s.z * d1 + s.w * sx1;
}

fn store(r: u32, acc_in: f32) {
    var acc = acc_in;
    if ((p.flags & 1u) != 0u) {
        acc += bias[p.row_offset + r];
    }
    let o = p.y_row0 * p.y_stride + p.row_offset + r;
    if ((p.flags & 2u) != 0u) {
        y[o] += acc;
    } else {
        y[o] = acc;
    }
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r = gid.x;
    if (r >= p.n_rows) {
        return;
    }
    let n_chunks = p.k / 32u;
    let row_base = r * (n_chunks / CHUNKS_PER_BLOCK) * BLOCK_WORDS;
    let x0 = {{X_ROW0}};
    var acc = 0.0;
    for (var c = 0u; c < n_chunks; c++) {
        acc += chunk_dot(row_base, c, x0);
    }
    store(r, acc);
}

var<workgroup> partial: array<f32, 64>;

@compute @workgroup_size(64)
fn split(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = wid.x * (64u / TPR) + lid / TPR;
    let lane = lid % TPR;
    let n_chunks = p.k / 32u;
    let x0 = {{X_ROW0}};
    var acc = 0.0;
    if (r < p.n_rows) {
        let row_base = r * (n_chunks / CHUNKS_PER_BLOCK) * BLOCK_WORDS;
        for (var c = lane; c < n_chunks; c += TPR) {
            acc += chunk_dot(row_base, c, x0);
        }
    }
    partial[lid] = acc;
    workgroupBarrier();
    for (var half = TPR / 2u; half > 0u; half /= 2u) {
        if (lane < half) {
            partial[lid] += partial[lid + half];
        }
        workgroupBarrier();
    }
    if (lane == 0u && r < p.n_rows) {
        store(r, partial[lid]);
    }
}
