// Decode mat-vec: y[row_offset + r] (+)= sum_k W[r, k] * x[k] (+ bias[r]).
// Two layouts of threads, one per kind of device:
// - `main`, RPT rows per thread (CPU adapters): x is bound as a uniform buffer when it fits
//   (the host picks the declaration). On CPU Vulkan (lavapipe) a uniform read is a gather
//   and a storage read a loop over the SIMD lanes, so each x chunk a thread loads serves
//   RPT rows.
// - `split`, TPR threads per row (GPUs): neighbouring threads read neighbouring 32-element
//   chunks of one row, so loads coalesce; with one thread per row they are a row apart and
//   an H100 reached 130-290 GB/s of 3000.
// `split` may also fold the op before it into its reads of x (matmul_common.wgsl's
// X_INPUT): the RMSNorm of the residual stream, or the SwiGLU of gate and up.
// The per-type `load_chunk`/`chunk_scale`/`chunk_q` and `chunk_dot` (chunk_dot.wgsl) are
// prepended by the host.

// Params and bindings: matmul_common.wgsl, prepended by the host.

const TPR: u32 = {{TPR}}u;

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

// Rows per thread of `main`.
const RPT: u32 = {{RPT}}u;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r0 = gid.x * RPT;
    if (r0 >= p.n_rows) {
        return;
    }
    let n_chunks = p.k / 32u;
    let row_words = (n_chunks / CHUNKS_PER_BLOCK) * BLOCK_WORDS;
    // The last thread repeats the last row rather than read past the shard.
    let last = p.n_rows - 1u;
    let x0 = {{X_ROW0}};
    var acc: array<f32, RPT>;
    for (var c = 0u; c < n_chunks; c++) {
        let xc = x_chunk(x0, c);
        for (var i = 0u; i < RPT; i++) {
            acc[i] += chunk_dot_x(min(r0 + i, last) * row_words, c, xc);
        }
    }
    for (var i = 0u; i < RPT; i++) {
        if (r0 + i < p.n_rows) {
            store(r0 + i, acc[i]);
        }
    }
}

var<workgroup> partial: array<f32, 64>;

// x_norm for the row of x at vec4 x0: 1 / rms(x) for X_INPUT 1 (each workgroup sums the
// row's squares itself: k floats, against the k * rows/64 weights it reads), else 1.
fn input_scale(lid: u32, x0: u32) -> f32 {
    if (X_INPUT != 1u) {
        return 1.0;
    }
    var ss = 0.0;
    for (var i = lid; i < p.k / 4u; i += 64u) {
        let v = x[x0 + i];
        ss += dot(v, v);
    }
    partial[lid] = ss;
    workgroupBarrier();
    for (var half = 32u; half > 0u; half /= 2u) {
        if (lid < half) {
            partial[lid] += partial[lid + half];
        }
        workgroupBarrier();
    }
    let scale = inverseSqrt(partial[0] / f32(p.k) + p.eps);
    workgroupBarrier();
    return scale;
}

@compute @workgroup_size(64)
fn split(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = wid.x * (64u / TPR) + lid / TPR;
    let lane = lid % TPR;
    let n_chunks = p.k / 32u;
    let x0 = {{X_ROW0}};
    x_base = x0;
    x_norm = input_scale(lid, x0);
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
