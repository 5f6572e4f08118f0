//! Safetensors reading and writing, Hugging Face layout.
//!
//! Reading memory-maps each file, lets the `safetensors` crate validate the header (offsets,
//! sizes, overflow), and converts F32/F16/BF16 straight from the map into each tensor's f32
//! buffer: one pass, one copy, no intermediate byte buffer. A sharded checkpoint is read
//! through its index's `weight_map`, each shard once.
//!
//! Writing goes to a temporary name in the target's directory and is renamed into place only
//! once complete and synced, so an interrupted save never leaves a half-written checkpoint
//! under the real name.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use ::safetensors::tensor::TensorView;
use ::safetensors::{Dtype, SafeTensorError, SafeTensors, View};
use half::{bf16, f16};
use memmap2::Mmap;
use serde::Deserialize;

use super::Weights;
use crate::error::{Result, RuntimeError};
use crate::tensor::HostTensor;

/// The single-file checkpoint of a Hugging Face directory.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded Hugging Face checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The element type [`save_safetensors`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveDType {
    F32,
    BF16,
    F16,
}

impl SaveDType {
    fn dtype(self) -> Dtype {
        match self {
            SaveDType::F32 => Dtype::F32,
            SaveDType::BF16 => Dtype::BF16,
            SaveDType::F16 => Dtype::F16,
        }
    }

    fn size(self) -> usize {
        match self {
            SaveDType::F32 => 4,
            SaveDType::BF16 | SaveDType::F16 => 2,
        }
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> RuntimeError + '_ {
    move |source| RuntimeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Loads one `.safetensors` file (F32, F16 or BF16 tensors) as f32.
pub fn load_safetensors_file(path: &Path) -> Result<Weights> {
    let mut weights = Weights::new().with_source(path.display().to_string());
    read_file_into(path, &mut weights, &mut BTreeMap::new())?;
    Ok(weights)
}

/// Reads every tensor of `path` into `weights`; `origin` records which file each name came
/// from, so a name found in two shards is refused.
fn read_file_into(
    path: &Path,
    weights: &mut Weights,
    origin: &mut BTreeMap<String, PathBuf>,
) -> Result<()> {
    let file = File::open(path).map_err(io_error(path))?;
    // SAFETY: a read-only private map; as with every memory-mapped reader we rely on the file
    // not being truncated by another process while it is mapped.
    let mmap = unsafe { Mmap::map(&file) }.map_err(io_error(path))?;
    let st = SafeTensors::deserialize(&mmap).map_err(|e| RuntimeError::Safetensors {
        path: path.to_path_buf(),
        reason: describe(&e),
    })?;
    for (name, view) in st.iter() {
        let t = to_f32(path, name, &view)?;
        if let Some(first) = origin.insert(name.to_string(), path.to_path_buf()) {
            return Err(RuntimeError::Safetensors {
                path: path.to_path_buf(),
                reason: format!("tensor `{name}` is also in {}", first.display()),
            });
        }
        weights.insert(name.to_string(), t);
    }
    Ok(())
}

/// The crate's message, with what the reader can do about the common cases.
fn describe(e: &SafeTensorError) -> String {
    match e {
        SafeTensorError::HeaderTooSmall | SafeTensorError::InvalidHeaderLength => {
            format!("{e}: the file is truncated or not a safetensors file")
        }
        SafeTensorError::MetadataIncompleteBuffer => {
            format!("{e}: the file's size does not match its header (truncated or padded?)")
        }
        _ => e.to_string(),
    }
}

/// Converts one tensor view (bytes in the map) to f32 in a single pass.
fn to_f32(path: &Path, name: &str, view: &TensorView<'_>) -> Result<HostTensor> {
    let bytes = view.data();
    let data: Vec<f32> = match view.dtype() {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(RuntimeError::Unsupported {
                path: path.to_path_buf(),
                what: format!("tensor `{name}` has dtype {other:?}; egret loads F32, F16 and BF16"),
            })
        }
    };
    let shape = view.shape().to_vec();
    // The crate has checked that the byte size matches shape × dtype; check the count anyway
    // rather than trust it with `HostTensor::new`'s assertion.
    if shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) != Some(data.len()) {
        return Err(RuntimeError::Safetensors {
            path: path.to_path_buf(),
            reason: format!(
                "tensor `{name}`: shape {shape:?} does not match its {} bytes",
                bytes.len()
            ),
        });
    }
    Ok(HostTensor { shape, data })
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

/// Loads a Hugging Face directory: `model.safetensors` if present, else the shards listed by
/// `model.safetensors.index.json` (each loaded once; every tensor the index names must be in
/// its shard).
pub fn load_safetensors_dir(dir: &Path) -> Result<Weights> {
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        return load_safetensors_file(&single);
    }
    let index_path = dir.join(INDEX_FILE);
    if !index_path.is_file() {
        let source = std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("the directory has neither {SINGLE_FILE} nor {INDEX_FILE}"),
        );
        let path = if dir.is_dir() {
            single
        } else {
            dir.to_path_buf()
        };
        return Err(RuntimeError::Io { path, source });
    }
    let text = std::fs::read_to_string(&index_path).map_err(io_error(&index_path))?;
    let index: ShardIndex = serde_json::from_str(&text).map_err(|e| RuntimeError::Safetensors {
        path: index_path.clone(),
        reason: format!("bad shard index: {e}"),
    })?;

    let shards: BTreeSet<&str> = index.weight_map.values().map(String::as_str).collect();
    let mut weights = Weights::new().with_source(dir.display().to_string());
    let mut origin = BTreeMap::new();
    for shard in &shards {
        let plain = Path::new(shard)
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
        if !plain {
            return Err(RuntimeError::Safetensors {
                path: index_path.clone(),
                reason: format!("shard name `{shard}` is not a plain file name in the directory"),
            });
        }
        read_file_into(&dir.join(shard), &mut weights, &mut origin)?;
    }
    for (name, shard) in &index.weight_map {
        if weights.get(name).is_none() {
            return Err(RuntimeError::MissingTensor {
                name: name.clone(),
                source_desc: format!("{} (listed in {INDEX_FILE})", dir.join(shard).display()),
            });
        }
    }
    Ok(weights)
}

/// One tensor as the `safetensors` crate's writer sees it; converts on demand.
struct SaveView<'a> {
    t: &'a HostTensor,
    dtype: SaveDType,
}

impl View for SaveView<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype.dtype()
    }

    fn shape(&self) -> &[usize] {
        &self.t.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let d = &self.t.data;
        let bytes: Vec<u8> = match self.dtype {
            SaveDType::F32 => d.iter().flat_map(|x| x.to_le_bytes()).collect(),
            SaveDType::BF16 => d
                .iter()
                .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
                .collect(),
            SaveDType::F16 => d
                .iter()
                .flat_map(|&x| f16::from_f32(x).to_le_bytes())
                .collect(),
        };
        Cow::Owned(bytes)
    }

    fn data_len(&self) -> usize {
        self.t.data.len() * self.dtype.size()
    }
}

/// Writes `weights` to one safetensors file at `path`, atomically (a temporary name in the
/// same directory, synced, then renamed), converting to `dtype` (round-to-nearest-even for
/// BF16 and F16). The header carries `{"format": "pt"}`, as `transformers` expects.
pub fn save_safetensors(path: &Path, weights: &Weights, dtype: SaveDType) -> Result<()> {
    for (name, t) in weights.iter() {
        if t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) != Some(t.data.len()) {
            return Err(RuntimeError::Invalid(format!(
                "cannot save tensor `{name}`: shape {:?} does not match its {} values",
                t.shape,
                t.data.len()
            )));
        }
    }
    let file_name = path.file_name().ok_or_else(|| {
        RuntimeError::Invalid(format!(
            "cannot save weights to {}: not a file path",
            path.display()
        ))
    })?;
    // Unique per process and per call, so concurrent saves never share a temporary file.
    static NEXT_TMP: AtomicU64 = AtomicU64::new(0);
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}-{}",
        file_name.to_string_lossy(),
        std::process::id(),
        NEXT_TMP.fetch_add(1, Ordering::Relaxed)
    ));
    let write_err = |source| RuntimeError::Write {
        path: path.to_path_buf(),
        source,
    };
    let result = (|| {
        let views = weights
            .iter()
            .map(|(name, t)| (name, SaveView { t, dtype }));
        let info = HashMap::from([("format".to_string(), "pt".to_string())]);
        ::safetensors::serialize_to_file(views, Some(info), &tmp).map_err(|e| match e {
            SafeTensorError::IoError(source) => write_err(source),
            other => RuntimeError::Invalid(format!("cannot save {}: {other}", path.display())),
        })?;
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(write_err)?;
        std::fs::rename(&tmp, path).map_err(write_err)
    })();
    if result.is_err() {
        // Best effort: the error being returned is the one that matters.
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
