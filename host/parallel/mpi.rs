//! Several processes: MPI (rsmpi over the system's Open MPI) launches the ranks and carries
//! their traffic. One rank per process, one device per rank; rank `r * pp + s` runs stage `s`
//! of replica `r`, exactly as device `r * pp + s` does in one process, and through the same
//! worker code: pipeline activations and gradients cross processes as MPI messages
//! ([`MpiLinks`]), the gradient buckets are all-reduced by the same ring as in one process,
//! over MPI ([`MpiComm`]), so the result is bit-for-bit the in-process one.
//!
//! `mpirun -np 4 tessera train --dp 2 --pp 2` (or `srun -n 4 ...`) needs nothing else: MPI
//! tells each process its rank and the world size, and a communicator split by node gives the
//! local rank, which picks the GPU (`--device cuda` is `cuda:<local rank>`).
//!
//! A rank that dies must not leave the others hanging: every wait here is bounded
//! (`TESSERA_COMM_TIMEOUT`, seconds, default 120). A rank that waits longer prints which rank
//! (replica, stage) it waited for and what for, and stops the whole job (`MPI_Abort`: an MPI
//! job cannot recover a lost rank). A rank that fails with an error does the same at once.
//! Launchers also stop the job when a rank is killed; tessera then says so on every rank
//! ([`install_termination_notice`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mpi::datatype::Equivalence;
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::*;
use mpi::Threading;

use crate::backend::Backend;
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::nn::Stage;
use crate::ops::Ops;
use crate::parallel::comm::{RingComm, Wire};
use crate::parallel::engine::{prepare_step, run_worker, PipeLinks, StepCtx, Worker};
use crate::parallel::schedule::Schedule;
use crate::parallel::timeline::{Lane, Timeline};
use crate::parallel::Plan;
use crate::train::{count_correct, Eval, StepStats, Steps, TrainConfig};

/// A communicator that may be used from several threads. tessera asks MPI for
/// `MPI_THREAD_MULTIPLE` and refuses to run without it, so concurrent calls are allowed; each
/// purpose (pipeline, all-reduce of one stage, control) has its own communicator.
struct Shared(SimpleCommunicator);
// SAFETY: MPI is initialised with MPI_THREAD_MULTIPLE (checked in `init`).
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

/// Whether this process was started by an MPI launcher (`mpirun`, `mpiexec`, `srun`).
/// `TESSERA_MPI=0` says no, `TESSERA_MPI=1` yes, whatever the environment.
pub fn launched() -> bool {
    match std::env::var("TESSERA_MPI").as_deref() {
        Ok("0") => return false,
        Ok("1") => return true,
        _ => {}
    }
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS", "SLURM_STEP_NUM_TASKS"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

/// The MPI world of this process: its rank, the size, the local rank on its node.
pub struct MpiWorld {
    world: Shared,
    rank: usize,
    size: usize,
    local_rank: usize,
    local_size: usize,
    timeout: Duration,
    /// The mesh, once an engine is built: names ranks as (replica, stage) in messages.
    mesh: Mutex<Option<crate::parallel::Mesh>>,
    /// The other ranks on this node, as (world rank, pid): a rank that waits too long looks
    /// for a stopped one among them, to name it rather than blame whoever waits on whom.
    node_peers: Vec<(usize, u32)>,
}

/// MPI, initialised: keep it alive for the whole run (dropping it finalises MPI).
pub struct MpiRuntime {
    world: Arc<MpiWorld>,
    _universe: mpi::environment::Universe,
}

impl MpiRuntime {
    /// The world.
    pub fn world(&self) -> &Arc<MpiWorld> {
        &self.world
    }
}

/// Initialises MPI with `MPI_THREAD_MULTIPLE`; any wait on another rank lasts at most
/// [`DEFAULT_COMM_TIMEOUT`](crate::parallel::DEFAULT_COMM_TIMEOUT).
pub fn init() -> Result<MpiRuntime> {
    init_with_timeout(crate::parallel::DEFAULT_COMM_TIMEOUT)
}

/// As [`init`], with waits on another rank lasting at most `timeout` (after which the job is
/// stopped with a message naming the rank waited for).
pub fn init_with_timeout(timeout: Duration) -> Result<MpiRuntime> {
    let (universe, threading) = mpi::initialize_with_threading(Threading::Multiple)
        .ok_or_else(|| Error::Parallel("MPI was already initialised in this process".into()))?;
    if threading != Threading::Multiple {
        return Err(Error::Parallel(format!(
            "the MPI library gives {threading:?} threading, but tessera needs MPI_THREAD_MULTIPLE (its \
             all-reduce overlaps backward on a second thread): use Open MPI 4 or newer, or MPICH"
        )));
    }
    let world = universe.world();
    let rank = world.rank() as usize;
    let size = world.size() as usize;
    let node = world.split_shared(world.rank());
    let (local_rank, local_size) = (node.rank() as usize, node.size() as usize);
    if timeout.is_zero() {
        return Err(Error::Invalid("the communication timeout must be positive".into()));
    }
    // Who shares this node, and their pids (one gather over the node, at start-up).
    let me = [rank as u64, std::process::id() as u64];
    let mut all = vec![0u64; 2 * local_size];
    node.all_gather_into(&me[..], &mut all[..]);
    let node_peers: Vec<(usize, u32)> =
        all.chunks_exact(2).map(|c| (c[0] as usize, c[1] as u32)).filter(|&(r, _)| r != rank).collect();
    let world = Arc::new(MpiWorld {
        world: Shared(world),
        rank,
        size,
        local_rank,
        local_size,
        timeout,
        mesh: Mutex::new(None),
        node_peers,
    });
    Ok(MpiRuntime { world, _universe: universe })
}

/// Whether process `pid` (on this machine) is stopped: state `T` (a signal) or `t` (a tracer)
/// in `/proc/PID/stat`.
pub fn process_stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').and_then(|i| s[i + 1..].split_whitespace().next().map(str::to_string)))
        .is_some_and(|state| state == "T" || state == "t")
}

fn backoff(spins: &mut u32) {
    *spins += 1;
    if *spins < 200 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(if *spins < 2000 { 50 } else { 500 }));
    }
}

impl MpiWorld {
    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// Ranks in the job.
    pub fn size(&self) -> usize {
        self.size
    }
    /// This process's rank among the ranks on its node (picks the GPU).
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }
    /// Ranks on this process's node (they share its CPU and memory).
    pub fn local_size(&self) -> usize {
        self.local_size
    }
    /// How long any wait may last before the job is stopped.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `rank 3 (replica 1, stage 1)`.
    pub fn describe(&self, rank: usize) -> String {
        match *self.mesh.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(m) if m.pp > 0 => format!("rank {rank} (replica {}, stage {})", rank / m.pp, rank % m.pp),
            _ => format!("rank {rank}"),
        }
    }

    /// Stops the job after a wait of `what` ran past the timeout. A rank on this node that is
    /// stopped (SIGSTOP, a debugger) is named as the cause, whoever this rank waited on (in a
    /// ring, every rank waits on a neighbour, so the first to give up is seldom the culprit's
    /// peer); otherwise the wait is described, with how to allow more time.
    pub fn abort_wait(&self, what: &str) -> ! {
        let stopped: Vec<String> = self
            .node_peers
            .iter()
            .filter(|&&(_, pid)| process_stopped(pid))
            .map(|&(r, pid)| format!("{} (pid {pid})", self.describe(r)))
            .collect();
        if !stopped.is_empty() {
            self.abort(&format!(
                "{} {} stopped (SIGSTOP, or held by a debugger), so the job cannot go on: resume it with kill -CONT \
                 before the timeout ({:?}, TESSERA_COMM_TIMEOUT), or end the job. (This rank {what}.)",
                stopped.join(", "),
                if stopped.len() == 1 { "is" } else { "are" },
                self.timeout
            ));
        }
        self.abort(&format!(
            "{what}. If the job is only slow, allow more time: TESSERA_COMM_TIMEOUT={} (seconds; now {})",
            (self.timeout.as_secs() * 4).max(600),
            self.timeout.as_secs_f64()
        ))
    }

    /// Prints `what` as this rank's error and stops every rank of the job.
    pub fn abort(&self, what: &str) -> ! {
        eprintln!("error: {}: {what}; stopping every rank of the job (MPI_Abort)", self.describe(self.rank));
        self.world.0.abort(1)
    }

    fn dup(&self) -> Shared {
        Shared(self.world.0.duplicate())
    }

    fn split(&self, color: usize, key: usize) -> Shared {
        let c = self
            .world
            .0
            .split_by_color_with_key(Color::with_value(color as i32), key as i32)
            .expect("a rank with a colour always gets a communicator");
        Shared(c)
    }

    /// Sends `data` to `to` (a rank of `comm`, whose world rank is `to_world`) and waits, at
    /// most the timeout, for the receiver to take it.
    fn send<T: Equivalence + 'static>(
        self: &Arc<Self>,
        comm: &Shared,
        to: usize,
        to_world: usize,
        tag: i32,
        data: Vec<T>,
        what: &'static str,
    ) {
        let mut out = Outbox::new(self);
        out.send(comm, to, to_world, tag, data, what);
        out.flush();
    }

    /// Receives a message from `from` (a rank of `comm`), waiting at most the timeout.
    fn recv<T: Equivalence>(&self, comm: &Shared, from: usize, from_world: usize, tag: i32, what: &str) -> Vec<T> {
        let p = comm.0.process_at_rank(from as i32);
        let deadline = Instant::now() + self.timeout;
        let mut spins = 0;
        loop {
            if let Some(probed) = p.immediate_matched_probe_with_tag(tag) {
                return probed.matched_receive_vec::<T>().0;
            }
            if Instant::now() > deadline {
                self.abort_wait(&format!(
                    "waited {:?} for {what} from {}, which stopped or hung",
                    self.timeout,
                    self.describe(from_world)
                ));
            }
            backoff(&mut spins);
        }
    }

    /// Every rank's `values`, in rank order, on every rank (gathered by rank 0 and sent back;
    /// every wait bounded). Rank 0 sends each rank's values after their count.
    fn all_gather<T: Gathered>(self: &Arc<Self>, comm: &Shared, values: &[T], what: &'static str) -> Vec<Vec<T>> {
        const TAG: i32 = 7;
        if self.rank == 0 {
            let mut all = vec![values.to_vec()];
            for r in 1..self.size {
                all.push(self.recv::<T>(comm, r, r, TAG, what));
            }
            let flat: Vec<T> =
                all.iter().flat_map(|v| std::iter::once(T::from_count(v.len())).chain(v.iter().copied())).collect();
            for r in 1..self.size {
                self.send(comm, r, r, TAG + 1, flat.clone(), what);
            }
            all
        } else {
            self.send(comm, 0, 0, TAG, values.to_vec(), what);
            let flat = self.recv::<T>(comm, 0, 0, TAG + 1, what);
            let mut all = Vec::with_capacity(self.size);
            let mut i = 0;
            while i < flat.len() {
                let n = flat[i].to_count();
                all.push(flat[i + 1..i + 1 + n].to_vec());
                i += 1 + n;
            }
            all
        }
    }
}

/// What [`MpiWorld::all_gather`] gathers: numbers that also carry the counts of its framing.
trait Gathered: Equivalence + Copy + 'static {
    fn from_count(n: usize) -> Self;
    fn to_count(self) -> usize;
}
impl Gathered for f64 {
    fn from_count(n: usize) -> Self {
        n as f64
    }
    fn to_count(self) -> usize {
        self as usize
    }
}
impl Gathered for u64 {
    fn from_count(n: usize) -> Self {
        n as u64
    }
    fn to_count(self) -> usize {
        self as usize
    }
}

/// A send in flight: the message owns its data until MPI is done with it.
struct InFlight<T: Equivalence + 'static> {
    req: Option<mpi::request::Request<'static, [T], mpi::request::StaticScope>>,
    data: *mut [T],
    deadline: Instant,
    to_world: usize,
    what: &'static str,
}

trait Pending: Send {
    /// Whether the send completed (and its data is freed).
    fn done(&mut self) -> bool;
    fn overdue(&self) -> Option<(usize, &'static str)>;
}

// SAFETY: MPI is initialised with MPI_THREAD_MULTIPLE; the data is owned by the message.
unsafe impl<T: Equivalence + 'static> Send for InFlight<T> {}

impl<T: Equivalence + 'static> Pending for InFlight<T> {
    fn done(&mut self) -> bool {
        match self.req.take() {
            None => true,
            Some(r) => match r.test() {
                Ok(_) => {
                    // SAFETY: `data` came from Box::leak in `Outbox::send`; MPI no longer uses it.
                    drop(unsafe { Box::from_raw(self.data) });
                    true
                }
                Err(r) => {
                    self.req = Some(r);
                    false
                }
            },
        }
    }
    fn overdue(&self) -> Option<(usize, &'static str)> {
        (Instant::now() > self.deadline).then_some((self.to_world, self.what))
    }
}

/// Sends that do not block: like the in-process channels, a sender goes on at once (a ring
/// step posts before it receives; waiting for the receiver there would deadlock). Each
/// message must be taken within the timeout.
struct Outbox {
    world: Arc<MpiWorld>,
    pending: Vec<Box<dyn Pending>>,
}

impl Outbox {
    fn new(world: &Arc<MpiWorld>) -> Self {
        Outbox { world: world.clone(), pending: Vec::new() }
    }

    fn send<T: Equivalence + 'static>(
        &mut self,
        comm: &Shared,
        to: usize,
        to_world: usize,
        tag: i32,
        data: Vec<T>,
        what: &'static str,
    ) {
        self.progress();
        let data: &'static mut [T] = Box::leak(data.into_boxed_slice());
        let ptr: *mut [T] = data;
        // SAFETY: the slice lives until the request completes (freed in `done`).
        let buf: &'static [T] = unsafe { &*ptr };
        let req = comm.0.process_at_rank(to as i32).immediate_send_with_tag(mpi::request::StaticScope, buf, tag);
        self.pending.push(Box::new(InFlight {
            req: Some(req),
            data: ptr,
            deadline: Instant::now() + self.world.timeout,
            to_world,
            what,
        }));
    }

    fn progress(&mut self) {
        self.pending.retain_mut(|p| !p.done());
        if let Some((to, what)) = self.pending.iter().find_map(|p| p.overdue()) {
            self.world.abort_wait(&format!(
                "waited {:?} for {} to take {what}: it stopped or hung",
                self.world.timeout,
                self.world.describe(to)
            ));
        }
    }

    /// Waits until every send has been taken (each within its deadline).
    fn flush(&mut self) {
        let mut spins = 0;
        while !self.pending.is_empty() {
            self.progress();
            backoff(&mut spins);
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.flush();
    }
}

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

/// The wire of [`MpiComm`]: buffers go through host memory as MPI messages.
pub struct MpiWire {
    world: Arc<MpiWorld>,
    comm: Shared,
    /// World rank of each group rank.
    world_ranks: Vec<usize>,
    out: Outbox,
}

impl<B: Backend> Wire<B> for MpiWire {
    fn post(&mut self, dev: &B, view: &B::Ref<'_, f32>, to: usize) -> Result<()> {
        let host = dev.download(view)?;
        self.out.send(&self.comm, to, self.world_ranks[to], 1, host, "a gradient chunk");
        Ok(())
    }
    fn take(&mut self, dev: &B, from: usize) -> Result<B::Buf<f32>> {
        self.out.progress();
        let v = self.world.recv::<f32>(&self.comm, from, self.world_ranks[from], 1, "a gradient chunk");
        dev.upload(&v)
    }
    fn flush(&mut self) -> Result<()> {
        self.out.flush();
        Ok(())
    }
}

/// The ring all-reduce between processes (the same ring as in one process).
pub type MpiComm<B> = RingComm<B, MpiWire>;

/// The ranks that hold the same stage in every replica: the group whose gradients are
/// all-reduced together. Handed to an [`AllReduce`] to build its communicator.
pub struct StageGroup {
    world: Arc<MpiWorld>,
    comm: Shared,
    /// This rank's index in the group (its replica).
    pub rank: usize,
    /// Ranks in the group (`dp`).
    pub size: usize,
    /// World rank of each group rank.
    pub world_ranks: Vec<usize>,
}

impl StageGroup {
    /// Group rank 0's `bytes`, on every rank of the group (e.g. an NCCL unique id).
    pub fn share_bytes(&self, bytes: Option<Vec<u8>>) -> Vec<u8> {
        const TAG: i32 = 5;
        if self.rank == 0 {
            let b = bytes.unwrap_or_default();
            for q in 1..self.size {
                self.world.send(&self.comm, q, self.world_ranks[q], TAG, b.clone(), "a communicator id");
            }
            b
        } else {
            self.world.recv::<u8>(&self.comm, 0, self.world_ranks[0], TAG, "a communicator id")
        }
    }

    /// The MPI ring over this group.
    pub fn ring<B: Ops>(self, dev: &B) -> Result<MpiComm<B>> {
        let (rank, size) = (self.rank, self.size);
        let wire = MpiWire {
            out: Outbox::new(&self.world),
            world: self.world,
            comm: self.comm,
            world_ranks: self.world_ranks,
        };
        Ok(MpiComm::new(rank, size, dev.with_own_queue()?, wire))
    }
}

/// Builds one rank's communicator from its stage group and device.
pub type MakeComm<B> = Box<dyn FnOnce(StageGroup, &B) -> Result<Box<dyn crate::parallel::comm::Communicator<B>>>>;

/// The ring communicator over every rank of the world (collective: every rank calls it).
pub fn world_ring<B: Ops>(world: &Arc<MpiWorld>, dev: &B) -> Result<MpiComm<B>> {
    let group = StageGroup {
        world: world.clone(),
        comm: world.dup(),
        rank: world.rank,
        size: world.size,
        world_ranks: (0..world.size).collect(),
    };
    group.ring(dev)
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
    world: Arc<MpiWorld>,
    pipe: Arc<Shared>,
    rank: usize,
    pp: usize,
    out: Outbox,
}

const TAG_ACT: i32 = 0;
const TAG_GRAD: i32 = 1;
const TAG_NORM: i32 = 2;
const TAG_EVAL: i32 = 3;

fn tag(kind: i32, id: usize) -> i32 {
    kind + 4 * (id % (1 << 20)) as i32
}

impl<B: Backend> PipeLinks<B> for MpiLinks {
    fn send_act(&mut self, dev: &B, id: usize, v: &B::Ref<'_, f32>) -> Result<()> {
        let host = dev.download(v)?;
        self.out.send(&self.pipe, self.rank + 1, self.rank + 1, tag(TAG_ACT, id), host, "an activation");
        Ok(())
    }
    fn recv_act(&mut self, dev: &B, id: usize) -> Result<B::Buf<f32>> {
        self.out.progress();
        let v = self.world.recv::<f32>(&self.pipe, self.rank - 1, self.rank - 1, tag(TAG_ACT, id), "an activation");
        dev.upload(&v)
    }
    fn send_grad(&mut self, dev: &B, id: usize, v: &B::Ref<'_, f32>) -> Result<()> {
        let host = dev.download(v)?;
        self.out.send(&self.pipe, self.rank - 1, self.rank - 1, tag(TAG_GRAD, id), host, "a gradient");
        Ok(())
    }
    fn recv_grad(&mut self, dev: &B, id: usize) -> Result<B::Buf<f32>> {
        self.out.progress();
        let v = self.world.recv::<f32>(&self.pipe, self.rank + 1, self.rank + 1, tag(TAG_GRAD, id), "a gradient");
        dev.upload(&v)
    }
    fn norm_parts(&mut self, stage: usize, local: f64) -> Result<Vec<(usize, f64)>> {
        let first = self.rank - stage;
        for s in (0..self.pp).filter(|&s| s != stage) {
            self.out.send(&self.pipe, first + s, first + s, TAG_NORM, vec![local], "a gradient-norm part");
        }
        let mut parts = vec![(stage, local)];
        for s in (0..self.pp).filter(|&s| s != stage) {
            let v = self.world.recv::<f64>(&self.pipe, first + s, first + s, TAG_NORM, "a gradient-norm part");
            parts.push((s, v[0]));
        }
        parts.sort_by_key(|p| p.0);
        Ok(parts)
    }
}

/// Data- and pipeline-parallel training across processes: this process is one rank of the
/// mesh. The API follows the in-process [`Engine`](crate::parallel::engine::Engine); every
/// rank calls every method (they communicate).
pub struct DistEngine<B: Ops> {
    world: Arc<MpiWorld>,
    cfg: TrainConfig,
    plan: Plan,
    schedule: Schedule,
    worker: Worker<B>,
    pipe: Arc<Shared>,
    ctrl: Shared,
    step: u64,
    timeline: Option<Timeline>,
}

impl<B: Ops> DistEngine<B> {
    /// A fresh run: the seeded initial parameters, on this rank's `dev`.
    pub fn new(world: &Arc<MpiWorld>, dev: &B, cfg: TrainConfig, plan: Plan) -> Result<Self> {
        let params = cfg.model.init(cfg.seed);
        Self::with_state(world, dev, cfg, plan, &params, None, 0)
    }

    /// A run from flat parameters, optimizer state and step count (e.g. from a checkpoint
    /// written by any plan, on any number of processes).
    pub fn with_state(
        world: &Arc<MpiWorld>,
        dev: &B,
        cfg: TrainConfig,
        plan: Plan,
        params: &[f32],
        state: Option<&[Vec<f32>]>,
        step: u64,
    ) -> Result<Self> {
        Self::with_all_reduce(world, dev, cfg, plan, params, state, step, AllReduce::Ring)
    }

    /// As [`DistEngine::with_state`], with the gradient all-reduce of `all_reduce`.
    #[allow(clippy::too_many_arguments)]
    pub fn with_all_reduce(
        world: &Arc<MpiWorld>,
        dev: &B,
        cfg: TrainConfig,
        plan: Plan,
        params: &[f32],
        state: Option<&[Vec<f32>]>,
        step: u64,
        all_reduce: AllReduce<B>,
    ) -> Result<Self> {
        let plan = agree_on_plan(world, plan);
        cfg.validate()?;
        plan.validate(&cfg.model)?;
        let mesh = plan.mesh;
        if mesh.devices() != world.size {
            return Err(Error::Invalid(format!(
                "--dp {} x --pp {} needs {} ranks, but the job has {} (mpirun -np {})",
                mesh.dp,
                mesh.pp,
                mesh.devices(),
                world.size,
                mesh.devices()
            )));
        }
        *world.mesh.lock().unwrap_or_else(|e| e.into_inner()) = Some(mesh);
        let n = cfg.model.param_count();
        if params.len() != n {
            return Err(Error::shape("DistEngine", format!("{} parameters for a model of {n}", params.len())));
        }
        let slots = cfg.optimizer.slots().len();
        if let Some(s) = state {
            if s.len() != slots || s.iter().any(|v| v.len() != n) {
                return Err(Error::shape("DistEngine", format!("optimizer state must be {slots} vectors of {n}")));
            }
        }
        let (r, s) = (world.rank / mesh.pp, world.rank % mesh.pp);
        let layout = cfg.model.layout();
        let layers = plan.stages[s].clone();
        let pr = layout[layers.start].weight.start..layout[layers.end - 1].bias.end;
        let reduce = mesh.dp > 1 || matches!(all_reduce, AllReduce::Custom { force: true, .. });
        let buckets: Vec<usize> = plan.stages.iter().map(|l| if reduce { l.len() } else { 0 }).collect();
        let schedule = Schedule::build(plan.schedule, mesh.pp, plan.microbatches, &buckets)?;
        schedule.check()?;
        let stage = Stage::new(dev, cfg.model.clone(), layers, &params[pr.clone()])?;
        let st = match state {
            Some(v) => v.iter().map(|x| dev.upload(&x[pr.clone()])).collect::<Result<Vec<_>>>()?,
            None => (0..slots).map(|_| dev.alloc(pr.len())).collect::<Result<Vec<_>>>()?,
        };
        // Collective calls, in the same order on every rank.
        let pipe = Arc::new(world.dup());
        let ctrl = world.dup();
        let group = StageGroup {
            world: world.clone(),
            comm: world.split(s, r),
            rank: r,
            size: mesh.dp,
            world_ranks: (0..mesh.dp).map(|q| mesh.device(q, s)).collect(),
        };
        let comm: Option<Box<dyn crate::parallel::comm::Communicator<B>>> = match all_reduce {
            _ if !reduce => None,
            AllReduce::Ring => Some(Box::new(group.ring(dev)?)),
            AllReduce::Custom { make, .. } => Some(make(group, dev)?),
        };
        let worker = Worker { dev: dev.clone(), stage, state: st, comm, comm_in_use: reduce };
        Ok(DistEngine { world: world.clone(), cfg, plan, schedule, worker, pipe, ctrl, step, timeline: None })
    }

    /// The plan.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }
    /// The run's config.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
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

    fn stage_of(&self, rank: usize) -> (usize, usize) {
        (rank / self.plan.mesh.pp, rank % self.plan.mesh.pp)
    }

    /// One optimizer step on the whole batch (every rank passes the same batch; each uses its
    /// replica's rows).
    pub fn step(&mut self, x: &[f32], y: &[i32]) -> Result<StepStats> {
        let prep = prepare_step(&self.cfg, &self.plan, self.step, x, y)?;
        let (r, s) = self.stage_of(self.world.rank);
        let t0 = Instant::now();
        let ctx = StepCtx::new(&self.schedule, &self.plan, &self.cfg, &prep, r, s, x, y, t0);
        let mut links = MpiLinks {
            world: self.world.clone(),
            pipe: self.pipe.clone(),
            rank: self.world.rank,
            pp: self.plan.mesh.pp,
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
        // The loss is the sum of the last stages' parts; every rank learns it.
        let all = self.world.all_gather(&self.ctrl, &[out.loss as f64], "the step's loss");
        let loss = all.iter().map(|v| v[0]).sum::<f64>() as f32;
        self.step += 1;
        let name = format!("{} (replica {r}, stage {s})", self.device_names()[0]);
        self.timeline = Some(Timeline {
            lanes: vec![Lane { name, spans: out.spans, comm: out.comm_spans }],
            total: t0.elapsed().as_secs_f64(),
        });
        Ok(StepStats { loss, lr: prep.lr, grad_norm: out.grad_norm })
    }

    /// The flat vector made of each stage's part (replica 0's ranks hold them), on every rank.
    fn gather_stages(&self, part: Option<Vec<f32>>, what: &'static str) -> Result<Vec<f32>> {
        const TAG: i32 = 11;
        let pp = self.plan.mesh.pp;
        let me = self.world.rank;
        if me == 0 {
            let mut full = part.unwrap_or_default();
            for s in 1..pp {
                full.extend(self.world.recv::<f32>(&self.ctrl, s, s, TAG, what));
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
        let part = if self.world.rank < self.plan.mesh.pp {
            Some(self.worker.dev.download(&B::view(self.worker.stage.params()))?)
        } else {
            None
        };
        self.gather_stages(part, "parameters")
    }

    /// Optimizer state as flat vectors (one per slot), from replica 0, on every rank.
    pub fn optimizer_state(&self) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::new();
        for k in 0..self.worker.state.len() {
            let part = if self.world.rank < self.plan.mesh.pp {
                Some(self.worker.dev.download(&B::view(&self.worker.state[k]))?)
            } else {
                None
            };
            out.push(self.gather_stages(part, "optimizer state")?);
        }
        Ok(out)
    }

    /// Whether every replica holds bit-identical parameters and optimizer state (compares a
    /// hash of each rank's stage with replica 0's).
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
        for st in &self.worker.state {
            eat(&self.worker.dev.download(&B::view(st))?);
        }
        // Split in two exact halves for f64 transport.
        let all = self.world.all_gather(&self.ctrl, &[(h >> 32) as f64, (h & 0xffff_ffff) as f64], "a state hash");
        let pp = self.plan.mesh.pp;
        Ok((0..self.world.size).all(|q| all[q] == all[q % pp]))
    }

    /// Loss and accuracy over `data` in batches of `batch`: replica `r` takes batches `r`,
    /// `r + dp`, ... through its pipeline; every rank gets the totals.
    pub fn evaluate(&mut self, data: &Dataset, batch: usize) -> Result<Eval> {
        const MB: usize = usize::MAX - 1;
        let (dp, pp) = (self.plan.mesh.dp, self.plan.mesh.pp);
        let (r, s) = self.stage_of(self.world.rank);
        let classes = self.cfg.model.outputs();
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
                let from = self.world.rank - 1;
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
                let to = self.world.rank + 1;
                self.world.send(&self.pipe, to, to, tag(TAG_EVAL, c), out, "an evaluation activation");
            } else {
                loss += st.loss(&dev, MB)? as f64 * rows as f64;
                let logits = dev.download(&B::view(st.output(MB)?))?;
                correct += count_correct(&logits, &y, classes);
            }
            st.release(MB);
        }
        // Each replica's last stage has its share of the sums; everyone learns the totals.
        let all = self.world.all_gather(&self.ctrl, &[loss, correct as f64], "the evaluation");
        let last: Vec<&Vec<f64>> = (0..dp).map(|q| &all[q * pp + pp - 1]).collect();
        let loss: f64 = last.iter().map(|v| v[0]).sum();
        let correct = last.iter().map(|v| v[1] as usize).sum();
        Ok(Eval { loss: (loss / data.len().max(1) as f64) as f32, correct, total: data.len() })
    }
}

impl<B: Ops> Steps for DistEngine<B> {
    fn train_step(&mut self, x: &[f32], labels: &[i32]) -> Result<StepStats> {
        self.step(x, labels)
    }
    fn steps_done(&self) -> u64 {
        self.step
    }
    fn train_config(&self) -> &TrainConfig {
        &self.cfg
    }
}

/// Makes SIGTERM (what `mpirun` and `srun` send the surviving ranks when one rank dies) print
/// which rank was stopped and why before the process exits, instead of vanishing silently.
pub fn install_termination_notice(world: &MpiWorld) {
    use std::sync::OnceLock;
    // Which message fits is decided in the handler: when every other rank on this node is still
    // alive, nothing failed here and the launcher was interrupted (Ctrl-C turns into SIGTERM for
    // the ranks) or hit a time limit; when one is gone, a rank failed. kill(pid, 0) is
    // async-signal-safe.
    static PEERS: OnceLock<Vec<libc::pid_t>> = OnceLock::new();
    static INTERRUPTED: OnceLock<Vec<u8>> = OnceLock::new();
    static FAILED: OnceLock<Vec<u8>> = OnceLock::new();
    let _ = PEERS.set(world.node_peers.iter().map(|&(_, pid)| pid as libc::pid_t).collect());
    let me = world.describe(world.rank);
    let _ = INTERRUPTED.set(
        format!(
            "error: {me}: stopped by the launcher (SIGTERM) while every rank on this node was running: the job \
             was interrupted (Ctrl-C on the launcher, or a time limit)\n"
        )
        .into_bytes(),
    );
    let _ = FAILED.set(
        format!(
            "error: {me}: stopped by the launcher (SIGTERM): another rank of the job failed or was killed; its rank \
             is in the launcher's message\n"
        )
        .into_bytes(),
    );
    extern "C" fn on_term(_: libc::c_int) {
        // SAFETY: kill(pid, 0) only asks whether the process exists; async-signal-safe.
        let all_alive = PEERS.get().is_some_and(|p| p.iter().all(|&pid| unsafe { libc::kill(pid, 0) } == 0));
        if let Some(m) = if all_alive { INTERRUPTED.get() } else { FAILED.get() } {
            // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is static.
            unsafe {
                libc::write(2, m.as_ptr() as *const libc::c_void, m.len());
                libc::_exit(143);
            }
        }
    }
    static INT: OnceLock<Vec<u8>> = OnceLock::new();
    let _ = INT.set(
        format!("error: {}: interrupted (SIGINT, Ctrl-C): the job was stopped\n", world.describe(world.rank))
            .into_bytes(),
    );
    extern "C" fn on_int(_: libc::c_int) {
        if let Some(m) = INT.get() {
            // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is static.
            unsafe {
                libc::write(2, m.as_ptr() as *const libc::c_void, m.len());
                libc::_exit(130);
            }
        }
    }
    // SAFETY: installs handlers that only call async-signal-safe functions.
    unsafe {
        libc::signal(libc::SIGTERM, on_term as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_int as *const () as libc::sighandler_t);
    }
}
