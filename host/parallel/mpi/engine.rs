//! The distributed engine: one rank per device of the mesh, the in-process worker code, pipeline
//! activations and gradients as MPI messages (`MpiLinks`), and the plan every rank agrees on.

use std::sync::Arc;
use std::time::Instant;

use crate::backend::Backend;
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::nn::{Model, ModelInfo, Stage, TpGroup};
use crate::ops::Ops;
use crate::parallel::engine::{
    prepare_step, run_worker, shard_of, tied_params, upload_state, PipeLinks, Shard, StepCtx, TpComm, Worker,
};
use crate::parallel::schedule::Schedule;
use crate::parallel::timeline::{Lane, Timeline};
use crate::parallel::Plan;
use crate::train::{Eval, Run, StepStats, TrainConfig};

use super::wire::{MakeComm, StageGroup};
use super::world::{MpiWorld, Outbox, Shared};

/// Rank 0's plan, on every rank (collective). Ranks that plan for themselves (the planner
/// times its own device) may choose differently; they must run one plan.
pub fn agree_on_plan(world: &Arc<MpiWorld>, plan: Plan) -> Plan {
    let comm = world.dup();
    let all = world.all_gather(&comm, &plan.encode(), "the plan");
    if all[world.rank] == all[0] {
        plan
    } else {
        // The timeout is each rank's own (its world's), not part of the agreement.
        match Plan::decode(&all[0]) {
            Ok(p) => Plan { comm_timeout: plan.comm_timeout, ..p },
            Err(e) => world.abort(&e.to_string()),
        }
    }
}

/// Which communicator all-reduces the gradient buckets across processes.
pub enum AllReduce<B: Ops> {
    /// tessera's ring over MPI messages (any backend; bit-identical to the in-process run).
    Ring,
    /// A communicator built from the stage group by the given function (e.g. NCCL for GPUs).
    /// `force` builds it even for dp = 1 (a one-rank group), to exercise it on one GPU.
    Custom {
        /// Builds this rank's communicator.
        make: MakeComm<B>,
        /// Use it even when dp = 1.
        force: bool,
    },
}

/// The pipeline links of one rank: activations and gradients to the neighbouring stages of
/// its replica, norm parts to all of them.
pub struct MpiLinks {
    pub(crate) world: Arc<MpiWorld>,
    pub(crate) pipe: Arc<Shared>,
    pub(crate) rank: usize,
    pub(crate) pp: usize,
    /// Ranks per stage: the stride between a rank and the same tensor-parallel rank of the
    /// next stage.
    pub(crate) tp: usize,
    pub(crate) out: Outbox,
}

pub(crate) const TAG_ACT: i32 = 0;

pub(crate) const TAG_GRAD: i32 = 1;

pub(crate) const TAG_NORM: i32 = 2;

pub(crate) const TAG_EVAL: i32 = 3;

pub(crate) const TAG_TIE: i32 = 4;

pub(crate) fn tag(kind: i32, id: usize) -> i32 {
    kind + 8 * (id % (1 << 20)) as i32
}

impl<B: Backend> PipeLinks<B> for MpiLinks {
    fn send_act(&mut self, dev: &B, id: usize, v: &B::Ref<'_, f32>) -> Result<()> {
        let host = dev.download(v)?;
        let to = self.rank + self.tp;
        self.out.send(&self.pipe, to, to, tag(TAG_ACT, id), host, "an activation");
        Ok(())
    }
    fn recv_act(&mut self, dev: &B, id: usize) -> Result<B::Buf<f32>> {
        self.out.progress();
        let from = self.rank - self.tp;
        let v = self.world.recv::<f32>(&self.pipe, from, from, tag(TAG_ACT, id), "an activation");
        dev.upload(&v)
    }
    fn send_grad(&mut self, dev: &B, id: usize, v: &B::Ref<'_, f32>) -> Result<()> {
        let host = dev.download(v)?;
        let to = self.rank - self.tp;
        self.out.send(&self.pipe, to, to, tag(TAG_GRAD, id), host, "a gradient");
        Ok(())
    }
    fn recv_grad(&mut self, dev: &B, id: usize) -> Result<B::Buf<f32>> {
        self.out.progress();
        let from = self.rank + self.tp;
        let v = self.world.recv::<f32>(&self.pipe, from, from, tag(TAG_GRAD, id), "a gradient");
        dev.upload(&v)
    }
    fn norm_parts(&mut self, stage: usize, local: f64) -> Result<Vec<(usize, f64)>> {
        let at = |s: usize| self.rank - stage * self.tp + s * self.tp;
        for s in (0..self.pp).filter(|&s| s != stage) {
            self.out.send(&self.pipe, at(s), at(s), TAG_NORM, vec![local], "a gradient-norm part");
        }
        let mut parts = vec![(stage, local)];
        for s in (0..self.pp).filter(|&s| s != stage) {
            let v = self.world.recv::<f64>(&self.pipe, at(s), at(s), TAG_NORM, "a gradient-norm part");
            parts.push((s, v[0]));
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
        let at = |s: usize| self.rank - stage * self.tp + s * self.tp;
        for &q in holders.iter().filter(|&&q| q != stage) {
            let to = at(q);
            self.out.send(&self.pipe, to, to, tag(TAG_TIE, param), local.clone(), "a shared parameter's gradient");
        }
        let mut parts = vec![(stage, local)];
        for &q in holders.iter().filter(|&&q| q != stage) {
            let from = at(q);
            let v =
                self.world.recv::<f32>(&self.pipe, from, from, tag(TAG_TIE, param), "a shared parameter's gradient");
            parts.push((q, v));
        }
        parts.sort_by_key(|p| p.0);
        Ok(parts)
    }
}

/// Data- and pipeline-parallel training across processes: this process is one rank of the
/// mesh. The API follows the in-process [`Engine`](crate::parallel::engine::Engine); every
/// rank calls every method (they communicate).
pub struct DistEngine<B: Ops> {
    pub(crate) info: ModelInfo,
    pub(crate) world: Arc<MpiWorld>,
    pub(crate) cfg: TrainConfig,
    pub(crate) plan: Plan,
    pub(crate) schedule: Schedule,
    pub(crate) worker: Worker<B>,
    pub(crate) pipe: Arc<Shared>,
    pub(crate) ctrl: Shared,
    pub(crate) step: u64,
    pub(crate) timeline: Option<Timeline>,
}

impl<B: Ops> DistEngine<B> {
    /// A fresh run: the model's seeded initial parameters, on this rank's `dev`.
    pub fn new(world: &Arc<MpiWorld>, dev: &B, model: &Model<B>, cfg: TrainConfig, plan: Plan) -> Result<Self> {
        let params = model.init(cfg.seed)?;
        Self::with_state(world, dev, model, cfg, plan, &params, None, 0)
    }

    /// A run from flat parameters, optimizer state and step count (e.g. from a checkpoint
    /// written by any plan, on any number of processes).
    #[allow(clippy::too_many_arguments)]
    pub fn with_state(
        world: &Arc<MpiWorld>,
        dev: &B,
        model: &Model<B>,
        cfg: TrainConfig,
        plan: Plan,
        params: &[f32],
        state: Option<&[Vec<f32>]>,
        step: u64,
    ) -> Result<Self> {
        Self::with_all_reduce(world, dev, model, cfg, plan, params, state, step, AllReduce::Ring)
    }

    /// As [`DistEngine::with_state`], with the gradient all-reduce of `all_reduce`.
    #[allow(clippy::too_many_arguments)]
    pub fn with_all_reduce(
        world: &Arc<MpiWorld>,
        dev: &B,
        model: &Model<B>,
        cfg: TrainConfig,
        plan: Plan,
        params: &[f32],
        state: Option<&[Vec<f32>]>,
        step: u64,
        all_reduce: AllReduce<B>,
    ) -> Result<Self> {
        let plan = agree_on_plan(world, plan);
        cfg.validate()?;
        let info = model.info()?;
        plan.validate(&info)?;
        let mesh = plan.mesh;
        if mesh.devices() != world.size {
            return Err(Error::Invalid(format!(
                "--dp {} x --pp {} x --tp {} needs {} ranks, but the job has {} (mpirun -np {})",
                mesh.dp,
                mesh.pp,
                mesh.tp,
                mesh.devices(),
                world.size,
                mesh.devices()
            )));
        }
        *world.mesh.lock().unwrap_or_else(|e| e.into_inner()) = Some(mesh);
        let n = info.param_count();
        if params.len() != n {
            return Err(Error::shape("DistEngine", format!("{} parameters for a model of {n}", params.len())));
        }
        let slots = cfg.optimizer.slots().len();
        if let Some(s) = state {
            if s.len() != slots || s.iter().any(|v| v.len() != n) {
                return Err(Error::shape("DistEngine", format!("optimizer state must be {slots} vectors of {n}")));
            }
        }
        let (r, s, k) = mesh.coords(world.rank);
        let layers = plan.stages[s].clone();
        let layout = info.stage_layout_tp(layers.clone(), mesh.tp, k);
        let reduce = mesh.dp > 1 || matches!(all_reduce, AllReduce::Custom { force: true, .. });
        let buckets: Vec<usize> = plan.stages.iter().map(|l| if reduce { l.len() } else { 0 }).collect();
        let schedule = Schedule::build(plan.schedule, mesh.pp, plan.microbatches, &buckets)?;
        schedule.check_tp(mesh.tp, &plan.stage_sums(&info))?;
        // Collective calls, in the same order on every rank: the data-parallel group of this
        // stage and tensor-parallel rank, then (tp > 1) the tensor-parallel group of this
        // replica's stage.
        let dp_comm = world.split(s * mesh.tp + k, r);
        let tp_group = if mesh.tp > 1 {
            let group = StageGroup {
                world: world.clone(),
                comm: world.split(world.size + r * mesh.pp + s, k),
                rank: k,
                size: mesh.tp,
                world_ranks: (0..mesh.tp).map(|q| mesh.index(r, s, q)).collect(),
            };
            let ring: Box<dyn crate::parallel::comm::Communicator<B>> = Box::new(group.ring_in_line(dev));
            Some(TpGroup::new(k, mesh.tp, Box::new(TpComm(ring))))
        } else {
            None
        };
        let stage = Stage::with_tp(dev, model, layers.clone(), &layout.gather(&info, params), tp_group)?;
        let tied = tied_params(&info, &plan, s);
        let shard = shard_of(&layout, &plan, &tied, reduce, r);
        let st = upload_state(dev, &info, &layout, shard.as_ref(), slots, state)?;
        // Collective calls, in the same order on every rank.
        let pipe = Arc::new(world.dup());
        let ctrl = world.dup();
        let group = StageGroup {
            world: world.clone(),
            comm: dp_comm,
            rank: r,
            size: mesh.dp,
            world_ranks: (0..mesh.dp).map(|q| mesh.index(q, s, k)).collect(),
        };
        let comm: Option<Box<dyn crate::parallel::comm::Communicator<B>>> = match all_reduce {
            _ if !reduce => None,
            AllReduce::Ring => Some(Box::new(group.ring(dev)?)),
            AllReduce::Custom { make, .. } => Some(make(group, dev)?),
        };
        let worker = Worker {
            index: world.rank,
            pp: mesh.pp,
            tp: mesh.tp,
            dev: dev.clone(),
            stage,
            tied,
            state: st,
            shard,
            comm,
            comm_in_use: reduce,
            losses: None,
        };
        Ok(DistEngine { info, world: world.clone(), cfg, plan, schedule, worker, pipe, ctrl, step, timeline: None })
    }

    /// The plan.
    pub fn plan(&self) -> &Plan {
        &self.plan
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
    /// This rank's part of the last step.
    pub fn timeline(&self) -> Option<&Timeline> {
        self.timeline.as_ref()
    }
    /// The world.
    pub fn world(&self) -> &Arc<MpiWorld> {
        &self.world
    }
    /// This rank's device, named with the rank: `rank1:cpu:0`.
    pub fn device_names(&self) -> Vec<String> {
        vec![format!("rank{}:{}", self.world.rank, self.worker.dev.name())]
    }

    /// `(replica, stage)` of world rank `rank`.
    pub(crate) fn stage_of(&self, rank: usize) -> (usize, usize) {
        let (r, s, _) = self.plan.mesh.coords(rank);
        (r, s)
    }

    /// One optimizer step on the whole batch (every rank passes the same batch; each uses its
    /// replica's rows).
    pub fn step(&mut self, x: &[f32], y: &[i32]) -> Result<StepStats> {
        let prep = prepare_step(&self.info, &self.cfg, &self.plan, self.step, x, y)?;
        let (r, s) = self.stage_of(self.world.rank);
        let t0 = Instant::now();
        let ctx = StepCtx::new(&self.info, &self.schedule, &self.plan, &self.cfg, &prep, r, s, x, y, t0);
        let mut links = MpiLinks {
            world: self.world.clone(),
            pipe: self.pipe.clone(),
            rank: self.world.rank,
            pp: self.plan.mesh.pp,
            tp: self.plan.mesh.tp,
            out: Outbox::new(&self.world),
        };
        let out = match run_worker(&mut self.worker, s, &ctx, &mut links) {
            Ok(o) => o,
            Err(e) => {
                // The job is about to stop (the caller aborts it): do not wait for sends that
                // no one may take, so this rank's own error is the one reported.
                std::mem::forget(links);
                return Err(e);
            }
        };
        links.out.flush();
        // The loss is the sum of the last stages' parts (a stage's tensor-parallel ranks compute
        // the same: rank 0's counts); every rank learns it.
        let k = self.plan.mesh.coords(self.world.rank).2;
        let mine = if k == 0 { out.loss as f64 } else { 0.0 };
        let all = self.world.all_gather(&self.ctrl, &[mine], "the step's loss");
        let loss = all.iter().map(|v| v[0]).sum::<f64>() as f32;
        self.step += 1;
        let rank = if self.plan.mesh.tp > 1 { format!(", tp rank {k}") } else { String::new() };
        let name = format!("{} (replica {r}, stage {s}{rank})", self.device_names()[0]);
        self.timeline = Some(Timeline {
            lanes: vec![Lane { name, spans: out.spans, comm: out.comm_spans, sent: out.sent }],
            total: t0.elapsed().as_secs_f64(),
        });
        Ok(StepStats { loss, loss_steps: 1, lr: prep.lr, grad_norm: out.grad_norm })
    }

    /// The model's flat vector made of each stage's part (replica 0's ranks hold them), on
    /// every rank.
    pub(crate) fn gather_stages(&self, part: Option<Vec<f32>>, what: &'static str) -> Result<Vec<f32>> {
        const TAG: i32 = 11;
        let m = self.plan.mesh;
        // Replica 0's ranks: every stage on every tensor-parallel rank.
        let pp = m.pp * m.tp;
        let me = self.world.rank;
        let layout = |q: usize| {
            let (_, s, k) = m.coords(q);
            self.info.stage_layout_tp(self.plan.stages[s].clone(), m.tp, k)
        };
        if me == 0 {
            let mut full = vec![0f32; self.info.param_count()];
            layout(0).scatter(&self.info, &part.unwrap_or_default(), &mut full);
            for s in 1..pp {
                let v = self.world.recv::<f32>(&self.ctrl, s, s, TAG, what);
                layout(s).scatter(&self.info, &v, &mut full);
            }
            for q in 1..self.world.size {
                self.world.send(&self.ctrl, q, q, TAG + 1, full.clone(), what);
            }
            Ok(full)
        } else {
            if me < pp {
                self.world.send(&self.ctrl, 0, 0, TAG, part.unwrap_or_default(), what);
            }
            Ok(self.world.recv::<f32>(&self.ctrl, 0, 0, TAG + 1, what))
        }
    }

    /// Flat parameters (the model's layout), from replica 0, on every rank.
    pub fn params(&self) -> Result<Vec<f32>> {
        let part = if self.world.rank < self.plan.mesh.pp * self.plan.mesh.tp {
            Some(self.worker.dev.download(&B::view(self.worker.stage.params()))?)
        } else {
            None
        };
        self.gather_stages(part, "parameters")
    }

    /// Optimizer state as flat vectors (one per slot), from replica 0 (with ZeRO, every
    /// replica's shard put together), on every rank.
    pub fn optimizer_state(&self) -> Result<Vec<Vec<f32>>> {
        if self.worker.shard.is_some() {
            return self.sharded_state();
        }
        let mut out = Vec::new();
        for k in 0..self.worker.state.len() {
            let part = if self.world.rank < self.plan.mesh.pp * self.plan.mesh.tp {
                Some(self.worker.dev.download(&B::view(&self.worker.state[k]))?)
            } else {
                None
            };
            out.push(self.gather_stages(part, "optimizer state")?);
        }
        Ok(out)
    }

    /// ZeRO: every rank's shard of each state slot, put together on every rank.
    fn sharded_state(&self) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::new();
        let mut stage_vecs: Vec<Vec<f32>> = Vec::new();
        for k in 0..self.worker.state.len() {
            let mine = self.worker.dev.download(&B::view(&self.worker.state[k]))?;
            let mine: Vec<f64> = mine.iter().map(|&v| v as f64).collect();
            let all = self.world.all_gather(&self.ctrl, &mine, "optimizer state shards");
            // One whole vector per (stage, tensor-parallel rank), from the replicas' shards.
            let m = self.plan.mesh;
            let layout = |s: usize, k: usize| self.info.stage_layout_tp(self.plan.stages[s].clone(), m.tp, k);
            stage_vecs.clear();
            for q in 0..m.pp * m.tp {
                stage_vecs.push(vec![0f32; layout(q / m.tp, q % m.tp).len]);
            }
            for (q, part) in all.iter().enumerate() {
                let (r, s, k) = m.coords(q);
                let tied = tied_params(&self.info, &self.plan, s);
                let sh = Shard::new(&layout(s, k), &tied, m.dp, r);
                let part: Vec<f32> = part.iter().map(|&v| v as f32).collect();
                sh.scatter(&part, &mut stage_vecs[s * m.tp + k]);
            }
            let mut full = vec![0f32; self.info.param_count()];
            for (q, v) in stage_vecs.iter().enumerate() {
                layout(q / m.tp, q % m.tp).scatter(&self.info, v, &mut full);
            }
            out.push(full);
        }
        Ok(out)
    }

    /// Whether every replica holds bit-identical parameters and optimizer state (with ZeRO, the
    /// parameters: each replica keeps its own shard of the state). Compares a hash of each
    /// rank's stage with replica 0's.
    pub fn replicas_identical(&self) -> Result<bool> {
        let mut h: u64 = 0xcbf29ce484222325;
        let mut eat = |v: &[f32]| {
            for x in v {
                for b in x.to_bits().to_le_bytes() {
                    h ^= b as u64;
                    h = h.wrapping_mul(0x100000001b3);
                }
            }
        };
        eat(&self.worker.dev.download(&B::view(self.worker.stage.params()))?);
        for st in self.worker.state.iter().filter(|_| self.worker.shard.is_none()) {
            eat(&self.worker.dev.download(&B::view(st))?);
        }
        // Split in two exact halves for f64 transport.
        let all = self.world.all_gather(&self.ctrl, &[(h >> 32) as f64, (h & 0xffff_ffff) as f64], "a state hash");
        let per_replica = self.plan.mesh.pp * self.plan.mesh.tp;
        Ok((0..self.world.size).all(|q| all[q] == all[q % per_replica]))
    }

    /// Loss and accuracy over `data` in batches of `batch`: replica `r` takes batches `r`,
    /// `r + dp`, ... through its pipeline; every rank gets the totals.
    pub fn evaluate(&mut self, data: &Dataset, batch: usize) -> Result<Eval> {
        const MB: usize = usize::MAX - 1;
        let m = self.plan.mesh;
        let (dp, pp, tp) = (m.dp, m.pp, m.tp);
        let (r, s) = self.stage_of(self.world.rank);
        let mut loss = 0f64;
        let mut correct = 0usize;
        let dev = self.worker.dev.clone();
        let idx: Vec<usize> = (0..data.len()).collect();
        for (c, chunk) in idx.chunks(batch.max(1)).enumerate().filter(|(c, _)| c % dp == r) {
            let (x, y) = data.gather(chunk);
            let rows = chunk.len();
            let st = &mut self.worker.stage;
            if s == 0 {
                st.load(&dev, MB, &x, &y)?;
            } else {
                let from = self.world.rank - tp;
                let v = self.world.recv::<f32>(&self.pipe, from, from, tag(TAG_EVAL, c), "an evaluation activation");
                let input = st.input_mut(&dev, MB, rows)?;
                dev.write(&mut B::view_mut(input), &v)?;
                if s + 1 == pp {
                    st.load_labels(&dev, MB, &y)?;
                }
            }
            st.forward(&dev, MB)?;
            if s + 1 < pp {
                let out = dev.download(&B::view(st.output(MB)?))?;
                let to = self.world.rank + tp;
                self.world.send(&self.pipe, to, to, tag(TAG_EVAL, c), out, "an evaluation activation");
            } else {
                loss += st.loss(&dev, MB)? as f64 * rows as f64;
                correct += st.correct(&dev, MB, &y)?;
            }
            st.release(MB);
        }
        // Each replica's last stage has its share of the sums; everyone learns the totals.
        let all = self.world.all_gather(&self.ctrl, &[loss, correct as f64], "the evaluation");
        // (A last stage's tensor-parallel ranks compute the same: rank 0's counts.)
        let last: Vec<&Vec<f64>> = (0..dp).map(|q| &all[m.index(q, pp - 1, 0)]).collect();
        let loss: f64 = last.iter().map(|v| v[0]).sum();
        let correct = last.iter().map(|v| v[1] as usize).sum();
        Ok(Eval { loss: (loss / data.len().max(1) as f64) as f32, correct, total: data.len() })
    }
}

impl<B: Ops> Run for DistEngine<B> {
    fn train_step(&mut self, x: &[f32], labels: &[i32]) -> Result<StepStats> {
        self.step(x, labels)
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
    fn is_root(&self) -> bool {
        self.world.rank == 0
    }
}
