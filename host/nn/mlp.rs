//! The MLP: Linear layers (one fused GEMM launch each: bias and activation in the epilogue)
//! stacked into a [`Model`] of any widths with ReLU, GELU or SiLU between them, and
//! [`Network`], a whole model on one device fed one batch at a time.

use std::str::FromStr;

use crate::backend::cpu::CpuDevice;
use crate::error::{Error, Result};
use crate::nn::{Linear, Model, ModelInfo, Stage};
use crate::ops::activation::Activation;
use crate::ops::Ops;

/// The shape of an MLP: widths from input to classes, and the activation between layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MlpConfig {
    /// `[inputs, hidden..., outputs]`.
    pub widths: Vec<usize>,
    /// Activation after every layer but the last.
    pub act: Activation,
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

    /// Total parameters.
    pub fn param_count(&self) -> usize {
        self.widths.windows(2).map(|w| w[0] * w[1] + w[1]).sum()
    }

    /// FLOPs of one forward and backward pass per sample (`6 * sum(in*out)`).
    pub fn train_flops_per_sample(&self) -> f64 {
        6.0 * self.widths.windows(2).map(|w| (w[0] * w[1]) as f64).sum::<f64>()
    }

    /// The model: a [`Linear`] layer per pair of widths, each followed by the activation but
    /// the last (whose output is the logits). Its parameters are `layers.{i}.weight`
    /// (`in x out`) and `layers.{i}.bias`.
    ///
    /// Under tensor parallelism the layers pair up as Megatron-LM's MLP: layer 0 column-parallel
    /// and layer 1 row-parallel, then 2 and 3, and so on (a last layer without a partner stays
    /// whole), so that the hidden widths between the two of a pair are split: one all-reduce
    /// forward and one backward per pair.
    pub fn model<B: Ops>(&self) -> Model<B> {
        let depth = self.depth();
        self.widths.windows(2).enumerate().fold(Model::new(&self.describe()), |m, (i, w)| {
            let act = if i + 1 == depth { Activation::None } else { self.act };
            m.push(match (i % 2, i + 1 < depth || i % 2 == 1) {
                (0, true) => Linear::column(w[0], w[1], act),
                (1, _) => Linear::row(w[0], w[1], act),
                _ => Linear::new(w[0], w[1], act),
            })
        })
    }

    /// `MLP 784-512-512-10 (relu)`.
    pub fn describe(&self) -> String {
        format!("MLP {} ({})", self.widths_string(), self.act)
    }

    /// The config that [`MlpConfig::describe`] described (`MLP 784-512-512-10 (relu)`), or
    /// `None` when `s` does not describe an MLP.
    pub fn from_description(s: &str) -> Option<MlpConfig> {
        let rest = s.trim().strip_prefix("MLP ")?;
        let (widths, act) = rest.split_once(" (")?;
        let act = act.strip_suffix(')')?.parse::<Activation>().ok()?;
        MlpConfig::new(MlpConfig::parse_widths(widths).ok()?, act).ok()
    }

    /// The model described without a device.
    pub fn info(&self) -> ModelInfo {
        self.model::<CpuDevice>().info().expect("a checked MlpConfig makes a valid model")
    }

    /// Seeded initial parameters: Kaiming-uniform (`sqrt(6 / fan_in)`) for layers followed by
    /// an activation, Xavier-uniform (`sqrt(6 / (fan_in + fan_out))`) for the output layer;
    /// zero biases.
    pub fn init(&self, seed: u64) -> Vec<f32> {
        self.model::<CpuDevice>().init(seed).expect("a checked MlpConfig makes a valid model")
    }
}

impl FromStr for MlpConfig {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        MlpConfig::new(MlpConfig::parse_widths(s)?, Activation::Relu)
    }
}

/// A whole model on one device (one [`Stage`] holding every layer), fed one batch at a time:
/// the building block of the single-device trainer and of loops of one's own.
pub struct Network<B: Ops> {
    stage: Stage<B>,
    rows: usize,
}

impl<B: Ops> Network<B> {
    /// `model` with its seeded initial parameters.
    pub fn new(dev: &B, model: &Model<B>, seed: u64) -> Result<Self> {
        Self::with_params(dev, model, &model.init(seed)?)
    }

    /// `model` holding the given flat parameters (in the order of [`ModelInfo::params`]).
    pub fn with_params(dev: &B, model: &Model<B>, params: &[f32]) -> Result<Self> {
        let info = model.info()?;
        crate::nn::check_flat("Network::with_params", &info, params)?;
        Ok(Network { stage: Stage::new(dev, model, 0..info.depth(), params)?, rows: 0 })
    }

    /// The model, described.
    pub fn info(&self) -> &ModelInfo {
        self.stage.info()
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
        let rows = labels.len() / self.info().labels_per_sample().max(1);
        if self.rows != 0 && self.rows != rows {
            // A different batch size: set the old batch's activations aside.
            self.stage.release(0);
        }
        self.stage.load(dev, 0, x, labels)?;
        self.rows = rows;
        Ok(self.rows)
    }

    /// Forward over the loaded batch; the logits stay on the device.
    pub fn forward(&mut self, dev: &B) -> Result<()> {
        self.stage.forward(dev, 0)
    }

    /// The logits of the last forward (`labels x classes`), on the host.
    pub fn logits(&self, dev: &B) -> Result<Vec<f32>> {
        dev.download(&B::view(self.stage.output(0)?))
    }

    /// Where the parameters sit in the buffer (and which skip weight decay).
    pub fn layout(&self) -> &crate::nn::StageLayout {
        self.stage.layout()
    }

    /// Mean cross-entropy of the last forward against the loaded labels.
    pub fn loss(&self, dev: &B) -> Result<f32> {
        self.stage.loss(dev, 0)
    }

    /// The mean loss over many samples (`x`, `labels` as [`Network::load_batch`] takes them),
    /// forward only, `batch` samples at a time: each batch's mean weighed by its samples.
    pub fn mean_loss(&mut self, dev: &B, x: &[f32], labels: &[i32], batch: usize) -> Result<f64> {
        let (inputs, lps) = (self.info().inputs(), self.info().labels_per_sample());
        let rows = x.len() / inputs.max(1);
        let batch = batch.max(1);
        let mut total = 0f64;
        for start in (0..rows).step_by(batch) {
            let end = (start + batch).min(rows);
            self.load_batch(dev, &x[start * inputs..end * inputs], &labels[start * lps..end * lps])?;
            self.forward(dev)?;
            total += self.loss(dev)? as f64 * (end - start) as f64;
        }
        Ok(total / rows.max(1) as f64)
    }

    /// Cross-entropy and its gradient, then backward through every layer: the gradients land
    /// in the gradient buffer (added to it when `accumulate`). Returns the mean loss.
    pub fn backward(&mut self, dev: &B, accumulate: bool) -> Result<f32> {
        if !accumulate {
            self.stage.start_step();
        }
        let labels = self.rows * self.info().labels_per_sample();
        let loss = self.stage.backward(dev, 0, None, 1.0 / labels.max(1) as f32, &mut |_, _| Ok(()))?;
        Ok(loss.unwrap_or(f32::NAN))
    }

    /// [`Network::backward`] with the mean loss left on the device in `loss[0]`: nothing is
    /// read back, so the host does not wait.
    pub fn backward_to(&mut self, dev: &B, accumulate: bool, loss: &mut B::Mut<'_, f32>) -> Result<()> {
        if !accumulate {
            self.stage.start_step();
        }
        let labels = self.rows * self.info().labels_per_sample();
        self.stage.backward_to(dev, 0, None, 1.0 / labels.max(1) as f32, &mut |_, _| Ok(()), loss)
    }

    /// An error if the device's cross-entropy met a label out of range (see
    /// [`Stage::check_loss_flags`]).
    pub fn check_loss_flags(&self, dev: &B) -> Result<()> {
        self.stage.check_loss_flags(dev)
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
