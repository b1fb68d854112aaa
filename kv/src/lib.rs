//! KV cache tensors as the rest of KVFetcher sees them, their safetensors file format, and a
//! small llama2.c forward pass that produces real KV (and measures fidelity of decoded KV).
//!
//! This crate knows nothing of chunks, codecs or networks.

mod dtype;
mod safetensors;
mod tensor;

pub use dtype::DType;
pub use safetensors::{KvFileError, KvFile};
pub use tensor::{KvCache, LayerKv, Tensor, TensorError};
