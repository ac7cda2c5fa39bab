//! Every metadata value of a model file swapped for a bad one (zero, one, huge, negative,
//! NaN, empty, another type) loads to a clear error or a model that runs, never a panic
//! or a hang; the values that would run wrong are named in their error.

mod common;

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use common::{carve_tiny, write_tiny_model, NativeMoe, TinySpec};
use pregate::format::{GgufFile, GgufWriter, MetaValue};
use pregate::{Engine, EngineOptions};

/// What loading and running a few tokens gave: Ok, or the error's text.
fn outcome(path: &Path) -> Result<(), String> {
    let run = catch_unwind(AssertUnwindSafe(|| -> Result<(), String> {
        let opts = EngineOptions {
            ctx: 32,
            ..Default::default()
        };
        let engine = Engine::load(path, &opts).map_err(|e| e.to_string())?;
        let mut s = engine.session().map_err(|e| e.to_string())?;
        let logits = s.next_logits(&[1, 2, 3]).map_err(|e| e.to_string())?;
        assert!(logits.iter().all(|v| v.is_finite()), "logits not finite");
        Ok(())
    }));
    run.unwrap_or_else(|_| panic!("{} panicked", path.display()))
}

/// Bad values of the same shape as `v`.
fn bad_values(v: &MetaValue) -> Vec<MetaValue> {
    use MetaValue::*;
    match v {
        U32(_) => vec![U32(0), U32(1), U32(3), U32(1 << 20), U32(u32::MAX)],
        I32(_) => vec![I32(0), I32(-1), I32(i32::MAX)],
        U64(_) => vec![U64(0), U64(u64::MAX)],
        F32(_) => vec![F32(0.0), F32(-1.0), F32(f32::NAN), F32(f32::INFINITY)],
        String(_) => vec![String("".into()), U32(7)],
        Array(a) if a.len() < 100 => vec![Array(vec![]), U32(7)],
        _ => vec![],
    }
}

/// Outcome of each (key, bad value) of the model at `src`.
fn sweep(src: &Path, tag: &str) -> BTreeMap<(String, String), Result<(), String>> {
    let f = GgufFile::open(src).expect("open");
    let dst = common::tmp_dir(tag).join("mutated.gguf");
    let mut out = BTreeMap::new();
    for (key, value) in &f.metadata {
        for bad in bad_values(value) {
            let mut w = GgufWriter::new();
            for (k, v) in &f.metadata {
                w.meta(k, if k == key { bad.clone() } else { v.clone() });
            }
            for t in &f.tensors {
                w.tensor(&t.name, t.dtype, &t.dims, f.bytes(t).to_vec())
                    .expect("tensor");
            }
            w.write(&dst).expect("write");
            out.insert((key.clone(), bad.display_short()), outcome(&dst));
        }
    }
    out
}

fn expect_error(
    got: &BTreeMap<(String, String), Result<(), String>>,
    key: &str,
    value: &str,
    needle: &str,
) {
    let r = got
        .get(&(key.to_string(), value.to_string()))
        .unwrap_or_else(|| panic!("{key} = {value} was not tried"));
    match r {
        Err(e) => assert!(
            e.contains(needle),
            "{key} = {value}: '{needle}' not in: {e}"
        ),
        Ok(()) => panic!("{key} = {value} loaded and ran"),
    }
}

#[test]
fn a_dense_models_bad_metadata_is_an_error_or_harmless() {
    let p = common::tmp_dir("meta-dense").join("tiny.gguf");
    write_tiny_model(&p, TinySpec::default(), 5);
    let got = sweep(&p, "meta-dense-sweep");
    let max = u32::MAX.to_string();
    expect_error(&got, "qwen2.block_count", &max, "block_count");
    expect_error(&got, "qwen2.block_count", "0", "block_count");
    expect_error(&got, "qwen2.block_count", "3", "blk.2");
    expect_error(&got, "qwen2.attention.head_count", "0", "head_count");
    expect_error(&got, "qwen2.rope.freq_base", "NaN", "rope.freq_base");
    expect_error(&got, "qwen2.rope.freq_base", "0", "rope.freq_base");
    expect_error(
        &got,
        "qwen2.attention.layer_norm_rms_epsilon",
        "-1",
        "epsilon",
    );
    expect_error(&got, "qwen2.context_length", "0", "context_length");
    // Zero widths divided by zero (feed_forward_length in sharding, key_length in the
    // memory plan): they are named instead.
    expect_error(
        &got,
        "qwen2.feed_forward_length",
        "0",
        "feed_forward_length",
    );
    expect_error(&got, "qwen2.embedding_length", "0", "embedding_length");
    expect_error(&got, "qwen2.attention.key_length", "0", "key_length");
    // Still fine: one layer of two, a zero epsilon, a different end-of-text id.
    for (k, v) in [
        ("qwen2.block_count", "1"),
        ("qwen2.attention.layer_norm_rms_epsilon", "0"),
        ("tokenizer.ggml.eos_token_id", "3"),
    ] {
        assert_eq!(got[&(k.to_string(), v.to_string())], Ok(()), "{k} = {v}");
    }
}

#[test]
fn a_native_moes_bad_metadata_is_an_error_or_harmless() {
    let p = common::tmp_dir("meta-moe").join("tiny.gguf");
    let moe = NativeMoe {
        n_expert: 4,
        n_used: 2,
        expert_ff: 64,
        shared_ff: 128,
    };
    let spec = TinySpec {
        arch: "qwen2moe",
        moe: Some(moe),
        ..Default::default()
    };
    write_tiny_model(&p, spec, 5);
    let got = sweep(&p, "meta-moe-sweep");
    expect_error(&got, "qwen2moe.expert_count", "0", "expert_count");
    expect_error(
        &got,
        "qwen2moe.expert_feed_forward_length",
        "0",
        "expert_feed_forward_length",
    );
    expect_error(&got, "qwen2moe.expert_used_count", "0", "expert_count");
    expect_error(
        &got,
        "qwen2moe.expert_used_count",
        "1048576",
        "expert_count",
    );
}

#[test]
fn a_carved_models_bad_metadata_is_an_error_or_harmless() {
    let (_, carved) = carve_tiny("meta-carved", 8, 1, 2);
    let got = sweep(&carved, "meta-carved-sweep");
    expect_error(&got, "pregate.moe.router", "\"\"", "pregate.moe.router");
    expect_error(&got, "pregate.moe.router", "7", "pregate.moe.router");
    // A copied alignment key is the writer's to set, so these files still load.
    assert_eq!(got[&("general.alignment".into(), "3".into())], Ok(()));
}
