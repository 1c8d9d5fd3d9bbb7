//! A real etcd for tests: its own process on free loopback ports with a data
//! directory the test owns. Tests fail, never skip, when etcd cannot start:
//! `scripts/test.sh` installs it (Debian's `etcd-server`).
//!
//! The election timeout is short (500 ms, heartbeat 50 ms), so etcd's
//! minimum lease TTL is 1 s and tests of lease expiry stay quick.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::ports::free_port;

/// How long etcd may take to become healthy.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running etcd; killed when dropped.
pub struct EtcdServer {
    child: Option<Child>,
    data_dir: PathBuf,
    client_port: u16,
    peer_port: u16,
}

/// The etcd binary: `$ETCD_BIN`, else `etcd` on the PATH.
fn etcd_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("ETCD_BIN") {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("etcd"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "etcd is not installed (not on the PATH, ETCD_BIN unset). scripts/test.sh \
                 installs it; by hand: apt-get install -y etcd-server"
            )
        })
}

impl EtcdServer {
    /// Starts etcd with its data in `data_dir` on two free loopback ports,
    /// and waits until it is healthy. Panics, saying why, if it cannot.
    pub fn start(data_dir: &Path) -> EtcdServer {
        let mut server = EtcdServer {
            child: None,
            data_dir: data_dir.to_owned(),
            client_port: free_port(),
            peer_port: free_port(),
        };
        server.restart();
        server
    }

    /// The client URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Kills etcd (SIGKILL: no goodbye to clients) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports, with `data_dir` (the old one to
    /// keep its data, a new one for a blank etcd), and waits until healthy.
    pub fn restart_with(&mut self, data_dir: &Path) {
        self.data_dir = data_dir.to_owned();
        self.restart();
    }

    /// Starts etcd again on the same ports and data directory.
    pub fn restart(&mut self) {
        self.stop();
        std::fs::create_dir_all(&self.data_dir).expect("etcd data dir");
        let log_path = self.data_dir.with_extension("log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("etcd log file");
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let client = self.url();
        let binary = etcd_binary();
        let child = Command::new(&binary)
            .args(["--name", "tandem-test", "--data-dir"])
            .arg(&self.data_dir)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("tandem-test={peer}")])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start etcd ({}): {e}", binary.display()));
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.healthy() {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!(
                    "etcd exited ({status}) before becoming healthy; its log:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "etcd did not become healthy within {START_TIMEOUT:?}; its log:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether etcd answers `/health` with `"health":"true"`.
    pub fn healthy(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.client_port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.contains("\"health\":\"true\"")
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.stop();
    }
}
