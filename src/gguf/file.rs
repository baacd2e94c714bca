//! Reading a GGUF file: memory-mapped, metadata parsed eagerly, tensors decoded on demand.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use memmap2::Mmap;

use super::dequant::GgmlType;

/// `GGUF` read as a little-endian u32.
pub const MAGIC: u32 = 0x4655_4747;
/// Where `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Any unsigned integer type.
    U64(u64),
    /// Any signed integer type.
    I64(i64),
    /// f32 or f64.
    F64(f64),
    /// A boolean.
    Bool(bool),
    /// A UTF-8 string.
    Str(String),
    /// An array of values of one type.
    Array(Vec<Value>),
}

impl Value {
    /// The value as a non-negative integer, if it is one.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U64(v) => Some(v),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F64(v) => Some(v),
            Value::U64(v) => Some(v as f64),
            Value::I64(v) => Some(v as f64),
            _ => None,
        }
    }

    /// The value as a string, if it is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a boolean, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The value as an array, if it is one.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's record.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Its GGUF name (`blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions, fastest-varying first (ggml's `ne`): a `[out, in]` matrix is `[in, out]`.
    pub dims: Vec<u64>,
    /// Its storage type.
    pub ggml_type: GgmlType,
    /// Byte offset from the start of the data section.
    pub offset: u64,
}

impl TensorInfo {
    /// The number of values.
    pub fn len(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }

    /// Whether it holds no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The shape in PyTorch order (slowest first), as Hugging Face checkpoints write it.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// An open GGUF file.
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    /// The format version (2 or 3).
    pub version: u32,
    metadata: Vec<(String, Value)>,
    kinds: Vec<Kind>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    data_start: usize,
}

impl GgufFile {
    /// Opens and parses `path`; every error names the file and, where it has one, the key or
    /// tensor.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the model is read-only input; a concurrent writer is outside our contract.
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        let parsed = Parser { bytes: &map, at: 0 }
            .header()
            .with_context(|| format!("{}: not a readable GGUF file", path.display()))?;
        let (version, metadata, kinds, tensors, data_start) = parsed;
        let by_name = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        let gguf = Self {
            path: path.to_path_buf(),
            map,
            version,
            metadata,
            kinds,
            tensors,
            by_name,
            data_start,
        };
        gguf.check_bounds()?;
        Ok(gguf)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Metadata in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// The GGUF type of `key`'s value and, for an array, of its items, as gguf-py names them
    /// (`UINT32`, `ARRAY` of `STRING`).
    pub fn value_type(&self, key: &str) -> Option<(&'static str, Option<&'static str>)> {
        let i = self.metadata.iter().position(|(k, _)| k == key)?;
        let (kind, item) = self.kinds[i];
        Some((type_name(kind), item.map(type_name)))
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// `key` as a string; an error naming the file and key if it is absent or not a string.
    pub fn str(&self, key: &str) -> Result<&str> {
        self.get(key)
            .and_then(Value::as_str)
            .with_context(|| self.missing(key, "a string"))
    }

    /// `key` as an integer; an error naming the file and key otherwise.
    pub fn u64(&self, key: &str) -> Result<u64> {
        self.get(key)
            .and_then(Value::as_u64)
            .with_context(|| self.missing(key, "an integer"))
    }

    /// `key` as a number; an error naming the file and key otherwise.
    pub fn f64(&self, key: &str) -> Result<f64> {
        self.get(key)
            .and_then(Value::as_f64)
            .with_context(|| self.missing(key, "a number"))
    }

    /// The text of the token whose id metadata key `key` holds (`tokenizer.ggml.bos_token_id`),
    /// if both exist.
    pub fn token_text(&self, key: &str) -> Option<String> {
        let id = self.get(key)?.as_u64()? as usize;
        let tokens = self.get("tokenizer.ggml.tokens")?.as_array()?;
        tokens.get(id)?.as_str().map(str::to_string)
    }

    fn missing(&self, key: &str, what: &str) -> String {
        match self.get(key) {
            None => format!("{}: metadata key `{key}` is missing", self.path.display()),
            Some(v) => format!(
                "{}: metadata key `{key}` is {v:?}, expected {what}",
                self.path.display()
            ),
        }
    }

    /// Every tensor record, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The record of tensor `name`, if present.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of tensor `name` in its storage type.
    pub fn raw(&self, info: &TensorInfo) -> &[u8] {
        let start = self.data_start + info.offset as usize;
        let len = info.ggml_type.bytes_for(info.len());
        &self.map[start..start + len]
    }

    /// Tensor `name` decoded to f32, in file order (fastest dimension first). Non-finite values
    /// are refused, as for safetensors checkpoints.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let info = self.tensor(name).with_context(|| {
            format!(
                "{}: tensor `{name}` is missing from the file",
                self.path.display()
            )
        })?;
        let values = info.ggml_type.dequantize(self.raw(info), info.len());
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            bail!(
                "{}: tensor `{name}` holds a non-finite value ({}) at index {i}",
                self.path.display(),
                values[i]
            );
        }
        Ok(values)
    }

    fn check_bounds(&self) -> Result<()> {
        for t in &self.tensors {
            let end = self.data_start as u64 + t.offset + t.ggml_type.bytes_for(t.len()) as u64;
            if end > self.map.len() as u64 {
                bail!(
                    "{}: tensor `{}` ends at byte {end}, past the end of the file ({} bytes); the file is truncated",
                    self.path.display(),
                    t.name,
                    self.map.len()
                );
            }
            if !t.len().is_multiple_of(t.ggml_type.block_size()) {
                bail!(
                    "{}: tensor `{}` has {} values, not a whole number of {:?} blocks",
                    self.path.display(),
                    t.name,
                    t.len(),
                    t.ggml_type
                );
            }
        }
        Ok(())
    }
}

type Header = (u32, Vec<(String, Value)>, Vec<Kind>, Vec<TensorInfo>, usize);

/// A value's GGUF type id, and its items' for an array.
type Kind = (u32, Option<u32>);

/// gguf-py's name of GGUF value type `id` (`GGUFValueType`).
pub fn type_name(id: u32) -> &'static str {
    const NAMES: [&str; 13] = [
        "UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32", "BOOL", "STRING",
        "ARRAY", "UINT64", "INT64", "FLOAT64",
    ];
    NAMES.get(id as usize).copied().unwrap_or("UNKNOWN")
}

struct Parser<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            bail!("unexpected end of file at byte {}", self.at);
        };
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn peek(&self, n: usize) -> Result<&[u8]> {
        self.bytes
            .get(self.at..self.at + n)
            .with_context(|| format!("unexpected end of file at byte {}", self.at))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into()?))
    }

    fn string(&mut self) -> Result<String> {
        let len = self.u64()? as usize;
        let at = self.at;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec())
            .with_context(|| format!("string at byte {at} is not UTF-8"))
    }

    fn header(mut self) -> Result<Header> {
        if self.u32()? != MAGIC {
            bail!("it does not start with `GGUF`");
        }
        let version = self.u32()?;
        if !(2..=3).contains(&version) {
            bail!("GGUF version {version} is not supported (2 and 3 are)");
        }
        let n_tensors = self.u64()?;
        let n_kv = self.u64()?;
        let mut metadata = Vec::new();
        let mut kinds = Vec::new();
        for _ in 0..n_kv {
            let key = self.string()?;
            let kind = self.u32()?;
            let item = match kind {
                9 => Some(u32::from_le_bytes(self.peek(4)?.try_into()?)),
                _ => None,
            };
            kinds.push((kind, item));
            let value = self
                .value(kind)
                .with_context(|| format!("metadata key `{key}`"))?;
            metadata.push((key, value));
        }
        let mut tensors = Vec::new();
        for _ in 0..n_tensors {
            let name = self.string()?;
            let n_dims = self.u32()?;
            if n_dims > 4 {
                bail!("tensor `{name}` has {n_dims} dimensions (at most 4)");
            }
            let dims = (0..n_dims).map(|_| self.u64()).collect::<Result<_>>()?;
            let type_id = self.u32()?;
            let ggml_type =
                GgmlType::from_id(type_id).with_context(|| format!("tensor `{name}`"))?;
            let offset = self.u64()?;
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let alignment = metadata
            .iter()
            .find(|(k, _)| k == "general.alignment")
            .and_then(|(_, v)| v.as_u64())
            .unwrap_or(DEFAULT_ALIGNMENT);
        if alignment == 0 {
            bail!("metadata key `general.alignment` is 0");
        }
        let data_start = (self.at as u64).div_ceil(alignment) * alignment;
        Ok((version, metadata, kinds, tensors, data_start as usize))
    }

    fn value(&mut self, kind: u32) -> Result<Value> {
        Ok(match kind {
            0 => Value::U64(self.take(1)?[0] as u64),
            1 => Value::I64(self.take(1)?[0] as i8 as i64),
            2 => Value::U64(u16::from_le_bytes(self.take(2)?.try_into()?) as u64),
            3 => Value::I64(i16::from_le_bytes(self.take(2)?.try_into()?) as i64),
            4 => Value::U64(self.u32()? as u64),
            5 => Value::I64(i32::from_le_bytes(self.take(4)?.try_into()?) as i64),
            6 => Value::F64(f32::from_le_bytes(self.take(4)?.try_into()?) as f64),
            7 => Value::Bool(self.take(1)?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                let inner = self.u32()?;
                let len = self.u64()?;
                if len > (self.bytes.len() - self.at) as u64 {
                    bail!("array of {len} values is longer than the file");
                }
                let values = (0..len).map(|_| self.value(inner)).collect::<Result<_>>()?;
                Value::Array(values)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.take(8)?.try_into()?)),
            12 => Value::F64(f64::from_le_bytes(self.take(8)?.try_into()?)),
            other => bail!("unknown value type {other}"),
        })
    }
}
