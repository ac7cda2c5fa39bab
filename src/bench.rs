//! `pregate bench`: prefill and decode speed on the loaded model, best of several runs.

use std::time::Instant;

use serde::Serialize;

use crate::engine::{Engine, RunMetrics};
use crate::error::{Error, Result};

#[derive(Clone, Debug, Serialize)]
pub struct KernelTime {
    pub kernel: String,
    pub ms_per_token: f64,
    pub percent: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub adapter: String,
    pub backend: String,
    /// Per-kernel GPU time of one decode step (empty without timestamp queries).
    pub kernels: Vec<KernelTime>,
    /// `--vram-budget` as given.
    pub budget: String,
    /// Expert counters cover the decode of the last repetition.
    #[serde(flatten)]
    pub metrics: RunMetrics,
    /// Share of that decode's time spent waiting for experts.
    pub stall_share: f64,
}

pub fn run(
    engine: &Engine,
    budget: &str,
    prompt_tokens: usize,
    gen_tokens: usize,
    reps: usize,
) -> Result<BenchReport> {
    if prompt_tokens == 0 || prompt_tokens + gen_tokens > engine.ctx() {
        return Err(Error::InvalidArgument(format!(
            "--prompt-tokens {prompt_tokens} + --gen-tokens {gen_tokens} must be positive and fit the context ({})",
            engine.ctx()
        )));
    }
    // A realistic prompt: real text, repeated to the requested length.
    let text = "fn main() { let v: Vec<u32> = (0..10).map(|x| x * x).collect(); println!(\"{:?}\", v); }\n";
    let base = engine.tokenizer.encode(text, false)?;
    let prompt: Vec<u32> = base.iter().copied().cycle().take(prompt_tokens).collect();
    let mut session = engine.session()?;
    // Warm-up: compiles the pipelines and builds the plans for both shapes.
    session.next_argmax(&prompt)?;
    session.next_argmax(&[prompt[0]])?;
    let mut best_prefill = 0f64;
    let mut best_decode = 0f64;
    let mut last_decode_s = 0f64;
    for _ in 0..reps.max(1) {
        session.reset();
        let t0 = Instant::now();
        let mut tok = session.next_argmax(&prompt)?;
        best_prefill = best_prefill.max(prompt_tokens as f64 / t0.elapsed().as_secs_f64());
        engine.reset_metrics();
        let t1 = Instant::now();
        for _ in 0..gen_tokens {
            tok = session.next_argmax(&[tok])?;
        }
        last_decode_s = t1.elapsed().as_secs_f64();
        if gen_tokens > 0 {
            best_decode = best_decode.max(gen_tokens as f64 / last_decode_s);
        }
    }
    let metrics = engine.metrics();
    let kernels = session.profile_decode()?;
    Ok(BenchReport {
        prefill_tok_s: best_prefill,
        decode_tok_s: best_decode,
        prompt_tokens,
        gen_tokens,
        adapter: engine.gpu().adapter_name(),
        backend: engine.gpu().backend_name(),
        kernels,
        budget: budget.to_string(),
        stall_share: metrics.stall_ms / 1e3 / last_decode_s.max(1e-9),
        metrics,
    })
}
