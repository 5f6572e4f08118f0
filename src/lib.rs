//! The `egret` facade: resolves what a user names as MODEL (a Hugging Face directory, a GGUF
//! file or a preset), loads its configuration, weights and tokenizer, and runs models on a
//! backend. The CLI in `main.rs` is a thin layer over this.

pub mod cpu;
pub mod gpu;
pub mod interp;
pub mod model;
pub mod train;

pub use interp::InterpModel;
pub use model::{load_config, load_model, load_tokenizer, LoadedModel, ModelSource};

/// Errors of the facade: each wraps the typed error of the layer it came from.
#[derive(Debug, thiserror::Error)]
pub enum EgretError {
    #[error(transparent)]
    Runtime(#[from] egret_runtime::RuntimeError),
    #[error(transparent)]
    Model(#[from] egret_models::ModelError),
    #[error(transparent)]
    Ir(#[from] egret_ir::IrError),
    #[error(transparent)]
    Pass(#[from] egret_passes::PassError),
    #[error("{0}")]
    Usage(String),
}

pub type Result<T, E = EgretError> = std::result::Result<T, E>;
