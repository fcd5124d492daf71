//! The single-device trainer: `step(batch) -> loss`, evaluation, optimizers with learning-rate
//! schedules and global gradient-norm clipping, and the epoch loop with a seeded shuffle that
//! a checkpoint can resume exactly.

use std::fmt;
use std::str::FromStr;

use crate::data::{batch_indices, batches_per_epoch, epoch_order, Dataset};
use crate::error::{Error, Result};
use crate::nn::{Model, ModelInfo, Network};
pub use crate::ops::optim::{apply_optimizer, apply_optimizer_masked, apply_optimizer_part, OptimizerConfig};
use crate::ops::Ops;

/// How the learning rate moves with the step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LrSchedule {
    /// The base rate throughout.
    Constant,
    /// Linear warm-up over `warmup` steps, then a cosine decay to `min_factor` times the base
    /// rate at step `total`.
    Cosine {
        /// Warm-up steps.
        warmup: u64,
        /// Step at which the decay ends.
        total: u64,
        /// Final rate as a fraction of the base rate.
        min_factor: f32,
    },
}

impl LrSchedule {
    /// The factor on the base rate at step `t` (0-based).
    pub fn factor(&self, t: u64) -> f32 {
        match *self {
            LrSchedule::Constant => 1.0,
            LrSchedule::Cosine { warmup, total, min_factor } => {
                if t < warmup {
                    return (t + 1) as f32 / warmup as f32;
                }
                let span = total.saturating_sub(warmup).max(1);
                let p = ((t - warmup) as f64 / span as f64).min(1.0);
                min_factor + (1.0 - min_factor) * (0.5 * (1.0 + (std::f64::consts::PI * p).cos())) as f32
            }
        }
    }
}

impl fmt::Display for LrSchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LrSchedule::Constant => write!(f, "constant"),
            LrSchedule::Cosine { warmup, total, min_factor } => {
                write!(f, "cosine(warmup={warmup}, total={total}, min={min_factor})")
            }
        }
    }
}

/// How a model is trained (apart from the model and the data): the optimizer, its schedule,
/// clipping and the seed.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// The optimizer.
    pub optimizer: OptimizerConfig,
    /// The learning-rate schedule.
    pub schedule: LrSchedule,
    /// Clip the global gradient norm to this (none: no clipping).
    pub clip_norm: Option<f32>,
    /// Seed of the initialisation and of the data order.
    pub seed: u64,
}

impl TrainConfig {
    /// Checks the optimizer's hyper-parameters and the clipping norm (positive and finite).
    /// Every trainer and engine calls it before it takes the configuration.
    pub fn validate(&self) -> Result<()> {
        self.optimizer.validate()?;
        if let Some(c) = self.clip_norm {
            if !(c > 0.0 && c.is_finite()) {
                return Err(Error::Invalid(format!(
                    "gradient clipping norm (--clip) {c}: must be a positive number, e.g. 1 (leave it out for no clipping)"
                )));
            }
        }
        Ok(())
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    /// Mean loss of the batch (before the update); when steps leave their loss on the device
    /// ([`Run::train_step_reading`]), the mean of the `loss_steps` steps' losses since it was
    /// last read, and NaN on a step that did not read it.
    pub loss: f32,
    /// How many steps' losses `loss` averages: 1 for a step that read its own, 0 for a step
    /// that left it on the device.
    pub loss_steps: u64,
    /// The learning rate used.
    pub lr: f32,
    /// Global gradient norm before clipping, when clipping is on.
    pub grad_norm: Option<f32>,
}

/// Loss and accuracy over a data set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Eval {
    /// Mean loss.
    pub loss: f32,
    /// Correct predictions.
    pub correct: usize,
    /// Samples.
    pub total: usize,
}

impl Eval {
    /// `correct / total`.
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.total.max(1) as f64
    }
}

/// Where the epoch loop is: the next batch to train is batch `batch` of epoch `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cursor {
    /// Epoch (0-based).
    pub epoch: u64,
    /// Batch within the epoch (0-based).
    pub batch: u64,
}

/// A model, its optimizer state and step count, on one device.
pub struct Trainer<B: Ops> {
    dev: B,
    cfg: TrainConfig,
    net: Network<B>,
    state: Vec<B::Buf<f32>>,
    step: u64,
    /// The losses of the steps not read yet, on the device (slot k: the k-th such step).
    losses: B::Buf<f32>,
    unread: usize,
}

/// Steps whose losses a [`Trainer`] keeps on the device before it must read them.
pub const LOSS_SLOTS: usize = 64;

impl<B: Ops> Trainer<B> {
    /// A fresh run of `model`: its seeded parameters (`cfg.seed`), zero optimizer state.
    pub fn new(dev: &B, model: &Model<B>, cfg: TrainConfig) -> Result<Self> {
        cfg.validate()?;
        let net = Network::new(dev, model, cfg.seed)?;
        Self::from_parts(dev, cfg, net, None, 0)
    }

    /// A run restored from a network, optimizer state (one vector per slot) and step.
    pub fn from_parts(
        dev: &B,
        cfg: TrainConfig,
        net: Network<B>,
        state: Option<&[Vec<f32>]>,
        step: u64,
    ) -> Result<Self> {
        cfg.validate()?;
        let n = net.info().param_count();
        let slots = cfg.optimizer.slots().len();
        let state = match state {
            Some(s) => {
                if s.len() != slots || s.iter().any(|v| v.len() != n) {
                    return Err(Error::shape(
                        "Trainer::from_parts",
                        format!("optimizer state must be {slots} buffers of {n}"),
                    ));
                }
                s.iter().map(|v| dev.upload(v)).collect::<Result<Vec<_>>>()?
            }
            None => (0..slots).map(|_| dev.alloc(n)).collect::<Result<Vec<_>>>()?,
        };
        let losses = dev.alloc(LOSS_SLOTS)?;
        Ok(Trainer { dev: dev.clone(), cfg, net, state, step, losses, unread: 0 })
    }

    /// The run's config.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }
    /// The device.
    pub fn device(&self) -> &B {
        &self.dev
    }
    /// The network.
    pub fn network(&self) -> &Network<B> {
        &self.net
    }
    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }
    /// The optimizer state on the host, one vector per slot.
    pub fn optimizer_state(&self) -> Result<Vec<Vec<f32>>> {
        self.state.iter().map(|s| self.dev.download(&B::view(s))).collect()
    }

    /// One step on a batch (`x`: `samples x inputs`): forward, loss, backward, clipping,
    /// optimizer update. Returns what the step did: the batch's mean loss, the learning rate
    /// used and, with clipping, the gradient norm.
    pub fn step(&mut self, x: &[f32], labels: &[i32]) -> Result<StepStats> {
        self.step_reading(x, labels, true)
    }

    /// One step that reads its loss back only when `read` (or when [`LOSS_SLOTS`] steps are
    /// unread): otherwise the loss stays on the device and, without clipping, the host queues
    /// the whole step without waiting for the device. A reading step's `loss` is the mean of
    /// the steps since the last read.
    pub fn step_reading(&mut self, x: &[f32], labels: &[i32], read: bool) -> Result<StepStats> {
        let dev = &self.dev;
        self.net.load_batch(dev, x, labels)?;
        self.net.forward(dev)?;
        let slot = self.unread;
        self.net.backward_to(dev, false, &mut B::view_range_mut(&mut self.losses, slot..slot + 1))?;
        self.unread += 1;
        let (grad_norm, grad_scale) = match self.cfg.clip_norm {
            Some(max) => {
                let norm = dev.l2_norm(&B::view(self.net.grads()))?;
                (Some(norm), if norm > max { max / (norm + 1e-6) } else { 1.0 })
            }
            None => (None, 1.0),
        };
        let lr = self.cfg.optimizer.lr() * self.cfg.schedule.factor(self.step);
        self.step += 1;
        let no_decay = self.net.layout().no_decay.clone();
        let (params, grads) = self.net.params_and_grads();
        let (opt, t) = (&self.cfg.optimizer, self.step);
        apply_optimizer_masked(dev, opt, lr, t, grad_scale, params, grads, &mut self.state, &no_decay)?;
        if !read && self.unread < LOSS_SLOTS {
            return Ok(StepStats { loss: f32::NAN, loss_steps: 0, lr, grad_norm });
        }
        let (loss, loss_steps) = self.read_losses()?;
        Ok(StepStats { loss, loss_steps, lr, grad_norm })
    }

    /// The mean of the unread steps' losses (one download), and how many there were.
    fn read_losses(&mut self) -> Result<(f32, u64)> {
        let n = std::mem::take(&mut self.unread);
        if n == 0 {
            return Ok((f32::NAN, 0));
        }
        let got = self.dev.download(&B::view_range(&self.losses, 0..n))?;
        self.net.check_loss_flags(&self.dev)?;
        Ok(((got.iter().map(|&l| l as f64).sum::<f64>() / n as f64) as f32, n as u64))
    }

    /// Loss and accuracy over `data`, in batches of `batch`.
    pub fn evaluate(&mut self, data: &Dataset, batch: usize) -> Result<Eval> {
        evaluate(&self.dev, &mut self.net, data, batch)
    }

    /// Trains until `total_steps` steps are done, walking epochs of `train` in the seeded
    /// order from `cursor` (which it advances); `on_step` sees every step.
    pub fn fit(
        &mut self,
        train: &Dataset,
        batch: usize,
        total_steps: u64,
        cursor: &mut Cursor,
        on_step: impl FnMut(&Self, &StepStats, usize) -> Result<()>,
    ) -> Result<()> {
        fit(self, train, batch, total_steps, cursor, on_step)
    }
}

/// A training run, whatever runs it: the single-device [`Trainer`], the in-process parallel
/// engine and the MPI engine all implement it, so that [`fit`], checkpoints and a command line
/// drive any of them the same way.
pub trait Run {
    /// One optimizer step on a batch (`x`: `samples x inputs`, one label per sample and
    /// row of logits).
    fn train_step(&mut self, x: &[f32], labels: &[i32]) -> Result<StepStats>;
    /// One step that reads its loss back only when `read`: a run that can leave it on the
    /// device (the single-device [`Trainer`]) then does not wait for the device at all; others
    /// read it every step (the default).
    fn train_step_reading(&mut self, x: &[f32], labels: &[i32], read: bool) -> Result<StepStats> {
        let _ = read;
        self.train_step(x, labels)
    }
    /// Steps taken.
    fn steps_done(&self) -> u64;
    /// How the run trains.
    fn train_config(&self) -> &TrainConfig;
    /// The model, described.
    fn model_info(&self) -> &ModelInfo;
    /// Loss and accuracy over `data` in batches of `batch`.
    fn evaluate_on(&mut self, data: &Dataset, batch: usize) -> Result<Eval>;
    /// The model's flat parameters (the order of [`ModelInfo::params`]), on the host.
    fn flat_params(&self) -> Result<Vec<f32>>;
    /// The optimizer state as flat vectors, one per slot of [`OptimizerConfig::slots`].
    fn flat_optimizer_state(&self) -> Result<Vec<Vec<f32>>>;
    /// Names of the devices it runs on.
    fn devices(&self) -> Vec<String>;
    /// Whether this process reports and writes files (every process but MPI's other ranks).
    fn is_root(&self) -> bool {
        true
    }
}

impl<B: Ops> Run for Trainer<B> {
    fn train_step(&mut self, x: &[f32], labels: &[i32]) -> Result<StepStats> {
        self.step(x, labels)
    }
    fn train_step_reading(&mut self, x: &[f32], labels: &[i32], read: bool) -> Result<StepStats> {
        self.step_reading(x, labels, read)
    }
    fn steps_done(&self) -> u64 {
        self.step
    }
    fn train_config(&self) -> &TrainConfig {
        &self.cfg
    }
    fn model_info(&self) -> &ModelInfo {
        self.net.info()
    }
    fn evaluate_on(&mut self, data: &Dataset, batch: usize) -> Result<Eval> {
        self.evaluate(data, batch)
    }
    fn flat_params(&self) -> Result<Vec<f32>> {
        self.net.download_params(&self.dev)
    }
    fn flat_optimizer_state(&self) -> Result<Vec<Vec<f32>>> {
        self.optimizer_state()
    }
    fn devices(&self) -> Vec<String> {
        vec![self.dev.name()]
    }
}

/// Trains `t` until `total_steps` steps are done, walking epochs of `train` in the seeded order
/// from `cursor` (which it advances); `on_step` sees every step, with its loss, and the batch's
/// row count.
pub fn fit<T: Run>(
    t: &mut T,
    train: &Dataset,
    batch: usize,
    total_steps: u64,
    cursor: &mut Cursor,
    on_step: impl FnMut(&T, &StepStats, usize) -> Result<()>,
) -> Result<()> {
    fit_reading(t, train, batch, total_steps, cursor, 1, on_step)
}

/// [`fit`] that reads the loss back only every `read_every` steps (and on the last): between
/// reads a run that can leave the loss on the device does not wait for it, and `on_step` sees
/// `loss_steps = 0` (the loss is NaN). A reading step's loss is the mean since the last read.
pub fn fit_reading<T: Run>(
    t: &mut T,
    train: &Dataset,
    batch: usize,
    total_steps: u64,
    cursor: &mut Cursor,
    read_every: u64,
    mut on_step: impl FnMut(&T, &StepStats, usize) -> Result<()>,
) -> Result<()> {
    if read_every == 0 {
        return Err(Error::Invalid("the loss must be read every 1 or more steps".into()));
    }
    if batch == 0 {
        return Err(Error::Invalid("batch size must be at least 1".into()));
    }
    let inputs = t.model_info().inputs();
    if train.dim != inputs {
        return Err(Error::shape(
            "train",
            format!("the data has {} features per sample, the model's first width is {inputs}", train.dim),
        ));
    }
    let seed = t.train_config().seed;
    let per_epoch = batches_per_epoch(train.len(), batch) as u64;
    let mut order = epoch_order(train.len(), seed, cursor.epoch);
    while t.steps_done() < total_steps {
        if cursor.batch >= per_epoch {
            cursor.epoch += 1;
            cursor.batch = 0;
            order = epoch_order(train.len(), seed, cursor.epoch);
        }
        let idx = batch_indices(&order, batch, cursor.batch as usize);
        let (x, y) = train.gather(idx);
        let next = t.steps_done() + 1;
        let stats = t.train_step_reading(&x, &y, next % read_every == 0 || next >= total_steps)?;
        cursor.batch += 1;
        on_step(t, &stats, idx.len())?;
    }
    Ok(())
}

/// How many rows of `logits` (`labels.len() x classes`) have their largest value at the label.
pub fn count_correct(logits: &[f32], labels: &[i32], classes: usize) -> usize {
    logits
        .chunks(classes)
        .zip(labels)
        .filter(|(row, &label)| {
            row.iter().enumerate().fold(0, |b, (i, v)| if *v > row[b] { i } else { b }) as i32 == label
        })
        .count()
}

/// Loss and accuracy of `model` over `data`.
pub fn evaluate<B: Ops>(dev: &B, model: &mut Network<B>, data: &Dataset, batch: usize) -> Result<Eval> {
    let classes = model.info().classes;
    let mut loss = 0f64;
    let mut correct = 0;
    let idx: Vec<usize> = (0..data.len()).collect();
    for chunk in idx.chunks(batch.max(1)) {
        let (x, y) = data.gather(chunk);
        model.load_batch(dev, &x, &y)?;
        model.forward(dev)?;
        loss += model.loss(dev)? as f64 * chunk.len() as f64;
        correct += count_correct(&model.logits(dev)?, &y, classes);
    }
    Ok(Eval { loss: (loss / data.len().max(1) as f64) as f32, correct, total: data.len() })
}

impl FromStr for LrSchedule {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "constant" => Ok(LrSchedule::Constant),
            "cosine" => Ok(LrSchedule::Cosine { warmup: 0, total: 0, min_factor: 0.0 }),
            _ => Err(Error::Invalid(format!("unknown schedule `{s}`: use constant or cosine"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_warms_up_then_decays_to_the_floor() {
        let s = LrSchedule::Cosine { warmup: 10, total: 110, min_factor: 0.1 };
        assert!((s.factor(0) - 0.1).abs() < 1e-6);
        assert!((s.factor(9) - 1.0).abs() < 1e-6);
        assert!((s.factor(10) - 1.0).abs() < 1e-6);
        assert!((s.factor(60) - 0.55).abs() < 1e-6);
        assert!((s.factor(110) - 0.1).abs() < 1e-6);
        assert!((s.factor(500) - 0.1).abs() < 1e-6);
        assert_eq!(LrSchedule::Constant.factor(7), 1.0);
    }
}
