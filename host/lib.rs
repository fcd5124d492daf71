//! tessera: hand-written CUDA kernels and a host library for people who write their own
//! trainers, which splits a model of their own across devices and replicas.
//!
//! # Models: the layer contract
//!
//! A model is a sequence of layers ([`nn::Model`]). A layer ([`nn::Layer`]) runs forward on a
//! microbatch and keeps what its backward needs, runs backward from its output gradient to its
//! input gradient while writing its parameters' gradients, names its parameters (the names
//! checkpoints use) and tells the planner its FLOPs and memory. The engine
//! ([`parallel::engine::Engine`], or [`parallel::mpi::DistEngine`] across processes) cuts the
//! model into pipeline stages at layer boundaries and replicates it across data-parallel
//! replicas; any plan trains to the weights of one device. tessera's MLP is one such model
//! ([`nn::MlpConfig::model`]); `examples/own_layer.rs` writes a layer of its own (a residual
//! block, sharing its matrix between blocks) and trains it with dp 2 x pp 2.
//!
//! ```
//! use tessera::prelude::*;
//!
//! # fn main() -> Result<()> {
//! let model: Model<CpuDevice> = Model::new("my net")
//!     .push(Linear::new(12, 32, Activation::GeluTanh))
//!     .push(Linear::new(32, 32, Activation::GeluTanh))
//!     .push(Linear::new(32, 5, Activation::None));
//! let info = model.info()?; // checked: each layer takes what the one before gives
//! assert_eq!(info.params[0].name, "layers.0.weight");
//! let cfg = TrainConfig {
//!     optimizer: AdamW { lr: 1e-2, ..AdamW::default() }.into(),
//!     schedule: LrSchedule::Constant,
//!     clip_norm: Some(1.0),
//!     seed: 0,
//! };
//! // Two replicas of a two-stage pipeline on four logical CPU devices, four microbatches.
//! let devices: Vec<CpuDevice> = (0..4).map(CpuDevice::new).collect();
//! let plan = Plan::new(&info, 2, 2, 4, ScheduleKind::OneFOneB)?;
//! let mut engine = Engine::new(&devices, &model, cfg, plan)?;
//! let data = Dataset::synthetic(64, &[12, 24, 5], 1)?;
//! let first = engine.step(&data.x, &data.y)?.loss;
//! for _ in 0..20 {
//!     engine.step(&data.x, &data.y)?;
//! }
//! assert!(engine.step(&data.x, &data.y)?.loss < first);
//! # Ok(())
//! # }
//! ```
//!
//! # Devices and ops
//!
//! The kernels live in `kernels/*.cu` and are compiled by the build script; [`kernels`] holds
//! their generated, typed launch handles and the build's manifest. A [`Backend`] is a device:
//! memory, copies and synchronisation ([`CpuDevice`], [`CudaDevice`], and [`SimDevice`], which
//! runs the CUDA kernels in a simulator that checks every access). Each op family is its own
//! small trait in [`ops`], implemented by every backend side by side, so training code is
//! generic over the device and chooses it once. [`ops::shaped`] runs them on [`Tensor`]s,
//! reading every size from the shapes; the explicit style takes views and sizes:
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
//!
//! The test harness (`tessera::check`: comparisons, the f64 reference ops) is behind the
//! `testing` feature; `mpi` (on by default) adds the engine across processes.

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
pub use backend::sim::{SimDevice, StreamOrder};
pub use backend::{Backend, Elem, ViewLen};
pub use device::{DeviceSpec, Devices};
pub use error::{Error, Result};
pub use ops::activation::{Activation, ActivationOps};
pub use ops::convert::{ConvertOps, Half};
pub use ops::gemm::{Gemm, GemmKernel, GemmOps};
pub use ops::loss::LossOps;
pub use ops::optim::{AdamW, OptimOps, Optimizer, OptimizerConfig, Sgd};
pub use ops::reduce::ReduceOps;
pub use ops::transformer::TransformerOps;
pub use ops::Ops;
pub use tensor::Tensor;
