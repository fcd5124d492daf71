//! The fully connected layer: `y = act(x W + b)`, one fused GEMM launch forward (bias and
//! activation in the epilogue), three launches backward.

use crate::error::Result;
use crate::nn::{Ctx, Layer, LayerCost, ParamSpec, Saved, Work};
use crate::ops::activation::Activation;
use crate::ops::gemm::Gemm;
use crate::ops::Ops;
use crate::rng::Rng;

/// `y = act(x W + b)` with `W` (`weight`) stored `inputs x outputs` row-major and `b` (`bias`)
/// of `outputs`. With an activation, forward keeps the pre-activation for backward.
///
/// Initial weights are Kaiming-uniform (`sqrt(6 / inputs)`) before an activation and
/// Xavier-uniform (`sqrt(6 / (inputs + outputs))`) without one; biases start at zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Linear {
    /// Features in.
    pub inputs: usize,
    /// Features out.
    pub outputs: usize,
    /// Activation after the bias ([`Activation::None`]: none).
    pub act: Activation,
}

impl Linear {
    /// A layer of `inputs -> outputs` features followed by `act`.
    pub fn new(inputs: usize, outputs: usize, act: Activation) -> Self {
        Linear { inputs, outputs, act }
    }
}

impl<B: Ops> Layer<B> for Linear {
    fn describe(&self) -> String {
        match self.act {
            Activation::None => format!("linear {}x{}", self.inputs, self.outputs),
            a => format!("linear {}x{} {a}", self.inputs, self.outputs),
        }
    }
    fn inputs(&self) -> usize {
        self.inputs
    }
    fn outputs(&self) -> usize {
        self.outputs
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::new("weight", &[self.inputs, self.outputs]), ParamSpec::new("bias", &[self.outputs])]
    }
    fn init(&self, i: usize, rng: &mut Rng, values: &mut [f32]) {
        if i == 0 {
            let bound = match self.act {
                Activation::None => (6.0 / (self.inputs + self.outputs) as f32).sqrt(),
                _ => (6.0 / self.inputs as f32).sqrt(),
            };
            values.iter_mut().for_each(|w| *w = rng.range(-bound, bound));
        }
    }
    fn cost(&self) -> LayerCost {
        let with_act = usize::from(self.act != Activation::None);
        LayerCost {
            flops_per_sample: 6.0 * (self.inputs * self.outputs) as f64,
            saved_floats_per_sample: with_act * self.outputs,
            scratch_floats_per_sample: with_act * self.outputs,
        }
    }

    fn forward(
        &self,
        cx: &Ctx<'_, B>,
        x: &B::Ref<'_, f32>,
        y: &mut B::Mut<'_, f32>,
        saved: &mut Saved<B>,
    ) -> Result<()> {
        let g = Gemm::new(cx.rows, self.outputs, self.inputs).activation(self.act);
        let (w, b) = (cx.param(0), cx.param(1));
        if self.act == Activation::None {
            return cx.dev.gemm(&g, x, &w, Some(&b), y, None);
        }
        let z = saved.keep(cx.dev, 0, cx.rows * self.outputs)?;
        cx.dev.gemm(&g, x, &w, Some(&b), &mut B::view_mut(z), Some(y))
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
        let (dev, rows) = (cx.dev, cx.rows);
        let n = rows * self.outputs;
        // dz = dy * act'(z), or dy itself without an activation.
        let scratch = match self.act {
            Activation::None => None,
            act => {
                let mut dz = work.take_scratch(dev, n)?;
                let done = {
                    let mut dzv = B::view_range_mut(&mut dz, 0..n);
                    match saved.get(0) {
                        Ok(z) => dev.act_backward(act, &B::view(z), dy, &mut dzv),
                        Err(e) => Err(e),
                    }
                };
                if let Err(e) = done {
                    work.give_back(dz);
                    return Err(e);
                }
                Some(dz)
            }
        };
        let result = (|| {
            let dz = match &scratch {
                Some(b) => B::view_range(b, 0..n),
                None => B::sub(dy, 0..n),
            };
            // dW = x^T dz, db = column sums of dz, dx = dz W^T.
            {
                let (mut gw, beta) = work.grad(0);
                let g = Gemm::new(self.inputs, self.outputs, rows).trans_a(true).beta(beta);
                dev.gemm(&g, x, &dz, None, &mut gw, None)?;
            }
            {
                let (mut gb, beta) = work.grad(1);
                dev.col_sum(rows, self.outputs, &dz, beta, &mut gb)?;
            }
            if let Some(dx) = dx {
                let gd = Gemm::new(rows, self.inputs, self.outputs).trans_b(true);
                dev.gemm(&gd, &dz, &cx.param(0), None, dx, None)?;
            }
            Ok(())
        })();
        if let Some(b) = scratch {
            work.give_back(b);
        }
        result
    }
}
