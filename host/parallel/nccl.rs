//! NCCL for GPUs across processes: the gradient all-reduce (and broadcast, send, recv) of
//! [`Communicator`] over NCCL, loaded at run time by cudarc (no NCCL at build time; a clear
//! error where `libnccl.so.2` is missing). Under MPI the NCCL unique id is created by the
//! group's rank 0 and sent to the others over MPI
//! ([`StageGroup::share_bytes`](crate::parallel::mpi::StageGroup::share_bytes)).
//!
//! One NCCL rank per GPU: a single card cannot host two ranks of one communicator, so on one
//! GPU the communicator has one rank (its all-reduce is then a copy, still through NCCL).
//!
//! Bus bandwidth, NCCL's measure for comparing all-reduce speeds across rank counts:
//! `busbw = algbw * 2 (n - 1) / n`, where `algbw = bytes / time` and `n` is the number of ranks
//! ([`bus_bandwidth`]).

use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use crate::backend::cuda::CudaDevice;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::parallel::comm::Communicator;

/// One rank of an NCCL communicator on a GPU. Every call waits for its operation to finish
/// (on the communicator's own stream), so `send` and `recv` between two ranks must be ordered
/// (one sends first while the other receives), as NCCL's point-to-point calls outside a group
/// are; the gradient all-reduce, what training uses, has no such constraint.
pub struct NcclComm {
    comm: Comm,
    dev: CudaDevice,
}

// SAFETY: an NCCL communicator may be used from another thread as long as calls on it are not
// concurrent; a Communicator is owned by one thread at a time (`&mut self`).
unsafe impl Send for NcclComm {}

fn nccl_err(during: &str, e: impl std::fmt::Debug) -> Error {
    Error::Parallel(format!(
        "NCCL failed during {during}: {e:?} (is libnccl.so.2 installed and on LD_LIBRARY_PATH? NCCL_DEBUG=INFO says more)"
    ))
}

/// A new NCCL unique id (on the group's rank 0), as bytes to send to the other ranks.
pub fn new_id() -> Result<Vec<u8>> {
    let id = std::panic::catch_unwind(Id::new)
        .map_err(|_| {
            Error::Parallel("NCCL could not be loaded: install NCCL (libnccl.so.2) or use --allreduce ring".into())
        })?
        .map_err(|e| nccl_err("creating a unique id", e))?;
    Ok(id.internal().iter().map(|&c| c as u8).collect())
}

impl NcclComm {
    /// Rank `rank` of `size`, on `dev` (its own stream), from the id rank 0 made.
    pub fn new(dev: &CudaDevice, rank: usize, size: usize, id: &[u8]) -> Result<Self> {
        if id.len() != 128 {
            return Err(Error::Parallel(format!("an NCCL unique id has 128 bytes, got {}", id.len())));
        }
        let mut internal = [0 as std::ffi::c_char; 128];
        for (d, s) in internal.iter_mut().zip(id) {
            *d = *s as std::ffi::c_char;
        }
        let dev = dev.with_own_queue()?;
        let stream = dev.stream().clone();
        // cudarc panics where libnccl.so.2 cannot be loaded: make that an error (under MPI the
        // caller then stops the job, instead of this rank vanishing while the others wait).
        let comm = std::panic::catch_unwind(move || Comm::from_rank(stream, rank, size, Id::uninit(internal)))
            .map_err(|_| {
                Error::Parallel("NCCL could not be loaded: install NCCL (libnccl.so.2) or use --allreduce ring".into())
            })?
            .map_err(|e| nccl_err("joining the communicator", e))?;
        Ok(NcclComm { comm, dev })
    }

    /// A one-rank communicator on `dev` (to exercise NCCL on a single GPU).
    pub fn single(dev: &CudaDevice) -> Result<Self> {
        Self::new(dev, 0, 1, &new_id()?)
    }
}

impl Communicator<CudaDevice> for NcclComm {
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn size(&self) -> usize {
        self.comm.world_size()
    }
    fn all_reduce_sum(&mut self, buf: &mut cudarc::driver::CudaSlice<f32>) -> Result<()> {
        self.comm.all_reduce_in_place(buf, &ReduceOp::Sum).map_err(|e| nccl_err("all-reduce", e))?;
        self.dev.synchronize()
    }
    fn all_reduce_mean(&mut self, buf: &mut cudarc::driver::CudaSlice<f32>) -> Result<()> {
        self.comm.all_reduce_in_place(buf, &ReduceOp::Avg).map_err(|e| nccl_err("all-reduce", e))?;
        self.dev.synchronize()
    }
    fn broadcast(&mut self, buf: &mut cudarc::driver::CudaSlice<f32>, root: usize) -> Result<()> {
        if root >= self.size() {
            return Err(Error::Invalid(format!("broadcast root {root} is not a rank of a group of {}", self.size())));
        }
        self.comm.broadcast_in_place(buf, root as i32).map_err(|e| nccl_err("broadcast", e))?;
        self.dev.synchronize()
    }
    fn send(&mut self, buf: &cudarc::driver::CudaView<'_, f32>, to: usize) -> Result<()> {
        self.comm.send(buf, to as i32).map_err(|e| nccl_err("send", e))?;
        self.dev.synchronize()
    }
    fn recv(&mut self, buf: &mut cudarc::driver::CudaViewMut<'_, f32>, from: usize) -> Result<()> {
        self.comm.recv(buf, from as i32).map_err(|e| nccl_err("recv", e))?;
        self.dev.synchronize()
    }
}

/// NCCL's bus bandwidth of an all-reduce of `bytes` over `ranks` ranks that took `seconds`:
/// `algbw * 2 (n - 1) / n` (0 for one rank, where nothing crosses a bus).
pub fn bus_bandwidth(bytes: usize, ranks: usize, seconds: f64) -> f64 {
    let algbw = bytes as f64 / seconds.max(1e-12);
    algbw * 2.0 * (ranks.saturating_sub(1)) as f64 / ranks.max(1) as f64
}

#[cfg(test)]
mod tests {
    #[test]
    fn bus_bandwidth_follows_the_nccl_formula() {
        assert_eq!(super::bus_bandwidth(1000, 1, 1.0), 0.0);
        assert_eq!(super::bus_bandwidth(1000, 2, 1.0), 1000.0);
        assert_eq!(super::bus_bandwidth(1000, 4, 0.5), 3000.0);
    }
}
