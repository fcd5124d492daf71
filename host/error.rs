//! The one error type of the library: each variant says what was wrong and what to do.

use thiserror::Error;

/// A tessera error.
#[derive(Debug, Error)]
pub enum Error {
    /// Operands whose sizes do not fit the operation.
    #[error("shape mismatch in {op}: {detail}")]
    Shape {
        /// The operation that refused its operands.
        op: &'static str,
        /// What was expected and what was given.
        detail: String,
    },
    /// A class label outside `0..classes`.
    #[error("label {label} at row {row} is out of range: the model has {classes} classes (labels 0..{classes})")]
    Label {
        /// Row of the batch.
        row: usize,
        /// The label found there.
        label: i64,
        /// Number of classes (columns of the logits).
        classes: usize,
    },
    /// A device string that does not parse, or names a device that is not there.
    #[error("device `{spec}`: {reason}")]
    Device {
        /// What the user asked for.
        spec: String,
        /// Why it cannot be had.
        reason: String,
    },
    /// No CUDA driver library on this machine.
    #[error("no CUDA driver found (libcuda.so.1 could not be loaded): install the NVIDIA driver, or put the directory holding libcuda.so.1 on LD_LIBRARY_PATH, or run on the CPU with --device cpu")]
    NoDriver,
    /// A CUDA driver library that loads but cannot be used (it lacks entry points).
    #[error("{0}; or run on the CPU with --device cpu")]
    BadDriver(String),
    /// A run stopped by a signal at a step boundary (its checkpoint saved when one was asked for).
    #[error("interrupted by {signal} at step {step}")]
    Interrupted {
        /// `SIGINT` or `SIGTERM`.
        signal: &'static str,
        /// Steps done when it stopped.
        step: u64,
    },
    /// The CUDA kernels were not compiled because nvcc was missing at build time.
    #[error("the CUDA kernels were not built: nvcc was not found when tessera was compiled. Run scripts/setup.sh (it installs the pinned CUDA compiler into .toolchain/cuda; `--shared` for a crate that depends on tessera through git), then rebuild; or set NVCC=/path/to/nvcc and rebuild")]
    KernelsNotBuilt,
    /// The driver or the device cannot run the kernels this build holds.
    #[error("CUDA device {ordinal} cannot run this build: {reason}")]
    Incompatible {
        /// Device ordinal.
        ordinal: usize,
        /// What does not match, and what to do.
        reason: String,
    },
    /// An error reported by the CUDA driver.
    #[error("CUDA driver error during {during}: {source}")]
    Driver {
        /// What tessera was doing.
        during: String,
        /// The driver's error.
        #[source]
        source: cudarc::driver::DriverError,
    },
    /// An error reported by a kernel through its error flag.
    #[error("kernel {kernel}: {detail}")]
    Kernel {
        /// Kernel name.
        kernel: &'static str,
        /// What it reported.
        detail: String,
    },
    /// A kernel failure found by the CUDA simulator: an out-of-bounds access, a data race on
    /// shared memory, a barrier not every thread reaches, a deadlock (or an invalid launch).
    #[error("simulated kernel failed during {during}: {detail}")]
    Sim {
        /// What tessera was doing.
        during: String,
        /// The simulator's report: kernel, block, thread, and what went wrong.
        detail: String,
    },
    /// A data file that cannot be used.
    #[error("{path}: {reason}")]
    Data {
        /// The file or directory.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A checkpoint that cannot be read or does not fit the run.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The checkpoint file.
        path: String,
        /// What is wrong, and what to do.
        reason: String,
    },
    /// A pipeline schedule that would hang or compute the wrong thing.
    #[error("schedule rejected at stage {stage}, action {index} ({action}): {reason}")]
    Schedule {
        /// The stage.
        stage: usize,
        /// Index of the action in the stage's list.
        index: usize,
        /// The action.
        action: String,
        /// What is wrong.
        reason: String,
    },
    /// A parallel run that failed on one of its devices, or a plan that does not fit.
    #[error("{0}")]
    Parallel(String),
    /// An invalid argument (a learning rate, a hyper-parameter, a size).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// A file that could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Result with [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A shape error for `op`.
    pub fn shape(op: &'static str, detail: impl Into<String>) -> Self {
        Error::Shape { op, detail: detail.into() }
    }

    /// Wraps a device failure (a CUDA driver error, or a simulator report) with what was
    /// being done.
    pub fn driver<E: DeviceFailure>(during: impl Into<String>) -> impl FnOnce(E) -> Self {
        let during = during.into();
        move |source| source.into_error(during)
    }
}

/// A failure reported by a GPU-like device: the CUDA driver's error, or the simulator's.
pub trait DeviceFailure {
    /// The [`enum@Error`] for it, with what tessera was doing.
    fn into_error(self, during: String) -> Error;
}

thread_local! {
    /// The launch that faulted, as `TESSERA_SYNC_LAUNCHES` found it (kernel, launch shape,
    /// arguments), for the error of the op that launched it.
    static LAUNCH_FAULT: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Records the launch that faulted (see [`crate::kernels::sync_launches`]).
pub(crate) fn note_launch_fault(what: String) {
    LAUNCH_FAULT.with(|f| *f.borrow_mut() = Some(what));
}

impl DeviceFailure for cudarc::driver::DriverError {
    fn into_error(self, during: String) -> Error {
        let during = match LAUNCH_FAULT.with(|f| f.borrow_mut().take()) {
            Some(what) => format!("{during} (TESSERA_SYNC_LAUNCHES: the fault is in {what})"),
            None => during,
        };
        Error::Driver { during, source: self }
    }
}

#[cfg(test)]
mod launch_fault_tests {
    use super::*;

    /// With TESSERA_SYNC_LAUNCHES, the launch that faulted is named in the error of the op that
    /// launched it, once.
    #[test]
    fn a_noted_launch_fault_names_the_kernel_in_the_error() {
        let fault = || cudarc::driver::DriverError(cudarc::driver::sys::CUresult::CUDA_ERROR_ILLEGAL_ADDRESS);
        // (The driver error's own text needs a driver to print: the test reads `during`.)
        let during = |e: Error| match e {
            Error::Driver { during, .. } => during,
            _ => panic!("not a driver error"),
        };
        note_launch_fault("kernel `gemm_nn` (grid (1, 1, 1), block (256, 1, 1); m = 3, a: 12 elements)".into());
        let e = during(Error::driver("launching gemm")(fault()));
        assert!(e.contains("launching gemm (TESSERA_SYNC_LAUNCHES: the fault is in kernel `gemm_nn`"), "{e}");
        assert!(e.contains("a: 12 elements"), "{e}");
        let e = during(Error::driver("launching gemm")(fault()));
        assert_eq!(e, "launching gemm", "the note was used twice");
    }
}
