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
                return Err(Error::BudgetExceeded {
                    budget: b,
                    what: what.to_string(),
                    bytes,
                    charged: now - bytes,
                    hint: String::new(),
                });
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

/// Parses a byte size: `192MiB`, `1.5GiB`, `500MB`, `4096` (bytes). `all` means no limit.
pub fn parse_size(s: &str) -> Result<Option<u64>> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("all") {
        return Ok(None);
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| {
        Error::InvalidArgument(format!("'{s}' is not a size (try 192MiB, 1.5GiB or all)"))
    })?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(Error::InvalidArgument(format!(
                "unknown size unit '{other}' in '{s}'"
            )))
        }
    };
    Ok(Some((value * scale).round() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("192MiB").unwrap(), Some(192 << 20));
        assert_eq!(parse_size("1.5GiB").unwrap(), Some(3 << 29));
        assert_eq!(parse_size("500MB").unwrap(), Some(500_000_000));
        assert_eq!(parse_size("4096").unwrap(), Some(4096));
        assert_eq!(parse_size("all").unwrap(), None);
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("MiB").is_err());
    }

    #[test]
    fn arena_refuses_past_the_budget_and_tracks_peak() {
        let a = Arena::new(Some(100));
        a.charge(60, "a").unwrap();
        assert!(a.charge(50, "b").is_err());
        a.release(60);
        a.charge(90, "c").unwrap();
        assert_eq!(a.peak(), 90);
        assert_eq!(a.current(), 90);
    }
}
