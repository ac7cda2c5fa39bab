//! Carving a tiny dense model into experts: the lossless invariant (all experts active equals
//! the dense model), the GPU MoE forward against a CPU reference for decode and prefill, and
//! bad input.

mod common;

use std::path::Path;

use common::{calib_file, carve_tiny, load_weights, max_abs_diff, reference_logits, TinySpec};
use pregate::carve::{self, CarveOptions, RouterFit};
use pregate::gpu::KernelLayout;
use pregate::{Engine, EngineOptions};

fn logits(path: &Path, experts: Option<usize>, tokens: &[u32]) -> Vec<Vec<f32>> {
    logits_with(path, experts, tokens, KernelLayout::Auto)
}

fn logits_with(
    path: &Path,
    experts: Option<usize>,
    tokens: &[u32],
    layout: KernelLayout,
) -> Vec<Vec<f32>> {
    let mut opts = EngineOptions {
        ctx: 64,
        experts_per_token: experts,
        ..Default::default()
    };
    opts.gpu.layout = layout;
    let engine = Engine::load(path, &opts).expect("load");
    // A prefill of most tokens, then decode steps: both MoE paths.
    common::step_logits(&engine, tokens)
}

const TOKENS: [u32; 12] = [102, 110, 32, 105, 116, 101, 109, 95, 51, 40, 120, 58];

/// Every step of `got` within 1% of the step's largest logit in `want` (the dense model's):
/// only the down-projection is re-quantised (Q8_0 → Q8_0 of its columns).
fn assert_is_dense(want: &[Vec<f32>], got: &[Vec<f32>], tag: &str) {
    for (w, g) in want.iter().zip(got) {
        let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = max_abs_diff(w, g);
        assert!(diff < 0.01 * scale, "{tag}: {diff} vs scale {scale}");
    }
}

/// The GPU's prefill and last decode step of `path` at `k` experts against the CPU reference.
fn assert_runs_like_reference(path: &Path, k: usize, tag: &str) {
    let got = logits(path, Some(k), &TOKENS);
    let cpu = reference_logits(&load_weights(path, TinySpec::default(), k), &TOKENS);
    let last = cpu.len() - 1;
    assert!(
        max_abs_diff(&got[0], &cpu[last - 3]) < 2e-3,
        "{tag} prefill"
    );
    assert!(max_abs_diff(&got[3], &cpu[last]) < 2e-3, "{tag} decode");
}

/// How far `path` (at its own experts per token) is from `want` (the dense model's logits):
/// the sum over steps of the largest difference.
fn distance_from(want: &[Vec<f32>], path: &Path) -> f32 {
    let got = logits(path, None, &TOKENS);
    want.iter().zip(&got).map(|(w, g)| max_abs_diff(w, g)).sum()
}

/// Carves `opts` into `dir` twice, with and without the linear recovery map.
fn carve_with_and_without_recovery(
    dir: &Path,
    dense: &Path,
    opts: &CarveOptions,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let (rec, plain) = (dir.join("recover.gguf"), dir.join("plain.gguf"));
    let with = CarveOptions {
        recover: true,
        ..opts.clone()
    };
    carve::carve(dense, &rec, &with, |_| {}).expect("carve with the map");
    let without = CarveOptions {
        recover: false,
        ..opts.clone()
    };
    carve::carve(dense, &plain, &without, |_| {}).expect("carve without the map");
    (rec, plain)
}

#[test]
fn all_experts_active_matches_the_dense_model() {
    // 6 experts do not divide 512 neurons: 96 per expert, 64 zero neurons of padding.
    for (experts, shared) in [(8, 1), (6, 2)] {
        let (dense, carved) = carve_tiny(&format!("carve_all_{experts}"), experts, shared, 1);
        let want = logits(&dense, None, &TOKENS);
        let got = logits(&carved, Some(usize::MAX), &TOKENS);
        assert_is_dense(&want, &got, &format!("E{experts}"));
    }
}

#[test]
fn carved_model_on_the_gpu_matches_the_cpu_reference() {
    let (_, carved) = carve_tiny("carve_topk", 8, 1, 2);
    // Both thread layouts of the expert kernels, whatever this machine's adapter is.
    for (k, layout) in [
        (2usize, KernelLayout::Cpu),
        (3, KernelLayout::Cpu),
        (2, KernelLayout::Gpu),
        (3, KernelLayout::Gpu),
    ] {
        let got = logits_with(&carved, Some(k), &TOKENS, layout);
        let cpu = reference_logits(&load_weights(&carved, TinySpec::default(), k), &TOKENS);
        let want: Vec<&Vec<f32>> = std::iter::once(&cpu[TOKENS.len() - 4])
            .chain(&cpu[TOKENS.len() - 3..])
            .collect();
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            assert!(
                max_abs_diff(w, g) < 2e-3,
                "k {k} step {i}: {}",
                max_abs_diff(w, g)
            );
        }
    }
    // Sparse routing changes the output: the test would notice a router that picked all.
    let all = logits(&carved, Some(usize::MAX), &TOKENS);
    let two = logits(&carved, Some(2), &TOKENS);
    assert!(max_abs_diff(&all[0], &two[0]) > 1e-3);
}

#[test]
fn carve_rejects_bad_input_and_writes_nothing() {
    let (dir, dense) = common::tiny_dense("carve_bad", 3);
    let calib = calib_file(&dir);
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "").expect("write");
    let out = dir.join("out.gguf");
    let no_folder = dir.join("no-such-folder").join("out.gguf");
    let base = CarveOptions {
        calib: vec![calib.clone()],
        calib_tokens: 100,
        seq_len: 100,
        ..Default::default()
    };
    let cases: Vec<(CarveOptions, &Path, &str)> = vec![
        (
            CarveOptions {
                n_active: 15,
                ..base.clone()
            },
            &out,
            "--active",
        ),
        (
            CarveOptions {
                n_shared: 16,
                ..base.clone()
            },
            &out,
            "no routed experts",
        ),
        (base.clone(), &dense, "is the input"),
        (base.clone(), &dir, "is a folder"),
        (base.clone(), &no_folder, "does not exist"),
        (
            CarveOptions {
                calib: vec![empty.clone()],
                ..base.clone()
            },
            &out,
            "empty",
        ),
        (
            CarveOptions {
                calib: vec![dir.join("missing.txt")],
                ..base.clone()
            },
            &out,
            "missing.txt",
        ),
    ];
    let existing = dir.join("existing.gguf");
    std::fs::write(&existing, b"mine").expect("write");
    let err = carve::carve(&dense, &existing, &base, |_| {}).expect_err("exists");
    assert!(err.to_string().contains("--force"), "{err}");
    assert_eq!(std::fs::read(&existing).expect("read"), b"mine");
    let before = std::fs::read(&dense).expect("read");
    for (opts, output, want) in cases {
        let err = carve::carve(&dense, output, &opts, |_| {}).expect_err(want);
        assert!(err.to_string().contains(want), "{err}");
        assert!(!out.exists(), "{want}: wrote an output");
    }
    assert_eq!(
        std::fs::read(&dense).expect("read"),
        before,
        "input changed"
    );

    // A model without a gated FFN (no ffn_gate in layer 0) cannot be carved.
    let file = pregate::format::GgufFile::open(&dense).expect("open");
    let gateless = dir.join("gateless.gguf");
    common::copy_without_tensors(&file, &["blk.0.ffn_gate.weight"], &gateless);
    let err = carve::carve(&gateless, &out, &base, |_| {}).expect_err("no gate");
    assert!(err.to_string().contains("no gated FFN"), "{err}");
    assert!(!out.exists());

    // An MoE model cannot be carved again.
    let carved = dir.join("carved.gguf");
    carve::carve(&dense, &carved, &base, |_| {}).expect("carve");
    let err = carve::carve(&carved, &out, &base, |_| {}).expect_err("carve twice");
    assert!(err.to_string().contains("already"), "{err}");
}

#[test]
fn expert_traces_record_the_routers_choices() {
    let (_, carved) = carve_tiny("carve_trace", 8, 1, 2);
    let engine = Engine::load(
        &carved,
        &EngineOptions {
            ctx: 64,
            ..Default::default()
        },
    )
    .expect("load");
    let text = "fn item_3(x: u32) -> u32 { x * 3 }";
    let trace = pregate::moe::trace::record(&engine, text, None, |_, _| {}).expect("trace");
    let tokens = engine.tokenizer.encode(text, false).expect("encode");
    assert_eq!(
        (trace.n_layers, trace.experts_per_layer, trace.k),
        (2, 7, 2)
    );
    assert_eq!(trace.n_tokens(), tokens.len());
    // The same choices as the CPU reference router, token by token and layer by layer.
    let tw = load_weights(&carved, TinySpec::default(), 2);
    reference_logits(&tw, &tokens);
    assert_eq!(trace.choices, *tw.routes.borrow());

    // The CLI writes the same trace, and `simulate` replays it.
    let dir = carved.parent().expect("dir");
    let (txt, bin) = (dir.join("t.txt"), dir.join("trace.bin"));
    std::fs::write(&txt, text).expect("write");
    let run = common::run_cli;
    let m = carved.to_str().expect("path");
    run(&[
        "trace",
        "-m",
        m,
        "-f",
        txt.to_str().expect("p"),
        "-o",
        bin.to_str().expect("p"),
        "--ctx",
        "64",
    ]);
    let read = pregate::moe::ExpertTrace::read(&bin).expect("read trace");
    assert_eq!(read, trace);
    let json = run(&[
        "simulate",
        bin.to_str().expect("p"),
        "--slots",
        "4",
        "--json",
    ]);
    assert_eq!(json.lines().count(), 3, "{json}");
}

#[test]
fn the_default_least_squares_router_runs_like_the_reference() {
    let (dir, dense) = common::tiny_dense("carve_default", 21);
    let out = dir.join("carved.gguf");
    let opts = CarveOptions {
        n_experts: 8,
        n_shared: 1,
        calib: vec![calib_file(&dir)],
        calib_tokens: 300,
        seq_len: 150,
        ..Default::default()
    };
    assert_eq!(opts.router_fit, RouterFit::LeastSquares);
    carve::carve(&dense, &out, &opts, |_| {}).expect("carve");
    let got = logits(&out, None, &TOKENS);
    let cpu = reference_logits(&load_weights(&out, TinySpec::default(), 2), &TOKENS);
    assert!(max_abs_diff(&got[3], &cpu[TOKENS.len() - 1]) < 2e-3);
}

/// Text of another domain than `calib_file`'s code, for Read-ME's per-file clusters.
fn prose_file(dir: &Path) -> std::path::PathBuf {
    let text: String = (0..300)
        .map(|i| format!("The {i}th quiet river runs past a green hill, and birds sing.\n"))
        .collect();
    let p = dir.join("prose.txt");
    std::fs::write(&p, text).expect("write prose");
    p
}

/// Rows of a GGUF tensor as raw bytes.
fn rows(f: &pregate::format::GgufFile, name: &str, row_bytes: usize) -> Vec<Vec<u8>> {
    let t = f.require(name).expect(name);
    f.bytes(t).chunks(row_bytes).map(<[u8]>::to_vec).collect()
}

#[test]
fn readme_carving_gives_each_file_its_expert_and_runs_like_the_reference() {
    let (dir, dense) = common::tiny_dense("carve_readme", 21);
    let spec = TinySpec::default();
    let out = dir.join("readme.gguf");
    let opts = CarveOptions {
        method: carve::Method::Readme,
        n_experts: 2,
        n_active: 1,
        calib: vec![calib_file(&dir), prose_file(&dir)],
        calib_tokens: 400,
        seq_len: 200,
        ..Default::default()
    };
    let s = carve::carve(&dense, &out, &opts, |_| {}).expect("carve");
    assert_eq!(s.cluster_tokens, vec![200, 200]);
    let labels = carve::ClusterLabels::load(&carve::ClusterLabels::path_for(&out)).expect("labels");
    assert_eq!(labels.source, carve::ClusterSource::Domains);
    assert!(labels.labels[..200].iter().all(|&c| c == 0));
    assert!(labels.labels[200..].iter().all(|&c| c == 1));

    // Per layer, the shared expert plus expert c holds exactly half of the dense gate rows
    // (cluster c's set), with no row twice; padding rows are zero.
    let d = pregate::format::GgufFile::open(&dense).expect("dense");
    let m = pregate::format::GgufFile::open(&out).expect("carved");
    let gate = d.require("blk.0.ffn_gate.weight").expect("gate");
    let row = gate.dtype.bytes_for(spec.d_model as u64).expect("row") as usize;
    let zero = pregate::quant::quantize(gate.dtype, &vec![0.0; spec.d_model]).expect("zero");
    let mut widest = vec![0usize; spec.n_layer];
    for (l, widest) in widest.iter_mut().enumerate() {
        let dense_rows = rows(&d, &format!("blk.{l}.ffn_gate.weight"), row);
        let shared = rows(&m, &format!("blk.{l}.ffn_gate_shexp.weight"), row);
        let experts = rows(&m, &format!("blk.{l}.ffn_gate_exps.weight"), row);
        let per = experts.len() / 2;
        for c in 0..2 {
            let set: Vec<&Vec<u8>> = shared
                .iter()
                .chain(&experts[c * per..(c + 1) * per])
                .filter(|r| **r != zero)
                .collect();
            assert_eq!(set.len(), spec.d_ff / 2, "layer {l} cluster {c}");
            // Padding reaches only this layer's largest expert, rounded to a Q8_0 block.
            let real = experts[c * per..(c + 1) * per]
                .iter()
                .filter(|r| **r != zero)
                .count();
            *widest = (*widest).max(real.div_ceil(32) * 32);
            for r in &set {
                assert_eq!(set.iter().filter(|o| o == &r).count(), 1);
                assert!(
                    dense_rows.contains(r),
                    "a row that is not the dense model's"
                );
            }
        }
    }

    for (l, &w) in widest.iter().enumerate() {
        let t = m
            .require(&format!("blk.{l}.ffn_gate_exps.weight"))
            .expect("experts");
        assert_eq!(
            t.dims[1] as usize, w,
            "layer {l}'s experts are padded to its own"
        );
    }
    let arch = m.architecture().expect("arch");
    let most = m
        .get(&format!("{arch}.expert_feed_forward_length"))
        .and_then(|v| v.as_u64());
    assert_eq!(
        most,
        widest.iter().max().map(|&w| w as u64),
        "the shape holds the largest"
    );

    // The GPU runs it like the CPU reference, with one expert and with both.
    for k in [1usize, 2] {
        let got = logits(&out, Some(k), &TOKENS);
        let cpu = reference_logits(&load_weights(&out, spec, k), &TOKENS);
        let last = &cpu[TOKENS.len() - 1];
        let diff = max_abs_diff(last, got.last().expect("logits"));
        assert!(diff < 2e-3, "k {k}: {diff}");
    }

    // One file: k-means on activation patterns makes the clusters.
    let km = dir.join("kmeans.gguf");
    let one = CarveOptions {
        calib: vec![calib_file(&dir)],
        ..opts.clone()
    };
    let s = carve::carve(&dense, &km, &one, |_| {}).expect("carve k-means");
    assert!(
        s.cluster_tokens.iter().all(|&n| n > 0),
        "{:?}",
        s.cluster_tokens
    );
    let l = carve::ClusterLabels::load(&carve::ClusterLabels::path_for(&km)).expect("labels");
    assert_eq!(l.source, carve::ClusterSource::Kmeans);

    // train-router fits the clusters: one decision that every layer shares.
    let router = dir.join("readme.router.safetensors");
    let m = out.to_str().expect("path");
    common::run_cli(&[
        "train-router",
        "-m",
        m,
        "-o",
        router.to_str().expect("path"),
        "--steps",
        "4",
    ]);
    // A router that nothing uses is still checked, and the user told it is unused.
    let run = |router: &Path| {
        let r = router.to_str().expect("path");
        let out = common::cli(&["generate", "-m", m, "--router", r, "-p", "ab", "-n", "1"]);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, stderr) = run(&router);
    assert!(ok && stderr.contains("is not used"), "{stderr}");
    let garbage = dir.join("garbage.safetensors");
    std::fs::write(&garbage, [0xffu8; 64]).expect("write");
    let (ok, stderr) = run(&garbage);
    assert!(!ok && stderr.contains("cannot read router"), "{stderr}");
    let r = pregate::router::PreGateRouter::load(&router).expect("router");
    let mut right = 0;
    for t in 0..labels.tokens.len() {
        let p = r.predict(&labels.tokens, t, 1);
        assert!(p.iter().all(|l| l == &p[0]), "layers disagree at {t}");
        right += usize::from(p[0][0] == labels.labels[t]);
    }
    assert!(
        right * 10 > labels.tokens.len() * 9,
        "{right} of {}",
        labels.tokens.len()
    );
}

#[test]
fn readme_carving_rejects_a_cluster_count_unlike_the_files() {
    let (dir, dense) = common::tiny_dense("carve_readme_bad", 21);
    let out = dir.join("out.gguf");
    let base = CarveOptions {
        method: carve::Method::Readme,
        n_experts: 3,
        n_active: 1,
        calib: vec![calib_file(&dir), prose_file(&dir)],
        ..Default::default()
    };
    let err = carve::carve(&dense, &out, &base, |_| {}).expect_err("3 clusters, 2 files");
    assert!(
        err.to_string().contains("one cluster per calibration file"),
        "{err}"
    );
    let half = CarveOptions {
        n_experts: 2,
        remain_rate: 1.0,
        ..base
    };
    let err = carve::carve(&dense, &out, &half, |_| {}).expect_err("remain 1");
    assert!(err.to_string().contains("--remain-rate"), "{err}");
    assert!(!out.exists());
}

#[test]
fn the_cpu_residual_stream_matches_the_gpu_forward() {
    // Two sequences of 6: positions restart, and no token attends across them.
    check_capture_against_cpu_stream(&TOKENS, 6, KernelLayout::Auto);
    // GPU kernels: 300 tokens in 512-token steps, captured 128 at a time.
    let long: Vec<u32> = (0..300).map(|i| (i * 37 % 250) as u32).collect();
    check_capture_against_cpu_stream(&long, 300, KernelLayout::Gpu);
}

/// The FFN inputs `capture_ffn` hands out, sequence by sequence of `seq_len` tokens, equal
/// the CPU residual stream's (sequential calibration).
fn check_capture_against_cpu_stream(tokens: &[u32], seq_len: usize, layout: KernelLayout) {
    use pregate::carve::{calib::dense_matrix, sequential};
    let (_, dense) = common::tiny_dense("carve_stream", 21);
    let spec = TinySpec::default();
    let mut opts = EngineOptions {
        ctx: seq_len.max(64),
        ..Default::default()
    };
    opts.gpu.layout = layout;
    let engine = Engine::load(&dense, &opts).expect("load");
    let mut gpu_xn = vec![Vec::new(); spec.n_layer];
    let mut gpu_gate = vec![Vec::new(); spec.n_layer];
    let mut s = engine.session().expect("session");
    for seq in tokens.chunks(seq_len) {
        s.capture_ffn(seq, |l, _, xn, gate, _| {
            gpu_xn[l].extend_from_slice(xn);
            gpu_gate[l].extend_from_slice(gate);
        })
        .expect("capture");
    }
    let (f, c) = (&engine.model.file, &engine.model.config);
    let mut stream = sequential::ResidualStream::new(f, c, tokens, seq_len).expect("stream");
    for (l, want) in gpu_xn.iter().enumerate() {
        let xn = stream.attention(l).expect("attention");
        let diff = max_abs_diff(want, &xn);
        assert!(diff < 2e-3, "layer {l}: {diff}");
        // The dense FFN, so that the next layer's input is the dense model's.
        let w = |t: &str| dense_matrix(f, &format!("blk.{l}.ffn_{t}.weight")).expect(t);
        let gate = sequential::matmul_t(&xn, &w("gate"), spec.d_model);
        let diff = max_abs_diff(&gpu_gate[l], &gate);
        assert!(diff < 2e-2, "layer {l} gate: {diff}");
        let up = sequential::matmul_t(&xn, &w("up"), spec.d_model);
        let h: Vec<f32> = gate
            .iter()
            .zip(&up)
            .map(|(g, u)| carve::router::silu(*g) * u)
            .collect();
        stream.add(&sequential::matmul_t(&h, &w("down"), spec.d_ff));
    }
}

#[test]
fn sequential_carving_keeps_the_invariant_and_runs_like_the_reference() {
    let (dir, dense) = common::tiny_dense("carve_sequential", 21);
    let spec = TinySpec::default();
    let out = dir.join("seq.gguf");
    let opts = CarveOptions {
        n_experts: 8,
        n_shared: 1,
        n_active: 2,
        calib: vec![calib_file(&dir)],
        calib_tokens: 600,
        seq_len: 200,
        sequential: true,
        ..Default::default()
    };
    carve::carve(&dense, &out, &opts, |_| {}).expect("carve");
    let want = logits(&dense, None, &TOKENS);
    let all = logits(&out, Some(usize::MAX), &TOKENS);
    assert_is_dense(&want, &all, "sequential");
    let got = logits(&out, Some(2), &TOKENS);
    let cpu = reference_logits(&load_weights(&out, spec, 2), &TOKENS);
    let diff = max_abs_diff(&cpu[TOKENS.len() - 1], got.last().expect("logits"));
    assert!(diff < 2e-3, "{diff}");
    // The calibration differs from the dense one: some layer past the first is carved
    // differently.
    let plain = dir.join("plain.gguf");
    let p = CarveOptions {
        sequential: false,
        ..opts
    };
    carve::carve(&dense, &plain, &p, |_| {}).expect("carve");
    let a = pregate::format::GgufFile::open(&out).expect("open");
    let b = pregate::format::GgufFile::open(&plain).expect("open");
    let name = "blk.1.ffn_gate_exps.weight";
    let (ta, tb) = (a.require(name).expect("a"), b.require(name).expect("b"));
    assert_ne!(a.bytes(ta), b.bytes(tb));
    let name = "blk.0.ffn_gate_exps.weight";
    let (ta, tb) = (a.require(name).expect("a"), b.require(name).expect("b"));
    assert_eq!(
        a.bytes(ta),
        b.bytes(tb),
        "layer 0 sees the same inputs either way"
    );
}

/// S1A2E8 with the default (least-squares) router and recovery, on `dir`'s calibration
/// text.
fn recovering_opts(dir: &Path) -> CarveOptions {
    CarveOptions {
        n_experts: 8,
        n_shared: 1,
        n_active: 2,
        calib: vec![calib_file(dir)],
        calib_tokens: 600,
        seq_len: 200,
        ..Default::default()
    }
}

#[test]
fn linear_recovery_runs_like_the_reference_and_brings_the_carve_closer_to_dense() {
    let (dir, dense) = common::tiny_dense("carve_recover", 21);
    let opts = recovering_opts(&dir);
    assert!(opts.recover, "recovery is the default");
    let (rec, plain) = carve_with_and_without_recovery(&dir, &dense, &opts);
    let f = pregate::format::GgufFile::open(&rec).expect("open");
    let want_dense = logits(&dense, None, &TOKENS);
    for l in 0..2 {
        let w = f
            .require(&format!("blk.{l}.ffn_recover.weight"))
            .expect("map");
        assert_eq!(w.dims, vec![256, 256], "d_model²");
        f.require(&format!("blk.{l}.ffn_recover.bias"))
            .expect("bias");
        // The shared expert's corrected down-projection, beside the plain one.
        let fitted = f
            .require(&format!("blk.{l}.ffn_recover_shexp.weight"))
            .expect("shared correction");
        let plain = f
            .require(&format!("blk.{l}.ffn_down_shexp.weight"))
            .expect("shared down");
        assert_eq!(fitted.dims, plain.dims);
        assert_ne!(f.bytes(fitted), f.bytes(plain), "a real correction");
        // A correction for tokens on one expert (7 routed: the fit applies at 1 and 2
        // only), of rank 64 over d_model 256.
        let [v, u, b] = pregate::model::config::count_fit_tensors(l, 1);
        assert_eq!(f.require(&v).expect("V").dims, vec![256, 64]);
        assert_eq!(f.require(&u).expect("U").dims, vec![64, 256]);
        assert_eq!(f.require(&b).expect("b").dims, vec![256]);
        for k in [2, 3] {
            let [v, ..] = pregate::model::config::count_fit_tensors(l, k);
            assert!(f.tensor(&v).is_none(), "no correction for k {k}");
        }
    }
    // The GPU adds W·x + b and reads the corrected shared down-projection at the carved k
    // and below, as the CPU reference does, and neither well above it (7 routed experts:
    // k 3 is past the quarter of the 5 beyond the carved 2).
    for k in [1, 2, 3] {
        assert_runs_like_reference(&rec, k, &format!("k {k}"));
    }
    // At one expert a token the correction brings the carve closer to the dense model
    // than the map made for two alone.
    let one = |path: &Path| {
        let got = logits(path, Some(1), &TOKENS);
        want_dense
            .iter()
            .zip(&got)
            .map(|(w, g)| max_abs_diff(w, g))
            .sum::<f32>()
    };
    let uncorrected = dir.join("uncorrected.gguf");
    let [v, ..] = pregate::model::config::count_fit_tensors(1, 1);
    let [v0, ..] = pregate::model::config::count_fit_tensors(0, 1);
    common::copy_without_tensors(&f, &[&v0, &v], &uncorrected);
    let (e_fit, e_plain) = (one(&rec), one(&uncorrected));
    assert!(e_fit < e_plain, "k 1: corrected {e_fit} vs not {e_plain}");
    // A correction that lost a part is a clear error naming it, not a panic.
    let damaged = dir.join("damaged.gguf");
    let [_, u, _] = pregate::model::config::count_fit_tensors(1, 1);
    common::copy_without_tensors(&f, &[&u], &damaged);
    let opts = EngineOptions {
        experts_per_token: Some(1),
        ..Default::default()
    };
    let err = Engine::load(&damaged, &opts)
        .err()
        .expect("a missing part fails");
    assert!(err.to_string().contains(&u), "{err}");
    // All experts active is still the dense model: the map is not applied there.
    let want = want_dense;
    let all = logits(&rec, Some(usize::MAX), &TOKENS);
    assert_is_dense(&want, &all, "recover, all experts");
    let (e_rec, e_plain) = (distance_from(&want, &rec), distance_from(&want, &plain));
    assert!(e_rec < e_plain, "recover {e_rec} vs plain {e_plain}");
}

#[test]
fn readme_recovery_accounts_for_neurons_that_several_clusters_keep() {
    // Read-ME's experts overlap (a neuron kept by several clusters is in each of their
    // experts), so what a token's unchosen experts add is not their sum; a map fitted to
    // that sum moved the model away from the dense one.
    let (dir, dense) = common::tiny_dense("carve_readme_recover", 21);
    // 4 k-means clusters: with 2, the only overlap is the shared expert itself.
    let opts = CarveOptions {
        method: carve::Method::Readme,
        n_experts: 4,
        n_active: 1,
        calib: vec![calib_file(&dir)],
        calib_tokens: 400,
        seq_len: 200,
        ..Default::default()
    };
    let (rec, plain) = carve_with_and_without_recovery(&dir, &dense, &opts);
    let want = logits(&dense, None, &TOKENS);
    let (e_rec, e_plain) = (distance_from(&want, &rec), distance_from(&want, &plain));
    assert!(e_rec < e_plain, "recover {e_rec} vs plain {e_plain}");
}

/// Logits of `path` under `--routing pregate` with `router` (as [`logits_with`]).
fn pregate_logits(path: &Path, router: &Path) -> Vec<Vec<f32>> {
    let opts = EngineOptions {
        ctx: 64,
        offload: pregate::model::offload::OffloadOptions {
            routing: pregate::moe::Routing::Pregate,
            router: Some(router.to_path_buf()),
            ..Default::default()
        },
        ..Default::default()
    };
    common::step_logits(&Engine::load(path, &opts).expect("load"), &TOKENS)
}

#[test]
fn a_recovery_fit_for_the_pregate_routers_choices_runs_under_pregate_routing() {
    let (dir, dense) = common::tiny_dense("carve_pregate_fit", 21);
    let opts = recovering_opts(&dir);
    let base = dir.join("base.gguf");
    carve::carve(&dense, &base, &opts, |_| {}).expect("carve");
    // A router trained on the carve's own routing of its calibration text, as
    // train-router makes it (recording the model it learned).
    let engine = Engine::load(&base, &EngineOptions::default()).expect("load");
    let tokens = carve::calib::tokens(&engine.tokenizer, &opts.calib, 600, 200).expect("tokens");
    let trace = pregate::moe::trace::record_tokens(&engine, &tokens, |_, _| {}).expect("trace");
    let train = pregate::router::TrainOptions {
        buckets: 256,
        ..Default::default()
    };
    let (mut router, _) =
        pregate::router::train(&tokens, &trace, &train, |_, _, _| {}).expect("train");
    let fingerprint = carve::routers_fingerprint(&engine.model.file, 2);
    router.model = Some(fingerprint.clone());
    drop(engine);
    // train-router records it too.
    let cli_router = dir.join("cli.safetensors");
    let calib = opts.calib[0].to_str().expect("path");
    let (m, o) = (
        base.to_str().expect("path"),
        cli_router.to_str().expect("path"),
    );
    let args = [
        "train-router",
        "-m",
        m,
        "--calib",
        calib,
        "--tokens",
        "600",
        "-o",
        o,
    ];
    common::run_cli(&args);
    let trained = pregate::router::PreGateRouter::load(&cli_router).expect("load");
    assert_eq!(trained.model, Some(fingerprint));
    let router_path = dir.join("router.safetensors");
    router.save(&router_path).expect("save");

    // Carving again with the router adds its fit and changes nothing else.
    let fit = dir.join("fit.gguf");
    let with = CarveOptions {
        pregate_router: Some(router_path.clone()),
        ..opts.clone()
    };
    carve::carve(&dense, &fit, &with, |_| {}).expect("carve for the router");
    let (b, f) = (
        pregate::format::GgufFile::open(&base).expect("open"),
        pregate::format::GgufFile::open(&fit).expect("open"),
    );
    for t in &b.tensors {
        let got = f.require(&t.name).expect("same tensors");
        assert_eq!(f.bytes(got), b.bytes(t), "{} changed", t.name);
    }
    for l in 0..2 {
        for s in [".weight", ".bias", "_shexp.weight"] {
            let name = |p: &str| format!("blk.{l}.{p}{s}");
            let pre = f
                .require(&name("ffn_recover_pregate"))
                .expect("pregate fit");
            let own = f.require(&name("ffn_recover")).expect("layers' fit");
            assert_eq!(pre.dims, own.dims);
            assert_ne!(
                f.bytes(pre),
                f.bytes(own),
                "{} is a fit of its own",
                name("ffn_recover_pregate")
            );
        }
    }
    let marked = f.get(carve::PREGATE_FIT_KEY).and_then(|v| v.as_str());
    assert_eq!(marked, Some(router.fingerprint().as_str()));

    // Layer routing runs the layers' fit: bit-identical to the model without the second.
    let bits = |a: &[Vec<f32>], b: &[Vec<f32>]| {
        a.iter()
            .flatten()
            .zip(b.iter().flatten())
            .all(|(x, y)| x.to_bits() == y.to_bits())
    };
    assert!(bits(
        &logits(&base, None, &TOKENS),
        &logits(&fit, None, &TOKENS)
    ));
    // Pre-gate routing with that router runs its own fit, closer to the dense model than
    // the layers' fit is under the same choices.
    let want = logits(&dense, None, &TOKENS);
    let distance =
        |got: &[Vec<f32>]| -> f32 { want.iter().zip(got).map(|(w, g)| max_abs_diff(w, g)).sum() };
    let (own, other) = (
        pregate_logits(&fit, &router_path),
        pregate_logits(&base, &router_path),
    );
    assert!(!bits(&own, &other), "the pre-gate's fit is used");
    let (d_own, d_other) = (distance(&own), distance(&other));
    assert!(
        d_own < d_other,
        "pregate fit {d_own} vs layers' fit {d_other}"
    );
    // A file that names the fit but lost a layer of it runs the layers' fit too.
    let damaged = dir.join("damaged.gguf");
    common::copy_without_tensors(&f, &["blk.1.ffn_recover_pregate.weight"], &damaged);
    assert!(bits(&pregate_logits(&damaged, &router_path), &other));
    // With another router, the model falls back to the layers' fit.
    let smaller = pregate::router::TrainOptions {
        buckets: 128,
        ..train
    };
    let (mut stranger, _) =
        pregate::router::train(&tokens, &trace, &smaller, |_, _, _| {}).expect("train");
    let stranger_path = dir.join("stranger.safetensors");
    stranger.save(&stranger_path).expect("save");
    assert!(bits(
        &pregate_logits(&fit, &stranger_path),
        &pregate_logits(&base, &stranger_path)
    ));

    // A fit for the router's top 3 records it; 0 experts is refused.
    let three = dir.join("three.gguf");
    let for_three = CarveOptions {
        pregate_experts: Some(3),
        ..with.clone()
    };
    carve::carve(&dense, &three, &for_three, |_| {}).expect("carve for top 3");
    let t = pregate::format::GgufFile::open(&three).expect("open");
    let k = t
        .get(carve::PREGATE_FIT_EXPERTS_KEY)
        .and_then(|v| v.as_u64());
    assert_eq!(k, Some(3));
    let name = "blk.1.ffn_recover_pregate.weight";
    let (a, b) = (t.require(name).expect("fit"), f.require(name).expect("fit"));
    assert_ne!(t.bytes(a), f.bytes(b), "fitted for other choices");
    let zero = CarveOptions {
        pregate_experts: Some(0),
        ..with.clone()
    };
    let err = carve::carve(&dense, &dir.join("zero.gguf"), &zero, |_| {}).expect_err("k 0");
    assert!(err.to_string().contains("--pregate-experts"), "{err}");

    // A router trained on another carve is refused before anything is written.
    stranger.model = Some("0".repeat(64));
    stranger.save(&stranger_path).expect("save");
    let refused = dir.join("refused.gguf");
    let other = CarveOptions {
        pregate_router: Some(stranger_path),
        ..opts.clone()
    };
    let err = carve::carve(&dense, &refused, &other, |_| {}).expect_err("another carve's router");
    assert!(err.to_string().contains("other routers"), "{err}");
    assert!(!refused.exists());
    // And a pregate fit needs the recovery fit.
    let no_recover = CarveOptions {
        recover: false,
        ..with
    };
    let err = carve::carve(&dense, &refused, &no_recover, |_| {}).expect_err("--no-recover");
    assert!(err.to_string().contains("--no-recover"), "{err}");
}
