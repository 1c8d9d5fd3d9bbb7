//! tandem-prefill (see the crate's module docs).
