//! egret's tensor IR: an SSA graph of tensor ops with symbolic shapes, its text format,
//! verifier and reference interpreter. Everything else in egret is checked against the
//! interpreter here, so it is written to be obviously right first and fast second.

pub mod dtype;
pub mod graph;
pub mod infer;
pub mod interp;
pub mod op;
pub mod shape;
pub mod text;
pub mod verify;

pub use dtype::DType;
pub use graph::{Graph, Node, TensorType, ValueId};
pub use interp::{Interpreter, Tensor};
pub use op::{AttnGrad, BinaryOp, CompareOp, Op, ReduceOp, UnaryOp};
pub use shape::{Dim, Shape};
pub use text::{parse, print, ParseError};
pub use verify::verify;

/// Errors of graph construction, verification and interpretation.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum IrError {
    #[error("cannot build {op}: {msg}")]
    Build { op: String, msg: String },
    #[error("invalid graph: {}{msg}", value.map(|v| format!("{v}: ")).unwrap_or_default())]
    Verify { value: Option<ValueId>, msg: String },
    #[error("parse error at {0}")]
    Parse(#[from] ParseError),
    #[error("interpreter: {}{msg}", value.map(|v| format!("{v}: ")).unwrap_or_default())]
    Interp { value: Option<ValueId>, msg: String },
}
