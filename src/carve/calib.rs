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

/// Up to `max` calibration tokens from the files (or the built-in corpus), as windows of
/// `seq_len` tokens spread evenly over their whole text: every file and every part of a
/// long file is sampled, not only the first `max` tokens.
pub fn tokens(tok: &Tokenizer, files: &[PathBuf], max: usize, seq_len: usize) -> Result<Vec<u32>> {
    let mut all = Vec::new();
    if files.is_empty() {
        all = tok.encode(BUILTIN_CORPUS, false)?;
    }
    for path in files {
        all.extend(tok.encode(&read_text(path)?, false)?);
    }
    let out = spread(&all, max, seq_len);
    if out.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "the calibration text is empty ({})",
            files
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(out)
}

fn read_text(path: &PathBuf) -> Result<String> {
    std::fs::read_to_string(path).map_err(|cause| Error::Open {
        path: path.clone(),
        cause,
    })
}

/// `max` tokens of `all` in windows of `seq_len`, evenly spaced from its start to its end
/// (all of it when it is no longer than `max`). Windows never overlap.
pub fn spread(all: &[u32], max: usize, seq_len: usize) -> Vec<u32> {
    let Some((starts, seq_len)) = spread_starts(all.len(), max, seq_len) else {
        // All of it, or too little text to space the windows apart: its first max tokens.
        return all[..max.min(all.len())].to_vec();
    };
    let mut out = Vec::with_capacity(max);
    for start in starts {
        let len = seq_len.min(max - out.len());
        out.extend_from_slice(&all[start..start + len]);
    }
    out
}

/// Where [`spread`] starts its windows over a text of `len` tokens, and their length (the
/// last may be cut to `max`); None when it takes the text's start instead.
fn spread_starts(len: usize, max: usize, seq_len: usize) -> Option<(Vec<usize>, usize)> {
    let seq_len = seq_len.clamp(1, max.max(1));
    let windows = max.div_ceil(seq_len);
    if len <= max || windows < 2 || len < windows * seq_len {
        return None;
    }
    // Window w starts at w/(windows-1) of the way to the last full window's start, so
    // consecutive starts are at least seq_len apart.
    let last = len - seq_len;
    Some((
        (0..windows).map(|w| w * last / (windows - 1)).collect(),
        seq_len,
    ))
}

/// Windows that [`spread`]`(all, fitted_max, fitted_seq)` leaves out: up to `windows`
/// windows of `seq_len` tokens, each centred in a different gap between the fitted
/// windows, the gaps chosen evenly from start to end. Text a carve was not fitted on, so
/// what is measured there is what a user's own text will see. Empty when the fitted
/// windows leave no gap that long.
pub fn held_out(
    all: &[u32],
    (fitted_max, fitted_seq): (usize, usize),
    windows: usize,
    seq_len: usize,
) -> Vec<Vec<u32>> {
    let Some((starts, fitted)) = spread_starts(all.len(), fitted_max, fitted_seq) else {
        return Vec::new();
    };
    let gaps: Vec<(usize, usize)> = starts
        .windows(2)
        .map(|p| (p[0] + fitted, p[1]))
        .filter(|&(a, b)| b >= a + seq_len)
        .collect();
    let take = windows.min(gaps.len());
    (0..take)
        .map(|i| {
            let g = if take < 2 {
                gaps.len() / 2
            } else {
                i * (gaps.len() - 1) / (take - 1)
            };
            let (a, b) = gaps[g];
            let start = a + (b - a - seq_len) / 2;
            all[start..start + seq_len].to_vec()
        })
        .collect()
}

/// Up to `max` tokens split evenly between the calibration `files` (each spread over its
/// file in windows of `seq_len`), each labelled with its file's index (Read-ME's data
/// domains). Every file must yield a token.
pub fn tokens_by_file(
    tok: &Tokenizer,
    files: &[PathBuf],
    max: usize,
    seq_len: usize,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let per_file = (max / files.len().max(1)).max(1);
    let (mut all, mut labels) = (Vec::new(), Vec::new());
    for (i, path) in files.iter().enumerate() {
        let t = spread(&tok.encode(&read_text(path)?, false)?, per_file, seq_len);
        if t.is_empty() {
            return Err(Error::Carve(format!("{} has no tokens", path.display())));
        }
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
        || opts.recover
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
    let (mut scores, mut h) = (vec![0f32; ff], vec![0f32; ff]);
    let keep = keeps_hidden(opts);
    for (t, x) in xn.chunks_exact(d).enumerate() {
        let x_norm = x.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        for i in 0..ff {
            let (g, u) = (gate[t * ff + i], up[t * ff + i]);
            scores[i] = silu(g / (x_norm * gn[i])) * (u / (x_norm * un[i]));
            h[i] = silu(g) * u;
        }
        layer
            .markers
            .mark_top(first + t, &scores, opts.k_act, scratch);
        layer.markers.add_activations(&h);
        if keep {
            layer.hidden.extend(h.iter().map(|&v| f16::from_f32(v)));
        }
    }
    layer.inputs.extend_from_slice(xn);
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

#[cfg(test)]
mod tests {
    use super::{held_out, spread};

    #[test]
    fn spread_spaces_whole_windows_from_start_to_end() {
        let all: Vec<u32> = (0..100).collect();
        // 3 windows of 10: at 0, 45 and 90.
        let got = spread(&all, 30, 10);
        let want: Vec<u32> = (0..10).chain(45..55).chain(90..100).collect();
        assert_eq!(got, want);
        // A partial last window: 25 tokens = 10 + 10 + 5.
        let got = spread(&all, 25, 10);
        assert_eq!(got.len(), 25);
        assert_eq!(&got[..10], &all[..10]);
        assert_eq!(&got[20..], &all[90..95]);
    }

    #[test]
    fn spread_keeps_short_text_whole_and_never_overlaps() {
        let all: Vec<u32> = (0..50).collect();
        assert_eq!(spread(&all, 64, 16), all);
        assert_eq!(spread(&all, 50, 16), all);
        // Longer than max but too short to space 4 windows apart: the first max tokens.
        assert_eq!(spread(&all, 49, 16), all[..49].to_vec());
        for max in 1..50 {
            for seq in 1..20 {
                let got = spread(&all, max, seq);
                assert_eq!(got.len(), max);
                let mut seen = got.clone();
                seen.sort_unstable();
                seen.dedup();
                assert_eq!(seen.len(), max, "max {max} seq {seq} repeats a token");
            }
        }
    }

    #[test]
    fn held_out_windows_miss_every_fitted_token() {
        let all: Vec<u32> = (0..10_000).collect();
        // A carve's 8 windows of 100, and 4 windows of 50 between them.
        let fitted = spread(&all, 800, 100);
        let got = held_out(&all, (800, 100), 4, 50);
        assert_eq!(got.len(), 4);
        for w in &got {
            assert_eq!(w.len(), 50);
            assert!(
                w.windows(2).all(|p| p[1] == p[0] + 1),
                "a window is contiguous"
            );
            assert!(w.iter().all(|t| !fitted.contains(t)), "{w:?}");
        }
        // Spread from start to end: the first and the last gap.
        assert!(got[0][0] < 1_500 && got[3][0] > 8_500);
        // More windows than gaps: one per gap; text the carve took whole: none.
        assert_eq!(held_out(&all, (800, 100), 20, 50).len(), 7);
        assert!(held_out(&all[..800], (800, 100), 4, 50).is_empty());
    }
}
