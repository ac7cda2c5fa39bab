//! Ships a model's shape to a machine that cannot download it, for speed measurements.
//!
//! `shrink IN.gguf SKEL.gguf` keeps every metadata key (tokenizer included) and the first
//! few blocks of each tensor; `expand SKEL.gguf OUT.gguf` tiles those blocks back to the full
//! shapes. The expanded model has the original's layout, dtypes and value ranges (so every
//! kernel does the same work), but it is not the original model: use it for timing only.
//! `cargo run --release --example model_skeleton -- shrink|expand IN OUT`

use anyhow::{bail, Context};
use pregate::format::gguf::{GgufFile, GgufWriter, MetaValue};

/// Bytes of real blocks kept per tensor.
const SAMPLE_BYTES: usize = 48 * 1024;
const SHAPE_KEY: &str = "skeleton.shape.";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, input, output] = args.as_slice() else {
        bail!("usage: model_skeleton shrink|expand IN.gguf OUT.gguf");
    };
    let file = GgufFile::open(input).with_context(|| format!("opening {input}"))?;
    let mut w = GgufWriter::new().with_alignment(file.alignment);
    for (k, v) in &file.metadata {
        if !k.starts_with(SHAPE_KEY) {
            w.meta(k, v.clone());
        }
    }
    for t in &file.tensors {
        let bytes = file.bytes(t);
        let block = t.dtype.block_bytes();
        match mode.as_str() {
            "shrink" => {
                let keep = (SAMPLE_BYTES / block * block).min(bytes.len());
                let elems = (keep / block * t.dtype.block_len()) as u64;
                let dims = t.dims.iter().map(|&d| MetaValue::U64(d)).collect();
                w.meta(&format!("{SHAPE_KEY}{}", t.name), MetaValue::Array(dims));
                w.tensor(&t.name, t.dtype, &[elems], bytes[..keep].to_vec())?;
            }
            "expand" => {
                let key = format!("{SHAPE_KEY}{}", t.name);
                let dims: Vec<u64> = file
                    .get(&key)
                    .and_then(|v| v.as_array())
                    .with_context(|| format!("{input} is not a skeleton (no {key})"))?
                    .iter()
                    .filter_map(|v| v.as_u64())
                    .collect();
                let n = t
                    .dtype
                    .bytes_for(dims.iter().product())
                    .context("bad shape")?;
                let data: Vec<u8> = bytes.iter().copied().cycle().take(n as usize).collect();
                w.tensor(&t.name, t.dtype, &dims, data)?;
            }
            _ => bail!("mode must be shrink or expand"),
        }
    }
    w.write(output)?;
    eprintln!("wrote {output}");
    Ok(())
}
