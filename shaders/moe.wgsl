// Expert kernels. The router wrote, per token, the ids of its experts and their weights
// (moe_route.wgsl); these kernels read them from the GPU, so routing never goes through the
// host. Experts are stacked: expert e owns rows e*m .. e*m + m of W.
// - rows: y[t, j*m + r] = W[ids[t, j] * m + r] · x[t]                  (gate and up)
// - down: y[t, r] += sum_j wts[t, j] * W[ids[t, j] * m + r] · x[t, j*k ..] (down, weighted sum)
// On GPUs, `rows_split`/`down_split` give each row TPR threads that stride over its chunks
// (coalesced loads, as the split decode mat-vec in matvec.wgsl).
// Prefill runs expert-major instead: each expert's token list (moe_route.wgsl's `group`) is
// multiplied by the expert's rows, and y[slot * m + r] is written for slot = t * n_used + j:
// the gate/up layout above, and per-slot down outputs that `combine` sums. On GPUs
// `grouped_tiled` works in 64 x 64 tiles of (rows, tokens) in workgroup memory
// (gemm_tile.wgsl). On CPU adapters `grouped_rows` gives each thread RR rows of the expert
// and walks the tokens in tiles of TB, dequantising each weight chunk once per tile, so each
// gathered x chunk serves RR rows (under lavapipe a one-chunk perplexity of the default
// carve ran 3.1x faster than with one row a thread, all 16 experts active).
// Experts live in slots: `slot_of[table_off + e]` is where expert e's rows sit in W. With
// every expert resident the table is the identity; with an expert cache (moe/cache.rs) the
// host fills it before the kernels run, and the grouped kernels skip experts marked MISSING.
// The per-type `load_chunk`/`chunk_scale`/`chunk_q` and `chunk_dot` are prepended by the host.

struct Params {
    k: u32,         // input row length (weights per row)
    m: u32,         // rows per expert
    n_used: u32,    // experts per token
    n_tokens: u32,
    x_stride: u32,  // floats per token of x
    y_stride: u32,  // floats per token of y
    down: u32,      // grouped: 1 when x rows are per slot (down), 0 per token (gate, up)
    table_off: u32, // this layer's first entry in slot_of
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read> ids: array<u32>;
@group(0) @binding(5) var<storage, read> wts: array<f32>;
@group(0) @binding(6) var<storage, read> lists: array<u32>;
@group(0) @binding(7) var<storage, read> counts: array<u32>;
@group(0) @binding(10) var<storage, read> slot_of: array<u32>;

const MISSING: u32 = 0xffffffffu;
// An expert id that adaptive gating dropped (moe_route.wgsl): no rows, no down term.
const SKIP: u32 = 0xffffffffu;

const ONES = vec4<f32>(1.0);

fn x_at(i: u32) -> vec4<f32> {
    return x[i];
}

const TPR: u32 = {{TPR}}u;

var<workgroup> partial: array<f32, 64>;

// Sums `v` over the TPR lanes of each row; lane 0 of the row gets the total.
fn reduce_row(lid: u32, v: f32) -> f32 {
    partial[lid] = v;
    workgroupBarrier();
    for (var half = TPR / 2u; half > 0u; half /= 2u) {
        if (lid % TPR < half) {
            partial[lid] += partial[lid + half];
        }
        workgroupBarrier();
    }
    return partial[lid];
}

// Lane `lane` of TPR's share of row r of expert e dotted with x from x0.
fn row_dot_lane(e: u32, r: u32, x0: u32, lane: u32) -> f32 {
    let n_chunks = p.k / 32u;
    let row_base = (e * p.m + r) * (n_chunks / CHUNKS_PER_BLOCK) * BLOCK_WORDS;
    var acc = 0.0;
    for (var c = lane; c < n_chunks; c += TPR) {
        acc += chunk_dot(row_base, c, x0);
    }
    return acc;
}

@compute @workgroup_size(64)
fn rows_split(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = wid.x * (64u / TPR) + lid / TPR;
    let t = wid.y;
    let lane = lid % TPR;
    var acc = 0.0;
    let valid = i < p.n_used * p.m;
    if (valid) {
        let id = ids[t * p.n_used + i / p.m];
        if (id != SKIP) {
            acc = row_dot_lane(slot_of[p.table_off + id], i % p.m, t * p.x_stride / 4u, lane);
        }
    }
    let total = reduce_row(lid, acc);
    if (valid && lane == 0u) {
        y[t * p.y_stride + i] = total;
    }
}

@compute @workgroup_size(64)
fn down_split(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let r = wid.x * (64u / TPR) + lid / TPR;
    let t = wid.y;
    let lane = lid % TPR;
    var acc = 0.0;
    let valid = r < p.m;
    if (valid) {
        for (var j = 0u; j < p.n_used; j++) {
            let id = ids[t * p.n_used + j];
            if (id == SKIP) {
                continue;
            }
            let e = slot_of[p.table_off + id];
            acc += wts[t * p.n_used + j] * row_dot_lane(e, r, (t * p.x_stride + j * p.k) / 4u, lane);
        }
    }
    let total = reduce_row(lid, acc);
    if (valid && lane == 0u) {
        y[t * p.y_stride + r] += total;
    }
}

// Rows per thread of `rows` and `down` (CPU adapters): each x chunk they load (a gather
// there) serves RPT rows of one expert, as in matvec.wgsl's `main`.
const RPT: u32 = {{RPT}}u;

// acc[i] += row (r0 + i, clamped to the expert) of expert slot e · x from x0, times scale.
fn rows_dot(e: u32, r0: u32, x0: u32, scale: f32, acc: ptr<function, array<f32, RPT>>) {
    let n_chunks = p.k / 32u;
    let row_words = (n_chunks / CHUNKS_PER_BLOCK) * BLOCK_WORDS;
    let last = p.m - 1u;
    for (var c = 0u; c < n_chunks; c++) {
        let xc = x_chunk(x0, c);
        for (var i = 0u; i < RPT; i++) {
            (*acc)[i] += scale * chunk_dot_x((e * p.m + min(r0 + i, last)) * row_words, c, xc);
        }
    }
}

// Thread (j, g) computes rows g*RPT .. of token t's j-th expert.
@compute @workgroup_size(64)
fn rows(@builtin(global_invocation_id) gid: vec3<u32>) {
    let groups = (p.m + RPT - 1u) / RPT;
    let j = gid.x / groups;
    let r0 = (gid.x % groups) * RPT;
    let t = gid.y;
    if (j >= p.n_used || t >= p.n_tokens) {
        return;
    }
    var acc: array<f32, RPT>;
    let id = ids[t * p.n_used + j];
    if (id != SKIP) {
        rows_dot(slot_of[p.table_off + id], r0, t * p.x_stride / 4u, 1.0, &acc);
    }
    for (var i = 0u; i < RPT; i++) {
        if (r0 + i < p.m) {
            y[t * p.y_stride + j * p.m + r0 + i] = acc[i];
        }
    }
}

@compute @workgroup_size(64)
fn down(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r0 = gid.x * RPT;
    let t = gid.y;
    if (r0 >= p.m || t >= p.n_tokens) {
        return;
    }
    var acc: array<f32, RPT>;
    for (var j = 0u; j < p.n_used; j++) {
        let id = ids[t * p.n_used + j];
        if (id == SKIP) {
            continue;
        }
        let x0 = (t * p.x_stride + j * p.k) / 4u;
        rows_dot(slot_of[p.table_off + id], r0, x0, wts[t * p.n_used + j], &acc);
    }
    for (var i = 0u; i < RPT; i++) {
        if (r0 + i < p.m) {
            y[t * p.y_stride + r0 + i] += acc[i];
        }
    }
}

// GPUs: one workgroup per (64 rows of expert e, 64 of its tokens), from gemm_tile.wgsl. The
// grid covers n_tokens tokens per expert, the most any expert can have; workgroups past an
// expert's count, and experts not in a slot, return at once.
var<private> tile_slot: u32;  // where expert e's rows sit in W
var<private> tile_list: u32;  // expert e's first entry in `lists`

fn tile_w_base(r: u32) -> u32 {
    return (tile_slot * p.m + r) * (p.k / 32u / CHUNKS_PER_BLOCK) * BLOCK_WORDS;
}

fn tile_x_base(t: u32) -> u32 {
    return grouped_x_row(lists[tile_list + t]);
}

@compute @workgroup_size(256)
fn grouped_tiled(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let e = wid.z;
    let row0 = wid.x * BM;
    let tok0 = wid.y * BN;
    let s = slot_of[p.table_off + e];
    let count = counts[e];
    if (s == MISSING || tok0 >= count) {
        return;
    }
    tile_slot = s;
    tile_list = e * p.n_tokens;
    let n_rows = min(BM, p.m - row0);
    let n_tok = min(BN, count - tok0);
    let acc = gemm_tile(lid, p.k, row0, n_rows, tok0, n_tok);
    let tr = lid % 16u;
    let tc = lid / 16u;
    for (var j = 0u; j < 4u; j++) {
        let t = tc + 16u * j;
        if (t >= n_tok) {
            break;
        }
        let o = lists[tile_list + tok0 + t] * p.m + row0;
        for (var i = 0u; i < 4u; i++) {
            let r = tr + 16u * i;
            if (r < n_rows) {
                y[o + r] = acc[i][j];
            }
        }
    }
}

// Where expert-list slot `slot` reads its x row: the token (gate, up) or the slot (down).
fn grouped_x_row(slot: u32) -> u32 {
    return select(slot / p.n_used, slot, p.down == 1u) * p.k / 4u;
}

// CPU adapters: RR = 4 rows a thread and tiles of TB tokens, as matmul.wgsl's `main`: the
// rows and their accumulators are named variables, because llvmpipe turns a private array
// indexed by a loop variable into per-lane memory operations.
const TB: u32 = 8u;

@compute @workgroup_size(64)
fn grouped_rows(@builtin(global_invocation_id) gid: vec3<u32>) {
    let r0 = gid.x * 4u;
    let e = gid.y;
    let s = slot_of[p.table_off + e];
    if (r0 >= p.m || s == MISSING) {
        return;
    }
    let count = counts[e];
    let n_chunks = p.k / 32u;
    let row_words = (n_chunks / CHUNKS_PER_BLOCK) * BLOCK_WORDS;
    // Rows past the expert re-read its last row; they are never stored.
    let last = p.m - 1u;
    let b0 = (s * p.m + r0) * row_words;
    let b1 = (s * p.m + min(r0 + 1u, last)) * row_words;
    let b2 = (s * p.m + min(r0 + 2u, last)) * row_words;
    let b3 = (s * p.m + min(r0 + 3u, last)) * row_words;
    let list = e * p.n_tokens;
    for (var i0 = 0u; i0 < count; i0 += TB) {
        let nt = min(TB, count - i0);
        var acc0: array<f32, TB>;
        var acc1: array<f32, TB>;
        var acc2: array<f32, TB>;
        var acc3: array<f32, TB>;
        for (var c = 0u; c < n_chunks; c++) {
            let w0 = weight_chunk(b0, c);
            let w1 = weight_chunk(b1, c);
            let w2 = weight_chunk(b2, c);
            let w3 = weight_chunk(b3, c);
            for (var tt = 0u; tt < nt; tt++) {
                let xc = x_chunk(grouped_x_row(lists[list + i0 + tt]), c);
                acc0[tt] += weight_dot(w0, xc);
                acc1[tt] += weight_dot(w1, xc);
                acc2[tt] += weight_dot(w2, xc);
                acc3[tt] += weight_dot(w3, xc);
            }
        }
        for (var tt = 0u; tt < nt; tt++) {
            let o = lists[list + i0 + tt] * p.m + r0;
            y[o] = acc0[tt];
            if (r0 + 1u < p.m) {
                y[o + 1u] = acc1[tt];
            }
            if (r0 + 2u < p.m) {
                y[o + 2u] = acc2[tt];
            }
            if (r0 + 3u < p.m) {
                y[o + 3u] = acc3[tt];
            }
        }
    }
}
