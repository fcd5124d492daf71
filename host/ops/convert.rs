//! Conversions between f32 and the 16-bit floats, bf16 and f16 (`kernels/convert.cu`): the
//! storage of mixed-precision training. A 16-bit buffer holds the values' bits (`u16`), the
//! same bits as the `half` crate's `bf16` and `f16` on the host (`half::bf16::from_bits`).
//! f32 to 16 bits rounds to nearest, ties to even (overflow to infinity, NaN kept quiet); back
//! to f32 is exact. The CPU converts with `half`; the GPU and the simulator run the kernels, and
//! the bits agree (tested on every value class: normal, subnormal, overflow, ties, NaN).

use rayon::prelude::*;

use crate::backend::cpu::CpuDevice;
use crate::backend::cuda::CudaDevice;
use crate::backend::sim::{SimDevice, SimView, SimViewMut};
use crate::backend::{check_len, Backend};
use crate::error::{Error, Result};
use crate::ops::{as_i64, elementwise_cfg};

use cudarc::driver::{CudaView, CudaViewMut};

/// A 16-bit float format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    /// bfloat16: f32's 8-bit exponent, 7 bits of mantissa.
    Bf16,
    /// IEEE binary16: 5-bit exponent, 10 bits of mantissa (subnormals below 2^-14).
    F16,
}

/// Conversions between f32 and 16-bit floats.
pub trait ConvertOps: Backend {
    /// `y[i]` = the `fmt` bits of `x[i]`, rounded to nearest, ties to even.
    fn f32_to_half(&self, fmt: Half, x: &Self::Ref<'_, f32>, y: &mut Self::Mut<'_, u16>) -> Result<()>;
    /// `y[i]` = the f32 value of the `fmt` bits `x[i]` (exact).
    fn half_to_f32(&self, fmt: Half, x: &Self::Ref<'_, u16>, y: &mut Self::Mut<'_, f32>) -> Result<()>;
}

impl ConvertOps for CpuDevice {
    fn f32_to_half(&self, fmt: Half, x: &&[f32], y: &mut &mut [u16]) -> Result<()> {
        check_len("f32_to_half", "y", y.len(), x.len())?;
        match fmt {
            Half::Bf16 => y.par_iter_mut().zip(x.par_iter()).for_each(|(y, &x)| *y = half::bf16::from_f32(x).to_bits()),
            Half::F16 => y.par_iter_mut().zip(x.par_iter()).for_each(|(y, &x)| *y = half::f16::from_f32(x).to_bits()),
        }
        Ok(())
    }
    fn half_to_f32(&self, fmt: Half, x: &&[u16], y: &mut &mut [f32]) -> Result<()> {
        check_len("half_to_f32", "y", y.len(), x.len())?;
        match fmt {
            Half::Bf16 => y.par_iter_mut().zip(x.par_iter()).for_each(|(y, &x)| *y = half::bf16::from_bits(x).to_f32()),
            Half::F16 => y.par_iter_mut().zip(x.par_iter()).for_each(|(y, &x)| *y = half::f16::from_bits(x).to_f32()),
        }
        Ok(())
    }
}

/// The GPU side, written once for the CUDA device and the simulator.
macro_rules! gpu_impl {
    ($dev:ident, $view:ident, $view_mut:ident) => {
        impl ConvertOps for $dev {
            fn f32_to_half(&self, fmt: Half, x: &$view<'_, f32>, y: &mut $view_mut<'_, u16>) -> Result<()> {
                check_len("f32_to_half", "y", y.len(), x.len())?;
                let n = as_i64("f32_to_half", "n", x.len())?;
                let cfg = elementwise_cfg(x.len(), self.sms());
                let k = &self.kernels().convert;
                // SAFETY: x and y both hold n elements (checked); the kernels are grid-stride over n.
                match fmt {
                    Half::Bf16 => unsafe { k.f32_to_bf16(self.stream(), cfg, n, x, y) },
                    Half::F16 => unsafe { k.f32_to_f16(self.stream(), cfg, n, x, y) },
                }
                .map_err(Error::driver("launching a conversion to 16 bits"))
            }
            fn half_to_f32(&self, fmt: Half, x: &$view<'_, u16>, y: &mut $view_mut<'_, f32>) -> Result<()> {
                check_len("half_to_f32", "y", y.len(), x.len())?;
                let n = as_i64("half_to_f32", "n", x.len())?;
                let cfg = elementwise_cfg(x.len(), self.sms());
                let k = &self.kernels().convert;
                // SAFETY: x and y both hold n elements (checked); the kernels are grid-stride over n.
                match fmt {
                    Half::Bf16 => unsafe { k.bf16_to_f32(self.stream(), cfg, n, x, y) },
                    Half::F16 => unsafe { k.f16_to_f32(self.stream(), cfg, n, x, y) },
                }
                .map_err(Error::driver("launching a conversion from 16 bits"))
            }
        }
    };
}

gpu_impl!(CudaDevice, CudaView, CudaViewMut);
gpu_impl!(SimDevice, SimView, SimViewMut);
