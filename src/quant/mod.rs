//! Block formats: the layout of each ggml tensor type, a CPU reference dequantize and
//! quantize, and the repacking into u32-aligned blocks that the WGSL kernels read.
//!
//! Why our own code rather than a crate: `ggml-quants` 0.1 leaves the K-quants as `todo!()`,
//! and candle-core's `quantized` module drags in all of candle for ~600 lines we need. The
//! code here is small, and `tests/quant_vectors.rs` checks it against vectors produced by the
//! `gguf` Python package (an independent implementation).

mod float;
mod kquant;
mod legacy;

use crate::error::{Error, Result};

/// A ggml tensor type that pregate can read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q5_0,
    Q8_0,
    Q4K,
    Q5K,
    Q6K,
}

/// ggml type ids we recognise but cannot run (named in the error message).
const KNOWN_UNSUPPORTED: &[(u32, &str)] = &[
    (3, "Q4_1"),
    (7, "Q5_1"),
    (9, "Q8_1"),
    (10, "Q2_K"),
    (11, "Q3_K"),
    (15, "Q8_K"),
    (16, "IQ2_XXS"),
    (17, "IQ2_XS"),
    (18, "IQ3_XXS"),
    (19, "IQ1_S"),
    (20, "IQ4_NL"),
    (21, "IQ3_S"),
    (22, "IQ2_S"),
    (23, "IQ4_XS"),
    (24, "I8"),
    (25, "I16"),
    (26, "I32"),
    (27, "I64"),
    (28, "F64"),
    (29, "IQ1_M"),
];

impl DType {
    pub const ALL: [DType; 9] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::Q4_0,
        DType::Q5_0,
        DType::Q8_0,
        DType::Q4K,
        DType::Q5K,
        DType::Q6K,
    ];

    /// The ggml type id stored in GGUF files.
    pub fn ggml_id(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::Q4_0 => 2,
            DType::Q5_0 => 6,
            DType::Q8_0 => 8,
            DType::Q4K => 12,
            DType::Q5K => 13,
            DType::Q6K => 14,
            DType::BF16 => 30,
        }
    }

    /// Maps a ggml type id to a DType, with an error that names the tensor.
    pub fn from_ggml_id(id: u32, tensor: &str) -> Result<DType> {
        if let Some(t) = DType::ALL.iter().find(|t| t.ggml_id() == id) {
            return Ok(*t);
        }
        match KNOWN_UNSUPPORTED.iter().find(|(i, _)| *i == id) {
            Some((_, name)) => Err(Error::UnsupportedDType {
                tensor: tensor.to_string(),
                dtype: name.to_string(),
            }),
            None => Err(Error::UnknownDType {
                tensor: tensor.to_string(),
                id,
            }),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::Q4_0 => "Q4_0",
            DType::Q5_0 => "Q5_0",
            DType::Q8_0 => "Q8_0",
            DType::Q4K => "Q4_K",
            DType::Q5K => "Q5_K",
            DType::Q6K => "Q6_K",
        }
    }

    pub fn parse(name: &str) -> Option<DType> {
        DType::ALL
            .iter()
            .copied()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    /// Elements per block.
    pub fn block_len(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => 1,
            DType::Q4_0 | DType::Q5_0 | DType::Q8_0 => 32,
            DType::Q4K | DType::Q5K | DType::Q6K => 256,
        }
    }

    /// Bytes per block in the GGUF (ggml) layout.
    pub fn block_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q4_0 => 18,
            DType::Q5_0 => 22,
            DType::Q8_0 => 34,
            DType::Q4K => 144,
            DType::Q5K => 176,
            DType::Q6K => 210,
        }
    }

    /// Bytes of `n` elements, or None when `n` is not a whole number of blocks.
    pub fn bytes_for(self, n: u64) -> Option<u64> {
        let bl = self.block_len() as u64;
        n.is_multiple_of(bl)
            .then(|| n / bl * self.block_bytes() as u64)
    }

    /// u32 words per 32-element chunk in the GPU layout (see [`repack_for_gpu`]).
    /// For K-quants this is per 256-element super-block.
    pub fn gpu_block_words(self) -> usize {
        match self {
            DType::F32 => 32,
            DType::F16 | DType::BF16 => 16,
            DType::Q4_0 => 5,
            DType::Q5_0 => 6,
            DType::Q8_0 => 9,
            DType::Q4K => 36,
            DType::Q5K => 44,
            DType::Q6K => 56,
        }
    }

    /// Elements covered by one GPU block (32, or 256 for K-quants).
    pub fn gpu_block_len(self) -> usize {
        self.block_len().max(32)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Dequantizes `src` (whole blocks in ggml layout) into `dst`; `dst.len()` elements are read.
pub fn dequantize(dtype: DType, src: &[u8], dst: &mut [f32]) -> Result<()> {
    let need = dtype.bytes_for(dst.len() as u64).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{} elements is not a whole number of {dtype} blocks",
            dst.len()
        ))
    })? as usize;
    if src.len() < need {
        return Err(Error::InvalidArgument(format!(
            "{dtype}: {} bytes given, {need} needed",
            src.len()
        )));
    }
    let src = &src[..need];
    match dtype {
        DType::F32 => float::dequant_f32(src, dst),
        DType::F16 => float::dequant_f16(src, dst),
        DType::BF16 => float::dequant_bf16(src, dst),
        DType::Q4_0 => legacy::dequant_q4_0(src, dst),
        DType::Q5_0 => legacy::dequant_q5_0(src, dst),
        DType::Q8_0 => legacy::dequant_q8_0(src, dst),
        DType::Q4K => kquant::dequant_q4_k(src, dst),
        DType::Q5K => kquant::dequant_q5_k(src, dst),
        DType::Q6K => kquant::dequant_q6_k(src, dst),
    }
    Ok(())
}

/// Quantizes `src` into ggml layout. `src.len()` must be a multiple of the block length.
pub fn quantize(dtype: DType, src: &[f32]) -> Result<Vec<u8>> {
    let n = dtype.bytes_for(src.len() as u64).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{} elements is not a whole number of {dtype} blocks",
            src.len()
        ))
    })? as usize;
    let mut out = Vec::with_capacity(n);
    match dtype {
        DType::F32 => float::quant_f32(src, &mut out),
        DType::F16 => float::quant_f16(src, &mut out),
        DType::BF16 => float::quant_bf16(src, &mut out),
        DType::Q4_0 => legacy::quant_q4_0(src, &mut out),
        DType::Q5_0 => legacy::quant_q5_0(src, &mut out),
        DType::Q8_0 => legacy::quant_q8_0(src, &mut out),
        DType::Q4K => kquant::quant_q4_k(src, &mut out),
        DType::Q5K => kquant::quant_q5_k(src, &mut out),
        DType::Q6K => kquant::quant_q6_k(src, &mut out),
    }
    debug_assert_eq!(out.len(), n);
    Ok(out)
}

/// Repacks ggml blocks into the u32-aligned layout the WGSL kernels read. Only formats whose
/// block size is not a multiple of 4 bytes change: the f16 scale is widened to a whole word
/// (Q4_0, Q5_0, Q8_0), or Q6_K's 210 bytes are padded to 224 so that its blocks stay
/// 16-byte aligned for vec4 loads. Values are untouched, so this is not a dequantized copy.
pub fn repack_for_gpu(dtype: DType, src: &[u8]) -> Vec<u32> {
    let words = |b: &[u8]| -> Vec<u32> {
        b.chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    match dtype {
        DType::F32 | DType::Q4K | DType::Q5K => words(src),
        // 32 halves = 16 words; a row of F16 is a whole number of 32-element chunks.
        DType::F16 | DType::BF16 => words(src),
        // [d:f16][qs...] -> [d:f16, 0:u16][qs...]
        DType::Q4_0 | DType::Q5_0 | DType::Q8_0 => {
            let bb = dtype.block_bytes();
            let mut out = Vec::with_capacity(src.len() / bb * dtype.gpu_block_words());
            for blk in src.chunks_exact(bb) {
                out.push(u16::from_le_bytes([blk[0], blk[1]]) as u32);
                out.extend(words(&pad_to(&blk[2..], (bb - 2).next_multiple_of(4))));
            }
            out
        }
        // [ql:128][qh:64][scales:16][d:f16] -> same, then zeros to 224 bytes (56 words).
        DType::Q6K => {
            let (bb, gw) = (dtype.block_bytes(), dtype.gpu_block_words());
            let mut out = Vec::with_capacity(src.len() / bb * gw);
            for blk in src.chunks_exact(bb) {
                out.extend(words(&pad_to(blk, gw * 4)));
            }
            out
        }
    }
}

/// `b` followed by zeros up to `len` bytes.
fn pad_to(b: &[u8], len: usize) -> Vec<u8> {
    let mut v = b.to_vec();
    v.resize(len, 0);
    v
}

/// Dot product of a quantized row with `x`, through the reference dequant. For tests and carve.
pub fn dot_row(dtype: DType, row: &[u8], x: &[f32]) -> Result<f32> {
    let mut w = vec![0f32; x.len()];
    dequantize(dtype, row, &mut w)?;
    Ok(w.iter().zip(x).map(|(a, b)| a * b).sum())
}
