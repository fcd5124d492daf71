//! `tessera devices` and `tessera kernels`: what is there.

use tessera::backend::cuda;
use tessera::backend::sim::SIM_KERNELS;
use tessera::kernels::{KERNELS, MANIFEST};

pub(crate) fn cpu_model() -> String {
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

pub(crate) fn cpu_features() -> Vec<&'static str> {
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

pub(crate) fn manifest_line() -> String {
    if MANIFEST.built {
        format!("built by CUDA {} (PTX ISA {}) for {}", MANIFEST.toolkit, MANIFEST.ptx_isa, MANIFEST.archs.join(", "))
    } else {
        "NOT BUILT: nvcc was not found when tessera was compiled. Run scripts/setup.sh (installs the pinned \
         CUDA compiler into .toolchain/cuda; `--shared` for a crate that depends on tessera through git), then rebuild; \
         or set NVCC=/path/to/nvcc"
            .to_string()
    }
}

pub(crate) fn devices() -> tessera::Result<()> {
    let threads = rayon::current_num_threads();
    outln!("CPU: {} ({} threads)", cpu_model(), threads);
    outln!("  features: {}", cpu_features().join(" "));
    outln!("  devices: cpu, cpu:N (N logical devices sharing these cores)");
    outln!("  simulator: sim, sim:N (the CUDA kernels run on the CPU with every access checked; slow)");
    outln!("CUDA kernels: {}", manifest_line());
    match tessera::parallel::nccl::library() {
        Ok(n) => outln!("NCCL: {} ({}), for --allreduce nccl", n.version_string(), n.path),
        Err(e) => outln!("NCCL: not usable: {e}"),
    }
    // What the driver says is reported, never an error: this command says what is there.
    match cuda::driver_problem() {
        Some(cuda::DriverProblem::Incomplete(why)) => {
            outln!("CUDA driver: unusable: {why}; no GPU can be used");
            return Ok(());
        }
        Some(cuda::DriverProblem::Missing) => {
            outln!("CUDA driver: not found (libcuda.so.1 could not be loaded); no GPU can be used");
            return Ok(());
        }
        None => {}
    }
    let v = match cuda::driver_version() {
        Ok(v) => v,
        Err(e) => {
            outln!("CUDA driver: unusable: {e}");
            return Ok(());
        }
    };
    outln!("CUDA driver: {} (CUDA {}.{})", v, v / 1000, (v % 1000) / 10);
    let n = match cuda::gpu_count() {
        Ok(n) => n,
        Err(e) => {
            outln!("GPUs: none usable: {e}");
            return Ok(());
        }
    };
    if n == 0 {
        outln!("GPUs: none visible to the driver");
    }
    for i in 0..n {
        let g = match cuda::describe(i) {
            Ok(g) => g,
            Err(e) => {
                outln!("GPU {i}: cannot be queried: {e}");
                continue;
            }
        };
        outln!(
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

pub(crate) fn kernels(verbose: bool) -> tessera::Result<()> {
    outln!("manifest: {}", manifest_line());
    if let Some(d) = MANIFEST.min_driver() {
        outln!("needs: a driver for CUDA {}.{} or newer", d / 1000, (d % 1000) / 10);
    }
    let sass: Vec<&str> = MANIFEST.archs.iter().copied().filter(|a| a.starts_with("sm_")).collect();
    out!("{:<28} {:<16} {:<18} {:<4}", "kernel", "file", "hash", "sim");
    for a in &sass {
        out!(" {:>22}", format!("{a} regs/smem/spill"));
    }
    outln!();
    for k in KERNELS {
        let hash = k.hash.map(|h| format!("{h:016x}")).unwrap_or_else(|| "-".into());
        let sim = match SIM_KERNELS.iter().find(|s| s.name == k.name).and_then(|s| s.unsupported.map(|_| ())) {
            None => "yes",
            Some(()) => "NO",
        };
        out!("{:<28} {:<16} {:<18} {sim:<4}", k.name, k.file, hash);
        for a in &sass {
            let cell = match k.ptxas.iter().find(|p| p.arch == *a) {
                Some(p) => format!("{}/{}/{}", p.registers, p.smem_bytes, p.spill_stores + p.spill_loads),
                None => "-".into(),
            };
            out!(" {cell:>22}");
        }
        outln!();
    }
    outln!("{} kernels", KERNELS.len());
    // The simulator: every kernel it cannot run is listed with the reason, never skipped quietly.
    let cannot: Vec<String> =
        SIM_KERNELS.iter().filter_map(|s| s.unsupported.map(|why| format!("{} ({}: {why})", s.name, s.file))).collect();
    if cannot.is_empty() {
        outln!("simulator (--device sim): runs all {} kernels", KERNELS.len());
    } else {
        outln!("simulator (--device sim): cannot run {}: {}", cannot.len(), cannot.join(", "));
    }
    let planted: Vec<&str> = SIM_KERNELS.iter().filter(|s| s.planted).map(|s| s.name).collect();
    outln!("simulator test kernels (kernels/sim/planted.cu, simulator only): {}", planted.join(", "));
    if verbose {
        // Occupancy from ptxas's registers and shared memory at each kernel's declared block size.
        outln!("\noccupancy (resident blocks per SM at the kernel's __launch_bounds__ block size):");
        out!("{:<28} {:>8}", "kernel", "threads");
        for a in &sass {
            out!(" {a:>8}");
        }
        outln!();
        for k in KERNELS {
            let Some((threads, _)) = k.launch_bounds() else {
                outln!("{:<28} {:>8}", k.name, "?");
                continue;
            };
            out!("{:<28} {threads:>8}", k.name);
            for a in &sass {
                let cell = match (k.ptxas.iter().find(|p| p.arch == *a), tessera::kernels::arch_limits(a)) {
                    (Some(p), Some(lim)) => {
                        match tessera::kernels::blocks_per_sm(&lim, p.registers, p.smem_bytes, threads) {
                            Ok(b) => format!("{b} ({}%)", 100 * b * threads.div_ceil(32) / lim.warps),
                            Err(_) => "none".into(),
                        }
                    }
                    _ => "-".into(),
                };
                out!(" {cell:>8}");
            }
            outln!();
        }
        outln!("\n{}", tessera::kernels::ptxas_report());
    }
    Ok(())
}
