//! The allocator policy of a process that moves KV over QUIC.
//!
//! quinn copies each received batch of datagrams into a fresh buffer, and a
//! decode node keeps those buffers as the layer frames' payloads until the
//! layer is imported (`receiver`), so the heap grows by a layer's bytes and
//! shrinks again every layer. glibc hands the freed top of the heap back to
//! the kernel (above `M_TRIM_THRESHOLD`, 128 KiB by default) and serves
//! larger blocks from fresh mappings, so the next layer page-faults and
//! zeroes its memory again. Keeping freed memory in the process instead
//! moved 1.13–1.17× the QUIC bytes per second at 8952-byte datagrams on the
//! 2-core VM (kv-transfer/BENCH.md, "Freed memory kept").

/// Has glibc keep freed heap memory (trim threshold 1 GiB) and serve blocks
/// up to 32 MiB from the heap rather than fresh mappings, unless
/// `TANDEM_KEEP_FREED_MEMORY=0`. Returns whether the policy is in effect
/// (false on other C libraries, where it does nothing). Call it early in
/// `main`, before other threads allocate.
pub fn keep_freed_memory() -> bool {
    if std::env::var("TANDEM_KEEP_FREED_MEMORY").is_ok_and(|v| v == "0") {
        return false;
    }
    apply()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() -> bool {
    // SAFETY: mallopt only sets allocator parameters; both values are in range.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> bool {
    false
}
