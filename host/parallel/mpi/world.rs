//! The MPI world: initialisation, rank, size and node, bounded sends and receives, the
//! gathers the engine agrees through, and what a rank says when it is stopped or must stop the job.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mpi::datatype::Equivalence;
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::*;
use mpi::Threading;

use crate::error::{Error, Result};

/// A communicator that may be used from several threads. tessera asks MPI for
/// `MPI_THREAD_MULTIPLE` and refuses to run without it, so concurrent calls are allowed; each
/// purpose (pipeline, all-reduce of one stage, control) has its own communicator.
pub(crate) struct Shared(pub(crate) SimpleCommunicator);
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
    pub(crate) world: Shared,
    pub(crate) rank: usize,
    pub(crate) size: usize,
    pub(crate) local_rank: usize,
    pub(crate) local_size: usize,
    pub(crate) timeout: Duration,
    /// The mesh, once an engine is built: names ranks as (replica, stage) in messages.
    pub(crate) mesh: Mutex<Option<crate::parallel::Mesh>>,
    /// The other ranks on this node, as (world rank, pid): a rank that waits too long looks
    /// for a stopped one among them, to name it rather than blame whoever waits on whom.
    pub(crate) node_peers: Vec<(usize, u32)>,
}

/// MPI, initialised: keep it alive for the whole run (dropping it finalises MPI).
pub struct MpiRuntime {
    pub(crate) world: Arc<MpiWorld>,
    pub(crate) _universe: mpi::environment::Universe,
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

pub(crate) fn backoff(spins: &mut u32) {
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

    pub(crate) fn dup(&self) -> Shared {
        Shared(self.world.0.duplicate())
    }

    pub(crate) fn split(&self, color: usize, key: usize) -> Shared {
        let c = self
            .world
            .0
            .split_by_color_with_key(Color::with_value(color as i32), key as i32)
            .expect("a rank with a colour always gets a communicator");
        Shared(c)
    }

    /// Sends `data` to `to` (a rank of `comm`, whose world rank is `to_world`) and waits, at
    /// most the timeout, for the receiver to take it.
    pub(crate) fn send<T: Equivalence + 'static>(
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
    pub(crate) fn recv<T: Equivalence>(
        &self,
        comm: &Shared,
        from: usize,
        from_world: usize,
        tag: i32,
        what: &str,
    ) -> Vec<T> {
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
    pub(crate) fn all_gather<T: Gathered>(
        self: &Arc<Self>,
        comm: &Shared,
        values: &[T],
        what: &'static str,
    ) -> Vec<Vec<T>> {
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
pub(crate) trait Gathered: Equivalence + Copy + 'static {
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

/// A send in flight: the message owns its data until MPI is done with it.
pub(crate) struct InFlight<T: Equivalence + 'static> {
    pub(crate) req: Option<mpi::request::Request<'static, [T], mpi::request::StaticScope>>,
    pub(crate) data: *mut [T],
    pub(crate) deadline: Instant,
    pub(crate) to_world: usize,
    pub(crate) what: &'static str,
}

pub(crate) trait Pending: Send {
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
pub(crate) struct Outbox {
    pub(crate) world: Arc<MpiWorld>,
    pub(crate) pending: Vec<Box<dyn Pending>>,
}

impl Outbox {
    pub(crate) fn new(world: &Arc<MpiWorld>) -> Self {
        Outbox { world: world.clone(), pending: Vec::new() }
    }

    pub(crate) fn send<T: Equivalence + 'static>(
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

    pub(crate) fn progress(&mut self) {
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
    pub(crate) fn flush(&mut self) {
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
