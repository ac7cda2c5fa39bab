//! Sequential calibration (CMoE, design §3): layer l is carved on the inputs that the
//! already-carved layers before it produce, not on the dense model's. The residual stream
//! of every calibration token is carried from layer to layer on the CPU: the layer's
//! attention with its dense weights, then its FFN as carved (the shared neurons and the
//! experts its router picks), so the next layer is profiled on what the carved model will
//! feed it. With a pre-gating router (`--pregate-router`), a second stream is carried
//! with the router's choices and its own recovery fit, so that fit is made on the inputs
//! `--routing pregate` gives each layer. Matrix products go through nalgebra's blocked
//! GEMM, split across the cores.

use std::borrow::Cow;
use std::ops::Range;

use half::f16;
use nalgebra::DMatrix;

use crate::error::Result;
use crate::format::GgufFile;
use crate::gpu::ops::RopeMode;
use crate::model::ModelConfig;
use crate::quant::dequantize;

use super::calib::{add_tokens, dense_matrix, unit_norms, LayerCalibration};
use super::partition::Partition;
use super::recover::{LinearRecovery, RouterPlan};
use super::router::silu;
use super::tensors::{ExpertWriter, MoeShape};
use super::{
    carve_layer, cmoe_partition, cmoe_shape, warn_padding, CarveEvent, CarveOptions, PregateFit,
};

/// `x` [n, k] times `w`ᵀ, `w` [m, k], both row-major: [n, m] row-major.
pub fn matmul_t(x: &[f32], w: &[f32], k: usize) -> Vec<f32> {
    let (n, m) = (x.len() / k, w.len() / k);
    // Row-major [n, m] is column-major [m, n] = W · Xᵀ.
    let w = DMatrix::from_row_slice(m, k, w);
    let threads = std::thread::available_parallelism().map_or(1, |v| v.get());
    let rows = n.div_ceil(threads).max(1);
    let mut out = vec![0f32; n * m];
    std::thread::scope(|s| {
        for (xc, oc) in x.chunks(rows * k).zip(out.chunks_mut(rows * m)) {
            let w = &w;
            s.spawn(move || {
                let xt = DMatrix::from_column_slice(k, xc.len() / k, xc);
                oc.copy_from_slice((w * xt).as_slice());
            });
        }
    });
    out
}

/// RMSNorm of every row of `x` [n, d], scaled by `weight` [d].
fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let d = weight.len();
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(d) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        out.extend(row.iter().zip(weight).map(|(v, w)| v * inv * w));
    }
    out
}

/// Rotates the heads of `v` [n, heads * head_dim] by position (`pos[t]`), as rope.wgsl.
fn rope(v: &mut [f32], pos: &[usize], head_dim: usize, base: f32, mode: RopeMode) {
    let half = head_dim / 2;
    let width = v.len() / pos.len().max(1);
    for (row, &p) in v.chunks_exact_mut(width).zip(pos) {
        for head in row.chunks_exact_mut(head_dim) {
            for i in 0..half {
                let theta = p as f32 * base.powf(-2.0 * i as f32 / head_dim as f32);
                let (sn, cs) = theta.sin_cos();
                let (a, b) = match mode {
                    RopeMode::Neox => (i, i + half),
                    _ => (2 * i, 2 * i + 1),
                };
                let (x, y) = (head[a], head[b]);
                head[a] = x * cs - y * sn;
                head[b] = x * sn + y * cs;
            }
        }
    }
}

/// The calibration tokens' residual stream, carried through the layers on the CPU.
pub struct ResidualStream<'a> {
    file: &'a GgufFile,
    c: &'a ModelConfig,
    /// [n_tokens, d_model]
    x: Vec<f32>,
    /// The calibration sequences: a token attends within its own.
    seqs: Vec<Range<usize>>,
    /// Each token's position in its sequence.
    pos: Vec<usize>,
}

impl<'a> ResidualStream<'a> {
    /// The embeddings of `tokens`, cut into sequences of `seq_len`.
    pub fn new(
        file: &'a GgufFile,
        c: &'a ModelConfig,
        tokens: &[u32],
        seq_len: usize,
    ) -> Result<Self> {
        let d = c.d_model;
        let t = file.require("token_embd.weight")?;
        let row = t.dtype.bytes_for(d as u64).unwrap_or(0) as usize;
        let bytes = file.bytes(t);
        let mut x = vec![0f32; tokens.len() * d];
        for (&id, out) in tokens.iter().zip(x.chunks_exact_mut(d)) {
            let at = id as usize * row;
            let src = bytes.get(at..at + row).ok_or_else(|| {
                crate::error::Error::InvalidArgument(format!(
                    "token {id} is outside the vocabulary"
                ))
            })?;
            dequantize(t.dtype, src, out)?;
        }
        let n = tokens.len();
        let seqs: Vec<Range<usize>> = (0..n)
            .step_by(seq_len.max(1))
            .map(|s| s..(s + seq_len).min(n))
            .collect();
        let pos = (0..n).map(|t| t % seq_len.max(1)).collect();
        Ok(ResidualStream {
            file,
            c,
            x,
            seqs,
            pos,
        })
    }

    fn vector(&self, name: &str) -> Result<Option<Vec<f32>>> {
        match self.file.tensor(name) {
            Some(_) => dense_matrix(self.file, name).map(Some),
            None => Ok(None),
        }
    }

    /// Adds layer `l`'s attention block to the stream and returns the FFN input
    /// (ffn_norm of the stream) [n, d_model].
    pub fn attention(&mut self, l: usize) -> Result<Vec<f32>> {
        let c = self.c;
        let (d, hd) = (c.d_model, c.head_dim);
        let name = |s: &str| format!("blk.{l}.{s}");
        let xa = rms_norm(
            &self.x,
            &dense_matrix(self.file, &name("attn_norm.weight"))?,
            c.rms_eps,
        );
        let proj = |w: &str, heads: usize| -> Result<Vec<f32>> {
            let mut y = matmul_t(
                &xa,
                &dense_matrix(self.file, &name(&format!("{w}.weight")))?,
                d,
            );
            if let Some(b) = self.vector(&name(&format!("{w}.bias")))? {
                for row in y.chunks_exact_mut(b.len()) {
                    row.iter_mut().zip(&b).for_each(|(v, b)| *v += b);
                }
            }
            if let Some(norm) = self.vector(&name(&format!("{w}_norm.weight")))? {
                y = rms_norm(&y, &norm, c.rms_eps);
            }
            debug_assert_eq!(y.len(), xa.len() / d * heads * hd);
            Ok(y)
        };
        let mut q = proj("attn_q", c.n_head)?;
        let mut k = proj("attn_k", c.n_kv_head)?;
        let v = proj("attn_v", c.n_kv_head)?;
        rope(&mut q, &self.pos, hd, c.rope_base, c.rope_mode);
        rope(&mut k, &self.pos, hd, c.rope_base, c.rope_mode);

        let (qd, kvd) = (c.n_head * hd, c.n_kv_head * hd);
        let group = c.n_head / c.n_kv_head.max(1);
        let scale = 1.0 / (hd as f32).sqrt();
        let mut attn = vec![0f32; self.x.len() / d * qd];
        for seq in &self.seqs {
            let len = seq.len();
            for h in 0..c.n_head {
                let kh = h / group.max(1);
                let qm = DMatrix::from_fn(len, hd, |t, j| q[(seq.start + t) * qd + h * hd + j]);
                let kt = DMatrix::from_fn(hd, len, |j, t| k[(seq.start + t) * kvd + kh * hd + j]);
                let vm = DMatrix::from_fn(len, hd, |t, j| v[(seq.start + t) * kvd + kh * hd + j]);
                let mut s = qm * kt * scale;
                // Causal softmax over each row.
                for t in 0..len {
                    let mx = (0..=t).map(|u| s[(t, u)]).fold(f32::MIN, f32::max);
                    let mut sum = 0.0;
                    for u in 0..len {
                        let e = if u <= t { (s[(t, u)] - mx).exp() } else { 0.0 };
                        s[(t, u)] = e;
                        sum += e;
                    }
                    for u in 0..=t {
                        s[(t, u)] /= sum;
                    }
                }
                let o = s * vm;
                for t in 0..len {
                    for j in 0..hd {
                        attn[(seq.start + t) * qd + h * hd + j] = o[(t, j)];
                    }
                }
            }
        }
        let out = matmul_t(
            &attn,
            &dense_matrix(self.file, &name("attn_output.weight"))?,
            qd,
        );
        self.add(&out);
        Ok(rms_norm(
            &self.x,
            &dense_matrix(self.file, &name("ffn_norm.weight"))?,
            c.rms_eps,
        ))
    }

    /// Adds a block's output [n, d_model] to the stream.
    pub fn add(&mut self, y: &[f32]) {
        self.x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
    }
}

/// The carved FFN's output on the calibration tokens: each token's silu(gate)·up `h`
/// [n, d_ff], kept on the shared neurons and those of the experts `choose` picks for
/// token t from its `xn` row [d], times the dense down-projection `down` [d, d_ff].
fn carved_ffn(
    h: &[f32],
    xn: &[f32],
    d: usize,
    part: &Partition,
    choose: impl Fn(usize, &[f32]) -> Vec<usize>,
    down: &[f32],
) -> Vec<f32> {
    let n = xn.len() / d.max(1);
    let d_ff = h.len() / n.max(1);
    let mut kept = vec![0f32; h.len()];
    for (t, ((hr, kr), x)) in h
        .chunks_exact(d_ff)
        .zip(kept.chunks_exact_mut(d_ff))
        .zip(xn.chunks_exact(d))
        .enumerate()
    {
        let chosen = choose(t, x);
        let active = part
            .shared
            .iter()
            .chain(chosen.iter().flat_map(|&e| &part.experts[e]));
        for &i in active.filter(|&&i| i < d_ff) {
            kr[i] = hr[i];
        }
    }
    matmul_t(&kept, down, d_ff)
}

/// CMoE carved layer by layer, each calibrated on the output of the carved layers before
/// it: the residual stream runs on the CPU (`sequential.rs`).
pub(super) fn carve_in_order<'a>(
    f: &'a crate::format::GgufFile,
    c: &crate::model::ModelConfig,
    tokens: &[u32],
    opts: &'a CarveOptions,
    plan: Option<&RouterPlan>,
    progress: &mut impl FnMut(CarveEvent),
) -> Result<(MoeShape, ExpertWriter<'a>)> {
    let (d, ff) = (c.d_model, c.d_ff);
    let shape = cmoe_shape(ff, opts);
    warn_padding(&shape);
    let mut writer = ExpertWriter::new(f, opts, shape)?;
    let mut stream = ResidualStream::new(f, c, tokens, opts.seq_len)?;
    // With a pre-gating router, a second stream that it routes: its fit is made on the
    // inputs `--routing pregate` will give each layer, not the layers' routing's.
    let mut pregate_stream = plan
        .map(|p| ResidualStream::new(f, c, tokens, opts.seq_len).map(|s| (p, s)))
        .transpose()?;
    let mut scratch = Vec::new();
    for l in 0..c.n_layer {
        let xn = stream.attention(l)?;
        let gate_w = dense_matrix(f, &format!("blk.{l}.ffn_gate.weight"))?;
        let up_w = dense_matrix(f, &format!("blk.{l}.ffn_up.weight"))?;
        let gate = matmul_t(&xn, &gate_w, d);
        let up = matmul_t(&xn, &up_w, d);
        let norms = (unit_norms(&gate_w, d), unit_norms(&up_w, d));
        let down = writer.dense_down(l)?;
        let mut layer = LayerCalibration::new(ff, tokens.len(), d);
        let n = (&norms.0[..], &norms.1[..]);
        add_tokens(&mut layer, 0, &xn, &gate, &up, n, opts, &mut scratch);
        let part = cmoe_partition(&layer, &down, &shape, opts);
        // The pre-gate's stream at this layer: its FFN inputs and activations.
        let own = match &mut pregate_stream {
            Some((_, s)) => {
                let x = s.attention(l)?;
                let h = activations(&matmul_t(&x, &gate_w, d), &matmul_t(&x, &up_w, d));
                let h16: Vec<f16> = h.iter().map(|v| f16::from_f32(*v)).collect();
                Some((x, h, h16))
            }
            None => None,
        };
        let pregate = pregate_stream.as_ref().map(|&(plan, _)| PregateFit {
            plan,
            stream: own.as_ref().map(|(x, _, h16)| (&x[..], &h16[..])),
        });
        let (router, recovery, for_plan) =
            carve_layer(&mut writer, l, &layer, &part, &down, opts, pregate)?;
        let h = activations(&gate, &up);
        let by_router = |_: usize, x: &[f32]| router.select(x, opts.n_active);
        let layer_out = carved_output(&h, &xn, d, &part, &down, by_router, recovery.as_ref());
        stream.add(&layer_out);
        if let (Some((plan, s)), Some((x, h, _))) = (&mut pregate_stream, &own) {
            let by_plan = |t: usize, _: &[f32]| plan.choices(t, l);
            let out = carved_output(h, x, d, &part, &down, by_plan, for_plan.as_ref());
            s.add(&out);
        }
        progress(CarveEvent::Carving {
            done: l + 1,
            total: c.n_layer,
        });
    }
    Ok((shape, writer))
}

/// silu(gate) · up of every neuron.
fn activations(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.iter().zip(up).map(|(g, u)| silu(*g) * u).collect()
}

/// The carved FFN's output on a stream: the experts `choose` picks for each token, and
/// the recovery fit (its map, and its shared down-projection in place of the dense one's
/// shared columns), as the runtime computes it.
fn carved_output(
    h: &[f32],
    xn: &[f32],
    d: usize,
    part: &Partition,
    down: &[f32],
    choose: impl Fn(usize, &[f32]) -> Vec<usize>,
    recovery: Option<&LinearRecovery>,
) -> Vec<f32> {
    let ff = down.len() / d.max(1);
    let mut down = Cow::Borrowed(down);
    if let Some(sd) = recovery.and_then(|r| r.shared_down.as_ref()) {
        let s = part.shared.len();
        for (row, fit) in down.to_mut().chunks_exact_mut(ff).zip(sd.chunks_exact(s)) {
            for (&i, &v) in part.shared.iter().zip(fit) {
                if i < ff {
                    row[i] = v;
                }
            }
        }
    }
    let mut y = carved_ffn(h, xn, d, part, choose, &down);
    if let Some(r) = recovery {
        let lin = matmul_t(xn, &r.weight, d);
        for (row, lin) in y.chunks_exact_mut(d).zip(lin.chunks_exact(d)) {
            for ((y, l), b) in row.iter_mut().zip(lin).zip(&r.bias) {
                *y += l + b;
            }
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_t_matches_the_definition() {
        let (n, m, k) = (5, 3, 7);
        let x: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let y = matmul_t(&x, &w, k);
        for r in 0..n {
            for c in 0..m {
                let want: f32 = (0..k).map(|i| x[r * k + i] * w[c * k + i]).sum();
                assert!((y[r * m + c] - want).abs() < 1e-5);
            }
        }
    }
}
