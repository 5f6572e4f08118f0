//! The runtime's typed errors. Each message names the file or value at fault and, where it
//! can, what to do about it; the CLI prints it as one line.

use std::path::PathBuf;

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a valid safetensors file: {reason}", path.display())]
    Safetensors { path: PathBuf, reason: String },
    #[error("{}: not a valid GGUF file: {reason}", path.display())]
    Gguf { path: PathBuf, reason: String },
    #[error("{}: unsupported: {what}", path.display())]
    Unsupported { path: PathBuf, what: String },
    #[error("{source_desc}: missing tensor `{name}`")]
    MissingTensor { name: String, source_desc: String },
    #[error("tensor `{name}` has shape {got:?}, but the model expects {expected:?}")]
    ShapeMismatch {
        name: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("token id {id} is out of range: the vocabulary has {vocab} tokens (ids 0..{vocab})")]
    TokenOutOfRange { id: u64, vocab: usize },
    #[error("{}: not a usable egret artifact: {reason}", path.display())]
    Artifact { path: PathBuf, reason: String },
    #[error("GPU: {0}")]
    Gpu(String),
    #[error("{0}")]
    Invalid(String),
}
