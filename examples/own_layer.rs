//! A layer of one's own, split across devices like tessera's own: a residual block
//! `y = x + act(x W + b)` written from tessera's ops (a fused GEMM, the activation's backward,
//! a column sum, an axpy), in a model trained with dp 2 x pp 2 on `cpu:4` through the library.
//! `tests/parallel.rs` runs this model through the oracle grid (every plan against one device).
//!
//! `cargo run --release --example own_layer`

use tessera::nn::{Ctx, Layer, LayerCost, Linear, Model, ParamSpec, Saved, Work};
use tessera::parallel::engine::Engine;
use tessera::parallel::{Plan, ScheduleKind};
use tessera::rng::Rng;
use tessera::train::{fit, Cursor, OptimizerConfig, TrainConfig};
use tessera::{Activation, AdamW, CpuDevice, Gemm, Ops, Result};

/// `y = x + act(x W + b)`, `W` square. With `shared`, `W` is the model-wide parameter of that
/// name, one matrix for every block that names it (on any stage).
pub struct Residual {
    pub width: usize,
    pub act: Activation,
    pub shared: Option<&'static str>,
}

impl<B: Ops> Layer<B> for Residual {
    fn describe(&self) -> String {
        format!("residual {} {}", self.width, self.act)
    }
    fn inputs(&self) -> usize {
        self.width
    }
    fn outputs(&self) -> usize {
        self.width
    }
    fn params(&self) -> Vec<ParamSpec> {
        let w = [self.width, self.width];
        let weight = self.shared.map_or_else(|| ParamSpec::new("weight", &w), |n| ParamSpec::shared(n, &w));
        vec![weight, ParamSpec::new("bias", &[self.width])]
    }
    fn init(&self, i: usize, rng: &mut Rng, values: &mut [f32]) {
        let bound = (1.0 / self.width as f32).sqrt(); // small: the block starts near the identity
        if i == 0 {
            values.iter_mut().for_each(|v| *v = rng.range(-bound, bound));
        }
    }
    fn cost(&self) -> LayerCost {
        let n = self.width;
        LayerCost {
            flops_per_sample: 6.0 * (n * n) as f64,
            saved_floats_per_sample: n,
            scratch_floats_per_sample: n,
            ..LayerCost::default()
        }
    }
    fn forward(
        &self,
        cx: &Ctx<'_, B>,
        x: &B::Ref<'_, f32>,
        y: &mut B::Mut<'_, f32>,
        saved: &mut Saved<B>,
    ) -> Result<()> {
        let (n, dev) = (self.width, cx.dev);
        let z = saved.keep(dev, 0, cx.rows * n)?; // the pre-activation, for backward
        let g = Gemm::new(cx.rows, n, n).activation(self.act);
        dev.gemm(&g, x, &cx.param(0), Some(&cx.param(1)), &mut B::view_mut(z), Some(&mut *y))?;
        dev.axpy(1.0, x, y) // y = act(z) + x
    }
    fn backward(
        &self,
        cx: &Ctx<'_, B>,
        x: &B::Ref<'_, f32>,
        dy: &B::Ref<'_, f32>,
        dx: Option<&mut B::Mut<'_, f32>>,
        saved: &Saved<B>,
        work: &mut Work<'_, B>,
    ) -> Result<()> {
        let (n, rows, dev) = (self.width, cx.rows, cx.dev);
        let mut dz = work.take_scratch(dev, rows * n)?; // dz = dy * act'(z)
        dev.act_backward(self.act, &B::view(saved.get(0)?), dy, &mut B::view_range_mut(&mut dz, 0..rows * n))?;
        {
            let dz = B::view_range(&dz, 0..rows * n);
            let (mut gw, beta) = work.grad(0); // dW (+)= x^T dz
            dev.gemm(&Gemm::new(n, n, rows).trans_a(true).beta(beta), x, &dz, None, &mut gw, None)?;
            drop(gw);
            let (mut gb, beta) = work.grad(1); // db (+)= column sums of dz
            dev.col_sum(rows, n, &dz, beta, &mut gb)?;
            drop(gb);
            if let Some(dx) = dx {
                dev.gemm(&Gemm::new(rows, n, n).trans_b(true), &dz, &cx.param(0), None, dx, None)?;
                dev.axpy(1.0, dy, dx)?; // the skip connection's share
            }
        }
        work.give_back(dz);
        Ok(())
    }
}

/// 12 features -> 24, two residual blocks sharing one matrix, -> 5 classes.
pub fn model<B: Ops>() -> Model<B> {
    let block = || Residual { width: 24, act: Activation::GeluTanh, shared: Some("blocks.weight") };
    Model::new("residual 12-24x2-5")
        .push(Linear::new(12, 24, Activation::GeluTanh))
        .push(block())
        .push(block())
        .push(Linear::new(24, 5, Activation::None))
}

#[allow(dead_code)]
fn main() -> Result<()> {
    let data = tessera::data::Dataset::synthetic(512, &[12, 32, 5], 1)?;
    let devices: Vec<CpuDevice> = (0..4).map(CpuDevice::new).collect();
    let model = model::<CpuDevice>();
    let info = model.info()?;
    let cfg = TrainConfig {
        optimizer: OptimizerConfig::AdamW(AdamW { lr: 3e-3, ..AdamW::default() }),
        schedule: tessera::train::LrSchedule::Constant,
        clip_norm: Some(1.0),
        seed: 0,
    };
    // dp 2 replicas x pp 2 stages (the blocks' shared matrix lands on both), 4 microbatches.
    let plan = Plan::new(&info, 2, 2, 4, ScheduleKind::OneFOneB)?;
    println!("{}: {} parameters; plan {}", info.name, info.param_count(), plan.describe());
    let mut engine = Engine::new(&devices, &model, cfg, plan)?;
    let before = engine.evaluate(&data, 512)?;
    fit(&mut engine, &data, 64, 300, &mut Cursor::default(), |_, _, _| Ok(()))?;
    let after = engine.evaluate(&data, 512)?;
    println!("loss {:.4} -> {:.4}, accuracy {:.1}%", before.loss, after.loss, 100.0 * after.accuracy());
    assert!(engine.replicas_identical()? && after.loss < 0.5 * before.loss);
    Ok(())
}
