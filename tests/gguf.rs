//! GGUF: a write/read round trip, and every validation error the reader promises.

mod common;

use pregate::format::{GgufFile, GgufWriter, MetaValue};
use pregate::quant::{quantize, DType};
use pregate::Error;

fn sample() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.meta("general.architecture", MetaValue::String("qwen2".into()));
    w.meta("a.u8", MetaValue::U8(7));
    w.meta("a.i8", MetaValue::I8(-7));
    w.meta("a.u16", MetaValue::U16(65535));
    w.meta("a.i16", MetaValue::I16(-300));
    w.meta("a.u32", MetaValue::U32(123456));
    w.meta("a.i32", MetaValue::I32(-123456));
    w.meta("a.u64", MetaValue::U64(1 << 40));
    w.meta("a.i64", MetaValue::I64(-(1 << 40)));
    w.meta("a.f32", MetaValue::F32(0.5));
    w.meta("a.f64", MetaValue::F64(-2.25));
    w.meta("a.bool", MetaValue::Bool(true));
    w.meta(
        "a.strs",
        MetaValue::Array(vec![
            MetaValue::String("x".into()),
            MetaValue::String("yz".into()),
        ]),
    );
    w.meta(
        "a.ints",
        MetaValue::Array(vec![MetaValue::I32(1), MetaValue::I32(-2)]),
    );
    let mut rng = common::Rng::new(9);
    for (i, t) in DType::ALL.iter().enumerate() {
        let n = 256 * (i + 1);
        let data = quantize(*t, &rng.vec(n, 1.0)).expect("quantize");
        w.tensor(&format!("t.{}", t.name()), *t, &[256, (i + 1) as u64], data)
            .expect("tensor");
    }
    w
}

#[test]
fn write_then_read_round_trips_metadata_and_tensors() {
    let dir = common::tmp_dir("gguf-rt");
    let path = dir.join("rt.gguf");
    let w = sample();
    w.write(&path).expect("write");
    let f = GgufFile::open(&path).expect("open");
    assert_eq!(f.version, 3);
    assert_eq!(f.get_str("general.architecture").expect("arch"), "qwen2");
    assert_eq!(f.get("a.i64"), Some(&MetaValue::I64(-(1 << 40))));
    assert_eq!(f.get("a.f64"), Some(&MetaValue::F64(-2.25)));
    assert_eq!(f.get("a.bool"), Some(&MetaValue::Bool(true)));
    assert_eq!(
        f.get("a.strs").and_then(|v| v.as_array()).map(|a| a.len()),
        Some(2)
    );
    assert_eq!(f.get_u64("a.u16").expect("u16"), 65535);
    assert_eq!(f.tensors.len(), DType::ALL.len());
    let mut rng = common::Rng::new(9);
    for (i, t) in DType::ALL.iter().enumerate() {
        let info = f.require(&format!("t.{}", t.name())).expect("tensor");
        assert_eq!(info.dtype, *t);
        assert_eq!(info.dims, vec![256, (i + 1) as u64]);
        assert_eq!(info.offset % 32, 0, "aligned");
        let want = quantize(*t, &rng.vec(256 * (i + 1), 1.0)).expect("quantize");
        assert_eq!(f.bytes(info), &want[..], "{t} bytes");
    }
    // Writing never leaves a temporary file behind.
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .expect("dir")
        .flatten()
        .filter(|e| e.path() != path)
        .collect();
    assert!(leftovers.is_empty());
}

/// Metadata copied from another file (a carve copies the dense model's) may carry that
/// file's `general.alignment`; the writer's own alignment wins, so the copy stays readable.
#[test]
fn a_copied_alignment_key_does_not_break_the_written_file() {
    let dir = common::tmp_dir("gguf-align");
    for (theirs, ours) in [(4096u32, None), (64, Some(4096u64)), (7, Some(64))] {
        let mut w = sample();
        if let Some(a) = ours {
            w = w.with_alignment(a);
        }
        w.meta("general.alignment", MetaValue::U32(theirs));
        let path = dir.join(format!("a{theirs}.gguf"));
        w.write(&path).expect("write");
        let f = GgufFile::open(&path).expect("the copy opens");
        let align = ours.unwrap_or(32);
        assert_eq!(f.alignment, align);
        assert!(f.tensors.iter().all(|t| t.offset % align == 0));
    }
}

/// A valid file's bytes; `tag` keeps parallel tests off each other's files.
fn written(tag: &str) -> Vec<u8> {
    let dir = common::tmp_dir(&format!("gguf-{tag}"));
    let path = dir.join("ok.gguf");
    sample().write(&path).expect("write");
    std::fs::read(&path).expect("read")
}

fn open_bytes(name: &str, bytes: &[u8]) -> Result<GgufFile, Error> {
    let path = common::tmp_dir("gguf-bad").join(name);
    std::fs::write(&path, bytes).expect("write");
    GgufFile::open(&path)
}

/// Offset of the first tensor info's field `after_dims` bytes past its dims.
fn first_tensor_info(bytes: &[u8]) -> usize {
    let name = b"t.F32";
    bytes
        .windows(name.len())
        .position(|w| w == name)
        .expect("tensor name")
        + name.len()
}

#[test]
fn truncated_file_is_a_typed_error() {
    let b = written("1");
    // The last bytes are alignment padding; cut into the data itself.
    for cut in [3, 20, b.len() / 2, b.len() - 64] {
        let err = open_bytes("trunc.gguf", &b[..cut])
            .err()
            .expect("must fail");
        assert!(
            matches!(err, Error::Truncated { .. } | Error::BadMagic(_)),
            "cut {cut}: {err}"
        );
    }
}

#[test]
fn wrong_magic_and_version_are_rejected() {
    let mut b = written("2");
    b[0] = b'X';
    assert!(matches!(
        open_bytes("magic.gguf", &b),
        Err(Error::BadMagic(_))
    ));
    let mut b = written("3");
    b[4..8].copy_from_slice(&99u32.to_le_bytes());
    assert!(matches!(
        open_bytes("ver.gguf", &b),
        Err(Error::BadVersion(99))
    ));
}

#[test]
fn tensor_offset_past_end_names_the_tensor() {
    let mut b = written("4");
    // name, n_dims (u32), 1 dim (u64)... t.F32 has 2 dims: [256, 1]; then type u32, offset u64.
    let at = first_tensor_info(&b) + 4 + 16 + 4;
    b[at..at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let err = open_bytes("off.gguf", &b).err().expect("must fail");
    assert!(err.to_string().contains("t.F32"), "{err}");
    assert!(matches!(err, Error::Truncated { .. }));
}

#[test]
fn misaligned_offset_and_unknown_dtype_are_rejected() {
    let mut b = written("5");
    let at = first_tensor_info(&b) + 4 + 16;
    b[at..at + 4].copy_from_slice(&77u32.to_le_bytes());
    let err = open_bytes("dtype.gguf", &b).err().expect("must fail");
    assert!(matches!(err, Error::UnknownDType { id: 77, .. }), "{err}");
    assert!(err.to_string().contains("t.F32"));
    let mut b = written("6");
    b[at..at + 4].copy_from_slice(&10u32.to_le_bytes()); // Q2_K: known, unsupported
    assert!(matches!(
        open_bytes("q2k.gguf", &b),
        Err(Error::UnsupportedDType { .. })
    ));
    let mut b = written("7");
    b[at + 4..at + 12].copy_from_slice(&3u64.to_le_bytes());
    let err = open_bytes("align.gguf", &b).err().expect("must fail");
    assert!(err.to_string().contains("aligned"), "{err}");
}

#[test]
fn shape_that_is_not_whole_blocks_is_rejected() {
    let mut b = written("8");
    // t.F32 dims are [256, 1]; find t.Q4_K (dims [256, 7]) and make its row length 100.
    let name = b"t.Q4_K";
    let at = b.windows(name.len()).position(|w| w == name).expect("name") + name.len() + 4;
    b[at..at + 8].copy_from_slice(&100u64.to_le_bytes());
    let err = open_bytes("shape.gguf", &b).err().expect("must fail");
    assert!(err.to_string().contains("t.Q4_K"), "{err}");
}

#[test]
fn missing_file_is_an_open_error() {
    let err = GgufFile::open("/nonexistent/model.gguf")
        .err()
        .expect("must fail");
    assert!(matches!(err, Error::Open { .. }));
}
