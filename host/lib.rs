//! tessera: hand-written CUDA kernels and a host library for people who write their own
//! training loops.
//!
//! The kernels live in `kernels/*.cu` and are compiled by the build script; [`kernels`] holds
//! their generated, typed launch handles and the build's manifest. A [`Backend`] is a device:
//! memory, copies and synchronisation ([`CpuDevice`] and [`CudaDevice`]). Each op family is its
//! own small trait in [`ops`], implemented by both backends side by side, so training code is
//! generic over the device and chooses it once.
//!
//! ```
//! use tessera::{Activation, Backend, CpuDevice, Gemm, GemmOps, Tensor};
//!
//! # fn main() -> Result<(), tessera::Error> {
//! let dev = CpuDevice::new(0);
//! let x = Tensor::from_vec(&dev, &[2, 3], vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0])?;
//! let w = Tensor::from_vec(&dev, &[3, 2], vec![1.0f32, -1.0, 0.5, 0.5, 0.0, 1.0])?;
//! let bias = Tensor::from_vec(&dev, &[2], vec![0.1f32, -10.0])?;
//! let mut z = Tensor::<CpuDevice, f32>::zeros(&dev, &[2, 2])?;
//! let mut y = Tensor::<CpuDevice, f32>::zeros(&dev, &[2, 2])?;
//! // y = relu(x @ w + bias), z keeps the pre-activation: one launch on a GPU.
//! let g = Gemm::new(2, 2, 3).activation(Activation::Relu);
//! dev.gemm(&g, &x.view(), &w.view(), Some(&bias.view()), &mut z.view_mut(), Some(&mut y.view_mut()))?;
//! assert_eq!(y.to_vec(&dev)?, vec![2.1, 0.0, 6.6, 0.0]);
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod backend;
#[cfg(any(test, feature = "testing"))]
pub mod check;
pub mod checkpoint;
pub mod data;
pub mod device;
pub mod error;
pub mod kernels;
pub mod nn;
pub mod ops;
pub mod parallel;
pub mod prelude;
#[cfg(any(test, feature = "testing"))]
pub mod reference;
pub mod rng;
pub mod tensor;
pub mod train;

pub use backend::cpu::CpuDevice;
pub use backend::cuda::CudaDevice;
pub use backend::sim::SimDevice;
pub use backend::{Backend, Elem, ViewLen};
pub use device::{DeviceSpec, Devices};
pub use error::{Error, Result};
pub use ops::activation::{Activation, ActivationOps};
pub use ops::gemm::{Gemm, GemmKernel, GemmOps};
pub use ops::loss::LossOps;
pub use ops::optim::{AdamW, OptimOps, Optimizer, OptimizerConfig, Sgd};
pub use ops::reduce::ReduceOps;
pub use ops::Ops;
pub use tensor::Tensor;
