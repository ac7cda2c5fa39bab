//! Running a step when the routed experts do not all fit in VRAM. The step's plan is cut
//! at each MoE layer's router (forward.rs marks the cuts): the host reads the layer's
//! expert ids back, makes those experts resident (loading only the missing ones, so a
//! token waits only for what it lacks), writes the layer's slot table row, and goes on.
//! A prefill chunk whose experts outnumber the slots runs the layer's expert kernels in
//! waves. With next-layer prefetch, the step also routes the next layer on the current
//! hidden state (AdapMoE), and those experts are uploaded while the GPU works.

use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::gpu::{DispatchList, Mark, StagingRing};
use crate::moe::cache::{CacheStats, ExpertCache, Load, Wave};
use crate::moe::store::ExpertStore;
use crate::moe::{PolicyKind, Prefetch, Routing};
use crate::router::PreGateRouter;

use super::memory::MemoryPlan;
use super::session::StateBuffers;
use super::weights::{Ffn, Model};

/// How an offloaded model manages its experts.
#[derive(Clone, Debug)]
pub struct OffloadOptions {
    pub policy: PolicyKind,
    pub prefetch: Prefetch,
    /// Hash every expert at load and check each on its first upload.
    pub verify: bool,
    /// Who picks the experts: the layers' routers, or the pre-gating router.
    pub routing: Routing,
    /// The pre-gating router file (`--router`); `None` looks next to the model for
    /// `MODEL.router.safetensors` when `prefetch` or `routing` is `Pregate`.
    pub router: Option<std::path::PathBuf>,
}

impl Default for OffloadOptions {
    fn default() -> Self {
        OffloadOptions {
            policy: PolicyKind::Lfu,
            prefetch: Prefetch::None,
            verify: false,
            routing: Routing::Layer,
            router: None,
        }
    }
}

/// Loads the pre-gating router when `opts` needs one, and checks that it fits `c`.
pub fn load_router(
    model_path: &std::path::Path,
    c: &super::ModelConfig,
    opts: &OffloadOptions,
) -> Result<Option<PreGateRouter>> {
    let needs = opts.prefetch == Prefetch::Pregate
        || opts.routing == Routing::Pregate
        || opts.policy == PolicyKind::Lookahead;
    if !needs {
        // A router asked for by path is still checked (a typo should not pass unseen),
        // and the user told that nothing here uses it.
        if let Some(path) = &opts.router {
            PreGateRouter::load(path)?;
            tracing::warn!(
                "{} is not used: a router drives --prefetch pregate, --routing pregate and --policy lookahead",
                path.display()
            );
        }
        return Ok(None);
    }
    let Some(moe) = &c.moe else {
        return Err(Error::InvalidArgument(
            "the pre-gating router needs a mixture-of-experts model (see `pregate carve`)".into(),
        ));
    };
    let path = opts
        .router
        .clone()
        .unwrap_or_else(|| default_router_path(model_path));
    if !path.exists() {
        return Err(Error::InvalidArgument(format!(
            "pregate routing or prefetch, or the lookahead policy, needs a router: {} does not exist (make one with `pregate train-router`, or pass --router)",
            path.display()
        )));
    }
    let r = PreGateRouter::load(&path)?;
    r.check_fits(c.n_layer, moe.n_expert)?;
    Ok(Some(r))
}

/// Where a model's pre-gating router is looked for by default.
pub fn default_router_path(model: &std::path::Path) -> std::path::PathBuf {
    model.with_extension("router.safetensors")
}

struct State {
    store: ExpertStore,
    cache: ExpertCache,
    staging: StagingRing,
    bytes_uploaded: u64,
    stall: Duration,
}

/// The expert cache of a loaded model: where experts are, which are resident, and counters.
pub struct Offload {
    state: Mutex<State>,
    /// Held for a whole step: sessions on other threads share the slots, and a step reads
    /// its experts from them after loading them, so no other step may evict in between.
    step: Mutex<()>,
    pub prefetch: Prefetch,
    /// Slots per MoE layer in the memory plan (the mean when layers differ).
    pub slots: usize,
    /// Slots of each layer: the plan's everywhere, or split by miss curves (lookahead).
    pub layer_slots: Vec<usize>,
}

impl Offload {
    /// The cache `plan` sized (its slot bytes and staging ring), with `layer_slots` slots
    /// in each layer (as the model's pools were allocated).
    pub fn new(
        model: &Model,
        plan: &MemoryPlan,
        opts: &OffloadOptions,
        layer_slots: Vec<usize>,
    ) -> Result<Offload> {
        let c = &model.config;
        let Some(slots) = plan.expert_slots else {
            return Err(Error::InvalidArgument(
                "the memory plan keeps every expert resident: no cache to build".into(),
            ));
        };
        let Some(moe) = &c.moe else {
            return Err(Error::InvalidArgument(
                "expert offload needs a mixture-of-experts model".into(),
            ));
        };
        if let Some(s) = layer_slots.iter().find(|s| **s < moe.n_slots) {
            return Err(Error::InvalidArgument(format!(
                "{s} expert slots in a layer cannot hold one token's {} experts; raise --vram-budget or lower --experts-per-token (or --adaptive-max-experts)",
                moe.n_slots
            )));
        }
        if opts.policy == PolicyKind::Lookahead && model.router.is_none() {
            return Err(Error::InvalidArgument(
                "--policy lookahead needs a pre-gating router (see `pregate train-router`)".into(),
            ));
        }
        if opts.prefetch == Prefetch::Pregate && model.router.is_none() {
            return Err(Error::InvalidArgument(
                "--prefetch pregate needs a pre-gating router (see `pregate train-router`)".into(),
            ));
        }
        let mut store = ExpertStore::new(&model.file, c)?;
        if opts.verify {
            store.enable_verify(&model.file)?;
        }
        Ok(Offload {
            state: Mutex::new(State {
                store,
                staging: StagingRing::new(&model.gpu, plan.staging_buffers, plan.slot_bytes)?,
                cache: ExpertCache::new(
                    moe.n_expert,
                    &layer_slots,
                    opts.policy,
                    opts.routing == Routing::Pregate,
                )?,
                bytes_uploaded: 0,
                stall: Duration::ZERO,
            }),
            step: Mutex::new(()),
            prefetch: opts.prefetch,
            slots,
            layer_slots,
        })
    }

    /// Gives the lookahead policy each layer's predicted uses from use `from` on, soonest
    /// first (`plan[l]`, one entry a token; past its end: nothing known).
    pub fn set_future(&self, plan: &[Vec<Vec<u32>>], from: usize) {
        let mut st = self.lock();
        for (l, uses) in plan.iter().enumerate() {
            st.cache.set_future(l, &uses[from.min(uses.len())..]);
        }
    }

    /// One step at a time on the shared cache (see `step`); drop it once the step is
    /// submitted, since the queue keeps later steps' loads behind it.
    pub fn step_guard(&self) -> MutexGuard<'_, ()> {
        self.step.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn policy(&self) -> PolicyKind {
        self.lock().cache.policy
    }

    pub fn stats(&self) -> CacheStats {
        let st = self.lock();
        CacheStats {
            bytes_uploaded: st.bytes_uploaded,
            stall: st.stall,
            ..st.cache.stats()
        }
    }

    pub fn reset_stats(&self) {
        let mut st = self.lock();
        st.cache.reset_stats();
        st.bytes_uploaded = 0;
        st.stall = Duration::ZERO;
    }

    /// Copies each load's expert from the mapping into its slot of `layer`'s pools: read by
    /// loader threads, staged in the ring, and copied by commands recorded in `enc` (so
    /// they run right before the kernels encoded after them). When every staging buffer is
    /// taken, `enc` is submitted as it stands and the ring waits for one to come back.
    fn upload(
        model: &Model,
        st: &mut State,
        layer: usize,
        loads: &[Load],
        enc: &mut wgpu::CommandEncoder,
    ) -> Result<()> {
        let Ffn::Moe(m) = &model.weights.layers[layer].ffn else {
            return Err(Error::InvalidArgument(format!("layer {layer} is dense")));
        };
        let pools = [&m.gate_exps, &m.up_exps, &m.down_exps];
        let experts: Vec<usize> = loads.iter().map(|l| l.expert as usize).collect();
        let words = match st.store.read_many(&model.file, layer, &experts) {
            Ok(w) => w,
            Err(e) => {
                for &load in loads {
                    st.cache.forget(layer, load);
                }
                return Err(e);
            }
        };
        for (load, words) in loads.iter().zip(&words) {
            let parts: Vec<&[u8]> = words
                .parts
                .iter()
                .map(|p| bytemuck::cast_slice(p))
                .collect();
            let dsts: Vec<(&wgpu::Buffer, u64)> = pools
                .iter()
                .zip(&parts)
                .map(|(pool, part)| {
                    (
                        &*pool.shards[0].buffer,
                        load.slot as u64 * part.len() as u64,
                    )
                })
                .collect();
            while !st.staging.upload(enc, &parts, &dsts)? {
                let g = &model.gpu;
                let done = std::mem::replace(
                    enc,
                    g.device
                        .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                            label: Some("step segment"),
                        }),
                );
                g.queue.submit([done.finish()]);
                st.staging.submitted();
                g.device
                    .poll(wgpu::PollType::wait_indefinitely())
                    .map_err(|e| Error::Gpu(format!("poll: {e}")))?;
            }
            st.bytes_uploaded += words.bytes();
        }
        Ok(())
    }

    /// Call after each submit: staging buffers used by it are mapped again.
    pub fn submitted(&self) {
        self.lock().staging.submitted();
    }

    /// Makes the next wave of `pending` resident in `layer`, with its slot table row; the
    /// time spent counts as stall (the GPU waits for it).
    fn demand(
        &self,
        model: &Model,
        layer: usize,
        pending: &mut Vec<u32>,
        enc: &mut wgpu::CommandEncoder,
    ) -> Result<Wave> {
        let t0 = Instant::now();
        let mut st = self.lock();
        let wave = st.cache.next_wave(layer, pending)?;
        if wave.members.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "no expert slot free in layer {layer}"
            )));
        }
        Self::upload(model, &mut st, layer, &wave.loads, enc)?;
        let row = st.cache.table_row(&wave);
        let n_expert = row.len() as u64;
        model.gpu.queue.write_buffer(
            &model.weights.slot_table,
            layer as u64 * n_expert * 4,
            bytemuck::cast_slice(&row),
        );
        st.stall += t0.elapsed();
        Ok(wave)
    }

    fn prefetch(
        &self,
        model: &Model,
        layer: usize,
        predicted: &[u32],
        enc: &mut wgpu::CommandEncoder,
    ) -> Result<()> {
        let mut st = self.lock();
        let loads = st.cache.prefetch(layer, predicted);
        Self::upload(model, &mut st, layer, &loads, enc)
    }
}

fn is_moe(model: &Model, layer: usize) -> bool {
    matches!(model.weights.layers[layer].ffn, Ffn::Moe(_))
}

/// The next MoE layer after `layer`, if any.
pub fn next_moe_layer(model: &Model, layer: usize) -> Option<usize> {
    (layer + 1..model.weights.layers.len()).find(|l| is_moe(model, *l))
}

/// Encodes `plan` for `n` tokens into `enc`, stopping at each mark to make the layer's
/// experts resident (see the module comment). `history` ends with this step's tokens
/// (the pre-gating router reads them). With `decided` (`--routing pregate`), each layer's
/// experts are already known: nothing is read back; the step is one submit when every
/// layer's experts are resident, and a layer with misses first submits the layers before
/// it, so the GPU runs them while its experts load. Returns the encoder holding the rest.
#[allow(clippy::too_many_arguments)]
pub fn encode_offloaded(
    model: &Model,
    off: &Offload,
    s: &StateBuffers,
    plan: &DispatchList,
    history: &[u32],
    decided: Option<&[Vec<u32>]>,
    n: usize,
    mut enc: wgpu::CommandEncoder,
) -> Result<wgpu::CommandEncoder> {
    let g = &model.gpu;
    let k = model.config.moe.as_ref().map_or(0, |m| m.n_slots);
    let new_encoder = || {
        g.device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("step segment"),
            })
    };
    let encode = |enc: &mut wgpu::CommandEncoder, range: std::ops::Range<usize>| {
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("forward segment"),
            timestamp_writes: None,
        });
        plan.encode_range(&mut pass, range);
    };
    let ids_bytes = (n * k * 4) as u64;
    let predicts = off.prefetch == Prefetch::NextLayer && n == 1;
    // The pre-gate's plan for a decode token: every layer's experts, known before the step.
    let pregate = match (&model.router, off.prefetch, n, history.len()) {
        (Some(r), Prefetch::Pregate, 1, len) if len > 0 && decided.is_none() => {
            Some(r.predict(history, len - 1, k))
        }
        _ => None,
    };
    if let (Some(p), Some(first)) = (
        &pregate,
        (0..model.weights.layers.len()).find(|l| is_moe(model, *l)),
    ) {
        off.prefetch(model, first, &p[first], &mut enc)?;
    }
    let mut prefetch_next: Option<(usize, Vec<u32>)> = None;
    let mut pending: Vec<u32> = Vec::new();
    let (mut pos, mut routed_at) = (0, 0);
    for &(at, mark) in &plan.marks {
        encode(&mut enc, pos..at);
        pos = at;
        match mark {
            Mark::Routed(layer) if decided.is_some() => {
                pending = decided.map(|d| d[layer].clone()).unwrap_or_default();
                // Misses: the GPU runs the layers so far while this layer's experts load.
                if !off.lock().cache.all_resident(layer, &pending) {
                    g.queue
                        .submit([std::mem::replace(&mut enc, new_encoder()).finish()]);
                    off.submitted();
                }
                off.demand(model, layer, &mut pending, &mut enc)?;
                routed_at = at;
            }
            Mark::Routed(layer) => {
                enc.copy_buffer_to_buffer(&s.expert_ids, 0, &s.route_readback, 0, ids_bytes);
                if predicts {
                    let pred = (k * 4) as u64;
                    enc.copy_buffer_to_buffer(&s.pred_ids, 0, &s.route_readback, ids_bytes, pred);
                }
                g.queue
                    .submit([std::mem::replace(&mut enc, new_encoder()).finish()]);
                off.submitted();
                // Upload what the previous layer predicted, or the pre-gate's plan for the
                // next layer, while the GPU runs this segment.
                if let Some((l, ids)) = prefetch_next.take() {
                    off.prefetch(model, l, &ids, &mut enc)?;
                }
                if let (Some(p), Some(l)) = (&pregate, next_moe_layer(model, layer)) {
                    off.prefetch(model, l, &p[l], &mut enc)?;
                }
                let read = if predicts {
                    ids_bytes + (k * 4) as u64
                } else {
                    ids_bytes
                };
                let words: Vec<u32> =
                    bytemuck::pod_collect_to_vec(&g.read(&s.route_readback, read)?);
                pending = words[..n * k].to_vec();
                if predicts {
                    prefetch_next =
                        next_moe_layer(model, layer).map(|l| (l, words[n * k..].to_vec()));
                }
                off.demand(model, layer, &mut pending, &mut enc)?;
                routed_at = at;
            }
            Mark::ExpertsDone(layer) => {
                while !pending.is_empty() {
                    g.queue
                        .submit([std::mem::replace(&mut enc, new_encoder()).finish()]);
                    off.submitted();
                    off.demand(model, layer, &mut pending, &mut enc)?;
                    encode(&mut enc, routed_at..at);
                }
            }
        }
    }
    encode(&mut enc, pos..plan.len());
    Ok(enc)
}
