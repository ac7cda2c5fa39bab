//! Weights on the GPU. A [`Matrix`] keeps its raw quant blocks (repacked to u32 alignment),
//! split into row shards when it exceeds the device's largest storage binding (lavapipe
//! allows 128 MiB; a 151936-row lm_head is larger).

use super::arena::GpuBuffer;
use super::context::Gpu;
use crate::error::{Error, Result};
use crate::quant::{repack_for_gpu, DType};

/// Rows `row_start .. row_start + n_rows` of a matrix, in one buffer.
pub struct Shard {
    pub buffer: GpuBuffer,
    pub row_start: u32,
    pub n_rows: u32,
}

/// A `[rows, cols]` weight matrix (row-major: each row is `cols` contiguous elements).
pub struct Matrix {
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub shards: Vec<Shard>,
}

impl Matrix {
    /// Uploads `bytes` (ggml layout) as a `[rows, cols]` matrix, sharded to fit the
    /// device's largest storage binding.
    pub fn upload(
        gpu: &Gpu,
        name: &str,
        dtype: DType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<Matrix> {
        Self::upload_sharded(gpu, name, dtype, rows, cols, bytes, None)
    }

    /// As [`Matrix::upload`], with at most `max_shard_rows` rows per shard (tests use this to
    /// exercise sharding on small matrices).
    pub fn upload_sharded(
        gpu: &Gpu,
        name: &str,
        dtype: DType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
        max_shard_rows: Option<usize>,
    ) -> Result<Matrix> {
        if !cols.is_multiple_of(dtype.gpu_block_len()) {
            return Err(Error::BadTensor {
                tensor: name.into(),
                why: format!(
                    "row length {cols} must be a multiple of {} for {dtype} on the GPU",
                    dtype.gpu_block_len()
                ),
            });
        }
        let row_bytes = dtype.bytes_for(cols as u64).unwrap_or(0) as usize;
        if row_bytes * rows != bytes.len() {
            return Err(Error::BadTensor {
                tensor: name.into(),
                why: format!("{} bytes for {rows}x{cols} {dtype}", bytes.len()),
            });
        }
        let gpu_row_bytes = (cols / dtype.gpu_block_len() * dtype.gpu_block_words() * 4) as u64;
        let mut rows_per_shard = (gpu.max_binding() / gpu_row_bytes).max(1) as usize;
        if let Some(m) = max_shard_rows {
            rows_per_shard = rows_per_shard.min(m.max(1));
        }
        let mut shards = Vec::new();
        let mut r0 = 0;
        while r0 < rows {
            let n = rows_per_shard.min(rows - r0);
            let words = repack_for_gpu(dtype, &bytes[r0 * row_bytes..(r0 + n) * row_bytes]);
            let buffer = gpu.storage_init(name, bytemuck::cast_slice(&words))?;
            shards.push(Shard {
                buffer,
                row_start: r0 as u32,
                n_rows: n as u32,
            });
            r0 += n;
        }
        Ok(Matrix {
            dtype,
            rows,
            cols,
            shards,
        })
    }

    /// A zero-filled `[rows, cols]` matrix in one buffer (an expert cache pool whose rows
    /// are uploaded later).
    pub fn zeroed(gpu: &Gpu, name: &str, dtype: DType, rows: usize, cols: usize) -> Result<Matrix> {
        if !cols.is_multiple_of(dtype.gpu_block_len()) {
            return Err(Error::BadTensor {
                tensor: name.into(),
                why: format!("row length {cols} is not whole {dtype} blocks"),
            });
        }
        let bytes = (rows * cols / dtype.gpu_block_len() * dtype.gpu_block_words() * 4) as u64;
        if bytes > gpu.max_binding() {
            return Err(Error::BadTensor {
                tensor: name.into(),
                why: "larger than the device's largest storage binding".into(),
            });
        }
        Ok(Matrix {
            dtype,
            rows,
            cols,
            shards: vec![Shard {
                buffer: gpu.storage(name, bytes)?,
                row_start: 0,
                n_rows: rows as u32,
            }],
        })
    }

    pub fn gpu_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.buffer.size()).sum()
    }
}

/// An f32 vector (norm weights, biases).
pub struct Vector {
    pub buffer: GpuBuffer,
    pub len: usize,
}

impl Vector {
    pub fn upload(gpu: &Gpu, name: &str, values: &[f32]) -> Result<Vector> {
        Ok(Vector {
            buffer: gpu.storage_init(name, bytemuck::cast_slice(values))?,
            len: values.len(),
        })
    }
}
