//! The model of `examples/own_layer.rs` (a researcher's residual blocks sharing one matrix)
//! across processes: `mpirun -np 4 target/debug/examples/own_layer_mpi` runs it with dp 2 x
//! pp 2, one rank per device, and checks it against one device after 5 steps. The shared
//! matrix lands on both stages, whose ranks sum its gradient over MPI.

#[path = "own_layer.rs"]
mod own_layer;

use tessera::data::Dataset;
use tessera::parallel::mpi::{self, DistEngine};
use tessera::parallel::{Plan, ScheduleKind};
use tessera::train::{fit, Cursor, LrSchedule, OptimizerConfig, TrainConfig, Trainer};
use tessera::{CpuDevice, Error, Sgd};

fn main() -> Result<(), Error> {
    let rt = mpi::init()?;
    let world = rt.world().clone();
    let dev = CpuDevice::new(0);
    let model = own_layer::model::<CpuDevice>();
    let info = model.info()?;
    let data = Dataset::synthetic(26 * 5, &[12, 20, 5], 9)?;
    let cfg = TrainConfig {
        optimizer: OptimizerConfig::Sgd(Sgd { lr: 0.1, momentum: 0.9, weight_decay: 1e-3 }),
        schedule: LrSchedule::Constant,
        clip_norm: Some(0.5),
        seed: 5,
    };
    let mut one = Trainer::new(&dev, &model, cfg.clone())?;
    fit(&mut one, &data, 26, 5, &mut Cursor::default(), |_, _, _| Ok(()))?;
    let want = one.network().download_params(&dev)?;
    let dp = world.size() / 2;
    let plan = Plan::new(&info, dp, 2, 2, ScheduleKind::OneFOneB)?;
    let mut e = DistEngine::new(&world, &dev, &model, cfg, plan)?;
    fit(&mut e, &data, 26, 5, &mut Cursor::default(), |_, _, _| Ok(()))?;
    let got = e.params()?;
    let d: f64 = got.iter().zip(&want).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>().sqrt();
    let n: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().sqrt();
    let identical = e.replicas_identical()?;
    if world.rank() == 0 {
        println!("own layer under mpi: dp {dp} x pp 2, relative error {:.3e}, replicas identical {identical}", d / n);
        if d / n <= 1e-5 && identical {
            println!("own layer under mpi: ok");
        }
    }
    Ok(())
}
