//! The 256-element K-quant super-blocks: Q4_K, Q5_K and Q6_K (llama.cpp layouts).
//!
//! Quantization here is a simple min/max fit rather than llama.cpp's iterative search: it is
//! used to write test models and carved experts, where a valid block matters more than the
//! last 0.1% of error.

use half::f16;

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// The 6-bit scale and min of sub-block `j` from the 12 packed scale bytes.
pub fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q4_K block: d, dmin (f16), scales[12], qs[128].
pub fn dequant_q4_k(src: &[u8], dst: &mut [f32]) {
    for (blk, y) in src.chunks_exact(144).zip(dst.chunks_exact_mut(256)) {
        let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
        let scales = &blk[4..16];
        let qs = &blk[16..144];
        for pair in 0..4 {
            let (s1, m1) = scale_min_k4(2 * pair, scales);
            let (s2, m2) = scale_min_k4(2 * pair + 1, scales);
            let q = &qs[32 * pair..32 * pair + 32];
            for l in 0..32 {
                y[64 * pair + l] = d * s1 as f32 * (q[l] & 0xF) as f32 - dmin * m1 as f32;
                y[64 * pair + 32 + l] = d * s2 as f32 * (q[l] >> 4) as f32 - dmin * m2 as f32;
            }
        }
    }
}

/// Q5_K block: d, dmin (f16), scales[12], qh[32], qs[128].
pub fn dequant_q5_k(src: &[u8], dst: &mut [f32]) {
    for (blk, y) in src.chunks_exact(176).zip(dst.chunks_exact_mut(256)) {
        let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
        let scales = &blk[4..16];
        let qh = &blk[16..48];
        let qs = &blk[48..176];
        for pair in 0..4 {
            let (s1, m1) = scale_min_k4(2 * pair, scales);
            let (s2, m2) = scale_min_k4(2 * pair + 1, scales);
            let q = &qs[32 * pair..32 * pair + 32];
            let (u1, u2) = (1u8 << (2 * pair), 2u8 << (2 * pair));
            for l in 0..32 {
                let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                y[64 * pair + l] = d * s1 as f32 * ((q[l] & 0xF) + h1) as f32 - dmin * m1 as f32;
                y[64 * pair + 32 + l] =
                    d * s2 as f32 * ((q[l] >> 4) + h2) as f32 - dmin * m2 as f32;
            }
        }
    }
}

/// Q6_K block: ql[128], qh[64], scales[16] (i8), d (f16).
pub fn dequant_q6_k(src: &[u8], dst: &mut [f32]) {
    for (blk, y) in src.chunks_exact(210).zip(dst.chunks_exact_mut(256)) {
        let d = f16_at(blk, 208);
        for n in 0..2 {
            let ql = &blk[64 * n..];
            let qh = &blk[128 + 32 * n..];
            let sc = &blk[192 + 8 * n..];
            let y = &mut y[128 * n..];
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
            }
        }
    }
}

/// Packs eight 6-bit scales and mins into the 12-byte K-quant layout (inverse of scale_min_k4).
fn pack_scales_k4(sc: &[u8; 8], mn: &[u8; 8]) -> [u8; 12] {
    let mut q = [0u8; 12];
    for j in 0..4 {
        q[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        q[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
        q[j + 8] = (sc[j + 4] & 0xF) | ((mn[j + 4] & 0xF) << 4);
    }
    q
}

/// Shared min/max fit for Q4_K (nmax 15) and Q5_K (nmax 31): per 32-element sub-block a scale
/// and a non-negative min offset, both quantized to 6 bits against the super-block's d/dmin.
fn fit_k4(x: &[f32], nmax: f32) -> (f32, f32, [u8; 8], [u8; 8], [u8; 256]) {
    let mut scale = [0f32; 8];
    let mut minv = [0f32; 8];
    for j in 0..8 {
        let s = &x[32 * j..32 * j + 32];
        let mn = s.iter().copied().fold(f32::INFINITY, f32::min).min(0.0);
        let mx = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        scale[j] = (mx - mn) / nmax;
        minv[j] = -mn;
    }
    let max_scale = scale.iter().copied().fold(0f32, f32::max);
    let max_min = minv.iter().copied().fold(0f32, f32::max);
    let d = f16::from_f32(max_scale / 63.0).to_f32();
    let dmin = f16::from_f32(max_min / 63.0).to_f32();
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    let mut q = [0u8; 256];
    for j in 0..8 {
        sc[j] = if d > 0.0 {
            (scale[j] / d).round().clamp(0.0, 63.0) as u8
        } else {
            0
        };
        mn[j] = if dmin > 0.0 {
            (minv[j] / dmin).round().clamp(0.0, 63.0) as u8
        } else {
            0
        };
        let (ds, dm) = (d * sc[j] as f32, dmin * mn[j] as f32);
        for l in 0..32 {
            let v = x[32 * j + l];
            q[32 * j + l] = if ds > 0.0 {
                ((v + dm) / ds).round().clamp(0.0, nmax) as u8
            } else {
                0
            };
        }
    }
    (d, dmin, sc, mn, q)
}

pub fn quant_q4_k(src: &[f32], out: &mut Vec<u8>) {
    for x in src.chunks_exact(256) {
        let (d, dmin, sc, mn, q) = fit_k4(x, 15.0);
        out.extend(f16::from_f32(d).to_le_bytes());
        out.extend(f16::from_f32(dmin).to_le_bytes());
        out.extend(pack_scales_k4(&sc, &mn));
        for pair in 0..4 {
            for l in 0..32 {
                out.push(q[64 * pair + l] | (q[64 * pair + 32 + l] << 4));
            }
        }
    }
}

pub fn quant_q5_k(src: &[f32], out: &mut Vec<u8>) {
    for x in src.chunks_exact(256) {
        let (d, dmin, sc, mn, q) = fit_k4(x, 31.0);
        out.extend(f16::from_f32(d).to_le_bytes());
        out.extend(f16::from_f32(dmin).to_le_bytes());
        out.extend(pack_scales_k4(&sc, &mn));
        let mut qh = [0u8; 32];
        let mut qs = [0u8; 128];
        for pair in 0..4 {
            for l in 0..32 {
                let (a, b) = (q[64 * pair + l], q[64 * pair + 32 + l]);
                qs[32 * pair + l] = (a & 0xF) | ((b & 0xF) << 4);
                qh[l] |= ((a >> 4) << (2 * pair)) | ((b >> 4) << (2 * pair + 1));
            }
        }
        out.extend(qh);
        out.extend(qs);
    }
}

pub fn quant_q6_k(src: &[f32], out: &mut Vec<u8>) {
    for x in src.chunks_exact(256) {
        // One signed scale per 16 elements, then an i8 code for each against d.
        let mut scale = [0f32; 16];
        for (i, s) in scale.iter_mut().enumerate() {
            let sub = &x[16 * i..16 * i + 16];
            let m = sub
                .iter()
                .copied()
                .fold(0f32, |m, v| if v.abs() > m.abs() { v } else { m });
            *s = m / -32.0;
        }
        let max_abs = scale.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = f16::from_f32(max_abs / 127.0).to_f32();
        let mut sc = [0i8; 16];
        let mut q = [0u8; 256];
        for i in 0..16 {
            sc[i] = if d > 0.0 {
                (scale[i] / d).round().clamp(-128.0, 127.0) as i8
            } else {
                0
            };
            let ds = d * sc[i] as f32;
            for l in 0..16 {
                let v = x[16 * i + l];
                let qi = if ds != 0.0 {
                    (v / ds).round().clamp(-32.0, 31.0) as i32
                } else {
                    0
                };
                q[16 * i + l] = (qi + 32) as u8;
            }
        }
        let mut ql = [0u8; 128];
        let mut qh = [0u8; 64];
        for n in 0..2 {
            for l in 0..32 {
                let b = 128 * n;
                let (q1, q2, q3, q4) = (q[b + l], q[b + l + 32], q[b + l + 64], q[b + l + 96]);
                ql[64 * n + l] = (q1 & 0xF) | ((q3 & 0xF) << 4);
                ql[64 * n + l + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4);
                qh[32 * n + l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
            }
        }
        out.extend(ql);
        out.extend(qh);
        out.extend(sc.iter().map(|v| *v as u8));
        out.extend(f16::from_f32(d).to_le_bytes());
    }
}
