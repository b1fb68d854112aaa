//! KVFetcher's development tools, apart from the daemon so that the service holds only what runs
//! in production: benchmarks (`net`, `fetch`, `codec`, `fidelity`, `load`), the GPU path's
//! fixtures, bit-exact self-checks and benchmarks (`gpu`), real-KV capture (`kv`) and the embedded
//! demo (`demo`). They drive the daemon through its library (`kvfetcher`) and engines through
//! the clients, as a user would.

pub mod cli;
pub mod gpu;
