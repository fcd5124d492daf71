//! A character-level GPT on tiny Shakespeare with the library alone: the model of
//! `tessera::nn::gpt` (nanoGPT's CPU configuration by default: 4 blocks of width 128 with 4
//! heads, context 64, batch 12), AdamW (beta2 0.99, weight decay 0.1 on the matrices), a linear
//! warm-up then a cosine decay to a tenth, gradient clipping at 1, and the validation loss (the
//! mean over the whole validation text) printed as it trains.
//!
//!   cargo run --release --example gpt_shakespeare -- [steps] [device]
//!
//! e.g. `-- 2000 cpu`; `-- 20 sim` runs the CUDA kernels in the simulator (slow).

use tessera::data::TextCorpus;
use tessera::nn::{GptConfig, Network};
use tessera::train::{LrSchedule, OptimizerConfig, TrainConfig, Trainer};
use tessera::{AdamW, DeviceSpec, Devices, Ops};

fn run<B: Ops>(dev: &B, steps: u64) -> tessera::Result<()> {
    let text = TextCorpus::tiny_shakespeare()?;
    let gpt = GptConfig { vocab: text.vocab.len(), t: 64, c: 128, heads: 4, layers: 4 };
    let (batch, seed) = (12, 0);
    let cfg = TrainConfig {
        optimizer: OptimizerConfig::AdamW(AdamW { lr: 1e-3, beta2: 0.99, weight_decay: 0.1, ..AdamW::default() }),
        schedule: LrSchedule::Cosine { warmup: 100.min(steps / 2), total: steps, min_factor: 0.1 },
        clip_norm: Some(1.0),
        seed,
    };
    let model = gpt.model::<B>()?;
    let mut trainer = Trainer::new(dev, &model, cfg)?;
    println!("{} parameters on {}", model.info()?.param_count(), dev.name());
    let (vx, vy) = text.val_text_windows(gpt.t)?;
    let t0 = std::time::Instant::now();
    for step in 0..steps {
        let (x, y) = text.train_batch(seed, step, batch, gpt.t)?;
        let s = trainer.step(&x, &y)?;
        if (step + 1) % 250 == 0 || step + 1 == steps {
            let mut net = Network::with_params(dev, &model, &trainer.network().download_params(dev)?)?;
            let v = net.mean_loss(dev, &vx, &vy, 64)?;
            println!(
                "step {:>5}: train loss {:.4}, validation loss {v:.4} ({:.1} s)",
                step + 1,
                s.loss,
                t0.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}

fn main() -> tessera::Result<()> {
    let mut args = std::env::args().skip(1);
    let steps: u64 = args.next().map(|s| s.parse().expect("steps: a whole number")).unwrap_or(2000);
    let spec: DeviceSpec = args.next().unwrap_or_else(|| "cpu".into()).parse()?;
    match spec.open()?.0 {
        Devices::Cpu(d) => run(&d[0], steps),
        Devices::Cuda(d) => run(&d[0], steps),
        Devices::Sim(d) => run(&d[0], steps),
    }
}
