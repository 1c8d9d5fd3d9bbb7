//! tandem-kv-transfer (see the crate's module docs).
