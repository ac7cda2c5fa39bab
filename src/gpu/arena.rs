//! Byte accounting for every GPU allocation: current, peak, and an optional budget.

use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::error::{Error, Result};

#[derive(Debug, Default)]
pub struct Arena {
    current: AtomicU64,
    peak: AtomicU64,
    budget: Option<u64>,
}

impl Arena {
    pub fn new(budget: Option<u64>) -> Arena {
        Arena {
            budget,
            ..Default::default()
        }
    }

    /// Charges `bytes` for `what`, failing if that would exceed the budget.
    pub fn charge(&self, bytes: u64, what: &str) -> Result<()> {
        let now = self.current.fetch_add(bytes, Ordering::SeqCst) + bytes;
        if let Some(b) = self.budget {
            if now > b {
                self.current.fetch_sub(bytes, Ordering::SeqCst);
                return Err(Error::InvalidArgument(format!(
                    "VRAM budget of {b} bytes exceeded: {what} needs {bytes} more bytes ({} already charged)",
                    now - bytes
                )));
            }
        }
        self.peak.fetch_max(now, Ordering::SeqCst);
        Ok(())
    }

    pub fn release(&self, bytes: u64) {
        self.current.fetch_sub(bytes, Ordering::SeqCst);
    }

    pub fn current(&self) -> u64 {
        self.current.load(Ordering::SeqCst)
    }

    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::SeqCst)
    }

    pub fn budget(&self) -> Option<u64> {
        self.budget
    }
}

/// A wgpu buffer whose bytes are charged to an [`Arena`] for as long as it lives.
#[derive(Debug)]
pub struct GpuBuffer {
    buffer: wgpu::Buffer,
    arena: Arc<Arena>,
}

impl GpuBuffer {
    pub(crate) fn new(buffer: wgpu::Buffer, arena: Arc<Arena>) -> GpuBuffer {
        GpuBuffer { buffer, arena }
    }
}

impl Deref for GpuBuffer {
    type Target = wgpu::Buffer;
    fn deref(&self) -> &wgpu::Buffer {
        &self.buffer
    }
}

impl Drop for GpuBuffer {
    fn drop(&mut self) {
        self.arena.release(self.buffer.size());
    }
}
