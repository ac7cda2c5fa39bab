//! A human-readable summary of a GGUF file for `pregate inspect`.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::gguf::GgufFile;

fn mib(b: u64) -> String {
    format!("{:.2} MiB", b as f64 / (1u64 << 20) as f64)
}

pub fn summary(f: &GgufFile, list_tensors: bool) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "file: {} ({})", f.path.display(), mib(f.file_len()));
    let _ = writeln!(
        s,
        "GGUF v{}, alignment {}, {} tensors",
        f.version,
        f.alignment,
        f.tensors.len()
    );
    let _ = writeln!(s, "\nmetadata:");
    for (k, v) in &f.metadata {
        let _ = writeln!(s, "  {k:45} {}", v.display_short());
    }
    let mut by_type: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
    let mut by_layer: BTreeMap<i64, u64> = BTreeMap::new();
    for t in &f.tensors {
        let e = by_type.entry(t.dtype.name()).or_default();
        e.0 += 1;
        e.1 += t.n_bytes;
        let layer = t
            .name
            .strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|n| n.parse::<i64>().ok())
            .unwrap_or(-1);
        *by_layer.entry(layer).or_default() += t.n_bytes;
    }
    let _ = writeln!(s, "\ntensor types:");
    for (ty, (n, b)) in &by_type {
        let _ = writeln!(s, "  {ty:6} {n:5} tensors  {}", mib(*b));
    }
    let _ = writeln!(s, "\nbytes per layer:");
    for (l, b) in &by_layer {
        let name = if *l < 0 {
            "non-layer".to_string()
        } else {
            format!("blk.{l}")
        };
        let _ = writeln!(s, "  {name:10} {}", mib(*b));
    }
    if list_tensors {
        let _ = writeln!(s, "\ntensors:");
        for t in &f.tensors {
            let _ = writeln!(
                s,
                "  {:40} {:5} {:?} {}",
                t.name,
                t.dtype.name(),
                t.dims,
                t.n_bytes
            );
        }
    }
    s
}
