//! Perplexity exactly as llama.cpp's `llama-perplexity` computes it: the text is cut into
//! non-overlapping chunks of `ctx` tokens (BOS first only if the model adds one), and each
//! chunk is scored on its second half.

use serde::Serialize;

use crate::engine::Engine;
use crate::error::{Error, Result};

#[derive(Clone, Debug, Serialize)]
pub struct PerplexityReport {
    pub ppl: f64,
    pub chunks: usize,
    pub tokens_scored: usize,
    pub ctx: usize,
    /// Standard error of the PPL estimate (as llama-perplexity prints it).
    pub ppl_stderr: f64,
}

/// Scores `text`; `progress(done, total)` is called after each chunk. `max_chunks` limits
/// the work (None: every whole chunk).
pub fn perplexity(
    engine: &Engine,
    text: &str,
    ctx: usize,
    max_chunks: Option<usize>,
    mut progress: impl FnMut(usize, usize, f64),
) -> Result<PerplexityReport> {
    if ctx < 8 {
        return Err(Error::InvalidArgument(format!(
            "--ctx {ctx} is too small (at least 8)"
        )));
    }
    if max_chunks == Some(0) {
        return Err(Error::InvalidArgument(
            "--chunks 0 scores nothing: give at least 1, or leave it out for every chunk".into(),
        ));
    }
    let tok = &engine.tokenizer;
    let tokens = tok.encode(text, false)?;
    let mut chunks = tokens.len() / ctx;
    if let Some(m) = max_chunks {
        chunks = chunks.min(m);
    }
    if chunks == 0 {
        return Err(Error::InvalidArgument(format!(
            "the text has {} tokens, fewer than one chunk of --ctx {ctx}",
            tokens.len()
        )));
    }
    let mut session = crate::model::Session::new(engine.model.clone(), ctx)?;
    let first = ctx / 2;
    let mut nll_sum = 0f64;
    let mut nll2_sum = 0f64;
    let mut count = 0usize;
    for c in 0..chunks {
        let mut input = tokens[c * ctx..(c + 1) * ctx].to_vec();
        // llama-perplexity replaces the first token with BOS when the model adds one.
        if tok.add_bos {
            if let Some(b) = tok.bos {
                input[0] = b;
            }
        }
        // Position i predicts token i + 1 of the same chunk; the last position is unscored.
        let mut targets = tokens[c * ctx + 1..(c + 1) * ctx].to_vec();
        targets.push(0);
        session.reset();
        let nll = session.nll(&input, &targets, first)?;
        // Position i predicts token i+1; score positions first .. ctx-2 (targets first+1 .. ctx-1).
        for v in &nll[first..ctx - 1] {
            let v = *v as f64;
            nll_sum += v;
            nll2_sum += v * v;
            count += 1;
        }
        progress(c + 1, chunks, (nll_sum / count as f64).exp());
    }
    let mean = nll_sum / count as f64;
    let var = (nll2_sum / count as f64 - mean * mean).max(0.0);
    let ppl = mean.exp();
    Ok(PerplexityReport {
        ppl,
        chunks,
        tokens_scored: count,
        ctx,
        ppl_stderr: ppl * (var / (count as f64 - 1.0).max(1.0)).sqrt(),
    })
}
