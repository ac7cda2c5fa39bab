//! The command line's arguments: every subcommand and its options, as clap reads them.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

use pregate::gpu::{BackendChoice, KernelLayout};
use pregate::moe::{Prefetch, Routing};
use pregate::pull::DEFAULT_MODEL;
use pregate::{GenerateParams, SamplerConfig};

#[derive(Parser)]
#[command(
    name = "pregate",
    version,
    about = "Run LLMs on any GPU through wgpu, with expert offload for small VRAM"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
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
    /// Interactive multi-turn chat (/help, /reset, /stats, /quit; Ctrl-C stops an answer)
    ///
    /// A message may span lines: `"""` opens and closes a block kept as typed (pasted
    /// code, say), and a line ending in `\` goes on to the next. Standard input may be a
    /// pipe or a file: each line, or block, is one turn.
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
pub(crate) struct ModelArgs {
    /// GGUF path or known model name (pulled if missing)
    #[arg(short, long, default_value = DEFAULT_MODEL)]
    pub(crate) model: String,
    /// Context length in tokens (default: the model's, capped at 4096)
    #[arg(long, default_value_t = 0)]
    pub(crate) ctx: usize,
    /// Adapter index from `pregate devices`
    #[arg(long)]
    pub(crate) adapter: Option<usize>,
    /// Graphics API
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub(crate) backend: BackendChoice,
    /// Kernel variants: auto picks by the adapter's type; gpu and cpu force one (to
    /// compare them, or to check the GPU kernels on a CPU adapter)
    #[arg(long, value_enum, default_value_t = KernelLayout::Auto)]
    pub(crate) kernels: KernelLayout,
    /// Most VRAM to use: a size (192MiB, 1.5GiB), a share of the expert bytes for the expert
    /// cache (25%, MoE models), or all. Resident parts go first; MoE experts that do not fit
    /// stream into cache slots. Without --ctx, the context shrinks if needed
    #[arg(long, default_value = "all")]
    pub(crate) vram_budget: String,
    /// Expert cache replacement policy (when experts do not all fit). lfu (the default)
    /// keeps the experts used most in the last ~50 tokens; it misses 15-20% less than lru
    /// on recorded traces (BENCHMARKS.md)
    #[arg(long, value_enum, default_value_t = CachePolicy::Lfu)]
    pub(crate) policy: CachePolicy,
    /// Load experts ahead of need: none; next-layer (route the next layer early on the GPU);
    /// or pregate (the pre-gating router's plan, from --router or MODEL.router.safetensors)
    #[arg(long, value_enum, default_value_t = Prefetch::None)]
    pub(crate) prefetch: Prefetch,
    /// Who picks the experts: each layer's router (layer), or the pre-gating router
    /// (pregate: Read-ME; no per-layer readback, quality depends on the router)
    #[arg(long, value_enum, default_value_t = Routing::Layer)]
    pub(crate) routing: Routing,
    /// Pre-gating router (from `pregate train-router`) for --prefetch/--routing pregate
    /// (default: MODEL.router.safetensors next to the model)
    #[arg(long)]
    pub(crate) router: Option<PathBuf>,
    /// Hash every expert at load and check it on first upload (detects a file changed on disk)
    #[arg(long)]
    pub(crate) verify: bool,
    /// Experts per token in MoE layers: a count, or `all` (default: the model's)
    #[arg(long, value_parser = parse_experts)]
    pub(crate) experts_per_token: Option<usize>,
    /// Adaptive gating (AdapMoE): tokens the router is sure of use fewer experts, and on a
    /// least-squares carve tokens it is unsure of more (--adaptive-max-experts), for this
    /// perplexity cost in percent (0 = off). Per-layer sensitivities are measured once on
    /// built-in text the carve did not see, or on --adaptive-calib text (minutes on a CPU),
    /// and kept next to the model
    #[arg(long, default_value_t = 0.0, value_name = "QUALITY")]
    pub(crate) adaptive: f64,
    /// Adaptive-gating profile (default: MODEL.adaptive.json next to the model, or
    /// MODEL.adaptive-ID.json with --adaptive-calib)
    #[arg(long, value_name = "PATH")]
    pub(crate) adaptive_profile: Option<PathBuf>,
    /// Measure adaptive gating's profile on these text files, text like what you will run
    /// (default: built-in text the carve left out; which layers are cheap to cut depends
    /// on the text). 1024 tokens are taken, spread over the files
    #[arg(long, value_name = "FILE", num_args = 1..)]
    pub(crate) adaptive_calib: Vec<PathBuf>,
    /// Most experts adaptive gating may give a token. Past the top-k it also adds experts
    /// where a token's router is unsure (carves with a least-squares router). Default: with
    /// every expert resident, as many as the carve's recovery fit covers, at most twice the
    /// top-k; under --vram-budget, the top-k (only drop: added experts would miss the cache)
    #[arg(long, value_name = "N")]
    pub(crate) adaptive_max_experts: Option<usize>,
}

/// The runtime's policies (Belady needs the whole future: it lives in `simulate`).
#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum CachePolicy {
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
pub(crate) struct SamplingArgs {
    /// Maximum tokens to generate
    #[arg(short = 'n', long = "max-tokens", default_value_t = 256)]
    pub(crate) max_tokens: usize,
    /// 0 = greedy
    #[arg(long, default_value_t = 0.0)]
    pub(crate) temperature: f32,
    /// Keep the k most likely tokens (0 = all)
    #[arg(long, default_value_t = 40)]
    pub(crate) top_k: usize,
    /// Nucleus sampling mass (1 = off)
    #[arg(long, default_value_t = 0.95)]
    pub(crate) top_p: f32,
    /// Drop tokens below this fraction of the top probability (0 = off)
    #[arg(long, default_value_t = 0.05)]
    pub(crate) min_p: f32,
    /// Penalty for recently seen tokens (1 = off)
    #[arg(long, default_value_t = 1.0)]
    pub(crate) repeat_penalty: f32,
    /// Random seed, for reproducible sampling
    #[arg(long, default_value_t = 42)]
    pub(crate) seed: u64,
    /// Stop when the output contains this string (repeatable)
    #[arg(long = "stop")]
    pub(crate) stop: Vec<String>,
}

impl SamplingArgs {
    pub(crate) fn params(&self, cancel: Option<Arc<AtomicBool>>) -> GenerateParams {
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
#[command(group(clap::ArgGroup::new("input").required(true).args(["prompt", "file"])))]
pub(crate) struct GenerateArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// The prompt (plain text, no chat template)
    #[arg(short, long)]
    pub(crate) prompt: Option<String>,
    /// Read the prompt from this file instead, as is (`-`: standard input); for prompts
    /// too long or too awkward to quote on a command line
    #[arg(short, long, value_name = "PATH")]
    pub(crate) file: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) sampling: SamplingArgs,
    /// Print speed statistics to stderr at the end
    #[arg(long)]
    pub(crate) stats: bool,
}

#[derive(Args)]
pub(crate) struct ChatArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// System prompt
    #[arg(long)]
    pub(crate) system: Option<String>,
    #[command(flatten)]
    pub(crate) sampling: SamplingArgs,
}

#[derive(Args)]
pub(crate) struct EvalArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Text file to score
    #[arg(short, long)]
    pub(crate) file: PathBuf,
    /// Only the first N chunks
    #[arg(long)]
    pub(crate) chunks: Option<usize>,
    /// Print one JSON object
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum CarveMethod {
    /// CMoE: shared experts by activation rate, routed experts by co-activation
    Cmoe,
    /// Read-ME: one expert per token cluster (one cluster per --calib file, else k-means on
    /// activation patterns); the shared expert is what every cluster keeps
    Readme,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum CarveRouter {
    Cmoe,
    Lsq,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub(crate) enum SharedBy {
    Energy,
    Rate,
}

#[derive(Args)]
pub(crate) struct CarveArgs {
    /// Dense GGUF path or known model name (pulled if missing)
    #[arg(short, long, default_value = DEFAULT_MODEL)]
    pub(crate) model: String,
    /// Output GGUF (written to a temporary file, then renamed)
    #[arg(short, long)]
    pub(crate) output: PathBuf,
    #[arg(long, value_enum, default_value = "cmoe")]
    pub(crate) method: CarveMethod,
    /// cmoe: experts per layer in all, shared ones included [default: 16]. readme: clusters,
    /// one routed expert each [default: the number of --calib files if several, else 8]
    #[arg(long)]
    pub(crate) experts: Option<usize>,
    /// cmoe: shared (always active) experts [default: 2]
    #[arg(long)]
    pub(crate) shared: Option<usize>,
    /// Routed experts each token uses [default: cmoe 2, readme 1]
    #[arg(long)]
    pub(crate) active: Option<usize>,
    /// readme: share of each layer's FFN neurons a cluster keeps
    #[arg(long, default_value_t = 0.5)]
    pub(crate) remain_rate: f64,
    /// readme: seed of the k-means clustering
    #[arg(long, default_value_t = 7)]
    pub(crate) seed: u64,
    /// cmoe: profile every layer on the dense model's activations in one GPU pass, instead
    /// of carving the layers in order, each on the output of the carved layers before it
    /// (CMoE's sequential calibration, the default; its residual stream runs on the CPU)
    #[arg(long)]
    pub(crate) dense_calibration: bool,
    /// cmoe: what picks the shared experts' neurons: `energy` (what each neuron adds to the
    /// FFN output on the calibration tokens) or `rate` (how often it is among a token's
    /// top K_a, as in the paper)
    #[arg(long, value_enum, default_value = "energy")]
    pub(crate) shared_by: SharedBy,
    /// Neurons each calibration token marks active (K_a)
    #[arg(long, default_value_t = 10)]
    pub(crate) k_act: usize,
    /// Calibration text files (default: the built-in corpus, calib/SOURCES.md)
    #[arg(long, num_args = 1..)]
    pub(crate) calib: Vec<PathBuf>,
    /// Calibration tokens to profile, taken as sequences spread evenly over all the
    /// calibration text
    #[arg(long, default_value_t = 8192)]
    pub(crate) calib_tokens: usize,
    /// Tokens per calibration sequence
    #[arg(long, default_value_t = 512)]
    pub(crate) seq_len: usize,
    /// Block type of the re-quantised down-projection
    #[arg(long, default_value = "q8_0", value_parser = parse_dtype)]
    pub(crate) down_type: pregate::quant::DType,
    /// Router: `lsq` (least squares on the calibration tokens, predicting each expert's
    /// output norm) or `cmoe` (representative neurons, as in the paper)
    #[arg(long, value_enum, default_value = "lsq")]
    pub(crate) router: CarveRouter,
    /// Do not fit the per-layer recovery. By default carve fits, per layer, what the
    /// experts a token does not use would have added, as a linear map of the FFN input
    /// plus a correction of the shared expert's down-projection (ridge least squares, its
    /// strength chosen on held-out calibration windows), and stores both in the model
    /// (d_model² weights and a second shared down-projection a layer); the runtime uses
    /// them whenever tokens use the carved number of experts
    #[arg(long)]
    pub(crate) no_recover: bool,
    /// Do not bias the router's selection toward even expert load
    #[arg(long)]
    pub(crate) no_balance: bool,
    /// Also fit the recovery for this pre-gating router's choices, so that the model runs
    /// better under `--routing pregate` (stored beside the layers' own fit; each routing
    /// uses its own). The router must come from `train-router` on this same carve: carve,
    /// train the router, then carve again with the same options and this flag (the carve
    /// is deterministic, and checks that its routers are the ones the router learned)
    #[arg(long, value_name = "ROUTER")]
    pub(crate) pregate_router: Option<PathBuf>,
    /// Experts a token the pre-gate's fit is made for, to run with `--routing pregate
    /// --experts-per-token K` (default: --active). On the default model a fit for 3 runs
    /// the pre-gate at 3 experts as well as the layers' own routing at 3
    #[arg(long, value_name = "K", requires = "pregate_router")]
    pub(crate) pregate_experts: Option<usize>,
    /// Replace the output file if it exists
    #[arg(long)]
    pub(crate) force: bool,
    /// Adapter index from `pregate devices`
    #[arg(long)]
    pub(crate) adapter: Option<usize>,
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub(crate) backend: BackendChoice,
    /// Kernel variants for calibration: auto (by the adapter's type), gpu or cpu
    #[arg(long, value_enum, default_value_t = KernelLayout::Auto)]
    pub(crate) kernels: KernelLayout,
    /// Print the summary as JSON
    #[arg(long)]
    pub(crate) json: bool,
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
pub(crate) struct TraceArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Text to run
    #[arg(short, long)]
    pub(crate) file: PathBuf,
    /// Trace file to write (for `pregate simulate`)
    #[arg(short, long)]
    pub(crate) output: PathBuf,
    /// Only the first N tokens of the text. With a router (--router, or
    /// MODEL.router.safetensors), its plan is recorded too (for `simulate --policy lookahead`)
    #[arg(long)]
    pub(crate) max_tokens: Option<usize>,
    /// Overwrite an existing output
    #[arg(long)]
    pub(crate) force: bool,
}

#[derive(Args)]
pub(crate) struct TrainRouterArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    /// Router file to write (safetensors)
    #[arg(short, long)]
    pub(crate) output: PathBuf,
    /// Calibration text files (default: the built-in corpus)
    #[arg(long, num_args = 1..)]
    pub(crate) calib: Vec<PathBuf>,
    /// Calibration tokens to trace (the last 10% are held out to measure accuracy). More
    /// tokens predict better: on the carved default model 16384 instead of 4096 raised
    /// the router's recall on unseen text from 59.1% to 62.2% (tracing them takes ~20
    /// minutes on a 2-core CPU with lavapipe; keep it with --trace)
    #[arg(long, default_value_t = 16384)]
    pub(crate) tokens: usize,
    /// Training passes over the tokens
    #[arg(long, default_value_t = 6)]
    pub(crate) steps: usize,
    /// Hash buckets per n-gram family (ngram: 3 x buckets x experts x layers weights;
    /// mlp: 3 x buckets x hidden)
    #[arg(long, default_value_t = 4096)]
    pub(crate) buckets: usize,
    /// Router architecture: ngram (softmax regression per layer) or mlp (n-gram embeddings,
    /// one shared hidden layer, a head per layer)
    #[arg(long, value_enum, default_value_t = pregate::router::RouterArch::Ngram)]
    pub(crate) arch: pregate::router::RouterArch,
    /// mlp: embedding and hidden width
    #[arg(long, default_value_t = 64)]
    pub(crate) hidden: usize,
    /// Adagrad step (default: 0.2 for ngram, 0.02 for mlp)
    #[arg(long)]
    pub(crate) learning_rate: Option<f32>,
    /// Keep the calibration trace here: reused when it exists and matches the tokens (so
    /// trying another architecture or size needs no second pass through the model)
    #[arg(long, value_name = "PATH")]
    pub(crate) trace: Option<PathBuf>,
    /// Read-ME carving's cluster labels (default: MODEL.labels.json, written by `carve
    /// --method readme`). With them the router learns the clusters (one decision for every
    /// layer) on the labelled calibration tokens; --calib and --tokens are not used
    #[arg(long, value_name = "PATH")]
    pub(crate) labels: Option<PathBuf>,
    /// Overwrite an existing output
    #[arg(long)]
    pub(crate) force: bool,
    /// Print the report as one JSON object
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args)]
pub(crate) struct SimulateArgs {
    /// Trace file (written by `pregate trace`)
    pub(crate) trace: PathBuf,
    /// Cache slots: a count, or a percentage of all experts (e.g. 25%)
    #[arg(long, default_value = "25%")]
    pub(crate) slots: String,
    /// Policies to compare (comma-separated)
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "lru,lfu,belady"
    )]
    pub(crate) policy: Vec<pregate::moe::PolicyKind>,
    /// Also give each layer its own cache, the slots split across layers by dynamic
    /// programming over the layers' miss curves (AdapMoE), beside an even split
    #[arg(long)]
    pub(crate) per_layer: bool,
    /// One JSON object per policy
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Args)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    pub(crate) model: ModelArgs,
    #[arg(long, default_value_t = 128)]
    pub(crate) prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    pub(crate) gen_tokens: usize,
    /// Repetitions (the best is reported)
    #[arg(long, default_value_t = 3)]
    pub(crate) reps: usize,
    /// One JSON object per budget
    #[arg(long)]
    pub(crate) json: bool,
    /// Draw decode tok/s and the expert hit rate against the budget (PNG, or SVG by name)
    #[arg(long)]
    pub(crate) plot: Option<PathBuf>,
    /// Text to feed: its first --prompt-tokens tokens are the prompt and the next
    /// --gen-tokens the decode steps, in place of the model's own, so the experts each step
    /// uses are real text's (default: a passage of the built-in corpus, Rust sources)
    #[arg(long)]
    pub(crate) text: Option<PathBuf>,
}
