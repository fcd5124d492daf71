//! Training throughput: one optimizer step (forward, cross-entropy, backward, AdamW) of the
//! default model (784-512-512-10, batch 128) on the CPU and, where a GPU is present, of the
//! default model and of 784-4096-4096-4096-10 at batch 1024 on it. Criterion's elem/s counts
//! samples: read it as samples/s. The `gpt_step` groups time one step of the default GPT job
//! (nanoGPT's CPU configuration: 4 blocks of width 128, 4 heads, context 64, batch 12, AdamW
//! with clipping) on tiny Shakespeare; its elem/s counts steps, to hold against the JAX peer's
//! steps/s (`bench/peers/gpt_step.py`, run by scripts/bench.sh).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tessera::data::{Dataset, TextCorpus};
use tessera::nn::{GptConfig, MlpConfig};
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

fn bench_gpt<B: Ops>(c: &mut Criterion, group: &str, dev: &B) {
    let text = TextCorpus::tiny_shakespeare().unwrap();
    let gpt = GptConfig { vocab: text.vocab.len(), t: 64, c: 128, heads: 4, layers: 4 };
    let cfg = TrainConfig {
        optimizer: OptimizerConfig::AdamW(AdamW { lr: 1e-3, beta2: 0.99, weight_decay: 0.1, ..AdamW::default() }),
        schedule: LrSchedule::Cosine { warmup: 100, total: 2000, min_factor: 0.1 },
        clip_norm: Some(1.0),
        seed: 0,
    };
    let mut t = Trainer::new(dev, &gpt.model().unwrap(), cfg).unwrap();
    let mut g = c.benchmark_group(group);
    g.sample_size(10);
    g.throughput(Throughput::Elements(1));
    let mut step = 0;
    g.bench_function("gpt 4x128 heads 4 context 64 batch 12", |b| {
        b.iter(|| {
            let (x, y) = text.train_batch(0, step, 12, 64).unwrap();
            step += 1;
            t.step_reading(&x, &y, false).unwrap();
            dev.synchronize().unwrap();
        })
    });
    g.finish();
}

fn train_step(c: &mut Criterion) {
    let cpu = CpuDevice::new(0);
    eprintln!("cpu: {} rayon threads", rayon::current_num_threads());
    bench_model(c, "train_step/cpu", &cpu, &[784, 512, 512, 10], 128);
    bench_gpt(c, "gpt_step/cpu", &cpu);
    if let Some(gpu) = tessera::check::gpu_or_skip("train_step/cuda") {
        bench_model(c, "train_step/cuda", &gpu, &[784, 512, 512, 10], 128);
        bench_model(c, "train_step/cuda", &gpu, &[784, 4096, 4096, 4096, 10], 1024);
        bench_gpt(c, "gpt_step/cuda", &gpu);
    }
}

criterion_group!(benches, train_step);
criterion_main!(benches);
