//! A loaded model: the mapped file, its config, and its weights on the GPU. Weights are
//! read from the mapping and uploaded once; state (KV cache, activations) lives in
//! [`super::Session`] so that one model can serve several conversations.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::format::{GgufFile, TensorInfo};
use crate::gpu::{Gpu, Matrix, Vector};
use crate::quant::dequantize;

use super::config::ModelConfig;

/// One transformer block.
pub struct LayerWeights {
    pub attn_norm: Vector,      // [d_model]
    pub q: Matrix,              // [n_head * head_dim, d_model]
    pub q_bias: Option<Vector>, // [n_head * head_dim]
    pub k: Matrix,              // [n_kv_head * head_dim, d_model]
    pub k_bias: Option<Vector>,
    pub v: Matrix, // [n_kv_head * head_dim, d_model]
    pub v_bias: Option<Vector>,
    pub o: Matrix,        // [d_model, n_head * head_dim]
    pub ffn_norm: Vector, // [d_model]
    pub gate: Matrix,     // [d_ff, d_model]
    pub up: Matrix,       // [d_ff, d_model]
    pub down: Matrix,     // [d_model, d_ff]
}

pub struct Weights {
    pub embed: Matrix, // [vocab, d_model]
    pub layers: Vec<LayerWeights>,
    pub out_norm: Vector,        // [d_model]
    pub lm_head: Option<Matrix>, // [vocab, d_model]; None: tied to `embed`
}

impl Weights {
    pub fn lm_head(&self) -> &Matrix {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}

pub struct Model {
    pub file: GgufFile,
    pub config: ModelConfig,
    pub weights: Weights,
    pub gpu: Arc<Gpu>,
}

fn matrix(gpu: &Gpu, f: &GgufFile, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
    let t = f.require(name)?;
    check_shape(t, &[cols, rows])?;
    Matrix::upload(gpu, name, t.dtype, rows, cols, f.bytes(t))
}

fn vector(gpu: &Gpu, f: &GgufFile, name: &str, len: usize) -> Result<Vector> {
    let t = f.require(name)?;
    check_shape(t, &[len])?;
    let mut v = vec![0f32; len];
    dequantize(t.dtype, f.bytes(t), &mut v)?;
    Vector::upload(gpu, name, &v)
}

fn optional_vector(gpu: &Gpu, f: &GgufFile, name: &str, len: usize) -> Result<Option<Vector>> {
    match f.tensor(name) {
        Some(_) => vector(gpu, f, name, len).map(Some),
        None => Ok(None),
    }
}

fn check_shape(t: &TensorInfo, want: &[usize]) -> Result<()> {
    let got: Vec<usize> = t.dims.iter().map(|d| *d as usize).collect();
    if got != want {
        return Err(Error::BadTensor {
            tensor: t.name.clone(),
            why: format!("shape {got:?}, expected {want:?}"),
        });
    }
    Ok(())
}

impl Model {
    /// Uploads every weight; `progress(done, total)` is called after each tensor.
    pub fn load(
        gpu: Arc<Gpu>,
        file: GgufFile,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Model> {
        let _span = tracing::info_span!("load", path = %file.path.display()).entered();
        let c = ModelConfig::from_gguf(&file)?;
        let (d, qd, kvd) = (c.d_model, c.n_head * c.head_dim, c.n_kv_head * c.head_dim);
        let total = c.n_layer + 2;
        let f = &file;
        let g = &*gpu;
        let embed = matrix(g, f, "token_embd.weight", c.vocab, d)?;
        progress(1, total);
        let mut layers = Vec::with_capacity(c.n_layer);
        for l in 0..c.n_layer {
            let n = |s: &str| format!("blk.{l}.{s}");
            layers.push(LayerWeights {
                attn_norm: vector(g, f, &n("attn_norm.weight"), d)?,
                q: matrix(g, f, &n("attn_q.weight"), qd, d)?,
                q_bias: optional_vector(g, f, &n("attn_q.bias"), qd)?,
                k: matrix(g, f, &n("attn_k.weight"), kvd, d)?,
                k_bias: optional_vector(g, f, &n("attn_k.bias"), kvd)?,
                v: matrix(g, f, &n("attn_v.weight"), kvd, d)?,
                v_bias: optional_vector(g, f, &n("attn_v.bias"), kvd)?,
                o: matrix(g, f, &n("attn_output.weight"), d, qd)?,
                ffn_norm: vector(g, f, &n("ffn_norm.weight"), d)?,
                gate: matrix(g, f, &n("ffn_gate.weight"), c.d_ff, d)?,
                up: matrix(g, f, &n("ffn_up.weight"), c.d_ff, d)?,
                down: matrix(g, f, &n("ffn_down.weight"), d, c.d_ff)?,
            });
            progress(l + 2, total);
        }
        let out_norm = vector(g, f, "output_norm.weight", d)?;
        let lm_head = match f.tensor("output.weight") {
            Some(_) => Some(matrix(g, f, "output.weight", c.vocab, d)?),
            None => None,
        };
        progress(total, total);
        Ok(Model {
            file,
            config: c,
            weights: Weights {
                embed,
                layers,
                out_norm,
                lm_head,
            },
            gpu,
        })
    }

    /// Bytes of weights resident on the GPU.
    pub fn weight_bytes(&self) -> u64 {
        let w = &self.weights;
        let mut n = w.embed.gpu_bytes() + w.lm_head.as_ref().map_or(0, |m| m.gpu_bytes());
        for l in &w.layers {
            n += [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]
                .iter()
                .map(|m| m.gpu_bytes())
                .sum::<u64>();
        }
        n
    }
}
