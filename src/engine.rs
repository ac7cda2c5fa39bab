//! The library's front door: an [`Engine`] is a loaded model plus its tokenizer; a
//! [`Session`] is one conversation; [`Generation`] streams text pieces.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::format::GgufFile;
use crate::gpu::{Gpu, GpuOptions};
use crate::model::chat::{drop_oldest_exchange, ChatMessage, ChatTemplate};
use crate::model::config::RecoveryFit;
use crate::model::memory::VramBudget;
use crate::model::offload::{Offload, OffloadOptions};
use crate::model::tokenizer::TextStream;
use crate::model::{Model, Sampler, SamplerConfig, Session, Tokenizer};
use crate::moe::Routing;
use crate::router::adaptive::{self, AdaptiveMax, AdaptivePlan, AdaptiveProfile};

const ADAPTIVE_NEEDS_LAYER_ROUTING: &str =
    "adaptive gating thresholds the layers' own routers: use it with --routing layer";

/// Windows of calibration text adaptive gating measures its profile on, and their length:
/// at 1024 tokens a layer's measured cost has a standard error of about 0.7% perplexity.
const ADAPTIVE_WINDOWS: usize = 4;
const ADAPTIVE_WINDOW: usize = 256;

#[derive(Clone, Debug, Default)]
pub struct EngineOptions {
    pub gpu: GpuOptions,
    /// Context length of new sessions (0: min(model's, 4096)).
    pub ctx: usize,
    /// Experts per token in MoE layers (None: the model's own; `usize::MAX`: all of them).
    pub experts_per_token: Option<usize>,
    /// `--vram-budget`. `All` defers to `gpu.vram_budget` when that is set.
    pub budget: VramBudget,
    /// How experts are cached when the budget leaves them out of VRAM.
    pub offload: OffloadOptions,
    /// How many experts adaptive gating ([`Engine::set_adaptive`]) may give a token. Past
    /// the top-k this sizes the expert buffers, so it is set at load.
    pub adaptive_max: AdaptiveMax,
    /// Sessions the app keeps open at once (0 counts as 1): the memory plan, and so a
    /// `budget`, holds a KV cache and activations for each.
    pub sessions: usize,
}

// Apps share one Engine across threads (an Arc) and give each its own Session; a field
// that broke this would break them, so it fails to compile here instead.
const _: () = {
    const fn shareable<T: Send + Sync>() {}
    const fn movable<T: Send>() {}
    shareable::<Engine>();
    movable::<Session>();
};

pub struct Engine {
    /// What the run will allocate, decided at load.
    pub memory: crate::model::memory::MemoryPlan,
    /// Adaptive gating's thresholds, when [`Engine::set_adaptive`] turned it on.
    pub adaptive: Option<AdaptivePlan>,
    pub model: Arc<Model>,
    pub tokenizer: Arc<Tokenizer>,
    pub path: PathBuf,
    ctx: usize,
}

/// Writes adaptive gating's profile next to the model; a failure only costs measuring it
/// again next time, so it is a warning.
fn save_profile(profile: &AdaptiveProfile, path: &Path) {
    match profile.save(path) {
        Ok(()) => tracing::info!("saved the adaptive-gating profile to {}", path.display()),
        Err(e) => tracing::warn!("could not save the adaptive-gating profile: {e}"),
    }
}

/// Every expert is resident (or there are none), so there is no expert cache: a cache
/// policy, prefetch or expert check asked for would do nothing, and the user is told.
fn warn_cache_options_unused(o: &OffloadOptions) {
    let defaults = OffloadOptions::default();
    let mut unused = Vec::new();
    if o.policy != defaults.policy {
        unused.push("--policy");
    }
    if o.prefetch != defaults.prefetch {
        unused.push("--prefetch");
    }
    if o.verify {
        unused.push("--verify");
    }
    if !unused.is_empty() {
        tracing::warn!(
            "{} not used: every expert is resident, so there is no expert cache (a --vram-budget below the model's size makes one)",
            unused.join(", ")
        );
    }
}

/// Under `--routing pregate`, the carve's recovery fit made for the pre-gating router's
/// choices (`carve --pregate-router`), when the model has one for this very router; else
/// the layers' own fit stays.
fn pick_recovery_fit(
    file: &GgufFile,
    recovery: bool,
    config: &mut crate::model::ModelConfig,
    router: Option<&crate::router::PreGateRouter>,
) {
    let n_layer = config.n_layer;
    let (Some(m), Some(r)) = (config.moe.as_mut(), router) else {
        return;
    };
    let Some(fitted_for) = file
        .get(crate::carve::PREGATE_FIT_KEY)
        .and_then(|v| v.as_str())
    else {
        if recovery && m.recovering() {
            tracing::info!(
                "the carve's recovery fit was made for the layers' choices; `carve --pregate-router` gives the pre-gate one of its own (better perplexity under --routing pregate)"
            );
        }
        return;
    };
    if fitted_for != r.fingerprint() {
        tracing::warn!(
            "the model's recovery fit for pre-gating was made for another router; using the layers' fit (carve again with --pregate-router and this router)"
        );
        return;
    }
    let missing =
        (0..n_layer).find(|&l| file.tensor(&RecoveryFit::Pregate.tensors(l)[0]).is_none());
    if let Some(l) = missing {
        tracing::warn!(
            "the model names a recovery fit for this pre-gating router but layer {l} has none (an edited or damaged file?); using the layers' fit"
        );
        return;
    }
    m.fit = RecoveryFit::Pregate;
    // Fitted for the router's top-k, which may differ from the layers' (`carve
    // --pregate-experts`).
    if let Some(k) = file
        .get(crate::carve::PREGATE_FIT_EXPERTS_KEY)
        .and_then(|v| v.as_u64())
    {
        m.fitted_used = k as usize;
    }
    tracing::info!("using the recovery fit made for the pre-gating router's choices");
}

impl Engine {
    /// Loads a GGUF model onto the GPU.
    pub fn load(path: impl AsRef<Path>, opts: &EngineOptions) -> Result<Engine> {
        Self::load_with_progress(path, opts, |_, _| {})
    }

    /// As [`Engine::load`], reporting `(done, total)` tensors groups uploaded.
    pub fn load_with_progress(
        path: impl AsRef<Path>,
        opts: &EngineOptions,
        progress: impl FnMut(usize, usize),
    ) -> Result<Engine> {
        let path = path.as_ref();
        let file = GgufFile::open(path)?;
        // Validate everything cheap before touching the GPU.
        let mut config = crate::model::ModelConfig::from_gguf(&file)?;
        if let Some(k) = opts.experts_per_token {
            config.set_experts_per_token(k)?;
        }
        // Whether the carve fitted a recovery (what the experts a token skips would add).
        let recovery = file.tensors.iter().any(|t| t.name.contains(".ffn_recover"));
        let room = match config.moe {
            Some(_) => opts.adaptive_max,
            None => AdaptiveMax::TopK,
        };
        if room != AdaptiveMax::TopK && opts.offload.routing != Routing::Layer {
            return Err(Error::InvalidArgument(ADAPTIVE_NEEDS_LAYER_ROUTING.into()));
        }
        let widen = |config: &mut crate::model::ModelConfig, max| -> Result<()> {
            let slots = config.set_adaptive_slots(max, recovery)?;
            tracing::info!("adaptive gating may give a token up to {slots} experts");
            Ok(())
        };
        // Room asked for: before the memory plan, whose cache must hold a token's experts.
        if let AdaptiveMax::Experts(n) = room {
            widen(&mut config, Some(n))?;
        }
        let router = crate::model::offload::load_router(path, &config, &opts.offload)?;
        if opts.offload.routing == Routing::Pregate {
            pick_recovery_fit(&file, recovery, &mut config, router.as_ref());
        }
        if opts.experts_per_token.is_some() {
            // Far more experts than the carve's lose its recovery fit: say so, unless all
            // run (then the model is the dense one and needs none).
            if let Some(m) = config.moe.as_ref() {
                if recovery && !m.recovering() && m.n_used < m.n_expert {
                    tracing::warn!(
                        "the carve's recovery fit is for {} experts per token; with {} it would count what those experts add twice, so it is not used",
                        m.fitted_used,
                        m.n_used,
                    );
                }
            }
        }
        let tokenizer = Tokenizer::load(path, &file)?;
        // Decide the context length and the expert slots (or refuse a budget too small)
        // before allocating.
        let budget = match (opts.budget, opts.gpu.vram_budget) {
            (VramBudget::All, Some(b)) => VramBudget::Bytes(b),
            (b, _) => b,
        };
        let ubatch = crate::model::session::prefill_ubatch(opts.gpu.cpu_layout()?);
        let shape = (opts.sessions, ubatch);
        let plan = crate::model::memory::fit(&file, &config, opts.ctx, budget, shape)?;
        // By default, room only where every expert stays resident: the experts a token
        // adds are rarely used ones, which under a budget cost cache misses (at 50%, twice
        // dropping only's, as many as the fixed top-k's: BENCHMARKS.md).
        if room == AdaptiveMax::Auto {
            if plan.expert_slots.is_none() {
                widen(&mut config, None)?;
            } else {
                tracing::info!("experts are offloaded: adaptive gating only drops experts (--adaptive-max-experts to add too)");
            }
        }
        let arena_budget = match budget {
            VramBudget::All => None,
            VramBudget::Bytes(b) => Some(b),
            VramBudget::ExpertShare(_) => Some(plan.total()),
        };
        tracing::info!("{}", plan.summary(arena_budget));
        let gpu_opts = GpuOptions {
            vram_budget: arena_budget,
            ..opts.gpu.clone()
        };
        let layer_slots = plan
            .expert_slots
            .map(|s| Self::layer_slots(&file, &config, &tokenizer, router.as_ref(), opts, s))
            .transpose()?;
        let gpu = Arc::new(Gpu::new(&gpu_opts)?);
        let mut model = Model::load(gpu, file, config, layer_slots.as_deref(), progress)?;
        model.router = router;
        model.routing = opts.offload.routing;
        match layer_slots {
            Some(slots) => model.offload = Some(Offload::new(&model, &plan, &opts.offload, slots)?),
            None => warn_cache_options_unused(&opts.offload),
        }
        let ctx = plan.ctx;
        if ctx > model.config.ctx_train {
            tracing::warn!(
                "a context of {ctx} tokens is longer than the {} this model was trained on; text past that point degrades",
                model.config.ctx_train
            );
        }
        Ok(Engine {
            memory: plan,
            adaptive: None,
            model: Arc::new(model),
            tokenizer: Arc::new(tokenizer),
            path: path.to_path_buf(),
            ctx,
        })
    }

    pub fn ctx(&self) -> usize {
        self.ctx
    }

    /// Cache slots of each layer: `uniform` everywhere, or with `--policy lookahead` the
    /// same total split across layers by their miss curves (AdapMoE's per-layer sizing),
    /// from the router's plan of 2048 tokens of the built-in corpus.
    fn layer_slots(
        file: &GgufFile,
        c: &crate::model::ModelConfig,
        tokenizer: &Tokenizer,
        router: Option<&crate::router::PreGateRouter>,
        opts: &EngineOptions,
        uniform: usize,
    ) -> Result<Vec<usize>> {
        let (Some(router), Some(moe), crate::moe::PolicyKind::Lookahead) =
            (router, &c.moe, opts.offload.policy)
        else {
            return Ok(vec![uniform; c.n_layer]);
        };
        let moe_layer: Vec<bool> = (0..c.n_layer)
            .map(|l| {
                file.tensor(&format!("blk.{l}.ffn_gate_exps.weight"))
                    .is_some()
            })
            .collect();
        let tokens = crate::carve::calib::tokens(tokenizer, &[], 2048, 512)?;
        let k = (moe.n_used, moe.n_slots);
        let slots = crate::moe::sizing::split_by_plan(router, &tokens, k, uniform, &moe_layer);
        tracing::info!("lookahead: expert slots per layer {slots:?} (split by miss curves)");
        Ok(slots)
    }

    /// Adaptive gating (AdapMoE): tokens whose router is confident use fewer experts (and,
    /// where [`EngineOptions::adaptive_max`] left room past the top-k, unsure ones more),
    /// for a perplexity cost of `quality_pct` percent (0: off, the fixed top-k). The
    /// per-layer sensitivities come from `profile` (default `MODEL.adaptive.json`, or
    /// `MODEL.adaptive-ID.json` for text of one's own); when it does not exist they are
    /// measured on `calib` (text files; none: the built-in corpus's windows that the carve
    /// left out) and saved at once. The thresholds' real cost is then measured on those
    /// tokens and moved until it fits, and saved in the profile too, so a later run with
    /// the same quality and text measures nothing. `progress(done, total)` counts the
    /// passes of both (the check may end before `total`).
    pub fn set_adaptive(
        &mut self,
        quality_pct: f64,
        profile: Option<&Path>,
        calib: &[PathBuf],
        progress: impl FnMut(usize, usize),
    ) -> Result<&AdaptivePlan> {
        adaptive::check_quality(quality_pct)?;
        let c = &self.model.config;
        if quality_pct != 0.0 && c.moe.is_none() {
            return Err(Error::InvalidArgument(
                "adaptive gating needs a mixture-of-experts model (see `pregate carve`)".into(),
            ));
        }
        if quality_pct != 0.0 && self.model.routing != crate::moe::Routing::Layer {
            return Err(Error::InvalidArgument(ADAPTIVE_NEEDS_LAYER_ROUTING.into()));
        }
        let extra_slots = c.moe.as_ref().map_or(0, |m| m.extra_slots());
        let plan = if quality_pct == 0.0 {
            AdaptivePlan::off(c.n_layer)
        } else {
            // The user's text is read now (its id names the profile); the built-in
            // corpus only when a measurement needs it (158k tokens: 0.3 s a start).
            let own = match calib.is_empty() {
                true => None,
                false => Some(self.adaptive_tokens(calib)?),
            };
            let source = own.as_deref().map(adaptive::calibration_id);
            let path = profile
                .map(Path::to_path_buf)
                .unwrap_or_else(|| adaptive::default_profile_path(&self.path, source.as_deref()));
            // A profile that cannot be kept would be measured again at every start (half
            // an hour on a CPU): say so before measuring, not after.
            if let Some(why) = crate::format::output_problem(&path, true) {
                return Err(Error::InvalidArgument(format!(
                    "the adaptive-gating profile cannot be kept: {why} (--adaptive-profile sets where)"
                )));
            }
            let saved = match path.exists() {
                true => Some(AdaptiveProfile::load(&path)?).filter(|p| {
                    let current = p.version == adaptive::PROFILE_VERSION;
                    if !current {
                        tracing::warn!(
                            "{} was measured by an older pregate; measuring it again",
                            path.display()
                        );
                    }
                    current
                }),
                false => None,
            };
            if let Some(p) = &saved {
                p.check_fits(c.n_layer)?;
                if p.calib != source {
                    return Err(Error::InvalidArgument(format!(
                        "{} was measured on {}, not on {}: give another --adaptive-profile, or delete it to measure again",
                        path.display(),
                        adaptive::describe_calibration(p.calib.as_deref()),
                        adaptive::describe_calibration(source.as_deref()),
                    )));
                }
            }
            match saved
                .as_ref()
                .map(|p| p.plan(quality_pct, extra_slots))
                .transpose()?
            {
                // This quality was measured before: nothing to run.
                Some(plan) if plan.measured_cost_pct.is_some() => plan,
                _ => {
                    let tokens = match own {
                        Some(t) => t,
                        None => self.adaptive_tokens(&[])?,
                    };
                    let mut session = self.session()?;
                    // One count of passes over both steps, for one progress bar.
                    let checks = adaptive::validate_passes(extra_slots);
                    let mut progress = progress;
                    let (mut prof, measured) = match saved {
                        Some(p) => (p, 0),
                        None => {
                            let n_moe = self.model.weights.moe_layers().len();
                            let passes = adaptive::measure_passes(n_moe);
                            let partial_path = adaptive::partial_path(&path);
                            let stamp = adaptive::model_stamp(&self.path);
                            let resume = adaptive::PartialProfile::load_matching(
                                &partial_path,
                                &stamp,
                                &tokens,
                            );
                            if let Some(r) = &resume {
                                tracing::info!(
                                    "resuming the adaptive-gating measurement in {} ({} of {passes} passes done)",
                                    partial_path.display(),
                                    2 + r.measured.len()
                                );
                            }
                            let checkpoint = |p: &adaptive::PartialProfile| {
                                if let Err(e) = p.save(&partial_path) {
                                    tracing::warn!("could not keep the measurement so far: {e}");
                                }
                            };
                            let p = AdaptiveProfile {
                                calib: source,
                                ..adaptive::measure(
                                    &mut session,
                                    &tokens,
                                    &stamp,
                                    resume,
                                    checkpoint,
                                    |d, t| progress(d, t + checks),
                                )?
                            };
                            // Kept at once: the measurement is the long part (half an hour
                            // on a CPU), and a check interrupted later must not lose it.
                            save_profile(&p, &path);
                            let _ = std::fs::remove_file(&partial_path);
                            (p, passes)
                        }
                    };
                    prof.check_fits(c.n_layer)?;
                    let plan = adaptive::validate(
                        &mut session,
                        &tokens,
                        &mut prof,
                        quality_pct,
                        |d, _| progress(measured + d, measured + checks),
                    )?;
                    save_profile(&prof, &path);
                    plan
                }
            }
        };
        self.model.set_adaptive_keep(&plan.keep)?;
        // The measurement's passes are not the run's.
        self.reset_metrics();
        Ok(self.adaptive.insert(plan))
    }

    /// Adaptive gating's calibration text: [`ADAPTIVE_WINDOWS`] windows spread over the
    /// user's `files`, or else of the built-in corpus where a default carve did not profile.
    /// Measured on the carve's own tokens, the recovery fit is in-sample: there dropping an
    /// expert looked free in half the layers and `--adaptive 2` cost 3.3% on other text
    /// (BENCHMARKS.md).
    fn adaptive_tokens(&self, files: &[PathBuf]) -> Result<Vec<Vec<u32>>> {
        use crate::carve::{calib, CarveOptions};
        let seq = ADAPTIVE_WINDOW.min(self.ctx.saturating_sub(1)).max(2);
        if !files.is_empty() {
            let tokens = calib::tokens(&self.tokenizer, files, ADAPTIVE_WINDOWS * seq, seq)?;
            return Ok(tokens.chunks(seq).map(<[u32]>::to_vec).collect());
        }
        let all = self.tokenizer.encode(calib::BUILTIN_CORPUS, false)?;
        let carve = CarveOptions::default();
        let windows = calib::held_out(
            &all,
            (carve.calib_tokens, carve.seq_len),
            ADAPTIVE_WINDOWS,
            seq,
        );
        match windows.is_empty() {
            false => Ok(windows),
            true => Err(Error::InvalidArgument(format!(
                "the built-in corpus has no {seq}-token window the carve left out"
            ))),
        }
    }

    /// VRAM and expert-cache counters since load (or the last [`Engine::reset_metrics`]).
    pub fn metrics(&self) -> RunMetrics {
        let arena = &self.model.gpu.arena;
        let off = self.model.offload.as_ref();
        let stats = off.map(|o| o.stats()).unwrap_or_default();
        RunMetrics {
            budget_bytes: arena.budget(),
            peak_vram_bytes: arena.peak(),
            expert_slots: off.map(|o| o.slots),
            layer_slots: off.map(|o| o.layer_slots.clone()).unwrap_or_default(),
            expert_hits: stats.total.hits,
            expert_misses: stats.total.misses,
            prefetch_hits: stats.total.prefetch_hits,
            wasted_prefetches: stats.total.wasted_prefetches,
            bytes_uploaded: stats.bytes_uploaded,
            stall_ms: stats.stall.as_secs_f64() * 1e3,
            policy: off.map_or("resident", |o| o.policy().label()).to_string(),
            prefetch: off.map_or("none", |o| o.prefetch.label()).to_string(),
            per_layer: stats.per_layer,
            mean_active_experts: self.model.config.moe.as_ref().and_then(|_| {
                let (kept, decisions) = self.model.active_experts().ok()?;
                (decisions > 0).then(|| kept as f64 / decisions as f64)
            }),
        }
    }

    /// Zeroes the expert-cache counters (not the peak VRAM).
    pub fn reset_metrics(&self) {
        if let Some(o) = &self.model.offload {
            o.reset_stats();
        }
        self.model.reset_active_experts();
    }

    pub fn gpu(&self) -> &Gpu {
        &self.model.gpu
    }

    /// A new conversation with its own KV cache.
    pub fn session(&self) -> Result<Session> {
        Session::new(self.model.clone(), self.ctx).map_err(|mut e| {
            if let Error::BudgetExceeded { hint, .. } = &mut e {
                *hint = format!(
                    "; the memory plan holds {} session(s) open at once: close one, or load with more EngineOptions::sessions",
                    self.memory.sessions
                );
            }
            e
        })
    }

    pub fn chat_template(&self) -> ChatTemplate {
        let f = &self.model.file;
        let tok = |id: Option<u32>| {
            id.and_then(|i| self.tokenizer.decode(&[i]).ok())
                .unwrap_or_default()
        };
        ChatTemplate::new(
            f.get("tokenizer.chat_template").and_then(|v| v.as_str()),
            tok(self.tokenizer.bos),
            tok(self.tokenizer.eos),
        )
    }

    /// Renders a conversation with the model's chat template and tokenizes it.
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        let text = self.chat_template().render(messages)?;
        self.tokenizer.encode(&text, true)
    }

    /// Renders a conversation that fits `budget` tokens. When it is longer, the oldest
    /// exchanges after the first `keep` messages are dropped from `messages` (see
    /// [`drop_oldest_exchange`]) until it fits in half the budget: the turns after then
    /// extend the cached prefix, where dropping just enough would change the prefix, and
    /// so re-read the whole conversation, at every turn. Returns the prompt, which may
    /// still be over `budget` if only the last message is left, and how many messages
    /// were dropped.
    pub fn encode_chat_fitting(
        &self,
        messages: &mut Vec<ChatMessage>,
        keep: usize,
        budget: usize,
    ) -> Result<(Vec<u32>, usize)> {
        let mut prompt = self.encode_chat(messages)?;
        let mut dropped = 0;
        if prompt.len() <= budget {
            return Ok((prompt, 0));
        }
        while prompt.len() > budget / 2 {
            match drop_oldest_exchange(messages, keep) {
                0 => break,
                n => dropped += n,
            }
            prompt = self.encode_chat(messages)?;
        }
        Ok((prompt, dropped))
    }

    /// Starts streaming a continuation of `prompt` (token ids) in `session`. Tokens already
    /// in the session's cache that match the prompt's prefix are reused.
    pub fn generate<'a>(
        &'a self,
        session: &'a mut Session,
        prompt: &[u32],
        params: GenerateParams,
    ) -> Result<Generation<'a>> {
        if prompt.is_empty() {
            return Err(Error::InvalidArgument("the prompt is empty".into()));
        }
        if prompt.len() >= session.ctx() {
            return Err(Error::ContextOverflow {
                tokens: prompt.len(),
                ctx: session.ctx(),
            });
        }
        let common = session
            .tokens()
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count()
            // Always re-feed at least one token so that there are logits to sample from.
            .min(prompt.len() - 1);
        session.truncate(common);
        Ok(Generation {
            engine: self,
            sampler: Sampler::new(params.sampler.clone()),
            params,
            session,
            pending: prompt[common..].to_vec(),
            stream: TextStream::default(),
            text: String::new(),
            generated: 0,
            done: false,
            stats: GenerationStats {
                prompt_tokens: prompt.len() - common,
                ..Default::default()
            },
        })
    }
}

/// What `--json` adds to bench and eval: the budget, and how the expert cache did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RunMetrics {
    pub budget_bytes: Option<u64>,
    pub peak_vram_bytes: u64,
    /// Cache slots per MoE layer (None: every expert resident).
    pub expert_slots: Option<usize>,
    /// Slots of each layer (they differ under `--policy lookahead`); empty when resident.
    pub layer_slots: Vec<usize>,
    pub expert_hits: u64,
    pub expert_misses: u64,
    pub prefetch_hits: u64,
    pub wasted_prefetches: u64,
    pub bytes_uploaded: u64,
    pub stall_ms: f64,
    pub policy: String,
    pub prefetch: String,
    pub per_layer: Vec<crate::moe::cache::LayerStats>,
    /// Experts run per token and MoE layer (below the model's top-k with adaptive gating).
    pub mean_active_experts: Option<f64>,
}

impl RunMetrics {
    pub fn hit_rate(&self) -> f64 {
        self.expert_hits as f64 / (self.expert_hits + self.expert_misses).max(1) as f64
    }
}

#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    /// Generation stops when the text ends with one of these (not included in the output).
    pub stop_strings: Vec<String>,
    /// Set from another thread (e.g. a Ctrl-C handler) to stop after the current token.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_tokens: 256,
            sampler: SamplerConfig::default(),
            stop_strings: Vec::new(),
            cancel: None,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
    pub stop_reason: StopReason,
}

impl GenerationStats {
    pub fn prefill_tok_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_time.as_secs_f64().max(1e-9)
    }
    pub fn decode_tok_s(&self) -> f64 {
        // The first generated token comes out of prefill.
        self.generated_tokens.saturating_sub(1) as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StopReason {
    #[default]
    MaxTokens,
    EndOfSequence,
    StopString,
    Cancelled,
    ContextFull,
}

/// A streaming generation: each `next()` yields the next piece of text.
pub struct Generation<'a> {
    engine: &'a Engine,
    session: &'a mut Session,
    params: GenerateParams,
    sampler: Sampler,
    pending: Vec<u32>,
    stream: TextStream,
    text: String,
    generated: usize,
    done: bool,
    pub stats: GenerationStats,
}

impl Generation<'_> {
    fn next_token(&mut self) -> Result<u32> {
        let t0 = Instant::now();
        let feed = std::mem::take(&mut self.pending);
        let id = if self.params.sampler.is_greedy() {
            self.session.next_argmax(&feed)?
        } else if let Some(k) = self.sampler.gpu_top_k() {
            let cand = self.session.next_top_k(&feed, k)?;
            self.sampler.sample_candidates(cand)
        } else {
            let mut logits = self.session.next_logits(&feed)?;
            self.sampler.sample(&mut logits, self.session.tokens())
        };
        if self.generated == 0 {
            self.stats.prefill_time += t0.elapsed();
        } else {
            self.stats.decode_time += t0.elapsed();
        }
        Ok(id)
    }

    fn stop(&mut self, reason: StopReason) -> Option<Result<String>> {
        self.done = true;
        self.stats.stop_reason = reason;
        None
    }

    /// The whole text generated so far.
    pub fn text(&self) -> &str {
        &self.text
    }
}

impl Iterator for Generation<'_> {
    type Item = Result<String>;

    fn next(&mut self) -> Option<Result<String>> {
        loop {
            if self.done {
                return None;
            }
            if self
                .params
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::Relaxed))
            {
                return self.stop(StopReason::Cancelled);
            }
            if self.generated >= self.params.max_tokens {
                return self.stop(StopReason::MaxTokens);
            }
            if self.session.tokens().len() + self.pending.len() >= self.session.ctx() {
                return self.stop(StopReason::ContextFull);
            }
            let id = match self.next_token() {
                Ok(id) => id,
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            };
            self.generated += 1;
            self.stats.generated_tokens = self.generated;
            if self.engine.tokenizer.is_stop(id) {
                // Keep the end-of-turn token in the cache so the next turn continues after it.
                self.pending.clear();
                self.pending.push(id);
                return self.stop(StopReason::EndOfSequence);
            }
            self.pending.push(id);
            let piece = match self.stream.push(&self.engine.tokenizer, id) {
                Ok(p) => p,
                Err(e) => return Some(Err(e)),
            };
            let before = self.text.len();
            self.text.push_str(&piece);
            if let Some(s) = self
                .params
                .stop_strings
                .iter()
                .find(|s| !s.is_empty() && self.text.contains(s.as_str()))
            {
                let cut = self.text.find(s.as_str()).unwrap_or(self.text.len());
                let out = self.text[before.min(cut)..cut].to_string();
                self.text.truncate(cut);
                self.done = true;
                self.stats.stop_reason = StopReason::StopString;
                return if out.is_empty() { None } else { Some(Ok(out)) };
            }
            if !piece.is_empty() {
                return Some(Ok(piece));
            }
        }
    }
}
