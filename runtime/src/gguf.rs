//! GGUF (v2/v3, little-endian) reader: header, metadata, tensor directory, and tensors
//! dequantised to f32 under their Hugging Face names.
//!
//! Why it is written this way:
//! - The file is memory-mapped and every tensor is dequantised straight from the map into its
//!   f32 buffer, so loading costs one pass over the bytes and one allocation per tensor.
//! - Everything read from the file is untrusted. Every length and count is checked against
//!   the bytes that remain before anything is allocated, every offset with checked arithmetic,
//!   and every tensor's byte range against the file's size in [`GgufFile::open`], so a corrupt
//!   or crafted file gives a [`RuntimeError::Gguf`] naming what is wrong, never a panic or a
//!   huge allocation.
//! - Dequantisation follows ggml's reference `dequantize_row_*` exactly (block layouts below).
//! - llama.cpp's converter stores the Q and K projections with their rows permuted (for
//!   interleaved RoPE); [`GgufFile::load_weights`] undoes that with
//!   [`unpermute_qk_rows`], so the weights match the Hugging Face checkpoint they came from.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;

use crate::error::{Result, RuntimeError};
use crate::tensor::HostTensor;
use crate::weights::Weights;

/// One metadata value of a GGUF file.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
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
    Array(Vec<GgufValue>),
}

impl GgufValue {
    /// The value as an unsigned integer, for any integer type whose value is not negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as f32, for `F32` and `F64` values.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            GgufValue::F32(v) => Some(v),
            GgufValue::F64(v) => Some(v as f32),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The value's GGUF type, as errors name it (`u32`, `string`, `array`, …).
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "u8",
            GgufValue::I8(_) => "i8",
            GgufValue::U16(_) => "u16",
            GgufValue::I16(_) => "i16",
            GgufValue::U32(_) => "u32",
            GgufValue::I32(_) => "i32",
            GgufValue::U64(_) => "u64",
            GgufValue::I64(_) => "i64",
            GgufValue::F32(_) => "f32",
            GgufValue::F64(_) => "f64",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
        }
    }
}

/// GGUF metadata, keyed as in the file (`llama.block_count`, `tokenizer.ggml.tokens`, …).
pub type GgufMetadata = BTreeMap<String, GgufValue>;

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// The GGUF versions this reader understands (v1 used 32-bit counts and is long obsolete).
pub const SUPPORTED_VERSIONS: [u32; 2] = [2, 3];
/// Data-section alignment when `general.alignment` is absent (the GGUF spec's default).
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions (`GGML_MAX_DIMS`).
pub const MAX_TENSOR_DIMS: u32 = 4;
/// Arrays of arrays deeper than this are refused: real files nest at most once, and the
/// bound keeps a crafted file from overflowing the parser's stack.
pub const MAX_ARRAY_NESTING: usize = 8;
/// Magic, version, tensor count and metadata count.
const HEADER_BYTES: usize = 4 + 4 + 8 + 8;
/// The least bytes one metadata entry can occupy: key length, value type, a one-byte value.
const MIN_KV_BYTES: usize = 8 + 4 + 1;
/// The least bytes one tensor-directory entry can occupy: name length, n_dims, type, offset.
const MIN_TENSOR_INFO_BYTES: usize = 8 + 4 + 4 + 8;

/// A tensor's storage type, as ggml numbers them. The ones egret dequantises are named;
/// every other code is kept as `Other` (its name and block size are still known for
/// messages and bounds checks, see [`GgmlType::name`] and [`GgmlType::block_layout`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
    Q4_1,
    Other(u32),
}

/// (ggml code, name, elements per block, bytes per block) of every ggml type, so that files
/// with types egret cannot dequantise still open and have their byte ranges checked.
const GGML_TYPE_TABLE: &[(u32, &str, u64, u64)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 36),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
];

impl GgmlType {
    pub fn from_code(code: u32) -> GgmlType {
        match code {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            other => GgmlType::Other(other),
        }
    }

    pub fn code(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::BF16 => 30,
            GgmlType::Other(code) => code,
        }
    }

    fn table_entry(self) -> Option<&'static (u32, &'static str, u64, u64)> {
        let code = self.code();
        GGML_TYPE_TABLE.iter().find(|e| e.0 == code)
    }

    /// ggml's name for the type (`Q4_1`, `Q6_K`, …), or `None` for a code ggml does not define.
    pub fn name(self) -> Option<&'static str> {
        self.table_entry().map(|e| e.1)
    }

    /// (elements per block, bytes per block), or `None` for a code ggml does not define.
    pub fn block_layout(self) -> Option<(u64, u64)> {
        self.table_entry().map(|e| (e.2, e.3))
    }

    /// Whether [`GgufFile::tensor_f32`] can dequantise this type.
    pub fn is_supported(self) -> bool {
        !matches!(self, GgmlType::Other(_))
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name} (type {})", self.code()),
            None => write!(f, "unknown type {}", self.code()),
        }
    }
}

/// One entry of the tensor directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// Dimensions as in the file: `ne[0]` (the contiguous one) first.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Byte offset of the tensor's data from the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// The shape in row-major (numpy / Hugging Face) order: `dims` reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// The number of elements, or `None` if it overflows.
    pub fn n_elements(&self) -> Option<u64> {
        self.dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
    }

    /// Bytes the tensor's data occupies, or why it cannot be computed. `Ok(None)` for a type
    /// code ggml does not define (its size is unknown).
    fn n_bytes(&self) -> std::result::Result<Option<u64>, String> {
        let Some((block_elems, block_bytes)) = self.ggml_type.block_layout() else {
            return Ok(None);
        };
        let n = self.n_elements().ok_or_else(|| {
            format!(
                "corrupt: tensor `{}` has dimensions {:?}, whose product overflows",
                self.name, self.dims
            )
        })?;
        let ne0 = self.dims.first().copied().unwrap_or(1);
        if ne0 % block_elems != 0 {
            return Err(format!(
                "corrupt: tensor `{}` of type {} has a row length {ne0} that is not a multiple of its block size {block_elems}",
                self.name, self.ggml_type
            ));
        }
        (n / block_elems)
            .checked_mul(block_bytes)
            .map(Some)
            .ok_or_else(|| {
                format!(
                    "corrupt: tensor `{}` has dimensions {:?}, whose byte size overflows",
                    self.name, self.dims
                )
            })
    }
}

/// A memory-mapped GGUF file whose header, metadata and tensor directory have been read and
/// validated.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    version: u32,
    metadata: GgufMetadata,
    tensors: Vec<GgufTensorInfo>,
    alignment: u64,
    data_offset: u64,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

impl GgufFile {
    /// Memory-maps and validates `path`: magic, version, counts, metadata, tensor directory,
    /// alignment (`general.alignment`, default 32) and that every tensor's bytes lie inside
    /// the file.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let io_err = |source| RuntimeError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        // SAFETY: the map is read-only and private to this value. Like every memory-mapped
        // reader, we rely on no other process truncating the file while it is mapped.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io_err)?;
        let parsed = parse(&mmap).map_err(|e| match e {
            ParseError::Corrupt(reason) => RuntimeError::Gguf {
                path: path.to_path_buf(),
                reason,
            },
            ParseError::Unsupported(what) => RuntimeError::Unsupported {
                path: path.to_path_buf(),
                what,
            },
        })?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap,
            version: parsed.version,
            metadata: parsed.metadata,
            tensors: parsed.tensors,
            alignment: parsed.alignment,
            data_offset: parsed.data_offset,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// The data section's alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Byte offset of the data section from the start of the file.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    pub fn metadata(&self) -> &GgufMetadata {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.metadata.get(key)?.as_str()
    }

    /// An integer value of any integer type, widened; `None` if absent, not an integer, or
    /// negative.
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.metadata.get(key)?.as_u64()
    }

    /// An `F32` or `F64` value.
    pub fn get_f32(&self, key: &str) -> Option<f32> {
        self.metadata.get(key)?.as_f32()
    }

    pub fn get_array(&self, key: &str) -> Option<&[GgufValue]> {
        self.metadata.get(key)?.as_array()
    }

    /// `key`'s value read by `read` (`GgufValue::as_u64`, …): `Ok(None)` if the key is
    /// absent, and if it holds something `read` refuses, an error naming the key, its type and
    /// value, and `want` (what it should be). Unlike the `get_*` readers, a value of the wrong
    /// type is not taken for a missing one.
    pub fn typed<'a, T>(
        &'a self,
        key: &str,
        want: &str,
        read: impl Fn(&'a GgufValue) -> Option<T>,
    ) -> std::result::Result<Option<T>, String> {
        let Some(v) = self.metadata.get(key) else {
            return Ok(None);
        };
        match read(v) {
            Some(x) => Ok(Some(x)),
            None => {
                let shown = match v {
                    GgufValue::Array(a) => format!("{} elements", a.len()),
                    GgufValue::String(s) => format!("{:?}", s.chars().take(40).collect::<String>()),
                    other => format!("{other:?}"),
                };
                let t = v.type_name();
                // ("an i32", "an f32", "an array"; "a u32", "a string", "a bool")
                let article = if t.starts_with(['i', 'f', 'a']) {
                    "an"
                } else {
                    "a"
                };
                Err(format!(
                    "GGUF key `{key}` holds {article} {t} ({shown}), not {want}"
                ))
            }
        }
    }

    /// `general.architecture` (`llama`, …).
    pub fn architecture(&self) -> Option<&str> {
        self.get_str("general.architecture")
    }

    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// The directory entry of the tensor called `name` (its GGUF name).
    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    fn corrupt(&self, reason: String) -> RuntimeError {
        RuntimeError::Gguf {
            path: self.path.clone(),
            reason,
        }
    }

    /// Dequantises one tensor to f32; the shape is in row-major (numpy) order, i.e. `dims`
    /// reversed.
    pub fn tensor_f32(&self, info: &GgufTensorInfo) -> Result<HostTensor> {
        if !info.ggml_type.is_supported() {
            return Err(RuntimeError::Unsupported {
                path: self.path.clone(),
                what: format!(
                    "tensor `{}` has ggml type {}; egret dequantises F32, F16, BF16, Q8_0, Q4_0 and Q4_1 \
                     (re-quantise the model to one of those, e.g. with llama.cpp's llama-quantize)",
                    info.name, info.ggml_type
                ),
            });
        }
        // `info` may not come from this file's directory, so check it again (it is cheap).
        let range = tensor_byte_range(info, self.data_offset, self.mmap.len())
            .map_err(|r| self.corrupt(r))?;
        let bytes = self
            .mmap
            .get(range)
            .ok_or_else(|| self.corrupt(format!("tensor `{}` lies outside the file", info.name)))?;
        let n = usize::try_from(info.n_elements().unwrap_or(u64::MAX)).map_err(|_| {
            self.corrupt(format!(
                "tensor `{}` is too large for this machine",
                info.name
            ))
        })?;
        let data = dequantize(info.ggml_type, bytes, n);
        if data.len() != n {
            return Err(self.corrupt(format!(
                "tensor `{}`: {} bytes of {} decode to {} values, not the {n} its dimensions {:?} need",
                info.name,
                bytes.len(),
                info.ggml_type,
                data.len(),
                info.dims
            )));
        }
        let shape = info
            .dims
            .iter()
            .rev()
            .map(|&d| usize::try_from(d))
            .collect::<std::result::Result<Vec<usize>, _>>()
            .map_err(|_| {
                self.corrupt(format!("tensor `{}` has a dimension too large", info.name))
            })?;
        Ok(HostTensor { shape, data })
    }

    /// All tensors of a `llama`-architecture file under Hugging Face names, dequantised to
    /// f32, with the Q/K row permutation that llama.cpp's converter applies undone.
    /// Names without a Hugging Face counterpart (`rope_freqs.weight`, …) keep their GGUF name.
    /// Tied embeddings stay tied: a file without `output.weight` yields no `lm_head.weight`.
    pub fn load_weights(&self) -> Result<Weights> {
        let arch = self.architecture().ok_or_else(|| {
            self.corrupt("metadata `general.architecture` is missing".to_string())
        })?;
        if arch != "llama" {
            return Err(RuntimeError::Unsupported {
                path: self.path.clone(),
                what: format!(
                    "architecture `{arch}`: egret loads GGUF files of architecture `llama`"
                ),
            });
        }
        let head_count_key = format!("{arch}.attention.head_count");
        let head_count_kv_key = format!("{arch}.attention.head_count_kv");
        let n_head = || {
            self.get_u64(&head_count_key).ok_or_else(|| {
                self.corrupt(format!(
                    "metadata `{head_count_key}` is missing or not an integer; it is needed to undo \
                     the Q/K row permutation"
                ))
            })
        };
        let mut weights = Weights::new().with_source(self.path.display().to_string());
        for info in &self.tensors {
            let mut t = self.tensor_f32(info)?;
            let heads = match qk_role(&info.name) {
                Some(QkRole::Q) => Some(n_head()?),
                Some(QkRole::K) => Some(match self.get_u64(&head_count_kv_key) {
                    Some(kv) => kv,
                    None => n_head()?,
                }),
                None => None,
            };
            if let Some(heads) = heads {
                let rows = t.shape.first().copied().unwrap_or(1);
                let cols = if rows == 0 { 0 } else { t.data.len() / rows };
                let heads = usize::try_from(heads).unwrap_or(usize::MAX);
                let splits = heads
                    .checked_mul(2)
                    .is_some_and(|h2| h2 != 0 && rows % h2 == 0);
                if !splits {
                    return Err(self.corrupt(format!(
                        "tensor `{}` has {rows} rows, which do not split into {heads} heads of an \
                         even size; cannot undo the Q/K row permutation",
                        info.name
                    )));
                }
                t.data = unpermute_qk_rows(&t.data, rows, cols, heads);
            }
            let name = hf_name(&info.name);
            if weights.get(&name).is_some() {
                return Err(self.corrupt(format!(
                    "two tensors map to the Hugging Face name `{name}` (the second is `{}`)",
                    info.name
                )));
            }
            weights.insert(name, t);
        }
        Ok(weights)
    }
}

enum QkRole {
    Q,
    K,
}

/// Whether a GGUF tensor is a Q or K projection (weight or bias) stored row-permuted.
fn qk_role(gguf_name: &str) -> Option<QkRole> {
    let (_, rest) = split_block(gguf_name)?;
    match rest {
        "attn_q.weight" | "attn_q.bias" => Some(QkRole::Q),
        "attn_k.weight" | "attn_k.bias" => Some(QkRole::K),
        _ => None,
    }
}

/// `blk.N.rest` → (`N`, `rest`).
fn split_block(name: &str) -> Option<(&str, &str)> {
    let rest = name.strip_prefix("blk.")?;
    let (n, rest) = rest.split_once('.')?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((n, rest))
}

/// The Hugging Face name of a llama GGUF tensor (`blk.3.attn_q.weight` →
/// `model.layers.3.self_attn.q_proj.weight`); names with no counterpart are returned as they
/// are.
pub fn hf_name(gguf_name: &str) -> String {
    let split_suffix = |s: &'_ str| -> Option<(String, &'static str)> {
        if let Some(base) = s.strip_suffix(".weight") {
            Some((base.to_string(), "weight"))
        } else {
            s.strip_suffix(".bias")
                .map(|base| (base.to_string(), "bias"))
        }
    };
    let Some((base, suffix)) = split_suffix(gguf_name) else {
        return gguf_name.to_string();
    };
    let top = match base.as_str() {
        "token_embd" => Some("model.embed_tokens"),
        "output_norm" => Some("model.norm"),
        "output" => Some("lm_head"),
        _ => None,
    };
    if let Some(top) = top {
        return format!("{top}.{suffix}");
    }
    if let Some((n, rest)) = split_block(&base) {
        let part = match rest {
            "attn_norm" => Some("input_layernorm"),
            "ffn_norm" => Some("post_attention_layernorm"),
            "attn_q" => Some("self_attn.q_proj"),
            "attn_k" => Some("self_attn.k_proj"),
            "attn_v" => Some("self_attn.v_proj"),
            "attn_output" => Some("self_attn.o_proj"),
            "ffn_gate" => Some("mlp.gate_proj"),
            "ffn_up" => Some("mlp.up_proj"),
            "ffn_down" => Some("mlp.down_proj"),
            _ => None,
        };
        if let Some(part) = part {
            return format!("model.layers.{n}.{part}.{suffix}");
        }
    }
    gguf_name.to_string()
}

/// llama.cpp's converter permutation of a Q or K projection's rows, as its `permute`:
/// `W' = W.reshape(n_head, 2, rows/n_head/2, cols).swapaxes(1, 2).reshape(rows, cols)`,
/// i.e. `W'[h, i, j] = W[h, j, i]` with `h` the head, `i < rows/n_head/2`, `j < 2`.
/// `w` is row-major `rows × cols`; `rows` must be a multiple of `2 * n_head` (callers check;
/// a violation is a programming error and panics).
pub fn permute_qk_rows(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    assert!(
        n_head > 0 && rows % (2 * n_head) == 0 && w.len() == rows * cols,
        "Q/K permutation of {rows}×{cols} rows into {n_head} heads"
    );
    let half = rows / n_head / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let dst = h * 2 * half + i * 2 + j;
                let src = h * 2 * half + j * half + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// The inverse of [`permute_qk_rows`]:
/// `W = W'.reshape(n_head, rows/n_head/2, 2, cols).swapaxes(1, 2).reshape(rows, cols)`,
/// i.e. `W[h, j, i] = W'[h, i, j]`.
pub fn unpermute_qk_rows(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    assert!(
        n_head > 0 && rows % (2 * n_head) == 0 && w.len() == rows * cols,
        "Q/K permutation of {rows}×{cols} rows into {n_head} heads"
    );
    let half = rows / n_head / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let src = h * 2 * half + i * 2 + j;
                let dst = h * 2 * half + j * half + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Dequantisation (ggml's reference `dequantize_row_*`).

/// Elements per block of Q8_0, Q4_0 and Q4_1 (`QK8_0`, `QK4_0`, `QK4_1`).
const QK: usize = 32;
/// Q8_0 block: f16 scale `d`, then 32 × i8 `q`; `x = d * q`.
const Q8_0_BLOCK_BYTES: usize = 2 + QK;
/// Q4_0 block: f16 `d`, then 16 bytes; element `j` is the low nibble of byte `j`, element
/// `j + 16` the high nibble; `x = d * (q - 8)`.
const Q4_0_BLOCK_BYTES: usize = 2 + QK / 2;
/// Q4_1 block: f16 `d`, f16 `m`, then 16 bytes laid out as Q4_0; `x = d * q + m`.
const Q4_1_BLOCK_BYTES: usize = 2 + 2 + QK / 2;

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Decodes `bytes` (exactly the tensor's bytes) of a supported type into `n` values; returns
/// fewer values only if `bytes` is short, which the caller checks.
fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    match ty {
        GgmlType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        GgmlType::F16 => bytes
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        GgmlType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        GgmlType::Q8_0 => {
            let mut out = vec![0f32; n];
            for (blk, o) in bytes
                .chunks_exact(Q8_0_BLOCK_BYTES)
                .zip(out.chunks_exact_mut(QK))
            {
                let d = f16_at(blk, 0);
                for (y, &q) in o.iter_mut().zip(&blk[2..]) {
                    *y = d * f32::from(q as i8);
                }
            }
            out.truncate(bytes.len() / Q8_0_BLOCK_BYTES * QK);
            out
        }
        GgmlType::Q4_0 => {
            let mut out = vec![0f32; n];
            for (blk, o) in bytes
                .chunks_exact(Q4_0_BLOCK_BYTES)
                .zip(out.chunks_exact_mut(QK))
            {
                let d = f16_at(blk, 0);
                let (lo, hi) = o.split_at_mut(QK / 2);
                for ((&q, l), h) in blk[2..].iter().zip(lo).zip(hi) {
                    *l = d * (f32::from(q & 0x0F) - 8.0);
                    *h = d * (f32::from(q >> 4) - 8.0);
                }
            }
            out.truncate(bytes.len() / Q4_0_BLOCK_BYTES * QK);
            out
        }
        GgmlType::Q4_1 => {
            let mut out = vec![0f32; n];
            for (blk, o) in bytes
                .chunks_exact(Q4_1_BLOCK_BYTES)
                .zip(out.chunks_exact_mut(QK))
            {
                let d = f16_at(blk, 0);
                let m = f16_at(blk, 2);
                let (lo, hi) = o.split_at_mut(QK / 2);
                for ((&q, l), h) in blk[4..].iter().zip(lo).zip(hi) {
                    *l = f32::from(q & 0x0F) * d + m;
                    *h = f32::from(q >> 4) * d + m;
                }
            }
            out.truncate(bytes.len() / Q4_1_BLOCK_BYTES * QK);
            out
        }
        GgmlType::Other(_) => Vec::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing.

enum ParseError {
    Corrupt(String),
    Unsupported(String),
}

impl From<String> for ParseError {
    fn from(s: String) -> Self {
        ParseError::Corrupt(s)
    }
}

struct Parsed {
    version: u32,
    metadata: GgufMetadata,
    tensors: Vec<GgufTensorInfo>,
    alignment: u64,
    data_offset: u64,
}

/// A bounds-checked little-endian cursor. `ctx` names what is being read, for messages.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    ctx: String,
}

type ReadResult<T> = std::result::Result<T, String>;

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> ReadResult<&'a [u8]> {
        match self
            .pos
            .checked_add(n)
            .and_then(|end| self.buf.get(self.pos..end))
        {
            Some(s) => {
                self.pos += n;
                Ok(s)
            }
            None => Err(format!(
                "truncated: {} needs bytes {}..{} but the file has {}",
                self.ctx,
                self.pos,
                self.pos as u128 + n as u128,
                self.buf.len()
            )),
        }
    }

    fn array<const N: usize>(&mut self) -> ReadResult<[u8; N]> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u8(&mut self) -> ReadResult<u8> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> ReadResult<u16> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    fn u32(&mut self) -> ReadResult<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> ReadResult<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A count of items each at least `min_item_bytes` long, refused if they cannot fit in
    /// what remains of the file (so a corrupt count never drives an allocation).
    fn count(&mut self, what: &str, min_item_bytes: usize) -> ReadResult<usize> {
        let n = self.u64()?;
        let fits = (self.remaining() / min_item_bytes.max(1)) as u64;
        if n > fits {
            return Err(format!(
                "truncated or corrupt: {}: {what} count {n} cannot fit in the {} bytes left in the \
                 file (each needs at least {min_item_bytes})",
                self.ctx,
                self.remaining()
            ));
        }
        Ok(n as usize)
    }

    /// A GGUF string: u64 length, then that many bytes.
    fn string_bytes(&mut self) -> ReadResult<&'a [u8]> {
        let n = self.u64()?;
        if n > self.remaining() as u64 {
            return Err(format!(
                "truncated: {}: string of length {n} at byte {} but the file has {}",
                self.ctx,
                self.pos,
                self.buf.len()
            ));
        }
        self.take(n as usize)
    }

    /// A string that must be UTF-8 (keys, tensor names).
    fn utf8_string(&mut self) -> ReadResult<String> {
        let start = self.pos;
        let b = self.string_bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| {
            format!(
                "corrupt: {}: the string at byte {start} is not UTF-8",
                self.ctx
            )
        })
    }
}

/// Metadata value type codes of the GGUF spec.
mod value_type {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// The least bytes one value of type `ty` occupies (for bounding array counts).
fn min_value_bytes(ty: u32) -> usize {
    use value_type::*;
    match ty {
        U8 | I8 | BOOL => 1,
        U16 | I16 => 2,
        U32 | I32 | F32 => 4,
        U64 | I64 | F64 | STRING => 8,
        ARRAY => 4 + 8,
        _ => 1,
    }
}

fn read_value(r: &mut Reader<'_>, ty: u32, depth: usize) -> ReadResult<GgufValue> {
    use value_type::*;
    Ok(match ty {
        U8 => GgufValue::U8(r.u8()?),
        I8 => GgufValue::I8(r.u8()? as i8),
        U16 => GgufValue::U16(r.u16()?),
        I16 => GgufValue::I16(r.u16()? as i16),
        U32 => GgufValue::U32(r.u32()?),
        I32 => GgufValue::I32(r.u32()? as i32),
        F32 => GgufValue::F32(f32::from_bits(r.u32()?)),
        U64 => GgufValue::U64(r.u64()?),
        I64 => GgufValue::I64(r.u64()? as i64),
        F64 => GgufValue::F64(f64::from_bits(r.u64()?)),
        BOOL => match r.u8()? {
            0 => GgufValue::Bool(false),
            1 => GgufValue::Bool(true),
            b => {
                return Err(format!(
                    "corrupt: {}: bool value {b} (must be 0 or 1)",
                    r.ctx
                ))
            }
        },
        // Values may hold arbitrary bytes (some vocabularies do); keep them readable.
        STRING => GgufValue::String(String::from_utf8_lossy(r.string_bytes()?).into_owned()),
        ARRAY => {
            if depth >= MAX_ARRAY_NESTING {
                return Err(format!(
                    "corrupt: {}: arrays nested deeper than {MAX_ARRAY_NESTING} levels",
                    r.ctx
                ));
            }
            let elem_ty = r.u32()?;
            if elem_ty > F64 {
                return Err(format!(
                    "corrupt: {}: unknown array element type {elem_ty}",
                    r.ctx
                ));
            }
            let n = r.count("array element", min_value_bytes(elem_ty))?;
            let mut items = Vec::with_capacity(n);
            for _ in 0..n {
                items.push(read_value(r, elem_ty, depth + 1)?);
            }
            GgufValue::Array(items)
        }
        other => {
            return Err(format!(
                "corrupt: {}: unknown metadata value type {other} (GGUF defines 0..=12)",
                r.ctx
            ))
        }
    })
}

fn parse(buf: &[u8]) -> std::result::Result<Parsed, ParseError> {
    let mut r = Reader {
        buf,
        pos: 0,
        ctx: "the header".to_string(),
    };
    if buf.len() < HEADER_BYTES {
        return Err(ParseError::Corrupt(format!(
            "truncated: the header needs {HEADER_BYTES} bytes but the file has {}",
            buf.len()
        )));
    }
    let magic: [u8; 4] = r.array()?;
    if magic != GGUF_MAGIC {
        return Err(ParseError::Corrupt(format!(
            "bad magic {:?} (a GGUF file starts with \"GGUF\")",
            String::from_utf8_lossy(&magic)
        )));
    }
    let version = r.u32()?;
    if !SUPPORTED_VERSIONS.contains(&version) {
        let hint = if version.swap_bytes() <= 3 {
            " (a big-endian file?)"
        } else {
            ""
        };
        return Err(ParseError::Unsupported(format!(
            "GGUF version {version}{hint}; egret reads versions 2 and 3 (re-convert the model \
             with a current llama.cpp)"
        )));
    }
    r.ctx = "the header's tensor count".to_string();
    let n_tensors_raw = r.u64()?;
    r.ctx = "the header's metadata count".to_string();
    let n_kv = r.count("metadata entry", MIN_KV_BYTES)?;
    // The tensor count is checked once the metadata is read, against the bytes left after it.
    let mut metadata = GgufMetadata::new();
    for i in 0..n_kv {
        r.ctx = format!("metadata entry #{i}");
        let key = r.utf8_string()?;
        r.ctx = format!("metadata entry #{i} (`{key}`)");
        let ty = r.u32()?;
        let value = read_value(&mut r, ty, 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(ParseError::Corrupt(format!(
                "corrupt: metadata key `{key}` appears twice"
            )));
        }
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a.is_power_of_two() => a,
            _ => {
                return Err(ParseError::Corrupt(format!(
                    "corrupt: `general.alignment` is {v:?}; it must be a power of two"
                )))
            }
        },
    };

    let fits = (r.remaining() / MIN_TENSOR_INFO_BYTES) as u64;
    if n_tensors_raw > fits {
        return Err(ParseError::Corrupt(format!(
            "truncated or corrupt: the header's tensor count {n_tensors_raw} cannot fit in the {} \
             bytes left in the file after the metadata (each tensor info needs at least \
             {MIN_TENSOR_INFO_BYTES})",
            r.remaining()
        )));
    }
    let n_tensors = n_tensors_raw as usize;
    let mut tensors = Vec::with_capacity(n_tensors);
    let mut seen = std::collections::HashSet::with_capacity(n_tensors);
    for i in 0..n_tensors {
        r.ctx = format!("tensor info #{i}");
        let name = r.utf8_string()?;
        r.ctx = format!("tensor info #{i} (`{name}`)");
        let n_dims = r.u32()?;
        if n_dims > MAX_TENSOR_DIMS {
            return Err(ParseError::Corrupt(format!(
                "corrupt: tensor `{name}` has {n_dims} dimensions (ggml allows at most {MAX_TENSOR_DIMS})"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let d = r.u64()?;
            if d > i64::MAX as u64 {
                return Err(ParseError::Corrupt(format!(
                    "corrupt: tensor `{name}` has a dimension of {d}"
                )));
            }
            dims.push(d);
        }
        let ggml_type = GgmlType::from_code(r.u32()?);
        let offset = r.u64()?;
        if offset % alignment != 0 {
            return Err(ParseError::Corrupt(format!(
                "corrupt: tensor `{name}` has offset {offset}, not a multiple of the alignment {alignment}"
            )));
        }
        if !seen.insert(name.clone()) {
            return Err(ParseError::Corrupt(format!(
                "corrupt: tensor `{name}` appears twice"
            )));
        }
        tensors.push(GgufTensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        });
    }

    let pos = r.pos as u64;
    let data_offset = pos.div_ceil(alignment) * alignment;
    for info in &tensors {
        tensor_byte_range(info, data_offset, buf.len())?;
    }
    Ok(Parsed {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}

/// The tensor's bytes within a file of `file_len` bytes whose data section starts at
/// `data_offset`, or why they do not lie inside it. For a type of unknown size only the start
/// is checked.
fn tensor_byte_range(
    info: &GgufTensorInfo,
    data_offset: u64,
    file_len: usize,
) -> ReadResult<Range<usize>> {
    let start = data_offset.checked_add(info.offset);
    let size = info.n_bytes()?;
    let end = match (start, size) {
        (Some(s), Some(n)) => s.checked_add(n),
        (Some(s), None) => Some(s),
        (None, _) => None,
    };
    let describe = |v: Option<u64>| v.map_or_else(|| "(overflow)".to_string(), |v| v.to_string());
    match (start, end) {
        (Some(s), Some(e)) if e <= file_len as u64 => Ok(s as usize..e as usize),
        _ => Err(format!(
            "truncated: tensor `{}` needs bytes {}..{} but the file has {}",
            info.name,
            describe(start),
            describe(end),
            file_len
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qk_permutation_inverts() {
        // 2 heads of 6 rows (half = 3), 4 columns: every element distinct.
        let (rows, cols, n_head) = (12, 4, 2);
        let w: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let p = permute_qk_rows(&w, rows, cols, n_head);
        assert_ne!(p, w);
        assert_eq!(unpermute_qk_rows(&p, rows, cols, n_head), w);
        assert_eq!(
            permute_qk_rows(
                &unpermute_qk_rows(&w, rows, cols, n_head),
                rows,
                cols,
                n_head
            ),
            w
        );
    }

    #[test]
    fn qk_permutation_matches_numpy() {
        // W.reshape(1, 2, 2, 1).swapaxes(1, 2).reshape(4, 1) on rows [0, 1, 2, 3] gives
        // rows [0, 2, 1, 3]: each head's two halves are interleaved.
        let w = [0.0, 1.0, 2.0, 3.0];
        assert_eq!(permute_qk_rows(&w, 4, 1, 1), vec![0.0, 2.0, 1.0, 3.0]);
        // Two heads of 4 rows each.
        let w: Vec<f32> = (0..8).map(|i| i as f32).collect();
        assert_eq!(
            permute_qk_rows(&w, 8, 1, 2),
            vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]
        );
    }

    #[test]
    fn names_map_to_hugging_face() {
        for (g, h) in [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output_norm.weight", "model.norm.weight"),
            ("output.weight", "lm_head.weight"),
            (
                "blk.0.attn_norm.weight",
                "model.layers.0.input_layernorm.weight",
            ),
            (
                "blk.12.ffn_norm.weight",
                "model.layers.12.post_attention_layernorm.weight",
            ),
            (
                "blk.1.attn_q.weight",
                "model.layers.1.self_attn.q_proj.weight",
            ),
            ("blk.1.attn_k.bias", "model.layers.1.self_attn.k_proj.bias"),
            (
                "blk.1.attn_v.weight",
                "model.layers.1.self_attn.v_proj.weight",
            ),
            (
                "blk.1.attn_output.weight",
                "model.layers.1.self_attn.o_proj.weight",
            ),
            (
                "blk.2.ffn_gate.weight",
                "model.layers.2.mlp.gate_proj.weight",
            ),
            ("blk.2.ffn_up.weight", "model.layers.2.mlp.up_proj.weight"),
            (
                "blk.2.ffn_down.weight",
                "model.layers.2.mlp.down_proj.weight",
            ),
            ("rope_freqs.weight", "rope_freqs.weight"),
            ("blk.x.attn_q.weight", "blk.x.attn_q.weight"),
            ("blk.3.attn_rot_embd", "blk.3.attn_rot_embd"),
        ] {
            assert_eq!(hf_name(g), h, "{g}");
        }
    }
}
