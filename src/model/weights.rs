//! A loaded model: the mapped file, its config, and its weights on the GPU. Weights are
//! read from the mapping and uploaded once; state (KV cache, activations) lives in
//! [`super::Session`] so that one model can serve several conversations.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::{GgufFile, TensorInfo};
use crate::gpu::{Gpu, GpuBuffer, Matrix, Vector};
use crate::quant::dequantize;

use super::config::{count_fit_tensors, ModelConfig, MoeConfig, RecoveryFit};
use crate::gpu::ops::RouteScore;
use crate::router::adaptive::KEEP_ALL;

/// One transformer block.
pub struct LayerWeights {
    pub attn_norm: Vector,      // [d_model]
    pub q: Matrix,              // [n_head * head_dim, d_model]
    pub q_bias: Option<Vector>, // [n_head * head_dim]
    /// Qwen3: RMSNorm weights applied to each head of q and of k before RoPE.
    pub q_norm: Option<Vector>, // [head_dim]
    pub k_norm: Option<Vector>, // [head_dim]
    pub k: Matrix,              // [n_kv_head * head_dim, d_model]
    pub k_bias: Option<Vector>,
    pub v: Matrix, // [n_kv_head * head_dim, d_model]
    pub v_bias: Option<Vector>,
    pub o: Matrix,        // [d_model, n_head * head_dim]
    pub ffn_norm: Vector, // [d_model]
    pub ffn: Ffn,
}

/// A gated feed-forward block: gate, up ([n, d_model]) and down ([d_model, n]).
pub struct Mlp {
    pub gate: Matrix,
    pub up: Matrix,
    pub down: Matrix,
}

pub enum Ffn {
    Dense(Mlp),
    Moe(Box<MoeWeights>),
}

/// A mixture-of-experts FFN. Routed experts are stacked: the expert in slot s owns rows
/// s*expert_ff.. of gate/up and rows s*d_model.. of down. With every expert resident, slot
/// s holds expert s; with an expert cache, these are its pools and the slot table says who
/// is where.
pub struct MoeWeights {
    /// Router rows [n_expert, d_model]: logits (native) or CMoE's representative gate rows.
    pub router_gate: Matrix,
    /// CMoE's representative up rows (None for native routers).
    pub router_up: Option<Matrix>,
    /// Selection-only load-balance bias `[n_expert]` (zeros when the file has none).
    pub bias: Vector,
    pub gate_exps: Matrix, // [n_expert * expert_ff, d_model]
    pub up_exps: Matrix,   // [n_expert * expert_ff, d_model]
    pub down_exps: Matrix, // [n_expert * d_model, expert_ff]
    /// Neurons per routed expert in this layer (at most the config's `expert_ff`).
    pub expert_ff: usize,
    pub shared: Option<Mlp>,
    /// qwen2moe: the shared expert's output is scaled by sigmoid(x · shared_gate).
    pub shared_gate: Option<Matrix>, // [1, d_model]
    /// A carved model's linear recovery map [d_model, d_model] and bias: its estimate of
    /// what the unchosen experts would add (carve --recover). Loaded only when tokens use
    /// about as many experts as it was fitted for, or fewer (`config::recovery_applies`).
    pub recover: Option<(Matrix, Option<Vector>)>,
    /// The carve's corrections of that map for tokens that run another number of experts
    /// (adaptive gating, `--experts-per-token`); loaded with the map.
    pub count_fits: Option<CountFits>,
}

/// A layer's count corrections (`config::count_fit_tensors`), as f32 and stacked in the
/// order of their counts: V `[rank, d_model]`, U `[d_model, rank]` and b `[d_model]` each.
pub struct CountFits {
    pub input: Vector,
    pub output: Vector,
    pub bias: Vector,
    pub rank: usize,
    /// Bit k: count k has a correction.
    pub mask: u32,
}

/// Most rank a count correction may have (moe_recover.wgsl's MAX_RANK).
const MAX_COUNT_FIT_RANK: usize = 256;

/// The counts whose corrections layer `l` loads: those in the file that a token may keep
/// (up to `most`), other than the fitted one, where the layers' recovery fit runs.
pub(crate) fn loaded_count_fits(f: &GgufFile, l: usize, m: &MoeConfig, most: usize) -> Vec<usize> {
    let map = &m.recovery_tensors(l)[0];
    if m.fit != RecoveryFit::Layers || !m.recovering() || f.tensor(map).is_none() {
        return Vec::new();
    }
    (1..=most.min(31))
        .filter(|&k| k != m.fitted_used)
        .filter(|&k| f.tensor(&count_fit_tensors(l, k)[0]).is_some())
        .collect()
}

fn count_fits(
    gpu: &Gpu,
    f: &GgufFile,
    l: usize,
    m: &MoeConfig,
    d: usize,
) -> Result<Option<CountFits>> {
    let counts = loaded_count_fits(f, l, m, m.n_slots);
    let Some(&first) = counts.first() else {
        return Ok(None);
    };
    let t = f.require(&count_fit_tensors(l, first)[0])?;
    let rank = t.dims.get(1).copied().unwrap_or(0) as usize;
    if rank == 0 || rank > MAX_COUNT_FIT_RANK.min(d) {
        return Err(Error::BadTensor {
            tensor: t.name.clone(),
            why: format!("rank {rank}, expected 1..={}", MAX_COUNT_FIT_RANK.min(d)),
        });
    }
    let (mut input, mut output, mut bias) = (Vec::new(), Vec::new(), Vec::new());
    let mut mask = 0u32;
    for &k in &counts {
        let [v, u, b] = count_fit_tensors(l, k);
        for (name, dims, out) in [
            (v, vec![d, rank], &mut input),
            (u, vec![rank, d], &mut output),
            (b, vec![d], &mut bias),
        ] {
            let t = f.require(&name)?;
            check_shape(t, &dims)?;
            let at = out.len();
            out.resize(at + dims.iter().product::<usize>(), 0.0);
            dequantize(t.dtype, f.bytes(t), &mut out[at..])?;
        }
        mask |= 1 << k;
    }
    Ok(Some(CountFits {
        input: Vector::upload(gpu, "count fit V", &input)?,
        output: Vector::upload(gpu, "count fit U", &output)?,
        bias: Vector::upload(gpu, "count fit bias", &bias)?,
        rank,
        mask,
    }))
}

pub struct Weights {
    pub embed: Matrix, // [vocab, d_model]
    pub layers: Vec<LayerWeights>,
    pub out_norm: Vector,        // [d_model]
    pub lm_head: Option<Matrix>, // [vocab, d_model]; None: tied to `embed`
    /// [n_layer, n_expert] u32: each expert's slot (moe.wgsl's slot_of). The identity when
    /// every expert is resident.
    pub slot_table: GpuBuffer,
    /// `[n_layer]` f32: adaptive gating's keep threshold per layer (moe_route.wgsl);
    /// [`KEEP_ALL`] when adaptive gating is off.
    pub adaptive_keep: GpuBuffer,
    /// [kept experts, routed tokens] u32, summed by the router kernels (mean active experts).
    pub active_experts: GpuBuffer,
    active_readback: GpuBuffer,
}

impl Weights {
    pub fn lm_head(&self) -> &Matrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// The layers whose FFN is a mixture of experts (a carve may leave some dense).
    pub fn moe_layers(&self) -> Vec<usize> {
        let layers = self.layers.iter().enumerate();
        let moe = layers.filter(|(_, l)| matches!(l.ffn, Ffn::Moe(_)));
        moe.map(|(i, _)| i).collect()
    }
}

pub struct Model {
    pub file: GgufFile,
    pub config: ModelConfig,
    pub weights: Weights,
    pub gpu: Arc<Gpu>,
    /// The expert cache, when routed experts do not all fit in VRAM.
    pub offload: Option<super::offload::Offload>,
    /// The pre-gating router, when routing or prefetch use it.
    pub router: Option<crate::router::PreGateRouter>,
    /// Who picks each token's experts.
    pub routing: crate::moe::Routing,
}

fn matrix(gpu: &Gpu, f: &GgufFile, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
    let t = f.require(name)?;
    check_shape(t, &[cols, rows])?;
    Matrix::upload(gpu, name, t.dtype, rows, cols, f.bytes(t))
}

fn vector(gpu: &Gpu, f: &GgufFile, name: &str, len: usize) -> Result<Vector> {
    let t = f.require(name)?;
    check_shape(t, &[len])?;
    let mut v = vec![0f32; len];
    dequantize(t.dtype, f.bytes(t), &mut v)?;
    Vector::upload(gpu, name, &v)
}

fn optional_vector(gpu: &Gpu, f: &GgufFile, name: &str, len: usize) -> Result<Option<Vector>> {
    match f.tensor(name) {
        Some(_) => vector(gpu, f, name, len).map(Some),
        None => Ok(None),
    }
}

/// Layer `l`'s gated MLP `blk.l.ffn_{gate,up}{suffix}` of `n` neurons, whose
/// down-projection is the tensor `down`.
fn mlp(
    gpu: &Gpu,
    f: &GgufFile,
    l: usize,
    suffix: &str,
    n: usize,
    d: usize,
    down: &str,
) -> Result<Mlp> {
    let name = |s: &str| format!("blk.{l}.ffn_{s}{suffix}.weight");
    Ok(Mlp {
        gate: matrix(gpu, f, &name("gate"), n, d)?,
        up: matrix(gpu, f, &name("up"), n, d)?,
        down: matrix(gpu, f, down, d, n)?,
    })
}

/// The tensor layer `l`'s shared expert takes its down-projection from: a carve's recovery
/// fit corrects it (`ffn_recover_shexp`), used wherever the fit applies.
pub(crate) fn shared_down_name(f: &GgufFile, l: usize, m: &MoeConfig) -> String {
    let [_, _, fitted] = m.recovery_tensors(l);
    match f.tensor(&fitted) {
        Some(_) if m.recovering() => fitted,
        _ => format!("blk.{l}.ffn_down_shexp.weight"),
    }
}

/// A stacked expert tensor ggml-shaped [cols, rows_per_expert, n_expert], uploaded unsharded
/// (the expert kernels address it as one binding); with `slots`, an empty pool of that many
/// experts instead.
fn experts(
    gpu: &Gpu,
    f: &GgufFile,
    name: &str,
    cols: usize,
    rows: usize,
    n: usize,
    slots: Option<usize>,
) -> Result<Matrix> {
    let t = f.require(name)?;
    check_shape(t, &[cols, rows, n])?;
    if let Some(s) = slots {
        return Matrix::zeroed(gpu, name, t.dtype, rows * s, cols);
    }
    let m = Matrix::upload(gpu, name, t.dtype, rows * n, cols, f.bytes(t))?;
    if m.shards.len() != 1 {
        return Err(Error::BadTensor {
            tensor: name.into(),
            why: "larger than the device's largest storage binding".into(),
        });
    }
    Ok(m)
}

fn moe_weights(
    gpu: &Gpu,
    f: &GgufFile,
    l: usize,
    m: &MoeConfig,
    d: usize,
    slots: Option<usize>,
) -> Result<MoeWeights> {
    let n = |s: &str| format!("blk.{l}.{s}");
    let e = m.n_expert;
    let [fit_weight, fit_bias, _] = m.recovery_tensors(l);
    // Layers may have experts (and shared experts) of their own sizes, up to the file's
    // expert_feed_forward_length: a readme carve sizes each layer to its clusters.
    let width = |name: &str, most: usize| -> Result<usize> {
        if most == 0 {
            return Ok(0);
        }
        let t = f.require(&n(name))?;
        let w = t.dims.get(1).copied().unwrap_or(0) as usize;
        if w == 0 || w > most {
            return Err(Error::BadTensor {
                tensor: t.name.clone(),
                why: format!("{w} neurons per expert, expected 1..={most}"),
            });
        }
        Ok(w)
    };
    let ff = width("ffn_gate_exps.weight", m.expert_ff)?;
    let shared_ff = width("ffn_gate_shexp.weight", m.shared_ff)?;
    let bias = match f.tensor(&n("exp_probs_b.bias")) {
        Some(_) => vector(gpu, f, &n("exp_probs_b.bias"), e)?,
        None => Vector::upload(gpu, "router bias", &vec![0.0; e])?,
    };
    Ok(MoeWeights {
        router_gate: matrix(gpu, f, &n("ffn_gate_inp.weight"), e, d)?,
        router_up: match f.tensor(&n("ffn_up_inp.weight")) {
            Some(_) => Some(matrix(gpu, f, &n("ffn_up_inp.weight"), e, d)?),
            None if m.score == RouteScore::Cmoe => {
                return Err(Error::MissingTensor(n("ffn_up_inp.weight")))
            }
            None => None,
        },
        bias,
        gate_exps: experts(gpu, f, &n("ffn_gate_exps.weight"), d, ff, e, slots)?,
        up_exps: experts(gpu, f, &n("ffn_up_exps.weight"), d, ff, e, slots)?,
        down_exps: experts(gpu, f, &n("ffn_down_exps.weight"), ff, d, e, slots)?,
        expert_ff: ff,
        shared: if shared_ff > 0 {
            let down = shared_down_name(f, l, m);
            Some(mlp(gpu, f, l, "_shexp", shared_ff, d, &down)?)
        } else {
            None
        },
        // llama.cpp stores it as a vector [d_model]; it is a one-row matrix.
        shared_gate: match f.tensor(&n("ffn_gate_inp_shexp.weight")) {
            Some(t) => {
                if t.n_elements() != d as u64 {
                    return Err(Error::BadTensor {
                        tensor: t.name.clone(),
                        why: format!("{:?} is not {d} values", t.dims),
                    });
                }
                Some(Matrix::upload(gpu, &t.name, t.dtype, 1, d, f.bytes(t))?)
            }
            None => None,
        },
        recover: match (f.tensor(&fit_weight), m.recovering()) {
            // Fitted for the carved number of experts per token (all experts active is
            // the dense model).
            (Some(_), true) => Some((
                matrix(gpu, f, &fit_weight, d, d)?,
                optional_vector(gpu, f, &fit_bias, d)?,
            )),
            _ => None,
        },
        count_fits: count_fits(gpu, f, l, m, d)?,
    })
}

fn check_shape(t: &TensorInfo, want: &[usize]) -> Result<()> {
    let got: Vec<usize> = t.dims.iter().map(|d| *d as usize).collect();
    if got != want {
        return Err(Error::BadTensor {
            tensor: t.name.clone(),
            why: format!("shape {got:?}, expected {want:?}"),
        });
    }
    Ok(())
}

impl Model {
    /// Uploads every weight of `file`, whose config the caller has read (and may have
    /// adjusted, e.g. experts per token); `progress(done, total)` is called after each
    /// tensor. With `slots` (one count per layer), routed experts stay in the file and each
    /// MoE layer gets a pool of that many expert slots instead (see [`Model::offload`]).
    pub fn load(
        gpu: Arc<Gpu>,
        file: GgufFile,
        c: ModelConfig,
        slots: Option<&[usize]>,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Model> {
        let _span = tracing::info_span!("load", path = %file.path.display()).entered();
        let (d, qd, kvd) = (c.d_model, c.n_head * c.head_dim, c.n_kv_head * c.head_dim);
        let total = c.n_layer + 2;
        let f = &file;
        let g = &*gpu;
        let embed = matrix(g, f, "token_embd.weight", c.vocab, d)?;
        progress(1, total);
        let mut layers = Vec::with_capacity(c.n_layer);
        for l in 0..c.n_layer {
            let n = |s: &str| format!("blk.{l}.{s}");
            layers.push(LayerWeights {
                attn_norm: vector(g, f, &n("attn_norm.weight"), d)?,
                q: matrix(g, f, &n("attn_q.weight"), qd, d)?,
                q_bias: optional_vector(g, f, &n("attn_q.bias"), qd)?,
                q_norm: optional_vector(g, f, &n("attn_q_norm.weight"), c.head_dim)?,
                k_norm: optional_vector(g, f, &n("attn_k_norm.weight"), c.head_dim)?,
                k: matrix(g, f, &n("attn_k.weight"), kvd, d)?,
                k_bias: optional_vector(g, f, &n("attn_k.bias"), kvd)?,
                v: matrix(g, f, &n("attn_v.weight"), kvd, d)?,
                v_bias: optional_vector(g, f, &n("attn_v.bias"), kvd)?,
                o: matrix(g, f, &n("attn_output.weight"), d, qd)?,
                ffn_norm: vector(g, f, &n("ffn_norm.weight"), d)?,
                ffn: match &c.moe {
                    None => Ffn::Dense(mlp(
                        g,
                        f,
                        l,
                        "",
                        c.d_ff,
                        d,
                        &format!("blk.{l}.ffn_down.weight"),
                    )?),
                    Some(m) => {
                        let s = slots.map(|s| s.get(l).copied().unwrap_or(m.n_slots));
                        Ffn::Moe(Box::new(moe_weights(g, f, l, m, d, s)?))
                    }
                },
            });
            progress(l + 2, total);
        }
        let out_norm = vector(g, f, "output_norm.weight", d)?;
        let lm_head = match f.tensor("output.weight") {
            Some(_) => Some(matrix(g, f, "output.weight", c.vocab, d)?),
            None => None,
        };
        let n_expert = c.moe.as_ref().map_or(0, |m| m.n_expert);
        let identity: Vec<u32> = (0..c.n_layer).flat_map(|_| 0..n_expert as u32).collect();
        let slot_table = g.storage_init("expert slot table", bytemuck::cast_slice(&identity))?;
        let keep = vec![KEEP_ALL; c.n_layer];
        let adaptive_keep = g.storage_init("adaptive keep", bytemuck::cast_slice(&keep))?;
        let active_experts = g.storage_init("active experts", &[0; 16])?;
        let active_readback = g.readback("active experts readback", 16)?;
        progress(total, total);
        Ok(Model {
            file,
            config: c,
            weights: Weights {
                embed,
                layers,
                out_norm,
                lm_head,
                slot_table,
                adaptive_keep,
                active_experts,
                active_readback,
            },
            gpu,
            offload: None,
            router: None,
            routing: crate::moe::Routing::Layer,
        })
    }

    /// Routes each token to `k` experts (clamped to the routed count; `usize::MAX`: all).
    pub fn set_experts_per_token(&mut self, k: usize) -> Result<()> {
        self.config.set_experts_per_token(k)
    }

    /// Sets adaptive gating's keep threshold per layer ([`KEEP_ALL`]: fixed top-k); the
    /// router kernels read it at every step, so no plan is rebuilt.
    pub fn set_adaptive_keep(&self, keep: &[f32]) -> Result<()> {
        if keep.len() != self.config.n_layer {
            return Err(Error::InvalidArgument(format!(
                "{} adaptive thresholds for {} layers",
                keep.len(),
                self.config.n_layer
            )));
        }
        let q = &self.gpu.queue;
        q.write_buffer(&self.weights.adaptive_keep, 0, bytemuck::cast_slice(keep));
        Ok(())
    }

    /// Experts the MoE layers ran and the (token, layer) decisions they ran them for,
    /// since load or [`Model::reset_active_experts`].
    pub fn active_experts(&self) -> Result<(u64, u64)> {
        let w = &self.weights;
        let mut enc = self
            .gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("active experts"),
            });
        enc.copy_buffer_to_buffer(&w.active_experts, 0, &w.active_readback, 0, 8);
        self.gpu.queue.submit([enc.finish()]);
        let words: Vec<u32> = bytemuck::pod_collect_to_vec(&self.gpu.read(&w.active_readback, 8)?);
        Ok((words[0] as u64, words[1] as u64))
    }

    pub fn reset_active_experts(&self) {
        let q = &self.gpu.queue;
        q.write_buffer(&self.weights.active_experts, 0, &[0; 8]);
    }

    /// Bytes of weights resident on the GPU.
    pub fn weight_bytes(&self) -> u64 {
        let w = &self.weights;
        let mut n = w.embed.gpu_bytes() + w.lm_head.as_ref().map_or(0, |m| m.gpu_bytes());
        for l in &w.layers {
            let mut mats = vec![&l.q, &l.k, &l.v, &l.o];
            match &l.ffn {
                Ffn::Dense(mlp) => mats.extend([&mlp.gate, &mlp.up, &mlp.down]),
                Ffn::Moe(m) => {
                    mats.extend([&m.router_gate, &m.gate_exps, &m.up_exps, &m.down_exps]);
                    mats.extend(m.router_up.as_ref());
                    mats.extend(m.shared_gate.as_ref());
                    mats.extend(m.recover.as_ref().map(|r| &r.0));
                    if let Some(s) = &m.shared {
                        mats.extend([&s.gate, &s.up, &s.down]);
                    }
                }
            }
            n += mats.iter().map(|m| m.gpu_bytes()).sum::<u64>();
        }
        n
    }
}
