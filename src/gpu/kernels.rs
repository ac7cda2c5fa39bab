//! Kernels by name: each [`Kernel`] maps to a WGSL source assembled from `shaders/` (files
//! included at build time) and an entry point. Quantized kernels are specialised per type by
//! prepending the type's block reader, as llama.cpp specialises its shaders.

use crate::quant::DType;

const QUANT_COMMON: &str = include_str!("../../shaders/quant_common.wgsl");
const MATVEC: &str = include_str!("../../shaders/matvec.wgsl");
const MATMUL: &str = include_str!("../../shaders/matmul.wgsl");
const EMBED: &str = include_str!("../../shaders/embed.wgsl");
const NORM: &str = include_str!("../../shaders/norm.wgsl");
const ROPE: &str = include_str!("../../shaders/rope.wgsl");
const ATTENTION: &str = include_str!("../../shaders/attention.wgsl");
const ELEMENTWISE: &str = include_str!("../../shaders/elementwise.wgsl");
const SAMPLING: &str = include_str!("../../shaders/sampling.wgsl");

fn quant_source(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => include_str!("../../shaders/quant/f32.wgsl"),
        DType::F16 => include_str!("../../shaders/quant/f16.wgsl"),
        DType::BF16 => include_str!("../../shaders/quant/bf16.wgsl"),
        DType::Q4_0 => include_str!("../../shaders/quant/q4_0.wgsl"),
        DType::Q5_0 => include_str!("../../shaders/quant/q5_0.wgsl"),
        DType::Q8_0 => include_str!("../../shaders/quant/q8_0.wgsl"),
        DType::Q4K => include_str!("../../shaders/quant/q4_k.wgsl"),
        DType::Q5K => include_str!("../../shaders/quant/q5_k.wgsl"),
        DType::Q6K => include_str!("../../shaders/quant/q6_k.wgsl"),
    }
}

/// Every compute pipeline pregate uses, keyed for the pipeline cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Quantized mat-mul; `tokens` = tokens per thread (1 for decode).
    Matmul {
        dtype: DType,
        tokens: u32,
    },
    Embed {
        dtype: DType,
    },
    RmsNorm,
    Rope,
    Attention {
        head_dim: u32,
    },
    SwiGlu,
    Add,
    Argmax,
    Softmax,
    Nll,
}

impl Kernel {
    pub fn label(&self) -> &'static str {
        match self {
            Kernel::Matmul { .. } => "matmul",
            Kernel::Embed { .. } => "embed",
            Kernel::RmsNorm => "rms_norm",
            Kernel::Rope => "rope",
            Kernel::Attention { .. } => "attention",
            Kernel::SwiGlu => "swiglu",
            Kernel::Add => "add",
            Kernel::Argmax => "argmax",
            Kernel::Softmax => "softmax",
            Kernel::Nll => "nll",
        }
    }

    pub fn entry_point(&self) -> &'static str {
        match self {
            Kernel::SwiGlu => "swiglu",
            Kernel::Add => "add",
            Kernel::Argmax => "argmax",
            Kernel::Softmax => "softmax",
            Kernel::Nll => "nll",
            _ => "main",
        }
    }

    pub fn source(&self) -> String {
        match *self {
            Kernel::Matmul { dtype, tokens: 1 } => {
                format!("{QUANT_COMMON}\n{}\n{MATVEC}", quant_source(dtype))
            }
            Kernel::Matmul { dtype, tokens } => format!(
                "{}\n{}\n{}",
                QUANT_COMMON,
                quant_source(dtype),
                MATMUL.replace("{{TB}}", &tokens.to_string())
            ),
            Kernel::Embed { dtype } => format!("{QUANT_COMMON}\n{}\n{EMBED}", quant_source(dtype)),
            Kernel::RmsNorm => NORM.to_string(),
            Kernel::Rope => ROPE.to_string(),
            Kernel::Attention { head_dim } => {
                ATTENTION.replace("{{HD4}}", &(head_dim / 4).to_string())
            }
            Kernel::SwiGlu | Kernel::Add => ELEMENTWISE.to_string(),
            Kernel::Argmax | Kernel::Softmax | Kernel::Nll => SAMPLING.to_string(),
        }
    }
}
