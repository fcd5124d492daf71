//! Training throughput: one optimizer step (forward, cross-entropy, backward, AdamW) of the
//! default model (784-512-512-10, batch 128) on the CPU and, where a GPU is present, of the
//! default model and of 784-4096-4096-4096-10 at batch 1024 on it. Criterion's elem/s counts
//! samples: read it as samples/s.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tessera::data::Dataset;
use tessera::nn::MlpConfig;
use tessera::train::{LrSchedule, OptimizerConfig, TrainConfig, Trainer};
use tessera::{Activation, AdamW, CpuDevice, Ops};

fn config() -> TrainConfig {
    TrainConfig {
        optimizer: OptimizerConfig::AdamW(AdamW::default()),
        schedule: LrSchedule::Constant,
        clip_norm: None,
        seed: 0,
    }
}

fn bench_model<B: Ops>(c: &mut Criterion, group: &str, dev: &B, widths: &[usize], batch: usize) {
    let data = Dataset::synthetic(batch, &[widths[0], 64, *widths.last().unwrap()], 1).unwrap();
    let model = MlpConfig::new(widths.to_vec(), Activation::Relu).unwrap().model();
    let mut t = Trainer::new(dev, &model, config()).unwrap();
    let mut g = c.benchmark_group(group);
    g.sample_size(10);
    g.throughput(Throughput::Elements(batch as u64));
    let name = format!("{} batch {batch}", widths.iter().map(|w| w.to_string()).collect::<Vec<_>>().join("-"));
    g.bench_function(name, |b| {
        b.iter(|| {
            t.step(&data.x, &data.y).unwrap();
            dev.synchronize().unwrap();
        })
    });
    g.finish();
}

fn train_step(c: &mut Criterion) {
    let cpu = CpuDevice::new(0);
    eprintln!("cpu: {} rayon threads", rayon::current_num_threads());
    bench_model(c, "train_step/cpu", &cpu, &[784, 512, 512, 10], 128);
    if let Some(gpu) = tessera::check::gpu_or_skip("train_step/cuda") {
        bench_model(c, "train_step/cuda", &gpu, &[784, 512, 512, 10], 128);
        bench_model(c, "train_step/cuda", &gpu, &[784, 4096, 4096, 4096, 10], 1024);
    }
}

criterion_group!(benches, train_step);
criterion_main!(benches);
