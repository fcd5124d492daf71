//! Memory-bound kernels (activations, reductions, losses, optimizer updates) in bytes moved
//! per second, each beside a copy of the same number of bytes on the same device (a memcpy
//! on the CPU, a device-to-device copy on a GPU), so the ratio to the copy bandwidth comes
//! from one run. Groups: `<family>/cpu` and `<family>/cuda`.

mod common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tessera::Backend;

use common::{Case, Work};

fn run_cases<B: Backend>(c: &mut Criterion, suffix: &str, dev: &B, cases: Vec<Case>) {
    let sync = || dev.synchronize().unwrap();
    let mut families: Vec<&'static str> = cases.iter().map(|c| c.family).collect();
    families.dedup();
    let mut cases = cases;
    for fam in families {
        let mut g = c.benchmark_group(format!("{fam}/{suffix}"));
        g.sample_size(20);
        for case in cases.iter_mut().filter(|c| c.family == fam) {
            if let Work::Bytes(b) = case.work {
                g.throughput(Throughput::Bytes(b as u64));
            }
            g.bench_function(format!("tessera {}", case.name), |b| {
                b.iter_custom(|n| common::time_runs(&mut case.run, &sync, n))
            });
            if let Some((name, peer)) = case.peer.as_mut() {
                g.bench_function(format!("{name} {}", case.name), |b| {
                    b.iter_custom(|n| common::time_runs(peer, &sync, n))
                });
            }
        }
        g.finish();
    }
}

fn elementwise(c: &mut Criterion) {
    let cpu = common::cpu();
    run_cases(c, "cpu", &cpu, common::memory_cases(&cpu, 1 << 22));
    if let Some(gpu) = common::gpu() {
        run_cases(c, "cuda", &gpu, common::memory_cases(&gpu, 1 << 26));
    }
}

criterion_group!(benches, elementwise);
criterion_main!(benches);
