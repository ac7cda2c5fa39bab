//! Times the decode mat-vec kernel for each quant type on a [rows, cols] random matrix.
//! `cargo run --release --example kernel_bench -- [rows] [cols] [iters]`

use std::time::Instant;

use pregate::gpu::ops::{self, Write};
use pregate::gpu::{DispatchBuilder, Gpu, GpuOptions, Matrix};
use pregate::quant::{quantize, DType};

fn main() -> anyhow::Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rows = *args.first().unwrap_or(&4864);
    let cols = *args.get(1).unwrap_or(&1024);
    let iters = *args.get(2).unwrap_or(&50);
    let tokens = *args.get(3).unwrap_or(&1) as u32;
    let gpu = Gpu::new(&GpuOptions::default())?;
    let vals: Vec<f32> = (0..rows * cols)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let x: Vec<f32> = (0..cols * tokens as usize)
        .map(|i| (i % 13) as f32 / 13.0)
        .collect();
    let xb = gpu.storage_init("x", bytemuck::cast_slice(&x))?;
    let yb = gpu.storage("y", (rows * tokens as usize * 4) as u64)?;
    let dummy = gpu.storage("dummy", 16)?;
    let only: Option<String> = std::env::var("ONLY").ok();
    for dtype in [
        DType::Q8_0,
        DType::Q5_0,
        DType::Q4_0,
        DType::Q4K,
        DType::Q5K,
        DType::Q6K,
        DType::F16,
    ] {
        if only.as_deref().is_some_and(|o| o != dtype.name()) {
            continue;
        }
        let bytes = quantize(dtype, &vals)?;
        let m = Matrix::upload(&gpu, "w", dtype, rows, cols, &bytes)?;
        let mut b = DispatchBuilder::new(&gpu);
        ops::matmul(&mut b, &m, &xb, 0, tokens, &yb, None, Write::Store, &dummy);
        let list = b.finish(&gpu)?;
        let run = |n: usize| {
            let mut enc = gpu.device.create_command_encoder(&Default::default());
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                for _ in 0..n {
                    list.encode(&mut pass);
                }
            }
            gpu.queue.submit([enc.finish()]);
            let _ = gpu.device.poll(wgpu::PollType::wait_indefinitely());
        };
        run(2);
        // Best of several batches: shared CPU boxes (lavapipe) are noisy run to run.
        let mut dt = f64::MAX;
        for _ in 0..5 {
            let t0 = Instant::now();
            run(iters);
            dt = dt.min(t0.elapsed().as_secs_f64() / iters as f64);
        }
        println!(
            "{:5} {}x{} x{}: {:8.3} ms  {:6.2} GB/s (quant bytes)",
            dtype.name(),
            rows,
            cols,
            tokens,
            dt * 1e3,
            bytes.len() as f64 / dt / 1e9
        );
    }
    Ok(())
}
