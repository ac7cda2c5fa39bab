//! Dense → mixture-of-experts conversion without training (CMoE; design §3).
//!
//! The dense model runs on the GPU over calibration text while every layer's FFN input and
//! gate/up pre-activations are captured. Per layer, each token marks its K_a neurons of
//! largest normalised activation; neurons are split into shared experts (highest rates) and
//! equal routed experts (balanced assignment on marker columns), and a training-free router
//! is built from one representative neuron per expert. The result is written as a GGUF.

pub mod calib;
pub mod partition;
pub mod recover;
pub mod router;
mod tensors;

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::engine::{Engine, EngineOptions};
use crate::error::{Error, Result};
use crate::gpu::GpuOptions;
use crate::quant::DType;

pub use partition::{partition_neurons, NeuronProfile, Partition};
pub use recover::RouterFit;
use tensors::Router;

/// Carving method. Only CMoE exists so far; Read-ME clustering is tracked in the carve issue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Cmoe,
}

#[derive(Clone, Debug)]
pub struct CarveOptions {
    pub method: Method,
    /// Experts in all, shared included (CMoE's E).
    pub n_experts: usize,
    pub n_shared: usize,
    /// Routed experts each token uses.
    pub n_active: usize,
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
    /// Refit the shared expert's down-projection by least squares.
    pub refit_shared: bool,
    /// Tune the representative router's selection bias for even expert load.
    pub balance: bool,
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
            k_act: 10,
            calib: Vec::new(),
            calib_tokens: 2048,
            seq_len: 1024,
            down_type: DType::Q8_0,
            // Measured: S2A2E16 PPL 161 with least squares vs 309 with representatives.
            router_fit: RouterFit::LeastSquares,
            refit_shared: false,
            balance: true,
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
    /// Zero neurons added so the experts are equal and block-aligned.
    pub padding_neurons: usize,
    /// Fraction of FFN neurons a token uses (shared + active routed).
    pub active_fraction: f64,
    /// Bytes of one routed expert (gate + up + down) in one layer.
    pub bytes_per_expert: u64,
    pub output_bytes: u64,
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
    let tokens = calib::tokens(&engine.tokenizer, &opts.calib, opts.calib_tokens)?;
    let size = expert_size(c.d_ff, opts.n_experts, opts.down_type);
    let padding = size * opts.n_experts - c.d_ff;
    if padding > 0 {
        tracing::warn!(
            "{} experts do not divide {} FFN neurons: padding with {padding} zero neurons ({size} per expert)",
            opts.n_experts,
            c.d_ff
        );
    }

    let profiles = calib::profile(&engine, &tokens, opts, &mut progress)?;
    tracing::info!(seconds = t0.elapsed().as_secs_f64(), "calibration done");
    let mut writer = tensors::ExpertWriter::new(f, opts, size, padding)?;
    for (l, layer) in profiles.into_iter().enumerate() {
        let part = partition_neurons(&layer.markers, opts.n_experts, opts.n_shared, size);
        let down = writer.dense_down(l)?;
        let mut router = writer.representative_router(l, &part, &layer.inputs)?;
        let mut shared_down = None;
        if opts.router_fit != RouterFit::Representative || opts.refit_shared {
            let Router::Representative { rg, ru, bias } = &router else {
                unreachable!("representative_router returns the representative router")
            };
            let data = recover::LayerData {
                inputs: &layer.inputs,
                hidden: &layer.hidden,
                down: &down,
                d: c.d_model,
                d_ff: c.d_ff,
            };
            let r = recover::recover(
                &data,
                &part,
                (rg, ru, bias),
                opts.n_active,
                opts.router_fit,
                opts.refit_shared,
            );
            shared_down = r.shared_down;
            if let Some(w) = r.router {
                router = Router::Linear(w);
            }
        }
        writer.add_layer(l, &part, &down, &router, shared_down.as_deref())?;
        progress(CarveEvent::Carving {
            done: l + 1,
            total: c.n_layer,
        });
    }
    tracing::info!(seconds = t0.elapsed().as_secs_f64(), "layers carved");
    progress(CarveEvent::Writing);
    let bytes_per_expert = writer.bytes_per_expert();
    writer.write(output)?;
    let output_bytes = std::fs::metadata(output).map(|m| m.len()).unwrap_or(0);
    Ok(CarveSummary {
        seconds: t0.elapsed().as_secs_f64(),
        layers: c.n_layer,
        calib_tokens: tokens.len(),
        neurons_per_expert: size,
        padding_neurons: padding,
        active_fraction: ((opts.n_shared + opts.n_active) * size) as f64
            / (opts.n_experts * size) as f64,
        bytes_per_expert,
        output_bytes,
    })
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
    if o.n_shared >= o.n_experts {
        return bad(format!(
            "--shared {} leaves no routed experts out of {}",
            o.n_shared, o.n_experts
        ));
    }
    let routed = o.n_experts - o.n_shared;
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
    if output.exists() && !o.overwrite {
        return bad(format!(
            "{} exists; remove it or pass --force to replace it",
            output.display()
        ));
    }
    Ok(())
}
