//! tandem-router (see the crate's module docs).
