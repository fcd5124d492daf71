//! The executor: one host thread per device runs its stage's actions of the schedule; a
//! second thread per device runs its gradient buckets' all-reduce, so that a bucket is reduced
//! as soon as its layer's backward is done while backward goes on. Activations and their
//! gradients move between stages as device-to-device copies (plain memory copies between CPU
//! devices, device copies or peer copies between GPUs); a sender synchronises its device
//! before it hands a buffer on, which orders the transfer after the compute.
//!
//! Every replica takes the same optimizer step from the same all-reduced gradients, so the
//! replicas stay bit-identical ([`Engine::replicas_identical`] checks it).

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::Instant;

use crate::backend::{Backend, ViewLen};
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::nn::{Model, ModelInfo, Stage, StageLayout, TpGroup, TpReduce};
use crate::ops::Ops;
use crate::parallel::comm::{Communicator, LocalGroup};
use crate::parallel::schedule::{Action, Schedule};
pub(crate) use crate::parallel::shard::{shard_of, tied_params, Shard, Tied};
use crate::parallel::timeline::{Lane, Span, SpanKind, Timeline, Traffic};
use crate::parallel::{split_rows, Plan};
use crate::train::{apply_optimizer_masked, apply_optimizer_part, Eval, Run, StepStats, TrainConfig};

/// A tensor-parallel group's sum through a communicator.
pub(crate) struct TpComm<B: Backend>(pub(crate) Box<dyn Communicator<B>>);

impl<B: Backend> TpReduce<B> for TpComm<B> {
    fn all_reduce_sum(&mut self, buf: &mut B::Buf<f32>) -> Result<()> {
        self.0.all_reduce_sum(buf)
    }
}

/// The optimizer state buffers of a worker whose stage is laid out as `layout`: zeros, or its
/// part of the flat vectors `state`.
pub(crate) fn upload_state<B: Ops>(
    dev: &B,
    info: &ModelInfo,
    layout: &StageLayout,
    shard: Option<&Shard>,
    slots: usize,
    state: Option<&[Vec<f32>]>,
) -> Result<Vec<B::Buf<f32>>> {
    let len = shard.map_or(layout.len, |s| s.state_len);
    match state {
        Some(v) => v
            .iter()
            .map(|x| {
                let part = layout.gather(info, x);
                dev.upload(&match shard {
                    Some(s) => s.gather(&part),
                    None => part,
                })
            })
            .collect(),
        None => (0..slots).map(|_| dev.alloc(len)).collect(),
    }
}

pub(crate) struct Worker<B: Ops> {
    /// Its index in the mesh (replica * pp + stage).
    pub(crate) index: usize,
    /// Stages per replica.
    pub(crate) pp: usize,
    /// Tensor-parallel devices per stage.
    pub(crate) tp: usize,
    pub(crate) dev: B,
    pub(crate) stage: Stage<B>,
    /// Shared parameters held by other stages too: their gradients are summed across stages.
    pub(crate) tied: Vec<Tied>,
    /// The optimizer state: of the whole stage, or of `shard` alone.
    pub(crate) state: Vec<B::Buf<f32>>,
    /// ZeRO stage 1: the part of the stage this replica updates.
    pub(crate) shard: Option<Shard>,
    pub(crate) comm: Option<Box<dyn Communicator<B>>>,
    /// Whether the gradient buckets go through `comm` (dp > 1, or a one-rank group asked for
    /// to exercise a communicator).
    pub(crate) comm_in_use: bool,
    /// On a last stage: each microbatch's share of the loss for the steps not read yet, on the
    /// device (step k's microbatch j at `k * microbatches + j`); allocated at the first backward.
    pub(crate) losses: Option<B::Buf<f32>>,
}

/// A microbatch's tensor between stages: its id, the buffer, and the event after which the
/// buffer holds it.
type Msg<B> = (usize, <B as Backend>::Buf<f32>, <B as Backend>::Event);
/// The two ends of a channel, where this stage has them.
type Ends<B> = (Option<Sender<Msg<B>>>, Option<Receiver<Msg<B>>>);

/// How one worker of a step talks to the other stages of its replica: activations forward,
/// their gradients backward, and the parts of the squared gradient norm. In one process the
/// links are channels; across processes, MPI messages (`crate::parallel::mpi`).
pub(crate) trait PipeLinks<B: Backend>: Send {
    /// Hands microbatch `id`'s output activation to the next stage.
    fn send_act(&mut self, dev: &B, id: usize, v: &B::Ref<'_, f32>) -> Result<()>;
    /// Microbatch `id`'s input activation from the previous stage, on `dev`.
    fn recv_act(&mut self, dev: &B, id: usize) -> Result<B::Buf<f32>>;
    /// Hands microbatch `id`'s input gradient to the previous stage.
    fn send_grad(&mut self, dev: &B, id: usize, v: &B::Ref<'_, f32>) -> Result<()>;
    /// Microbatch `id`'s output gradient from the next stage, on `dev`.
    fn recv_grad(&mut self, dev: &B, id: usize) -> Result<B::Buf<f32>>;
    /// Every stage's `(stage, squared norm of its gradients)`, in stage order, given this
    /// stage's part.
    fn norm_parts(&mut self, stage: usize, local: f64) -> Result<Vec<(usize, f64)>>;
    /// Every holder's `(stage, gradient of its copy of model parameter `param`)`, in stage
    /// order, given this stage's (`holders` are the stages holding a copy, this one among them).
    fn tied_parts(
        &mut self,
        stage: usize,
        param: usize,
        holders: &[usize],
        local: Vec<f32>,
    ) -> Result<Vec<(usize, Vec<f32>)>>;
}

/// What the stages of a replica tell each other besides activations: norm parts and the
/// gradients of shared parameters' copies.
enum Side {
    Norm(usize, f64),
    Tied(usize, usize, Vec<f32>),
}

/// The channels one worker uses in a step.
struct Links<B: Ops> {
    act_in: Option<Receiver<Msg<B>>>,
    act_out: Option<Sender<Msg<B>>>,
    grad_in: Option<Receiver<Msg<B>>>,
    grad_out: Option<Sender<Msg<B>>>,
    /// To the other stages of the replica (by stage), for the global gradient norm and the
    /// shared parameters.
    side_out: Vec<(usize, Sender<Side>)>,
    side_in: Receiver<Side>,
    /// Messages received while waiting for another kind.
    stash: Vec<Side>,
}

impl<B: Ops> Links<B> {
    /// The first message `want` accepts, from the stash or the channel.
    fn side_recv<T>(&mut self, want: &dyn Fn(&Side) -> bool, take: fn(Side) -> T) -> Result<T> {
        if let Some(i) = self.stash.iter().position(want) {
            return Ok(take(self.stash.swap_remove(i)));
        }
        loop {
            let m = self.side_in.recv().map_err(|_| closed("other stage"))?;
            if want(&m) {
                return Ok(take(m));
            }
            self.stash.push(m);
        }
    }
}

impl<B: Ops> PipeLinks<B> for Links<B> {
    fn send_act(&mut self, dev: &B, id: usize, v: &B::Ref<'_, f32>) -> Result<()> {
        let (out, ready) = stage_copy(dev, v)?;
        self.act_out.as_ref().unwrap().send((id, out, ready)).map_err(|_| closed("next stage"))
    }
    fn recv_act(&mut self, dev: &B, id: usize) -> Result<B::Buf<f32>> {
        let (got, buf, ready) = self.act_in.as_ref().unwrap().recv().map_err(|_| closed("previous stage"))?;
        if got != id {
            return Err(Error::Parallel(format!("expected microbatch {id}'s activation, got {got}'s")));
        }
        dev.wait_event(&ready)?;
        dev.adopt(buf)
    }
    fn send_grad(&mut self, dev: &B, id: usize, v: &B::Ref<'_, f32>) -> Result<()> {
        let (g, ready) = stage_copy(dev, v)?;
        self.grad_out.as_ref().unwrap().send((id, g, ready)).map_err(|_| closed("previous stage"))
    }
    fn recv_grad(&mut self, dev: &B, id: usize) -> Result<B::Buf<f32>> {
        let (got, buf, ready) = self.grad_in.as_ref().unwrap().recv().map_err(|_| closed("next stage"))?;
        if got != id {
            return Err(Error::Parallel(format!("expected microbatch {id}'s gradient, got {got}'s")));
        }
        dev.wait_event(&ready)?;
        dev.adopt(buf)
    }
    fn norm_parts(&mut self, stage: usize, local: f64) -> Result<Vec<(usize, f64)>> {
        for (_, tx) in &self.side_out {
            tx.send(Side::Norm(stage, local)).map_err(|_| closed("other stage"))?;
        }
        let mut parts = vec![(stage, local)];
        for _ in 0..self.side_out.len() {
            let is_norm = |m: &Side| matches!(m, Side::Norm(..));
            parts.push(self.side_recv(&is_norm, |m| match m {
                Side::Norm(s, v) => (s, v),
                Side::Tied(..) => unreachable!(),
            })?);
        }
        parts.sort_by_key(|p| p.0);
        Ok(parts)
    }
    fn tied_parts(
        &mut self,
        stage: usize,
        param: usize,
        holders: &[usize],
        local: Vec<f32>,
    ) -> Result<Vec<(usize, Vec<f32>)>> {
        for (_, tx) in self.side_out.iter().filter(|(q, _)| holders.contains(q)) {
            tx.send(Side::Tied(stage, param, local.clone())).map_err(|_| closed("other stage"))?;
        }
        let mut parts = vec![(stage, local)];
        for &q in holders.iter().filter(|&&q| q != stage) {
            let from_q = move |m: &Side| matches!(m, Side::Tied(s, p, _) if *s == q && *p == param);
            parts.push(self.side_recv(&from_q, |m| match m {
                Side::Tied(s, _, v) => (s, v),
                Side::Norm(..) => unreachable!(),
            })?);
        }
        parts.sort_by_key(|p| p.0);
        Ok(parts)
    }
}

/// What every worker of a step shares.
pub(crate) struct StepCtx<'a> {
    actions: &'a [Action],
    /// Samples of the global batch for each microbatch id (`pass * m + mb`) of this replica.
    rows: Vec<Range<usize>>,
    x: &'a [f32],
    y: &'a [i32],
    inputs: usize,
    /// Labels per sample.
    lps: usize,
    loss_scale: f32,
    lr: f32,
    t: u64,
    cfg: &'a TrainConfig,
    passes: usize,
    m: usize,
    pp: usize,
    t0: Instant,
    comm_timeout: std::time::Duration,
    loss_slot: usize,
    read_loss: bool,
}

pub(crate) struct WorkerOut {
    /// On a last stage that read its losses: their sum over the steps read (else 0).
    pub(crate) loss: f32,
    pub(crate) grad_norm: Option<f32>,
    pub(crate) spans: Vec<Span>,
    pub(crate) comm_spans: Vec<Span>,
    /// What the worker sent during the step.
    pub(crate) sent: Traffic,
}

/// What a step needs before any worker runs: the rows of each replica's microbatches, and
/// the learning rate and optimizer step count.
pub(crate) struct Prepared {
    pub(crate) replica_rows: Vec<Vec<Range<usize>>>,
    pub(crate) lr: f32,
    pub(crate) t: u64,
    /// Which of the losses' step slots this step writes (the steps not read before it).
    pub(crate) loss_slot: usize,
    /// Whether the step reads the losses back (else they stay on the device).
    pub(crate) read_loss: bool,
}

/// Checks a batch against the plan and splits it (shared by the in-process and the MPI engine).
pub(crate) fn prepare_step(
    info: &ModelInfo,
    cfg: &TrainConfig,
    plan: &Plan,
    step: u64,
    x: &[f32],
    y: &[i32],
) -> Result<Prepared> {
    let dp = plan.mesh.dp;
    let (m, passes) = (plan.microbatches, plan.accumulate);
    let inputs = info.inputs();
    let lps = info.labels_per_sample();
    if y.len() % lps != 0 {
        return Err(Error::shape(
            "Engine::step",
            format!("{} labels is not a whole number of samples of {lps} labels each", y.len()),
        ));
    }
    let total = y.len() / lps;
    if x.len() != total * inputs {
        return Err(Error::shape(
            "Engine::step",
            format!("inputs hold {} values for {total} samples; the model takes {inputs} features per sample", x.len()),
        ));
    }
    let what = format!("dp={dp} replicas x {} microbatches", m * passes);
    if total < dp * m * passes {
        return Err(Error::Invalid(format!(
            "a batch of {total} rows cannot be split into {what}: each microbatch needs at least one row (use a batch of at least {})",
            dp * m * passes
        )));
    }
    let shares = split_rows(total, dp, "replicas")?;
    let mut replica_rows = Vec::with_capacity(dp);
    for sh in &shares {
        let mbs = split_rows(sh.len(), m * passes, "microbatches")?;
        replica_rows.push(mbs.into_iter().map(|r| sh.start + r.start..sh.start + r.end).collect::<Vec<_>>());
    }
    let lr = cfg.optimizer.lr() * cfg.schedule.factor(step);
    Ok(Prepared { replica_rows, lr, t: step + 1, loss_slot: 0, read_loss: true })
}

impl<'a> StepCtx<'a> {
    /// The context of the worker of replica `r`, stage `s`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        info: &ModelInfo,
        schedule: &'a Schedule,
        plan: &Plan,
        cfg: &'a TrainConfig,
        prep: &Prepared,
        r: usize,
        s: usize,
        x: &'a [f32],
        y: &'a [i32],
        t0: Instant,
    ) -> Self {
        StepCtx {
            actions: &schedule.actions[s],
            rows: prep.replica_rows[r].clone(),
            x,
            y,
            inputs: info.inputs(),
            lps: info.labels_per_sample(),
            loss_scale: 1.0 / y.len() as f32,
            lr: prep.lr,
            t: prep.t,
            cfg,
            passes: plan.accumulate,
            m: plan.microbatches,
            pp: plan.mesh.pp,
            t0,
            comm_timeout: plan.comm_timeout,
            loss_slot: prep.loss_slot,
            read_loss: prep.read_loss,
        }
    }
}

/// Makes the communicator of (stage, replica) on its device.
pub type CommMaker<'a, B> = dyn FnMut(usize, usize, &B) -> Result<Box<dyn Communicator<B>>> + 'a;

/// Data- and pipeline-parallel training of a [`Model`] on a mesh of devices.
pub struct Engine<B: Ops> {
    info: ModelInfo,
    cfg: TrainConfig,
    plan: Plan,
    schedule: Schedule,
    workers: Vec<Worker<B>>,
    step: u64,
    timeline: Option<Timeline>,
    /// Steps whose losses are on the devices, not read yet.
    unread: usize,
}

impl<B: LocalGroup> Engine<B> {
    /// A fresh run: the model's seeded initial parameters (`cfg.seed`) on every replica.
    pub fn new(devices: &[B], model: &Model<B>, cfg: TrainConfig, plan: Plan) -> Result<Self> {
        let params = model.init(cfg.seed)?;
        Self::with_state(devices, model, cfg, plan, &params, None, 0)
    }

    /// A run from flat parameters (the order of [`ModelInfo::params`]), optimizer state (one
    /// flat vector per slot) and step count, e.g. from a checkpoint written by any plan.
    pub fn with_state(
        devices: &[B],
        model: &Model<B>,
        cfg: TrainConfig,
        plan: Plan,
        params: &[f32],
        state: Option<&[Vec<f32>]>,
        step: u64,
    ) -> Result<Self> {
        Self::build(devices, model, cfg, plan, params, state, step, None)
    }

    /// As [`Engine::with_state`], with the gradient all-reduce of each (stage, replica) given by
    /// `make(stage, replica, device)` instead of the in-process ring, and used even for dp = 1
    /// (e.g. a one-rank NCCL communicator, to check NCCL on a single GPU). `make` is called for
    /// each (stage, replica) in turn on this thread, so its set-up must not wait for the
    /// others' (a multi-rank NCCL communicator would: create those on their own threads first,
    /// or use processes and `DistEngine`).
    #[allow(clippy::too_many_arguments)]
    pub fn with_communicators(
        devices: &[B],
        model: &Model<B>,
        cfg: TrainConfig,
        plan: Plan,
        params: &[f32],
        state: Option<&[Vec<f32>]>,
        step: u64,
        make: &mut CommMaker<'_, B>,
    ) -> Result<Self> {
        Self::build(devices, model, cfg, plan, params, state, step, Some(make))
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        devices: &[B],
        model: &Model<B>,
        cfg: TrainConfig,
        plan: Plan,
        params: &[f32],
        state: Option<&[Vec<f32>]>,
        step: u64,
        mut make: Option<&mut CommMaker<'_, B>>,
    ) -> Result<Self> {
        cfg.validate()?;
        let info = model.info()?;
        plan.validate(&info)?;
        let n = info.param_count();
        if params.len() != n {
            return Err(Error::shape("Engine", format!("{} parameters for a model of {n}", params.len())));
        }
        let slots = cfg.optimizer.slots().len();
        if let Some(s) = state {
            if s.len() != slots || s.iter().any(|v| v.len() != n) {
                return Err(Error::shape("Engine", format!("optimizer state must be {slots} vectors of {n}")));
            }
        }
        let mesh = plan.mesh;
        if devices.len() != mesh.devices() {
            return Err(Error::Invalid(format!(
                "the plan {} needs {} devices, {} given (e.g. --device cpu:{})",
                plan.describe().split(',').next().unwrap_or_default(),
                mesh.devices(),
                devices.len(),
                mesh.devices()
            )));
        }
        // The tensor-parallel groups: a stage's tp devices of one replica, summing on the
        // devices' own queues (their layers wait for the sums).
        let mut tp_groups: Vec<Option<TpGroup<B>>> = (0..devices.len()).map(|_| None).collect();
        if mesh.tp > 1 {
            for r in 0..mesh.dp {
                for s in 0..mesh.pp {
                    let devs: Vec<B> = (0..mesh.tp).map(|k| devices[mesh.index(r, s, k)].clone()).collect();
                    for (k, c) in B::local_group(&devs, plan.comm_timeout).into_iter().enumerate() {
                        tp_groups[mesh.index(r, s, k)] = Some(TpGroup::new(k, mesh.tp, Box::new(TpComm(c))));
                    }
                }
            }
        }
        let reduce = mesh.dp > 1 || make.is_some();
        let buckets: Vec<usize> = plan.stages.iter().map(|r| if reduce { r.len() } else { 0 }).collect();
        let schedule = Schedule::build(plan.schedule, mesh.pp, plan.microbatches, &buckets)?;
        schedule.check_tp(mesh.tp, &plan.stage_sums(&info))?;
        let mut workers = Vec::with_capacity(devices.len());
        for ((i, dev), tp_group) in devices.iter().enumerate().zip(tp_groups) {
            let (r, s, k) = mesh.coords(i);
            let layers = plan.stages[s].clone();
            let layout = info.stage_layout_tp(layers.clone(), mesh.tp, k);
            let stage = Stage::with_tp(dev, model, layers.clone(), &layout.gather(&info, params), tp_group)?;
            let tied = tied_params(&info, &plan, s);
            let shard = shard_of(&layout, &plan, &tied, reduce, r);
            let st = upload_state(dev, &info, &layout, shard.as_ref(), slots, state)?;
            workers.push(Worker {
                index: i,
                pp: mesh.pp,
                tp: mesh.tp,
                dev: dev.clone(),
                stage,
                tied,
                state: st,
                shard,
                comm: None,
                comm_in_use: reduce,
                losses: None,
            });
        }
        if let Some(make) = make.as_mut() {
            for s in 0..mesh.pp {
                for r in 0..mesh.dp {
                    for k in 0..mesh.tp {
                        let i = mesh.index(r, s, k);
                        workers[i].comm = Some(make(s, r, &devices[i])?);
                    }
                }
            }
        } else if mesh.dp > 1 {
            // A data-parallel group per stage and tensor-parallel rank: the replicas' devices
            // holding the same parts.
            for s in 0..mesh.pp {
                for k in 0..mesh.tp {
                    // Each communicator gets its own queue, so its additions overlap backward.
                    let devs: Vec<B> =
                        (0..mesh.dp).map(|r| devices[mesh.index(r, s, k)].with_own_queue()).collect::<Result<_>>()?;
                    for (r, c) in B::local_group(&devs, plan.comm_timeout).into_iter().enumerate() {
                        workers[mesh.index(r, s, k)].comm = Some(c);
                    }
                }
            }
        }
        Ok(Engine { info, cfg, plan, schedule, workers, step, timeline: None, unread: 0 })
    }

    /// The plan.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }
    /// The checked schedule it runs.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }
    /// The run's config.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }
    /// The model, described.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }
    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }
    /// What happened on every device during the last step.
    pub fn timeline(&self) -> Option<&Timeline> {
        self.timeline.as_ref()
    }
    /// Names of the devices, in mesh order.
    pub fn device_names(&self) -> Vec<String> {
        self.workers.iter().map(|w| w.dev.name()).collect()
    }

    /// One optimizer step on a batch (`x`: `labels.len() x inputs`), split over the replicas
    /// (rows in contiguous shares, uneven shares weighted exactly) and into microbatches.
    pub fn step(&mut self, x: &[f32], y: &[i32]) -> Result<StepStats> {
        self.step_reading(x, y, true)
    }

    /// One step that reads the loss back only when `read` (or when
    /// [`LOSS_SLOTS`](crate::train::LOSS_SLOTS) steps are unread): otherwise each last stage
    /// leaves its loss on its device, and a device's step needs no wait of its host except
    /// where its streams meet the host (clipping's norm, shared parameters, an all-reduce
    /// through the host). A reading step's loss is the mean of the steps since the last read.
    pub fn step_reading(&mut self, x: &[f32], y: &[i32], read: bool) -> Result<StepStats> {
        let mesh = self.plan.mesh;
        let (dp, pp, tp) = (mesh.dp, mesh.pp, mesh.tp);
        let mut prep = prepare_step(&self.info, &self.cfg, &self.plan, self.step, x, y)?;
        prep.loss_slot = self.unread;
        prep.read_loss = read || self.unread + 1 >= crate::train::LOSS_SLOTS;
        let read = prep.read_loss;
        let lr = prep.lr;
        let t0 = Instant::now();

        // Channels: activations forward and gradients backward along each pipeline (a replica's
        // stages on one tensor-parallel rank), and the norm exchange among its stages.
        let mut chains: Vec<Vec<Links<B>>> = Vec::with_capacity(dp * tp);
        for _chain in 0..dp * tp {
            let mut links = Vec::with_capacity(pp);
            let mut norm_tx: Vec<Sender<Side>> = Vec::new();
            let mut norm_rx: Vec<Receiver<Side>> = Vec::new();
            for _ in 0..pp {
                let (tx, rx) = channel();
                norm_tx.push(tx);
                norm_rx.push(rx);
            }
            let mut acts: Vec<Ends<B>> = (0..pp).map(|_| (None, None)).collect();
            let mut grads: Vec<Ends<B>> = (0..pp).map(|_| (None, None)).collect();
            for s in 0..pp.saturating_sub(1) {
                let (tx, rx) = channel();
                acts[s].0 = Some(tx);
                acts[s + 1].1 = Some(rx);
                let (tx, rx) = channel();
                grads[s + 1].0 = Some(tx);
                grads[s].1 = Some(rx);
            }
            for (s, (rx, (a, g))) in norm_rx.into_iter().zip(acts.into_iter().zip(grads)).enumerate() {
                links.push(Links {
                    act_out: a.0,
                    act_in: a.1,
                    grad_out: g.0,
                    grad_in: g.1,
                    side_out: norm_tx
                        .iter()
                        .enumerate()
                        .filter(|(o, _)| *o != s)
                        .map(|(o, tx)| (o, tx.clone()))
                        .collect(),
                    side_in: rx,
                    stash: Vec::new(),
                });
            }
            chains.push(links);
        }
        // In mesh order: device (r, s, k) takes stage s of chain (r, k).
        let mut chains: Vec<std::vec::IntoIter<Links<B>>> = chains.into_iter().map(|c| c.into_iter()).collect();
        let mut links: Vec<Links<B>> = Vec::with_capacity(dp * pp * tp);
        for i in 0..mesh.devices() {
            let (r, _, k) = mesh.coords(i);
            links.push(chains[r * tp + k].next().expect("a link per stage"));
        }

        let (info, cfg, plan, schedule) = (&self.info, &self.cfg, &self.plan, &self.schedule);
        let make_ctx = |r: usize, s: usize| StepCtx::new(info, schedule, plan, cfg, &prep, r, s, x, y, t0);
        let results: Vec<Result<WorkerOut>> = if self.workers.len() == 1 {
            // One device: no thread to start.
            let mut l = links.pop().unwrap();
            vec![run_worker(&mut self.workers[0], 0, &make_ctx(0, 0), &mut l)]
        } else {
            std::thread::scope(|sc| {
                let handles: Vec<_> = self
                    .workers
                    .iter_mut()
                    .zip(links)
                    .enumerate()
                    .map(|(i, (w, mut l))| {
                        let (r, s, _) = mesh.coords(i);
                        let ctx = make_ctx(r, s);
                        sc.spawn(move || run_worker(w, s, &ctx, &mut l))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| Err(Error::Parallel("a device thread panicked".into()))))
                    .collect()
            })
        };
        let mut loss = 0f32;
        let mut grad_norm = None;
        let mut lanes = Vec::new();
        let mut first_err = None;
        for (i, res) in results.into_iter().enumerate() {
            match res {
                Ok(out) => {
                    let (r, s, k) = mesh.coords(i);
                    // A stage's tensor-parallel ranks compute the same loss: counted once.
                    if k == 0 {
                        loss += out.loss;
                    }
                    if grad_norm.is_none() {
                        grad_norm = out.grad_norm;
                    }
                    let rank = if tp > 1 { format!(", tp rank {k}") } else { String::new() };
                    let name = format!("{} (replica {r}, stage {s}{rank})", self.workers[i].dev.name());
                    lanes.push(Lane { name, spans: out.spans, comm: out.comm_spans, sent: out.sent });
                }
                Err(e) => {
                    // The first failure is the cause; the others are its echo (closed channels).
                    let cause = !matches!(&e, Error::Parallel(msg) if msg.contains("stopped"));
                    if first_err.is_none() || cause {
                        first_err = Some(Error::Parallel(format!("{}: {e}", self.workers[i].dev.name())));
                    }
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        self.step += 1;
        self.timeline = Some(Timeline { lanes, total: t0.elapsed().as_secs_f64() });
        if !read {
            self.unread += 1;
            return Ok(StepStats { loss: f32::NAN, loss_steps: 0, lr, grad_norm });
        }
        let steps = std::mem::take(&mut self.unread) + 1;
        Ok(StepStats { loss: loss / steps as f32, loss_steps: steps as u64, lr, grad_norm })
    }

    /// Flat parameters (the order of [`ModelInfo::params`]), from replica 0 (split parameters
    /// put together from its tensor-parallel ranks' parts).
    pub fn params(&self) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.info.param_count()];
        let m = self.plan.mesh;
        for w in &self.workers[..m.pp * m.tp] {
            w.stage.layout().scatter(&self.info, &w.dev.download(&B::view(w.stage.params()))?, &mut out);
        }
        Ok(out)
    }

    /// Optimizer state as flat vectors (one per slot): replica 0's, or with ZeRO every
    /// replica's shard put together.
    pub fn optimizer_state(&self) -> Result<Vec<Vec<f32>>> {
        let slots = self.cfg.optimizer.slots().len();
        let mut out = vec![vec![0f32; self.info.param_count()]; slots];
        let m = self.plan.mesh;
        for i in 0..m.pp * m.tp {
            let layout = self.workers[i].stage.layout();
            for (k, full) in out.iter_mut().enumerate() {
                let mut stage_vec = vec![0f32; layout.len];
                for w in self.workers.iter().skip(i).step_by(m.pp * m.tp) {
                    let got = w.dev.download(&B::view(&w.state[k]))?;
                    match &w.shard {
                        Some(sh) => sh.scatter(&got, &mut stage_vec),
                        None => stage_vec = got,
                    }
                    if w.shard.is_none() {
                        break;
                    }
                }
                layout.scatter(&self.info, &stage_vec, full);
            }
        }
        Ok(out)
    }

    /// Whether every replica holds bit-identical parameters and optimizer state (with ZeRO,
    /// where each replica keeps its own shard of the state: the parameters), and every copy of
    /// a shared parameter (on several stages) the same bits as the others.
    pub fn replicas_identical(&self) -> Result<bool> {
        let pp = self.plan.mesh.pp;
        for w in &self.workers {
            for t in &w.tied {
                let first = &self.workers[w.holder_index(t.holders[0])];
                let slot_of = |x: &Worker<B>| x.stage.layout().params.iter().position(|&p| p == t.param).unwrap();
                let mine = w.stage.layout().local[t.slot].clone();
                let theirs = first.stage.layout().local[slot_of(first)].clone();
                let a = w.dev.download(&B::view_range(w.stage.params(), mine))?;
                let b = first.dev.download(&B::view_range(first.stage.params(), theirs))?;
                if a.iter().zip(&b).any(|(x, y)| x.to_bits() != y.to_bits()) {
                    return Ok(false);
                }
            }
        }
        let per_replica = pp * self.plan.mesh.tp;
        for s in 0..per_replica {
            let w0 = &self.workers[s];
            let p0 = w0.dev.download(&B::view(w0.stage.params()))?;
            let s0: Vec<Vec<f32>> = w0.state.iter().map(|b| w0.dev.download(&B::view(b))).collect::<Result<_>>()?;
            for r in 1..self.plan.mesh.dp {
                let w = &self.workers[r * per_replica + s];
                let p = w.dev.download(&B::view(w.stage.params()))?;
                if p.iter().zip(&p0).any(|(a, b)| a.to_bits() != b.to_bits()) {
                    return Ok(false);
                }
                for (k, b) in w.state.iter().enumerate().filter(|_| w.shard.is_none()) {
                    let v = w.dev.download(&B::view(b))?;
                    if v.iter().zip(&s0[k]).any(|(a, b)| a.to_bits() != b.to_bits()) {
                        return Ok(false);
                    }
                }
            }
        }
        Ok(true)
    }

    /// Loss and accuracy over `data` in batches of `batch`, through replica 0's pipeline.
    pub fn evaluate(&mut self, data: &Dataset, batch: usize) -> Result<Eval> {
        let (pp, tp) = (self.plan.mesh.pp, self.plan.mesh.tp);
        const MB: usize = usize::MAX - 1;
        let mut loss = 0f64;
        let mut correct = 0;
        let idx: Vec<usize> = (0..data.len()).collect();
        for chunk in idx.chunks(batch.max(1)) {
            let (x, y) = data.gather(chunk);
            let rows = chunk.len();
            for s in 0..pp {
                // Replica 0's stage s on each tensor-parallel rank k is device s * tp + k.
                for k in 0..tp {
                    let i = s * tp + k;
                    let (before, rest) = self.workers.split_at_mut(i);
                    let w = &mut rest[0];
                    if s == 0 {
                        w.stage.load(&w.dev, MB, &x, &y)?;
                    } else {
                        let prev = &before[i - tp];
                        let out = prev.stage.output(MB)?;
                        prev.dev.synchronize()?;
                        let input = w.stage.input_mut(&w.dev, MB, rows)?;
                        w.dev.copy(&B::view(out), &mut B::view_mut(input))?;
                        if s + 1 == pp {
                            w.stage.load_labels(&w.dev, MB, &y)?;
                        }
                    }
                }
                let ws = &mut self.workers[s * tp..(s + 1) * tp];
                if tp == 1 {
                    ws[0].stage.forward(&ws[0].dev, MB)?;
                } else {
                    // The ranks' forwards meet in their group's sums: one thread each.
                    std::thread::scope(|sc| {
                        let hs: Vec<_> = ws.iter_mut().map(|w| sc.spawn(move || w.stage.forward(&w.dev, MB))).collect();
                        hs.into_iter()
                            .map(|h| {
                                h.join().unwrap_or_else(|_| Err(Error::Parallel("a device thread panicked".into())))
                            })
                            .collect::<Result<Vec<()>>>()
                    })?;
                }
            }
            // The last stage's ranks together (a vocabulary-parallel head sums over them).
            let ws = &mut self.workers[(pp - 1) * tp..pp * tp];
            let eval = |w: &Worker<B>| -> Result<(f32, usize)> {
                Ok((w.stage.loss(&w.dev, MB)?, w.stage.correct(&w.dev, MB, &y)?))
            };
            let (l, c) = if tp == 1 {
                eval(&ws[0])?
            } else {
                std::thread::scope(|sc| {
                    let hs: Vec<_> = ws.iter_mut().map(|w| sc.spawn(move || eval(w))).collect();
                    hs.into_iter()
                        .map(|h| h.join().unwrap_or_else(|_| Err(Error::Parallel("a device thread panicked".into()))))
                        .collect::<Result<Vec<_>>>()
                })?[0]
            };
            loss += l as f64 * rows as f64;
            correct += c;
            for w in &mut self.workers[..pp * tp] {
                w.stage.release(MB);
            }
        }
        Ok(Eval { loss: (loss / data.len().max(1) as f64) as f32, correct, total: data.len() })
    }
}

impl<B: Ops> Worker<B> {
    /// The mesh index of stage `s` of its replica, on its tensor-parallel rank.
    fn holder_index(&self, s: usize) -> usize {
        let (r, k) = (self.index / (self.pp * self.tp), self.index % self.tp);
        (r * self.pp + s) * self.tp + k
    }
}

impl<B: LocalGroup> Run for Engine<B> {
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
        &self.info
    }
    fn evaluate_on(&mut self, data: &Dataset, batch: usize) -> Result<Eval> {
        self.evaluate(data, batch)
    }
    fn flat_params(&self) -> Result<Vec<f32>> {
        self.params()
    }
    fn flat_optimizer_state(&self) -> Result<Vec<Vec<f32>>> {
        self.optimizer_state()
    }
    fn devices(&self) -> Vec<String> {
        self.device_names()
    }
}

/// A collective the bucket thread runs on a staged buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Coll {
    /// A gradient bucket summed over the replicas.
    AllReduce,
    /// A gradient bucket summed over the replicas, each keeping its part (ZeRO 1).
    ReduceScatter,
    /// A parameter bucket put together from the replicas' updated parts (ZeRO 1).
    AllGather,
}

/// The id of the ZeRO norm exchange among the bucket thread's jobs (buckets are layers).
const NORM_JOB: usize = usize::MAX;

/// A job of the bucket thread: the bucket (or [`NORM_JOB`]), the collective, the staged buffer
/// and the event after which it holds the data.
type Job<B> = (usize, Coll, <B as Backend>::Buf<f32>, <B as Backend>::Event);

fn closed(what: &str) -> Error {
    Error::Parallel(format!("the {what} stopped (a device failed)"))
}

/// Copies a view into a new buffer of the same device, to hand to another thread, with the
/// event after which the copy holds the data (the receiver's queue waits on it; the host does
/// not).
fn stage_copy<B: Ops>(dev: &B, v: &B::Ref<'_, f32>) -> Result<(B::Buf<f32>, B::Event)> {
    let b = dev.duplicate(v)?;
    Ok((b, dev.record_event()?))
}

pub(crate) fn run_worker<B: Ops>(
    w: &mut Worker<B>,
    s: usize,
    ctx: &StepCtx<'_>,
    links: &mut dyn PipeLinks<B>,
) -> Result<WorkerOut> {
    if w.comm_in_use && w.comm.is_none() {
        return Err(Error::Parallel(
            "this device's all-reduce communicator was lost when an earlier step failed; start the run again (from its last checkpoint)".into(),
        ));
    }
    let comm = w.comm.take();
    let buckets = w.stage.layout().buckets.clone();
    let bucket_range = |b: usize| buckets[b].clone();
    let (jobs_tx, jobs_rx) = channel::<Job<B>>();
    let (done_tx, done_rx) = channel::<(usize, B::Buf<f32>, Span, f64)>();
    let t0 = ctx.t0;
    let now = move || t0.elapsed().as_secs_f64();

    // The bucket all-reduce thread: reduces buckets in the order backward finishes them. Not a
    // scoped thread: if a reduction never ends (a peer died inside NCCL), the step returns an
    // error after the timeout instead of waiting to join it; the thread and its communicator
    // are then given up.
    let comm_thread = comm.map(|mut c| {
        std::thread::spawn(move || -> (Result<()>, Box<dyn Communicator<B>>) {
            for (b, coll, mut buf, ready) in jobs_rx {
                let start = now();
                let done = c.wait_event(&ready).and_then(|_| match coll {
                    Coll::AllReduce => c.all_reduce_sum(&mut buf),
                    Coll::ReduceScatter => c.reduce_scatter_sum(&mut buf),
                    Coll::AllGather => c.all_gather(&mut buf),
                });
                if let Err(e) = done {
                    return (Err(e), c);
                }
                let what = match coll {
                    Coll::AllReduce => "all-reduce",
                    Coll::ReduceScatter => "reduce-scatter",
                    Coll::AllGather => "all-gather",
                };
                let label =
                    if b == NORM_JOB { "all-reduce norm parts".to_string() } else { format!("{what} layer {b}") };
                let span = Span { kind: SpanKind::AllReduce, label, start, end: now() };
                let bytes = Traffic::ring(4 * B::buf_len(&buf), c.size(), coll == Coll::AllReduce);
                if done_tx.send((b, buf, span, bytes)).is_err() {
                    break;
                }
            }
            (Ok(()), c)
        })
    });
    let mut result = worker_actions(w, s, ctx, links, &jobs_tx, &done_rx, &bucket_range, &now);
    drop(jobs_tx);
    if let Some(h) = comm_thread {
        let timed_out = matches!(&result, Err(Error::Parallel(m)) if m.contains("did not finish"));
        if !timed_out {
            let (res, c) = h.join().unwrap_or_else(|_| panic!("the all-reduce thread panicked"));
            w.comm = Some(c);
            // The thread's own error says more than the worker's "the thread stopped".
            let worker_saw_it_stop =
                matches!(&result, Err(Error::Parallel(m)) if m.contains("all-reduce thread stopped"));
            if let (true, Err(e)) = (result.is_ok() || worker_saw_it_stop, res) {
                result = Err(e);
            }
        }
    }
    result
}

#[allow(clippy::too_many_arguments)]
fn worker_actions<B: Ops>(
    w: &mut Worker<B>,
    s: usize,
    ctx: &StepCtx<'_>,
    links: &mut dyn PipeLinks<B>,
    jobs_tx: &Sender<Job<B>>,
    done_rx: &Receiver<(usize, B::Buf<f32>, Span, f64)>,
    bucket_range: &dyn Fn(usize) -> Range<usize>,
    now: &dyn Fn() -> f64,
) -> Result<WorkerOut> {
    let dev = w.dev.clone();
    let pp = ctx.pp;
    let is_last = s + 1 == pp;
    let mut spans = Vec::new();
    let mut sent = Traffic::default();
    let mbs = ctx.passes * ctx.m;
    if is_last && w.losses.is_none() {
        w.losses = Some(dev.alloc(crate::train::LOSS_SLOTS * mbs)?);
    }
    let mut pending_grad: BTreeMap<usize, B::Buf<f32>> = BTreeMap::new();
    // With ZeRO, a split bucket is reduce-scattered; a whole one all-reduced.
    let shard = w.shard.clone();
    let coll_of = |b: usize| match &shard {
        Some(sh) if sh.owned[b].1 => Coll::ReduceScatter,
        _ => Coll::AllReduce,
    };
    let mut dispatched = vec![false; w.stage.layout().buckets.len()];
    let last_bwd = ctx.actions.iter().rposition(|a| matches!(a, Action::Backward(_)));
    w.stage.start_step();
    for pass in 0..ctx.passes {
        let final_pass = pass + 1 == ctx.passes;
        for (ai, &action) in ctx.actions.iter().enumerate() {
            let start = now();
            match action {
                Action::Forward(mb) => {
                    let id = pass * ctx.m + mb;
                    let rows = ctx.rows[id].clone();
                    if s == 0 {
                        let x = &ctx.x[rows.start * ctx.inputs..rows.end * ctx.inputs];
                        w.stage.load(&dev, id, x, &ctx.y[rows.start * ctx.lps..rows.end * ctx.lps])?;
                    }
                    w.stage.forward(&dev, id)?;
                    spans.push(Span { kind: SpanKind::Forward, label: format!("F{id}"), start, end: now() });
                }
                Action::SendAct(mb) => {
                    let id = pass * ctx.m + mb;
                    let out = B::view(w.stage.output(id)?);
                    sent.pp += 4.0 * out.view_len() as f64;
                    links.send_act(&dev, id, &out)?;
                    spans.push(Span { kind: SpanKind::Transfer, label: format!("send act {id}"), start, end: now() });
                }
                Action::RecvAct(mb) => {
                    let id = pass * ctx.m + mb;
                    let buf = links.recv_act(&dev, id)?;
                    let rows = ctx.rows[id].clone();
                    let input = w.stage.input_mut(&dev, id, rows.len())?;
                    dev.copy(&B::view(&buf), &mut B::view_mut(input))?;
                    if is_last {
                        w.stage.load_labels(&dev, id, &ctx.y[rows.start * ctx.lps..rows.end * ctx.lps])?;
                    }
                    spans.push(Span { kind: SpanKind::Transfer, label: format!("recv act {id}"), start, end: now() });
                }
                Action::RecvGrad(mb) => {
                    let id = pass * ctx.m + mb;
                    pending_grad.insert(id, links.recv_grad(&dev, id)?);
                    spans.push(Span { kind: SpanKind::Transfer, label: format!("recv grad {id}"), start, end: now() });
                }
                Action::Backward(mb) => {
                    let id = pass * ctx.m + mb;
                    let last_of_step = final_pass && Some(ai) == last_bwd && w.comm_in_use;
                    let g = pending_grad.remove(&id);
                    let gv = g.as_ref().map(|b| B::view(b));
                    let mut on_layer = |i: usize, grads: &B::Buf<f32>| -> Result<()> {
                        if last_of_step && !bucket_range(i).is_empty() {
                            // This layer's gradients are final: reduce them while backward goes on.
                            let (staged, ready) = stage_copy(&dev, &B::view_range(grads, bucket_range(i)))?;
                            jobs_tx.send((i, coll_of(i), staged, ready)).map_err(|_| closed("all-reduce thread"))?;
                            dispatched[i] = true;
                        }
                        Ok(())
                    };
                    match w.losses.as_mut().filter(|_| is_last) {
                        // The loss share stays on the device, in this step's slot.
                        Some(losses) => {
                            let at = ctx.loss_slot * mbs + id;
                            let mut out = B::view_range_mut(losses, at..at + 1);
                            w.stage.backward_to(&dev, id, gv.as_ref(), ctx.loss_scale, &mut on_layer, &mut out)?
                        }
                        None => {
                            w.stage.backward(&dev, id, gv.as_ref(), ctx.loss_scale, &mut on_layer)?;
                        }
                    }
                    w.stage.release(id);
                    spans.push(Span { kind: SpanKind::Backward, label: format!("B{id}"), start, end: now() });
                }
                Action::SendGrad(mb) => {
                    let id = pass * ctx.m + mb;
                    let rows = ctx.rows[id].len();
                    let g = w.stage.input_grad(rows);
                    sent.pp += 4.0 * g.view_len() as f64;
                    links.send_grad(&dev, id, &g)?;
                    spans.push(Span { kind: SpanKind::Transfer, label: format!("send grad {id}"), start, end: now() });
                }
                Action::AllReduce(b) => {
                    if final_pass && !dispatched[b] && !bucket_range(b).is_empty() {
                        let (staged, ready) = stage_copy(&dev, &B::view_range(w.stage.grads(), bucket_range(b)))?;
                        jobs_tx.send((b, coll_of(b), staged, ready)).map_err(|_| closed("all-reduce thread"))?;
                        dispatched[b] = true;
                    }
                }
                Action::OptimizerStep => {
                    if !final_pass {
                        continue;
                    }
                    // Collect the reduced buckets and put them back.
                    let mut comm_spans = Vec::new();
                    // Half as long again as the communicator's own limit: a communicator that
                    // waits on a peer reports first, naming the peer (and, under MPI, whether its
                    // process is stopped); this catches one that never returns (NCCL).
                    let limit = ctx.comm_timeout + ctx.comm_timeout / 2;
                    let done = || {
                        done_rx.recv_timeout(limit).map_err(|e| match e {
                            std::sync::mpsc::RecvTimeoutError::Timeout => Error::Parallel(format!(
                                "the gradient all-reduce did not finish within {limit:?}: a peer stopped or hung. If it was only slow, allow more time: TESSERA_COMM_TIMEOUT={} (seconds)", (limit.as_secs() * 4).max(600)
                            )),
                            std::sync::mpsc::RecvTimeoutError::Disconnected => closed("all-reduce thread"),
                        })
                    };
                    let mut done = || {
                        let (b, buf, span, bytes) = done()?;
                        sent.dp += bytes;
                        sent.collectives += 1;
                        Ok::<_, Error>((b, buf, span))
                    };
                    for _ in 0..dispatched.iter().filter(|d| **d).count() {
                        let (b, buf, span) = done()?;
                        let mut gv = B::view_mut(w.stage.grads_mut());
                        // A reduce-scattered bucket: only this replica's part holds the sum.
                        let part = match &shard {
                            Some(sh) if sh.owned[b].1 => sh.owned[b].0.clone(),
                            _ => bucket_range(b),
                        };
                        let at = part.start - bucket_range(b).start..part.end - bucket_range(b).start;
                        dev.copy(&B::view_range(&buf, at), &mut B::sub_mut(&mut gv, part))?;
                        comm_spans.push(span);
                    }
                    let wait_end = now();
                    if wait_end - start > 1e-6 && !comm_spans.is_empty() {
                        spans.push(Span {
                            kind: SpanKind::Idle,
                            label: "wait all-reduce".into(),
                            start,
                            end: wait_end,
                        });
                    }
                    // Shared parameters held by several stages: every copy takes the sum of the
                    // copies' gradients (in stage order, so every holder gets the same bits).
                    for t in &w.tied {
                        let range = w.stage.layout().local[t.slot].clone();
                        let mine = dev.download(&B::view_range(w.stage.grads(), range.clone()))?;
                        let parts = links.tied_parts(s, t.param, &t.holders, mine)?;
                        let mut sum = parts[0].1.clone();
                        for (_, p) in &parts[1..] {
                            sum.iter_mut().zip(p).for_each(|(a, b)| *a += b);
                        }
                        dev.write(&mut B::view_range_mut(w.stage.grads_mut(), range), &sum)?;
                    }
                    let ostart = now();
                    let (grad_norm, scale) = match ctx.cfg.clip_norm {
                        Some(max) if shard.is_some() || w.tp > 1 => {
                            // Each gradient counted once: a part of a ZeRO-split bucket by the
                            // replica that owns it, a part of a tensor-split parameter by its
                            // rank; the rest, the same on every replica and rank, by each
                            // replica alike and on tensor-parallel rank 0 alone.
                            let layout = w.stage.layout().clone();
                            let k = w.index % w.tp;
                            let (mut mine, mut whole) = (0f64, 0f64);
                            for (j, &p) in layout.params.iter().enumerate() {
                                if w.tied.iter().any(|t| t.slot == j && t.holders[0] != s) {
                                    continue;
                                }
                                let tp_split = w.tp > 1 && w.stage.info().params[p].split.is_some();
                                if !tp_split && k != 0 {
                                    continue;
                                }
                                let r = layout.local[j].clone();
                                let parts: Vec<(Range<usize>, bool)> = match &shard {
                                    None => vec![(r, false)],
                                    Some(sh) => sh
                                        .owned
                                        .iter()
                                        .map(|(o, split)| (r.start.max(o.start)..r.end.min(o.end), *split))
                                        .filter(|(x, _)| !x.is_empty())
                                        .collect(),
                                };
                                for (x, split) in parts {
                                    let v = dev.sum(&B::view_range(w.stage.grads(), x), true)? as f64;
                                    if split {
                                        mine += v;
                                    } else {
                                        whole += v;
                                    }
                                }
                            }
                            let mut local = whole;
                            if let Some(sh) = &shard {
                                // The replicas' parts, exchanged exactly: slot r of a zeroed
                                // vector, summed over the replicas.
                                let mut slots = vec![0f32; sh.dp];
                                slots[sh.replica] = mine as f32;
                                let buf = dev.upload(&slots)?;
                                jobs_tx
                                    .send((NORM_JOB, Coll::AllReduce, buf, dev.record_event()?))
                                    .map_err(|_| closed("all-reduce thread"))?;
                                let (_, buf, span) = done()?;
                                comm_spans.push(span);
                                local += dev.download(&B::view(&buf))?.iter().map(|&v| v as f64).sum::<f64>();
                            }
                            if let Some(g) = w.stage.tp_group().filter(|g| g.size() > 1) {
                                // And the tensor-parallel ranks' parts, the same way.
                                let mut slots = vec![0f32; g.size()];
                                slots[g.rank()] = local as f32;
                                let mut buf = dev.upload(&slots)?;
                                g.all_reduce(&dev, &mut B::view_mut(&mut buf))?;
                                local = dev.download(&B::view(&buf))?.iter().map(|&v| v as f64).sum::<f64>();
                            }
                            let parts = links.norm_parts(s, local)?;
                            let norm = parts.iter().map(|p| p.1).sum::<f64>().sqrt() as f32;
                            (Some(norm), if norm > max { max / (norm + 1e-6) } else { 1.0 })
                        }
                        Some(max) => {
                            let mut local = dev.sum(&B::view(w.stage.grads()), true)? as f64;
                            // A shared parameter counts once: on the first stage holding it.
                            for t in w.tied.iter().filter(|t| t.holders[0] != s) {
                                let range = w.stage.layout().local[t.slot].clone();
                                local -= dev.sum(&B::view_range(w.stage.grads(), range), true)? as f64;
                            }
                            let parts = links.norm_parts(s, local)?;
                            let norm = parts.iter().map(|p| p.1).sum::<f64>().sqrt() as f32;
                            (Some(norm), if norm > max { max / (norm + 1e-6) } else { 1.0 })
                        }
                        None => (None, 1.0),
                    };
                    let no_decay = w.stage.layout().no_decay.clone();
                    let (params, grads) = w.stage.params_and_grads();
                    let (opt, lr, t) = (&ctx.cfg.optimizer, ctx.lr, ctx.t);
                    match &shard {
                        None => {
                            apply_optimizer_masked(&dev, opt, lr, t, scale, params, grads, &mut w.state, &no_decay)?
                        }
                        Some(sh) => {
                            // Each replica updates its part; the split buckets' parameters are
                            // then put together from every replica's part.
                            for ((part, _), &at) in
                                sh.owned.iter().zip(&sh.state_at).filter(|((r, _), _)| !r.is_empty())
                            {
                                let st = &mut w.state;
                                apply_optimizer_part(
                                    &dev,
                                    opt,
                                    lr,
                                    t,
                                    scale,
                                    params,
                                    grads,
                                    st,
                                    part.clone(),
                                    at,
                                    &no_decay,
                                )?;
                            }
                            let mut gathers = 0;
                            for (b, _) in sh
                                .owned
                                .iter()
                                .enumerate()
                                .filter(|(b, (_, split))| *split && !bucket_range(*b).is_empty())
                            {
                                let (staged, ready) = stage_copy(&dev, &B::view_range(params, bucket_range(b)))?;
                                jobs_tx
                                    .send((b, Coll::AllGather, staged, ready))
                                    .map_err(|_| closed("all-reduce thread"))?;
                                gathers += 1;
                            }
                            for _ in 0..gathers {
                                let (b, buf, span) = done()?;
                                dev.copy(&B::view(&buf), &mut B::view_range_mut(params, bucket_range(b)))?;
                                comm_spans.push(span);
                            }
                        }
                    }
                    let mut loss = 0f32;
                    if ctx.read_loss {
                        // The one wait of the step: the losses of the steps since the last read.
                        match &w.losses {
                            Some(l) if is_last => {
                                let got = dev.download(&B::view_range(l, 0..(ctx.loss_slot + 1) * mbs))?;
                                w.stage.check_loss_flags(&dev)?;
                                loss = got.iter().map(|&v| v as f64).sum::<f64>() as f32;
                            }
                            _ => dev.synchronize()?,
                        }
                    }
                    spans.push(Span {
                        kind: SpanKind::Optimizer,
                        label: "optimizer".into(),
                        start: ostart,
                        end: now(),
                    });
                    // The sums inside the layers, on the timeline and in the traffic.
                    if let Some(g) = w.stage.tp_group() {
                        for (a, b, floats) in g.take_log() {
                            let at = |t: Instant| t.saturating_duration_since(ctx.t0).as_secs_f64();
                            let label = format!("tp all-reduce {floats} floats");
                            comm_spans.push(Span { kind: SpanKind::AllReduce, label, start: at(a), end: at(b) });
                            sent.tp += Traffic::ring(4 * floats, g.size(), true);
                            sent.collectives += 1;
                        }
                    }
                    return Ok(WorkerOut { loss, grad_norm, spans, comm_spans, sent });
                }
            }
        }
    }
    Err(Error::Parallel(format!("stage {s}'s schedule has no optimizer step")))
}
