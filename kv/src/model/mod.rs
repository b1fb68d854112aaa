//! The internals of the llama2.c model: checkpoint header, weight layout, one forward step and
//! the seeded sampler. The public face is [`crate::Llama2Model`] in `llama2.rs`.

pub(crate) mod config;
pub(crate) mod forward;
pub(crate) mod sampler;
pub(crate) mod weights;
