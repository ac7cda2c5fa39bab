//! Architectures and the forward plan: config, weights, per-conversation state, the plan
//! builder, tokenizer, sampler and chat template.

pub mod chat;
pub mod config;
pub mod forward;
pub mod memory;
pub mod offload;
pub mod sampler;
pub mod session;
pub mod tokenizer;
pub mod weights;

pub use config::{Arch, ModelConfig};
pub use sampler::{Sampler, SamplerConfig};
pub use session::Session;
pub use tokenizer::Tokenizer;
pub use weights::Model;
