//! Build script: compiles `kernels/*.cu` with nvcc and generates the Rust side of every kernel.
//!
//! For each `kernels/<family>.cu` it
//! - parses every `extern "C" __global__ void NAME(ARGS)` line and generates a typed launch
//!   method (argument names and types from the `.cu`), so a kernel's name is written once;
//! - compiles one fatbin (SASS for every `sm_XX` in the arch list, PTX for every `compute_XX`),
//!   keeps the `.ptx` of the lowest PTX arch to read, and parses the `ptxas -v` report;
//! - records a compatibility manifest: toolkit version, PTX ISA, archs, a hash per kernel.
//!
//! The `#define TESSERA_NAME <int>` lines of `kernels/common.cuh` become Rust constants.
//!
//! nvcc is looked up in `$NVCC`, `$CUDA_HOME/bin`, `$CUDA_PATH/bin`, `PATH`, then the project's
//! `.toolchain/cuda` (installed by `scripts/setup.sh`). Without nvcc the crate still builds, with a
//! warning; the CUDA backend then refuses to start and says how to install the toolchain. An nvcc
//! error fails the build with the file name and nvcc's whole output. It never runs `nvidia-smi`.

//!
//! Its stages are modules in `build/`: `parse` (the sources), `nvcc` (finding and running the
//! compiler), `codegen` (the generated Rust), `sim` (the simulator's build).

#[path = "build/codegen.rs"]
mod codegen;
#[path = "build/nvcc.rs"]
mod nvcc;
#[path = "build/parse.rs"]
mod parse;
#[path = "build/sim.rs"]
mod sim;

use std::env;
use std::fs;
use std::path::PathBuf;

use codegen::generate;
use nvcc::{compile_all, find_nvcc};
use parse::{parse_defines, parse_kernels, Family};
use sim::build_simulator;

const DEFAULT_ARCHS: &str = "sm_80,sm_86,sm_89,sm_90,compute_80";

fn main() {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kdir = root.join("kernels");
    println!("cargo:rerun-if-changed=kernels");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "PATH",
        "TESSERA_CUDA_TOOLCHAIN",
        "XDG_DATA_HOME",
        "HOME",
        "TESSERA_CUDA_ARCHS",
        "TESSERA_NO_NVCC",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let mut sources: Vec<PathBuf> = fs::read_dir(&kdir)
        .expect("kernels/ directory is missing")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("cu" | "cuh")))
        .collect();
    sources.sort();
    for s in &sources {
        println!("cargo:rerun-if-changed={}", s.display());
    }
    let cu_files: Vec<PathBuf> =
        sources.iter().filter(|p| p.extension().and_then(|e| e.to_str()) == Some("cu")).cloned().collect();

    let defines = parse_defines(&fs::read_to_string(kdir.join("common.cuh")).unwrap_or_default());

    let mut families = Vec::new();
    for path in &cu_files {
        let src = fs::read_to_string(path).unwrap();
        let file = path.file_name().unwrap().to_str().unwrap().to_string();
        let kernels = parse_kernels(&file, &src);
        families.push(Family {
            file,
            stem: path.file_stem().unwrap().to_str().unwrap().to_string(),
            path: path.clone(),
            kernels,
        });
    }

    let archs_env = env::var("TESSERA_CUDA_ARCHS").unwrap_or_else(|_| DEFAULT_ARCHS.to_string());
    let archs: Vec<String> = archs_env.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    for a in &archs {
        if !(a.starts_with("sm_") || a.starts_with("compute_")) {
            panic!("TESSERA_CUDA_ARCHS: `{a}` is neither sm_XX nor compute_XX (example: {DEFAULT_ARCHS})");
        }
    }

    // TESSERA_NO_NVCC=1 (any value but empty or 0) builds without kernels, as where nvcc is missing.
    let no_nvcc = env::var("TESSERA_NO_NVCC").is_ok_and(|v| !v.is_empty() && v != "0");
    let nvcc = if no_nvcc { None } else { find_nvcc(&root) };
    let build = match &nvcc {
        Some(nvcc) => Some(compile_all(nvcc, &kdir, &out, &families, &archs)),
        None => {
            println!(
                "cargo:warning=tessera: nvcc not found ($NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, PATH, \
                 $TESSERA_CUDA_TOOLCHAIN, tessera's .toolchain/cuda, ~/.local/share/tessera/cuda); CUDA \
                 kernels not built (the CPU and the simulator work; --device cuda says how to get them). Run tessera's \
                 scripts/setup.sh (--shared for a crate that depends on tessera through git), then rebuild."
            );
            None
        }
    };

    if build.is_none() {
        fs::write(out.join("ptxas-report.txt"), "").unwrap();
    }
    let code = generate(&families, &defines, build.as_ref(), &archs);
    fs::write(out.join("kernels.rs"), code).unwrap();

    // The simulator: the same sources, compiled for the host (kernels/sim/).
    let planted_path = kdir.join("sim/planted.cu");
    println!("cargo:rerun-if-changed={}", planted_path.display());
    let planted_src = fs::read_to_string(&planted_path).expect("kernels/sim/planted.cu is missing");
    let planted = Family {
        file: "sim/planted.cu".into(),
        stem: "planted".into(),
        path: planted_path,
        kernels: parse_kernels("sim/planted.cu", &planted_src),
    };
    let sim = build_simulator(&kdir, &out, &families, &planted);
    fs::write(out.join("sim_kernels.rs"), sim).unwrap();
}
