//! pregate: run large language models on GPUs with too little memory for them.
//!
//! The library API mirrors the CLI: build an [`Engine`] from a GGUF path and
//! [`EngineOptions`], open a [`Session`] (one conversation), and stream text from
//! [`Engine::generate`]. See `examples/generate.rs`.

pub mod bench;
pub mod carve;
pub mod engine;
pub mod error;
pub mod eval;
pub mod format;
pub mod gpu;
pub mod model;
pub mod moe;
pub mod pull;
pub mod quant;
pub mod router;

pub use engine::{
    Engine, EngineOptions, GenerateParams, Generation, GenerationStats, RunMetrics, StopReason,
};
pub use error::{Error, Result};
pub use model::chat::ChatMessage;
pub use model::{SamplerConfig, Session};
