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
    /// What was fed ("builtin" or "text" in JSON).
    pub input: FedFrom,
    pub adapter: String,
    pub backend: String,
    /// Per-kernel GPU time of one decode step (empty without timestamp queries).
    pub kernels: Vec<KernelTime>,
    /// Per-kernel GPU time per token of one prefill chunk (up to the session's ubatch).
    pub prefill_kernels: Vec<KernelTime>,
    /// `--vram-budget` as given.
    pub budget: String,
    /// Expert counters cover the decode of the last repetition.
    #[serde(flatten)]
    pub metrics: RunMetrics,
    /// Share of that decode's time spent waiting for experts.
    pub stall_share: f64,
    /// Share of the expert bytes held in VRAM (1 when all are resident).
    pub expert_share: f64,
}

/// What a bench run feeds the model: a text's tokens, the prompt and then, one at a time,
/// the decode steps (teacher forcing), so the experts each step asks for are real text's,
/// whatever the model would have generated (a skeleton model's greedy output, or a
/// repeated prompt's, runs the same few experts again and again and flatters any cache).
pub enum BenchInput<'a> {
    /// A passage from the middle of the built-in corpus (Rust sources).
    Builtin,
    /// The user's text (`--text`).
    Text(&'a str),
}

/// Which text a [`BenchReport`] fed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FedFrom {
    /// A passage of the built-in corpus.
    Builtin,
    /// The user's `--text`.
    Text,
}

/// How much of the built-in corpus a bench tokenizes: about 15k tokens of Rust.
const BUILTIN_PASSAGE_BYTES: usize = 64 * 1024;

/// The passage [`BenchInput::Builtin`] feeds: from the first line start after the middle
/// of the corpus, up to [`BUILTIN_PASSAGE_BYTES`].
fn builtin_passage() -> &'static str {
    let text = crate::carve::calib::BUILTIN_CORPUS;
    let mid = text.len() / 2;
    let start = text[mid..].find('\n').map_or(0, |i| mid + i + 1);
    let mut end = (start + BUILTIN_PASSAGE_BYTES).min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[start..end]
}

/// The prompt, and the tokens to feed at the decode steps.
fn bench_tokens(
    engine: &Engine,
    input: &BenchInput,
    prompt_tokens: usize,
    gen_tokens: usize,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let tokens = match input {
        BenchInput::Builtin => {
            let passage = engine.tokenizer.encode(builtin_passage(), false)?;
            // A context longer than the passage takes it again from its start.
            let need = prompt_tokens.saturating_add(gen_tokens);
            passage.iter().copied().cycle().take(need).collect()
        }
        BenchInput::Text(text) => engine.tokenizer.encode(text, false)?,
    };
    split_text(tokens, prompt_tokens, gen_tokens)
}

/// A text's first `prompt_tokens` tokens, and the `gen_tokens` after them.
fn split_text(
    mut tokens: Vec<u32>,
    prompt_tokens: usize,
    gen_tokens: usize,
) -> Result<(Vec<u32>, Vec<u32>)> {
    let need = prompt_tokens.saturating_add(gen_tokens);
    if tokens.len() < need {
        return Err(Error::InvalidArgument(format!(
            "--text has {} tokens; --prompt-tokens {prompt_tokens} + --gen-tokens {gen_tokens} need {need}",
            tokens.len()
        )));
    }
    tokens.truncate(need);
    let fed = tokens.split_off(prompt_tokens);
    Ok((tokens, fed))
}

pub fn run(
    engine: &Engine,
    budget: &str,
    input: &BenchInput,
    prompt_tokens: usize,
    gen_tokens: usize,
    reps: usize,
) -> Result<BenchReport> {
    // Saturating: counts from the command line may sum past usize.
    if prompt_tokens == 0 || prompt_tokens.saturating_add(gen_tokens) > engine.ctx() {
        return Err(Error::InvalidArgument(format!(
            "--prompt-tokens {prompt_tokens} + --gen-tokens {gen_tokens} must be positive and fit the context ({})",
            engine.ctx()
        )));
    }
    let (prompt, fed) = bench_tokens(engine, input, prompt_tokens, gen_tokens)?;
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
        session.next_argmax(&prompt)?;
        best_prefill = best_prefill.max(prompt_tokens as f64 / t0.elapsed().as_secs_f64());
        engine.reset_metrics();
        let t1 = Instant::now();
        for &token in &fed {
            session.next_argmax(&[token])?;
        }
        last_decode_s = t1.elapsed().as_secs_f64();
        if gen_tokens > 0 {
            best_decode = best_decode.max(gen_tokens as f64 / last_decode_s);
        }
    }
    let metrics = engine.metrics();
    let kernels = session.profile_step(1)?;
    session.reset();
    let chunk = prompt_tokens.clamp(1, session.ubatch()) as u32;
    let prefill_kernels = session.profile_step(chunk)?;
    Ok(BenchReport {
        prefill_tok_s: best_prefill,
        decode_tok_s: best_decode,
        prompt_tokens,
        gen_tokens,
        input: match input {
            BenchInput::Builtin => FedFrom::Builtin,
            BenchInput::Text(_) => FedFrom::Text,
        },
        adapter: engine.gpu().adapter_name(),
        backend: engine.gpu().backend_name(),
        kernels,
        prefill_kernels,
        budget: budget.to_string(),
        stall_share: metrics.stall_ms / 1e3 / last_decode_s.max(1e-9),
        expert_share: match (metrics.expert_slots, engine.model.config.moe.as_ref()) {
            (Some(s), Some(m)) => s as f64 / m.n_expert as f64,
            _ => 1.0,
        },
        metrics,
    })
}

/// Fonts tried for the plot's text, in order; `PREGATE_PLOT_FONT` comes first.
const FONT_PATHS: [&str; 6] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/Library/Fonts/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Registers a TrueType font for plotters (it draws text with it, SVG included).
fn register_plot_font() -> Result<()> {
    let from_env = std::env::var("PREGATE_PLOT_FONT").ok();
    let candidates = from_env.iter().map(String::as_str).chain(FONT_PATHS);
    for path in candidates {
        if let Ok(bytes) = std::fs::read(path) {
            // plotters keeps fonts for the whole process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font(
                "sans-serif",
                plotters::style::FontStyle::Normal,
                bytes,
            )
            .is_ok()
            {
                return Ok(());
            }
        }
    }
    Err(Error::InvalidArgument(format!(
        "no TrueType font for the plot's text; set PREGATE_PLOT_FONT=/path/to/font.ttf (tried {})",
        FONT_PATHS.join(", ")
    )))
}

/// Draws decode tok/s and the expert hit rate against the budget (as the share of expert
/// bytes in VRAM) into `path`: a PNG, or an SVG when the name ends in `.svg`.
pub fn plot(reports: &[BenchReport], path: &std::path::Path) -> Result<()> {
    use plotters::prelude::*;
    register_plot_font()?;
    let svg = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("svg"));
    // Written beside the target and renamed, so a failed plot leaves nothing half-drawn.
    let tmp = path.with_extension(if svg { "tmp.svg" } else { "tmp.png" });
    let draw_err = |e: String| Error::InvalidArgument(format!("plot: {e}"));
    {
        let size = (900, 640);
        let result = if svg {
            draw(SVGBackend::new(&tmp, size).into_drawing_area(), reports)
        } else {
            draw(BitMapBackend::new(&tmp, size).into_drawing_area(), reports)
        };
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(draw_err(e));
        }
    }
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    Ok(())
}

fn draw<DB: plotters::prelude::DrawingBackend>(
    root: plotters::prelude::DrawingArea<DB, plotters::coord::Shift>,
    reports: &[BenchReport],
) -> std::result::Result<(), String> {
    use plotters::prelude::*;
    let e = |x: DrawingAreaErrorKind<DB::ErrorType>| x.to_string();
    root.fill(&WHITE).map_err(e)?;
    let mut points: Vec<(f64, f64, f64)> = reports
        .iter()
        .map(|r| {
            (
                100.0 * r.expert_share,
                r.decode_tok_s,
                100.0
                    * if r.metrics.expert_slots.is_some() {
                        r.metrics.hit_rate()
                    } else {
                        1.0
                    },
            )
        })
        .collect();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    let top = points.iter().map(|p| p.1).fold(0.0, f64::max).max(1e-3) * 1.15;
    let (upper, lower) = root.split_vertically(320);
    let series = [
        (upper, "decode tok/s", top, 1usize, BLUE),
        (lower, "expert hit rate (%)", 105.0, 2usize, RED),
    ];
    for (area, label, y_max, field, color) in series {
        let mut chart = ChartBuilder::on(&area)
            .caption(format!("{label} vs VRAM budget"), ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..105.0, 0.0..y_max)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc("budget: share of expert bytes in VRAM (%)")
            .y_desc(label)
            .draw()
            .map_err(e)?;
        let xy: Vec<(f64, f64)> = points
            .iter()
            .map(|p| (p.0, if field == 1 { p.1 } else { p.2 }))
            .collect();
        chart
            .draw_series(LineSeries::new(xy.clone(), color.stroke_width(2)))
            .map_err(e)?;
        chart
            .draw_series(
                xy.iter()
                    .map(|&(x, y)| Circle::new((x, y), 4, color.filled())),
            )
            .map_err(e)?;
    }
    root.present().map_err(|x| x.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_passage_is_whole_lines_of_the_corpus() {
        let p = builtin_passage();
        assert!(p.len() > BUILTIN_PASSAGE_BYTES - 8 && p.len() <= BUILTIN_PASSAGE_BYTES);
        let corpus = crate::carve::calib::BUILTIN_CORPUS;
        let at = corpus.find(p).expect("a slice of the corpus");
        assert!(at > corpus.len() / 2 && corpus.as_bytes()[at - 1] == b'\n');
    }

    #[test]
    fn a_text_gives_the_prompt_then_the_tokens_to_feed() {
        let (prompt, fed) = split_text((10..20).collect(), 3, 4).expect("long enough");
        assert_eq!(prompt, [10, 11, 12]);
        assert_eq!(fed, [13, 14, 15, 16]);
        let err = split_text((0..6).collect(), 3, 4).expect_err("too short");
        assert!(err.to_string().contains("has 6 tokens"), "{err}");
    }

    fn report(share: f64, tok_s: f64, hits: u64, misses: u64) -> BenchReport {
        BenchReport {
            prefill_tok_s: 10.0,
            decode_tok_s: tok_s,
            prompt_tokens: 64,
            gen_tokens: 32,
            input: FedFrom::Builtin,
            adapter: "test".into(),
            backend: "none".into(),
            kernels: Vec::new(),
            prefill_kernels: Vec::new(),
            budget: format!("{:.0}%", share * 100.0),
            metrics: RunMetrics {
                expert_slots: (share < 1.0).then_some(4),
                expert_hits: hits,
                expert_misses: misses,
                ..Default::default()
            },
            stall_share: 0.0,
            expert_share: share,
        }
    }

    #[test]
    fn plots_png_and_svg() {
        // Needs a TrueType font (.ci/run installs fonts-dejavu-core).
        let reports = [
            report(1.0, 5.7, 0, 0),
            report(0.5, 4.3, 90, 10),
            report(0.25, 4.1, 80, 20),
        ];
        let dir = std::env::temp_dir().join(format!("pregate-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let png = dir.join("budget.png");
        plot(&reports, &png).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        let svg = dir.join("budget.svg");
        plot(&reports, &svg).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.contains("<svg") && text.contains("decode tok/s"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
