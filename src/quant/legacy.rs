//! The 32-element legacy formats: Q4_0, Q5_0 and Q8_0 (llama.cpp `ggml-quants.c` layouts).

use half::f16;

fn d_of(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Q4_0 block: d (f16), qs[16]; element j is the low nibble of qs[j], j+16 the high nibble.
pub fn dequant_q4_0(src: &[u8], dst: &mut [f32]) {
    for (blk, y) in src.chunks_exact(18).zip(dst.chunks_exact_mut(32)) {
        let d = d_of(blk);
        for j in 0..16 {
            let q = blk[2 + j];
            y[j] = ((q & 0xF) as i32 - 8) as f32 * d;
            y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
        }
    }
}

/// Q5_0 block: d (f16), qh (u32: the fifth bits), qs[16].
pub fn dequant_q5_0(src: &[u8], dst: &mut [f32]) {
    for (blk, y) in src.chunks_exact(22).zip(dst.chunks_exact_mut(32)) {
        let d = d_of(blk);
        let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
        for j in 0..16 {
            let q = blk[6 + j] as u32;
            let h0 = ((qh >> j) << 4) & 0x10;
            let h1 = (qh >> (j + 12)) & 0x10;
            y[j] = (((q & 0xF) | h0) as i32 - 16) as f32 * d;
            y[j + 16] = (((q >> 4) | h1) as i32 - 16) as f32 * d;
        }
    }
}

/// Q8_0 block: d (f16), qs[32] (i8).
pub fn dequant_q8_0(src: &[u8], dst: &mut [f32]) {
    for (blk, y) in src.chunks_exact(34).zip(dst.chunks_exact_mut(32)) {
        let d = d_of(blk);
        for j in 0..32 {
            y[j] = (blk[2 + j] as i8) as f32 * d;
        }
    }
}

/// The signed value of largest magnitude (ggml's choice for the Q4_0/Q5_0 scale sign).
fn signed_absmax(x: &[f32]) -> f32 {
    x.iter()
        .copied()
        .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m })
}

pub fn quant_q4_0(src: &[f32], out: &mut Vec<u8>) {
    for x in src.chunks_exact(32) {
        let d = signed_absmax(x) / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(f16::from_f32(d).to_le_bytes());
        for j in 0..16 {
            let q0 = ((x[j] * id + 8.5) as i32).clamp(0, 15) as u8;
            let q1 = ((x[j + 16] * id + 8.5) as i32).clamp(0, 15) as u8;
            out.push(q0 | (q1 << 4));
        }
    }
}

pub fn quant_q5_0(src: &[f32], out: &mut Vec<u8>) {
    for x in src.chunks_exact(32) {
        let d = signed_absmax(x) / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut qh = 0u32;
        let mut qs = [0u8; 16];
        for j in 0..16 {
            let q0 = ((x[j] * id + 16.5) as i32).clamp(0, 31) as u32;
            let q1 = ((x[j + 16] * id + 16.5) as i32).clamp(0, 31) as u32;
            qs[j] = ((q0 & 0xF) | ((q1 & 0xF) << 4)) as u8;
            qh |= ((q0 & 0x10) >> 4) << j;
            qh |= ((q1 & 0x10) >> 4) << (j + 16);
        }
        out.extend(f16::from_f32(d).to_le_bytes());
        out.extend(qh.to_le_bytes());
        out.extend(qs);
    }
}

pub fn quant_q8_0(src: &[f32], out: &mut Vec<u8>) {
    for x in src.chunks_exact(32) {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(f16::from_f32(d).to_le_bytes());
        out.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
    }
}
