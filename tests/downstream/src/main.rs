//! A trainer of a researcher's own, linked against tessera through `tessera::prelude`: the engine
//! on `cpu:2` with two data-parallel replicas (the same weights as one device, and the loss must
//! fall), and on the simulator's `sim:2` against the CPU.

use tessera::prelude::*;

fn config() -> Result<TrainConfig, Error> {
    Ok(TrainConfig {
        model: MlpConfig::new(vec![12, 16, 4], Activation::Silu)?,
        optimizer: OptimizerConfig::Sgd(Sgd { lr: 0.1, momentum: 0.9, weight_decay: 0.0 }),
        schedule: LrSchedule::Constant,
        clip_norm: None,
        seed: 7,
    })
}

/// `steps` steps on `devices` with dp = devices: the losses and the final parameters.
fn run<B: LocalGroup>(devices: &[B], steps: usize) -> Result<(Vec<f32>, Vec<f32>), Error> {
    let cfg = config()?;
    let data = Dataset::synthetic(64, &[12, 24, 4], 3)?;
    let plan = Plan::new(&cfg.model, devices.len(), 1, 1, ScheduleKind::OneFOneB)?;
    let mut engine = Engine::new(devices, cfg, plan)?;
    let mut losses = Vec::new();
    for _ in 0..steps {
        losses.push(engine.step(&data.x, &data.y)?.loss);
    }
    Ok((losses, engine.params()?))
}

fn main() -> Result<(), Error> {
    let (one_loss, one) = run(&[CpuDevice::new(0)], 5)?;
    let (two_loss, two) = run(&[CpuDevice::new(0), CpuDevice::new(1)], 5)?;
    let worst = one.iter().zip(&two).map(|(a, b)| (a - b).abs() / a.abs().max(1e-3)).fold(0f32, f32::max);
    println!("cpu:1 losses {one_loss:?}\ncpu:2 (dp 2) losses {two_loss:?}\nrelative weight difference {worst:e}");
    assert!(worst <= 1e-5, "dp 2 drifted from one device: {worst}");
    assert!(two_loss.last() < two_loss.first(), "the loss did not fall");
    let (sim_loss, sim) = run(&[SimDevice::new(0), SimDevice::new(1)], 2)?;
    let (cpu_loss, cpu) = run(&[CpuDevice::new(0)], 2)?;
    let worst = sim.iter().zip(&cpu).map(|(a, b)| (a - b).abs() / a.abs().max(1e-3)).fold(0f32, f32::max);
    println!("sim:2 (dp 2) losses {sim_loss:?} against cpu {cpu_loss:?}: relative weight difference {worst:e}");
    assert!(worst <= 1e-4, "the simulator drifted from the CPU: {worst}");
    println!("downstream: ok");
    Ok(())
}
