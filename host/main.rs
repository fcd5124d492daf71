//! The `tessera` command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tessera::backend::cuda;
use tessera::kernels::{KERNELS, MANIFEST};

/// tessera: hand-written CUDA kernels and a host library for training on CPU and GPU devices.
#[derive(Parser)]
#[command(name = "tessera", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// What is there: the CPU and its features, GPUs with name, memory, compute capability and
    /// driver version, and whether this build's kernels can run on them.
    Devices,
    /// Every kernel with its ptxas report (registers, shared memory, spills) and the build's
    /// compatibility manifest.
    Kernels {
        /// Also print nvcc's whole `ptxas -v` output.
        #[arg(long)]
        verbose: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Devices => devices(),
        Cmd::Kernels { verbose } => kernels(verbose),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

fn cpu_features() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut f = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("sse4.2") {
            f.push("sse4.2");
        }
        if is_x86_feature_detected!("avx") {
            f.push("avx");
        }
        if is_x86_feature_detected!("avx2") {
            f.push("avx2");
        }
        if is_x86_feature_detected!("fma") {
            f.push("fma");
        }
        if is_x86_feature_detected!("avx512f") {
            f.push("avx512f");
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            f.push("neon");
        }
    }
    f
}

fn manifest_line() -> String {
    if MANIFEST.built {
        format!("built by CUDA {} (PTX ISA {}) for {}", MANIFEST.toolkit, MANIFEST.ptx_isa, MANIFEST.archs.join(", "))
    } else {
        "NOT BUILT: nvcc was not found when tessera was compiled. Run scripts/setup.sh (installs the pinned \
         CUDA compiler into .toolchain/cuda), then rebuild; or set NVCC=/path/to/nvcc"
            .to_string()
    }
}

fn devices() -> tessera::Result<()> {
    let threads = rayon::current_num_threads();
    println!("CPU: {} ({} threads)", cpu_model(), threads);
    println!("  features: {}", cpu_features().join(" "));
    println!("  devices: cpu, cpu:N (N logical devices sharing these cores)");
    println!("CUDA kernels: {}", manifest_line());
    if !cuda::driver_present() {
        println!("CUDA driver: not found (libcuda.so.1 could not be loaded); no GPU can be used");
        return Ok(());
    }
    let v = cuda::driver_version()?;
    println!("CUDA driver: {} (CUDA {}.{})", v, v / 1000, (v % 1000) / 10);
    let n = cuda::gpu_count()?;
    if n == 0 {
        println!("GPUs: none visible to the driver");
    }
    for i in 0..n {
        let g = cuda::describe(i)?;
        println!(
            "GPU {i}: {}, {:.1} GiB, compute capability {}.{}, {} SMs; kernels: {}",
            g.name,
            g.total_mem as f64 / (1u64 << 30) as f64,
            g.compute_capability.0,
            g.compute_capability.1,
            g.sms,
            match &g.runs_kernels {
                Ok(how) => format!("run ({how})"),
                Err(why) => format!("cannot run: {why}"),
            }
        );
    }
    Ok(())
}

fn kernels(verbose: bool) -> tessera::Result<()> {
    println!("manifest: {}", manifest_line());
    if let Some(d) = MANIFEST.min_driver() {
        println!("needs: a driver for CUDA {}.{} or newer", d / 1000, (d % 1000) / 10);
    }
    let sass: Vec<&str> = MANIFEST.archs.iter().copied().filter(|a| a.starts_with("sm_")).collect();
    print!("{:<16} {:<14} {:<18}", "kernel", "file", "hash");
    for a in &sass {
        print!(" {:>22}", format!("{a} regs/smem/spill"));
    }
    println!();
    for k in KERNELS {
        let hash = k.hash.map(|h| format!("{h:016x}")).unwrap_or_else(|| "-".into());
        print!("{:<16} {:<14} {:<18}", k.name, k.file, hash);
        for a in &sass {
            let cell = match k.ptxas.iter().find(|p| p.arch == *a) {
                Some(p) => format!("{}/{}/{}", p.registers, p.smem_bytes, p.spill_stores + p.spill_loads),
                None => "-".into(),
            };
            print!(" {cell:>22}");
        }
        println!();
    }
    println!("{} kernels", KERNELS.len());
    if verbose {
        println!("\n{}", tessera::kernels::ptxas_report());
    }
    Ok(())
}
