//! Fixtures, bit-exact self-checks and benchmarks of the daemon's GPU path (`kvfetcher::gpu`):
//! raster fixtures ([`fixture`]), NVDEC and restore-kernel checks ([`check`]), the codec's own
//! HEVC sections ([`sections`]), the cross-process CUDA IPC proof ([`ipc_check`]) and the NVDEC
//! and restore benchmarks ([`bench`]), and the transform-coded (rANS) route ([`transform_check`]).

pub mod bench;
pub mod check;
pub mod fixture;
pub mod ipc_check;
pub mod sections;
pub mod transform_bench;
pub mod transform_check;
