//! A node's gRPC address, `http(s)://host:port`: its identity in the
//! router (the pool, the KV index, errors and retries key on it), as a type
//! of its own rather than a bare `String`.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

/// A node's gRPC address; cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct NodeAddr(Arc<str>);

impl NodeAddr {
    /// The address as written, `http://host:port`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for NodeAddr {
    fn from(s: &str) -> Self {
        NodeAddr(Arc::from(s))
    }
}

impl From<String> for NodeAddr {
    fn from(s: String) -> Self {
        NodeAddr(Arc::from(s))
    }
}

/// Reads as the `&str` it holds, where an address is taken as text.
impl std::ops::Deref for NodeAddr {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for NodeAddr {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// So maps keyed by address are looked up with a `&str`.
impl Borrow<str> for NodeAddr {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for NodeAddr {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}
