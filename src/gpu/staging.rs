//! A ring of host-mapped staging buffers for uploads that must be ordered with compute:
//! the host writes into a mapped buffer, unmaps it, and records a copy into the step's
//! encoder, so the copy runs exactly where the encoder puts it (before the kernels that
//! read the destination) without a queue-wide write. After the submit, each used buffer is
//! mapped again in the background; it is free once its map callback has run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::arena::GpuBuffer;
use super::context::Gpu;
use crate::error::{Error, Result};

pub struct StagingRing {
    buffers: Vec<GpuBuffer>,
    /// Mapped and not in use.
    ready: Vec<Arc<AtomicBool>>,
    /// Copies recorded into an encoder that has not been submitted yet.
    recorded: Vec<usize>,
}

impl StagingRing {
    /// `count` buffers of `bytes` each, charged to the arena.
    pub fn new(gpu: &Gpu, count: usize, bytes: u64) -> Result<StagingRing> {
        let mut buffers = Vec::with_capacity(count);
        for _ in 0..count {
            buffers.push(gpu.staging("expert staging", bytes)?);
        }
        Ok(StagingRing {
            ready: (0..count)
                .map(|_| Arc::new(AtomicBool::new(true)))
                .collect(),
            buffers,
            recorded: Vec::new(),
        })
    }

    /// Writes `parts` into a free buffer and records a copy of part i to `dsts[i]`
    /// (buffer, byte offset) into `enc`. Returns false, doing nothing, when every buffer is
    /// busy (the caller then submits what it has encoded and waits for one).
    pub fn upload(
        &mut self,
        enc: &mut wgpu::CommandEncoder,
        parts: &[&[u8]],
        dsts: &[(&wgpu::Buffer, u64)],
    ) -> Result<bool> {
        let total: u64 = parts.iter().map(|p| p.len() as u64).sum();
        let Some(i) = (0..self.buffers.len())
            .find(|i| self.ready[*i].load(Ordering::Acquire) && self.buffers[*i].size() >= total)
        else {
            return Ok(false);
        };
        let buf = &self.buffers[i];
        let mut at = 0u64;
        for part in parts {
            let len = part.len() as u64;
            buf.get_mapped_range_mut(at..at + len)
                .map_err(|e| Error::Gpu(format!("staging map: {e}")))?
                .copy_from_slice(part);
            at += len;
        }
        buf.unmap();
        self.ready[i].store(false, Ordering::Release);
        let mut at = 0u64;
        for (part, (dst, off)) in parts.iter().zip(dsts) {
            enc.copy_buffer_to_buffer(buf, at, dst, *off, part.len() as u64);
            at += part.len() as u64;
        }
        self.recorded.push(i);
        Ok(true)
    }

    /// Call after submitting the encoder that holds the recorded copies: maps those
    /// buffers again, each free once its callback runs (on a later device poll).
    pub fn submitted(&mut self) {
        for i in self.recorded.drain(..) {
            let ready = self.ready[i].clone();
            self.buffers[i].map_async(wgpu::MapMode::Write, .., move |r| {
                ready.store(r.is_ok(), Ordering::Release);
            });
        }
    }
}
