//! The `tessera` command line: arguments (`args`), the commands (`info`, `train` with `gpt`,
//! `plan`, `sample`),
//! printing that survives closed pipes (`output`), and signals (`interrupt`). Library logic
//! lives in the library; this folder turns flags into its calls and its results into lines.

#[macro_use]
pub(crate) mod output;
mod args;
mod gpt;
mod info;
mod interrupt;
mod plan;
mod sample;
mod train;

use std::process::ExitCode;

use clap::Parser;
use tessera::Error;

use args::{Cli, Cmd};
use info::{devices, kernels};
use plan::plan;
use train::train;

/// The MPI world when started by an MPI launcher with more than one rank.
#[cfg(feature = "mpi")]
type World = Option<std::sync::Arc<tessera::parallel::mpi::MpiWorld>>;
#[cfg(not(feature = "mpi"))]
type World = Option<NoMpi>;

/// Built without the `mpi` feature: no world.
#[cfg(not(feature = "mpi"))]
#[derive(Debug, Clone)]
struct NoMpi;

/// Parses the command line, runs it, and turns the result into the exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    #[cfg(feature = "mpi")]
    let runtime = if tessera::parallel::mpi::launched() {
        let timeout = match comm_timeout() {
            Ok(t) => t,
            Err(e) => {
                errln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        match tessera::parallel::mpi::init_with_timeout(timeout) {
            Ok(rt) => Some(rt),
            Err(e) => {
                errln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    // Under a launcher, even a one-rank job runs as a rank (e.g. `mpirun -np 1 ... --allreduce
    // nccl` checks NCCL on one GPU).
    #[cfg(feature = "mpi")]
    let world: World = runtime.as_ref().map(|rt| rt.world().clone());
    // A panic on one rank must stop the job, not leave the others waiting in MPI_Finalize.
    #[cfg(feature = "mpi")]
    if let Some(w) = world.clone() {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default(info);
            w.abort(&format!("panicked: {info}"));
        }));
    }
    #[cfg(not(feature = "mpi"))]
    let world: World = None;
    let r = match cli.cmd {
        Cmd::Devices => devices(),
        Cmd::Kernels { verbose } => kernels(verbose),
        Cmd::Train(args) => train(args, world.clone()),
        Cmd::Plan(args) => plan(args),
        Cmd::Sample(args) => sample::sample(args),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        // Already reported, with what was saved; the status says which signal (130, 143).
        Err(Error::Interrupted { .. }) => ExitCode::from(interrupt::caught().map_or(130, |(_, code)| code)),
        Err(e) => {
            #[cfg(feature = "mpi")]
            if let Some(w) = &world {
                // The other ranks would wait for this one: stop them all, saying why.
                w.abort(&e.to_string());
            }
            errln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `TESSERA_COMM_TIMEOUT` (seconds; default 120): how long a wait on another device or rank may
/// last. Read here, in the command line only; the library takes it as a parameter.
fn comm_timeout() -> tessera::Result<std::time::Duration> {
    match std::env::var("TESSERA_COMM_TIMEOUT") {
        Ok(v) => tessera::parallel::parse_comm_timeout(&v).ok_or_else(|| {
            Error::Invalid(format!("TESSERA_COMM_TIMEOUT={v}: expected a positive number of seconds, e.g. 120"))
        }),
        Err(_) => Ok(tessera::parallel::DEFAULT_COMM_TIMEOUT),
    }
}
