//! Writing a GGUF file: metadata with the exact types llama.cpp's loader checks, then the
//! tensors, each produced only when its turn comes so that a model is never whole in memory.

use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};

use super::dequant::GgmlType;
use super::file::{DEFAULT_ALIGNMENT, MAGIC};

/// A metadata value with its GGUF type. llama.cpp refuses a key of the wrong type (a
/// `context_length` written as u64 rather than u32), so the writer never guesses.
#[derive(Debug, Clone)]
#[allow(missing_docs)]
pub enum Meta {
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    F32s(Vec<f32>),
    I32s(Vec<i32>),
}

type Producer<'a> = Box<dyn FnOnce() -> Result<Vec<u8>> + 'a>;

struct Pending<'a> {
    name: String,
    dims: Vec<u64>,
    ggml_type: GgmlType,
    bytes: Producer<'a>,
}

/// A GGUF file being assembled.
#[derive(Default)]
pub struct GgufWriter<'a> {
    metadata: Vec<(String, Meta)>,
    tensors: Vec<Pending<'a>>,
}

impl<'a> GgufWriter<'a> {
    /// An empty file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds metadata `key`.
    pub fn meta(&mut self, key: &str, value: Meta) -> &mut Self {
        self.metadata.push((key.to_string(), value));
        self
    }

    /// Adds tensor `name` of ggml dimensions `dims` (fastest first), whose bytes in
    /// `ggml_type` `bytes` produces when the file is written.
    pub fn tensor(
        &mut self,
        name: &str,
        dims: Vec<u64>,
        ggml_type: GgmlType,
        bytes: impl FnOnce() -> Result<Vec<u8>> + 'a,
    ) -> &mut Self {
        self.tensors.push(Pending {
            name: name.to_string(),
            dims,
            ggml_type,
            bytes: Box::new(bytes),
        });
        self
    }

    /// Writes the file to `path` through a temporary beside it, renamed into place only once
    /// complete, so that a failure leaves no partial file.
    pub fn write(self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("gguf.partial");
        let result = self.write_to(&tmp);
        match result {
            Ok(()) => std::fs::rename(&tmp, path)
                .with_context(|| format!("cannot rename {} into place", tmp.display())),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    fn write_to(self, path: &Path) -> Result<()> {
        let file = std::fs::File::create(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let mut out = BufWriter::new(file);
        let mut at = 0u64;
        let mut put = |out: &mut BufWriter<std::fs::File>, bytes: &[u8]| -> Result<()> {
            at += bytes.len() as u64;
            out.write_all(bytes)
                .with_context(|| format!("cannot write {}", path.display()))
        };
        let mut header = Vec::new();
        header.extend(MAGIC.to_le_bytes());
        header.extend(3u32.to_le_bytes());
        header.extend((self.tensors.len() as u64).to_le_bytes());
        header.extend((self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            string(&mut header, key);
            meta(&mut header, value);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            let len = t.dims.iter().product::<u64>() as usize;
            if !len.is_multiple_of(t.ggml_type.block_size()) {
                bail!(
                    "tensor `{}` has {len} values, not whole {} blocks",
                    t.name,
                    t.ggml_type.name()
                );
            }
            string(&mut header, &t.name);
            header.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                header.extend(d.to_le_bytes());
            }
            header.extend(t.ggml_type.id().to_le_bytes());
            header.extend(offset.to_le_bytes());
            offsets.push(offset);
            offset += (t.ggml_type.bytes_for(len) as u64).next_multiple_of(DEFAULT_ALIGNMENT);
        }
        put(&mut out, &header)?;
        let pad = |at: u64| vec![0u8; (at.next_multiple_of(DEFAULT_ALIGNMENT) - at) as usize];
        put(&mut out, &pad(header.len() as u64))?;
        for t in self.tensors {
            let len = t.dims.iter().product::<u64>() as usize;
            let bytes = (t.bytes)().with_context(|| format!("tensor `{}`", t.name))?;
            if bytes.len() != t.ggml_type.bytes_for(len) {
                bail!(
                    "tensor `{}`: {} bytes produced, {} expected",
                    t.name,
                    bytes.len(),
                    t.ggml_type.bytes_for(len)
                );
            }
            put(&mut out, &bytes)?;
            put(&mut out, &pad(bytes.len() as u64))?;
        }
        out.flush()
            .with_context(|| format!("cannot write {}", path.display()))?;
        out.get_ref()
            .sync_all()
            .with_context(|| format!("cannot sync {}", path.display()))
    }
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn meta(out: &mut Vec<u8>, value: &Meta) {
    let array = |out: &mut Vec<u8>, kind: u32, len: usize| {
        out.extend(9u32.to_le_bytes());
        out.extend(kind.to_le_bytes());
        out.extend((len as u64).to_le_bytes());
    };
    match value {
        Meta::U32(v) => {
            out.extend(4u32.to_le_bytes());
            out.extend(v.to_le_bytes());
        }
        Meta::I32(v) => {
            out.extend(5u32.to_le_bytes());
            out.extend(v.to_le_bytes());
        }
        Meta::F32(v) => {
            out.extend(6u32.to_le_bytes());
            out.extend(v.to_le_bytes());
        }
        Meta::Bool(v) => {
            out.extend(7u32.to_le_bytes());
            out.push(*v as u8);
        }
        Meta::Str(s) => {
            out.extend(8u32.to_le_bytes());
            string(out, s);
        }
        Meta::Strs(v) => {
            array(out, 8, v.len());
            v.iter().for_each(|s| string(out, s));
        }
        Meta::F32s(v) => {
            array(out, 6, v.len());
            v.iter().for_each(|x| out.extend(x.to_le_bytes()));
        }
        Meta::I32s(v) => {
            array(out, 5, v.len());
            v.iter().for_each(|x| out.extend(x.to_le_bytes()));
        }
    }
}
