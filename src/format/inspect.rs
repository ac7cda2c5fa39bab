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
    moe_section(f, &mut s);
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

/// Experts per layer, bytes per expert, and how much of the file is experts.
fn moe_section(f: &GgufFile, s: &mut String) {
    let Ok(arch) = f.architecture() else { return };
    let Some(n_expert) = f
        .get(&format!("{arch}.expert_count"))
        .and_then(|v| v.as_u64())
    else {
        return;
    };
    let used = f
        .get(&format!("{arch}.expert_used_count"))
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    let shared_ff = f
        .get(&format!("{arch}.expert_shared_feed_forward_length"))
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    let method = f
        .get("pregate.moe.method")
        .and_then(|v| v.as_str())
        .unwrap_or("native");
    let is_expert = |name: &str| name.contains("_exps.");
    let expert_bytes: u64 = f
        .tensors
        .iter()
        .filter(|t| is_expert(&t.name))
        .map(|t| t.n_bytes)
        .sum();
    let total: u64 = f.tensors.iter().map(|t| t.n_bytes).sum();
    let layers = f
        .tensors
        .iter()
        .filter(|t| t.name.ends_with("ffn_gate_exps.weight"))
        .count() as u64;
    let per_expert = expert_bytes / (layers * n_expert).max(1);
    let _ = writeln!(s, "\nmixture of experts ({method}):");
    let _ = writeln!(
        s,
        "  {n_expert} routed experts per layer in {layers} layers, {used} used per token, shared expert of {shared_ff} neurons"
    );
    let _ = writeln!(
        s,
        "  {} per routed expert (gate + up + down of one layer)",
        mib(per_expert)
    );
    let _ = writeln!(
        s,
        "  experts: {} of {} tensor bytes ({:.1}%)",
        mib(expert_bytes),
        mib(total),
        100.0 * expert_bytes as f64 / total.max(1) as f64
    );
    let fit_bytes = |pregate: bool| -> u64 {
        f.tensors
            .iter()
            .filter(|t| t.name.contains(".ffn_recover"))
            .filter(|t| t.name.contains(".ffn_recover_pregate") == pregate)
            .map(|t| t.n_bytes)
            .sum()
    };
    let (recover, pregate) = (fit_bytes(false), fit_bytes(true));
    if recover > 0 {
        let _ = writeln!(
            s,
            "  recovery fits (carve's estimate of the unused experts, used at {used} per token): {}",
            mib(recover)
        );
    }
    if pregate > 0 {
        let k = f
            .get(crate::carve::PREGATE_FIT_EXPERTS_KEY)
            .and_then(|v| v.as_u64())
            .unwrap_or(used as u64);
        let _ = writeln!(
            s,
            "  recovery fits for a pre-gating router's top {k} (used under --routing pregate with that router): {}",
            mib(pregate)
        );
    }
}
