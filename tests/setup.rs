//! The set-up script's detection of libclang (what rsmpi's bindgen loads), against fake
//! directory layouts and against the library the machine really has.
//!
//! A fresh machine once had only `libclang-cpp.so.14` (which another package brings): the old
//! glob took it for libclang, skipped installing libclang-dev, and the first README command
//! failed in rsmpi's build with "Unable to find libclang". `scripts/find-libclang.sh` searches
//! what clang-sys searches, with its names and its ELF check; these tests pin that down.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The script where the tests were built, else in the current folder (the GPU machine runs the
/// prebuilt tests from a copy of the tree, elsewhere).
fn script() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/find-libclang.sh");
    if built.is_file() {
        built
    } else {
        PathBuf::from("scripts/find-libclang.sh")
    }
}

/// A fresh, empty folder standing in for `/`.
fn root(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tessera-setup-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A file that starts like a shared library: the ELF magic and class (2: 64-bit, 1: 32-bit).
fn fake_lib(path: &Path, class: u8) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut bytes = vec![0x7f, b'E', b'L', b'F', class, 1, 1, 0];
    bytes.resize(64, 0);
    std::fs::write(path, bytes).unwrap();
}

/// Runs the detection with `/` at `root` and no library paths: the path it found, or `None`.
fn find(root: &Path, libclang_path: Option<&Path>) -> Option<String> {
    let mut c = Command::new("bash");
    c.arg(script())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("TESSERA_SYSROOT", root)
        .env("LD_LIBRARY_PATH", "")
        .env("LIBRARY_PATH", "");
    if let Some(p) = libclang_path {
        c.env("LIBCLANG_PATH", p);
    }
    let o = c.output().expect("run scripts/find-libclang.sh");
    let out = String::from_utf8_lossy(&o.stdout).trim().to_string();
    match o.status.code() {
        Some(0) => Some(out),
        Some(1) => {
            assert!(out.is_empty(), "printed {out} but said none was found");
            None
        }
        other => panic!("find-libclang.sh exited {other:?}: {}", String::from_utf8_lossy(&o.stderr)),
    }
}

#[test]
fn libclang_cpp_alone_is_not_libclang() {
    let r = root("cpp-only");
    fake_lib(&r.join("usr/lib/x86_64-linux-gnu/libclang-cpp.so.14"), 2);
    fake_lib(&r.join("usr/lib/llvm-14/lib/libclang-cpp.so.14"), 2);
    assert_eq!(find(&r, None), None, "libclang-cpp.so.14 is Clang's C++ library, which bindgen cannot load");
    std::fs::remove_dir_all(&r).unwrap();
}

#[test]
fn a_versioned_libclang_alone_is_found() {
    // Debian's libclang1-14 without libclang-dev: only suffix-versioned names.
    let r = root("versioned");
    let lib = r.join("usr/lib/x86_64-linux-gnu/libclang-14.so.1");
    fake_lib(&lib, 2);
    fake_lib(&r.join("usr/lib/x86_64-linux-gnu/libclang-cpp.so.14"), 2);
    assert_eq!(find(&r, None), Some(lib.display().to_string()));
    std::fs::remove_dir_all(&r).unwrap();

    let r = root("llvm-dir");
    let lib = r.join("usr/lib/llvm-14/lib/libclang.so.1");
    fake_lib(&lib, 2);
    assert_eq!(find(&r, None), Some(lib.display().to_string()));
    std::fs::remove_dir_all(&r).unwrap();
}

#[test]
fn no_libclang_at_all_is_none() {
    let r = root("none");
    std::fs::create_dir_all(r.join("usr/lib/x86_64-linux-gnu")).unwrap();
    std::fs::write(r.join("usr/lib/x86_64-linux-gnu/libc.so.6"), b"not this").unwrap();
    assert_eq!(find(&r, None), None);
    // A 32-bit library, or a file that is not a library, does not count either (clang-sys
    // checks the ELF class).
    fake_lib(&r.join("usr/lib/libclang.so"), 1);
    std::fs::write(r.join("usr/lib/libclang-15.so"), b"#!/bin/sh\n").unwrap();
    assert_eq!(find(&r, None), None);
    std::fs::remove_dir_all(&r).unwrap();
}

#[test]
fn libclang_path_is_the_only_place_searched_when_set() {
    let r = root("env");
    let elsewhere = r.join("opt/llvm/lib");
    fake_lib(&elsewhere.join("libclang.so"), 2);
    assert_eq!(find(&r, Some(&elsewhere)), Some(elsewhere.join("libclang.so").display().to_string()));
    // Set, but to a folder without it: none, even though the system folders have one.
    fake_lib(&r.join("usr/lib/libclang.so"), 2);
    assert_eq!(find(&r, Some(&r.join("opt"))), None);
    std::fs::remove_dir_all(&r).unwrap();
}

/// On this machine (set up by scripts/setup.sh), what the script finds is a library that has
/// the C API bindgen calls, and `libclang-cpp`, where the machine has it, has not.
#[test]
fn what_is_found_here_is_what_bindgen_loads() {
    let o = Command::new("bash").arg(script()).output().unwrap();
    if !o.status.success() {
        // Built with --no-default-features (no rsmpi): nothing needs libclang.
        if cfg!(feature = "mpi") {
            panic!("rsmpi was built, so a libclang exists, but the script found none");
        }
        eprintln!("skipped: no libclang on this machine (built without the mpi feature)");
        return;
    }
    let path = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(has_symbol(&path, "clang_createIndex"), "{path} lacks clang_createIndex");
    for cpp in ["/usr/lib/x86_64-linux-gnu/libclang-cpp.so.14", "/lib/x86_64-linux-gnu/libclang-cpp.so.14"] {
        if Path::new(cpp).exists() {
            assert!(!has_symbol(cpp, "clang_createIndex"), "{cpp} has the C API after all");
        }
    }
}

fn has_symbol(lib: &str, sym: &str) -> bool {
    let l = std::ffi::CString::new(lib).unwrap();
    let s = std::ffi::CString::new(sym).unwrap();
    // SAFETY: dlopen/dlsym with NUL-terminated strings; the handle is closed before returning.
    unsafe {
        let h = libc::dlopen(l.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
        assert!(!h.is_null(), "{lib} cannot be loaded");
        let found = !libc::dlsym(h, s.as_ptr()).is_null();
        libc::dlclose(h);
        found
    }
}
