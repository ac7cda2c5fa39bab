//! Kernels by name: each [`Kernel`] maps to a WGSL source assembled from `shaders/` (files
//! included at build time) and an entry point. Quantized kernels are specialised per type by
//! prepending the type's block reader, as llama.cpp specialises its shaders.

use crate::quant::DType;

const QUANT_COMMON: &str = include_str!("../../shaders/quant_common.wgsl");
const MATMUL_COMMON: &str = include_str!("../../shaders/matmul_common.wgsl");
const MATVEC: &str = include_str!("../../shaders/matvec.wgsl");
const CHUNK_DOT: &str = include_str!("../../shaders/chunk_dot.wgsl");
const MOE: &str = include_str!("../../shaders/moe.wgsl");
const MOE_ROUTE: &str = include_str!("../../shaders/moe_route.wgsl");
const MOE_RECOVER: &str = include_str!("../../shaders/moe_recover.wgsl");
const MATMUL: &str = include_str!("../../shaders/matmul.wgsl");
const MATMUL_TILED: &str = include_str!("../../shaders/matmul_tiled.wgsl");
const GEMM_TILE: &str = include_str!("../../shaders/gemm_tile.wgsl");
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

/// Rows per thread in the prefill mat-mul (written out in matmul.wgsl: its per-row
/// registers must be named variables, as arrays would live in memory on lavapipe).
pub const MATMUL_ROWS: u32 = 4;
/// Rows and tokens of a GPU mat-mul tile (gemm_tile.wgsl's BM and BN).
pub const GEMM_TILE_DIM: u32 = 64;
/// Threads per row of the split decode mat-vec (a power of two dividing 64).
pub const MATVEC_TPR: u32 = 16;
/// Rows per thread of the one-thread-per-row decode mat-vec (CPU adapters).
pub const MATVEC_RPT: u32 = 8;

/// Keys `flash` stages at a time for heads of `hd4` vec4s: its K and V tiles fill at most
/// 16 KiB, the workgroup memory every WebGPU adapter has.
fn flash_keys(hd4: u32) -> u32 {
    (16384 / (2 * 16 * hd4.max(1))).min(64)
}

/// The attention kernels (attention.wgsl).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AttnVariant {
    /// One thread per (head, token): CPU adapters.
    Serial,
    /// A workgroup per (head, 64 queries), keys staged in workgroup memory: GPU prefill.
    Flash,
    /// GPU decode: a workgroup per (head, span of keys), then `Combine` merges the spans.
    SplitKeys,
    Combine,
}

/// What the split decode mat-vec does to x as it reads it (matmul_common.wgsl's X_INPUT):
/// folding the op before it into the mat-vec saves that op's dispatch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum XInput {
    /// x as it is.
    Plain = 0,
    /// RMSNorm(x) * weight: the norm before q/k/v, gate/up and the head.
    Normed = 1,
    /// silu(x) * up: the SwiGLU before the down projection.
    SwiGlu = 2,
}

/// Thread layouts of the expert-grouped prefill kernel (moe.wgsl).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GroupedLayout {
    /// Four expert rows a thread (CPU adapters).
    Rows,
    /// 64 x 64 tiles of (expert rows, tokens) in workgroup memory (GPUs).
    Tiled,
}

/// Every compute pipeline pregate uses, keyed for the pipeline cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Quantized mat-mul over `tokens` tokens (1: the decode mat-vec). `uniform_x` is the
    /// number of vec4s of x bound as a uniform buffer, or 0 for a storage binding.
    /// `split`: the decode mat-vec with MATVEC_TPR threads per row (GPUs).
    Matmul {
        dtype: DType,
        tokens: u32,
        uniform_x: u32,
        split: bool,
        input: XInput,
    },
    /// Prefill mat-mul on GPUs: 64 x 64 tiles of (rows, tokens) in workgroup memory.
    MatmulTiled {
        dtype: DType,
    },
    Embed {
        dtype: DType,
    },
    RmsNorm,
    Rope,
    Attention {
        head_dim: u32,
        variant: AttnVariant,
    },
    SwiGlu,
    SwiGluInto,
    Add,
    Copy,
    CopyU32,
    SigmoidScale,
    /// Expert gate/up rows and the weighted expert down-projection (moe.wgsl).
    /// `split`: MATVEC_TPR threads per row (GPUs).
    MoeRows {
        dtype: DType,
        split: bool,
    },
    MoeDown {
        dtype: DType,
        split: bool,
    },
    MoeRoute,
    /// Prefill, expert-major: list each expert's tokens, run the grouped expert mat-mul,
    /// and sum each token's weighted expert outputs.
    MoeGroup,
    MoeGrouped {
        dtype: DType,
        layout: GroupedLayout,
    },
    MoeCombine,
    /// A carve's recovery correction for tokens running another number of experts.
    MoeRecoverCount,
    Argmax,
    Softmax,
    Nll,
    TopK,
}

impl Kernel {
    pub fn is_split_matvec(&self) -> bool {
        matches!(self, Kernel::Matmul { split: true, .. })
    }

    pub fn label(&self) -> &'static str {
        match self {
            Kernel::Matmul { .. } => "matmul",
            Kernel::MatmulTiled { .. } => "matmul_tiled",
            Kernel::Embed { .. } => "embed",
            Kernel::RmsNorm => "rms_norm",
            Kernel::Rope => "rope",
            Kernel::Attention { .. } => "attention",
            Kernel::SwiGlu => "swiglu",
            Kernel::SwiGluInto => "swiglu_into",
            Kernel::Add => "add",
            Kernel::Copy => "copy",
            Kernel::CopyU32 => "copy_u32",
            Kernel::SigmoidScale => "sigmoid_scale",
            Kernel::MoeRows { .. } => "moe_rows",
            Kernel::MoeDown { .. } => "moe_down",
            Kernel::MoeRoute => "moe_route",
            Kernel::MoeGroup => "moe_group",
            Kernel::MoeGrouped { .. } => "moe_grouped",
            Kernel::MoeCombine => "moe_combine",
            Kernel::MoeRecoverCount => "moe_recover_count",
            Kernel::Argmax => "argmax",
            Kernel::Softmax => "softmax",
            Kernel::Nll => "nll",
            Kernel::TopK => "topk",
        }
    }

    /// Files holding several kernels name each entry point after its kernel.
    pub fn entry_point(&self) -> &'static str {
        match self {
            Kernel::SwiGlu
            | Kernel::SwiGluInto
            | Kernel::Add
            | Kernel::Copy
            | Kernel::CopyU32
            | Kernel::SigmoidScale
            | Kernel::Argmax
            | Kernel::Softmax
            | Kernel::Nll
            | Kernel::TopK => self.label(),
            Kernel::Attention { variant, .. } => match variant {
                AttnVariant::Serial => "serial",
                AttnVariant::Flash => "flash",
                AttnVariant::SplitKeys => "split_keys",
                AttnVariant::Combine => "combine",
            },
            Kernel::Matmul { split: true, .. } => "split",
            Kernel::MoeRows { split: false, .. } => "rows",
            Kernel::MoeRows { split: true, .. } => "rows_split",
            Kernel::MoeDown { split: false, .. } => "down",
            Kernel::MoeDown { split: true, .. } => "down_split",
            Kernel::MoeGroup => "group",
            Kernel::MoeGrouped {
                layout: GroupedLayout::Rows,
                ..
            } => "grouped_rows",
            Kernel::MoeGrouped {
                layout: GroupedLayout::Tiled,
                ..
            } => "grouped_tiled",
            Kernel::MoeCombine => "combine",
            Kernel::MoeRecoverCount => "recover_count",
            _ => "main",
        }
    }

    pub fn source(&self) -> String {
        match *self {
            Kernel::Matmul {
                dtype,
                tokens,
                uniform_x,
                input,
                ..
            } => {
                let body = if tokens == 1 {
                    format!("{CHUNK_DOT}\n{MATVEC}")
                } else {
                    format!("{CHUNK_DOT}\n{MATMUL}")
                };
                let (decl, row0) = if uniform_x > 0 {
                    (
                        format!(
                            "@group(0) @binding(2) var<uniform> x: array<vec4<f32>, {uniform_x}>;"
                        ),
                        "0u",
                    )
                } else {
                    (
                        "@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;".to_string(),
                        "p.x_row0 * p.x_stride / 4u",
                    )
                };
                let body = format!("{MATMUL_COMMON}\n{body}")
                    .replace("{{TB}}", &tokens.to_string())
                    .replace("{{TPR}}", &MATVEC_TPR.to_string())
                    .replace("{{RPT}}", &MATVEC_RPT.to_string())
                    .replace("{{RR}}", &MATMUL_ROWS.to_string())
                    .replace("{{X_DECL}}", &decl)
                    .replace("{{X_ROW0}}", row0)
                    .replace("{{X_INPUT}}", &(input as u32).to_string());
                format!("{QUANT_COMMON}\n{}\n{body}", quant_source(dtype))
            }
            Kernel::MatmulTiled { dtype } => {
                let common = MATMUL_COMMON
                    .replace(
                        "{{X_DECL}}",
                        "@group(0) @binding(2) var<storage, read> x: array<vec4<f32>>;",
                    )
                    .replace("{{X_INPUT}}", "0");
                format!(
                    "{QUANT_COMMON}\n{}\n{common}\n{GEMM_TILE}\n{MATMUL_TILED}",
                    quant_source(dtype)
                )
            }
            Kernel::Embed { dtype } => format!("{QUANT_COMMON}\n{}\n{EMBED}", quant_source(dtype)),
            Kernel::RmsNorm => NORM.to_string(),
            Kernel::Rope => ROPE.to_string(),
            Kernel::Attention { head_dim, .. } => {
                let hd4 = head_dim / 4;
                ATTENTION
                    .replace("{{HD4}}", &hd4.to_string())
                    .replace("{{BKV}}", &flash_keys(hd4).to_string())
            }
            Kernel::SwiGlu
            | Kernel::SwiGluInto
            | Kernel::Add
            | Kernel::Copy
            | Kernel::CopyU32
            | Kernel::SigmoidScale => ELEMENTWISE.to_string(),
            Kernel::MoeRows { dtype, .. }
            | Kernel::MoeDown { dtype, .. }
            | Kernel::MoeGrouped { dtype, .. } => format!(
                "{QUANT_COMMON}\n{}\n{CHUNK_DOT}\n{GEMM_TILE}\n{}",
                quant_source(dtype),
                MOE.replace("{{TPR}}", &MATVEC_TPR.to_string())
                    .replace("{{RPT}}", &MATVEC_RPT.to_string())
            ),
            Kernel::MoeRoute | Kernel::MoeGroup | Kernel::MoeCombine => MOE_ROUTE.to_string(),
            Kernel::MoeRecoverCount => MOE_RECOVER.to_string(),
            Kernel::Argmax | Kernel::Softmax | Kernel::Nll | Kernel::TopK => SAMPLING.to_string(),
        }
    }
}
