//! Adaptive gating (AdapMoE): a token whose router is confident gets fewer experts. Per
//! layer l and token t, with c the token's confidence (the top-1 expert's share of the
//! chosen experts' probability mass; for a least-squares carved router, one less the
//! other chosen experts' predicted output norms over the residual's norm, i.e. how far
//! dropping them moves the stream: see [`Confidence`]), dropping the other experts costs
//! about `s_l (1 - c)^2` in loss, where the layer's
//! sensitivity `s_l` is measured once on calibration text: the loss increase when layer l
//! alone keeps only its top-1 expert for every token, over the mean `(1 - c)^2` there. One
//! global knob λ then drops experts wherever `s_l (1 - c)^2 < λ`, i.e. where `c` passes the
//! layer's threshold `1 - sqrt(λ / s_l)`. The user gives the knob as a perplexity cost in
//! percent (`--adaptive 1`); λ is the largest whose predicted cost on the calibration
//! tokens stays under it. A layer's loss increase is taken at its upper bound (mean plus
//! two standard errors over the tokens): on a few hundred tokens a layer can look harmless
//! or even helpful to cut by chance, and trusting that cut every such layer at once.
//! Layer costs do not simply add up either, so [`validate`] then measures the cost of the
//! chosen thresholds on the calibration tokens and lowers λ until it fits the budget.
//!
//! With the norm signal each expert after the top-1 is judged alone, by its own predicted
//! output over |x| against the same threshold, so a token may also keep experts past the
//! top-k where they would move the stream far ([`AdaptiveMax`]): the sensitivities are
//! still those of cutting to the top-1, which no longer predict the gains, so [`validate`]
//! then also raises λ while the measured cost leaves room.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
#[cfg(doc)]
use crate::model::config::Confidence;
use crate::model::Session;

/// One layer's calibration: its loss sensitivity and its tokens' top-1 shares.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LayerSensitivity {
    /// Mean NLL increase per token (nats) when this layer keeps only its top-1 expert.
    pub delta_nll: f64,
    /// The standard error of that mean over the calibration tokens.
    #[serde(default)]
    pub delta_se: f64,
    /// The calibration tokens' top-1 shares in this layer (None: a dense layer).
    pub top1_share: Option<Vec<f32>>,
}

/// What `--adaptive` needs to set its per-layer thresholds; saved as JSON next to the
/// model (`MODEL.adaptive.json`) so it is measured once.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdaptiveProfile {
    /// [`PROFILE_VERSION`] when measured; an older profile is measured again.
    #[serde(default)]
    pub version: u32,
    /// Calibration tokens scored.
    pub tokens: usize,
    /// Which text they came from: None for the built-in corpus's windows that the carve
    /// left out, else [`calibration_id`] of the user's tokens (`--adaptive-calib`).
    #[serde(default)]
    pub calib: Option<String>,
    /// Their mean NLL with every layer at its full top-k.
    pub base_nll: f64,
    pub layers: Vec<LayerSensitivity>,
    /// λ found by [`validate`] for each quality asked so far.
    #[serde(default)]
    pub validated: Vec<Validated>,
    /// Every threshold setting [`validate`] measured, for any quality: a later quality
    /// starts from them (fewer passes), and never lands below a λ measured to fit it.
    #[serde(default)]
    pub checks: Vec<Check>,
}

/// One pass of [`validate`]: the thresholds at `lambda` measured on the calibration tokens.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Check {
    pub lambda: f64,
    /// Mean NLL increase over the fixed top-k, in nats.
    pub cost: f64,
    /// Mean experts a token kept.
    pub mean_experts: f64,
    /// Expert slots a token had past the top-k.
    pub extra_slots: usize,
}

/// A quality setting whose thresholds were measured on the calibration tokens.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Validated {
    pub quality_pct: f64,
    pub lambda: f64,
    pub measured_cost_pct: f64,
    /// Expert slots a token had past the top-k (experts gating could add); 0 in older
    /// profiles.
    #[serde(default)]
    pub extra_slots: usize,
    /// Mean experts a token kept on the calibration tokens (None in older profiles).
    #[serde(default)]
    pub mean_experts: Option<f64>,
}

/// How many experts adaptive gating may give a token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AdaptiveMax {
    /// The top-k: gating only drops experts where a token's router is sure.
    #[default]
    TopK,
    /// Where every expert is resident, also adds where it is unsure, up to as many as the
    /// carve's recovery fit covers, at most twice the top-k (what `--adaptive` does): on
    /// the default carve (before its count corrections) 2% perplexity then bought about
    /// -17% of the experts instead of -14.5%. Offloaded, the top-k: the added experts are
    /// rarely used ones, each a cache miss (BENCHMARKS.md).
    Auto,
    /// Up to this many a token.
    Experts(usize),
}

/// Per-layer keep thresholds (moe_route.wgsl's `keep`) and what the profile predicts.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct AdaptivePlan {
    pub keep: Vec<f32>,
    /// The knob: drop where sensitivity * (1 - top-1 share)^2 is below it.
    pub lambda: f64,
    /// The cost measured on the calibration tokens (after [`validate`]).
    pub measured_cost_pct: Option<f64>,
    /// Predicted perplexity cost in percent on the calibration tokens.
    pub predicted_cost_pct: f64,
    /// Predicted share of (token, MoE layer) pairs that keep only their top-1 expert
    /// (from the top-k's profile: experts added past it are not predicted).
    pub predicted_top1_share: f64,
    /// Mean experts a token kept on the calibration tokens (after [`validate`]).
    pub mean_experts: Option<f64>,
}

impl AdaptivePlan {
    /// Adaptive gating off: every layer keeps its fixed top-k.
    pub fn off(n_layer: usize) -> AdaptivePlan {
        AdaptivePlan {
            keep: vec![KEEP_ALL; n_layer],
            lambda: 0.0,
            measured_cost_pct: Some(0.0),
            predicted_cost_pct: 0.0,
            predicted_top1_share: 0.0,
            mean_experts: None,
        }
    }
}

/// A quality knob must be a finite, non-negative percentage.
pub fn check_quality(quality_pct: f64) -> Result<()> {
    if !quality_pct.is_finite() || quality_pct < 0.0 {
        return Err(Error::InvalidArgument(format!(
            "--adaptive {quality_pct}: give a perplexity cost in percent (0 = off)"
        )));
    }
    Ok(())
}

/// What a profile's numbers mean: 4 = confidences by the model's [`Confidence`] (the
/// norm signal for least-squares carved routers); 3 = measured on text the carve left
/// out, with top-1 shares of the kernel's adaptive mass (raw scores for carved models);
/// 2 = the same on
/// the carve's own calibration tokens, where its recovery fit flatters every cut; 0 = an
/// older profile (softmax shares). Any but the current is measured again.
pub const PROFILE_VERSION: u32 = 4;

/// The keep threshold that leaves every expert (above any share).
pub const KEEP_ALL: f32 = 2.0;

impl LayerSensitivity {
    /// s_l: loss per unit of (1 - c)^2.
    fn sensitivity(&self, shares: &[f32]) -> f64 {
        let m = shares
            .iter()
            .map(|c| (1.0 - *c as f64).powi(2))
            .sum::<f64>()
            / shares.len().max(1) as f64;
        // The upper bound of the loss increase; never zero, so that λ = 0 keeps everything.
        (self.delta_nll + 2.0 * self.delta_se).max(1e-6) / m.max(1e-9)
    }
}

impl AdaptiveProfile {
    /// Thresholds for a perplexity cost of `quality_pct` percent (0: off, every expert
    /// kept), with `extra_slots` slots a token past the top-k: the validated λ when that
    /// setting was measured, else the profile's prediction.
    pub fn plan(&self, quality_pct: f64, extra_slots: usize) -> Result<AdaptivePlan> {
        check_quality(quality_pct)?;
        if quality_pct == 0.0 {
            return Ok(AdaptivePlan::off(self.layers.len()));
        }
        let measured = self
            .validated
            .iter()
            .find(|v| v.quality_pct == quality_pct && v.extra_slots == extra_slots);
        if let Some(v) = measured {
            return Ok(AdaptivePlan {
                measured_cost_pct: Some(v.measured_cost_pct),
                mean_experts: v.mean_experts,
                ..self.plan_at(v.lambda)
            });
        }
        let budget = nats_of_pct(quality_pct);
        // Cost is monotone in λ: bisect on a log scale.
        let (mut lo, mut hi) = (1e-12f64, 1e3f64);
        for _ in 0..100 {
            let mid = (lo * hi).sqrt();
            if self.predict(mid).0 <= budget {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        Ok(self.plan_at(lo))
    }

    /// The thresholds for knob `lambda`, with what the profile predicts of them.
    pub fn plan_at(&self, lambda: f64) -> AdaptivePlan {
        let (cost, top1) = self.predict(lambda);
        AdaptivePlan {
            keep: self.keep(lambda),
            lambda,
            measured_cost_pct: None,
            predicted_cost_pct: pct_of_nats(cost),
            predicted_top1_share: top1,
            mean_experts: None,
        }
    }

    fn keep(&self, lambda: f64) -> Vec<f32> {
        self.layers
            .iter()
            .map(|l| match &l.top1_share {
                // λ = 0 is the fixed top-k exactly (a share of 1 would still drop).
                _ if lambda <= 0.0 => KEEP_ALL,
                None => KEEP_ALL,
                Some(c) => (1.0 - (lambda / l.sensitivity(c)).sqrt()).max(0.0) as f32,
            })
            .collect()
    }

    /// Predicted (NLL increase, share of MoE (token, layer) pairs dropped to top-1) at λ.
    fn predict(&self, lambda: f64) -> (f64, f64) {
        let (mut cost, mut dropped, mut pairs) = (0.0, 0usize, 0usize);
        for (l, keep) in self.layers.iter().zip(self.keep(lambda)) {
            let Some(shares) = &l.top1_share else {
                continue;
            };
            let s = l.sensitivity(shares);
            let n = shares.len().max(1) as f64;
            for &c in shares {
                // The kernel drops when the top-1 mass reaches `keep`.
                if c >= keep {
                    cost += s * (1.0 - c as f64).powi(2) / n;
                    dropped += 1;
                }
            }
            pairs += shares.len();
        }
        (cost, dropped as f64 / pairs.max(1) as f64)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::InvalidArgument(format!("adaptive profile: {e}")))?;
        crate::format::write_atomic(path, &json)
    }

    pub fn load(path: &Path) -> Result<AdaptiveProfile> {
        let bytes = crate::format::read_all(path)?;
        serde_json::from_slice(&bytes).map_err(|e| {
            Error::InvalidArgument(format!(
                "{} is not an adaptive-gating profile ({e}); delete it to measure again",
                path.display()
            ))
        })
    }

    /// Checks that the profile was measured on a model with `n_layer` layers.
    pub fn check_fits(&self, n_layer: usize) -> Result<()> {
        if self.layers.len() != n_layer {
            return Err(Error::InvalidArgument(format!(
                "the adaptive-gating profile has {} layers, the model {n_layer}; delete it to measure again",
                self.layers.len()
            )));
        }
        Ok(())
    }
}

/// A profile measurement under way, saved after each pass so that a stopped one resumes
/// where it stopped (on a CPU the measurement takes hours): the profile so far (the
/// layers in `measured` hold their result), the routing pass's shares and the base NLL of
/// every token that each layer's pass is compared against.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PartialProfile {
    /// Names the model file it is measured on (the caller's choice, e.g. size and time):
    /// a partial of another file is measured again.
    pub model: String,
    /// [`calibration_id`] of the windows: a partial of other text is measured again.
    pub windows: String,
    pub profile: AdaptiveProfile,
    pub base_token_nll: Vec<f64>,
    /// The routing pass's top-1 shares, token by token, layer by layer.
    pub shares: Vec<f32>,
    /// The MoE layers whose pass is done.
    pub measured: Vec<usize>,
}

impl PartialProfile {
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec(self)
            .map_err(|e| Error::InvalidArgument(format!("adaptive measurement: {e}")))?;
        crate::format::write_atomic(path, &json)
    }

    /// The partial measurement at `path` when it continues this one (same version, model
    /// and windows); None when there is none, or it is of something else or unreadable
    /// (then it is measured again: the file is only ever a cache of work done).
    pub fn load_matching(path: &Path, model: &str, windows: &[Vec<u32>]) -> Option<Self> {
        let bytes = std::fs::read(path).ok()?;
        let p: PartialProfile = match serde_json::from_slice(&bytes) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("{} is unreadable ({e}); measuring again", path.display());
                return None;
            }
        };
        let matches = p.profile.version == PROFILE_VERSION
            && p.model == model
            && p.windows == calibration_id(windows)
            && p.profile.tokens == windows.iter().map(Vec::len).sum::<usize>();
        if !matches {
            tracing::warn!(
                "{} is of another model, text or pregate; measuring again",
                path.display()
            );
        }
        matches.then_some(p)
    }
}

/// How many passes [`measure`] runs on a model with `n_moe` MoE layers: one routing
/// pass, the base NLL, one per MoE layer.
pub fn measure_passes(n_moe: usize) -> usize {
    n_moe + 2
}

/// Measures a profile on `windows` (sequences, each at most the session's context): the
/// top-1 shares from one routing pass, the base NLL, and one NLL pass per MoE layer with
/// that layer cut to its top-1 expert. Continues `resume` (see
/// [`PartialProfile::load_matching`]) where given, and hands `checkpoint` the state after
/// every pass, stamped with `model_stamp` (see [`PartialProfile::model`]). `progress(done,
/// total)` counts the passes, those resumed included.
pub fn measure(
    session: &mut Session,
    windows: &[Vec<u32>],
    model_stamp: &str,
    resume: Option<PartialProfile>,
    mut checkpoint: impl FnMut(&PartialProfile),
    mut progress: impl FnMut(usize, usize),
) -> Result<AdaptiveProfile> {
    if windows.iter().all(|w| w.len() < 2) {
        return Err(Error::InvalidArgument(
            "adaptive gating needs at least 2 calibration tokens".into(),
        ));
    }
    let model = session.model.clone();
    let n_layer = model.config.n_layer;
    let moe_layers = model.weights.moe_layers();
    let total = measure_passes(moe_layers.len());
    let mut keep = vec![KEEP_ALL; n_layer];
    let result = (|| -> Result<PartialProfile> {
        let mut state = match resume {
            Some(p) if p.profile.layers.len() == n_layer => p,
            _ => {
                model.set_adaptive_keep(&keep)?;
                let mut shares = Vec::new();
                for w in windows {
                    session.reset();
                    shares.extend(session.route_pass(w)?.1);
                }
                progress(1, total);
                let base = token_nll(session, windows)?;
                let state = PartialProfile {
                    model: model_stamp.to_string(),
                    windows: calibration_id(windows),
                    profile: AdaptiveProfile {
                        version: PROFILE_VERSION,
                        tokens: windows.iter().map(Vec::len).sum(),
                        calib: None,
                        base_nll: mean(&base),
                        layers: vec![
                            LayerSensitivity {
                                delta_nll: 0.0,
                                delta_se: 0.0,
                                top1_share: None,
                            };
                            n_layer
                        ],
                        validated: Vec::new(),
                        checks: Vec::new(),
                    },
                    base_token_nll: base,
                    shares,
                    measured: Vec::new(),
                };
                checkpoint(&state);
                state
            }
        };
        progress(2 + state.measured.len(), total);
        for &l in &moe_layers {
            if state.measured.contains(&l) {
                continue;
            }
            keep[l] = 0.0;
            model.set_adaptive_keep(&keep)?;
            let diff: Vec<f64> = token_nll(session, windows)?
                .iter()
                .zip(&state.base_token_nll)
                .map(|(a, b)| a - b)
                .collect();
            keep[l] = KEEP_ALL;
            let (mean, se) = mean_and_se(&diff);
            let shares = state.shares.iter().skip(l).step_by(n_layer).copied();
            state.profile.layers[l] = LayerSensitivity {
                delta_nll: mean,
                delta_se: se,
                top1_share: Some(shares.collect()),
            };
            state.measured.push(l);
            checkpoint(&state);
            progress(2 + state.measured.len(), total);
        }
        Ok(state)
    })();
    // Whatever happened, the model goes back to its fixed top-k.
    model.set_adaptive_keep(&vec![KEEP_ALL; n_layer])?;
    session.reset();
    Ok(result?.profile)
}

/// Each next-token NLL of every window, each from an empty cache.
fn token_nll(session: &mut Session, windows: &[Vec<u32>]) -> Result<Vec<f64>> {
    let mut out = Vec::new();
    for w in windows.iter().filter(|w| w.len() >= 2) {
        session.reset();
        let nll = session.nll(&w[..w.len() - 1], &w[1..], 0)?;
        out.extend(nll.iter().map(|v| *v as f64));
    }
    Ok(out)
}

/// Most calibration passes [`validate`] spends on λ: lowering it for the top-k, and
/// searching both ways where gating may also add experts.
const VALIDATE_PASSES: usize = 5;
const VALIDATE_PASSES_ADDING: usize = 6;

/// The most passes [`validate`] runs on a model with `extra_slots` slots a token past the
/// top-k (it stops early where the profile's own choice fits and nothing can be added).
pub fn validate_passes(extra_slots: usize) -> usize {
    match extra_slots {
        0 => VALIDATE_PASSES,
        _ => VALIDATE_PASSES_ADDING,
    }
}

impl Check {
    /// The pass behind a validated result (None where it kept every expert, or is too
    /// old to say how many it kept).
    fn from_validated(v: &Validated) -> Option<Check> {
        (v.lambda > 0.0).then_some(Check {
            lambda: v.lambda,
            cost: nats_of_pct(v.measured_cost_pct),
            mean_experts: v.mean_experts?,
            extra_slots: v.extra_slots,
        })
    }
}

/// Bisection stops once the largest λ that fits and the smallest that did not are this
/// close (as a ratio).
const TIGHT_BRACKET: f64 = 1.02;

/// What the checks with `extra_slots` say of `budget`: the largest λ whose cost fit it,
/// and the smallest larger λ whose cost did not. (A measured cost is noisy: one that did
/// not fit below a λ that did is left out.)
fn bracket(checks: &[Check], extra_slots: usize, budget: f64) -> (Option<&Check>, Option<&Check>) {
    let same = || checks.iter().filter(|c| c.extra_slots == extra_slots);
    let fits = same()
        .filter(|c| c.cost <= budget)
        .max_by(|a, b| a.lambda.total_cmp(&b.lambda));
    let floor = fits.map_or(f64::NEG_INFINITY, |c| c.lambda);
    let over = same()
        .filter(|c| c.cost > budget && c.lambda > floor)
        .min_by(|a, b| a.lambda.total_cmp(&b.lambda));
    (fits, over)
}

/// The next λ to measure between what fits and what did not, or None when the search is
/// done: nothing can be added and the largest λ tried fits, or the bracket is tight.
fn next_lambda(
    fits: Option<&Check>,
    over: Option<&Check>,
    extra_slots: usize,
    budget: f64,
) -> Option<f64> {
    match (fits, over) {
        (Some(f), Some(o)) => {
            (o.lambda > f.lambda * TIGHT_BRACKET).then_some((f.lambda + o.lambda) / 2.0)
        }
        // Experts can be added: the cost left room, so try dropping more.
        (Some(f), None) => (extra_slots > 0).then_some(f.lambda * 2.0),
        // The cost grows about linearly with λ near the budget.
        (None, Some(o)) => Some(o.lambda * (budget / o.cost.max(1e-12)).clamp(0.05, 0.8)),
        (None, None) => None,
    }
}

/// Measures the thresholds `profile.plan(quality_pct)` chooses on `windows` (those of the
/// profile) and lowers λ until their real cost fits the budget (if none fits, the fixed
/// top-k). Where the model leaves tokens slots past the top-k, the profile's λ
/// underrates what the added experts give back, so λ is then raised (doubled) while the
/// cost fits, and bisected once it does not. The search starts from the profile's
/// earlier [`Check`]s, so a second quality needs fewer passes and lands at or above every
/// λ measured to fit it. Records every pass and the result (with the mean experts a token
/// kept) in the profile, and leaves the model at its fixed top-k. `progress(done, most)`
/// counts the passes, at most [`validate_passes`].
pub fn validate(
    session: &mut Session,
    windows: &[Vec<u32>],
    profile: &mut AdaptiveProfile,
    quality_pct: f64,
    mut progress: impl FnMut(usize, usize),
) -> Result<AdaptivePlan> {
    let model = session.model.clone();
    let n_layer = model.config.n_layer;
    let extra_slots = model.config.moe.as_ref().map_or(0, |m| m.extra_slots());
    let plan = profile.plan(quality_pct, extra_slots)?;
    if plan.measured_cost_pct.is_some() {
        return Ok(plan);
    }
    let budget = nats_of_pct(quality_pct);
    let base = if profile.tokens == windows.iter().map(Vec::len).sum::<usize>() {
        profile.base_nll
    } else {
        mean(&token_nll(session, windows)?)
    };
    if profile.checks.is_empty() {
        // A profile from before the checks were kept: its results are checks too.
        profile.checks = profile
            .validated
            .iter()
            .filter_map(Check::from_validated)
            .collect();
    }
    let passes = validate_passes(extra_slots);
    // The profile's own choice first, unless earlier checks already settle it.
    let mut next = {
        let (fits, over) = bracket(&profile.checks, extra_slots, budget);
        let above = fits.is_none_or(|f| plan.lambda > f.lambda);
        let below = over.is_none_or(|o| plan.lambda < o.lambda);
        match above && below {
            true => Some(plan.lambda),
            false => next_lambda(fits, over, extra_slots, budget),
        }
    };
    let result = (|| -> Result<()> {
        for pass in 0..passes {
            let Some(lambda) = next else { break };
            model.set_adaptive_keep(&profile.plan_at(lambda).keep)?;
            model.reset_active_experts();
            let cost = mean(&token_nll(session, windows)?) - base;
            progress(pass + 1, passes);
            let (experts, decisions) = model.active_experts()?;
            let mean_experts = experts as f64 / decisions.max(1) as f64;
            tracing::info!(
                lambda,
                cost_pct = pct_of_nats(cost),
                mean_experts,
                "adaptive gating: thresholds measured"
            );
            profile.checks.push(Check {
                lambda,
                cost,
                mean_experts,
                extra_slots,
            });
            let (fits, over) = bracket(&profile.checks, extra_slots, budget);
            next = next_lambda(fits, over, extra_slots, budget);
        }
        Ok(())
    })();
    model.set_adaptive_keep(&vec![KEEP_ALL; n_layer])?;
    model.reset_active_experts();
    session.reset();
    result?;
    let (lambda, cost, mean_experts) = match bracket(&profile.checks, extra_slots, budget).0 {
        Some(c) => (c.lambda, c.cost, c.mean_experts),
        None => {
            tracing::warn!("adaptive gating: no threshold fits the budget; keeping every expert");
            let top_k = model.config.moe.as_ref().map_or(0, |m| m.n_used);
            (0.0, 0.0, top_k as f64)
        }
    };
    let measured_cost_pct = pct_of_nats(cost);
    profile.validated.push(Validated {
        quality_pct,
        lambda,
        measured_cost_pct,
        extra_slots,
        mean_experts: Some(mean_experts),
    });
    Ok(AdaptivePlan {
        measured_cost_pct: Some(measured_cost_pct),
        mean_experts: Some(mean_experts),
        ..profile.plan_at(lambda)
    })
}

/// A perplexity cost in percent as a mean NLL increase in nats, and back.
fn nats_of_pct(pct: f64) -> f64 {
    (1.0 + pct / 100.0).ln()
}

fn pct_of_nats(nats: f64) -> f64 {
    (nats.exp() - 1.0) * 100.0
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn mean_and_se(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let m = mean(v);
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (m, (var / n).sqrt())
}

/// Where a model's adaptive-gating profile is kept by default: `MODEL.adaptive.json` for
/// the built-in calibration text, `MODEL.adaptive-ID.json` for a user's (`calib`, from
/// [`calibration_id`]), so that profiles of different texts live side by side.
pub fn default_profile_path(model: &Path, calib: Option<&str>) -> PathBuf {
    match calib {
        None => model.with_extension("adaptive.json"),
        Some(id) => model.with_extension(format!("adaptive-{}.json", &id[..id.len().min(8)])),
    }
}

/// Where a profile's measurement under way is kept: `PROFILE.partial`.
pub fn partial_path(profile: &Path) -> PathBuf {
    let mut p = profile.as_os_str().to_owned();
    p.push(".partial");
    PathBuf::from(p)
}

/// Names a model file's contents cheaply (size and modification time), so that a
/// measurement left from another file at the same path is not resumed.
pub fn model_stamp(path: &Path) -> String {
    let meta = std::fs::metadata(path).ok();
    let len = meta.as_ref().map_or(0, |m| m.len());
    let modified = meta
        .and_then(|m| m.modified().ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("{len}-{modified}")
}

/// Names calibration windows by a sha256 of their tokens (16 hex digits): a profile is
/// reused only for the text it was measured on.
pub fn calibration_id(windows: &[Vec<u32>]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for w in windows {
        h.update((w.len() as u64).to_le_bytes());
        for t in w {
            h.update(t.to_le_bytes());
        }
    }
    crate::format::hex_digest(h)[..16].to_string()
}

/// Says which text a profile was measured on, for an error message.
pub fn describe_calibration(calib: Option<&str>) -> String {
    match calib {
        None => "the built-in calibration text".into(),
        Some(id) => format!("calibration text {id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> AdaptiveProfile {
        // Layer 0 is sensitive, layer 1 barely; both have the same spread of confidence.
        let shares: Vec<f32> = (0..100).map(|i| 0.5 + i as f32 / 200.0).collect();
        AdaptiveProfile {
            version: PROFILE_VERSION,
            tokens: 100,
            calib: None,
            base_nll: 2.0,
            validated: Vec::new(),
            checks: Vec::new(),
            layers: vec![
                LayerSensitivity {
                    delta_nll: 0.2,
                    delta_se: 0.01,
                    top1_share: Some(shares.clone()),
                },
                LayerSensitivity {
                    delta_nll: 0.002,
                    delta_se: 0.0,
                    top1_share: Some(shares),
                },
                LayerSensitivity {
                    delta_nll: 0.0,
                    delta_se: 0.0,
                    top1_share: None,
                },
            ],
        }
    }

    fn check(lambda: f64, cost: f64, extra_slots: usize) -> Check {
        Check {
            lambda,
            cost,
            mean_experts: 2.0,
            extra_slots,
        }
    }

    #[test]
    fn earlier_checks_bracket_the_budget_and_the_search_stops_when_tight() {
        let checks = vec![
            check(0.01, 0.005, 2),
            check(0.02, 0.03, 2),
            check(0.015, 0.02, 2),
            // Over the budget below a λ that fitted (noise): not a bound.
            check(0.005, 0.012, 2),
            // Another room: not this search's.
            check(0.05, 0.0, 0),
        ];
        let lambdas =
            |(f, o): (Option<&Check>, Option<&Check>)| (f.map(|c| c.lambda), o.map(|c| c.lambda));
        let (fits, over) = bracket(&checks, 2, 0.01);
        assert_eq!(lambdas((fits, over)), (Some(0.01), Some(0.015)));
        assert_eq!(next_lambda(fits, over, 2, 0.01), Some(0.0125));
        // A looser budget starts at or above the tighter one's answer.
        let (fits, over) = bracket(&checks, 2, 0.025);
        assert_eq!(lambdas((fits, over)), (Some(0.015), Some(0.02)));
        // Tight: done.
        let tight = [check(0.01, 0.005, 2), check(0.0101, 0.02, 2)];
        let (fits, over) = bracket(&tight, 2, 0.01);
        assert_eq!(next_lambda(fits, over, 2, 0.01), None);
        // Nothing over: double where experts can be added, else done.
        let (fits, over) = bracket(&checks, 0, 0.01);
        assert_eq!(next_lambda(fits, over, 2, 0.01), Some(0.1));
        assert_eq!(next_lambda(fits, over, 0, 0.01), None);
        // Nothing fits: scale the smallest λ over down, about linearly.
        let (fits, over) = bracket(&checks[1..2], 2, 0.01);
        assert!(fits.is_none());
        let next = next_lambda(fits, over, 2, 0.01).unwrap();
        assert!((next - 0.02 / 3.0).abs() < 1e-12, "{next}");
        assert_eq!(next_lambda(None, None, 2, 0.01), None);
    }

    #[test]
    fn a_validated_result_is_a_check() {
        let v = Validated {
            quality_pct: 3.0,
            lambda: 0.026,
            measured_cost_pct: 2.2,
            extra_slots: 2,
            mean_experts: Some(1.5),
        };
        let c = Check::from_validated(&v).unwrap();
        assert_eq!((c.lambda, c.mean_experts, c.extra_slots), (0.026, 1.5, 2));
        assert!((c.cost - 1.022f64.ln()).abs() < 1e-12);
        let none_fit = Validated {
            lambda: 0.0,
            ..v.clone()
        };
        assert!(Check::from_validated(&none_fit).is_none());
        let old = Validated {
            mean_experts: None,
            ..v
        };
        assert!(Check::from_validated(&old).is_none());
    }

    #[test]
    fn quality_zero_keeps_every_expert() {
        let p = profile().plan(0.0, 0).unwrap();
        assert_eq!(p.keep, vec![KEEP_ALL; 3]);
    }

    #[test]
    fn the_insensitive_layer_drops_more_and_the_cost_stays_in_budget() {
        let prof = profile();
        let p = prof.plan(1.0, 0).unwrap();
        assert!(p.keep[1] < p.keep[0], "{:?}", p.keep);
        assert_eq!(p.keep[2], KEEP_ALL);
        assert!(p.predicted_cost_pct <= 1.0 + 1e-9);
        // A bigger budget drops at least as much.
        let q = prof.plan(5.0, 0).unwrap();
        assert!(q.predicted_top1_share >= p.predicted_top1_share);
        assert!(q.predicted_top1_share > 0.0);
        assert!(prof.plan(-1.0, 0).is_err());
    }
}
