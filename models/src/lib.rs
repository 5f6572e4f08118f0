//! LLaMA-family models in egret's IR: the configuration (from a Hugging Face `config.json`,
//! GGUF metadata or a preset), and the graph builder shared by prefill and decode.
//! Parameters carry their Hugging Face names, so loading weights is a lookup by name.

pub mod config;
pub mod llama;
pub mod presets;

pub use config::{LlamaConfig, RopeScaling};
pub use llama::{build, build_training, GraphKind};

/// Errors in model configuration or construction.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{source_desc}: {msg}")]
    Config { source_desc: String, msg: String },
    #[error("unknown preset `{0}` (known: {known}), and no file or directory of that name", known = presets::NAMES.join(", "))]
    UnknownPreset(String),
    #[error(transparent)]
    Ir(#[from] egret_ir::IrError),
}
