//! Calibration: text to tokens, and the dense model's FFN activations to neuron markers.

use std::path::PathBuf;

use half::f16;

use crate::engine::Engine;
use crate::error::{Error, Result};
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
        let mut t =
            tokens(tok, std::slice::from_ref(path), per_file.max(1)).map_err(|e| match e {
                Error::Carve(_) => Error::Carve(format!("{} has no tokens", path.display())),
                e => e,
            })?;
        t.truncate(per_file.max(1));
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
    // Row norms of gate and up: the scores use L2-normalised rows.
    let mut norms = Vec::with_capacity(c.n_layer);
    for l in 0..c.n_layer {
        let row_norms = |name: &str| -> Result<Vec<f32>> {
            let t = f.require(&format!("blk.{l}.{name}.weight"))?;
            let mut w = vec![0f32; ff * d];
            dequantize(t.dtype, f.bytes(t), &mut w)?;
            Ok(w.chunks_exact(d)
                .map(|r| r.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12))
                .collect())
        };
        norms.push((row_norms("ffn_gate")?, row_norms("ffn_up")?));
    }
    let mut layers: Vec<LayerCalibration> = (0..c.n_layer)
        .map(|_| LayerCalibration {
            markers: NeuronProfile::new(ff, tokens.len()),
            inputs: Vec::with_capacity(tokens.len() * d),
            hidden: Vec::new(),
        })
        .collect();
    let keep_hidden = opts.router_fit != super::RouterFit::Representative
        || opts.refit_shared
        || opts.method == super::Method::Readme;
    let mut session = engine.session()?;
    let mut scores = vec![0f32; ff];
    let mut scratch = Vec::new();
    let mut done = 0;
    for seq in tokens.chunks(opts.seq_len) {
        let mut seen = vec![0usize; c.n_layer];
        session.capture_ffn(seq, |l, n, xn, gate, up| {
            let layer = &mut layers[l];
            let (gn, un) = &norms[l];
            for t in 0..n {
                let x = &xn[t * d..(t + 1) * d];
                let x_norm = x.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                for i in 0..ff {
                    let a = gate[t * ff + i] / (x_norm * gn[i]);
                    let b = up[t * ff + i] / (x_norm * un[i]);
                    scores[i] = silu(a) * b;
                }
                let global = done + seen[l] + t;
                layer
                    .markers
                    .mark_top(global, &scores, opts.k_act, &mut scratch);
            }
            layer.inputs.extend_from_slice(xn);
            if keep_hidden {
                layer.hidden.extend(
                    gate.iter()
                        .zip(up)
                        .map(|(g, u)| f16::from_f32(silu(*g) * u)),
                );
            }
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
