//! No module imports from one above it. The layers, bottom to top: the base (errors, the
//! random generator, data) -> kernels -> backend (with tensors and device specs) -> ops -> nn
//! (and the f64 reference and the test harness) -> train (and checkpoints) -> parallel -> the
//! command line. Inside `parallel`: schedules and timelines -> communicators -> shards -> the planner ->
//! the engine -> MPI. Every `crate::...` path in the library's code (comments aside) is checked
//! against this order.

use std::path::{Path, PathBuf};

/// The layer of a module path such as `parallel::comm` or `ops`.
fn layer(path: &[&str]) -> Option<f64> {
    Some(match path {
        ["error" | "rng" | "data", ..] => 0.0,
        ["prelude", ..] => 9.0,
        ["kernels", ..] => 1.0,
        ["backend" | "tensor" | "device", ..] => 2.0,
        ["ops", ..] => 3.0,
        // The test harness and the f64 reference sit above the ops they check.
        ["nn" | "reference" | "check", ..] => 4.0,
        ["train" | "checkpoint", ..] => 5.0,
        ["parallel", "schedule" | "timeline", ..] => 6.0,
        ["parallel", "comm" | "nccl", ..] => 6.1,
        ["parallel", "shard", ..] => 6.15,
        ["parallel", "planner", ..] => 6.2,
        ["parallel", "engine", ..] => 6.3,
        ["parallel", "mpi", ..] => 6.4,
        ["parallel", ..] => 6.0,
        ["lib"] | ["main", ..] | ["cli", ..] => 9.0,
        // The crate root's re-exports, by what they are.
        ["Error" | "Result", ..] => 0.0,
        ["CpuDevice" | "CudaDevice" | "SimDevice" | "Backend" | "Elem" | "ViewLen" | "Tensor" | "DeviceSpec"
        | "Devices", ..] => 2.0,
        ["Activation" | "ActivationOps" | "Gemm" | "GemmKernel" | "GemmOps" | "LossOps" | "AdamW" | "OptimOps"
        | "Sgd" | "ReduceOps" | "Ops", ..] => 3.0,
        _ => return None,
    })
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module path of a source file: `host/parallel/comm.rs` -> `parallel::comm`,
/// `host/backend/cpu/mod.rs` -> `backend::cpu`.
fn module_of(host: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(host).unwrap().with_extension("");
    let mut parts: Vec<String> = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

/// Every `crate::a::b` path in `line`, as its segments; `crate::{a, b::c}` gives `a` and `b::c`.
fn crate_paths(line: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        if let Some(inner) = after.strip_prefix('{') {
            let end = inner.find('}').unwrap_or(inner.len());
            for item in inner[..end].split(',') {
                let item = item.trim();
                if !item.is_empty() {
                    out.push(item.split("::").map(|s| s.trim().to_string()).collect());
                }
            }
        } else {
            let end = after.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')).unwrap_or(after.len());
            out.push(after[..end].split("::").filter(|s| !s.is_empty()).map(String::from).collect());
        }
        rest = after;
    }
    out
}

#[test]
fn no_module_imports_from_one_above_it() {
    // The source tree where it was built, else the current folder (the GPU machine runs the
    // prebuilt tests from a copy of the tree, elsewhere).
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("host");
    let host = if built.is_dir() { built } else { PathBuf::from("host") };
    let mut files = Vec::new();
    sources(&host, &mut files);
    files.sort();
    let mut bad = Vec::new();
    let mut checked = 0;
    for f in &files {
        let module = module_of(&host, f);
        let mref: Vec<&str> = module.iter().map(String::as_str).collect();
        let Some(own) = layer(&mref) else { panic!("{}: no layer for module {module:?}", f.display()) };
        for (n, line) in std::fs::read_to_string(f).unwrap().lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            for path in crate_paths(code) {
                let p: Vec<&str> = path.iter().map(String::as_str).collect();
                if p.is_empty() {
                    continue;
                }
                let Some(theirs) = layer(&p) else {
                    panic!("{}:{}: no layer for `crate::{}`", f.display(), n + 1, path.join("::"))
                };
                checked += 1;
                if theirs > own {
                    bad.push(format!(
                        "{}:{}: {} imports crate::{}",
                        f.display(),
                        n + 1,
                        module.join("::"),
                        path.join("::")
                    ));
                }
            }
        }
    }
    assert!(checked > 100, "only {checked} crate paths found: is the scan broken?");
    assert!(bad.is_empty(), "imports from a layer above:\n{}", bad.join("\n"));
}

#[test]
fn the_scan_sees_paths_and_braces() {
    assert_eq!(crate_paths("use crate::ops::Ops;"), vec![vec!["ops", "Ops"]]);
    assert_eq!(crate_paths("use crate::{ops::Ops, error};"), vec![vec!["ops", "Ops"], vec!["error"]]);
    assert_eq!(layer(&["parallel", "engine", "Engine"]), Some(6.3));
    assert!(layer(&["ops", "reduce"]) < layer(&["parallel", "comm"]));
}
