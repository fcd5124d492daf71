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
///
/// Under tensor parallelism a linear layer is whole on every rank ([`Linear::new`]), or one
/// half of Megatron-LM's pair: [`Linear::column`] splits `W` and `b` by output columns (the
/// output stays split: each rank holds its `outputs / tp` features at the front of the row;
/// the input gradient is summed over the group), and [`Linear::row`] splits `W` by input rows
/// (the input is the column layer's split output; the partial products are summed over the
/// group, then the bias and activation applied).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Linear {
    /// Features in.
    pub inputs: usize,
    /// Features out.
    pub outputs: usize,
    /// Activation after the bias ([`Activation::None`]: none).
    pub act: Activation,
    /// How it splits across a tensor-parallel group.
    pub split: LinearSplit,
}

/// How a [`Linear`] splits across a tensor-parallel group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearSplit {
    /// Whole on every rank.
    Whole,
    /// By output columns: the output is split.
    Column,
    /// By input rows: the input is split, the output whole.
    Row,
}

impl Linear {
    /// A layer of `inputs -> outputs` features followed by `act`.
    pub fn new(inputs: usize, outputs: usize, act: Activation) -> Self {
        Linear { inputs, outputs, act, split: LinearSplit::Whole }
    }
    /// The same layer, column-parallel under tensor parallelism (the first of a pair).
    pub fn column(inputs: usize, outputs: usize, act: Activation) -> Self {
        Linear { split: LinearSplit::Column, ..Self::new(inputs, outputs, act) }
    }
    /// The same layer, row-parallel under tensor parallelism (the second of a pair).
    pub fn row(inputs: usize, outputs: usize, act: Activation) -> Self {
        Linear { split: LinearSplit::Row, ..Self::new(inputs, outputs, act) }
    }
    /// Features in and out on one rank of a group of `tp`.
    fn local(&self, tp: usize) -> (usize, usize) {
        match self.split {
            LinearSplit::Whole => (self.inputs, self.outputs),
            LinearSplit::Column => (self.inputs, self.outputs / tp),
            LinearSplit::Row => (self.inputs / tp, self.outputs),
        }
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
        let (w, b) = (ParamSpec::new("weight", &[self.inputs, self.outputs]), ParamSpec::new("bias", &[self.outputs]));
        match self.split {
            LinearSplit::Whole => vec![w, b],
            LinearSplit::Column => vec![w.split(1, 1), b.split(0, 1)],
            LinearSplit::Row => vec![w.split(0, 1), b],
        }
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
            // Split: a row-parallel layer sums its output forward, a column-parallel one its
            // input gradient backward.
            tp_all_reduce_floats_per_sample: match self.split {
                LinearSplit::Whole => 0,
                LinearSplit::Column => self.inputs,
                LinearSplit::Row => self.outputs,
            },
        }
    }

    fn forward(
        &self,
        cx: &Ctx<'_, B>,
        x: &B::Ref<'_, f32>,
        y: &mut B::Mut<'_, f32>,
        saved: &mut Saved<B>,
    ) -> Result<()> {
        let (rank, tp) = cx.tp();
        let (inputs, outputs) = self.local(tp);
        let (w, b) = (cx.param(0), cx.param(1));
        let x = &B::sub(x, 0..cx.rows * inputs);
        let y = &mut B::sub_mut(y, 0..cx.rows * outputs);
        if tp > 1 && self.split == LinearSplit::Row {
            // Partial products summed over the group (the bias once, on rank 0), then the
            // activation.
            let g = Gemm::new(cx.rows, outputs, inputs);
            let bias = (rank == 0).then_some(&b);
            if self.act == Activation::None {
                cx.dev.gemm(&g, x, &w, bias, y, None)?;
                return cx.tp_all_reduce(y);
            }
            let z = saved.keep(cx.dev, 0, cx.rows * outputs)?;
            cx.dev.gemm(&g, x, &w, bias, &mut B::view_mut(z), None)?;
            cx.tp_all_reduce(&mut B::view_mut(z))?;
            return cx.dev.act_forward(self.act, &B::view(z), y);
        }
        let g = Gemm::new(cx.rows, outputs, inputs).activation(self.act);
        if self.act == Activation::None {
            return cx.dev.gemm(&g, x, &w, Some(&b), y, None);
        }
        let z = saved.keep(cx.dev, 0, cx.rows * outputs)?;
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
        let tp = cx.tp().1;
        let (inputs, outputs) = self.local(tp);
        let x = &B::sub(x, 0..rows * inputs);
        let n = rows * outputs;
        let dy = &B::sub(dy, 0..n);
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
                let g = Gemm::new(inputs, outputs, rows).trans_a(true).beta(beta);
                dev.gemm(&g, x, &dz, None, &mut gw, None)?;
            }
            {
                let (mut gb, beta) = work.grad(1);
                dev.col_sum(rows, outputs, &dz, beta, &mut gb)?;
            }
            if let Some(dx) = dx {
                let gd = Gemm::new(rows, inputs, outputs).trans_b(true);
                let mut dx = B::sub_mut(dx, 0..rows * inputs);
                dev.gemm(&gd, &dz, &cx.param(0), None, &mut dx, None)?;
                if self.split == LinearSplit::Column {
                    // Each rank's columns give part of the input gradient: summed over the group.
                    cx.tp_all_reduce(&mut dx)?;
                }
            }
            Ok(())
        })();
        if let Some(b) = scratch {
            work.give_back(b);
        }
        result
    }
}
