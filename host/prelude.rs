//! What a trainer of one's own starts from, in one `use tessera::prelude::*;`: the devices and
//! their traits, the op families, tensors, the MLP and its trainer, the parallel engine and its
//! plan, data, checkpoints, errors.

pub use crate::backend::{Backend, Elem, ViewLen};
pub use crate::checkpoint::Checkpoint;
pub use crate::data::{Dataset, TextCorpus};
pub use crate::device::{DeviceSpec, Devices};
pub use crate::error::{Error, Result};
pub use crate::nn::{Ctx, Layer, LayerCost, Linear, MlpConfig, Model, ModelInfo, Network, ParamSpec, Saved, Work};
pub use crate::ops::activation::{Activation, ActivationOps};
pub use crate::ops::convert::{ConvertOps, Half};
pub use crate::ops::gemm::{Gemm, GemmKernel, GemmOps};
pub use crate::ops::loss::LossOps;
pub use crate::ops::optim::{AdamW, OptimOps, Optimizer, Sgd};
pub use crate::ops::reduce::ReduceOps;
pub use crate::ops::shaped::MatMul;
pub use crate::ops::transformer::TransformerOps;
pub use crate::ops::Ops;
pub use crate::parallel::comm::{Communicator, LocalGroup};
pub use crate::parallel::engine::Engine;
pub use crate::parallel::{Plan, ScheduleKind};
pub use crate::tensor::Tensor;
pub use crate::train::{
    fit, fit_reading, Cursor, Eval, LrSchedule, OptimizerConfig, Run, StepStats, TrainConfig, Trainer,
};
pub use crate::{CpuDevice, CudaDevice, SimDevice};
