//! Layers and models: Linear layers (one fused GEMM launch each: bias and activation in the
//! epilogue) stacked into an MLP of any widths with ReLU, GELU or SiLU between them.
//!
//! A model's parameters live in one contiguous device buffer and its gradients in another,
//! with a view per layer (`layers.{i}.weight`, `in x out`, then `layers.{i}.bias`), so that an
//! optimizer step or an all-reduce is a few large calls. Forward keeps each layer's
//! pre-activation and activation; backward produces every gradient with the kernels.

use std::ops::Range;
use std::str::FromStr;

use std::collections::HashMap;

use crate::backend::Backend;
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
        // The kernels index with 32-bit integers; the parameter count must fit an address.
        if let Some(&w) = widths.iter().find(|&&w| w > i32::MAX as usize) {
            return Err(Error::Invalid(format!("width {w} is beyond the kernels' limit of {} units", i32::MAX)));
        }
        let params = widths.windows(2).try_fold(0u64, |acc, w| {
            (w[0] as u64).checked_mul(w[1] as u64)?.checked_add(w[1] as u64)?.checked_add(acc)
        });
        if params.is_none_or(|p| p > (isize::MAX as u64) / 16) {
            return Err(Error::Invalid(format!(
                "widths {widths:?} describe more parameters than any machine can hold"
            )));
        }
        Ok(MlpConfig { widths, act })
    }

    /// Parses `784,512,512,10` (also `784-512-512-10` or `784x512x10`, one separator kind per
    /// list). An empty item (`784,,10`) or a sign is an error, not skipped.
    pub fn parse_widths(s: &str) -> Result<Vec<usize>> {
        let bad = |why: String| Error::Invalid(format!("width list `{s}`: {why} (example: 784,512,512,10)"));
        let t = s.trim();
        if t.is_empty() {
            return Err(bad("it is empty".into()));
        }
        // One separator for the whole list, so that `784,-3,10` is not read as 784, 3, 10.
        let sep = [',', 'x', '-'].into_iter().find(|&c| t.contains(c)).unwrap_or(',');
        t.split(sep)
            .map(|item| {
                let item = item.trim();
                if item.is_empty() {
                    return Err(bad("an empty item (two separators in a row, or one at an end)".into()));
                }
                // Digits only: `+512` would parse, and a sign is no part of a width.
                if !item.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(bad(format!("`{item}` is not a whole number")));
                }
                item.parse::<usize>().map_err(|_| bad(format!("`{item}` is too large")))
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

/// Called by [`Stage::backward`] with a local layer index and the gradient buffer as soon as
/// that layer's gradients are final.
pub type LayerDone<'a, B> = dyn FnMut(usize, &<B as Backend>::Buf<f32>) -> Result<()> + 'a;

/// The activations one microbatch keeps between its forward and its backward on a stage.
struct Acts<B: Backend> {
    rows: usize,
    /// The stage's input (`rows x fan_in` of its first layer).
    x: B::Buf<f32>,
    /// Labels, on the last stage.
    labels: B::Buf<i32>,
    /// Pre-activation of each layer.
    z: Vec<B::Buf<f32>>,
    /// Activation of each layer but the model's last.
    a: Vec<B::Buf<f32>>,
}

/// A contiguous range of an MLP's layers on one device: a pipeline stage, or the whole model.
///
/// Its parameters and gradients are one buffer each, with the layers' slots in the order of
/// [`MlpConfig::layout`] (offsets relative to the stage). Several microbatches may be in flight:
/// each keeps its activations, in a slot keyed by the microbatch number, from its forward to
/// its backward. A non-last stage's output is its last layer's activation; its backward takes
/// the gradient of that output and leaves the gradient of its input for the previous stage.
pub struct Stage<B: Backend> {
    cfg: MlpConfig,
    layers: Range<usize>,
    layout: Vec<LayerSlot>,
    params: B::Buf<f32>,
    grads: B::Buf<f32>,
    slots: HashMap<usize, Acts<B>>,
    spare: Vec<Acts<B>>,
    /// Backward scratch (`rows x widest`): the gradient of a layer's pre-activation, and of its
    /// input; `dx` keeps the stage's input gradient after a backward.
    dz: B::Buf<f32>,
    dx: B::Buf<f32>,
    scratch_rows: usize,
    /// Whether the gradient buffer holds this step's gradients yet (else the next backward
    /// overwrites instead of adding).
    grads_live: bool,
}

impl<B: Ops> Stage<B> {
    /// Layers `layers` of `cfg`, holding `params` (the stage's slice of the model's flat
    /// parameters).
    pub fn new(dev: &B, cfg: MlpConfig, layers: Range<usize>, params: &[f32]) -> Result<Self> {
        if layers.is_empty() || layers.end > cfg.depth() {
            return Err(Error::Invalid(format!(
                "stage layers {layers:?} are not inside the model's {} layers",
                cfg.depth()
            )));
        }
        let full = cfg.layout();
        let base = full[layers.start].weight.start;
        let layout: Vec<LayerSlot> = full[layers.clone()]
            .iter()
            .map(|l| LayerSlot {
                fan_in: l.fan_in,
                fan_out: l.fan_out,
                weight: l.weight.start - base..l.weight.end - base,
                bias: l.bias.start - base..l.bias.end - base,
            })
            .collect();
        let n = layout.last().unwrap().bias.end;
        if params.len() != n {
            return Err(Error::shape(
                "Stage::new",
                format!(
                    "{} parameters given for layers {layers:?} of {}, which hold {n}",
                    params.len(),
                    cfg.widths_string()
                ),
            ));
        }
        Ok(Stage {
            params: dev.upload(params)?,
            grads: dev.alloc(n)?,
            cfg,
            layers,
            layout,
            slots: HashMap::new(),
            spare: Vec::new(),
            // One element until the first backward sizes them (no zero-length device buffers).
            dz: dev.alloc(1)?,
            dx: dev.alloc(1)?,
            scratch_rows: 0,
            grads_live: false,
        })
    }

    /// The model this stage is part of.
    pub fn config(&self) -> &MlpConfig {
        &self.cfg
    }
    /// Which of the model's layers it holds.
    pub fn layers(&self) -> Range<usize> {
        self.layers.clone()
    }
    /// Its layers' slots in its flat buffers.
    pub fn layout(&self) -> &[LayerSlot] {
        &self.layout
    }
    /// Whether it holds the model's first layer (its input is data).
    pub fn is_first(&self) -> bool {
        self.layers.start == 0
    }
    /// Whether it holds the model's last layer (it computes the loss).
    pub fn is_last(&self) -> bool {
        self.layers.end == self.cfg.depth()
    }
    /// Features of its input.
    pub fn fan_in(&self) -> usize {
        self.layout[0].fan_in
    }
    /// Features of its output.
    pub fn fan_out(&self) -> usize {
        self.layout.last().unwrap().fan_out
    }
    /// Parameters.
    pub fn params(&self) -> &B::Buf<f32> {
        &self.params
    }
    /// Gradients.
    pub fn grads(&self) -> &B::Buf<f32> {
        &self.grads
    }
    /// Gradients, writable (to all-reduce or scale them).
    pub fn grads_mut(&mut self) -> &mut B::Buf<f32> {
        &mut self.grads
    }
    /// Parameters (writable) and gradients, for an optimizer step.
    pub fn params_and_grads(&mut self) -> (&mut B::Buf<f32>, &B::Buf<f32>) {
        (&mut self.params, &self.grads)
    }
    /// Starts a new step: the next backward overwrites the gradients instead of adding.
    pub fn start_step(&mut self) {
        self.grads_live = false;
    }
    /// Microbatches whose activations are held (forwarded, not yet backwarded).
    pub fn in_flight(&self) -> usize {
        self.slots.len()
    }

    fn slot(&mut self, dev: &B, mb: usize, rows: usize) -> Result<&mut Acts<B>> {
        if !self.slots.contains_key(&mb) {
            let acts = match self.spare.iter().position(|a| a.rows == rows) {
                Some(i) => self.spare.swap_remove(i),
                None => {
                    let depth = self.cfg.depth();
                    let mut z = Vec::new();
                    let mut a = Vec::new();
                    for (i, l) in self.layout.iter().enumerate() {
                        z.push(dev.alloc(rows * l.fan_out)?);
                        if self.layers.start + i + 1 < depth {
                            a.push(dev.alloc(rows * l.fan_out)?);
                        }
                    }
                    Acts { rows, x: dev.alloc(rows * self.fan_in())?, labels: dev.alloc(rows)?, z, a }
                }
            };
            self.slots.insert(mb, acts);
        }
        let acts = self.slots.get_mut(&mb).unwrap();
        if acts.rows != rows {
            return Err(Error::Invalid(format!("microbatch {mb} is in flight with {} rows, not {rows}", acts.rows)));
        }
        Ok(acts)
    }

    /// The input buffer of microbatch `mb` (`rows x fan_in`), to be filled before its forward.
    pub(crate) fn input_mut(&mut self, dev: &B, mb: usize, rows: usize) -> Result<&mut B::Buf<f32>> {
        Ok(&mut self.slot(dev, mb, rows)?.x)
    }

    /// Writes microbatch `mb`'s input and (on the last stage) labels from the host.
    pub fn load(&mut self, dev: &B, mb: usize, x: &[f32], labels: &[i32]) -> Result<()> {
        let rows = labels.len();
        if rows == 0 {
            return Err(Error::shape("Stage::load", "the batch is empty"));
        }
        let fan_in = self.fan_in();
        if x.len() != rows * fan_in {
            return Err(Error::shape(
                "Stage::load",
                format!(
                    "inputs hold {} values for {rows} labels; the model takes {fan_in} features per sample ({} expected)",
                    x.len(),
                    rows * fan_in
                ),
            ));
        }
        let acts = self.slot(dev, mb, rows)?;
        dev.write(&mut B::view_mut(&mut acts.x), x)?;
        dev.write(&mut B::view_mut(&mut acts.labels), labels)
    }

    /// Writes microbatch `mb`'s labels (last stage) from the host.
    pub fn load_labels(&mut self, dev: &B, mb: usize, labels: &[i32]) -> Result<()> {
        let acts = self.slot(dev, mb, labels.len())?;
        dev.write(&mut B::view_mut(&mut acts.labels), labels)
    }

    /// Forward of microbatch `mb`, whose input is loaded. Each layer is one fused GEMM launch.
    pub fn forward(&mut self, dev: &B, mb: usize) -> Result<()> {
        let acts = self
            .slots
            .get_mut(&mb)
            .ok_or_else(|| Error::Invalid(format!("forward of microbatch {mb} before its input")))?;
        let rows = acts.rows;
        let depth = self.cfg.depth();
        let p = B::view(&self.params);
        for (i, l) in self.layout.iter().enumerate() {
            let model_last = self.layers.start + i + 1 == depth;
            let act = if model_last { Activation::None } else { self.cfg.act };
            let g = Gemm::new(rows, l.fan_out, l.fan_in).activation(act);
            let (a_prev, a_rest) = acts.a.split_at_mut(i);
            let input = if i == 0 { B::view(&acts.x) } else { B::view(&a_prev[i - 1]) };
            let (w, b) = (B::sub(&p, l.weight.clone()), B::sub(&p, l.bias.clone()));
            let z = &mut acts.z[i];
            if model_last {
                dev.gemm(&g, &input, &w, Some(&b), &mut B::view_mut(z), None)?;
            } else {
                dev.gemm(&g, &input, &w, Some(&b), &mut B::view_mut(z), Some(&mut B::view_mut(&mut a_rest[0])))?;
            }
        }
        Ok(())
    }

    /// The output of microbatch `mb`'s forward: the activation of the stage's last layer, or
    /// the logits on the last stage.
    pub fn output(&self, mb: usize) -> Result<&B::Buf<f32>> {
        let acts =
            self.slots.get(&mb).ok_or_else(|| Error::Invalid(format!("no forward of microbatch {mb} in flight")))?;
        Ok(if self.is_last() { acts.z.last().unwrap() } else { acts.a.last().unwrap() })
    }

    /// Mean cross-entropy of microbatch `mb`'s logits (last stage).
    pub fn loss(&self, dev: &B, mb: usize) -> Result<f32> {
        let acts =
            self.slots.get(&mb).ok_or_else(|| Error::Invalid(format!("no forward of microbatch {mb} in flight")))?;
        dev.xent(acts.rows, self.cfg.outputs(), &B::view(acts.z.last().unwrap()), &B::view(&acts.labels))
    }

    fn scratch(&mut self, dev: &B, rows: usize) -> Result<()> {
        if self.scratch_rows < rows {
            let widest = *self.cfg.widths[self.layers.start..=self.layers.end].iter().max().unwrap();
            self.dz = dev.alloc(rows * widest)?;
            self.dx = dev.alloc(rows * widest)?;
            self.scratch_rows = rows;
        }
        Ok(())
    }

    /// Backward of microbatch `mb`: on the last stage from the loss (`dlogits = loss_scale *
    /// (softmax - onehot)`, `loss_scale` = 1 / rows of the whole batch), elsewhere from
    /// `grad_out`, the gradient of the stage's output. Adds to the gradients (overwrites on the
    /// first backward of a step), leaves the input gradient for [`Stage::input_grad`] (except
    /// on the first stage) and calls `layer_done(i)` as soon as local layer `i`'s gradients
    /// are final for this microbatch. The activations stay until [`Stage::release`]. Returns
    /// the microbatch's share of the loss on the last stage.
    pub fn backward(
        &mut self,
        dev: &B,
        mb: usize,
        grad_out: Option<&B::Ref<'_, f32>>,
        loss_scale: f32,
        layer_done: &mut LayerDone<'_, B>,
    ) -> Result<Option<f32>> {
        let rows = self
            .slots
            .get(&mb)
            .ok_or_else(|| Error::Invalid(format!("backward of microbatch {mb} without its forward")))?
            .rows;
        self.scratch(dev, rows)?;
        let acts = &self.slots[&mb];
        let beta = if self.grads_live { 1.0 } else { 0.0 };
        let last_local = self.layout.len() - 1;
        let out_w = self.fan_out();
        let (is_first, is_last) = (self.is_first(), self.is_last());
        let mut loss = None;
        {
            let mut dz = B::view_mut(&mut self.dz);
            let mut dz = B::sub_mut(&mut dz, 0..rows * out_w);
            if is_last {
                let logits = B::view(acts.z.last().unwrap());
                loss = Some(dev.xent_backward_scaled(
                    rows,
                    out_w,
                    &logits,
                    &B::view(&acts.labels),
                    loss_scale,
                    &mut dz,
                )?);
            } else {
                let g = grad_out
                    .ok_or_else(|| Error::Invalid("a non-last stage's backward needs the output gradient".into()))?;
                dev.act_backward(self.cfg.act, &B::view(&acts.z[last_local]), g, &mut dz)?;
            }
        }
        for i in (0..self.layout.len()).rev() {
            let l = self.layout[i].clone();
            {
                let p = B::view(&self.params);
                let mut gv = B::view_mut(&mut self.grads);
                let dz_all = B::view(&self.dz);
                let dz = B::sub(&dz_all, 0..rows * l.fan_out);
                let input = if i == 0 { B::view(&acts.x) } else { B::view(&acts.a[i - 1]) };
                // dW = input^T dz, db = column sums of dz.
                let gw = Gemm::new(l.fan_in, l.fan_out, rows).trans_a(true).beta(beta);
                dev.gemm(&gw, &input, &dz, None, &mut B::sub_mut(&mut gv, l.weight.clone()), None)?;
                dev.col_sum(rows, l.fan_out, &dz, beta, &mut B::sub_mut(&mut gv, l.bias.clone()))?;
                if i > 0 || !is_first {
                    // dX = dz W^T: the input gradient of this layer.
                    let gd = Gemm::new(rows, l.fan_in, l.fan_out).trans_b(true);
                    let mut dx = B::view_mut(&mut self.dx);
                    let w = B::sub(&p, l.weight.clone());
                    dev.gemm(&gd, &dz, &w, None, &mut B::sub_mut(&mut dx, 0..rows * l.fan_in), None)?;
                }
            }
            layer_done(i, &self.grads)?;
            if i > 0 {
                // dz_prev = dX * act'(z_prev), into the dz scratch (the old dz is spent).
                let dx_all = B::view(&self.dx);
                let mut dzv = B::view_mut(&mut self.dz);
                dev.act_backward(
                    self.cfg.act,
                    &B::view(&acts.z[i - 1]),
                    &B::sub(&dx_all, 0..rows * l.fan_in),
                    &mut B::sub_mut(&mut dzv, 0..rows * l.fan_in),
                )?;
            }
        }
        self.grads_live = true;
        Ok(loss)
    }

    /// Frees microbatch `mb`'s activations (after its backward); their buffers are reused.
    pub fn release(&mut self, mb: usize) {
        if let Some(acts) = self.slots.remove(&mb) {
            if self.spare.len() >= 4 {
                self.spare.remove(0);
            }
            self.spare.push(acts);
        }
    }

    /// The gradient of the stage's input from the last backward (`rows x fan_in`), to send to
    /// the previous stage.
    pub fn input_grad(&self, rows: usize) -> B::Ref<'_, f32> {
        B::view_range(&self.dx, 0..rows * self.fan_in())
    }
}

/// An MLP on one device: a [`Stage`] holding every layer, fed one batch at a time.
pub struct Mlp<B: Backend> {
    stage: Stage<B>,
    rows: usize,
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
        let depth = cfg.depth();
        Ok(Mlp { stage: Stage::new(dev, cfg, 0..depth, params)?, rows: 0 })
    }

    /// The config.
    pub fn config(&self) -> &MlpConfig {
        self.stage.config()
    }
    /// Every layer's slot in the flat buffers.
    pub fn layout(&self) -> &[LayerSlot] {
        self.stage.layout()
    }
    /// The flat parameter buffer.
    pub fn params(&self) -> &B::Buf<f32> {
        self.stage.params()
    }
    /// The flat gradient buffer (of the last backward).
    pub fn grads(&self) -> &B::Buf<f32> {
        self.stage.grads()
    }
    /// The gradient buffer, writable (to scale or all-reduce it).
    pub fn grads_mut(&mut self) -> &mut B::Buf<f32> {
        self.stage.grads_mut()
    }
    /// Parameters and gradients together, for an optimizer step.
    pub fn params_and_grads(&mut self) -> (&mut B::Buf<f32>, &B::Buf<f32>) {
        self.stage.params_and_grads()
    }
    /// Copies the parameters to the host.
    pub fn download_params(&self, dev: &B) -> Result<Vec<f32>> {
        dev.download(&B::view(self.stage.params()))
    }

    /// Uploads a batch of `x` (`batch x inputs`) and labels. Returns the batch size.
    pub fn load_batch(&mut self, dev: &B, x: &[f32], labels: &[i32]) -> Result<usize> {
        if self.rows != 0 && self.rows != labels.len() {
            // A different batch size: set the old batch's activations aside.
            self.stage.release(0);
        }
        self.stage.load(dev, 0, x, labels)?;
        self.rows = labels.len();
        Ok(self.rows)
    }

    /// Forward over the loaded batch; the logits stay on the device.
    pub fn forward(&mut self, dev: &B) -> Result<()> {
        self.stage.forward(dev, 0)
    }

    /// The logits of the last forward (`batch x classes`), on the host.
    pub fn logits(&self, dev: &B) -> Result<Vec<f32>> {
        dev.download(&B::view(self.stage.output(0)?))
    }

    /// Mean cross-entropy of the last forward against the loaded labels.
    pub fn loss(&self, dev: &B) -> Result<f32> {
        self.stage.loss(dev, 0)
    }

    /// Cross-entropy and its gradient, then backward through every layer: the gradients land
    /// in the gradient buffer (added to it when `accumulate`). Returns the mean loss.
    pub fn backward(&mut self, dev: &B, accumulate: bool) -> Result<f32> {
        if !accumulate {
            self.stage.start_step();
        }
        let rows = self.rows;
        let loss = self.stage.backward(dev, 0, None, 1.0 / rows.max(1) as f32, &mut |_, _| Ok(()))?;
        Ok(loss.unwrap_or(f32::NAN))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn width_lists_parse_with_one_separator_and_refuse_gaps_and_signs() {
        for s in ["784,512,10", "784-512-10", "784x512x10", " 784, 512 ,10 "] {
            assert_eq!(MlpConfig::parse_widths(s).unwrap(), vec![784, 512, 10], "{s}");
        }
        for (s, why) in [
            ("784,-3,10", "`-3` is not a whole number"),
            ("784,,10", "an empty item"),
            ("784,10,", "an empty item"),
            ("", "it is empty"),
            ("784,abc", "`abc` is not a whole number"),
            ("784,+512,10", "`+512` is not a whole number"),
        ] {
            let err = MlpConfig::parse_widths(s).unwrap_err().to_string();
            assert!(err.contains(why), "{s}: {err}");
        }
    }
}
