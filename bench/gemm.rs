//! GEMM throughput. Criterion's "elem/s" here counts floating-point operations: read it as
//! FLOP/s. Each group holds the peer beside tessera's kernel, so ratios come from one run:
//! `gemm/cpu` against the `gemm` crate, `gemm/cuda` against cuBLAS SGEMM (strict FP32).

mod common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tessera::{Backend, GemmKernel};

use common::{Case, Work};

fn run_group<B: Backend>(c: &mut Criterion, group: &str, dev: &B, cases: Vec<Case>, peer_label: &str) {
    let mut g = c.benchmark_group(group);
    g.sample_size(10);
    let sync = || dev.synchronize().unwrap();
    for mut case in cases {
        let units = match case.work {
            Work::Flops(f) | Work::Bytes(f) => f as u64,
        };
        match case.work {
            Work::Flops(_) => g.throughput(Throughput::Elements(units)),
            Work::Bytes(_) => g.throughput(Throughput::Bytes(units)),
        };
        g.bench_function(format!("tessera {}", case.name), |b| {
            b.iter_custom(|n| common::time_runs(&mut case.run, &sync, n))
        });
        if let Some((name, mut peer)) = case.peer.take() {
            let label = if name.is_empty() { peer_label } else { name };
            g.bench_function(format!("{label} {}", case.name), |b| {
                b.iter_custom(|n| common::time_runs(&mut peer, &sync, n))
            });
        }
    }
    g.finish();
}

fn gemm(c: &mut Criterion) {
    let cpu = common::cpu();
    let cases = common::gemm_cases(&cpu, &[256, 512, 1024], &|m, n, k, ta, tb| {
        Some(("gemm-crate", common::gemm_crate_run(m, n, k, ta, tb)))
    });
    run_group(c, "gemm/cpu", &cpu, cases, "gemm-crate");
    if let Some(gpu) = common::gpu() {
        let g2 = gpu.clone();
        let cases = common::gemm_cases(&gpu, &[256, 512, 1024, 2048, 4096, 8192], &move |m, n, k, ta, tb| {
            common::cublas_run(&g2, m, n, k, ta, tb).map(|r| ("cublas", r))
        });
        run_group(c, "gemm/cuda", &gpu, cases, "cublas");
        kernel_families(c, &gpu);
        training_shapes(c, &gpu);
    }
}

/// The default job's GEMMs, whose C has too few tiles for the GPU: the 64x64 tile alone,
/// split-K as the plan chooses it (`auto`), and cuBLAS. The prediction is in bench/NOTES.md.
fn training_shapes(c: &mut Criterion, gpu: &tessera::CudaDevice) {
    let mut g = c.benchmark_group("gemm-training/cuda");
    g.sample_size(10);
    let sync = || gpu.synchronize().unwrap();
    for (m, n, k, ta, tb) in [(128, 512, 784, false, false), (784, 512, 128, true, false), (128, 512, 512, false, true)]
    {
        let case = format!("{}{} {m}x{n}x{k}", if ta { 't' } else { 'n' }, if tb { 't' } else { 'n' });
        g.throughput(Throughput::Elements((2.0 * m as f64 * n as f64 * k as f64) as u64));
        for kernel in [GemmKernel::Small, GemmKernel::Auto] {
            let mut run = common::gemm_kernel_run(gpu, m, n, k, ta, tb, kernel);
            g.bench_function(format!("tessera-{} {case}", kernel.name()), |b| {
                b.iter_custom(|n| common::time_runs(&mut run, &sync, n))
            });
        }
        if let Some(mut run) = common::cublas_run(gpu, m, n, k, ta, tb) {
            g.bench_function(format!("cublas {case}"), |b| b.iter_custom(|n| common::time_runs(&mut run, &sync, n)));
        }
    }
    g.finish();
}

/// The CUDA kernel families side by side at the sizes the targets name (4096^3 in the three
/// layouts an MLP uses, 8192^3 nn), cuBLAS beside them: which family should be the default.
fn kernel_families(c: &mut Criterion, gpu: &tessera::CudaDevice) {
    let mut g = c.benchmark_group("gemm-kernels/cuda");
    g.sample_size(10);
    let sync = || gpu.synchronize().unwrap();
    for (s, ta, tb) in [(4096, false, false), (4096, false, true), (4096, true, false), (8192, false, false)] {
        let case = format!("{}{} {s}x{s}x{s}", if ta { 't' } else { 'n' }, if tb { 't' } else { 'n' });
        g.throughput(Throughput::Elements((2.0 * (s as f64).powi(3)) as u64));
        for kernel in [GemmKernel::Tiled, GemmKernel::Pipe8, GemmKernel::Pipe16, GemmKernel::Wide8, GemmKernel::Wide16]
        {
            let mut run = common::gemm_kernel_run(gpu, s, s, s, ta, tb, kernel);
            g.bench_function(format!("tessera-{} {case}", kernel.name()), |b| {
                b.iter_custom(|n| common::time_runs(&mut run, &sync, n))
            });
        }
        if let Some(mut run) = common::cublas_run(gpu, s, s, s, ta, tb) {
            g.bench_function(format!("cublas {case}"), |b| b.iter_custom(|n| common::time_runs(&mut run, &sync, n)));
        }
    }
    g.finish();
}

criterion_group!(benches, gemm);
criterion_main!(benches);
