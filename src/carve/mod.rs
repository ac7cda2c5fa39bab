//! Dense → mixture-of-experts conversion without training (CMoE; design §3).
//!
//! The dense model runs on the GPU over calibration text while every layer's FFN input and
//! gate/up pre-activations are captured. Per layer, each token marks its K_a neurons of
//! largest normalised activation; neurons are split into shared experts (highest rates) and
//! equal routed experts (balanced assignment on marker columns), and a training-free router
//! is built from one representative neuron per expert. Read-ME's variant (`readme.rs`)
//! clusters the tokens instead and gives each cluster its own expert. The result is
//! written as a GGUF.

pub mod calib;
pub mod partition;
pub mod readme;
pub mod recover;
pub mod router;
pub mod sequential;
mod tensors;

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::engine::{Engine, EngineOptions};
use crate::error::{Error, Result};
use crate::gpu::GpuOptions;
use crate::model::config::count_fit_counts;
use crate::quant::DType;
use crate::router::PreGateRouter;

pub use partition::{partition_neurons, NeuronProfile, Partition, SharedBy};
pub use readme::{ClusterLabels, ClusterSource};
use recover::LinearRecovery;
pub use recover::RouterFit;
pub use tensors::{routers_fingerprint, PREGATE_FIT_EXPERTS_KEY, PREGATE_FIT_KEY};
use tensors::{MoeShape, Router};

/// Carving method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Shared experts by activation rate, routed experts by co-activation (CMoE).
    Cmoe,
    /// One expert per token cluster, the shared expert their intersection (Read-ME).
    Readme,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Cmoe => "cmoe",
            Method::Readme => "readme",
        }
    }
}

#[derive(Clone, Debug)]
pub struct CarveOptions {
    pub method: Method,
    /// `cmoe`: experts in all, shared included (CMoE's E). `readme`: clusters, one routed
    /// expert each (the shared expert comes on top).
    pub n_experts: usize,
    /// `cmoe` only: shared experts (`readme`'s shared expert is the clusters' intersection).
    pub n_shared: usize,
    /// Routed experts each token uses.
    pub n_active: usize,
    /// `cmoe`: what ranks the neurons for the shared experts.
    pub shared_by: SharedBy,
    /// Neurons each calibration token marks active (K_a).
    pub k_act: usize,
    /// Calibration text files; empty: the built-in corpus.
    pub calib: Vec<PathBuf>,
    pub calib_tokens: usize,
    pub seq_len: usize,
    /// Block type of the re-quantised down-projection slices.
    pub down_type: DType,
    /// How the router scores experts.
    pub router_fit: RouterFit,
    /// Fit what the unchosen experts add (a linear map of the FFN input and a correction
    /// of the shared down-projection), and write it (`ffn_recover`, `ffn_recover_shexp`)
    /// for the runtime to use at the carved number of experts.
    pub recover: bool,
    /// Tune the representative router's selection bias for even expert load.
    pub balance: bool,
    /// `readme`: share of the FFN neurons each cluster keeps per layer.
    pub remain_rate: f64,
    /// `readme`: seeds k-means.
    pub seed: u64,
    /// `cmoe`: calibrate each layer on the output of the carved layers before it (on the
    /// CPU), not on the dense model's (one GPU pass). `readme` always takes the GPU pass:
    /// its k-means needs every layer's activations at once.
    pub sequential: bool,
    /// Also fit the recovery for this pre-gating router's choices (`--routing pregate`),
    /// written as `ffn_recover_pregate`. The router must have been trained on this very
    /// carve: the carve checks the routers it makes against the ones the router learned.
    pub pregate_router: Option<PathBuf>,
    /// Experts a token the pre-gate's fit is for (None: `n_active`). Fitted for three, the
    /// pre-gate at three experts a token runs as well as layer routing does.
    pub pregate_experts: Option<usize>,
    /// Replace an existing output file.
    pub overwrite: bool,
    pub gpu: GpuOptions,
}

impl Default for CarveOptions {
    fn default() -> Self {
        CarveOptions {
            method: Method::Cmoe,
            n_experts: 16,
            n_shared: 2,
            n_active: 2,
            // Measured: S2A2E16 PPL 43.3 vs 45.7 by rate, S2A6E16 24.2 vs 27.1.
            shared_by: SharedBy::Energy,
            k_act: 10,
            calib: Vec::new(),
            // Measured: PPL 45.7 vs 50.7 with 4096; carves in 137 s on the 2-core box.
            calib_tokens: 8192,
            // Measured: PPL 102.2 vs 103.0 with 1024, and 66 s vs 84 s.
            seq_len: 512,
            down_type: DType::Q8_0,
            // Measured: S2A2E16 PPL 161 with least squares vs 309 with representatives.
            router_fit: RouterFit::LeastSquares,
            // Measured: S2A2E16 PPL 102.2 -> 52.6 on eval.txt with the map alone.
            recover: true,
            balance: true,
            remain_rate: 0.5,
            seed: 7,
            // Measured: S2A2E16 PPL 142 vs 161, and 50 s vs 300 s on the 2-core box.
            sequential: true,
            pregate_router: None,
            pregate_experts: None,
            overwrite: false,
            gpu: GpuOptions::default(),
        }
    }
}

/// Progress of a carve, for a progress bar.
#[derive(Clone, Copy, Debug)]
pub enum CarveEvent {
    /// Calibration tokens run through the dense model so far.
    Calibrating {
        done: usize,
        total: usize,
    },
    /// Layers carved so far.
    Carving {
        done: usize,
        total: usize,
    },
    Writing,
}

/// What `pregate carve` prints at the end.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CarveSummary {
    pub seconds: f64,
    pub layers: usize,
    pub calib_tokens: usize,
    pub neurons_per_expert: usize,
    /// Neurons of the shared expert (padding included).
    pub shared_neurons: usize,
    /// Zero neurons added per layer so the experts are equal and block-aligned (`readme`:
    /// the mean over layers).
    pub padding_neurons: usize,
    /// Fraction of the dense FFN's neurons a token uses (shared + active routed; `readme`:
    /// its cluster's share).
    pub active_fraction: f64,
    /// Neurons a token computes per layer, zero padding included.
    pub computed_neurons: usize,
    /// Bytes of one routed expert (gate + up + down) in one layer, the largest layer's.
    pub bytes_per_expert: u64,
    pub output_bytes: u64,
    /// `readme`: the clusters' sizes in calibration tokens, and where their labels went.
    pub cluster_tokens: Vec<usize>,
    pub labels_path: Option<PathBuf>,
}

/// The carved experts of every layer.
struct Layout {
    parts: Vec<Partition>,
    shape: MoeShape,
    labels: Option<ClusterLabels>,
}

/// Carves the dense GGUF at `input` into an MoE GGUF at `output` (written to a temporary
/// file and renamed; `input` is never touched).
pub fn carve(
    input: &Path,
    output: &Path,
    opts: &CarveOptions,
    mut progress: impl FnMut(CarveEvent),
) -> Result<CarveSummary> {
    let t0 = Instant::now();
    check_options(input, output, opts)?;
    // Refuse what cannot be carved before loading anything onto the GPU.
    let file = crate::format::GgufFile::open(input)?;
    let config = crate::model::ModelConfig::from_gguf(&file)?;
    if config.moe.is_some() {
        return Err(Error::Carve(format!(
            "{} is already a mixture of experts",
            input.display()
        )));
    }
    for l in 0..config.n_layer {
        for t in ["ffn_gate", "ffn_up", "ffn_down"] {
            if file.tensor(&format!("blk.{l}.{t}.weight")).is_none() {
                return Err(Error::Carve(format!(
                    "layer {l} has no gated FFN ({t}.weight is missing)"
                )));
            }
        }
    }
    drop(file);
    let engine = Engine::load(
        input,
        &EngineOptions {
            gpu: opts.gpu.clone(),
            ctx: opts.seq_len,
            ..Default::default()
        },
    )?;
    let c = config;
    let f = &engine.model.file;
    let (tokens, domains) = if opts.method == Method::Readme && opts.calib.len() > 1 {
        let (t, l) = calib::tokens_by_file(
            &engine.tokenizer,
            &opts.calib,
            opts.calib_tokens,
            opts.seq_len,
        )?;
        (t, Some(l))
    } else {
        let t = calib::tokens(
            &engine.tokenizer,
            &opts.calib,
            opts.calib_tokens,
            opts.seq_len,
        )?;
        (t, None)
    };
    let pregate = match &opts.pregate_router {
        Some(p) => Some(pregate_plan(p, &c, &tokens, opts)?),
        None => None,
    };
    let plan = pregate.as_ref().map(|(_, plan)| plan);
    let (shape, labels, mut writer) = if opts.sequential && opts.method == Method::Cmoe {
        let (shape, writer) =
            sequential::carve_in_order(f, &c, &tokens, opts, plan, &mut progress)?;
        (shape, None, writer)
    } else {
        let profiles = calib::profile(&engine, &tokens, opts, &mut progress)?;
        tracing::info!(seconds = t0.elapsed().as_secs_f64(), "calibration done");
        let layout = match opts.method {
            Method::Cmoe => cmoe_layout(f, &profiles, c.d_ff, opts)?,
            Method::Readme => readme::layout(&profiles, c.d_ff, &tokens, domains, opts)?,
        };
        warn_padding(&layout.shape);
        let mut writer = tensors::ExpertWriter::new(f, opts, layout.shape)?;
        for (l, (layer, part)) in profiles.iter().zip(&layout.parts).enumerate() {
            let down = writer.dense_down(l)?;
            let pregate = plan.map(|plan| PregateFit { plan, stream: None });
            carve_layer(&mut writer, l, layer, part, &down, opts, pregate)?;
            progress(CarveEvent::Carving {
                done: l + 1,
                total: c.n_layer,
            });
        }
        (layout.shape, layout.labels, writer)
    };
    tracing::info!(seconds = t0.elapsed().as_secs_f64(), "layers carved");
    if let (Some((router, _)), Some(path)) = (&pregate, &opts.pregate_router) {
        check_pregate_router(router, path, &writer)?;
        writer.mark_pregate_fit(&router.fingerprint(), pregate_experts(opts));
    }
    progress(CarveEvent::Writing);
    let bytes_per_expert = writer.bytes_per_expert();
    writer.write(output)?;
    let output_bytes = std::fs::metadata(output).map(|m| m.len()).unwrap_or(0);
    let (mut cluster_tokens, mut labels_path) = (Vec::new(), None);
    if let Some(labels) = &labels {
        cluster_tokens = vec![0; labels.clusters];
        labels
            .labels
            .iter()
            .for_each(|&c| cluster_tokens[c as usize] += 1);
        let p = ClusterLabels::path_for(output);
        labels.save(&p)?;
        labels_path = Some(p);
    }
    Ok(CarveSummary {
        seconds: t0.elapsed().as_secs_f64(),
        layers: c.n_layer,
        calib_tokens: tokens.len(),
        neurons_per_expert: shape.expert_ff,
        shared_neurons: shape.shared_ff,
        padding_neurons: shape.padding,
        active_fraction: match opts.method {
            Method::Cmoe => (opts.n_shared + opts.n_active) as f64 / opts.n_experts as f64,
            Method::Readme => opts.remain_rate,
        },
        computed_neurons: shape.shared_ff + opts.n_active * shape.expert_ff,
        bytes_per_expert,
        output_bytes,
        cluster_tokens,
        labels_path,
    })
}

/// Experts a token the pre-gate's recovery is fitted for (`--pregate-experts`, else the
/// carve's).
fn pregate_experts(opts: &CarveOptions) -> usize {
    opts.pregate_experts.unwrap_or(opts.n_active)
}

/// Loads `--pregate-router` and plans the calibration tokens with it.
fn pregate_plan(
    path: &Path,
    c: &crate::model::ModelConfig,
    tokens: &[u32],
    opts: &CarveOptions,
) -> Result<(PreGateRouter, recover::RouterPlan)> {
    if !opts.recover {
        return Err(Error::InvalidArgument(
            "--pregate-router fits a recovery for the router's choices; it cannot go with --no-recover".into(),
        ));
    }
    let router = PreGateRouter::load(path)?;
    let n_routed = match opts.method {
        Method::Cmoe => opts.n_experts.saturating_sub(opts.n_shared),
        Method::Readme => opts.n_experts,
    };
    router.check_fits(c.n_layer, n_routed)?;
    let k = pregate_experts(opts);
    if k == 0 || k >= n_routed {
        return Err(Error::InvalidArgument(format!(
            "--pregate-experts must be between 1 and {} (the routed experts less one)",
            n_routed.saturating_sub(1)
        )));
    }
    let plan = recover::RouterPlan::new(&router, tokens, opts.seq_len, k);
    Ok((router, plan))
}

/// A recovery fit for a router's choices only helps the model that router learned to
/// predict: refuse a carve whose routers differ from those.
fn check_pregate_router(
    router: &PreGateRouter,
    path: &Path,
    writer: &tensors::ExpertWriter,
) -> Result<()> {
    match &router.model {
        Some(m) if *m != writer.routers_fingerprint() => Err(Error::Carve(format!(
            "{} was trained on a carve with other routers than this one; carve with the options (and calibration text) of the model it was trained on, or train it on this model",
            path.display()
        ))),
        Some(_) => Ok(()),
        None => {
            tracing::warn!(
                "{} does not record the model it was trained on (an older train-router); its recovery fit assumes this carve is that model",
                path.display()
            );
            Ok(())
        }
    }
}

fn warn_padding(shape: &MoeShape) {
    if shape.padding > 0 {
        tracing::warn!(
            "experts padded with {} zero neurons per layer ({} per expert)",
            shape.padding,
            shape.expert_ff
        );
    }
}

/// What a carve fits the pre-gate's recovery on: the router's choices for the calibration
/// tokens, and (sequential carving) the layer's FFN inputs and activations on a stream
/// that the pre-gate routed (None: the layers' own stream's).
pub(crate) struct PregateFit<'a> {
    pub plan: &'a recover::RouterPlan,
    pub stream: Option<(&'a [f32], &'a [half::f16])>,
}

/// A layer's router and its recovery fits: for its own choices, and for the pre-gate's.
type CarvedLayer = (Router, Option<LinearRecovery>, Option<LinearRecovery>);

/// Carves layer `l` from its calibration into `writer`: the router (least squares or
/// CMoE's representatives), the experts of `part`, and the recovery fits.
fn carve_layer(
    writer: &mut tensors::ExpertWriter,
    l: usize,
    layer: &calib::LayerCalibration,
    part: &Partition,
    down: &[f32],
    opts: &CarveOptions,
    pregate: Option<PregateFit>,
) -> Result<CarvedLayer> {
    let mut router = writer.representative_router(l, part, &layer.inputs)?;
    let d = writer.d_model();
    let data = recover::LayerData {
        inputs: &layer.inputs,
        hidden: &layer.hidden,
        down,
        d,
        d_ff: down.len() / d.max(1),
    };
    let mut outputs = Vec::new();
    if opts.router_fit != RouterFit::Representative || opts.recover {
        let r = recover::recover(&data, part, opts.router_fit);
        outputs = r.outputs;
        if let Some(w) = r.router {
            router = Router::Linear(w);
        }
    }
    let fit = |data: &recover::LayerData,
               outputs: &[Vec<f32>],
               choose: &dyn Fn(usize, &[f32]) -> Vec<usize>| {
        let missing = recover::unchosen_output(data, part, outputs, choose);
        recover::fit_recovery(data, &part.shared, &missing, opts.seq_len)
    };
    // The layers' own fit, and its corrections for tokens that run other counts.
    let (recovery, count_fits) = match opts.recover {
        true => {
            let choose = |x: &[f32], k: usize| router.select(x, k);
            let missing =
                recover::unchosen_output(&data, part, &outputs, |_, x| choose(x, opts.n_active));
            let fit = recover::fit_recovery(&data, &part.shared, &missing, opts.seq_len);
            let counts = count_fit_counts(opts.n_active, part.experts.len());
            let corrections = recover::fit_count_fits(
                &data,
                part,
                &outputs,
                &missing,
                &counts,
                choose,
                opts.seq_len,
            );
            (Some(fit), corrections)
        }
        false => (None, Vec::new()),
    };
    let for_plan = pregate.filter(|_| opts.recover).map(|p| {
        let choose = |t: usize, _: &[f32]| p.plan.choices(t, l);
        match p.stream {
            Some((inputs, hidden)) => {
                // Every expert's output on every token again, on the other stream: free
                // the first set before (a large model's are gigabytes).
                drop(std::mem::take(&mut outputs));
                let own = recover::LayerData {
                    inputs,
                    hidden,
                    ..data
                };
                let outputs: Vec<Vec<f32>> =
                    part.experts.iter().map(|e| own.output_of(e)).collect();
                fit(&own, &outputs, &choose)
            }
            None => fit(&data, &outputs, &choose),
        }
    });
    writer.add_layer(l, part, down, &router, recovery.as_ref(), for_plan.as_ref())?;
    writer.add_count_fits(l, &count_fits)?;
    Ok((router, recovery, for_plan))
}

/// CMoE's shape: `n_experts` equal experts, block-aligned, `n_shared` of them shared.
fn cmoe_shape(d_ff: usize, opts: &CarveOptions) -> MoeShape {
    let size = expert_size(d_ff, opts.n_experts, opts.down_type);
    MoeShape {
        method: Method::Cmoe,
        n_routed: opts.n_experts - opts.n_shared,
        n_active: opts.n_active,
        expert_ff: size,
        shared_ff: opts.n_shared * size,
        padding: size * opts.n_experts - d_ff,
        experts_total: opts.n_experts,
        shared_experts: opts.n_shared,
    }
}

/// CMoE: per layer, shared experts by `opts.shared_by` and routed experts by co-activation.
fn cmoe_layout(
    f: &crate::format::GgufFile,
    profiles: &[calib::LayerCalibration],
    d_ff: usize,
    opts: &CarveOptions,
) -> Result<Layout> {
    let shape = cmoe_shape(d_ff, opts);
    let parts = profiles
        .iter()
        .enumerate()
        .map(|(l, layer)| {
            let down = calib::dense_matrix(f, &format!("blk.{l}.ffn_down.weight"))?;
            Ok(cmoe_partition(layer, &down, &shape, opts))
        })
        .collect::<Result<_>>()?;
    Ok(Layout {
        parts,
        shape,
        labels: None,
    })
}

/// One layer's CMoE partition from its calibration; `down` is the dense down-projection.
fn cmoe_partition(
    layer: &calib::LayerCalibration,
    down: &[f32],
    shape: &MoeShape,
    opts: &CarveOptions,
) -> Partition {
    let padded = shape.expert_ff * opts.n_experts;
    let ranking = layer.markers.ranking(opts.shared_by, down, padded);
    partition_neurons(
        &layer.markers,
        &ranking,
        opts.n_experts,
        opts.n_shared,
        shape.expert_ff,
    )
}

/// Neurons per expert: d_ff / n_experts rounded up to the down type's block, so the
/// down-projection slices re-quantise cleanly.
pub fn expert_size(d_ff: usize, n_experts: usize, down: DType) -> usize {
    let block = down.block_len();
    d_ff.div_ceil(n_experts).div_ceil(block) * block
}

fn check_options(input: &Path, output: &Path, o: &CarveOptions) -> Result<()> {
    let bad = |why: String| Err(Error::Carve(why));
    if o.n_experts < 2 {
        return bad(format!("--experts {} must be at least 2", o.n_experts));
    }
    let routed = match o.method {
        Method::Cmoe if o.n_shared >= o.n_experts => {
            return bad(format!(
                "--shared {} leaves no routed experts out of {}",
                o.n_shared, o.n_experts
            ))
        }
        Method::Cmoe => o.n_experts - o.n_shared,
        Method::Readme => {
            if o.calib.len() > 1 && o.calib.len() != o.n_experts {
                return bad(format!(
                    "--method readme makes one cluster per calibration file: {} files, but --experts {}",
                    o.calib.len(),
                    o.n_experts
                ));
            }
            if !(o.remain_rate > 0.0 && o.remain_rate < 1.0) {
                return bad(format!(
                    "--remain-rate {} must lie strictly between 0 and 1",
                    o.remain_rate
                ));
            }
            o.n_experts
        }
    };
    if o.n_active == 0 || o.n_active > routed {
        return bad(format!(
            "--active {} must be between 1 and the {routed} routed experts",
            o.n_active
        ));
    }
    if routed > crate::model::config::MAX_EXPERTS {
        return bad(format!(
            "{routed} routed experts exceed the runtime's {}",
            crate::model::config::MAX_EXPERTS
        ));
    }
    if o.k_act == 0 || o.calib_tokens == 0 || o.seq_len == 0 {
        return bad("--k-act, --calib-tokens and --seq-len must be positive".into());
    }
    let same = match (input.canonicalize(), output.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => input == output,
    };
    if same {
        return bad(format!(
            "the output {} is the input; choose another path",
            output.display()
        ));
    }
    match crate::format::output_problem(output, o.overwrite) {
        Some(why) => bad(why),
        None => Ok(()),
    }
}
