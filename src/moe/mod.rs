//! Experts: cache replacement policies and expert-access traces. The expert store, the VRAM
//! expert cache and the prefetcher (design.md §2) build on these.

pub mod policy;
pub mod trace;

pub use policy::{simulate, PolicyKind, SimResult};
pub use trace::ExpertTrace;
