//! Plain float formats: F32, F16 and BF16 (one element per "block").

use half::{bf16, f16};

pub fn dequant_f32(src: &[u8], dst: &mut [f32]) {
    for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
        *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
}

pub fn dequant_f16(src: &[u8], dst: &mut [f32]) {
    for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *d = f16::from_le_bytes([c[0], c[1]]).to_f32();
    }
}

pub fn dequant_bf16(src: &[u8], dst: &mut [f32]) {
    for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
        *d = bf16::from_le_bytes([c[0], c[1]]).to_f32();
    }
}

pub fn quant_f32(src: &[f32], out: &mut Vec<u8>) {
    out.extend(src.iter().flat_map(|v| v.to_le_bytes()));
}

pub fn quant_f16(src: &[f32], out: &mut Vec<u8>) {
    out.extend(src.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()));
}

pub fn quant_bf16(src: &[f32], out: &mut Vec<u8>) {
    out.extend(src.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()));
}
