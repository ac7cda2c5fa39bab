// Embedding row fetch: y[t, :] = dequant(W[ids[t], :]) for the ids that fall in this shard
// of the table (rows row_offset .. row_offset + n_rows). One thread per (token, chunk).

struct Params {
    k: u32,           // row length
    n_rows: u32,      // rows in this shard
    row_offset: u32,  // first row id of this shard
    n_tokens: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> y: array<vec4<f32>>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let n_chunks = p.k / 32u;
    let c = gid.x;
    let t = gid.y;
    if (c >= n_chunks || t >= p.n_tokens) {
        return;
    }
    let id = ids[t];
    if (id < p.row_offset || id >= p.row_offset + p.n_rows) {
        return;
    }
    let r = id - p.row_offset;
    let row_base = r * (n_chunks / CHUNKS_PER_BLOCK) * BLOCK_WORDS;
    let blk = row_base + (c / CHUNKS_PER_BLOCK) * BLOCK_WORDS;
    let o = (t * p.k + c * 32u) / 4u;
    let ch = load_chunk(blk, c % CHUNKS_PER_BLOCK);
    for (var i = 0u; i < 8u; i++) {
        y[o + i] = dequant4(ch, i);
    }
}
