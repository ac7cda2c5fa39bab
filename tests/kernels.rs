//! Every GPU kernel against a CPU reference on random data, with odd sizes and every quant
//! type. Runs on whatever adapter wgpu finds (lavapipe in CI).

mod common;

use common::{attend, max_abs_diff, rope, Rng};
use pregate::gpu::ops::{self, AttnShape, RopeMode, RowBuffers, Write};
use pregate::gpu::{DispatchBuilder, Gpu, GpuOptions, Kernel, Matrix, Vector};
use pregate::quant::{dequantize, quantize, DType};

fn gpu() -> Gpu {
    Gpu::new(&GpuOptions::default())
        .expect("a GPU adapter (install mesa-vulkan-drivers for lavapipe)")
}

fn upload(g: &Gpu, v: &[f32]) -> pregate::gpu::GpuBuffer {
    g.storage_init("t", bytemuck::cast_slice(v))
        .expect("upload")
}

/// A random quantized matrix and its dequantized values.
fn random_matrix(rng: &mut Rng, dtype: DType, rows: usize, cols: usize) -> (Vec<u8>, Vec<f32>) {
    let bytes = quantize(dtype, &rng.vec(rows * cols, 1.0)).expect("quantize");
    let mut w = vec![0f32; rows * cols];
    dequantize(dtype, &bytes, &mut w).expect("dequantize");
    (bytes, w)
}

#[test]
fn matmul_matches_cpu_for_every_type_and_shape() {
    let g = gpu();
    let mut rng = Rng::new(1);
    let dummy = g.storage("dummy", 16).expect("dummy");
    for dtype in DType::ALL {
        let cols_list: &[usize] = if dtype.block_len() == 256 {
            &[256, 768]
        } else {
            &[96, 256]
        };
        for &cols in cols_list {
            for (rows, tokens, shard) in [
                (67usize, 1u32, None),
                (131, 3, Some(50)),
                (37, 13, None),
                (64, 1, Some(7)),
                // GPU tiles are 64 x 64: one row and one token past a tile, and two tokens.
                (65, 65, Some(40)),
                (129, 2, None),
            ] {
                // Each kernel has a CPU-adapter and a GPU variant (decode: rows a thread or
                // threads a row; prefill: rows a thread or workgroup tiles); test both.
                for cpu_layout in [false, true] {
                    let (bytes, w) = random_matrix(&mut rng, dtype, rows, cols);
                    let m = Matrix::upload_sharded(&g, "w", dtype, rows, cols, &bytes, shard)
                        .expect("upload");
                    let x = rng.vec(tokens as usize * cols, 1.0);
                    let bias = rng.vec(rows, 1.0);
                    let y0 = rng.vec(tokens as usize * rows, 1.0);
                    // Room for a whole token tile lets the kernel bind x as a uniform; the exact
                    // size forces the storage-buffer variant. Both must agree with the CPU.
                    let mut padded = x.clone();
                    if tokens == 13 {
                        padded.resize(64 * cols, 0.0);
                    }
                    let xb = upload(&g, &padded);
                    let bb = Vector::upload(&g, "b", &bias).expect("bias");
                    let yb = upload(&g, &y0);
                    let accumulate = tokens % 2 == 1 && rows % 2 == 1;
                    let mut b = DispatchBuilder::new(&g);
                    b.cpu_layout = cpu_layout;
                    let write = if accumulate {
                        Write::Accumulate
                    } else {
                        Write::Store
                    };
                    ops::matmul(&mut b, &m, &xb, 0, tokens, &yb, Some(&bb), write, &dummy);
                    g.run_once(&b.finish(&g).expect("plan")).expect("run");
                    let got = g.read_f32(&yb, tokens as usize * rows).expect("read");
                    for t in 0..tokens as usize {
                        for r in 0..rows {
                            let dot: f32 =
                                (0..cols).map(|k| w[r * cols + k] * x[t * cols + k]).sum();
                            let want =
                                dot + bias[r] + if accumulate { y0[t * rows + r] } else { 0.0 };
                            let have = got[t * rows + r];
                            assert!(
                            (want - have).abs() <= 1e-3 * (1.0 + want.abs()) + 1e-4 * cols as f32,
                            "{dtype} {rows}x{cols} tokens {tokens} cpu_layout {cpu_layout} row {r} token {t}: gpu {have}, cpu {want}"
                        );
                        }
                    }
                }
            }
        }
    }
}

/// The decode mat-vec with the RMSNorm before it, or the SwiGLU before it, folded into its
/// reads of x (GPUs), against the CPU: every type, a sharded matrix, bias and accumulate.
#[test]
fn fused_matvec_matches_cpu_for_every_type() {
    let g = gpu();
    let mut rng = Rng::new(5);
    let dummy = g.storage("dummy", 16).expect("dummy");
    let eps = 1e-6f32;
    for dtype in DType::ALL {
        let cols = if dtype.block_len() == 256 { 512 } else { 160 };
        let rows = 37;
        let (bytes, w) = random_matrix(&mut rng, dtype, rows, cols);
        let m =
            Matrix::upload_sharded(&g, "w", dtype, rows, cols, &bytes, Some(16)).expect("upload");
        let x = rng.vec(cols, 2.0);
        let aux = rng.vec(cols, 1.0);
        let bias = rng.vec(rows, 1.0);
        let y0 = rng.vec(rows, 1.0);
        let (xb, auxb) = (upload(&g, &x), upload(&g, &aux));
        let norm = Vector::upload(&g, "norm", &aux).expect("norm");
        let bb = Vector::upload(&g, "b", &bias).expect("bias");
        let inv = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() / cols as f32 + eps).sqrt();
        let normed: Vec<f32> = x.iter().zip(&aux).map(|(v, n)| v * inv * n).collect();
        let swiglu: Vec<f32> = x
            .iter()
            .zip(&aux)
            .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
            .collect();
        for (name, input, xs, write) in [
            (
                "normed",
                ops::FusedInput::Normed { weight: &norm, eps },
                &normed,
                Write::Store,
            ),
            (
                "swiglu",
                ops::FusedInput::SwiGlu { up: &auxb },
                &swiglu,
                Write::Accumulate,
            ),
        ] {
            let yb = upload(&g, &y0);
            let mut b = DispatchBuilder::new(&g);
            b.cpu_layout = false;
            ops::matvec_fused(&mut b, &m, (&xb, input), &yb, Some(&bb), write, &dummy);
            g.run_once(&b.finish(&g).expect("plan")).expect("run");
            let got = g.read_f32(&yb, rows).expect("read");
            for r in 0..rows {
                let dot: f32 = (0..cols).map(|k| w[r * cols + k] * xs[k]).sum();
                let base = if write == Write::Accumulate {
                    y0[r]
                } else {
                    0.0
                };
                let want = dot + bias[r] + base;
                assert!(
                    (want - got[r]).abs() <= 1e-3 * (1.0 + want.abs()) + 1e-4 * cols as f32,
                    "{dtype} {name} row {r}: gpu {}, cpu {want}",
                    got[r]
                );
            }
        }
    }
}

/// The expert-grouped prefill kernel (both layouts) against the CPU: expert 0 is chosen by
/// all 70 tokens (two GPU token tiles), expert 2 by half of them, expert 1 is not in a slot
/// and must leave its outputs alone; 67 rows an expert (past one 64-row tile).
#[test]
fn moe_grouped_matches_cpu_for_every_type() {
    let g = gpu();
    let mut rng = Rng::new(11);
    let (m, n_tokens, n_used, n_expert) = (67usize, 70usize, 2usize, 3usize);
    // Expert e's rows sit in slot slot_of[e]; slot 1 holds no routed expert.
    const MISSING: u32 = u32::MAX;
    let slot_of: Vec<u32> = vec![2, MISSING, 0];
    let ids: Vec<u32> = (0..n_tokens)
        .flat_map(|t| [0u32, if t % 2 == 0 { 1 } else { 2 }])
        .collect();
    let table = g
        .storage_init("slots", bytemuck::cast_slice(&slot_of))
        .expect("slots");
    let idb = g
        .storage_init("ids", bytemuck::cast_slice(&ids))
        .expect("ids");
    let lists = g
        .storage("lists", (n_expert * n_tokens * 4) as u64)
        .expect("lists");
    let counts = g.storage("counts", (n_expert * 4) as u64).expect("counts");
    for dtype in DType::ALL {
        let k = if dtype.block_len() == 256 { 256 } else { 96 };
        for down in [false, true] {
            for cpu_layout in [false, true] {
                let (bytes, w) = random_matrix(&mut rng, dtype, 3 * m, k);
                let wm = Matrix::upload(&g, "w", dtype, 3 * m, k, &bytes).expect("upload");
                let x_rows = if down { n_tokens * n_used } else { n_tokens };
                let x = rng.vec(x_rows * k, 1.0);
                let xb = upload(&g, &x);
                let sentinel = vec![7.0f32; n_tokens * n_used * m];
                let yb = upload(&g, &sentinel);
                let groups = ops::ExpertGroups {
                    slots: ops::ExpertSlots {
                        table: &table,
                        off: 0,
                    },
                    lists: &lists,
                    counts: &counts,
                };
                let (e, u, n) = (n_expert as u32, n_used as u32, n_tokens as u32);
                let mut b = DispatchBuilder::new(&g);
                b.cpu_layout = cpu_layout;
                ops::moe_group(&mut b, e, u, n, &idb, &groups);
                ops::moe_grouped(&mut b, &wm, m as u32, e, u, n, down, &xb, &yb, &groups);
                g.run_once(&b.finish(&g).expect("plan")).expect("run");
                let got = g.read_f32(&yb, sentinel.len()).expect("read");
                for (slot, &id) in ids.iter().enumerate() {
                    let x_row = if down { slot } else { slot / n_used };
                    for r in 0..m {
                        let have = got[slot * m + r];
                        let want = match slot_of[id as usize] {
                            MISSING => 7.0,
                            s => {
                                let row = &w[(s as usize * m + r) * k..][..k];
                                row.iter().zip(&x[x_row * k..]).map(|(a, b)| a * b).sum()
                            }
                        };
                        assert!(
                            (want - have).abs() <= 1e-3 * (1.0 + want.abs()) + 1e-4 * k as f32,
                            "{dtype} down {down} cpu_layout {cpu_layout} slot {slot} row {r}: gpu {have}, cpu {want}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn matvec_with_rows_too_long_for_a_uniform_uses_storage() {
    let g = gpu();
    let mut rng = Rng::new(7);
    let (rows, cols) = (7usize, 16640usize);
    let dummy = g.storage("dummy", 16).expect("dummy");
    let (bytes, w) = random_matrix(&mut rng, DType::Q8_0, rows, cols);
    let m = Matrix::upload(&g, "w", DType::Q8_0, rows, cols, &bytes).expect("upload");
    let x = rng.vec(cols, 1.0);
    let (xb, yb) = (
        upload(&g, &x),
        g.storage("y", (rows * 4) as u64).expect("y"),
    );
    let mut b = DispatchBuilder::new(&g);
    ops::matmul(&mut b, &m, &xb, 0, 1, &yb, None, Write::Store, &dummy);
    g.run_once(&b.finish(&g).expect("plan")).expect("run");
    let got = g.read_f32(&yb, rows).expect("read");
    for r in 0..rows {
        let want: f32 = (0..cols).map(|k| w[r * cols + k] * x[k]).sum();
        assert!(
            (got[r] - want).abs() < 1e-3 * (1.0 + want.abs()) + 0.05,
            "row {r}: {} vs {want}",
            got[r]
        );
    }
}

#[test]
fn embed_fetches_dequantized_rows_for_every_type() {
    let g = gpu();
    let mut rng = Rng::new(2);
    for dtype in DType::ALL {
        let cols = if dtype.block_len() == 256 { 512 } else { 96 };
        let rows = 41;
        let (bytes, w) = random_matrix(&mut rng, dtype, rows, cols);
        let m =
            Matrix::upload_sharded(&g, "e", dtype, rows, cols, &bytes, Some(16)).expect("upload");
        let ids: Vec<u32> = vec![0, 40, 17, 16, 15, 3];
        let idb = g
            .storage_init("ids", bytemuck::cast_slice(&ids))
            .expect("ids");
        let yb = g.storage("y", (ids.len() * cols * 4) as u64).expect("y");
        let mut b = DispatchBuilder::new(&g);
        ops::embed(&mut b, &m, &idb, ids.len() as u32, &yb);
        g.run_once(&b.finish(&g).expect("plan")).expect("run");
        let got = g.read_f32(&yb, ids.len() * cols).expect("read");
        for (t, id) in ids.iter().enumerate() {
            let want = &w[*id as usize * cols..(*id as usize + 1) * cols];
            assert!(
                max_abs_diff(&got[t * cols..(t + 1) * cols], want) < 1e-5,
                "{dtype} row {id}"
            );
        }
    }
}

#[test]
fn rms_norm_matches_cpu_with_row_offset() {
    let g = gpu();
    let mut rng = Rng::new(3);
    let (n, rows) = (200usize, 5usize);
    let x = rng.vec(n * rows, 3.0);
    let w = rng.vec(n, 1.0);
    let (xb, yb) = (
        upload(&g, &x),
        g.storage("y", (n * rows * 4) as u64).expect("y"),
    );
    let wv = Vector::upload(&g, "w", &w).expect("w");
    let mut b = DispatchBuilder::new(&g);
    ops::rms_norm(&mut b, &xb, 2, 3, &wv, 1e-6, &yb);
    g.run_once(&b.finish(&g).expect("plan")).expect("run");
    let got = g.read_f32(&yb, n * 3).expect("read");
    for t in 0..3 {
        let row = &x[(t + 2) * n..(t + 3) * n];
        let inv = 1.0 / (row.iter().map(|v| v * v).sum::<f32>() / n as f32 + 1e-6).sqrt();
        let want: Vec<f32> = row.iter().zip(&w).map(|(a, b)| a * inv * b).collect();
        assert!(
            max_abs_diff(&got[t * n..(t + 1) * n], &want) < 1e-4,
            "row {t}"
        );
    }
}

/// RoPE + KV store + attention over three steps (a prefill, one decode token, another
/// prefill), for both RoPE styles, GQA, head sizes that do and do not divide the kernel's
/// workgroup, and contexts longer than one 64-key chunk, against the CPU reference.
#[test]
fn rope_and_attention_match_cpu_for_prefill_then_decode() {
    let g = gpu();
    let cases = [
        (RopeMode::Neox, 16usize, vec![5usize, 1]),
        (RopeMode::Normal, 16, vec![5, 1]),
        (RopeMode::Neox, 64, vec![70, 1, 63]),
        (RopeMode::Normal, 80, vec![3, 66, 1]),
        // Decode past one 256-key span of the split GPU variant, and into a third span.
        (RopeMode::Neox, 64, vec![300, 1, 230, 1]),
        // Heads of 128: 16 keys a stage of the GPU prefill, and three query blocks.
        (RopeMode::Neox, 128, vec![130, 1]),
    ];
    for ((mode, hd, steps), serial) in cases
        .into_iter()
        .flat_map(|c| [(c.clone(), false), (c, true)])
    {
        let mut rng = Rng::new(4);
        let ctx = (steps.iter().sum::<usize>() + 8).max(160);
        let shape = AttnShape {
            n_head: 6,
            n_kv_head: 2,
            head_dim: hd as u32,
            ctx: ctx as u32,
        };
        let (nh, nkv) = (6usize, 2usize);
        let kc = g.storage("kc", (nkv * ctx * hd * 4) as u64).expect("kc");
        let vc = g.storage("vc", (nkv * ctx * hd * 4) as u64).expect("vc");
        let step = g.uniform_init("step", &[0u8; 16]).expect("step");
        let mut keys = vec![Vec::new(); nkv];
        let mut vals = vec![Vec::new(); nkv];
        let mut pos0 = 0usize;
        for n in steps.iter().copied() {
            let q = rng.vec(n * nh * hd, 1.0);
            let k = rng.vec(n * nkv * hd, 1.0);
            let v = rng.vec(n * nkv * hd, 1.0);
            let (qb, kb, vb) = (upload(&g, &q), upload(&g, &k), upload(&g, &v));
            let out = g.storage("out", (n * nh * hd * 4) as u64).expect("out");
            g.queue.write_buffer(
                &step,
                0,
                bytemuck::cast_slice(&[pos0 as u32, n as u32, 0, 0]),
            );
            let mut b = DispatchBuilder::new(&g);
            b.cpu_layout = serial; // both attention variants, whatever the adapter
            ops::rope_store_kv(
                &mut b, shape, mode, 10000.0, n as u32, &step, &qb, &kb, &vb, &kc, &vc,
            );
            let spans = g
                .storage("spans", 4 * ops::attention_scratch_floats(shape))
                .expect("spans");
            ops::attention(&mut b, shape, n as u32, &step, &qb, &kc, &vc, &out, &spans);
            g.run_once(&b.finish(&g).expect("plan")).expect("run");
            let got = g.read_f32(&out, n * nh * hd).expect("read");
            for t in 0..n {
                let pos = pos0 + t;
                for h in 0..nkv {
                    let mut kk = k[(t * nkv + h) * hd..(t * nkv + h + 1) * hd].to_vec();
                    rope(&mut kk, pos, 10000.0, mode == RopeMode::Neox);
                    keys[h].push(kk);
                    vals[h].push(v[(t * nkv + h) * hd..(t * nkv + h + 1) * hd].to_vec());
                }
                for h in 0..nh {
                    let mut qq = q[(t * nh + h) * hd..(t * nh + h + 1) * hd].to_vec();
                    rope(&mut qq, pos, 10000.0, mode == RopeMode::Neox);
                    let kvh = h / (nh / nkv);
                    let want = attend(&qq, &keys[kvh][..=pos], &vals[kvh][..=pos]);
                    let have = &got[(t * nh + h) * hd..(t * nh + h + 1) * hd];
                    assert!(
                        max_abs_diff(have, &want) < 1e-4,
                        "{mode:?} hd {hd} serial {serial} pos {pos} head {h}"
                    );
                }
            }
            pos0 += n;
        }
    }
}

#[test]
fn elementwise_ops_match_cpu() {
    let g = gpu();
    let mut rng = Rng::new(5);
    let n = 1001;
    let (a, c) = (rng.vec(n, 4.0), rng.vec(n, 4.0));
    for kernel in [Kernel::SwiGlu, Kernel::Add] {
        let (ab, cb) = (upload(&g, &a), upload(&g, &c));
        let mut b = DispatchBuilder::new(&g);
        match kernel {
            Kernel::SwiGlu => ops::swiglu(&mut b, &ab, &cb, n as u32),
            _ => ops::add(&mut b, &ab, &cb, n as u32),
        }
        g.run_once(&b.finish(&g).expect("plan")).expect("run");
        let got = g.read_f32(&ab, n).expect("read");
        let want: Vec<f32> = a
            .iter()
            .zip(&c)
            .map(|(x, y)| {
                if kernel == Kernel::SwiGlu {
                    x / (1.0 + (-x).exp()) * y
                } else {
                    x + y
                }
            })
            .collect();
        assert!(max_abs_diff(&got, &want) < 1e-4, "{kernel:?}");
    }
}

#[test]
fn count_corrections_apply_each_tokens_own_count() {
    // 4 slots a token; corrections for counts 1, 3 and 4 (not the fitted 2), stacked in
    // order; tokens keep 0-4 experts (u32::MAX: a dropped slot).
    let g = gpu();
    let (d, rank, slots) = (37usize, 5usize, 4usize);
    let counts = [1usize, 3, 4];
    let mut rng = Rng::new(12);
    let kept = [1usize, 2, 3, 4, 0, 1, 3];
    let n = kept.len();
    let ids: Vec<u32> = kept
        .iter()
        .flat_map(|&k| (0..slots).map(move |j| if j < k { j as u32 * 3 } else { u32::MAX }))
        .collect();
    let xn = rng.vec(n * d, 1.0);
    let x0 = rng.vec(n * d, 1.0);
    let (v, u, bias) = (
        rng.vec(counts.len() * rank * d, 0.5),
        rng.vec(counts.len() * d * rank, 0.5),
        rng.vec(counts.len() * d, 0.5),
    );
    let ids_f: Vec<f32> = ids.iter().map(|v| f32::from_bits(*v)).collect();
    let (ib, xnb, xb) = (upload(&g, &ids_f), upload(&g, &xn), upload(&g, &x0));
    let (vb, ub, bb) = (upload(&g, &v), upload(&g, &u), upload(&g, &bias));
    let fits = ops::CountCorrections {
        input: &vb,
        output: &ub,
        bias: &bb,
        rank: rank as u32,
        mask: counts.iter().fold(0, |m, k| m | 1 << k),
    };
    let mut b = DispatchBuilder::new(&g);
    ops::moe_recover_count(
        &mut b,
        slots as u32,
        n as u32,
        d as u32,
        &ib,
        &xnb,
        &fits,
        &xb,
    );
    g.run_once(&b.finish(&g).expect("plan")).expect("run");
    let got = g.read_f32(&xb, n * d).expect("read");
    let mut want = x0.clone();
    for (t, k) in kept.iter().enumerate() {
        let Some(blk) = counts.iter().position(|c| c == k) else {
            continue; // the fitted count, or none kept: unchanged
        };
        let x = &xn[t * d..(t + 1) * d];
        let z: Vec<f32> = (0..rank)
            .map(|r| {
                let row = &v[(blk * rank + r) * d..][..d];
                row.iter().zip(x).map(|(a, b)| a * b).sum()
            })
            .collect();
        for i in 0..d {
            let row = &u[(blk * d + i) * rank..][..rank];
            let y: f32 = row.iter().zip(&z).map(|(a, b)| a * b).sum();
            want[t * d + i] += y + bias[blk * d + i];
        }
    }
    assert!(max_abs_diff(&got, &want) < 1e-4);
    // Tokens at the fitted count (and none) are untouched, the others moved.
    for (t, k) in kept.iter().enumerate() {
        let moved = max_abs_diff(&got[t * d..(t + 1) * d], &x0[t * d..(t + 1) * d]) > 0.0;
        assert_eq!(moved, counts.contains(k), "token {t} keeps {k}");
    }
}

/// What moe_route.wgsl decided for a least-squares router's `scores` [tokens, n_expert]
/// (logits mode, every weight 1): each token's `slots` ids (u32::MAX: dropped), its
/// confidence, and the [kept experts, tokens] count. The fixed top-k is `base`; `x`
/// [tokens, d] is the residual stream for the norm signal (None: the top-1 share).
struct Routed {
    ids: Vec<u32>,
    conf: Vec<f32>,
    counted: Vec<u32>,
}

fn route_on_gpu(
    g: &Gpu,
    scores: &[f32],
    n_expert: usize,
    (base, slots): (usize, usize),
    keep: f32,
    x: Option<(&[f32], usize)>,
) -> Routed {
    let tokens = scores.len() / n_expert;
    let gb = upload(g, scores);
    let xb = x.map(|(x, _)| upload(g, x));
    let bias = upload(g, &vec![0.0; n_expert]);
    let keep_b = upload(g, &[keep]);
    let ids = g.storage("ids", (4 * tokens * slots) as u64).expect("ids");
    let wts = g.storage("wts", (4 * tokens * slots) as u64).expect("wts");
    let conf = g.storage("conf", (4 * tokens) as u64).expect("conf");
    let active = g.storage("active", 16).expect("active");
    let out = ops::RouteOut {
        ids: &ids,
        wts: &wts,
        conf: &conf,
        keep: &keep_b,
        active: &active,
        layer: 0,
        base: base as u32,
        count: true,
        residual: xb.as_ref().zip(x).map(|(b, (_, d))| (&**b, d as u32)),
    };
    let mut b = DispatchBuilder::new(g);
    let (score, weights) = (ops::RouteScore::Logits, ops::RouteWeights::Ones);
    let (e, k, n) = (n_expert as u32, slots as u32, tokens as u32);
    ops::moe_route(&mut b, score, weights, e, k, n, &gb, &gb, &bias, &out);
    g.run_once(&b.finish(g).expect("plan")).expect("run");
    let bits = |buf, n| -> Vec<u32> {
        let v = g.read_f32(buf, n).expect("read");
        v.iter().map(|v| v.to_bits()).collect()
    };
    Routed {
        ids: bits(&ids, tokens * slots),
        conf: g.read_f32(&conf, tokens).expect("read"),
        counted: bits(&active, 2),
    }
}

#[test]
fn adaptive_routing_drops_by_the_share_or_by_the_norm_signal() {
    // A least-squares router's scores (logits mode, every weight 1): top-2 of 6 experts for
    // 5 tokens; the token keeps only its top-1 where its confidence reaches `keep`.
    let g = gpu();
    let (n_expert, k, tokens, d) = (6usize, 2usize, 5usize, 40usize);
    let mut rng = Rng::new(9);
    let scores: Vec<f32> = rng.vec(tokens * n_expert, 2.0);
    let x: Vec<f32> = rng.vec(tokens * d, 0.6);
    let keep = 0.55f32;
    for norm in [false, true] {
        let residual = norm.then_some((&x[..], d));
        let got = route_on_gpu(&g, &scores, n_expert, (k, k), keep, residual);
        let (got_ids, got_conf) = (got.ids, got.conf);
        let mut dropped = 0;
        for t in 0..tokens {
            let row = &scores[t * n_expert..(t + 1) * n_expert];
            let mut order: Vec<usize> = (0..n_expert).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            let (s1, s2) = (row[order[0]].max(0.0), row[order[1]].max(0.0));
            let xt = &x[t * d..(t + 1) * d];
            let want_conf = match norm {
                true => 1.0 - (s2 / xt.iter().map(|v| v * v).sum::<f32>().sqrt()).min(1.0),
                false if s1 + s2 > 0.0 => s1 / (s1 + s2),
                false => 1.0,
            };
            assert!(
                (got_conf[t] - want_conf).abs() < 1e-5,
                "token {t}, norm {norm}"
            );
            assert_eq!(got_ids[t * k], order[0] as u32);
            let top1_only = want_conf >= keep;
            let want1 = if top1_only { u32::MAX } else { order[1] as u32 };
            assert_eq!(got_ids[t * k + 1], want1, "token {t}, norm {norm}");
            dropped += usize::from(top1_only);
        }
        // The data exercises both outcomes under each signal.
        assert!(
            dropped > 0 && dropped < tokens,
            "norm {norm}: {dropped} dropped"
        );
    }
}

#[test]
fn adaptive_routing_with_room_judges_each_expert_and_adds_past_the_top_k() {
    // Top-2 with 4 slots, by the norm signal: each expert after the top-1 stays where its
    // score over |x| is above 1 - keep, the ones past the top-2 included; without adaptive
    // gating (keep above 1) the slots past the top-2 hold nothing.
    let g = gpu();
    let (n_expert, base, slots, tokens, d) = (6usize, 2usize, 4usize, 24usize, 40usize);
    let mut rng = Rng::new(11);
    let scores: Vec<f32> = rng.vec(tokens * n_expert, 2.0);
    let x: Vec<f32> = rng.vec(tokens * d, 0.6);
    for keep in [0.55f32, 2.0] {
        let routed = route_on_gpu(&g, &scores, n_expert, (base, slots), keep, Some((&x, d)));
        let (got, counted) = (routed.ids, routed.counted);
        let (mut kept_past, mut dropped_in, mut kept) = (0, 0, 0u32);
        for t in 0..tokens {
            let row = &scores[t * n_expert..(t + 1) * n_expert];
            let mut order: Vec<usize> = (0..n_expert).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
            let xt = &x[t * d..(t + 1) * d];
            let norm = xt.iter().map(|v| v * v).sum::<f32>().sqrt();
            for j in 0..slots {
                let stays = match keep > 1.0 {
                    true => j < base,
                    false => j == 0 || 1.0 - (row[order[j]].max(0.0) / norm).min(1.0) < keep,
                };
                let want = if stays { order[j] as u32 } else { u32::MAX };
                assert_eq!(got[t * slots + j], want, "token {t} slot {j} keep {keep}");
                kept += u32::from(stays);
                kept_past += usize::from(stays && j >= base);
                dropped_in += usize::from(!stays && j < base);
            }
        }
        assert_eq!(counted, vec![kept, tokens as u32], "keep {keep}");
        if keep < 1.0 {
            // The data exercises adding past the top-k and dropping within it.
            assert!(
                kept_past > 0 && dropped_in > 0,
                "{kept_past} added, {dropped_in} dropped"
            );
        }
    }
}

#[test]
fn argmax_softmax_and_nll_match_cpu() {
    let g = gpu();
    let mut rng = Rng::new(6);
    let (n, rows) = (3001usize, 3usize);
    let mut x = rng.vec(n * rows, 5.0);
    x[2 * n + 2999] = 50.0; // a clear winner in the last row
    let targets: Vec<u32> = vec![7, 3000, 0];
    let xb = upload(&g, &x);
    let tb = g
        .storage_init("targets", bytemuck::cast_slice(&targets))
        .expect("targets");
    let nll = g.storage("nll", 16).expect("nll");
    let am = g.storage("argmax", 16).expect("argmax");
    let rb = RowBuffers {
        x: &xb,
        targets: &tb,
        out_f: &nll,
        out_u: &am,
    };
    let mut b = DispatchBuilder::new(&g);
    // nll in two blocks, the second writing from row 2 on (as scoring does).
    ops::row_op(&mut b, Kernel::Nll, &rb, n as u32, 0, rows as u32 - 1, 0);
    ops::row_op(&mut b, Kernel::Nll, &rb, n as u32, 2, 1, 2);
    ops::row_op(&mut b, Kernel::Argmax, &rb, n as u32, 2, 1, 0);
    ops::row_op(&mut b, Kernel::Softmax, &rb, n as u32, 1, 1, 0);
    g.run_once(&b.finish(&g).expect("plan")).expect("run");
    let got_nll = g.read_f32(&nll, rows).expect("read");
    for r in 0..rows {
        let row = &x[r * n..(r + 1) * n];
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f32>().ln();
        let want = lse - row[targets[r] as usize];
        assert!(
            (got_nll[r] - want).abs() < 1e-3,
            "nll row {r}: {} vs {want}",
            got_nll[r]
        );
    }
    let am_bytes = g.read_f32(&am, 1).expect("read");
    assert_eq!(am_bytes[0].to_bits(), 2999);
    let soft = g.read_f32(&xb, 2 * n).expect("read");
    let row = &x[n..2 * n];
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let z: f32 = row.iter().map(|v| (v - m).exp()).sum();
    let want: Vec<f32> = row.iter().map(|v| (v - m).exp() / z).collect();
    assert!(max_abs_diff(&soft[n..2 * n], &want) < 1e-6);
    assert!((soft[n..2 * n].iter().sum::<f32>() - 1.0).abs() < 1e-4);
}

#[test]
fn top_k_returns_the_k_largest_with_their_ids() {
    let g = gpu();
    let mut rng = Rng::new(8);
    let n = 5003usize;
    let x = rng.vec(2 * n, 10.0);
    let xb = upload(&g, &x);
    let ids = g.storage("ids", 4 * 65).expect("ids");
    let vals = g.storage("vals", 4 * 64).expect("vals");
    let unused = g.storage("unused", 16).expect("unused");
    let rb = RowBuffers {
        x: &xb,
        targets: &unused,
        out_f: &vals,
        out_u: &ids,
    };
    for k in [1u32, 7, 40] {
        let mut b = DispatchBuilder::new(&g);
        ops::top_k(&mut b, &rb, n as u32, 1, k, 64);
        g.run_once(&b.finish(&g).expect("plan")).expect("run");
        let words: Vec<u32> = g
            .read_f32(&ids, 65)
            .expect("read")
            .iter()
            .map(|f| f.to_bits())
            .collect();
        let got_vals = g.read_f32(&vals, 64).expect("read");
        let count = words[0] as usize;
        assert_eq!(count, k as usize, "random floats have no ties");
        let mut want: Vec<(usize, f32)> = x[n..].iter().copied().enumerate().collect();
        want.sort_by(|a, b| b.1.total_cmp(&a.1));
        let mut got: Vec<(usize, f32)> = (0..count)
            .map(|i| (words[1 + i] as usize, got_vals[i]))
            .collect();
        got.sort_by(|a, b| b.1.total_cmp(&a.1));
        assert_eq!(got, want[..k as usize].to_vec(), "k = {k}");
    }
}

/// `pregate devices` marks exactly one adapter as the default, and it is the one a run
/// without `--adapter` opens.
#[test]
fn devices_mark_the_adapter_a_run_opens() {
    use pregate::gpu::{list_adapters, BackendChoice};
    let all = list_adapters(BackendChoice::Auto);
    let defaults: Vec<_> = all.iter().filter(|a| a.default).collect();
    assert_eq!(defaults.len(), 1, "{all:?}");
    let g = gpu();
    assert_eq!(defaults[0].name, g.info.name);
    assert_eq!(defaults[0].backend, format!("{:?}", g.info.backend));
}
