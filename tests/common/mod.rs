//! Helpers shared by the integration tests.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// The `tessera` binary: `$TESSERA_BIN` where set (the GPU check runs prebuilt binaries from
/// another folder), else the one cargo built for this test.
pub fn tessera_bin() -> PathBuf {
    std::env::var_os("TESSERA_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_tessera")))
}

/// Runs `tessera ARGS`: (success, stdout, stderr).
pub fn tessera(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(tessera_bin()).args(args).output().expect("run tessera");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Runs `tessera ARGS` with extra environment variables: (success, stdout, stderr).
pub fn tessera_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let o = Command::new(tessera_bin()).args(args).envs(env.iter().copied()).output().expect("run tessera");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A fresh path in a per-process temporary folder.
pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tessera-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}
