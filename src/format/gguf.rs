//! GGUF v3: a memory-mapped reader that validates everything, and a writer.
//!
//! Layout: magic "GGUF", version u32, tensor count u64, kv count u64, the key/value pairs,
//! the tensor infos (name, n_dims, dims[], ggml type, offset), padding to `general.alignment`,
//! then the tensor data. Tensors are handed out as byte ranges of the mapping, never copied.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::quant::DType;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// Sanity bounds so that a corrupt count cannot make us allocate the world.
const MAX_DIMS: u32 = 4;
const MAX_STRING: u64 = 1 << 30;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    fn type_id(&self) -> u32 {
        match self {
            MetaValue::U8(_) => 0,
            MetaValue::I8(_) => 1,
            MetaValue::U16(_) => 2,
            MetaValue::I16(_) => 3,
            MetaValue::U32(_) => 4,
            MetaValue::I32(_) => 5,
            MetaValue::F32(_) => 6,
            MetaValue::Bool(_) => 7,
            MetaValue::String(_) => 8,
            MetaValue::Array(_) => 9,
            MetaValue::U64(_) => 10,
            MetaValue::I64(_) => 11,
            MetaValue::F64(_) => 12,
        }
    }

    /// Any integer type as u64 (negative values are rejected).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v as u64),
            MetaValue::U16(v) => Some(v as u64),
            MetaValue::U32(v) => Some(v as u64),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetaValue::I8(v) => Some(v as i64),
            MetaValue::I16(v) => Some(v as i64),
            MetaValue::I32(v) => Some(v as i64),
            MetaValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v as f64),
            MetaValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A short human-readable rendering (arrays are summarised).
    pub fn display_short(&self) -> String {
        match self {
            MetaValue::String(s) if s.len() > 60 => {
                let cut: String = s.chars().take(57).collect();
                format!("{:?}…", cut)
            }
            MetaValue::String(s) => format!("{s:?}"),
            MetaValue::Array(a) => format!("[{} items]", a.len()),
            MetaValue::F32(v) => format!("{v}"),
            MetaValue::F64(v) => format!("{v}"),
            MetaValue::Bool(b) => format!("{b}"),
            v => v.as_i64().map(|i| i.to_string()).unwrap_or_default(),
        }
    }
}

/// One tensor: where its bytes are in the file and how to read them.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    /// ggml order: `dims[0]` is the contiguous (row) length.
    pub dims: Vec<u64>,
    /// Absolute byte offset in the file.
    pub offset: u64,
    pub n_bytes: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
    /// Row length (contiguous dimension) and number of rows.
    pub fn rows_cols(&self) -> (usize, usize) {
        let cols = self.dims.first().copied().unwrap_or(1) as usize;
        let rows = (self.n_elements() / cols.max(1) as u64) as usize;
        (rows, cols)
    }
}

/// A parsed, validated, memory-mapped GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub alignment: u64,
    pub metadata: BTreeMap<String, MetaValue>,
    /// In file order.
    pub tensors: Vec<TensorInfo>,
    index: BTreeMap<String, usize>,
    mmap: Arc<Mmap>,
    /// The open file, so that reads made long after open can check it still holds them.
    handle: Option<Arc<File>>,
}

/// A bounds-checked cursor over the mapped header.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let end = (self.pos as u64)
            .checked_add(n)
            .filter(|e| *e <= self.buf.len() as u64);
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end as usize];
                self.pos = end as usize;
                Ok(s)
            }
            None => Err(Error::Truncated {
                what: what(),
                need: self.pos as u64 + n,
                have: self.buf.len() as u64,
            }),
        }
    }
    fn arr<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }
    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }
    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.u64(what)?;
        if len > MAX_STRING {
            return Err(Error::Malformed {
                what: what(),
                why: format!("string length {len} is implausible"),
            });
        }
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| Error::Malformed {
            what: what(),
            why: "string is not valid UTF-8".into(),
        })
    }
    fn value(&mut self, ty: u32, what: &dyn Fn() -> String, depth: u32) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.arr::<1>(what)?[0]),
            1 => MetaValue::I8(self.arr::<1>(what)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.arr(what)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.arr(what)?)),
            4 => MetaValue::U32(self.u32(what)?),
            5 => MetaValue::I32(i32::from_le_bytes(self.arr(what)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.arr(what)?)),
            7 => match self.arr::<1>(what)?[0] {
                0 => MetaValue::Bool(false),
                1 => MetaValue::Bool(true),
                b => {
                    return Err(Error::Malformed {
                        what: what(),
                        why: format!("bool byte {b}"),
                    })
                }
            },
            8 => MetaValue::String(self.string(what)?),
            9 if depth == 0 => {
                let elem = self.u32(what)?;
                let n = self.u64(what)?;
                // Each element takes at least one byte: a count beyond the file is corrupt.
                if n > (self.buf.len() - self.pos) as u64 {
                    return Err(Error::Malformed {
                        what: what(),
                        why: format!("array count {n} exceeds the file"),
                    });
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(elem, what, depth + 1)?);
                }
                MetaValue::Array(v)
            }
            10 => MetaValue::U64(self.u64(what)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.arr(what)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.arr(what)?)),
            t => {
                return Err(Error::Malformed {
                    what: what(),
                    why: format!("unknown value type {t}"),
                })
            }
        })
    }
}

impl GgufFile {
    /// Maps and validates a GGUF file.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|source| Error::Open {
            path: path.to_path_buf(),
            cause: source,
        })?;
        // SAFETY: the mapping is read-only. Another process truncating the file while mapped
        // is undefined behaviour we cannot rule out in safe Rust; sizes are checked at open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| Error::Open {
            path: path.to_path_buf(),
            cause: source,
        })?;
        let mut f = Self::parse(path.to_path_buf(), Arc::new(mmap))?;
        f.handle = Some(Arc::new(file));
        Ok(f)
    }

    fn parse(path: PathBuf, mmap: Arc<Mmap>) -> Result<GgufFile> {
        let buf: &[u8] = &mmap;
        let mut c = Cursor { buf, pos: 0 };
        let hdr = || "header".to_string();
        let magic: [u8; 4] = c.arr(&hdr)?;
        if &magic != MAGIC {
            return Err(Error::BadMagic(magic));
        }
        let version = c.u32(&hdr)?;
        if !(2..=3).contains(&version) {
            return Err(Error::BadVersion(version));
        }
        let n_tensors = c.u64(&hdr)?;
        let n_kv = c.u64(&hdr)?;
        // A tensor info or key takes well over 8 bytes; counts past that are corrupt.
        for (n, what) in [(n_tensors, "tensor count"), (n_kv, "metadata count")] {
            if n > buf.len() as u64 / 8 {
                return Err(Error::Malformed {
                    what: what.into(),
                    why: format!("{n} is more than the file could hold"),
                });
            }
        }

        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = c.string(&|| format!("metadata key #{i}"))?;
            let what = || format!("metadata '{key}'");
            let ty = c.u32(&what)?;
            let v = c.value(ty, &what, 0)?;
            metadata.insert(key, v);
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(Error::Malformed {
                        what: "metadata 'general.alignment'".into(),
                        why: "must be a power of two".into(),
                    })
                }
            },
        };

        struct Raw {
            name: String,
            dims: Vec<u64>,
            ty: u32,
            offset: u64,
        }
        let mut raws = Vec::with_capacity(n_tensors as usize);
        for i in 0..n_tensors {
            let name = c.string(&|| format!("tensor info #{i}"))?;
            let what = || format!("tensor '{name}'");
            let n_dims = c.u32(&what)?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(Error::BadTensor {
                    tensor: name,
                    why: format!("{n_dims} dimensions (1..={MAX_DIMS} allowed)"),
                });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64(&what)?);
            }
            let ty = c.u32(&what)?;
            let offset = c.u64(&what)?;
            raws.push(Raw {
                name,
                dims,
                ty,
                offset,
            });
        }
        let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
        let file_len = buf.len() as u64;

        let mut tensors = Vec::with_capacity(raws.len());
        let mut index = BTreeMap::new();
        for r in raws {
            let dtype = DType::from_ggml_id(r.ty, &r.name)?;
            let bad = |why: String| Error::BadTensor {
                tensor: r.name.clone(),
                why,
            };
            let n_el = r
                .dims
                .iter()
                .try_fold(1u64, |a, d| a.checked_mul(*d))
                .ok_or_else(|| bad("element count overflows".into()))?;
            if r.dims[0] % dtype.block_len() as u64 != 0 {
                return Err(bad(format!(
                    "row length {} is not a multiple of the {dtype} block ({})",
                    r.dims[0],
                    dtype.block_len()
                )));
            }
            let n_bytes = dtype
                .bytes_for(n_el)
                .ok_or_else(|| bad("size is not whole blocks".into()))?;
            if r.offset % alignment != 0 {
                return Err(bad(format!(
                    "data offset {} is not aligned to {alignment}",
                    r.offset
                )));
            }
            let start = data_offset
                .checked_add(r.offset)
                .ok_or_else(|| bad("offset overflows".into()))?;
            let end = start
                .checked_add(n_bytes)
                .ok_or_else(|| bad("offset overflows".into()))?;
            if end > file_len {
                return Err(Error::Truncated {
                    what: format!("tensor '{}' ({dtype}, {:?})", r.name, r.dims),
                    need: end,
                    have: file_len,
                });
            }
            if index.insert(r.name.clone(), tensors.len()).is_some() {
                return Err(bad("appears twice".into()));
            }
            tensors.push(TensorInfo {
                name: r.name,
                dtype,
                dims: r.dims,
                offset: start,
                n_bytes,
            });
        }
        Ok(GgufFile {
            path,
            version,
            alignment,
            metadata,
            tensors,
            index,
            mmap,
            handle: None,
        })
    }

    pub fn file_len(&self) -> u64 {
        self.mmap.len() as u64
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|i| &self.tensors[*i])
    }

    pub fn require(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor(name)
            .ok_or_else(|| Error::MissingTensor(name.to_string()))
    }

    /// Bytes `range` of tensor `t`, after checking that the file on disk still holds them:
    /// a file truncated while mapped would otherwise fault (SIGBUS) on first touch. Reads
    /// made long after open (the expert cache's) go through here.
    pub fn bytes_checked(&self, t: &TensorInfo, range: std::ops::Range<u64>) -> Result<&[u8]> {
        let (start, end) = (t.offset + range.start, t.offset + range.end);
        if range.end > t.n_bytes || range.start > range.end {
            return Err(Error::BadTensor {
                tensor: t.name.clone(),
                why: format!("bytes {range:?} are outside its {} bytes", t.n_bytes),
            });
        }
        if let Some(h) = &self.handle {
            let have = h.metadata()?.len();
            if have < end {
                return Err(Error::Truncated {
                    what: format!("tensor '{}' (the file shrank after it was opened)", t.name),
                    need: end,
                    have,
                });
            }
        }
        Ok(&self.mmap[start as usize..end as usize])
    }

    /// The tensor's bytes: a slice of the mapping (bounds were checked at open).
    pub fn bytes(&self, t: &TensorInfo) -> &[u8] {
        &self.mmap[t.offset as usize..(t.offset + t.n_bytes) as usize]
    }

    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.get(key).ok_or_else(|| Error::MissingKey(key.into()))?;
        v.as_str().ok_or_else(|| Error::WrongType {
            key: key.into(),
            expected: "string",
        })
    }

    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.get(key).ok_or_else(|| Error::MissingKey(key.into()))?;
        v.as_u64().ok_or_else(|| Error::WrongType {
            key: key.into(),
            expected: "unsigned integer",
        })
    }

    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let v = self.get(key).ok_or_else(|| Error::MissingKey(key.into()))?;
        v.as_f64().ok_or_else(|| Error::WrongType {
            key: key.into(),
            expected: "number",
        })
    }

    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }
}

/// Builds a GGUF file in memory order and writes it atomically (temporary file, then rename).
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<(String, DType, Vec<u64>, Vec<u8>)>,
    alignment: u64,
}

impl GgufWriter {
    pub fn new() -> Self {
        GgufWriter {
            alignment: DEFAULT_ALIGNMENT,
            ..Default::default()
        }
    }

    /// Sets the data alignment (written as `general.alignment` when not 32).
    pub fn with_alignment(mut self, alignment: u64) -> Self {
        self.alignment = alignment;
        self
    }

    pub fn meta(&mut self, key: &str, v: MetaValue) -> &mut Self {
        self.metadata.retain(|(k, _)| k != key);
        self.metadata.push((key.to_string(), v));
        self
    }

    /// Adds a tensor; `dims` in ggml order, `data` in the dtype's block layout.
    pub fn tensor(&mut self, name: &str, dtype: DType, dims: &[u64], data: Vec<u8>) -> Result<()> {
        let n: u64 = dims.iter().product();
        if dtype.bytes_for(n) != Some(data.len() as u64) {
            return Err(Error::BadTensor {
                tensor: name.into(),
                why: format!("{} bytes do not match {dtype} {dims:?}", data.len()),
            });
        }
        self.tensors
            .push((name.to_string(), dtype, dims.to_vec(), data));
        Ok(())
    }

    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let tmp = path.with_extension(format!(
            "{}.tmp",
            path.extension().and_then(|e| e.to_str()).unwrap_or("gguf")
        ));
        let result = self
            .write_to(&tmp)
            .and_then(|_| std::fs::rename(&tmp, path).map_err(Error::Io));
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    fn write_to(&self, path: &Path) -> Result<()> {
        let f = File::create(path).map_err(|source| Error::Open {
            path: path.to_path_buf(),
            cause: source,
        })?;
        let w = BufWriter::new(f);
        let mut meta = self.metadata.clone();
        // The alignment is the writer's: one copied from another file's metadata would
        // describe a layout this file does not have.
        meta.retain(|(k, _)| k != "general.alignment");
        if self.alignment != DEFAULT_ALIGNMENT {
            meta.push((
                "general.alignment".into(),
                MetaValue::U32(self.alignment as u32),
            ));
        }
        let mut w = Counted { w, pos: 0 };
        w.put(MAGIC)?;
        w.put(&3u32.to_le_bytes())?;
        w.put(&(self.tensors.len() as u64).to_le_bytes())?;
        w.put(&(meta.len() as u64).to_le_bytes())?;
        let mut hdr = Vec::new();
        for (k, v) in &meta {
            write_string(&mut hdr, k);
            hdr.extend(v.type_id().to_le_bytes());
            write_value(&mut hdr, v);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for (name, dtype, dims, data) in &self.tensors {
            write_string(&mut hdr, name);
            hdr.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                hdr.extend(d.to_le_bytes());
            }
            hdr.extend(dtype.ggml_id().to_le_bytes());
            hdr.extend(offset.to_le_bytes());
            offsets.push(offset);
            offset = (offset + data.len() as u64).div_ceil(self.alignment) * self.alignment;
        }
        w.put(&hdr)?;
        let data_start = w.pos.div_ceil(self.alignment) * self.alignment;
        w.pad_to(data_start)?;
        for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
            w.pad_to(data_start + off)?;
            w.put(data)?;
        }
        w.pad_to(w.pos.div_ceil(self.alignment) * self.alignment)?;
        w.w.flush()?;
        w.w.get_ref().sync_all()?;
        Ok(())
    }
}

/// A writer that knows how many bytes it has written (for alignment padding).
struct Counted {
    w: BufWriter<File>,
    pos: u64,
}

impl Counted {
    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.pos += b.len() as u64;
        self.w.write_all(b).map_err(Error::Io)
    }
    fn pad_to(&mut self, at: u64) -> Result<()> {
        let n = at.saturating_sub(self.pos) as usize;
        self.put(&vec![0u8; n])
    }
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn write_value(out: &mut Vec<u8>, v: &MetaValue) {
    match v {
        MetaValue::U8(x) => out.push(*x),
        MetaValue::I8(x) => out.push(*x as u8),
        MetaValue::U16(x) => out.extend(x.to_le_bytes()),
        MetaValue::I16(x) => out.extend(x.to_le_bytes()),
        MetaValue::U32(x) => out.extend(x.to_le_bytes()),
        MetaValue::I32(x) => out.extend(x.to_le_bytes()),
        MetaValue::U64(x) => out.extend(x.to_le_bytes()),
        MetaValue::I64(x) => out.extend(x.to_le_bytes()),
        MetaValue::F32(x) => out.extend(x.to_le_bytes()),
        MetaValue::F64(x) => out.extend(x.to_le_bytes()),
        MetaValue::Bool(b) => out.push(*b as u8),
        MetaValue::String(s) => write_string(out, s),
        MetaValue::Array(a) => {
            let elem = a.first().map(|e| e.type_id()).unwrap_or(4);
            out.extend(elem.to_le_bytes());
            out.extend((a.len() as u64).to_le_bytes());
            for e in a {
                write_value(out, e);
            }
        }
    }
}
