//! The parallel engine's numbers, each beside its reference from the same run:
//! - `allreduce/<backend>`: the in-process all-reduce's bus bandwidth (criterion's bytes/s
//!   counts `size * 2(n-1)/n`, the algorithm bandwidth times 2(n-1)/n): the ring over messages
//!   and, on the CPU, the shared-memory group the engine uses, next to a plain copy of the same
//!   buffer (bytes/s counts its size);
//! - `train_plans/<backend>`: samples/s (elem/s) of one training step of the default model
//!   (784-512-512-10, batch 128) for several plans on logical devices; after each plan the
//!   measured idle fraction of a step is printed next to GPipe's bubble (p-1)/(m+p-1).
//!
//! Logical devices share the machine: on the CPU, the cores (the count is printed first).

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tessera::data::Dataset;
use tessera::nn::MlpConfig;
use tessera::parallel::comm::{Communicator, LocalComm, LocalGroup};
use tessera::parallel::engine::Engine;
use tessera::parallel::schedule::bubble_fraction;
use tessera::parallel::{Plan, ScheduleKind};
use tessera::train::{LrSchedule, OptimizerConfig, TrainConfig};
use tessera::{Activation, AdamW, CpuDevice, Ops};

/// Times `iters` all-reduces of `len` floats over the group (all ranks in their threads).
fn all_reduce_time<B: Ops>(comms: Vec<Box<dyn Communicator<B>>>, devs: &[B], len: usize, iters: u64) -> Duration {
    let times: Vec<Duration> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .zip(devs)
            .map(|(mut c, d)| {
                s.spawn(move || {
                    let mut buf = d.upload(&vec![1.0f32; len]).unwrap();
                    c.all_reduce_sum(&mut buf).unwrap(); // warm-up, and every rank starts together
                    let t = Instant::now();
                    for _ in 0..iters {
                        c.all_reduce_sum(&mut buf).unwrap();
                    }
                    d.synchronize().unwrap();
                    t.elapsed()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    times.into_iter().max().unwrap()
}

/// The ring over messages (`LocalComm`), and where `shared` the group the engine uses on this
/// backend (`local_group`: on the CPU the shared-memory all-reduce with the ring's bits).
fn allreduce_group<B: LocalGroup>(c: &mut Criterion, name: &str, devs: &[B], shared: bool) {
    let len = 1 << 22;
    let mut g = c.benchmark_group(name);
    g.sample_size(10);
    let bytes = (len * 4) as u64;
    for n in [2usize, 4] {
        if n > devs.len() {
            continue;
        }
        g.throughput(Throughput::Bytes(bytes * 2 * (n as u64 - 1) / n as u64));
        let ring = |d: &[B]| -> Vec<Box<dyn Communicator<B>>> {
            LocalComm::group(d).into_iter().map(|c| Box::new(c) as Box<dyn Communicator<B>>).collect()
        };
        g.bench_function(format!("ring n={n} {} MiB (bus bandwidth)", bytes >> 20), |b| {
            b.iter_custom(|iters| all_reduce_time(ring(&devs[..n]), &devs[..n], len, iters))
        });
        if shared {
            g.bench_function(format!("shared n={n} {} MiB (bus bandwidth)", bytes >> 20), |b| {
                b.iter_custom(|iters| {
                    all_reduce_time(
                        B::local_group(&devs[..n], tessera::parallel::DEFAULT_COMM_TIMEOUT),
                        &devs[..n],
                        len,
                        iters,
                    )
                })
            });
        }
    }
    g.throughput(Throughput::Bytes(bytes));
    let d = &devs[0];
    let src = d.upload(&vec![1.0f32; len]).unwrap();
    let mut dst = d.alloc::<f32>(len).unwrap();
    g.bench_function(format!("copy {} MiB", bytes >> 20), |b| {
        b.iter_custom(|iters| {
            d.synchronize().unwrap();
            let t = Instant::now();
            for _ in 0..iters {
                d.copy(&B::view(&src), &mut B::view_mut(&mut dst)).unwrap();
            }
            d.synchronize().unwrap();
            t.elapsed()
        })
    });
    g.finish();
}

fn plans_group<B: LocalGroup>(c: &mut Criterion, name: &str, devs: &[B]) {
    let mlp = MlpConfig::new(vec![784, 512, 512, 10], Activation::Relu).unwrap();
    let model = mlp.model();
    let cfg = TrainConfig {
        optimizer: OptimizerConfig::AdamW(AdamW::default()),
        schedule: LrSchedule::Constant,
        clip_norm: None,
        seed: 0,
    };
    let batch = 128;
    let data = Dataset::synthetic(batch, &[784, 64, 10], 1).unwrap();
    let mut g = c.benchmark_group(name);
    g.sample_size(10);
    g.throughput(Throughput::Elements(batch as u64));
    let plans = [
        (1, 1, 1, ScheduleKind::GPipe),
        (2, 1, 1, ScheduleKind::GPipe),
        (4, 1, 1, ScheduleKind::GPipe),
        (1, 2, 4, ScheduleKind::GPipe),
        (1, 2, 4, ScheduleKind::OneFOneB),
        (1, 3, 6, ScheduleKind::OneFOneB),
        (2, 2, 4, ScheduleKind::OneFOneB),
    ];
    for (dp, pp, m, kind) in plans {
        if dp * pp > devs.len() {
            continue;
        }
        let plan = Plan::new(&mlp.info(), dp, pp, m, kind).unwrap();
        let desc = plan.describe();
        let mut e = Engine::new(&devs[..dp * pp], &model, cfg.clone(), plan).unwrap();
        g.bench_function(&desc, |b| b.iter(|| e.step(&data.x, &data.y).unwrap()));
        // No timeline when a filter skipped this plan (e.g. `cuda` skips the CPU groups).
        if let Some(t) = e.timeline() {
            eprintln!(
                "{name} {desc}: measured idle {:.1}% of the step, GPipe bubble (p-1)/(m+p-1) = {:.1}%",
                100.0 * t.idle_fraction(),
                100.0 * bubble_fraction(pp, m)
            );
        }
    }
    g.finish();
}

fn parallel(c: &mut Criterion) {
    eprintln!("this machine: {} cores for rayon", rayon::current_num_threads());
    let cpus: Vec<CpuDevice> = (0..4).map(CpuDevice::new).collect();
    allreduce_group(c, "allreduce/cpu", &cpus, true);
    plans_group(c, "train_plans/cpu", &cpus);
    if let Some(g0) = tessera::check::gpu_or_skip("the cuda groups") {
        let mut gpus = vec![g0.clone()];
        for i in 1..4 {
            gpus.push(g0.logical(i).unwrap());
        }
        allreduce_group(c, "allreduce/cuda-logical", &gpus, false);
        plans_group(c, "train_plans/cuda-logical", &gpus);
    }
}

criterion_group!(benches, parallel);
criterion_main!(benches);
