//! Weight loading: a model's parameters as f32 [`HostTensor`]s keyed by their Hugging Face
//! names, from whichever form the user has — a Hugging Face directory (one or sharded
//! safetensors files), a single `.safetensors` file, or a llama `.gguf` file — and saving them
//! back as safetensors.
//!
//! Every parameter in egret's graphs is named with its Hugging Face checkpoint name, so
//! binding weights to a graph is a lookup here ([`Weights::expect`] checks the shape too).
//! The formats themselves live in `safetensors.rs` (this folder) and
//! [`crate::gguf`].

mod safetensors;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

pub use self::safetensors::{
    load_safetensors_dir, load_safetensors_file, save_safetensors, SaveDType, INDEX_FILE,
    SINGLE_FILE,
};
use crate::error::{Result, RuntimeError};
use crate::gguf::{GgufFile, GGUF_MAGIC};
use crate::tensor::HostTensor;

/// What [`Weights::expect`] names as the source when the weights were built in memory.
const IN_MEMORY_SOURCE: &str = "weights";

/// A model's parameters: name → f32 tensor, in name order.
#[derive(Clone, Debug)]
pub struct Weights {
    tensors: BTreeMap<String, HostTensor>,
    /// Where they came from (a path), for error messages.
    source: String,
}

impl Default for Weights {
    fn default() -> Self {
        Self::new()
    }
}

impl Weights {
    pub fn new() -> Self {
        Weights {
            tensors: BTreeMap::new(),
            source: IN_MEMORY_SOURCE.to_string(),
        }
    }

    /// Names where these weights came from (a path), for error messages.
    pub fn with_source(mut self, source: impl Into<String>) -> Self {
        self.source = source.into();
        self
    }

    /// Where these weights came from (a path, or `weights` when built in memory).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Adds or replaces the tensor called `name`.
    pub fn insert(&mut self, name: String, t: HostTensor) {
        self.tensors.insert(name, t);
    }

    pub fn get(&self, name: &str) -> Option<&HostTensor> {
        self.tensors.get(name)
    }

    /// Removes and returns the tensor called `name`.
    pub fn take(&mut self, name: &str) -> Option<HostTensor> {
        self.tensors.remove(name)
    }

    /// Names in sorted order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// (name, tensor) pairs in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &HostTensor)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The tensor called `name`, which must have shape `shape`; otherwise
    /// [`RuntimeError::MissingTensor`] or [`RuntimeError::ShapeMismatch`].
    pub fn expect(&self, name: &str, shape: &[usize]) -> Result<&HostTensor> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| RuntimeError::MissingTensor {
                name: name.to_string(),
                source_desc: self.source.clone(),
            })?;
        if t.shape != shape {
            return Err(RuntimeError::ShapeMismatch {
                name: name.to_string(),
                got: t.shape.clone(),
                expected: shape.to_vec(),
            });
        }
        Ok(t)
    }
}

impl IntoIterator for Weights {
    type Item = (String, HostTensor);
    type IntoIter = std::collections::btree_map::IntoIter<String, HostTensor>;
    fn into_iter(self) -> Self::IntoIter {
        self.tensors.into_iter()
    }
}

/// Loads a Hugging Face directory (`model.safetensors`, or sharded
/// `model-0000k-of-0000n.safetensors` listed by `model.safetensors.index.json`), a single
/// `.safetensors` file, or a `.gguf` file (llama architecture, under Hugging Face names).
/// A file with neither extension is recognised by its first bytes.
pub fn load(path: &Path) -> Result<Weights> {
    let io_err = |source| RuntimeError::Io {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io_err)?;
    if meta.is_dir() {
        return load_safetensors_dir(path);
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let is_gguf = match ext.as_deref() {
        Some("gguf") => true,
        Some("safetensors") => false,
        _ => {
            let mut magic = [0u8; 4];
            let mut f = File::open(path).map_err(io_err)?;
            // A file shorter than the magic is not GGUF; the safetensors reader says why.
            f.read_exact(&mut magic).is_ok() && magic == GGUF_MAGIC
        }
    };
    if is_gguf {
        GgufFile::open(path)?.load_weights()
    } else {
        load_safetensors_file(path)
    }
}
