//! Shared test helpers: a deterministic RNG, a tiny llama-family model written with our GGUF
//! writer, and a plain CPU forward pass (llama2.c style) to check the GPU against.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use pregate::format::{GgufWriter, MetaValue};
use pregate::quant::{dequantize, quantize, DType};

/// xorshift64*: deterministic and dependency-free.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E3779B97F4A7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32() * scale).collect()
    }
}

/// A folder for one test's files, under cargo's folder for integration tests' files
/// (target/tmp). The first call in a test binary removes what earlier runs of the same
/// binary left there: folders of a process that is gone, or of an earlier process that had
/// this one's id (a carve refuses to overwrite what it finds).
pub fn tmp_dir(name: &str) -> PathBuf {
    static SWEEP: std::sync::Once = std::sync::Once::new();
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let prefix = format!("{}-", env!("CARGO_CRATE_NAME"));
    let pid = std::process::id();
    SWEEP.call_once(|| {
        let Ok(entries) = std::fs::read_dir(&root) else {
            return;
        };
        for e in entries.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = file.strip_prefix(&prefix) else {
                continue;
            };
            let owner = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
            let running =
                owner.is_some_and(|p| p != pid && Path::new("/proc").join(p.to_string()).exists());
            if !running {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    });
    let d = root.join(format!("{prefix}{pid}-{name}"));
    std::fs::create_dir_all(&d).expect("tmp dir");
    d
}

/// GPT-2's byte-to-unicode map: the 256 byte tokens of a byte-level BPE vocabulary.
pub fn byte_tokens() -> Vec<String> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut out = vec![String::new(); 256];
    for (b, c) in bs.iter().zip(&cs) {
        out[*b as usize] = char::from_u32(*c).expect("char").to_string();
    }
    out
}

/// Shape of the tiny test model.
#[derive(Clone, Copy)]
pub struct TinySpec {
    pub n_layer: usize,
    pub d_model: usize,
    pub d_ff: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub arch: &'static str,
    pub dtype: DType,
    /// A native qwen2moe FFN instead of a dense one.
    pub moe: Option<NativeMoe>,
}

/// llama.cpp's qwen2moe layout: softmax router, top-k weighted by probability, and a
/// shared expert scaled by sigmoid(x · ffn_gate_inp_shexp).
#[derive(Clone, Copy)]
pub struct NativeMoe {
    pub n_expert: usize,
    pub n_used: usize,
    pub expert_ff: usize,
    pub shared_ff: usize,
}

impl Default for TinySpec {
    fn default() -> Self {
        TinySpec {
            n_layer: 2,
            d_model: 256,
            d_ff: 512,
            n_head: 4,
            n_kv_head: 2,
            arch: "qwen2",
            dtype: DType::Q8_0,
            moe: None,
        }
    }
}

/// The tiny model's weights as f32 (after quantization round trip), for the CPU reference.
pub struct TinyWeights {
    pub spec: TinySpec,
    pub vocab: usize,
    pub tensors: std::collections::HashMap<String, Vec<f32>>,
    /// Experts each token uses in MoE layers (ignored by dense ones).
    pub experts_per_token: usize,
    /// The experts the reference chose, in order: token, layer, rank.
    pub routes: std::cell::RefCell<Vec<u16>>,
    /// `pregate.moe.router` of a carved model ("cmoe" or "lsq"); empty otherwise.
    pub router: String,
    /// The file's experts per token, which a carved model's recovery map was fitted for.
    pub fitted_used: usize,
    /// The file's routed experts per layer (0: dense).
    pub n_expert: usize,
}

/// Writes a tiny model with random weights: vocab = 256 byte tokens + 2 specials.
pub fn write_tiny_model(path: &Path, spec: TinySpec, seed: u64) -> TinyWeights {
    let mut rng = Rng::new(seed);
    let mut tokens = byte_tokens();
    tokens.push("<|endoftext|>".into());
    tokens.push("<|im_end|>".into());
    let vocab = tokens.len();
    let mut types = vec![1i32; 256];
    types.extend([3, 3]);
    let mut w = GgufWriter::new();
    let a = spec.arch;
    w.meta("general.architecture", MetaValue::String(a.into()));
    w.meta(
        &format!("{a}.block_count"),
        MetaValue::U32(spec.n_layer as u32),
    );
    w.meta(&format!("{a}.context_length"), MetaValue::U32(256));
    w.meta(
        &format!("{a}.embedding_length"),
        MetaValue::U32(spec.d_model as u32),
    );
    w.meta(
        &format!("{a}.feed_forward_length"),
        MetaValue::U32(spec.d_ff as u32),
    );
    w.meta(
        &format!("{a}.attention.head_count"),
        MetaValue::U32(spec.n_head as u32),
    );
    w.meta(
        &format!("{a}.attention.head_count_kv"),
        MetaValue::U32(spec.n_kv_head as u32),
    );
    // As llama.cpp writes it (the head size; optional, d_model / heads without it).
    w.meta(
        &format!("{a}.attention.key_length"),
        MetaValue::U32((spec.d_model / spec.n_head) as u32),
    );
    w.meta(&format!("{a}.rope.freq_base"), MetaValue::F32(10000.0));
    if let Some(m) = spec.moe {
        for (k, v) in [
            ("expert_count", m.n_expert),
            ("expert_used_count", m.n_used),
            ("expert_feed_forward_length", m.expert_ff),
            ("expert_shared_feed_forward_length", m.shared_ff),
        ] {
            w.meta(&format!("{a}.{k}"), MetaValue::U32(v as u32));
        }
    }
    w.meta(
        &format!("{a}.attention.layer_norm_rms_epsilon"),
        MetaValue::F32(1e-6),
    );
    w.meta("tokenizer.ggml.model", MetaValue::String("gpt2".into()));
    w.meta("tokenizer.ggml.pre", MetaValue::String("qwen2".into()));
    w.meta(
        "tokenizer.ggml.tokens",
        MetaValue::Array(tokens.into_iter().map(MetaValue::String).collect()),
    );
    w.meta(
        "tokenizer.ggml.token_type",
        MetaValue::Array(types.into_iter().map(MetaValue::I32).collect()),
    );
    w.meta("tokenizer.ggml.merges", MetaValue::Array(Vec::new()));
    w.meta("tokenizer.ggml.eos_token_id", MetaValue::U32(257));
    w.meta("tokenizer.ggml.add_bos_token", MetaValue::Bool(false));

    let mut tensors = std::collections::HashMap::new();
    let mut add =
        |w: &mut GgufWriter, name: &str, dims: &[usize], dtype: DType, scale: f32, offset: f32| {
            let n: usize = dims.iter().product();
            let vals: Vec<f32> = rng.vec(n, scale).into_iter().map(|v| v + offset).collect();
            let bytes = quantize(dtype, &vals).expect("quantize");
            let mut back = vec![0f32; n];
            dequantize(dtype, &bytes, &mut back).expect("dequantize");
            let dims64: Vec<u64> = dims.iter().map(|d| *d as u64).collect();
            w.tensor(name, dtype, &dims64, bytes).expect("tensor");
            tensors.insert(name.to_string(), back);
        };
    let (d, f) = (spec.d_model, spec.d_ff);
    let hd = d / spec.n_head;
    let (qd, kvd) = (spec.n_head * hd, spec.n_kv_head * hd);
    let s = 1.0 / (d as f32).sqrt() * 1.5;
    add(
        &mut w,
        "token_embd.weight",
        &[d, vocab],
        spec.dtype,
        1.0,
        0.0,
    );
    for l in 0..spec.n_layer {
        let n = |x: &str| format!("blk.{l}.{x}");
        add(&mut w, &n("attn_norm.weight"), &[d], DType::F32, 0.2, 1.0);
        add(&mut w, &n("attn_q.weight"), &[d, qd], spec.dtype, s, 0.0);
        add(&mut w, &n("attn_k.weight"), &[d, kvd], spec.dtype, s, 0.0);
        add(&mut w, &n("attn_v.weight"), &[d, kvd], spec.dtype, s, 0.0);
        if a.starts_with("qwen2") {
            add(&mut w, &n("attn_q.bias"), &[qd], DType::F32, 0.1, 0.0);
            add(&mut w, &n("attn_k.bias"), &[kvd], DType::F32, 0.1, 0.0);
            add(&mut w, &n("attn_v.bias"), &[kvd], DType::F32, 0.1, 0.0);
        }
        if a.starts_with("qwen3") {
            add(
                &mut w,
                &n("attn_q_norm.weight"),
                &[hd],
                DType::F32,
                0.2,
                1.0,
            );
            add(
                &mut w,
                &n("attn_k_norm.weight"),
                &[hd],
                DType::F32,
                0.2,
                1.0,
            );
        }
        add(
            &mut w,
            &n("attn_output.weight"),
            &[qd, d],
            spec.dtype,
            s,
            0.0,
        );
        add(&mut w, &n("ffn_norm.weight"), &[d], DType::F32, 0.2, 1.0);
        if let Some(m) = spec.moe {
            let (e, ef, sf) = (m.n_expert, m.expert_ff, m.shared_ff);
            let sd = 1.0 / (ef as f32).sqrt() * 1.5;
            add(
                &mut w,
                &n("ffn_gate_inp.weight"),
                &[d, e],
                DType::F32,
                2.0 * s,
                0.0,
            );
            add(
                &mut w,
                &n("ffn_gate_exps.weight"),
                &[d, ef, e],
                spec.dtype,
                s,
                0.0,
            );
            add(
                &mut w,
                &n("ffn_up_exps.weight"),
                &[d, ef, e],
                spec.dtype,
                s,
                0.0,
            );
            add(
                &mut w,
                &n("ffn_down_exps.weight"),
                &[ef, d, e],
                spec.dtype,
                sd,
                0.0,
            );
            if sf > 0 {
                add(
                    &mut w,
                    &n("ffn_gate_inp_shexp.weight"),
                    &[d],
                    DType::F32,
                    s,
                    0.0,
                );
                add(
                    &mut w,
                    &n("ffn_gate_shexp.weight"),
                    &[d, sf],
                    spec.dtype,
                    s,
                    0.0,
                );
                add(
                    &mut w,
                    &n("ffn_up_shexp.weight"),
                    &[d, sf],
                    spec.dtype,
                    s,
                    0.0,
                );
                add(
                    &mut w,
                    &n("ffn_down_shexp.weight"),
                    &[sf, d],
                    spec.dtype,
                    sd,
                    0.0,
                );
            }
        } else {
            add(&mut w, &n("ffn_gate.weight"), &[d, f], spec.dtype, s, 0.0);
            add(&mut w, &n("ffn_up.weight"), &[d, f], spec.dtype, s, 0.0);
            add(
                &mut w,
                &n("ffn_down.weight"),
                &[f, d],
                spec.dtype,
                1.0 / (f as f32).sqrt() * 1.5,
                0.0,
            );
        }
    }
    add(&mut w, "output_norm.weight", &[d], DType::F32, 0.2, 1.0);
    add(&mut w, "output.weight", &[d, vocab], spec.dtype, s, 0.0);
    w.write(path).expect("write tiny model");
    TinyWeights {
        spec,
        vocab,
        tensors,
        experts_per_token: spec.moe.map_or(usize::MAX, |m| m.n_used),
        routes: Default::default(),
        router: String::new(),
        fitted_used: spec.moe.map_or(0, |m| m.n_used),
        n_expert: spec.moe.map_or(0, |m| m.n_expert),
    }
}

fn rmsnorm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let ss = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let inv = 1.0 / (ss + eps).sqrt();
    x.iter().zip(w).map(|(a, b)| a * inv * b).collect()
}

/// y = W x for W stored [rows, cols] row-major.
pub fn matvec(w: &[f32], x: &[f32], rows: usize) -> Vec<f32> {
    let cols = x.len();
    (0..rows)
        .map(|r| {
            w[r * cols..(r + 1) * cols]
                .iter()
                .zip(x)
                .map(|(a, b)| a * b)
                .sum()
        })
        .collect()
}

/// RoPE on one head in place; neox pairs (i, i + d/2), normal pairs (2i, 2i+1).
pub fn rope(v: &mut [f32], pos: usize, base: f32, neox: bool) {
    let d = v.len();
    for i in 0..d / 2 {
        let theta = pos as f32 * base.powf(-2.0 * i as f32 / d as f32);
        let (a, b) = if neox {
            (i, i + d / 2)
        } else {
            (2 * i, 2 * i + 1)
        };
        let (x0, x1) = (v[a], v[b]);
        v[a] = x0 * theta.cos() - x1 * theta.sin();
        v[b] = x0 * theta.sin() + x1 * theta.cos();
    }
}

/// Causal attention of one query head over cached keys/values [pos+1][hd].
pub fn attend(q: &[f32], keys: &[Vec<f32>], values: &[Vec<f32>]) -> Vec<f32> {
    let scale = 1.0 / (q.len() as f32).sqrt();
    let scores: Vec<f32> = keys
        .iter()
        .map(|k| k.iter().zip(q).map(|(a, b)| a * b).sum::<f32>() * scale)
        .collect();
    let m = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
    let z: f32 = e.iter().sum();
    let mut out = vec![0f32; q.len()];
    for (p, v) in e.iter().zip(values) {
        for (o, x) in out.iter_mut().zip(v) {
            *o += p / z * x;
        }
    }
    out
}

/// The CPU reference forward pass: logits after each token of `tokens`.
pub fn reference_logits(tw: &TinyWeights, tokens: &[u32]) -> Vec<Vec<f32>> {
    let s = tw.spec;
    let t = |n: &str| tw.tensors.get(n).unwrap_or_else(|| panic!("{n}"));
    let (d, hd) = (s.d_model, s.d_model / s.n_head);
    let neox = s.arch.starts_with("qwen");
    let group = s.n_head / s.n_kv_head;
    let mut kcache: Vec<Vec<Vec<Vec<f32>>>> = vec![vec![Vec::new(); s.n_kv_head]; s.n_layer];
    let mut vcache = kcache.clone();
    let mut out = Vec::new();
    for (pos, &tok) in tokens.iter().enumerate() {
        let mut x = t("token_embd.weight")[tok as usize * d..(tok as usize + 1) * d].to_vec();
        for l in 0..s.n_layer {
            let n = |x: &str| format!("blk.{l}.{x}");
            let xn = rmsnorm(&x, t(&n("attn_norm.weight")), 1e-6);
            let bias = |v: Vec<f32>, name: &str| -> Vec<f32> {
                match tw.tensors.get(&n(name)) {
                    Some(b) => v.iter().zip(b).map(|(a, c)| a + c).collect(),
                    None => v,
                }
            };
            let mut q = bias(
                matvec(t(&n("attn_q.weight")), &xn, s.n_head * hd),
                "attn_q.bias",
            );
            let mut k = bias(
                matvec(t(&n("attn_k.weight")), &xn, s.n_kv_head * hd),
                "attn_k.bias",
            );
            let v = bias(
                matvec(t(&n("attn_v.weight")), &xn, s.n_kv_head * hd),
                "attn_v.bias",
            );
            // Qwen3: RMSNorm of each head of q and k before RoPE.
            for (v, name) in [
                (&mut q, "attn_q_norm.weight"),
                (&mut k, "attn_k_norm.weight"),
            ] {
                if let Some(w) = tw.tensors.get(&n(name)) {
                    for head in v.chunks_mut(hd) {
                        let normed = rmsnorm(head, w, 1e-6);
                        head.copy_from_slice(&normed);
                    }
                }
            }
            for h in 0..s.n_head {
                rope(&mut q[h * hd..(h + 1) * hd], pos, 10000.0, neox);
            }
            for h in 0..s.n_kv_head {
                rope(&mut k[h * hd..(h + 1) * hd], pos, 10000.0, neox);
                kcache[l][h].push(k[h * hd..(h + 1) * hd].to_vec());
                vcache[l][h].push(v[h * hd..(h + 1) * hd].to_vec());
            }
            let mut att = Vec::with_capacity(d);
            for h in 0..s.n_head {
                att.extend(attend(
                    &q[h * hd..(h + 1) * hd],
                    &kcache[l][h / group],
                    &vcache[l][h / group],
                ));
            }
            let o = matvec(t(&n("attn_output.weight")), &att, d);
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let xn = rmsnorm(&x, t(&n("ffn_norm.weight")), 1e-6);
            let dn = ffn(tw, l, &xn);
            x.iter_mut().zip(&dn).for_each(|(a, b)| *a += b);
        }
        let xn = rmsnorm(&x, t("output_norm.weight"), 1e-6);
        out.push(matvec(t("output.weight"), &xn, tw.vocab));
    }
    out
}

fn swiglu_mlp(g: &[f32], u: &[f32], down: &[f32], d: usize) -> Vec<f32> {
    let h: Vec<f32> = g
        .iter()
        .zip(u)
        .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
        .collect();
    matvec(down, &h, d)
}

/// Dense SwiGLU, or a carved (CMoE) mixture of experts: shared expert, then the router's
/// top-k routed experts (score |u·silu(g)| of the representative rows, softmax, selection by
/// probability + bias, weight 1).
fn ffn(tw: &TinyWeights, l: usize, xn: &[f32]) -> Vec<f32> {
    let s = tw.spec;
    let d = s.d_model;
    let n = |x: &str| format!("blk.{l}.{x}");
    let t = |name: &str| tw.tensors.get(&n(name)).unwrap_or_else(|| panic!("{name}"));
    if !tw.tensors.contains_key(&n("ffn_gate_exps.weight")) {
        let g = matvec(t("ffn_gate.weight"), xn, s.d_ff);
        let u = matvec(t("ffn_up.weight"), xn, s.d_ff);
        return swiglu_mlp(&g, &u, t("ffn_down.weight"), d);
    }
    let mut out = vec![0f32; d];
    // Where a carve's recovery fit applies, the shared expert's down-projection is
    // ffn_recover_shexp and the map is added.
    let recovering =
        pregate::model::config::recovery_applies(tw.experts_per_token, tw.fitted_used, tw.n_expert);
    if let Some(sg) = tw.tensors.get(&n("ffn_gate_shexp.weight")) {
        let rows = sg.len() / d;
        let g = matvec(sg, xn, rows);
        let u = matvec(t("ffn_up_shexp.weight"), xn, rows);
        let down = match tw.tensors.get(&n("ffn_recover_shexp.weight")) {
            Some(fitted) if recovering => fitted,
            _ => t("ffn_down_shexp.weight"),
        };
        out = swiglu_mlp(&g, &u, down, d);
    }
    let rg = t("ffn_gate_inp.weight");
    let n_exp = rg.len() / d;
    if tw.router.is_empty() {
        return native_moe(tw, l, xn, out);
    }
    let g = matvec(rg, xn, n_exp);
    // cmoe: |u·silu(g)| of representative rows, with a selection bias; lsq: linear scores.
    let (score, bias): (Vec<f32>, Vec<f32>) = if tw.router == "lsq" {
        (g, vec![0.0; n_exp])
    } else {
        let u = matvec(t("ffn_up_inp.weight"), xn, n_exp);
        let s = g
            .iter()
            .zip(&u)
            .map(|(g, u)| (u * g / (1.0 + (-g).exp())).abs())
            .collect();
        (s, t("exp_probs_b.bias").clone())
    };
    let mx = score.iter().copied().fold(f32::MIN, f32::max);
    let sum: f32 = score.iter().map(|v| (v - mx).exp()).sum();
    let mut order: Vec<usize> = (0..n_exp).collect();
    let key = |e: usize| (score[e] - mx).exp() / sum + bias[e];
    order.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
    let m = t("ffn_gate_exps.weight").len() / d / n_exp;
    for &e in order.iter().take(tw.experts_per_token.min(n_exp)) {
        tw.routes.borrow_mut().push(e as u16);
        let rows = |name: &str, per: usize, cols: usize| -> Vec<f32> {
            t(name)[e * per * cols..(e + 1) * per * cols].to_vec()
        };
        let g = matvec(&rows("ffn_gate_exps.weight", m, d), xn, m);
        let u = matvec(&rows("ffn_up_exps.weight", m, d), xn, m);
        let y = swiglu_mlp(&g, &u, &rows("ffn_down_exps.weight", d, m), d);
        out.iter_mut().zip(&y).for_each(|(a, b)| *a += b);
    }
    // carve's recovery map: W·x + b.
    if let Some(w) = tw.tensors.get(&n("ffn_recover.weight")) {
        if recovering {
            let y = matvec(w, xn, d);
            let b = t("ffn_recover.bias");
            out.iter_mut()
                .zip(y.iter().zip(b))
                .for_each(|(o, (y, b))| *o += y + b);
            // Its correction for tokens that run another count than the fitted one.
            let k = tw.experts_per_token.min(n_exp);
            let [v, u, b] = pregate::model::config::count_fit_tensors(l, k);
            if let (Some(v), true) = (tw.tensors.get(&v), k != tw.fitted_used) {
                let z = matvec(v, xn, v.len() / d);
                let y = matvec(&tw.tensors[&u], &z, d);
                out.iter_mut()
                    .zip(y.iter().zip(&tw.tensors[&b]))
                    .for_each(|(o, (y, b))| *o += y + b);
            }
        }
    }
    out
}

/// qwen2moe: softmax over router logits, the top-k experts weighted by their probability,
/// plus the shared expert scaled by sigmoid(x · ffn_gate_inp_shexp).
fn native_moe(tw: &TinyWeights, l: usize, xn: &[f32], shared: Vec<f32>) -> Vec<f32> {
    let d = tw.spec.d_model;
    let n = |x: &str| format!("blk.{l}.{x}");
    let t = |name: &str| tw.tensors.get(&n(name)).unwrap_or_else(|| panic!("{name}"));
    // qwen2moe's shared expert is gated; qwen3moe has none.
    let mut out: Vec<f32> = match tw.tensors.get(&n("ffn_gate_inp_shexp.weight")) {
        Some(g) => {
            let gate: f32 = g.iter().zip(xn).map(|(a, b)| a * b).sum();
            shared.iter().map(|v| v / (1.0 + (-gate).exp())).collect()
        }
        None => shared,
    };
    let n_exp = t("ffn_gate_inp.weight").len() / d;
    let logits = matvec(t("ffn_gate_inp.weight"), xn, n_exp);
    let mx = logits.iter().copied().fold(f32::MIN, f32::max);
    let sum: f32 = logits.iter().map(|v| (v - mx).exp()).sum();
    let p: Vec<f32> = logits.iter().map(|v| (v - mx).exp() / sum).collect();
    let mut order: Vec<usize> = (0..n_exp).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    let m = t("ffn_gate_exps.weight").len() / d / n_exp;
    let chosen = &order[..tw.experts_per_token.min(n_exp)];
    // qwen3moe renormalises the chosen probabilities to sum to 1.
    let norm = match tw.spec.arch {
        "qwen3moe" => chosen.iter().map(|e| p[*e]).sum::<f32>(),
        _ => 1.0,
    };
    for &e in chosen {
        let rows = |name: &str, per: usize, cols: usize| -> Vec<f32> {
            t(name)[e * per * cols..(e + 1) * per * cols].to_vec()
        };
        let g = matvec(&rows("ffn_gate_exps.weight", m, d), xn, m);
        let u = matvec(&rows("ffn_up_exps.weight", m, d), xn, m);
        let y = swiglu_mlp(&g, &u, &rows("ffn_down_exps.weight", d, m), d);
        out.iter_mut()
            .zip(&y)
            .for_each(|(a, b)| *a += p[e] / norm * b);
    }
    out
}

/// Every tensor of a GGUF written by a tiny-model test (dense or carved), dequantized, for
/// the CPU reference. `experts_per_token` applies to MoE layers.
pub fn load_weights(path: &Path, spec: TinySpec, experts_per_token: usize) -> TinyWeights {
    let f = pregate::format::GgufFile::open(path).expect("open");
    let arch_u64 = |key: &str| {
        f.get("general.architecture")
            .and_then(|v| v.as_str())
            .and_then(|a| f.get(&format!("{a}.{key}")))
            .and_then(|v| v.as_u64())
            .unwrap_or(0) as usize
    };
    let mut tensors = std::collections::HashMap::new();
    for t in &f.tensors {
        let mut v = vec![0f32; t.n_elements() as usize];
        dequantize(t.dtype, f.bytes(t), &mut v).expect("dequantize");
        tensors.insert(t.name.clone(), v);
    }
    TinyWeights {
        spec,
        vocab: f.require("token_embd.weight").expect("embd").rows_cols().0,
        tensors,
        experts_per_token,
        routes: Default::default(),
        router: f
            .get("pregate.moe.router")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string(),
        fitted_used: arch_u64("expert_used_count"),
        n_expert: arch_u64("expert_count"),
    }
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

pub fn calib_file(dir: &Path) -> PathBuf {
    let text: String = (0..400)
        .map(|i| {
            format!(
                "fn item_{i}(x: u32) -> u32 {{ x * {i} + {} }} // calibration\n",
                i % 7
            )
        })
        .collect();
    let p = dir.join("calib.txt");
    std::fs::write(&p, text).expect("write calib");
    p
}

/// A fresh test directory named `tag` holding the default tiny dense model (`seed`):
/// (directory, model path).
pub fn tiny_dense(tag: &str, seed: u64) -> (PathBuf, PathBuf) {
    let dir = tmp_dir(tag);
    let dense = dir.join("dense.gguf");
    write_tiny_model(&dense, TinySpec::default(), seed);
    (dir, dense)
}

/// Writes a tiny dense model and carves it (2 layers) with the representative router.
pub fn carve_tiny(tag: &str, experts: usize, shared: usize, active: usize) -> (PathBuf, PathBuf) {
    let (dir, dense) = tiny_dense(tag, 21);
    let out = dir.join("carved.gguf");
    let opts = pregate::carve::CarveOptions {
        n_experts: experts,
        n_shared: shared,
        n_active: active,
        calib: vec![calib_file(&dir)],
        calib_tokens: 600,
        seq_len: 200,
        router_fit: pregate::carve::RouterFit::Representative,
        // The recovery fit has its own test (tests/carve.rs).
        recover: false,
        ..Default::default()
    };
    let summary = pregate::carve::carve(&dense, &out, &opts, |_| {}).expect("carve");
    assert_eq!(summary.layers, 2);
    assert_eq!(summary.calib_tokens, 600);
    (dense, out)
}

/// Logits after a prefill of all but the last three of `tokens` (the grouped expert
/// kernels), then after each of three decode steps.
pub fn step_logits(engine: &pregate::Engine, tokens: &[u32]) -> Vec<Vec<f32>> {
    let mut s = engine.session().expect("session");
    let split = tokens.len() - 3;
    let mut out = vec![s.next_logits(&tokens[..split]).expect("prefill")];
    for &t in &tokens[split..] {
        out.push(s.next_logits(&[t]).expect("decode"));
    }
    out
}

/// Runs the pregate binary with `args`, asserts it succeeded, and returns its stdout.
pub fn run_cli(args: &[&str]) -> String {
    let out = cli(args);
    assert!(
        out.status.success(),
        "pregate {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf8 stdout")
}

/// Runs the binary with `args`; whatever it gave.
pub fn cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_pregate"))
        .args(args)
        .output()
        .expect("run pregate")
}

/// Writes `file` to `out` without the tensors `names`.
pub fn copy_without_tensors(file: &pregate::format::GgufFile, names: &[&str], out: &Path) {
    let mut w = pregate::format::GgufWriter::new();
    for (k, v) in &file.metadata {
        w.meta(k, v.clone());
    }
    for t in file
        .tensors
        .iter()
        .filter(|t| !names.contains(&t.name.as_str()))
    {
        w.tensor(&t.name, t.dtype, &t.dims, file.bytes(t).to_vec())
            .expect("tensor");
    }
    w.write(out).expect("write");
}
