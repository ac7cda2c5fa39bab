//! Model files: GGUF v3 reading (memory-mapped, validated) and writing.

pub mod gguf;
pub mod inspect;

pub use gguf::{GgufFile, GgufWriter, MetaValue, TensorInfo};

use std::path::Path;

/// Writes `bytes` to `path` through a temporary file next to it and a rename, so that a
/// failure never leaves a half-written file (or touches what was there).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> crate::error::Result<()> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    let tmp = path.with_file_name(name);
    let result = std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|cause| crate::error::Error::Open {
        path: path.to_path_buf(),
        cause,
    })
}

/// A sha256 as the lowercase hex that checksum lists and metadata carry.
pub fn hex_digest(h: sha2::Sha256) -> String {
    use sha2::Digest;
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads a whole file; a failure names it.
pub fn read_all(path: &Path) -> crate::error::Result<Vec<u8>> {
    std::fs::read(path).map_err(|cause| crate::error::Error::Open {
        path: path.to_path_buf(),
        cause,
    })
}
