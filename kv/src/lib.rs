//! KV cache tensors as the rest of KVFetcher sees them, their safetensors file format, and a
//! small llama2.c forward pass that produces real KV (and measures fidelity of decoded KV).
//!
//! This crate knows nothing of chunks, codecs or networks.

mod dtype;
mod fidelity;
mod llama2;
mod model;
mod safetensors;
mod scored;
mod tensor;

pub use dtype::DTypeExt;
pub use fidelity::{fidelity, Fidelity};
pub use kvfetcher_types::DType;
pub use llama2::{Generation, Llama2Model, ModelError, BOS_TOKEN};
pub use model::config::Llama2Config;
pub use safetensors::{KvFile, KvFileError};
pub use scored::{ScoreAccumulator, ScoredFidelity};
pub use tensor::{KvCache, LayerKv, Tensor, TensorError};
