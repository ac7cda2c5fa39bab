//! Experts: where they live in the file ([`store`]), which are resident in VRAM and which
//! leave ([`cache`], with the replacement [`policy`]), and expert-access traces ([`trace`]).
//! The step that uses them is the model's (model/offload.rs).

pub mod cache;
pub mod policy;
pub mod sizing;
pub mod store;
pub mod trace;

pub use cache::{CacheStats, ExpertCache};
pub use policy::{simulate, PolicyKind, SimResult};
pub use store::ExpertStore;
pub use trace::ExpertTrace;

/// Who picks each token's experts (`--routing`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Routing {
    /// Each layer's own router, on the GPU (the model as it was carved or trained).
    #[default]
    Layer,
    /// Read-ME: the pre-gating router decides every layer's experts from the token ids
    /// before the step, so the plan is exact and the step needs no readback.
    Pregate,
}

/// What loads experts ahead of need (`--prefetch`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Prefetch {
    /// Load on demand only.
    #[default]
    None,
    /// AdapMoE: route the next layer on the current hidden state and load its experts while
    /// the GPU computes (decode).
    NextLayer,
    /// Read-ME: the pre-gating router predicts every layer's experts from the token ids
    /// before the step; each layer's are loaded while the GPU runs the layers before it.
    Pregate,
}

impl Prefetch {
    pub fn label(&self) -> &'static str {
        match self {
            Prefetch::None => "none",
            Prefetch::NextLayer => "next-layer",
            Prefetch::Pregate => "pregate",
        }
    }
}
