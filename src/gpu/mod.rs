//! The GPU: device selection, a byte-accounted buffer arena, and the kernel pipelines.

pub mod arena;
pub mod context;
pub mod dispatch;
pub mod kernels;
pub mod ops;
pub mod staging;
pub mod tensor;

pub use arena::{parse_size, Arena, GpuBuffer};
pub use context::{list_adapters, AdapterSummary, BackendChoice, Gpu, GpuOptions, KernelLayout};
pub use dispatch::{grid_1d, Bind, DispatchBuilder, DispatchList, Mark};
pub use kernels::Kernel;
pub use staging::StagingRing;
pub use tensor::{Matrix, Shard, Vector};
