//! Training throughput: one optimizer step (forward, cross-entropy, backward, AdamW) of the
//! default model (784-512-512-10, batch 128) on the CPU and, where a GPU is present, of the
//! default model and of 784-4096-4096-4096-10 at batch 1024 on it. Criterion's elem/s counts
//! samples: read it as samples/s. The `gpt_step` groups time one step of the default GPT job
//! (nanoGPT's CPU configuration: 4 blocks of width 128, 4 heads, context 64, batch 12, AdamW
//! with clipping) on tiny Shakespeare; its elem/s counts steps, to hold against the JAX peer's
//! steps/s (`bench/peers/gpt_step.py`, run by scripts/bench.sh). The `mesh_step` groups time
//! the same GPT step split over two logical devices of one CPU (or GPU) in each of the ways the
//! engine splits (dp 2, dp 2 with ZeRO 1, pp 2 with 4 microbatches, tp 2) beside one device:
//! what each split costs where the devices share one piece of hardware.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tessera::data::{Dataset, TextCorpus};
use tessera::nn::{GptConfig, MlpConfig};
use tessera::parallel::comm::LocalGroup;
use tessera::parallel::engine::Engine;
use tessera::parallel::{Plan, ScheduleKind};
use tessera::train::{LrSchedule, OptimizerConfig, TrainConfig, Trainer};
use tessera::{Activation, AdamW, Backend, CpuDevice, Ops};

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

/// The default GPT job's model and optimizer.
fn gpt_job(text: &TextCorpus) -> (GptConfig, TrainConfig) {
    let gpt = GptConfig { vocab: text.vocab.len(), t: 64, c: 128, heads: 4, layers: 4 };
    let cfg = TrainConfig {
        optimizer: OptimizerConfig::AdamW(AdamW { lr: 1e-3, beta2: 0.99, weight_decay: 0.1, ..AdamW::default() }),
        schedule: LrSchedule::Cosine { warmup: 100, total: 2000, min_factor: 0.1 },
        clip_norm: Some(1.0),
        seed: 0,
    };
    (gpt, cfg)
}

/// One GPT step on each split of two logical devices `devs`, beside one device.
fn bench_mesh<B: LocalGroup>(c: &mut Criterion, group: &str, devs: &[B]) {
    let text = TextCorpus::tiny_shakespeare().unwrap();
    let (gpt, cfg) = gpt_job(&text);
    let model = gpt.model::<B>().unwrap();
    let info = model.info().unwrap();
    let mut g = c.benchmark_group(group);
    g.sample_size(10);
    g.throughput(Throughput::Elements(1));
    let plans = [
        ("one device", Plan::single(&info)),
        ("dp 2", Plan::new(&info, 2, 1, 1, ScheduleKind::OneFOneB).unwrap()),
        ("dp 2 zero 1", Plan::new(&info, 2, 1, 1, ScheduleKind::OneFOneB).unwrap().with_zero(1).unwrap()),
        ("pp 2, 4 microbatches", Plan::new(&info, 1, 2, 4, ScheduleKind::OneFOneB).unwrap()),
        ("tp 2", Plan::new(&info, 1, 1, 1, ScheduleKind::OneFOneB).unwrap().with_tp(2).unwrap()),
    ];
    for (name, plan) in plans {
        let n = plan.mesh.devices();
        let mut e = Engine::new(&devs[..n], &model, cfg.clone(), plan).unwrap();
        let mut step = 0;
        g.bench_function(format!("gpt 4x128 batch 12, {name}"), |b| {
            b.iter(|| {
                let (x, y) = text.train_batch(0, step, 12, 64).unwrap();
                step += 1;
                e.step_reading(&x, &y, false).unwrap();
                devs[..n].iter().for_each(|d| d.synchronize().unwrap());
            })
        });
    }
    g.finish();
}

fn bench_gpt<B: Ops>(c: &mut Criterion, group: &str, dev: &B) {
    let text = TextCorpus::tiny_shakespeare().unwrap();
    let (gpt, cfg) = gpt_job(&text);
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
    bench_mesh(c, "mesh_step/cpu", &[CpuDevice::new(0), CpuDevice::new(1)]);
    if let Some(gpu) = tessera::check::gpu_or_skip("train_step/cuda") {
        bench_model(c, "train_step/cuda", &gpu, &[784, 512, 512, 10], 128);
        bench_model(c, "train_step/cuda", &gpu, &[784, 4096, 4096, 4096, 10], 1024);
        bench_gpt(c, "gpt_step/cuda", &gpu);
        // Two logical devices of the one card (a stream each).
        if let Ok(second) = gpu.with_own_queue() {
            bench_mesh(c, "mesh_step/cuda", &[gpu.clone(), second]);
        }
    }
}

criterion_group!(benches, train_step);
criterion_main!(benches);
