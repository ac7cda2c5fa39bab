//! Builds the carved model's tensors: expert slices of the dense FFN, the training-free
//! router, and the metadata that tells the runtime the MoE shape.

use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::format::{GgufFile, GgufWriter, MetaValue, TensorInfo};
use crate::model::config::count_fit_tensors;
use crate::quant::{dequantize, quantize, DType};

use super::partition::Partition;
use super::recover::{CountFit, LinearRecovery, RouterFit};
use super::{CarveOptions, Method};

/// Metadata naming the pre-gating router a model's `ffn_recover_pregate` fits are for.
pub const PREGATE_FIT_KEY: &str = "pregate.moe.recover_pregate.router";

/// Metadata: the experts a token the `ffn_recover_pregate` fits were made for.
pub const PREGATE_FIT_EXPERTS_KEY: &str = "pregate.moe.recover_pregate.experts_per_token";

/// Tensors start on 4 KiB boundaries so that a loader can read them page-aligned.
const ALIGNMENT: u64 = 4096;

/// The tensors of layer `l` that make its router's decisions, in the order
/// [`routers_fingerprint`] hashes them.
fn router_tensor_names(l: usize) -> [String; 3] {
    [
        "ffn_gate_inp.weight",
        "ffn_up_inp.weight",
        "exp_probs_b.bias",
    ]
    .map(|t| format!("blk.{l}.{t}"))
}

/// What identifies a mixture-of-experts model's routing: a sha256 of every layer's router
/// tensors. A pre-gating router records the one of the model it learned (`train-router`),
/// so that a carve fitting a recovery for its choices can check it carved that model.
pub fn routers_fingerprint(f: &GgufFile, n_layer: usize) -> String {
    let mut h = Sha256::new();
    for l in 0..n_layer {
        for name in router_tensor_names(l) {
            if let Some(t) = f.tensor(&name) {
                h.update(f.bytes(t));
            }
        }
    }
    crate::format::hex_digest(h)
}

/// A carved layer's router, as written to the file.
pub enum Router {
    /// CMoE: representative gate/up rows [n_expert, d] and a selection bias [n_expert].
    Representative {
        rg: Vec<f32>,
        ru: Vec<f32>,
        bias: Vec<f32>,
    },
    /// Least squares: rows [n_expert, d] whose dot with x predicts each expert's output norm.
    Linear(Vec<f32>),
}

/// The carved MoE's shape, the same in every layer.
#[derive(Clone, Copy, Debug)]
pub struct MoeShape {
    pub method: Method,
    pub n_routed: usize,
    pub n_active: usize,
    /// Neurons per routed expert, padding included.
    pub expert_ff: usize,
    /// Neurons of the shared expert (0: none), padding included.
    pub shared_ff: usize,
    /// Zero neurons per layer.
    pub padding: usize,
    /// Experts in all, counting the shared ones (`pregate.moe.experts_total`).
    pub experts_total: usize,
    pub shared_experts: usize,
}

impl Router {
    /// The `k` experts this router picks for the FFN input `x`, as the runtime does.
    pub fn select(&self, x: &[f32], k: usize) -> Vec<usize> {
        match self {
            Router::Representative { rg, ru, bias } => {
                super::router::select(&super::router::probabilities(x, rg, ru), bias, k)
            }
            Router::Linear(w) => super::recover::top_k_linear(x, w, k),
        }
    }
}

pub struct ExpertWriter<'a> {
    file: &'a GgufFile,
    opts: &'a CarveOptions,
    d: usize,
    d_ff: usize,
    out: GgufWriter,
    bytes_per_expert: u64,
    /// Hashes the router tensors as they are written ([`routers_fingerprint`]).
    routers: Sha256,
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
    pub fn new(file: &'a GgufFile, opts: &'a CarveOptions, shape: MoeShape) -> Result<Self> {
        let arch = file.architecture()?.to_string();
        let d = file.get_u64(&format!("{arch}.embedding_length"))? as usize;
        let d_ff = file.get_u64(&format!("{arch}.feed_forward_length"))? as usize;
        let mut out = GgufWriter::new().with_alignment(ALIGNMENT);
        for (k, v) in &file.metadata {
            if k != "general.alignment" {
                out.meta(k, v.clone());
            }
        }
        let u32v = |v: usize| MetaValue::U32(v as u32);
        out.meta(&format!("{arch}.expert_count"), u32v(shape.n_routed))
            .meta(&format!("{arch}.expert_used_count"), u32v(shape.n_active))
            .meta(
                &format!("{arch}.expert_feed_forward_length"),
                u32v(shape.expert_ff),
            )
            .meta(
                &format!("{arch}.expert_shared_feed_forward_length"),
                u32v(shape.shared_ff),
            )
            .meta(
                "pregate.moe.method",
                MetaValue::String(shape.method.name().into()),
            )
            .meta(
                "pregate.moe.router",
                MetaValue::String(
                    match opts.router_fit {
                        RouterFit::Representative => "cmoe",
                        RouterFit::LeastSquares => "lsq",
                    }
                    .into(),
                ),
            )
            .meta("pregate.moe.recover", MetaValue::Bool(opts.recover))
            .meta("pregate.moe.experts_total", u32v(shape.experts_total))
            .meta("pregate.moe.shared_experts", u32v(shape.shared_experts))
            .meta("pregate.moe.padding_neurons", u32v(shape.padding));
        match shape.method {
            Method::Cmoe => {
                out.meta("pregate.moe.k_act", u32v(opts.k_act));
            }
            Method::Readme => {
                out.meta(
                    "pregate.moe.remain_rate",
                    MetaValue::F32(opts.remain_rate as f32),
                );
            }
        }
        for t in &file.tensors {
            if !is_dense_ffn(&t.name) {
                out.tensor(&t.name, t.dtype, &t.dims, file.bytes(t).to_vec())?;
            }
        }
        Ok(ExpertWriter {
            file,
            opts,
            d,
            d_ff,
            out,
            bytes_per_expert: 0,
            routers: Sha256::new(),
        })
    }

    pub fn d_model(&self) -> usize {
        self.d
    }

    /// Layer `l`'s dense down-projection [d_model, d_ff], row-major f32.
    pub fn dense_down(&self, l: usize) -> Result<Vec<f32>> {
        super::calib::dense_matrix(self.file, &format!("blk.{l}.ffn_down.weight"))
    }

    /// CMoE's router: the representatives' gate and up rows, and a selection-only bias
    /// balanced on the calibration `inputs` [n, d_model].
    pub fn representative_router(
        &self,
        l: usize,
        part: &Partition,
        inputs: &[f32],
    ) -> Result<Router> {
        let f = self.file;
        let gate = f.require(&format!("blk.{l}.ffn_gate.weight"))?;
        let up = f.require(&format!("blk.{l}.ffn_up.weight"))?;
        // CMoE scores with L2-normalised rows (û, ĝ), so no expert wins by row scale.
        let unit = |mut rows: Vec<f32>| {
            for r in rows.chunks_exact_mut(self.d) {
                let norm = r.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                r.iter_mut().for_each(|v| *v /= norm);
            }
            rows
        };
        let rg = unit(self.f32_rows(gate, &part.representatives)?);
        let ru = unit(self.f32_rows(up, &part.representatives)?);
        let bias = if self.opts.balance {
            super::router::balance_bias(inputs, self.d, &rg, &ru, self.opts.n_active)
        } else {
            vec![0.0; part.experts.len()]
        };
        Ok(Router::Representative { rg, ru, bias })
    }

    /// Adds layer `l`'s experts, shared expert, router and recovery fits (for the layer's
    /// own router, and for the pre-gating router's choices).
    pub fn add_layer(
        &mut self,
        l: usize,
        part: &Partition,
        dense_down: &[f32],
        router: &Router,
        recovery: Option<&LinearRecovery>,
        pregate_fit: Option<&LinearRecovery>,
    ) -> Result<()> {
        let f = self.file;
        // Every expert of a layer has its size (readme: sized per layer, up to the shape's).
        let (d, size) = (self.d, part.experts.first().map_or(0, Vec::len));
        let name = |s: &str| format!("blk.{l}.{s}");
        let gate = f.require(&name("ffn_gate.weight"))?;
        let up = f.require(&name("ffn_up.weight"))?;
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
        let dt = self.opts.down_type;
        let mut down_exps = Vec::new();
        for e in &part.experts {
            down_exps.extend(quantize(dt, &self.columns(dense_down, e))?);
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
            let sd = quantize(dt, &self.columns(dense_down, &part.shared))?;
            self.out
                .tensor(&name("ffn_gate_shexp.weight"), gate.dtype, &[d64, n_sh], sg)?;
            self.out
                .tensor(&name("ffn_up_shexp.weight"), up.dtype, &[d64, n_sh], su)?;
            self.out
                .tensor(&name("ffn_down_shexp.weight"), dt, &[n_sh, d64], sd)?;
        }
        let bytes = 2 * (gate.dtype.bytes_for(d64).unwrap_or(0) * s64)
            + dt.bytes_for(d64 * s64).unwrap_or(0);
        self.bytes_per_expert = self.bytes_per_expert.max(bytes);

        for (r, prefix) in [
            (recovery, "ffn_recover"),
            (pregate_fit, "ffn_recover_pregate"),
        ] {
            if let Some(r) = r {
                self.add_recovery(l, prefix, r, n_sh)?;
            }
        }
        let (rg, ru, bias) = match router {
            Router::Representative { rg, ru, bias } => (rg, Some(ru), Some(bias)),
            Router::Linear(w) => (w, None, None),
        };
        let dims = [d64, routed];
        let [gate_inp, up_inp, probs_b] = router_tensor_names(l);
        let tensors = [
            (gate_inp, &dims[..], Some(rg)),
            (up_inp, &dims[..], ru),
            (probs_b, &[routed][..], bias),
        ];
        for (name, dims, v) in tensors {
            if let Some(v) = v {
                let v = bytemuck::cast_slice::<f32, u8>(v).to_vec();
                self.routers.update(&v);
                self.out.tensor(&name, DType::F32, dims, v)?;
            }
        }
        Ok(())
    }

    /// Writes layer `l`'s count corrections of its recovery fit
    /// ([`crate::model::config::count_fit_tensors`]): V and U in f16 (small, and read
    /// as f32 by the runtime), the bias in f32.
    pub fn add_count_fits(&mut self, l: usize, fits: &[CountFit]) -> Result<()> {
        let d = self.d as u64;
        let f16_bytes = |v: &[f32]| -> Vec<u8> {
            let h: Vec<half::f16> = v.iter().map(|x| half::f16::from_f32(*x)).collect();
            bytemuck::cast_slice(&h).to_vec()
        };
        for fit in fits {
            let r = (fit.input.len() as u64) / d.max(1);
            let [input, output, bias] = count_fit_tensors(l, fit.k);
            self.out
                .tensor(&input, DType::F16, &[d, r], f16_bytes(&fit.input))?;
            self.out
                .tensor(&output, DType::F16, &[r, d], f16_bytes(&fit.output))?;
            let b = bytemuck::cast_slice::<f32, u8>(&fit.bias).to_vec();
            self.out.tensor(&bias, DType::F32, &[d], b)?;
        }
        Ok(())
    }

    /// Writes a recovery fit as `blk.{l}.{prefix}.weight` and `.bias`, and its corrected
    /// shared down-projection as `blk.{l}.{prefix}_shexp.weight`.
    fn add_recovery(
        &mut self,
        l: usize,
        prefix: &str,
        r: &LinearRecovery,
        n_sh: u64,
    ) -> Result<()> {
        let (dt, d64) = (self.opts.down_type, self.d as u64);
        let name = |s: &str| format!("blk.{l}.{prefix}{s}");
        let w = quantize(dt, &r.weight)?;
        self.out.tensor(&name(".weight"), dt, &[d64, d64], w)?;
        let bias = bytemuck::cast_slice::<f32, u8>(&r.bias).to_vec();
        self.out.tensor(&name(".bias"), DType::F32, &[d64], bias)?;
        // The shared down-projection with the recovery's correction: the runtime reads
        // it instead of ffn_down_shexp wherever the fit is used.
        if let (Some(sd), true) = (&r.shared_down, n_sh > 0) {
            let sd = quantize(dt, sd)?;
            self.out
                .tensor(&name("_shexp.weight"), dt, &[n_sh, d64], sd)?;
        }
        Ok(())
    }

    /// The fingerprint of the routers written so far ([`routers_fingerprint`] of the
    /// finished file).
    pub fn routers_fingerprint(&self) -> String {
        crate::format::hex_digest(self.routers.clone())
    }

    /// Records in the file the pre-gating router (its [`PreGateRouter::fingerprint`]) that
    /// the `ffn_recover_pregate` fits were made for, at its top `experts_per_token`.
    ///
    /// [`PreGateRouter::fingerprint`]: crate::router::PreGateRouter::fingerprint
    pub fn mark_pregate_fit(&mut self, router: &str, experts_per_token: usize) {
        self.out
            .meta(PREGATE_FIT_KEY, MetaValue::String(router.to_string()))
            .meta(
                PREGATE_FIT_EXPERTS_KEY,
                MetaValue::U32(experts_per_token as u32),
            );
    }

    /// Bytes of one routed expert of one layer (gate + up + down; the largest layer's).
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
