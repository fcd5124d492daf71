//! GEMM throughput. Criterion's "elem/s" here counts floating-point operations: read it as
//! FLOP/s. Each group holds the peer beside tessera's kernel, so ratios come from one run:
//! `gemm/cpu` against the `gemm` crate, `gemm/cuda` against cuBLAS SGEMM (strict FP32).

mod common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tessera::Backend;

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
    }
}

criterion_group!(benches, gemm);
criterion_main!(benches);
