//! Per-conversation state: activations, the KV cache, and the tokens it holds. Steps are one
//! encoder and one submit each; only the requested output is read back.

use std::collections::HashMap;
use std::sync::Arc;

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::gpu::{DispatchList, GpuBuffer};

use super::forward::{self, Output};
use super::weights::Model;
use crate::moe::cache::SKIP;

/// Most candidates the GPU top-k returns; larger k reads back all logits instead.
pub const TOPK_CAP: usize = 256;

/// Largest number of tokens processed in one step (prefill is split into chunks of this),
/// by kernel layout. GPUs take 512: their mat-mul tiles are 64 tokens wide, and each step
/// costs a submit and a wait that a longer chunk spreads over more tokens. CPU adapters
/// gain nothing past 128 and would hold 4x the activations.
pub fn prefill_ubatch(cpu_layout: bool) -> usize {
    if cpu_layout {
        128
    } else {
        512
    }
}

/// Most tokens ahead that the lookahead policy plans over (the router's CPU time is
/// microseconds a token; beyond a few chunks the nearest uses decide anyway).
const LOOKAHEAD_TOKENS: usize = 4096;

/// Rows of logits computed at a time when scoring (perplexity): the logits buffer's rows.
pub const SCORE_ROWS: usize = 16;

/// Most tokens a carve's FFN capture takes per step: its buffers hold every layer's
/// activations for that many tokens, twice (GPU and readback), so they stay at the CPU
/// adapters' step even where prefill steps are longer.
const CAPTURE_ROWS: usize = 128;

/// GPU buffers of one session. Shapes in tokens (`ub` = ubatch rows).
pub struct StateBuffers {
    pub ctx: usize,
    pub ub: usize,
    pub x: GpuBuffer,             // [ub, d_model] residual stream
    pub xn: GpuBuffer,            // [ub, d_model] normed input
    pub q: GpuBuffer,             // [ub, n_head * head_dim]
    pub k: GpuBuffer,             // [ub, n_kv_head * head_dim]
    pub v: GpuBuffer,             // [ub, n_kv_head * head_dim]
    pub attn: GpuBuffer,          // [ub, n_head * head_dim]
    pub attn_spans: GpuBuffer,    // split decode attention: per-span partial results
    pub gate: GpuBuffer,          // [ub, ffn_width]
    pub up: GpuBuffer,            // [ub, ffn_width]
    pub router_g: GpuBuffer,      // [ub, n_expert] router outputs (MoE)
    pub router_u: GpuBuffer,      // [ub, n_expert]
    pub expert_ids: GpuBuffer,    // [ub, n_slots] u32, written by the router on the GPU
    pub expert_wts: GpuBuffer,    // [ub, n_slots]
    pub expert_conf: GpuBuffer,   // [ub] f32: each token's confidence (config::Confidence)
    pub expert_lists: GpuBuffer,  // [n_expert, ub] u32: each expert's slots (prefill)
    pub expert_counts: GpuBuffer, // [n_expert] u32
    pub shared_gate: GpuBuffer,   // [ub] qwen2moe's shared-expert gate logits
    pub expert_out: GpuBuffer,    // [ub * n_slots, d_model] per-slot down outputs (prefill)
    pub expert_h: GpuBuffer,      // [ub, ffn_width] silu(gate) * up of the experts (prefill)
    pub pred_ids: GpuBuffer,      // [n_expert] u32: the next layer's experts, predicted
    pub pred_wts: GpuBuffer,      // [n_expert]
    /// Expert ids (and predictions) read back at each MoE layer when experts are offloaded.
    pub route_readback: GpuBuffer,
    /// `--routing pregate`: each layer's expert ids and weights, written by the host:
    /// layer l at element l * plan_stride, [ub, n_used] each.
    pub plan_ids: GpuBuffer,
    pub plan_wts: GpuBuffer,
    pub plan_stride: usize,
    /// Per layer [capture_rows, d_model + 2 d_ff]: FFN input, gate and up (Output::Capture
    /// only).
    pub capture: Vec<GpuBuffer>,
    /// [n_layer, ub, n_slots] u32 expert ids of every MoE layer, then [n_layer, ub] f32
    /// confidences (Output::Route).
    pub route: GpuBuffer,
    pub logits: GpuBuffer,   // [SCORE_ROWS, vocab]
    pub ids: GpuBuffer,      // [ub] u32
    pub targets: GpuBuffer,  // [ub] u32
    pub nll: GpuBuffer,      // [ub] f32
    pub argmax: GpuBuffer,   // [1] u32
    pub topk_idx: GpuBuffer, // [1 + TOPK_CAP] u32: count, then ids
    pub topk_val: GpuBuffer, // [TOPK_CAP] f32
    pub step: GpuBuffer,     // uniform Step
    pub kc: Vec<GpuBuffer>,  // per layer [n_kv_head, ctx, head_dim]
    pub vc: Vec<GpuBuffer>,
    pub readback: GpuBuffer,
    pub dummy: GpuBuffer,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Step {
    pos0: u32,
    n_tokens: u32,
    _pad: [u32; 2],
}

impl StateBuffers {
    /// Rows of each capture buffer: the most tokens a capture step takes.
    pub fn capture_rows(&self) -> usize {
        self.ub.min(CAPTURE_ROWS)
    }

    fn new(model: &Model, ctx: usize, ub: usize) -> Result<StateBuffers> {
        let logit_rows = SCORE_ROWS.min(ub);
        let g = &model.gpu;
        let c = &model.config;
        let f = 4u64;
        let ubx = ub as u64 * f;
        let (qd, kvd) = (
            (c.n_head * c.head_dim) as u64,
            (c.n_kv_head * c.head_dim) as u64,
        );
        let cache = super::memory::k_cache_bytes_per_token(c) * ctx as u64;
        let mut kc = Vec::with_capacity(c.n_layer);
        let mut vc = Vec::with_capacity(c.n_layer);
        for _ in 0..c.n_layer {
            kc.push(g.storage("k cache", cache)?);
            vc.push(g.storage("v cache", cache)?);
        }
        let vocab = c.vocab as u64;
        let n_expert = c.moe.as_ref().map_or(1, |m| m.n_expert) as u64;
        // Per-slot expert outputs exist only for MoE models (every expert may be used).
        let moe_slots = c.moe.as_ref().map_or(0, |m| m.n_expert) as u64;
        // Layer rows of the pre-gate's plan start on 256-byte binding offsets.
        let plan_stride = (ub * c.moe.as_ref().map_or(0, |m| m.n_expert)).next_multiple_of(64);
        let moe_layers = u64::from(c.moe.is_some());
        let route_bytes =
            (ubx * c.n_layer as u64 * (1 + c.moe.as_ref().map_or(0, |m| m.n_slots)) as u64).max(16);
        Ok(StateBuffers {
            ctx,
            ub,
            x: g.storage("x", ubx * c.d_model as u64)?,
            xn: g.storage("xn", ubx * c.d_model as u64)?,
            q: g.storage("q", ubx * qd)?,
            k: g.storage("k", ubx * kvd)?,
            v: g.storage("v", ubx * kvd)?,
            attn: g.storage("attn", ubx * qd)?,
            attn_spans: g.storage(
                "attention spans",
                4 * crate::gpu::ops::attention_scratch_floats(crate::gpu::ops::AttnShape {
                    n_head: c.n_head as u32,
                    n_kv_head: c.n_kv_head as u32,
                    head_dim: c.head_dim as u32,
                    ctx: ctx as u32,
                }),
            )?,
            gate: g.storage("gate", ubx * c.ffn_width() as u64)?,
            up: g.storage("up", ubx * c.ffn_width() as u64)?,
            router_g: g.storage("router g", ubx * n_expert)?,
            router_u: g.storage("router u", ubx * n_expert)?,
            expert_ids: g.storage("expert ids", ubx * n_expert)?,
            expert_wts: g.storage("expert weights", ubx * n_expert)?,
            expert_conf: g.storage("expert confidence", ubx)?,
            expert_lists: g.storage("expert lists", ubx * n_expert)?,
            expert_counts: g.storage("expert counts", f * n_expert)?,
            shared_gate: g.storage("shared gate", ubx)?,
            expert_out: g.storage(
                "expert outputs",
                (ubx * moe_slots * c.d_model as u64).max(16),
            )?,
            expert_h: g.storage("expert h", ubx * c.ffn_width() as u64)?,
            pred_ids: g.storage("predicted ids", f * n_expert)?,
            pred_wts: g.storage("predicted weights", f * n_expert)?,
            route_readback: g.readback("route readback", f * (ub as u64 + 1) * n_expert)?,
            plan_ids: g.storage(
                "pregate ids",
                f * (c.n_layer * plan_stride) as u64 * moe_layers,
            )?,
            plan_wts: g.storage(
                "pregate weights",
                f * (c.n_layer * plan_stride) as u64 * moe_layers,
            )?,
            plan_stride,
            capture: Vec::new(),
            route: g.storage("route", route_bytes)?,
            logits: g.storage("logits", logit_rows as u64 * vocab * f)?,
            ids: g.storage("ids", ubx)?,
            targets: g.storage("targets", ubx)?,
            nll: g.storage("nll", ubx)?,
            argmax: g.storage("argmax", f)?,
            topk_idx: g.storage("topk ids", (TOPK_CAP as u64 + 1) * f)?,
            topk_val: g.storage("topk values", TOPK_CAP as u64 * f)?,
            step: g.uniform_init("step", bytemuck::bytes_of(&Step::zeroed()))?,
            kc,
            vc,
            readback: g.readback("readback", (vocab * f).max(ubx).max(route_bytes))?,
            dummy: g.storage("dummy", 16)?,
        })
    }
}

/// A conversation: KV cache plus the tokens it holds, over a shared [`Model`].
pub struct Session {
    pub model: Arc<Model>,
    bufs: StateBuffers,
    plans: HashMap<(usize, Output), DispatchList>,
    tokens: Vec<u32>,
    capture_readback: Option<GpuBuffer>,
}

/// Attention binds a layer's whole K (and V) cache at once, so the context is bounded by
/// the adapter's largest storage binding, not only by memory; refuse it here, naming the
/// most that fits, instead of letting wgpu fail a bind group deep inside the first step.
fn check_kv_binding(model: &Model, ctx: usize) -> Result<()> {
    let per_token = super::memory::k_cache_bytes_per_token(&model.config);
    let needed = per_token.saturating_mul(ctx as u64);
    let limit = model.gpu.max_binding();
    if needed <= limit {
        return Ok(());
    }
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    Err(Error::InvalidArgument(format!(
        "a context of {ctx} tokens needs {:.1} MiB of K cache per layer, more than {} binds at once ({:.1} MiB); at most {} tokens fit (lower --ctx)",
        mib(needed),
        model.gpu.info.name,
        mib(limit),
        limit / per_token.max(1),
    )))
}

impl Session {
    pub fn new(model: Arc<Model>, ctx: usize) -> Result<Session> {
        if ctx == 0 {
            return Err(Error::InvalidArgument(
                "context length must be positive".into(),
            ));
        }
        check_kv_binding(&model, ctx)?;
        let ub = prefill_ubatch(model.gpu.cpu_layout).min(ctx);
        let bufs = StateBuffers::new(&model, ctx, ub)?;
        Ok(Session {
            model,
            bufs,
            plans: HashMap::new(),
            tokens: Vec::new(),
            capture_readback: None,
        })
    }

    pub fn ctx(&self) -> usize {
        self.bufs.ctx
    }

    /// Most tokens one step processes (longer prompts prefill in chunks of this).
    pub fn ubatch(&self) -> usize {
        self.bufs.ub
    }

    /// Tokens currently held in the KV cache.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Forgets everything after the first `n` tokens (their cache slots get overwritten).
    pub fn truncate(&mut self, n: usize) {
        self.tokens.truncate(n);
    }

    pub fn reset(&mut self) {
        self.tokens.clear();
    }

    fn check_room(&self, n: usize) -> Result<()> {
        if self.tokens.len() + n > self.bufs.ctx {
            return Err(Error::ContextOverflow {
                tokens: self.tokens.len() + n,
                ctx: self.bufs.ctx,
            });
        }
        Ok(())
    }

    /// Feeds `tokens` and returns the argmax of the logits after the last one.
    pub fn next_argmax(&mut self, tokens: &[u32]) -> Result<u32> {
        let out = self.feed(tokens, Output::Argmax, &[], 0)?;
        Ok(bytemuck::pod_read_unaligned::<u32>(&out[..4]))
    }

    /// Feeds `tokens` and returns the `k` (1..=TOPK_CAP) largest logits after the last one,
    /// as (id, logit) pairs in no particular order; ties at the k-th value may add a few.
    pub fn next_top_k(&mut self, tokens: &[u32], k: usize) -> Result<Vec<(u32, f32)>> {
        if k == 0 || k > TOPK_CAP {
            return Err(Error::InvalidArgument(format!(
                "top-k must be in 1..={TOPK_CAP}"
            )));
        }
        let out = self.feed(tokens, Output::TopK(k as u32), &[], 0)?;
        let words: Vec<u32> = bytemuck::pod_collect_to_vec(&out);
        let n = (words[0] as usize).min(TOPK_CAP);
        let ids = &words[1..1 + n];
        let vals = &words[1 + TOPK_CAP..1 + TOPK_CAP + n];
        Ok(ids
            .iter()
            .zip(vals)
            .map(|(i, v)| (*i, f32::from_bits(*v)))
            .collect())
    }

    /// Feeds `tokens` and returns the logits after the last one.
    pub fn next_logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        let out = self.feed(tokens, Output::Logits, &[], 0)?;
        Ok(bytemuck::pod_collect_to_vec(&out))
    }

    /// Feeds `tokens` and returns, for each, `-log p(targets[i] | tokens[..=i])`. Positions
    /// before `score_from` are returned as NaN: chunks made only of them skip the lm_head.
    pub fn nll(&mut self, tokens: &[u32], targets: &[u32], score_from: usize) -> Result<Vec<f32>> {
        if targets.len() != tokens.len() {
            return Err(Error::InvalidArgument(
                "targets and tokens differ in length".into(),
            ));
        }
        let out = self.feed(tokens, Output::Nll, targets, score_from)?;
        Ok(bytemuck::pod_collect_to_vec(&out))
    }

    /// Runs `tokens` through a dense model from an empty cache and hands each chunk's FFN
    /// activations to `sink(layer, n, xn, gate, up)`: `n` rows of the FFN input [n, d_model]
    /// and the gate and up pre-activations [n, d_ff]. Carving profiles neurons with these.
    pub fn capture_ffn(
        &mut self,
        tokens: &[u32],
        mut sink: impl FnMut(usize, usize, &[f32], &[f32], &[f32]),
    ) -> Result<()> {
        let c = self.model.config.clone();
        if c.moe.is_some() {
            return Err(Error::InvalidArgument(
                "the model is already a mixture of experts".into(),
            ));
        }
        let (ub, d, ff) = (self.bufs.capture_rows(), c.d_model, c.d_ff);
        let per_layer = (ub * (d + 2 * ff) * 4) as u64;
        if self.bufs.capture.is_empty() {
            let g = &self.model.gpu;
            for _ in 0..c.n_layer {
                self.bufs.capture.push(g.storage("capture", per_layer)?);
            }
            self.capture_readback =
                Some(g.readback("capture readback", per_layer * c.n_layer as u64)?);
        }
        self.reset();
        self.check_tokens(tokens, &[])?;
        for chunk in tokens.chunks(ub) {
            let bytes = self.step(chunk, Output::Capture, &[])?;
            let all: &[f32] = bytemuck::cast_slice(&bytes);
            let n = chunk.len();
            for (l, layer) in all.chunks_exact(ub * (d + 2 * ff)).enumerate() {
                let (xn, rest) = layer.split_at(ub * d);
                let (gate, up) = rest.split_at(ub * ff);
                sink(l, n, &xn[..n * d], &gate[..n * ff], &up[..n * ff]);
            }
        }
        Ok(())
    }

    /// Runs `tokens` through an MoE model and returns, per token, every layer's chosen
    /// expert ids: `[token][layer][n_slots]`, flattened. An expert that adaptive gating
    /// dropped appears as the token's first (a repeat needs no load).
    pub fn route_trace(&mut self, tokens: &[u32]) -> Result<Vec<u32>> {
        Ok(self.route_pass(tokens)?.0)
    }

    /// [`Session::route_trace`]'s ids, and each token's confidence, which adaptive gating
    /// thresholds ([`Confidence`](crate::model::config::Confidence)), per layer
    /// (`[token][layer]`).
    pub fn route_pass(&mut self, tokens: &[u32]) -> Result<(Vec<u32>, Vec<f32>)> {
        let c = self.model.config.clone();
        let Some(moe) = &c.moe else {
            return Err(Error::InvalidArgument(
                "expert traces need a mixture-of-experts model (see `pregate carve`)".into(),
            ));
        };
        let (ub, k, layers) = (self.bufs.ub, moe.n_slots, c.n_layer);
        self.check_tokens(tokens, &[])?;
        let mut ids_out = Vec::with_capacity(tokens.len() * layers * k);
        let mut conf_out = Vec::with_capacity(tokens.len() * layers);
        for chunk in tokens.chunks(ub) {
            let bytes = self.step(chunk, Output::Route, &[])?;
            let words: Vec<u32> = bytemuck::pod_collect_to_vec(&bytes);
            let (ids, conf) = words.split_at(layers * ub * k);
            for t in 0..chunk.len() {
                for l in 0..layers {
                    let at = (l * ub + t) * k;
                    let mine = &ids[at..at + k];
                    ids_out.extend(mine.iter().map(|&e| if e == SKIP { mine[0] } else { e }));
                    conf_out.push(f32::from_bits(conf[l * ub + t]));
                }
            }
        }
        Ok((ids_out, conf_out))
    }

    /// What every way of feeding tokens checks first: some tokens, room in the cache, and
    /// ids (and targets) inside the vocabulary (the embedding is indexed on the GPU).
    fn check_tokens(&self, tokens: &[u32], targets: &[u32]) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::InvalidArgument("no tokens to process".into()));
        }
        self.check_room(tokens.len())?;
        let vocab = self.model.config.vocab;
        if let Some(bad) = tokens.iter().chain(targets).find(|t| **t as usize >= vocab) {
            return Err(Error::InvalidArgument(format!(
                "token id {bad} is outside the vocabulary ({vocab})"
            )));
        }
        Ok(())
    }

    /// Runs `tokens` through the model in chunks of at most `ub`, returning the raw bytes of
    /// the requested output (for Nll: all chunks concatenated).
    fn feed(
        &mut self,
        tokens: &[u32],
        output: Output,
        targets: &[u32],
        score_from: usize,
    ) -> Result<Vec<u8>> {
        self.check_tokens(tokens, targets)?;
        let ub = self.bufs.ub;
        let mut result = Vec::new();
        let n_chunks = tokens.len().div_ceil(ub);
        let predicted = self.lookahead_plan(tokens);
        for (i, chunk) in tokens.chunks(ub).enumerate() {
            let last = i + 1 == n_chunks;
            if let (Some(off), Some(p)) = (&self.model.offload, &predicted) {
                // What this feed still holds after the chunk, as the router predicts it.
                off.set_future(p, (i + 1) * ub);
            }
            let out = match output {
                Output::Nll if (i + 1) * ub <= score_from => Output::None,
                Output::Nll => Output::Nll,
                o if last => o,
                _ => Output::None,
            };
            let tg = if out == Output::Nll {
                &targets[i * ub..i * ub + chunk.len()]
            } else {
                &[][..]
            };
            let bytes = self.step(chunk, out, tg)?;
            if output == Output::Nll && out == Output::None {
                result.extend(std::iter::repeat_n(f32::NAN.to_le_bytes(), chunk.len()).flatten());
            } else {
                result.extend(bytes);
            }
        }
        Ok(result)
    }

    /// With `--policy lookahead`: the pre-gating router's experts for each of `tokens`
    /// (`[layer][token]`, up to LOOKAHEAD_TOKENS of them), the future the cache plans by.
    fn lookahead_plan(&self, tokens: &[u32]) -> Option<Vec<Vec<Vec<u32>>>> {
        let (Some(off), Some(r), Some(moe)) = (
            &self.model.offload,
            &self.model.router,
            self.model.config.moe.as_ref(),
        ) else {
            return None;
        };
        if off.policy() != crate::moe::PolicyKind::Lookahead {
            return None;
        }
        let from = self.tokens.len().saturating_sub(2);
        let history: Vec<u32> = self.tokens[from..].iter().chain(tokens).copied().collect();
        let first = self.tokens.len() - from;
        let n = tokens.len().min(LOOKAHEAD_TOKENS);
        let mut per_layer = vec![Vec::with_capacity(n); self.model.config.n_layer];
        for t in first..first + n {
            for (l, experts) in r.predict(&history, t, moe.n_used).into_iter().enumerate() {
                per_layer[l].push(experts);
            }
        }
        Some(per_layer)
    }

    /// One submit: upload ids and position, replay the plan, copy the output back.
    fn step(&mut self, chunk: &[u32], output: Output, targets: &[u32]) -> Result<Vec<u8>> {
        let model = self.model.clone();
        let step_guard = model.offload.as_ref().map(|off| off.step_guard());
        let n = chunk.len();
        let pos0 = self.tokens.len();
        let key = (n, output);
        if !self.plans.contains_key(&key) {
            let plan = forward::build(&self.model, &self.bufs, n as u32, output)?;
            self.plans.insert(key, plan);
        }
        let plan = &self.plans[&key];
        let g = &self.model.gpu;
        let b = &self.bufs;
        g.queue.write_buffer(&b.ids, 0, bytemuck::cast_slice(chunk));
        if !targets.is_empty() {
            g.queue
                .write_buffer(&b.targets, 0, bytemuck::cast_slice(targets));
        }
        let step = Step {
            pos0: pos0 as u32,
            n_tokens: n as u32,
            _pad: [0; 2],
        };
        g.queue.write_buffer(&b.step, 0, bytemuck::bytes_of(&step));
        // The pre-gating router reads the last few tokens (an n-gram window).
        let from = self.tokens.len().saturating_sub(2);
        let history: Vec<u32> = self.tokens[from..].iter().chain(chunk).copied().collect();
        let decided = self.pregate_plan(&history, n)?;
        let mut enc = g
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("step"),
            });
        match &self.model.offload {
            Some(off) => {
                let decided = decided.as_deref();
                let m = &self.model;
                enc = super::offload::encode_offloaded(m, off, b, plan, &history, decided, n, enc)?;
            }
            None => {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("forward"),
                    timestamp_writes: None,
                });
                plan.encode(&mut pass);
            }
        }
        let (src, bytes): (&wgpu::Buffer, u64) = match output {
            Output::None => (&b.argmax, 0),
            Output::Argmax => (&b.argmax, 4),
            Output::Logits => (&b.logits, self.model.config.vocab as u64 * 4),
            Output::Nll => (&b.nll, n as u64 * 4),
            Output::TopK(_) => (&b.topk_idx, (2 * TOPK_CAP as u64 + 1) * 4),
            Output::Capture => (&b.argmax, 0),
            Output::Route => (&b.route, b.route.size()),
        };
        if let (Output::Capture, Some(rb)) = (output, &self.capture_readback) {
            let size = b.capture[0].size();
            for (l, cap) in b.capture.iter().enumerate() {
                enc.copy_buffer_to_buffer(cap, 0, rb, l as u64 * size, size);
            }
            g.queue.submit([enc.finish()]);
            g.check()?;
            self.tokens.extend_from_slice(chunk);
            return g.read(rb, size * b.capture.len() as u64);
        }
        if let Output::TopK(_) = output {
            let ids = (TOPK_CAP as u64 + 1) * 4;
            enc.copy_buffer_to_buffer(&b.topk_idx, 0, &b.readback, 0, ids);
            enc.copy_buffer_to_buffer(&b.topk_val, 0, &b.readback, ids, bytes - ids);
        } else if bytes > 0 {
            enc.copy_buffer_to_buffer(src, 0, &b.readback, 0, bytes);
        }
        g.queue.submit([enc.finish()]);
        if let Some(off) = &self.model.offload {
            off.submitted();
        }
        drop(step_guard);
        g.check()?;
        self.tokens.extend_from_slice(chunk);
        if bytes == 0 {
            return Ok(Vec::new());
        }
        g.read(&b.readback, bytes)
    }
}

impl Session {
    /// With `--routing pregate`: predicts every layer's experts for the last `n` tokens of
    /// `history`, uploads their ids and weights for the expert kernels, and returns each
    /// layer's distinct experts (what the cache must hold).
    fn pregate_plan(&self, history: &[u32], n: usize) -> Result<Option<Vec<Vec<u32>>>> {
        let (Some(r), crate::moe::Routing::Pregate, Some(moe)) = (
            &self.model.router,
            self.model.routing,
            self.model.config.moe.as_ref(),
        ) else {
            return Ok(None);
        };
        let (k, layers, stride) = (moe.n_used, self.model.config.n_layer, self.bufs.plan_stride);
        let mut ids = vec![0u32; layers * stride];
        let mut wts = vec![0f32; layers * stride];
        let mut union: Vec<Vec<u32>> = vec![Vec::new(); layers];
        let first = history.len() - n;
        for i in 0..n {
            for (l, chosen) in r
                .predict_scored(history, first + i, k)
                .into_iter()
                .enumerate()
            {
                let total: f32 = chosen.iter().map(|(_, p)| p).sum();
                for (j, (e, p)) in chosen.into_iter().enumerate() {
                    ids[l * stride + i * k + j] = e;
                    wts[l * stride + i * k + j] = match moe.weights {
                        crate::gpu::ops::RouteWeights::Ones => 1.0,
                        crate::gpu::ops::RouteWeights::Renormalised => p / total.max(1e-12),
                        crate::gpu::ops::RouteWeights::Probabilities => p,
                    };
                    if !union[l].contains(&e) {
                        union[l].push(e);
                    }
                }
            }
        }
        let q = &self.model.gpu.queue;
        q.write_buffer(&self.bufs.plan_ids, 0, bytemuck::cast_slice(&ids));
        q.write_buffer(&self.bufs.plan_wts, 0, bytemuck::cast_slice(&wts));
        Ok(Some(union))
    }

    /// GPU time per kernel of one step over `n_tokens` tokens (1: a decode step; more: a
    /// prefill chunk), per token, from timestamp queries (one compute pass per dispatch, so
    /// pass boundaries add a little). The step reads whatever ids are in the buffer and
    /// writes nothing the session keeps. Empty when the adapter has no timestamps.
    pub fn profile_step(&mut self, n_tokens: u32) -> Result<Vec<crate::bench::KernelTime>> {
        let g = self.model.gpu.clone();
        // An offloaded step is cut into segments with loads between them; not profiled.
        if !g.features.contains(wgpu::Features::TIMESTAMP_QUERY)
            || self.model.offload.is_some()
            || n_tokens == 0
            || n_tokens as usize > self.bufs.ub
            || self.tokens.len() + n_tokens as usize > self.bufs.ctx
        {
            return Ok(Vec::new());
        }
        let key = (n_tokens as usize, Output::Argmax);
        if !self.plans.contains_key(&key) {
            let plan = forward::build(&self.model, &self.bufs, n_tokens, Output::Argmax)?;
            self.plans.insert(key, plan);
        }
        let plan = &self.plans[&key];
        let n = plan.dispatches.len().min(2048);
        let qs = g.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("profile"),
            ty: wgpu::QueryType::Timestamp,
            count: (2 * n) as u32,
        });
        let bytes = (2 * n * 8) as u64;
        let resolve = g.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timestamps"),
            size: bytes,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let read = g.readback("timestamps readback", bytes)?;
        let step = Step {
            pos0: self.tokens.len() as u32,
            n_tokens,
            _pad: [0; 2],
        };
        g.queue
            .write_buffer(&self.bufs.step, 0, bytemuck::bytes_of(&step));
        let mut enc = g
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("profile"),
            });
        for (i, d) in plan.dispatches.iter().take(n).enumerate() {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(d.kernel.label()),
                timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                    query_set: &qs,
                    beginning_of_pass_write_index: Some(2 * i as u32),
                    end_of_pass_write_index: Some(2 * i as u32 + 1),
                }),
            });
            pass.set_pipeline(&d.pipeline);
            pass.set_bind_group(0, &d.bind_group, &[]);
            pass.dispatch_workgroups(d.groups[0], d.groups[1], d.groups[2]);
        }
        enc.resolve_query_set(&qs, 0..(2 * n) as u32, &resolve, 0);
        enc.copy_buffer_to_buffer(&resolve, 0, &read, 0, bytes);
        g.queue.submit([enc.finish()]);
        let raw: Vec<u64> = bytemuck::pod_collect_to_vec(&g.read(&read, bytes)?);
        let period = g.queue.get_timestamp_period() as f64;
        let mut by_kernel: Vec<(String, f64)> = Vec::new();
        for (i, d) in plan.dispatches.iter().take(n).enumerate() {
            let ms =
                raw[2 * i + 1].saturating_sub(raw[2 * i]) as f64 * period / 1e6 / n_tokens as f64;
            let label = match d.kernel {
                crate::gpu::Kernel::Matmul { dtype, .. } => format!("matmul {dtype}"),
                k => k.label().to_string(),
            };
            match by_kernel.iter_mut().find(|(k, _)| *k == label) {
                Some(e) => e.1 += ms,
                None => by_kernel.push((label, ms)),
            }
        }
        let total: f64 = by_kernel.iter().map(|(_, m)| m).sum::<f64>().max(1e-12);
        by_kernel.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(by_kernel
            .into_iter()
            .map(|(kernel, ms)| crate::bench::KernelTime {
                kernel,
                ms_per_token: ms,
                percent: 100.0 * ms / total,
            })
            .collect())
    }
}
