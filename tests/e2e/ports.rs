//! Loopback ports for servers that tests start in other processes.

use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicU32, Ordering};

/// A loopback port free for TCP and UDP now, for a server another process
/// will bind. It is taken outside the kernel's ephemeral range: a port found
/// by binding port 0 and closing the socket is handed to the next process
/// that binds port 0 (a node told to listen on `127.0.0.1:0`), which can come
/// before the process the port was meant for (CI failed so: a router found
/// its port taken by a prefill node started beside it). Calls in one process
/// return distinct ports; processes start at different offsets.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (low, high) = outside_ephemeral();
    let span = u32::from(high - low);
    let start = std::process::id().wrapping_mul(2_654_435_761) % span;
    for _ in 0..span {
        let port = low + ((start + NEXT.fetch_add(1, Ordering::Relaxed)) % span) as u16;
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
            && UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
        {
            return port;
        }
    }
    panic!("no free loopback port in {low}..{high}");
}

/// A range of ports the kernel does not hand out for port 0: below
/// `net.ipv4.ip_local_port_range` (32768-60999 by default), else above it.
fn outside_ephemeral() -> (u16, u16) {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok();
    let mut bounds = range
        .iter()
        .flat_map(|s| s.split_whitespace())
        .filter_map(|n| n.parse::<u16>().ok());
    let (first, last) = (
        bounds.next().unwrap_or(32768),
        bounds.next().unwrap_or(60999),
    );
    if first >= 12_000 {
        (10_000, first)
    } else if last <= 63_000 {
        (last + 1, u16::MAX)
    } else {
        panic!("the ephemeral port range {first}-{last} leaves no room for fixed test ports");
    }
}
