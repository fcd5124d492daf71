//! A trainer of a researcher's own, linked against tessera through `tessera::prelude`: its own
//! layer (the residual block of `examples/own_layer.rs`, compiled here as this crate's module)
//! in its own model, on the engine on `cpu:2` with two data-parallel replicas (the same weights
//! as one device, and the loss must fall), and on the simulator's `sim:2` against the CPU.

#[path = "../../../examples/own_layer.rs"]
#[allow(dead_code)]
mod own_layer;

use tessera::prelude::*;

fn config() -> TrainConfig {
    TrainConfig {
        optimizer: OptimizerConfig::Sgd(Sgd { lr: 0.1, momentum: 0.9, weight_decay: 0.0 }),
        schedule: LrSchedule::Constant,
        clip_norm: Some(1.0),
        seed: 7,
    }
}

/// `steps` steps of the model of this crate's own layer on `devices` with dp = devices: the
/// losses and the final parameters.
fn run<B: LocalGroup>(devices: &[B], steps: usize) -> Result<(Vec<f32>, Vec<f32>), Error> {
    let model = own_layer::model::<B>();
    let data = Dataset::synthetic(64, &[12, 24, 5], 3)?;
    let plan = Plan::new(&model.info()?, devices.len(), 1, 1, ScheduleKind::OneFOneB)?;
    let mut engine = Engine::new(devices, &model, config(), plan)?;
    let mut losses = Vec::new();
    for _ in 0..steps {
        losses.push(engine.step(&data.x, &data.y)?.loss);
    }
    Ok((losses, engine.params()?))
}

/// `||a - b|| / ||b||`.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (d / n).sqrt()
}

fn main() -> Result<(), Error> {
    let (one_loss, one) = run(&[CpuDevice::new(0)], 5)?;
    let (two_loss, two) = run(&[CpuDevice::new(0), CpuDevice::new(1)], 5)?;
    let worst = rel_err(&two, &one);
    println!("cpu:1 losses {one_loss:?}\ncpu:2 (dp 2) losses {two_loss:?}\nrelative weight difference {worst:e}");
    assert!(worst <= 1e-5, "dp 2 drifted from one device: {worst}");
    assert!(two_loss.last() < two_loss.first(), "the loss did not fall");
    let (sim_loss, sim) = run(&[SimDevice::new(0), SimDevice::new(1)], 2)?;
    let (cpu_loss, cpu) = run(&[CpuDevice::new(0)], 2)?;
    let worst = rel_err(&sim, &cpu);
    println!("sim:2 (dp 2) losses {sim_loss:?} against cpu {cpu_loss:?}: relative weight difference {worst:e}");
    assert!(worst <= 1e-4, "the simulator drifted from the CPU: {worst}");
    println!("downstream: ok");
    Ok(())
}
