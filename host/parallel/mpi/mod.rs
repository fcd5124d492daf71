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

mod engine;
mod wire;
mod world;

pub use engine::{agree_on_plan, AllReduce, DistEngine, MpiLinks};
pub use wire::{world_ring, MakeComm, MpiComm, MpiWire, StageGroup};
pub use world::{init, init_with_timeout, install_termination_notice, launched, process_stopped, MpiRuntime, MpiWorld};
