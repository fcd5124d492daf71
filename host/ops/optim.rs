//! Optimizer updates, one pass over the parameters each: SGD with momentum and weight decay,
//! and AdamW (decoupled decay, bias correction). `grad_scale` multiplies the gradient first,
//! which is how global-norm clipping is applied without another pass.
//! CUDA: `kernels/optim.cu`.

use cudarc::driver::{CudaView, CudaViewMut};
use rayon::prelude::*;

use crate::backend::cpu::{wide, CpuDevice, CHUNK};
use crate::backend::cuda::CudaDevice;
use crate::backend::sim::{SimDevice, SimView, SimViewMut};
use crate::backend::{check_len, Backend};
use crate::error::{Error, Result};
use crate::ops::{as_i64, elementwise_cfg};
use crate::tensor::Tensor;

/// SGD: `g' = s*g + wd*w; mom = momentum*mom + g'; w -= lr*mom`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sgd {
    /// Learning rate.
    pub lr: f32,
    /// Momentum (0 for plain SGD).
    pub momentum: f32,
    /// L2 weight decay added to the gradient.
    pub weight_decay: f32,
}

/// AdamW: `m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
/// w = w (1 - lr wd) - lr (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    /// Learning rate.
    pub lr: f32,
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Denominator guard.
    pub eps: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
    }
}

impl Sgd {
    /// Checks the hyper-parameters.
    pub fn validate(&self) -> Result<()> {
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return Err(Error::Invalid(format!("SGD learning rate {} must be finite and >= 0", self.lr)));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(Error::Invalid(format!("SGD momentum {} must be in [0, 1)", self.momentum)));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(Error::Invalid(format!("SGD weight decay {} must be >= 0", self.weight_decay)));
        }
        Ok(())
    }
}

impl AdamW {
    /// Checks the hyper-parameters.
    pub fn validate(&self) -> Result<()> {
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return Err(Error::Invalid(format!("AdamW learning rate {} must be finite and >= 0", self.lr)));
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(Error::Invalid(format!("AdamW {name} {b} must be in [0, 1)")));
            }
        }
        if !(self.eps > 0.0 && self.eps.is_finite()) {
            return Err(Error::Invalid(format!("AdamW eps {} must be > 0", self.eps)));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(Error::Invalid(format!("AdamW weight decay {} must be >= 0", self.weight_decay)));
        }
        Ok(())
    }
    /// Bias corrections `(1 - beta1^t, 1 - beta2^t)` for step `t` (1-based), in f64.
    pub fn bias_corrections(&self, t: u64) -> Result<(f32, f32)> {
        if t == 0 {
            return Err(Error::Invalid("AdamW step numbers start at 1".into()));
        }
        let t = t.min(i32::MAX as u64) as i32;
        Ok(((1.0 - (self.beta1 as f64).powi(t)) as f32, (1.0 - (self.beta2 as f64).powi(t)) as f32))
    }
    /// The per-step factors of the update, computed once on the host in f64 so that each
    /// element divides once: `(decay, step, inv_bc2)` = `(1 - lr wd, lr / (1 - beta1^t),
    /// 1 / (1 - beta2^t))`, and `w = w decay - step m / (sqrt(v inv_bc2) + eps)`.
    pub fn step_factors(&self, t: u64) -> Result<(f32, f32, f32)> {
        if t == 0 {
            return Err(Error::Invalid("AdamW step numbers start at 1".into()));
        }
        let t = t.min(i32::MAX as u64) as i32;
        let (lr, wd) = (self.lr as f64, self.weight_decay as f64);
        let bc1 = 1.0 - (self.beta1 as f64).powi(t);
        let bc2 = 1.0 - (self.beta2 as f64).powi(t);
        Ok(((1.0 - lr * wd) as f32, (lr / bc1) as f32, (1.0 / bc2) as f32))
    }
}

/// Which optimizer, with its hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptimizerConfig {
    /// SGD with momentum and weight decay.
    Sgd(Sgd),
    /// AdamW.
    AdamW(AdamW),
}

impl OptimizerConfig {
    /// `sgd` or `adamw`.
    pub fn name(&self) -> &'static str {
        match self {
            OptimizerConfig::Sgd(_) => "sgd",
            OptimizerConfig::AdamW(_) => "adamw",
        }
    }
    /// Names of its state buffers (each the size of the parameters).
    pub fn slots(&self) -> &'static [&'static str] {
        match self {
            OptimizerConfig::Sgd(_) => &["momentum"],
            OptimizerConfig::AdamW(_) => &["exp_avg", "exp_avg_sq"],
        }
    }
    /// The base learning rate.
    pub fn lr(&self) -> f32 {
        match self {
            OptimizerConfig::Sgd(o) => o.lr,
            OptimizerConfig::AdamW(o) => o.lr,
        }
    }
    /// Checks the hyper-parameters.
    pub fn validate(&self) -> Result<()> {
        match self {
            OptimizerConfig::Sgd(o) => o.validate(),
            OptimizerConfig::AdamW(o) => o.validate(),
        }
    }
}

/// One optimizer update of `params` from `grad_scale * grads` at learning rate `lr`, step `t`
/// (1-based), with the optimizer's state buffers (as many as [`OptimizerConfig::slots`]).
#[allow(clippy::too_many_arguments)]
pub fn apply_optimizer<B: OptimOps>(
    dev: &B,
    opt: &OptimizerConfig,
    lr: f32,
    t: u64,
    grad_scale: f32,
    params: &mut B::Buf<f32>,
    grads: &B::Buf<f32>,
    state: &mut [B::Buf<f32>],
) -> Result<()> {
    apply_optimizer_masked(dev, opt, lr, t, grad_scale, params, grads, state, &[])
}

/// [`apply_optimizer`] with the weight decay left out over the ranges `no_decay` (sorted, not
/// overlapping; the ranges a model marks, as a stage layout's `no_decay`): one update per run of decayed or undecayed
/// parameters, the same arithmetic as one update over all where the decay is 0 or nothing is
/// left out.
#[allow(clippy::too_many_arguments)]
pub fn apply_optimizer_masked<B: OptimOps>(
    dev: &B,
    opt: &OptimizerConfig,
    lr: f32,
    t: u64,
    grad_scale: f32,
    params: &mut B::Buf<f32>,
    grads: &B::Buf<f32>,
    state: &mut [B::Buf<f32>],
    no_decay: &[std::ops::Range<usize>],
) -> Result<()> {
    let n = B::buf_len(params);
    if let Some(s) = state.iter().find(|s| B::buf_len(s) != n) {
        return Err(Error::Invalid(format!(
            "optimizer state of {} values for {n} parameters: each state buffer holds one value per parameter",
            B::buf_len(s)
        )));
    }
    apply_optimizer_part(dev, opt, lr, t, grad_scale, params, grads, state, 0..n, 0, no_decay)
}

/// [`apply_optimizer_masked`] on the part `part` of `params` and `grads` only, with optimizer
/// state that holds that part alone, from `state_at` on (ZeRO stage 1: a replica keeps the
/// state of its shard). `no_decay` is in the coordinates of `params`, as for the whole update.
/// Element for element the same arithmetic as the whole update.
#[allow(clippy::too_many_arguments)]
pub fn apply_optimizer_part<B: OptimOps>(
    dev: &B,
    opt: &OptimizerConfig,
    lr: f32,
    t: u64,
    grad_scale: f32,
    params: &mut B::Buf<f32>,
    grads: &B::Buf<f32>,
    state: &mut [B::Buf<f32>],
    part: std::ops::Range<usize>,
    state_at: usize,
    no_decay: &[std::ops::Range<usize>],
) -> Result<()> {
    let n = B::buf_len(params);
    if part.start > part.end || part.end > n || B::buf_len(grads) != n {
        return Err(Error::Invalid(format!(
            "optimizer update of {part:?} for {n} parameters and {} gradients",
            B::buf_len(grads)
        )));
    }
    if let Some(s) = state.iter().find(|s| B::buf_len(s) < state_at + part.len()) {
        return Err(Error::Invalid(format!(
            "optimizer state of {} values cannot hold {} from {state_at}",
            B::buf_len(s),
            part.len()
        )));
    }
    let decay = match *opt {
        OptimizerConfig::Sgd(o) => o.weight_decay,
        OptimizerConfig::AdamW(o) => o.weight_decay,
    };
    // Runs of the buffer: (range, whether decayed).
    let mut runs = Vec::new();
    if decay == 0.0 || no_decay.is_empty() {
        runs.push((0..n, true));
    } else {
        let mut at = 0;
        for r in no_decay {
            if r.start < at || r.end > n {
                return Err(Error::Invalid(format!(
                    "the ranges without weight decay must be sorted, apart and inside the {n} parameters; {r:?} is not"
                )));
            }
            if r.start > at {
                runs.push((at..r.start, true));
            }
            if !r.is_empty() {
                runs.push((r.clone(), false));
            }
            at = r.end;
        }
        if at < n {
            runs.push((at..n, true));
        }
    }
    for (r, decayed) in runs {
        // This run's overlap with the part, and where that sits in the state.
        let r = r.start.max(part.start)..r.end.min(part.end);
        if r.is_empty() {
            continue;
        }
        let s = r.start - part.start + state_at..r.end - part.start + state_at;
        let mut w = B::view_range_mut(params, r.clone());
        let g = B::view_range(grads, r.clone());
        match (*opt, &mut *state) {
            (OptimizerConfig::Sgd(o), [mom]) => {
                let o = Sgd { lr, weight_decay: if decayed { o.weight_decay } else { 0.0 }, ..o };
                dev.sgd_step(&o, grad_scale, &mut w, &g, &mut B::view_range_mut(mom, s))?
            }
            (OptimizerConfig::AdamW(o), [m, v]) => {
                let o = AdamW { lr, weight_decay: if decayed { o.weight_decay } else { 0.0 }, ..o };
                dev.adamw_step(
                    &o,
                    t,
                    grad_scale,
                    &mut w,
                    &g,
                    &mut B::view_range_mut(m, s.clone()),
                    &mut B::view_range_mut(v, s),
                )?
            }
            (o, s) => {
                return Err(Error::Invalid(format!(
                    "{} needs {} state buffers, {} given",
                    o.name(),
                    o.slots().len(),
                    s.len()
                )))
            }
        }
    }
    Ok(())
}

/// An optimizer that owns its state: one buffer per slot ([`OptimizerConfig::slots`]) for each
/// parameter tensor it was made for, and the step count. One call per step updates them all;
/// shapes are checked against the tensors it was made for.
pub struct Optimizer<B: OptimOps> {
    rule: OptimizerConfig,
    shapes: Vec<Vec<usize>>,
    state: Vec<Vec<B::Buf<f32>>>,
    t: u64,
}

impl<B: OptimOps> Optimizer<B> {
    /// State for `params` (zeroed), updated by `rule`.
    pub fn new(dev: &B, rule: impl Into<OptimizerConfig>, params: &[&Tensor<B>]) -> Result<Self> {
        let rule = rule.into();
        rule.validate()?;
        let state = params
            .iter()
            .map(|p| rule.slots().iter().map(|_| dev.alloc(p.len())).collect::<Result<Vec<_>>>())
            .collect::<Result<Vec<_>>>()?;
        Ok(Optimizer { rule, shapes: params.iter().map(|p| p.shape().to_vec()).collect(), state, t: 0 })
    }
    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.t
    }
    /// The update rule.
    pub fn rule(&self) -> &OptimizerConfig {
        &self.rule
    }
    /// One step at the rule's learning rate: `params[i]` from `grads[i]`.
    pub fn step(&mut self, dev: &B, params: &mut [&mut Tensor<B>], grads: &[&Tensor<B>]) -> Result<()> {
        self.step_with(dev, self.rule.lr(), 1.0, params, grads)
    }
    /// One step at learning rate `lr`, each gradient scaled by `grad_scale` first (global-norm
    /// clipping).
    pub fn step_with(
        &mut self,
        dev: &B,
        lr: f32,
        grad_scale: f32,
        params: &mut [&mut Tensor<B>],
        grads: &[&Tensor<B>],
    ) -> Result<()> {
        if params.len() != self.shapes.len() || grads.len() != self.shapes.len() {
            return Err(Error::shape(
                "Optimizer::step",
                format!(
                    "made for {} parameters, given {} parameters and {} gradients",
                    self.shapes.len(),
                    params.len(),
                    grads.len()
                ),
            ));
        }
        for (i, shape) in self.shapes.iter().enumerate() {
            if params[i].shape() != shape.as_slice() || grads[i].shape() != shape.as_slice() {
                return Err(Error::shape(
                    "Optimizer::step",
                    format!(
                        "parameter {i} was {shape:?} when the optimizer was made; given {:?} with gradient {:?}",
                        params[i].shape(),
                        grads[i].shape()
                    ),
                ));
            }
        }
        self.t += 1;
        for ((p, g), st) in params.iter_mut().zip(grads).zip(&mut self.state) {
            apply_optimizer(dev, &self.rule, lr, self.t, grad_scale, p.buf_mut(), g.buf(), st)?;
        }
        Ok(())
    }
}

impl From<Sgd> for OptimizerConfig {
    fn from(o: Sgd) -> Self {
        OptimizerConfig::Sgd(o)
    }
}

impl From<AdamW> for OptimizerConfig {
    fn from(o: AdamW) -> Self {
        OptimizerConfig::AdamW(o)
    }
}

/// Optimizer updates in place.
pub trait OptimOps: Backend {
    /// One SGD step on `w` with gradient `grad_scale * g` and momentum buffer `mom`.
    fn sgd_step(
        &self,
        opt: &Sgd,
        grad_scale: f32,
        w: &mut Self::Mut<'_, f32>,
        g: &Self::Ref<'_, f32>,
        mom: &mut Self::Mut<'_, f32>,
    ) -> Result<()>;
    /// AdamW step number `t` (1-based) on `w` with gradient `grad_scale * g` and moments `m`, `v`.
    #[allow(clippy::too_many_arguments)]
    fn adamw_step(
        &self,
        opt: &AdamW,
        t: u64,
        grad_scale: f32,
        w: &mut Self::Mut<'_, f32>,
        g: &Self::Ref<'_, f32>,
        m: &mut Self::Mut<'_, f32>,
        v: &mut Self::Mut<'_, f32>,
    ) -> Result<()>;
}

fn check_sizes(op: &'static str, n: usize, others: &[(&str, usize)]) -> Result<()> {
    for (what, len) in others {
        check_len(op, what, *len, n)?;
    }
    Ok(())
}

impl OptimOps for CpuDevice {
    fn sgd_step(&self, opt: &Sgd, s: f32, w: &mut &mut [f32], g: &&[f32], mom: &mut &mut [f32]) -> Result<()> {
        opt.validate()?;
        check_sizes("sgd_step", w.len(), &[("gradient", g.len()), ("momentum", mom.len())])?;
        let (lr, mu, wd) = (opt.lr, opt.momentum, opt.weight_decay);
        w.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK).zip(mom.par_chunks_mut(CHUNK))).for_each(|(w, (g, m))| {
            wide(|| {
                for ((w, g), m) in w.iter_mut().zip(g).zip(m.iter_mut()) {
                    let gg = s * g + wd * *w;
                    *m = mu * *m + gg;
                    *w -= lr * *m;
                }
            })
        });
        Ok(())
    }

    fn adamw_step(
        &self,
        opt: &AdamW,
        t: u64,
        s: f32,
        w: &mut &mut [f32],
        g: &&[f32],
        m: &mut &mut [f32],
        v: &mut &mut [f32],
    ) -> Result<()> {
        opt.validate()?;
        check_sizes(
            "adamw_step",
            w.len(),
            &[("gradient", g.len()), ("first moment", m.len()), ("second moment", v.len())],
        )?;
        let (decay, step, inv_bc2) = opt.step_factors(t)?;
        let o = *opt;
        w.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
            .for_each(|((w, g), (m, v))| {
                wide(|| {
                    for (((w, g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                        let gg = s * g;
                        *m = o.beta1 * *m + (1.0 - o.beta1) * gg;
                        *v = o.beta2 * *v + (1.0 - o.beta2) * gg * gg;
                        *w = *w * decay - step * *m / ((*v * inv_bc2).sqrt() + o.eps);
                    }
                })
            });
        Ok(())
    }
}

/// The GPU side, written once for the CUDA device and the simulator: the same launches of the
/// same kernels, over `CudaView`s or `SimView`s.
macro_rules! gpu_impl {
    ($dev:ident, $view:ident, $view_mut:ident) => {
        impl OptimOps for $dev {
            fn sgd_step(
                &self,
                opt: &Sgd,
                s: f32,
                w: &mut $view_mut<'_, f32>,
                g: &$view<'_, f32>,
                mom: &mut $view_mut<'_, f32>,
            ) -> Result<()> {
                opt.validate()?;
                check_sizes("sgd_step", w.len(), &[("gradient", g.len()), ("momentum", mom.len())])?;
                let n = as_i64("sgd_step", "n", w.len())?;
                let cfg = elementwise_cfg(w.len(), self.sms());
                // SAFETY: w, g and mom hold n elements (checked); grid-stride kernel.
                unsafe {
                    self.kernels().optim.sgd_step(
                        self.stream(),
                        cfg,
                        n,
                        opt.lr,
                        opt.momentum,
                        opt.weight_decay,
                        s,
                        w,
                        g,
                        mom,
                    )
                }
                .map_err(Error::driver("launching sgd_step"))
            }

            fn adamw_step(
                &self,
                opt: &AdamW,
                t: u64,
                s: f32,
                w: &mut $view_mut<'_, f32>,
                g: &$view<'_, f32>,
                m: &mut $view_mut<'_, f32>,
                v: &mut $view_mut<'_, f32>,
            ) -> Result<()> {
                opt.validate()?;
                check_sizes(
                    "adamw_step",
                    w.len(),
                    &[("gradient", g.len()), ("first moment", m.len()), ("second moment", v.len())],
                )?;
                let (decay, step, inv_bc2) = opt.step_factors(t)?;
                let n = as_i64("adamw_step", "n", w.len())?;
                let cfg = elementwise_cfg(w.len(), self.sms());
                // SAFETY: w, g, m and v hold n elements (checked); grid-stride kernel.
                unsafe {
                    self.kernels().optim.adamw_step(
                        self.stream(),
                        cfg,
                        n,
                        decay,
                        opt.beta1,
                        opt.beta2,
                        opt.eps,
                        step,
                        inv_bc2,
                        s,
                        w,
                        g,
                        m,
                        v,
                    )
                }
                .map_err(Error::driver("launching adamw_step"))
            }
        }
    };
}

gpu_impl!(CudaDevice, CudaView, CudaViewMut);
gpu_impl!(SimDevice, SimView, SimViewMut);
