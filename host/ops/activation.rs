//! Activations: ReLU, GELU (tanh approximation and exact erf), SiLU; forward, and backward
//! from the saved pre-activation. CUDA: `kernels/activation.cu` (float4 where aligned).

use std::fmt;
use std::str::FromStr;

use rayon::prelude::*;

use crate::backend::cpu::{CpuDevice, CHUNK};
use crate::backend::cuda::CudaDevice;
use crate::backend::{check_len, Backend};
use crate::error::{Error, Result};
use crate::kernels::consts;
use crate::ops::{as_i64, elementwise_cfg};

/// An elementwise activation. Its kernel code is the `TESSERA_ACT_*` define of `common.cuh`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Activation {
    /// Identity.
    #[default]
    None,
    /// `max(z, 0)`.
    Relu,
    /// `0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))`.
    GeluTanh,
    /// `0.5 z (1 + erf(z / sqrt 2))`.
    GeluErf,
    /// `z * sigmoid(z)`.
    Silu,
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;

impl Activation {
    /// Every activation.
    pub const ALL: [Activation; 5] =
        [Activation::None, Activation::Relu, Activation::GeluTanh, Activation::GeluErf, Activation::Silu];

    /// The kernel's code for it.
    pub fn code(self) -> i32 {
        (match self {
            Activation::None => consts::ACT_NONE,
            Activation::Relu => consts::ACT_RELU,
            Activation::GeluTanh => consts::ACT_GELU_TANH,
            Activation::GeluErf => consts::ACT_GELU_ERF,
            Activation::Silu => consts::ACT_SILU,
        }) as i32
    }

    /// `act(z)` in f32, as the CPU backend computes it.
    #[inline]
    pub fn apply(self, z: f32) -> f32 {
        match self {
            Activation::None => z,
            Activation::Relu => z.max(0.0),
            Activation::GeluTanh => 0.5 * z * (1.0 + (SQRT_2_OVER_PI * (z + 0.044715 * z * z * z)).tanh()),
            Activation::GeluErf => 0.5 * z * (1.0 + libm::erff(z * std::f32::consts::FRAC_1_SQRT_2)),
            Activation::Silu => z / (1.0 + (-z).exp()),
        }
    }

    /// `act'(z)` in f32 (`relu'(0) = 0`).
    #[inline]
    pub fn grad(self, z: f32) -> f32 {
        match self {
            Activation::None => 1.0,
            Activation::Relu => {
                if z > 0.0 {
                    1.0
                } else {
                    0.0
                }
            }
            Activation::GeluTanh => {
                let u = SQRT_2_OVER_PI * (z + 0.044715 * z * z * z);
                let t = u.tanh();
                let du = SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * z * z);
                0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du
            }
            Activation::GeluErf => {
                let cdf = 0.5 * (1.0 + libm::erff(z * std::f32::consts::FRAC_1_SQRT_2));
                let pdf = (-0.5 * z * z).exp() * 0.398_942_3;
                cdf + z * pdf
            }
            Activation::Silu => {
                let s = 1.0 / (1.0 + (-z).exp());
                s * (1.0 + z * (1.0 - s))
            }
        }
    }
}

impl fmt::Display for Activation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Activation::None => "none",
            Activation::Relu => "relu",
            Activation::GeluTanh => "gelu",
            Activation::GeluErf => "gelu-erf",
            Activation::Silu => "silu",
        })
    }
}

impl FromStr for Activation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "none" | "identity" | "linear" => Activation::None,
            "relu" => Activation::Relu,
            "gelu" | "gelu-tanh" | "gelu_tanh" => Activation::GeluTanh,
            "gelu-erf" | "gelu_erf" => Activation::GeluErf,
            "silu" | "swish" => Activation::Silu,
            _ => {
                return Err(Error::Invalid(format!("unknown activation `{s}`: use relu, gelu, gelu-erf, silu or none")))
            }
        })
    }
}

/// Elementwise activations.
pub trait ActivationOps: Backend {
    /// `y = act(x)`.
    fn act_forward(&self, act: Activation, x: &Self::Ref<'_, f32>, y: &mut Self::Mut<'_, f32>) -> Result<()>;
    /// `dx = dy * act'(z)`, from the saved pre-activation `z`.
    fn act_backward(
        &self,
        act: Activation,
        z: &Self::Ref<'_, f32>,
        dy: &Self::Ref<'_, f32>,
        dx: &mut Self::Mut<'_, f32>,
    ) -> Result<()>;
}

impl ActivationOps for CpuDevice {
    fn act_forward(&self, act: Activation, x: &&[f32], y: &mut &mut [f32]) -> Result<()> {
        check_len("act_forward", "y", y.len(), x.len())?;
        y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(y, x)| {
            y.iter_mut().zip(x).for_each(|(y, x)| *y = act.apply(*x));
        });
        Ok(())
    }
    fn act_backward(&self, act: Activation, z: &&[f32], dy: &&[f32], dx: &mut &mut [f32]) -> Result<()> {
        check_len("act_backward", "dy", dy.len(), z.len())?;
        check_len("act_backward", "dx", dx.len(), z.len())?;
        dx.par_chunks_mut(CHUNK).zip(z.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK))).for_each(|(dx, (z, dy))| {
            for ((dx, z), dy) in dx.iter_mut().zip(z).zip(dy) {
                *dx = dy * act.grad(*z);
            }
        });
        Ok(())
    }
}

impl ActivationOps for CudaDevice {
    fn act_forward(
        &self,
        act: Activation,
        x: &cudarc::driver::CudaView<'_, f32>,
        y: &mut cudarc::driver::CudaViewMut<'_, f32>,
    ) -> Result<()> {
        check_len("act_forward", "y", y.len(), x.len())?;
        let n = as_i64("act_forward", "n", x.len())?;
        let cfg = elementwise_cfg(x.len(), self.sms());
        // SAFETY: x and y both hold n elements (checked); the kernel is grid-stride over n.
        unsafe { self.kernels().activation.act_fwd(self.stream(), cfg, act.code(), n, x, y) }
            .map_err(Error::driver("launching act_fwd"))
    }
    fn act_backward(
        &self,
        act: Activation,
        z: &cudarc::driver::CudaView<'_, f32>,
        dy: &cudarc::driver::CudaView<'_, f32>,
        dx: &mut cudarc::driver::CudaViewMut<'_, f32>,
    ) -> Result<()> {
        check_len("act_backward", "dy", dy.len(), z.len())?;
        check_len("act_backward", "dx", dx.len(), z.len())?;
        let n = as_i64("act_backward", "n", z.len())?;
        let cfg = elementwise_cfg(z.len(), self.sms());
        // SAFETY: z, dy and dx hold n elements (checked); the kernel is grid-stride over n.
        unsafe { self.kernels().activation.act_bwd(self.stream(), cfg, act.code(), n, z, dy, dx) }
            .map_err(Error::driver("launching act_bwd"))
    }
}
