//! Op families. Each module holds one family: its API and checks, the CPU side and the CUDA
//! side next to each other, over the kernels of `kernels/<family>.cu`.

pub mod activation;
pub mod convert;
pub mod gemm;
pub mod loss;
pub mod optim;
pub mod reduce;
pub mod shaped;
pub mod transformer;

use cudarc::driver::LaunchConfig;

use crate::error::{Error, Result};
use crate::kernels::consts;

/// Every op family: what training code asks of a device.
pub trait Ops:
    gemm::GemmOps
    + activation::ActivationOps
    + convert::ConvertOps
    + reduce::ReduceOps
    + loss::LossOps
    + optim::OptimOps
    + transformer::TransformerOps
{
}
impl<
        B: gemm::GemmOps
            + activation::ActivationOps
            + convert::ConvertOps
            + reduce::ReduceOps
            + loss::LossOps
            + optim::OptimOps
            + transformer::TransformerOps,
    > Ops for B
{
}

/// `x` as a kernel `int`, or an error naming it.
pub(crate) fn as_i32(op: &'static str, what: &str, x: usize) -> Result<i32> {
    i32::try_from(x).map_err(|_| Error::shape(op, format!("{what} = {x} exceeds the kernel's int range")))
}

/// `x` as a kernel `long long`.
pub(crate) fn as_i64(op: &'static str, what: &str, x: usize) -> Result<i64> {
    i64::try_from(x).map_err(|_| Error::shape(op, format!("{what} = {x} exceeds the kernel's long long range")))
}

/// `x` as a grid dimension.
pub(crate) fn as_u32(op: &'static str, what: &str, x: usize) -> Result<u32> {
    u32::try_from(x).map_err(|_| Error::shape(op, format!("{what} = {x} exceeds a grid dimension")))
}

/// Launch shape for the grid-stride elementwise kernels: four elements per thread in flight,
/// at most 16 blocks per SM (more only adds scheduling).
pub(crate) fn elementwise_cfg(n: usize, sms: usize) -> LaunchConfig {
    let threads = consts::EW_THREADS as usize;
    let blocks = n.div_ceil(threads * 4).clamp(1, sms * 16);
    LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (threads as u32, 1, 1), shared_mem_bytes: 0 }
}
