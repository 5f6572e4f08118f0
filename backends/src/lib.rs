//! egret's code generators: scheduling a graph into the kernel IR (`schedule`, `kernel`),
//! and lowering it for CPUs through LLVM (`llvm`) and for NVIDIA GPUs through LLVM's NVPTX
//! target (`ptx`). `artifact` writes compiled artifacts.

pub mod artifact;
pub mod kernel;
pub mod llvm;
pub mod ptx;
pub mod remat;
pub mod schedule;
pub mod simt;

/// Errors of scheduling and code generation.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(transparent)]
    Ir(egret_ir::IrError),
    #[error("the backend cannot handle this graph: {0}")]
    Unsupported(String),
    #[error("LLVM: {0}")]
    Llvm(String),
    /// A target (CPU name, GPU architecture) the backend cannot generate code for.
    #[error("{0}")]
    Target(String),
    #[error("cannot write the artifact: {0}")]
    Io(String),
}
