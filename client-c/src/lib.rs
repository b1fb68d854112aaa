//! C ABI over `kvfetcher-client` (see `include/kvfetcher.h`).
