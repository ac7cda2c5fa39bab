//! CPU block formats against vectors from the `gguf` Python package (tests/data/).

use pregate::quant::{dequantize, quantize, DType};

struct Case {
    dtype: DType,
    source: String,
    bytes: Vec<u8>,
    values: Vec<f32>,
    input: Option<Vec<f32>>,
}

fn cases() -> Vec<Case> {
    let text = include_str!("data/quant_vectors.json");
    let v: serde_json::Value = serde_json::from_str(text).expect("vectors parse");
    v.as_array()
        .expect("array")
        .iter()
        .map(|c| {
            let floats = |k: &str| -> Option<Vec<f32>> {
                c.get(k).map(|a| {
                    a.as_array()
                        .expect("floats")
                        .iter()
                        .map(|x| x.as_f64().expect("f") as f32)
                        .collect()
                })
            };
            let hex = c["bytes"].as_str().expect("hex");
            Case {
                dtype: DType::parse(c["type"].as_str().expect("type")).expect("known type"),
                source: c["source"].as_str().expect("source").to_string(),
                bytes: (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
                    .collect(),
                values: floats("values").expect("values"),
                input: floats("input"),
            }
        })
        .collect()
}

#[test]
fn dequantize_matches_gguf_python_for_every_type() {
    let cases = cases();
    for t in DType::ALL {
        assert!(cases.iter().any(|c| c.dtype == t), "no vectors for {t}");
    }
    for c in &cases {
        let mut out = vec![0f32; c.values.len()];
        dequantize(c.dtype, &c.bytes, &mut out).expect("dequantize");
        for (i, (a, b)) in out.iter().zip(&c.values).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                "{} ({}) element {i}: ours {a}, gguf {b}",
                c.dtype,
                c.source
            );
        }
    }
}

#[test]
fn legacy_quantize_matches_gguf_python() {
    for c in cases().iter().filter(|c| c.input.is_some()) {
        let ours = quantize(c.dtype, c.input.as_ref().expect("input")).expect("quantize");
        // Rounding ties may differ in a rare element; the dequantized values must agree.
        let mut a = vec![0f32; c.values.len()];
        dequantize(c.dtype, &ours, &mut a).expect("dequantize");
        let differ = a
            .iter()
            .zip(&c.values)
            .filter(|(x, y)| (*x - *y).abs() > 1e-6)
            .count();
        assert!(
            differ <= 2,
            "{}: {differ} of {} elements differ from gguf's quantize",
            c.dtype,
            a.len()
        );
    }
}

#[test]
fn quantize_round_trip_error_is_bounded() {
    let n = 1024;
    let x: Vec<f32> = (0..n)
        .map(|i| ((i * 7919 % 1013) as f32 / 1013.0 - 0.5) * 2.0)
        .collect();
    for (t, tol) in [
        (DType::F32, 0.0),
        (DType::F16, 1e-3),
        (DType::BF16, 1e-2),
        (DType::Q8_0, 0.01),
        (DType::Q6K, 0.04),
        (DType::Q5_0, 0.07),
        (DType::Q5K, 0.07),
        (DType::Q4_0, 0.14),
        (DType::Q4K, 0.14),
    ] {
        let q = quantize(t, &x).expect("quantize");
        assert_eq!(q.len() as u64, t.bytes_for(n as u64).expect("whole blocks"));
        let mut y = vec![0f32; n];
        dequantize(t, &q, &mut y).expect("dequantize");
        let worst = x
            .iter()
            .zip(&y)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst <= tol, "{t}: max error {worst} > {tol}");
    }
}

#[test]
fn partial_blocks_and_short_input_are_errors() {
    assert!(quantize(DType::Q4K, &[0.0; 100]).is_err());
    let mut out = vec![0f32; 32];
    assert!(dequantize(DType::Q8_0, &[0u8; 10], &mut out).is_err());
}
