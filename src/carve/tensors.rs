//! Builds the carved model's tensors: expert slices of the dense FFN, the training-free
//! router, and the metadata that tells the runtime the MoE shape.

use std::path::Path;

use crate::error::{Error, Result};
use crate::format::{GgufFile, GgufWriter, MetaValue, TensorInfo};
use crate::quant::{dequantize, quantize, DType};

use super::partition::Partition;
use super::CarveOptions;

/// Tensors start on 4 KiB boundaries so that a loader can read them page-aligned.
const ALIGNMENT: u64 = 4096;

pub struct ExpertWriter<'a> {
    file: &'a GgufFile,
    opts: &'a CarveOptions,
    size: usize,
    d: usize,
    d_ff: usize,
    out: GgufWriter,
    bytes_per_expert: u64,
}

fn is_dense_ffn(name: &str) -> bool {
    name.starts_with("blk.")
        && ["ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"]
            .iter()
            .any(|s| name.ends_with(&format!(".{s}")))
}

impl<'a> ExpertWriter<'a> {
    /// Starts the output: the dense model's metadata plus the MoE keys, and every tensor
    /// except the dense FFN weights, copied unchanged.
    pub fn new(
        file: &'a GgufFile,
        opts: &'a CarveOptions,
        size: usize,
        padding: usize,
    ) -> Result<Self> {
        let arch = file.architecture()?.to_string();
        let d = file.get_u64(&format!("{arch}.embedding_length"))? as usize;
        let d_ff = file.get_u64(&format!("{arch}.feed_forward_length"))? as usize;
        let mut out = GgufWriter::new().with_alignment(ALIGNMENT);
        for (k, v) in &file.metadata {
            if k != "general.alignment" {
                out.meta(k, v.clone());
            }
        }
        let routed = opts.n_experts - opts.n_shared;
        let u32v = |v: usize| MetaValue::U32(v as u32);
        out.meta(&format!("{arch}.expert_count"), u32v(routed))
            .meta(&format!("{arch}.expert_used_count"), u32v(opts.n_active))
            .meta(&format!("{arch}.expert_feed_forward_length"), u32v(size))
            .meta(
                &format!("{arch}.expert_shared_feed_forward_length"),
                u32v(opts.n_shared * size),
            )
            .meta("pregate.moe.method", MetaValue::String("cmoe".into()))
            .meta("pregate.moe.router", MetaValue::String("cmoe".into()))
            .meta("pregate.moe.experts_total", u32v(opts.n_experts))
            .meta("pregate.moe.shared_experts", u32v(opts.n_shared))
            .meta("pregate.moe.padding_neurons", u32v(padding))
            .meta("pregate.moe.k_act", u32v(opts.k_act));
        for t in &file.tensors {
            if !is_dense_ffn(&t.name) {
                out.tensor(&t.name, t.dtype, &t.dims, file.bytes(t).to_vec())?;
            }
        }
        Ok(ExpertWriter {
            file,
            opts,
            size,
            d,
            d_ff,
            out,
            bytes_per_expert: 0,
        })
    }

    /// Adds layer `l`'s experts, shared expert and router. `inputs` are the layer's
    /// calibration FFN inputs [n, d_model], on which the router's load balance is tuned.
    pub fn add_layer(&mut self, l: usize, part: &Partition, inputs: &[f32]) -> Result<()> {
        let f = self.file;
        let (d, size) = (self.d, self.size);
        let name = |s: &str| format!("blk.{l}.{s}");
        let gate = f.require(&name("ffn_gate.weight"))?;
        let up = f.require(&name("ffn_up.weight"))?;
        let down = f.require(&name("ffn_down.weight"))?;
        let routed = part.experts.len() as u64;
        let d64 = d as u64;

        // Gate and up: whole rows in their original blocks (zero rows for padding).
        let mut gate_exps = Vec::new();
        let mut up_exps = Vec::new();
        for e in &part.experts {
            gate_exps.extend(self.rows(gate, e)?);
            up_exps.extend(self.rows(up, e)?);
        }
        let (s64, n_sh) = (size as u64, part.shared.len() as u64);
        self.out.tensor(
            &name("ffn_gate_exps.weight"),
            gate.dtype,
            &[d64, s64, routed],
            gate_exps,
        )?;
        self.out.tensor(
            &name("ffn_up_exps.weight"),
            up.dtype,
            &[d64, s64, routed],
            up_exps,
        )?;

        // Down: columns of the dense matrix, re-quantised per expert.
        let mut dense_down = vec![0f32; d * self.d_ff];
        dequantize(down.dtype, f.bytes(down), &mut dense_down)?;
        let dt = self.opts.down_type;
        let mut down_exps = Vec::new();
        for e in &part.experts {
            down_exps.extend(quantize(dt, &self.columns(&dense_down, e))?);
        }
        self.out.tensor(
            &name("ffn_down_exps.weight"),
            dt,
            &[s64, d64, routed],
            down_exps,
        )?;
        if n_sh > 0 {
            let sg = self.rows(gate, &part.shared)?;
            let su = self.rows(up, &part.shared)?;
            let sd = quantize(dt, &self.columns(&dense_down, &part.shared))?;
            self.out
                .tensor(&name("ffn_gate_shexp.weight"), gate.dtype, &[d64, n_sh], sg)?;
            self.out
                .tensor(&name("ffn_up_shexp.weight"), up.dtype, &[d64, n_sh], su)?;
            self.out
                .tensor(&name("ffn_down_shexp.weight"), dt, &[n_sh, d64], sd)?;
        }
        self.bytes_per_expert = 2 * (gate.dtype.bytes_for(d64).unwrap_or(0) * s64)
            + dt.bytes_for(d64 * s64).unwrap_or(0);

        // Router: the representatives' gate and up rows, and a selection-only bias.
        let rg = self.f32_rows(gate, &part.representatives)?;
        let ru = self.f32_rows(up, &part.representatives)?;
        let bias = super::router::balance_bias(inputs, d, &rg, &ru, self.opts.n_active);
        let bytes = |v: &[f32]| bytemuck::cast_slice::<f32, u8>(v).to_vec();
        self.out.tensor(
            &name("ffn_gate_inp.weight"),
            DType::F32,
            &[d64, routed],
            bytes(&rg),
        )?;
        self.out.tensor(
            &name("ffn_up_inp.weight"),
            DType::F32,
            &[d64, routed],
            bytes(&ru),
        )?;
        self.out.tensor(
            &name("exp_probs_b.bias"),
            DType::F32,
            &[routed],
            bytes(&bias),
        )?;
        Ok(())
    }

    /// Bytes of one routed expert of one layer (gate + up + down).
    pub fn bytes_per_expert(&self) -> u64 {
        self.bytes_per_expert
    }

    pub fn write(self, path: &Path) -> Result<()> {
        self.out.write(path)
    }

    /// The raw bytes of rows `idx` of `t` (indices past the real rows are zero rows).
    fn rows(&self, t: &TensorInfo, idx: &[usize]) -> Result<Vec<u8>> {
        let row = t
            .dtype
            .bytes_for(self.d as u64)
            .ok_or_else(|| Error::BadTensor {
                tensor: t.name.clone(),
                why: "rows are not whole blocks".into(),
            })? as usize;
        let zero = quantize(t.dtype, &vec![0.0; self.d])?;
        let src = self.file.bytes(t);
        let mut out = Vec::with_capacity(idx.len() * row);
        for &i in idx {
            if i < self.d_ff {
                out.extend_from_slice(&src[i * row..(i + 1) * row]);
            } else {
                out.extend_from_slice(&zero);
            }
        }
        Ok(out)
    }

    /// Rows `idx` of `t` as f32 (the router keeps full precision; it is tiny).
    fn f32_rows(&self, t: &TensorInfo, idx: &[usize]) -> Result<Vec<f32>> {
        let bytes = self.rows(t, idx)?;
        let mut out = vec![0f32; idx.len() * self.d];
        dequantize(t.dtype, &bytes, &mut out)?;
        Ok(out)
    }

    /// The [d_model, idx.len()] block of columns `idx` of the dense down matrix, row-major.
    fn columns(&self, down: &[f32], idx: &[usize]) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.d * idx.len());
        for r in 0..self.d {
            let row = &down[r * self.d_ff..(r + 1) * self.d_ff];
            out.extend(
                idx.iter()
                    .map(|&i| if i < self.d_ff { row[i] } else { 0.0 }),
            );
        }
        out
    }
}
