//! Client of the KVFetcher node daemon, and the one definition of its local protocol.
