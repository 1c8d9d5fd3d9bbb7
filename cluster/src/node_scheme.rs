//! The URL scheme of internal gRPC addresses: `https://` when the cluster
//! runs mutual TLS (`[tls]` is set), `http://` when it does not.
//!
//! Its own module, below both [`crate::config`] (which checks the router's
//! static node lists at load) and [`crate::grpc_tls`] (which dials them), so
//! neither imports the other for it.

/// A node address whose scheme does not fit the TLS setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("node address {addr:?}: {message}")]
pub struct SchemeError {
    /// The address.
    pub addr: String,
    /// Why it cannot be dialed.
    pub message: &'static str,
}

/// The URL scheme of internal gRPC addresses: `https` with TLS, `http` without.
pub fn scheme(tls: bool) -> &'static str {
    if tls { "https" } else { "http" }
}

/// `addr` with a scheme: a bare `host:port` gets [`scheme`]`(tls)`; a full
/// URL is returned as it is.
pub fn with_scheme(addr: &str, tls: bool) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("{}://{addr}", scheme(tls))
    }
}

/// Checks that `addr`'s scheme matches the TLS setting: `https://` with
/// TLS, `http://` without.
pub fn check_scheme(addr: &str, tls: bool) -> Result<(), SchemeError> {
    let message = match (addr.split_once("://").map(|(s, _)| s), tls) {
        (Some("https"), true) | (Some("http"), false) => return Ok(()),
        (Some("http"), true) => "a plaintext (http://) address, but [tls] is set: use https://",
        (Some("https"), false) => "an https:// address needs a [tls] section",
        _ => "expected http://host:port or https://host:port",
    };
    Err(SchemeError {
        addr: addr.to_string(),
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_follow_the_tls_setting() {
        assert_eq!(with_scheme("10.0.0.5:7000", true), "https://10.0.0.5:7000");
        assert_eq!(with_scheme("10.0.0.5:7000", false), "http://10.0.0.5:7000");
        assert_eq!(with_scheme("http://h:1", true), "http://h:1");
        check_scheme("https://h:1", true).unwrap();
        check_scheme("http://h:1", false).unwrap();
        let err = check_scheme("http://h:1", true).unwrap_err().to_string();
        assert!(
            err.contains("plaintext") && err.contains("https://"),
            "{err}"
        );
        let err = check_scheme("https://h:1", false).unwrap_err().to_string();
        assert!(err.contains("[tls]"), "{err}");
        assert!(check_scheme("h:1", false).is_err());
    }
}
