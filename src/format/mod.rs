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

/// What stops `path` from taking a new output file, checked before any long work: a
/// folder there, a missing folder around it, or an existing file that `overwrite`
/// (`--force`) does not allow replacing. None when it can be written.
pub fn output_problem(path: &Path, overwrite: bool) -> Option<String> {
    if path.is_dir() {
        return Some(format!("{} is a folder; give a file path", path.display()));
    }
    if path.exists() && !overwrite {
        return Some(format!(
            "{} exists; remove it or pass --force to replace it",
            path.display()
        ));
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    (!parent.is_dir()).then(|| {
        format!(
            "cannot write {}: the folder {} does not exist",
            path.display(),
            parent.display()
        )
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
