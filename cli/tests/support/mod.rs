//! What the process-level tests share: the binary, a small model, child processes.

#![allow(dead_code)] // each test file uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

/// The `tandem` binary under test.
pub const TANDEM: &str = env!("CARGO_BIN_EXE_tandem");

/// Kills the child processes when the test ends, pass or fail.
pub struct Processes(pub Vec<Child>);

impl Drop for Processes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub use tandem_tests::ports::free_port;

/// Writes a small model with `tandem model synth` into `dir/model`.
pub fn synth_model(dir: &Path) -> PathBuf {
    synth_model_with(
        dir,
        &[
            "--hidden",
            "64",
            "--intermediate",
            "128",
            "--layers",
            "2",
            "--heads",
            "4",
            "--kv-heads",
            "2",
            "--max-position",
            "1024",
        ],
    )
}

/// Writes a model of the shape `dims` (`tandem model synth` arguments) into `dir/model`.
pub fn synth_model_with(dir: &Path, dims: &[&str]) -> PathBuf {
    let model = dir.join("model");
    let status = Command::new(TANDEM)
        .args(["model", "synth", "--out", model.to_str().unwrap()])
        .args(dims)
        .status()
        .unwrap();
    assert!(status.success(), "tandem model synth failed");
    model
}

/// Starts `tandem ARGS...` with its output in `log`.
pub fn spawn(args: &[&str], log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new(TANDEM)
        .args(args)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}
