//! The one error type of the library. Every failure a user or a file can cause is a variant
//! here, with enough context (tensor name, key, path) to act on it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // `cause`, not `source`: the message already includes it, so error chains print it once.
    #[error("cannot open {path}: {cause}")]
    Open {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a GGUF file: bad magic {0:?} (expected \"GGUF\")")]
    BadMagic([u8; 4]),
    #[error("unsupported GGUF version {0} (pregate reads versions 2 and 3)")]
    BadVersion(u32),
    #[error("GGUF file is truncated: {what} needs bytes {need} but the file has {have}")]
    Truncated { what: String, need: u64, have: u64 },
    #[error("GGUF is malformed at {what}: {why}")]
    Malformed { what: String, why: String },
    /// A file of pregate's own (router, trace, cluster labels) that does not parse.
    #[error("cannot read {what}: {why}")]
    BadFile { what: String, why: String },
    #[error("tensor '{tensor}' has unknown ggml type id {id}")]
    UnknownDType { tensor: String, id: u32 },
    #[error("tensor '{tensor}' uses type {dtype}, which pregate does not support yet")]
    UnsupportedDType { tensor: String, dtype: String },
    #[error("tensor '{tensor}': {why}")]
    BadTensor { tensor: String, why: String },
    #[error("model has no tensor '{0}'")]
    MissingTensor(String),
    #[error("model metadata has no key '{0}'")]
    MissingKey(String),
    #[error("metadata key '{key}' has the wrong type: expected {expected}")]
    WrongType { key: String, expected: &'static str },
    #[error("unsupported architecture '{0}' (pregate runs: qwen2, qwen2moe, qwen3, qwen3moe, llama, mistral)")]
    UnsupportedArch(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(
        "prompt has {tokens} tokens but the context holds {ctx}; shorten the prompt or raise --ctx"
    )]
    ContextOverflow { tokens: usize, ctx: usize },
    #[error("no GPU adapter found{0}. On a CPU-only Linux machine install mesa-vulkan-drivers (lavapipe)")]
    NoAdapter(String),
    #[error("GPU error: {0}")]
    Gpu(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("model manifest: {0}")]
    Manifest(String),
    #[error("download failed: {0}")]
    Download(String),
    #[error("VRAM budget too small: {needed} bytes needed, {budget} available. {detail}")]
    BudgetTooSmall {
        needed: u64,
        budget: u64,
        detail: String,
    },
    /// An allocation past the budget the memory plan was made for: a plan that missed
    /// something, or more sessions open than `EngineOptions::sessions` planned.
    #[error("VRAM budget of {budget} bytes exceeded: {what} needs {bytes} more bytes ({charged} already charged){hint}")]
    BudgetExceeded {
        budget: u64,
        what: String,
        bytes: u64,
        charged: u64,
        /// What to change, when the caller knows (empty otherwise).
        hint: String,
    },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("cannot carve: {0}")]
    Carve(String),
}

pub type Result<T> = std::result::Result<T, Error>;
