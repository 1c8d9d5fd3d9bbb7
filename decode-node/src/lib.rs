//! tandem-decode (see the crate's module docs).
