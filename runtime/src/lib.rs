//! egret's runtime: what a program needs to run a compiled (or interpreted) LLaMA model —
//! weight loading (safetensors, GGUF), tokenizers, sampling and the generation loop.
//!
//! This crate is what users embed, so its dependency tree stays small: it never depends on
//! the compiler crates (`egret-ir`, `egret-passes`, `egret-backends`), LLVM or egg.

pub mod artifact;
pub mod capi;
pub mod cpu;
pub mod error;
pub mod fsutil;
pub mod generate;
pub mod gguf;
pub mod gpu;
pub mod plan;
pub mod pool;
pub mod sampler;
pub mod session;
pub mod tensor;
pub mod tokenizer;
pub mod weights;

pub use artifact::{Artifact, Manifest};
pub use error::{Result, RuntimeError};
pub use session::{GradOut, GradSession, Session, StepOut, TrainSession};
pub use tensor::HostTensor;
