//! Model files: GGUF v3 reading (memory-mapped, validated) and writing.

pub mod gguf;
pub mod inspect;

pub use gguf::{GgufFile, GgufWriter, MetaValue, TensorInfo};
