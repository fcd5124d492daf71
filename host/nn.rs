//! Layers and models: Linear layers (one fused GEMM launch each: bias and activation in the
//! epilogue) stacked into an MLP of any widths with ReLU, GELU or SiLU between them.
//!
//! A model's parameters live in one contiguous device buffer and its gradients in another,
//! with a view per layer (`layers.{i}.weight`, `in x out`, then `layers.{i}.bias`), so that an
//! optimizer step or an all-reduce is a few large calls. Forward keeps each layer's
//! pre-activation and activation; backward produces every gradient with the kernels.

use std::ops::Range;
use std::str::FromStr;

use crate::backend::{Backend, ViewLen};
use crate::error::{Error, Result};
use crate::ops::activation::Activation;
use crate::ops::gemm::Gemm;
use crate::ops::Ops;
use crate::rng::Rng;

/// The shape of an MLP: widths from input to classes, and the activation between layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MlpConfig {
    /// `[inputs, hidden..., outputs]`.
    pub widths: Vec<usize>,
    /// Activation after every layer but the last.
    pub act: Activation,
}

/// Where one Linear layer's parameters sit in the flat buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSlot {
    /// Input features.
    pub fan_in: usize,
    /// Output features.
    pub fan_out: usize,
    /// The weight, `fan_in x fan_out` row-major (`y = x W + b`).
    pub weight: Range<usize>,
    /// The bias, `fan_out`.
    pub bias: Range<usize>,
}

impl MlpConfig {
    /// A config; checks that there are at least two widths and none is zero.
    pub fn new(widths: Vec<usize>, act: Activation) -> Result<Self> {
        if widths.len() < 2 {
            return Err(Error::Invalid(format!(
                "an MLP needs at least an input and an output width, e.g. 784,512,10; got {widths:?}"
            )));
        }
        if let Some(i) = widths.iter().position(|&w| w == 0) {
            return Err(Error::Invalid(format!("width {i} of {widths:?} is 0; every layer needs at least one unit")));
        }
        Ok(MlpConfig { widths, act })
    }

    /// Parses `784,512,512,10` (also `784-512-512-10`).
    pub fn parse_widths(s: &str) -> Result<Vec<usize>> {
        s.split([',', '-', 'x'])
            .map(|t| t.trim())
            .filter(|t| !t.is_empty())
            .map(|t| {
                t.parse::<usize>().map_err(|_| {
                    Error::Invalid(format!("width list `{s}`: `{t}` is not a whole number (example: 784,512,512,10)"))
                })
            })
            .collect()
    }

    /// The widths as `784-512-512-10`.
    pub fn widths_string(&self) -> String {
        self.widths.iter().map(|w| w.to_string()).collect::<Vec<_>>().join("-")
    }

    /// Input features.
    pub fn inputs(&self) -> usize {
        self.widths[0]
    }
    /// Output features (classes).
    pub fn outputs(&self) -> usize {
        *self.widths.last().unwrap()
    }
    /// Number of Linear layers.
    pub fn depth(&self) -> usize {
        self.widths.len() - 1
    }

    /// The slot of every layer in the flat parameter buffer.
    pub fn layout(&self) -> Vec<LayerSlot> {
        let mut off = 0;
        self.widths
            .windows(2)
            .map(|w| {
                let weight = off..off + w[0] * w[1];
                let bias = weight.end..weight.end + w[1];
                off = bias.end;
                LayerSlot { fan_in: w[0], fan_out: w[1], weight, bias }
            })
            .collect()
    }

    /// Total parameters.
    pub fn param_count(&self) -> usize {
        self.layout().last().map(|l| l.bias.end).unwrap_or(0)
    }

    /// FLOPs of one forward and backward pass per sample (`6 * sum(in*out)`).
    pub fn train_flops_per_sample(&self) -> f64 {
        6.0 * self.widths.windows(2).map(|w| (w[0] * w[1]) as f64).sum::<f64>()
    }

    /// Seeded initial parameters: Kaiming-uniform (`sqrt(6 / fan_in)`) for layers followed by
    /// an activation, Xavier-uniform (`sqrt(6 / (fan_in + fan_out))`) for the output layer;
    /// zero biases.
    pub fn init(&self, seed: u64) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        let mut p = vec![0f32; self.param_count()];
        let layout = self.layout();
        for (i, l) in layout.iter().enumerate() {
            let last = i + 1 == layout.len();
            let bound = if last || self.act == Activation::None {
                (6.0 / (l.fan_in + l.fan_out) as f32).sqrt()
            } else {
                (6.0 / l.fan_in as f32).sqrt()
            };
            p[l.weight.clone()].iter_mut().for_each(|w| *w = rng.range(-bound, bound));
        }
        p
    }
}

impl FromStr for MlpConfig {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        MlpConfig::new(MlpConfig::parse_widths(s)?, Activation::Relu)
    }
}

/// Device buffers for one batch size: inputs, labels, each layer's pre-activation and
/// activation, and two scratch buffers for the backward pass.
struct Workspace<B: Backend> {
    batch: usize,
    x: B::Buf<f32>,
    labels: B::Buf<i32>,
    z: Vec<B::Buf<f32>>,
    a: Vec<B::Buf<f32>>,
    dz: B::Buf<f32>,
    da: B::Buf<f32>,
}

/// An MLP on one device: parameters, gradients and the activations of the last forward.
pub struct Mlp<B: Backend> {
    cfg: MlpConfig,
    layout: Vec<LayerSlot>,
    params: B::Buf<f32>,
    grads: B::Buf<f32>,
    ws: Option<Workspace<B>>,
}

impl<B: Ops> Mlp<B> {
    /// A model with seeded initial parameters.
    pub fn new(dev: &B, cfg: MlpConfig, seed: u64) -> Result<Self> {
        let init = cfg.init(seed);
        Self::with_params(dev, cfg, &init)
    }

    /// A model holding the given flat parameters.
    pub fn with_params(dev: &B, cfg: MlpConfig, params: &[f32]) -> Result<Self> {
        if params.len() != cfg.param_count() {
            return Err(Error::shape(
                "Mlp::with_params",
                format!("{} parameters given, {} has {}", params.len(), cfg.widths_string(), cfg.param_count()),
            ));
        }
        let layout = cfg.layout();
        Ok(Mlp { params: dev.upload(params)?, grads: dev.alloc(params.len())?, cfg, layout, ws: None })
    }

    /// The config.
    pub fn config(&self) -> &MlpConfig {
        &self.cfg
    }
    /// Every layer's slot in the flat buffers.
    pub fn layout(&self) -> &[LayerSlot] {
        &self.layout
    }
    /// The flat parameter buffer.
    pub fn params(&self) -> &B::Buf<f32> {
        &self.params
    }
    /// The flat parameter buffer, writable.
    pub fn params_mut(&mut self) -> &mut B::Buf<f32> {
        &mut self.params
    }
    /// The flat gradient buffer (of the last backward).
    pub fn grads(&self) -> &B::Buf<f32> {
        &self.grads
    }
    /// Parameters and gradients together, for an optimizer step.
    pub fn params_and_grads(&mut self) -> (&mut B::Buf<f32>, &B::Buf<f32>) {
        (&mut self.params, &self.grads)
    }
    /// The gradient buffer, writable (to scale or all-reduce it).
    pub fn grads_mut(&mut self) -> &mut B::Buf<f32> {
        &mut self.grads
    }
    /// Copies the parameters to the host.
    pub fn download_params(&self, dev: &B) -> Result<Vec<f32>> {
        dev.download(&B::view(&self.params))
    }

    fn workspace(&mut self, dev: &B, batch: usize) -> Result<&mut Workspace<B>> {
        if self.ws.as_ref().map(|w| w.batch) != Some(batch) {
            let widest = *self.cfg.widths.iter().max().unwrap();
            let depth = self.cfg.depth();
            let mut z = Vec::with_capacity(depth);
            let mut a = Vec::with_capacity(depth);
            for (i, l) in self.layout.iter().enumerate() {
                z.push(dev.alloc(batch * l.fan_out)?);
                if i + 1 < depth {
                    a.push(dev.alloc(batch * l.fan_out)?);
                }
            }
            self.ws = Some(Workspace {
                batch,
                x: dev.alloc(batch * self.cfg.inputs())?,
                labels: dev.alloc(batch)?,
                z,
                a,
                dz: dev.alloc(batch * widest)?,
                da: dev.alloc(batch * widest)?,
            });
        }
        Ok(self.ws.as_mut().unwrap())
    }

    /// Uploads a batch of `x` (`batch x inputs`) and labels into the workspace.
    pub fn load_batch(&mut self, dev: &B, x: &[f32], labels: &[i32]) -> Result<usize> {
        let inputs = self.cfg.inputs();
        if labels.is_empty() {
            return Err(Error::shape("Mlp::load_batch", "the batch is empty"));
        }
        let batch = labels.len();
        if x.len() != batch * inputs {
            return Err(Error::shape(
                "Mlp::load_batch",
                format!(
                    "inputs hold {} values for {batch} labels; the model takes {inputs} features per sample ({} expected)",
                    x.len(),
                    batch * inputs
                ),
            ));
        }
        let ws = self.workspace(dev, batch)?;
        dev.write(&mut B::view_mut(&mut ws.x), x)?;
        dev.write(&mut B::view_mut(&mut ws.labels), labels)?;
        Ok(batch)
    }

    /// Forward over the loaded batch; the logits stay in the workspace.
    pub fn forward(&mut self, dev: &B) -> Result<()> {
        let ws = self.ws.as_mut().ok_or_else(|| Error::Invalid("forward before load_batch".into()))?;
        let batch = ws.batch;
        let depth = self.layout.len();
        let p = B::view(&self.params);
        for (i, l) in self.layout.iter().enumerate() {
            let last = i + 1 == depth;
            let g =
                Gemm::new(batch, l.fan_out, l.fan_in).activation(if last { Activation::None } else { self.cfg.act });
            let z = &mut ws.z[i];
            let (a_prev, a_rest) = ws.a.split_at_mut(i);
            let input = if i == 0 { B::view(&ws.x) } else { B::view(&a_prev[i - 1]) };
            let w = B::sub(&p, l.weight.clone());
            let b = B::sub(&p, l.bias.clone());
            if last {
                dev.gemm(&g, &input, &w, Some(&b), &mut B::view_mut(z), None)?;
            } else {
                dev.gemm(&g, &input, &w, Some(&b), &mut B::view_mut(z), Some(&mut B::view_mut(&mut a_rest[0])))?;
            }
        }
        Ok(())
    }

    /// The logits of the last forward (`batch x classes`), on the host.
    pub fn logits(&self, dev: &B) -> Result<Vec<f32>> {
        let ws = self.ws.as_ref().ok_or_else(|| Error::Invalid("logits before forward".into()))?;
        dev.download(&B::view(ws.z.last().unwrap()))
    }

    /// Mean cross-entropy of the last forward against the loaded labels.
    pub fn loss(&self, dev: &B) -> Result<f32> {
        let ws = self.ws.as_ref().ok_or_else(|| Error::Invalid("loss before forward".into()))?;
        dev.xent(ws.batch, self.cfg.outputs(), &B::view(ws.z.last().unwrap()), &B::view(&ws.labels))
    }

    /// Cross-entropy and its gradient, then backward through every layer: the gradients land
    /// in the gradient buffer (added to it when `accumulate`). Returns the mean loss.
    pub fn backward(&mut self, dev: &B, accumulate: bool) -> Result<f32> {
        let classes = self.cfg.outputs();
        let ws = self.ws.as_mut().ok_or_else(|| Error::Invalid("backward before forward".into()))?;
        let batch = ws.batch;
        let beta = if accumulate { 1.0 } else { 0.0 };
        let loss = {
            let mut dz = B::view_mut(&mut ws.dz);
            let mut dlogits = B::sub_mut(&mut dz, 0..batch * classes);
            let logits = B::view(ws.z.last().unwrap());
            let loss = dev.xent_backward(batch, classes, &logits, &B::view(&ws.labels), &mut dlogits)?;
            loss
        };
        let p = B::view(&self.params);
        let mut gv = B::view_mut(&mut self.grads);
        for i in (0..self.layout.len()).rev() {
            let l = &self.layout[i];
            {
                let dz_all = B::view(&ws.dz);
                let dz = B::sub(&dz_all, 0..batch * l.fan_out);
                let input = if i == 0 { B::view(&ws.x) } else { B::view(&ws.a[i - 1]) };
                // dW = input^T dz, db = column sums of dz.
                let gw = Gemm::new(l.fan_in, l.fan_out, batch).trans_a(true).beta(beta);
                dev.gemm(&gw, &input, &dz, None, &mut B::sub_mut(&mut gv, l.weight.clone()), None)?;
                dev.col_sum(batch, l.fan_out, &dz, beta, &mut B::sub_mut(&mut gv, l.bias.clone()))?;
                if i == 0 {
                    break;
                }
                // da = dz W^T.
                let gd = Gemm::new(batch, l.fan_in, l.fan_out).trans_b(true);
                let mut da = B::view_mut(&mut ws.da);
                dev.gemm(
                    &gd,
                    &dz,
                    &B::sub(&p, l.weight.clone()),
                    None,
                    &mut B::sub_mut(&mut da, 0..batch * l.fan_in),
                    None,
                )?;
            }
            // dz_prev = da * act'(z_prev), into the dz scratch (the old dz is no longer needed).
            let da_all = B::view(&ws.da);
            let mut dzv = B::view_mut(&mut ws.dz);
            dev.act_backward(
                self.cfg.act,
                &B::view(&ws.z[i - 1]),
                &B::sub(&da_all, 0..batch * l.fan_in),
                &mut B::sub_mut(&mut dzv, 0..batch * l.fan_in),
            )?;
        }
        debug_assert_eq!(gv.view_len(), self.cfg.param_count());
        Ok(loss)
    }
}
