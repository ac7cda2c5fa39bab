//! Calibration: text to tokens, and the dense model's FFN activations to neuron markers.

use std::path::PathBuf;

use half::f16;

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::format::GgufFile;
use crate::model::Tokenizer;
use crate::quant::dequantize;

use super::partition::NeuronProfile;
use super::router::silu;
use super::{CarveEvent, CarveOptions};

/// The built-in corpus (Rust crate sources under MIT/Apache-2.0; see calib/SOURCES.md).
pub const BUILTIN_CORPUS: &str = include_str!("../../calib/corpus.txt");

/// The first `max` tokens of the calibration files (or of the built-in corpus).
pub fn tokens(tok: &Tokenizer, files: &[PathBuf], max: usize) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    if files.is_empty() {
        out = tok.encode(BUILTIN_CORPUS, false)?;
    }
    for path in files {
        let text = std::fs::read_to_string(path).map_err(|cause| Error::Open {
            path: path.clone(),
            cause,
        })?;
        out.extend(tok.encode(&text, false)?);
        if out.len() >= max {
            break;
        }
    }
    out.truncate(max);
    if out.is_empty() {
        return Err(Error::Carve("the calibration set is empty".into()));
    }
    Ok(out)
}

/// Up to `max` tokens split evenly between the calibration `files`, each labelled with its
/// file's index (Read-ME's data domains). Every file must yield a token.
pub fn tokens_by_file(
    tok: &Tokenizer,
    files: &[PathBuf],
    max: usize,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let per_file = max / files.len().max(1);
    let (mut all, mut labels) = (Vec::new(), Vec::new());
    for (i, path) in files.iter().enumerate() {
        let t = tokens(tok, std::slice::from_ref(path), per_file.max(1)).map_err(|e| match e {
            Error::Carve(_) => Error::Carve(format!("{} has no tokens", path.display())),
            e => e,
        })?;
        labels.extend(std::iter::repeat_n(i as u32, t.len()));
        all.extend(t);
    }
    Ok((all, labels))
}

/// One layer's calibration result.
pub struct LayerCalibration {
    /// Which neurons each token marked active.
    pub markers: NeuronProfile,
    /// The FFN inputs [n_tokens, d_model] (the router's load balance is tuned on them).
    pub inputs: Vec<f32>,
    /// silu(gate) * up of every neuron [n_tokens, d_ff], kept only for recovery fits.
    pub hidden: Vec<f16>,
}

impl LayerCalibration {
    pub fn new(n_neurons: usize, n_tokens: usize, d_model: usize) -> LayerCalibration {
        LayerCalibration {
            markers: NeuronProfile::new(n_neurons, n_tokens),
            inputs: Vec::with_capacity(n_tokens * d_model),
            hidden: Vec::new(),
        }
    }
}

/// Whether the carve needs every neuron's silu(gate)·up kept (recovery fits, Read-ME).
pub fn keeps_hidden(opts: &CarveOptions) -> bool {
    opts.router_fit != super::RouterFit::Representative
        || opts.refit_shared
        || opts.method == super::Method::Readme
}

/// Layer `l`'s L2 norms of the gate and up rows: CMoE's scores use normalised rows.
pub fn row_norms(f: &GgufFile, l: usize, d: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let norms = |name: &str| -> Result<Vec<f32>> {
        Ok(unit_norms(
            &dense_matrix(f, &format!("blk.{l}.{name}.weight"))?,
            d,
        ))
    };
    Ok((norms("ffn_gate")?, norms("ffn_up")?))
}

/// The L2 norm of every row of `w` [rows, d] (at least 1e-12).
pub fn unit_norms(w: &[f32], d: usize) -> Vec<f32> {
    w.chunks_exact(d)
        .map(|r| r.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12))
        .collect()
}

/// A tensor of the file dequantised to f32, row-major.
pub fn dense_matrix(f: &GgufFile, name: &str) -> Result<Vec<f32>> {
    let t = f.require(name)?;
    let mut w = vec![0f32; t.n_elements() as usize];
    dequantize(t.dtype, f.bytes(t), &mut w)?;
    Ok(w)
}

/// Marks the neurons of `n` tokens (the first is calibration token `first`) from their FFN
/// input `xn` [n, d] and gate/up pre-activations [n, d_ff], and keeps what the carve needs.
#[allow(clippy::too_many_arguments)]
pub fn add_tokens(
    layer: &mut LayerCalibration,
    first: usize,
    xn: &[f32],
    gate: &[f32],
    up: &[f32],
    (gn, un): (&[f32], &[f32]),
    opts: &CarveOptions,
    scratch: &mut Vec<usize>,
) {
    let ff = gn.len();
    let n = gate.len() / ff.max(1);
    if n == 0 {
        return;
    }
    let d = xn.len() / n;
    let mut scores = vec![0f32; ff];
    for (t, x) in xn.chunks_exact(d).enumerate() {
        let x_norm = x.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        for i in 0..ff {
            let a = gate[t * ff + i] / (x_norm * gn[i]);
            let b = up[t * ff + i] / (x_norm * un[i]);
            scores[i] = silu(a) * b;
        }
        layer
            .markers
            .mark_top(first + t, &scores, opts.k_act, scratch);
    }
    layer.inputs.extend_from_slice(xn);
    if keeps_hidden(opts) {
        layer.hidden.extend(
            gate.iter()
                .zip(up)
                .map(|(g, u)| f16::from_f32(silu(*g) * u)),
        );
    }
}

/// Runs the calibration tokens through the dense model on the GPU, in sequences of
/// `seq_len`, and profiles every layer's neurons.
pub fn profile(
    engine: &Engine,
    tokens: &[u32],
    opts: &CarveOptions,
    progress: &mut impl FnMut(CarveEvent),
) -> Result<Vec<LayerCalibration>> {
    let c = &engine.model.config;
    let f = &engine.model.file;
    let (d, ff) = (c.d_model, c.d_ff);
    let norms = (0..c.n_layer)
        .map(|l| row_norms(f, l, d))
        .collect::<Result<Vec<_>>>()?;
    let mut layers: Vec<LayerCalibration> = (0..c.n_layer)
        .map(|_| LayerCalibration::new(ff, tokens.len(), d))
        .collect();
    let mut session = engine.session()?;
    let mut scratch = Vec::new();
    let mut done = 0;
    for seq in tokens.chunks(opts.seq_len) {
        let mut seen = vec![0usize; c.n_layer];
        session.capture_ffn(seq, |l, n, xn, gate, up| {
            let (gn, un) = &norms[l];
            let first = done + seen[l];
            add_tokens(
                &mut layers[l],
                first,
                xn,
                gate,
                up,
                (gn, un),
                opts,
                &mut scratch,
            );
            seen[l] += n;
        })?;
        done += seq.len();
        progress(CarveEvent::Calibrating {
            done,
            total: tokens.len(),
        });
    }
    Ok(layers)
}
