//! GGUF (v2/v3) reader: header, metadata, tensor directory, and tensors dequantised to f32
//! under their Hugging Face names. (Filled in by the weights work.)

use std::collections::BTreeMap;

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

/// GGUF metadata, keyed as in the file (`llama.block_count`, `tokenizer.ggml.tokens`, …).
pub type GgufMetadata = BTreeMap<String, GgufValue>;
