//! Activations: ReLU, GELU (tanh approximation and exact erf), SiLU; forward, and backward
//! from the saved pre-activation. CUDA: `kernels/activation.cu` (float4 where aligned).

use std::fmt;
use std::str::FromStr;

use rayon::prelude::*;

use crate::backend::cpu::{wide, CpuDevice, CHUNK};
use crate::backend::cuda::CudaDevice;
use crate::backend::sim::{SimDevice, SimView, SimViewMut};
use crate::backend::{check_len, Backend};
use crate::error::{Error, Result};
use crate::kernels::consts;
use crate::ops::{as_i64, elementwise_cfg};
#[allow(unused_imports)]
use cudarc::driver::{CudaView, CudaViewMut};

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

/// `e^x` in f32 without a libm call, so loops over it vectorise: range reduction by ln 2
/// (Cody-Waite, two constants) and a degree-6 Taylor polynomial on |r| <= ln2/2 (relative
/// error below 2e-7); the input is clamped to the range whose result is a normal float.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    // Rounding to the nearest integer by adding 1.5 * 2^23 (the integer lands in the low
    // mantissa bits): plain adds and integer ops, which vectorise even without SSE4.1's round.
    const SHIFT: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let k = x * std::f32::consts::LOG2_E + SHIFT;
    let n = k - SHIFT;
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let ni = k.to_bits() as i32 - SHIFT.to_bits() as i32;
    p * f32::from_bits(((ni + 127) as u32) << 23)
}

/// For GELU (tanh): `0.5 (1 + tanh u)`, `1 - tanh(u)^2` and `du/dz` at `z`, computed from
/// `e = exp(-2|u|)` so that they stay accurate where `tanh u` rounds to -1 (large negative z).
#[inline(always)]
fn gelu_tanh_parts(z: f32) -> (f32, f32, f32) {
    let u = SQRT_2_OVER_PI * (z + 0.044715 * z * z * z);
    let e = fast_exp(-2.0 * u.abs());
    let d = 1.0 + e;
    let h = if u >= 0.0 { 1.0 } else { e } / d;
    (h, 4.0 * e / (d * d), SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * z * z))
}

/// `tanh(u)` from [`fast_exp`]: `sign(u) (1 - e^-2|u|) / (1 + e^-2|u|)`; absolute error
/// below 3e-7.
#[inline(always)]
pub fn fast_tanh(u: f32) -> f32 {
    let e = fast_exp(-2.0 * u.abs());
    ((1.0 - e) / (1.0 + e)).copysign(u)
}

/// `erf(x)` by Abramowitz and Stegun 7.1.26 with [`fast_exp`]; absolute error below 6e-7
/// (1.5e-7 of the formula, the rest f32 rounding).
#[inline(always)]
pub fn fast_erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    (1.0 - poly * fast_exp(-a * a)).copysign(x)
}

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
            Activation::GeluTanh => z * gelu_tanh_parts(z).0,
            Activation::GeluErf => 0.5 * z * (1.0 + fast_erf(z * std::f32::consts::FRAC_1_SQRT_2)),
            Activation::Silu => z / (1.0 + fast_exp(-z)),
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
                let (h, one_minus_t2, du) = gelu_tanh_parts(z);
                h + 0.5 * z * one_minus_t2 * du
            }
            Activation::GeluErf => {
                let cdf = 0.5 * (1.0 + fast_erf(z * std::f32::consts::FRAC_1_SQRT_2));
                let pdf = fast_exp(-0.5 * z * z) * 0.398_942_3;
                cdf + z * pdf
            }
            Activation::Silu => {
                let s = 1.0 / (1.0 + fast_exp(-z));
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
        // One loop per activation (the match outside), so each loop vectorises.
        macro_rules! each {
            ($f:expr) => {
                y.par_chunks_mut(CHUNK)
                    .zip(x.par_chunks(CHUNK))
                    .for_each(|(y, x)| wide(|| y.iter_mut().zip(x).for_each(|(y, x)| *y = $f(*x))))
            };
        }
        match act {
            Activation::None => each!(|z: f32| z),
            Activation::Relu => each!(|z: f32| Activation::Relu.apply(z)),
            Activation::GeluTanh => each!(|z: f32| Activation::GeluTanh.apply(z)),
            Activation::GeluErf => each!(|z: f32| Activation::GeluErf.apply(z)),
            Activation::Silu => each!(|z: f32| Activation::Silu.apply(z)),
        }
        Ok(())
    }
    fn act_backward(&self, act: Activation, z: &&[f32], dy: &&[f32], dx: &mut &mut [f32]) -> Result<()> {
        check_len("act_backward", "dy", dy.len(), z.len())?;
        check_len("act_backward", "dx", dx.len(), z.len())?;
        macro_rules! each {
            ($a:expr) => {
                dx.par_chunks_mut(CHUNK).zip(z.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK))).for_each(|(dx, (z, dy))| {
                    wide(|| {
                        for ((dx, z), dy) in dx.iter_mut().zip(z).zip(dy) {
                            *dx = dy * $a.grad(*z);
                        }
                    })
                })
            };
        }
        match act {
            Activation::None => each!(Activation::None),
            Activation::Relu => each!(Activation::Relu),
            Activation::GeluTanh => each!(Activation::GeluTanh),
            Activation::GeluErf => each!(Activation::GeluErf),
            Activation::Silu => each!(Activation::Silu),
        }
        Ok(())
    }
}

/// The GPU side, written once for the CUDA device and the simulator: the same launches of the
/// same kernels, over `CudaView`s or `SimView`s.
macro_rules! gpu_impl {
    ($dev:ident, $view:ident, $view_mut:ident) => {
        impl ActivationOps for $dev {
            fn act_forward(&self, act: Activation, x: &$view<'_, f32>, y: &mut $view_mut<'_, f32>) -> Result<()> {
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
                z: &$view<'_, f32>,
                dy: &$view<'_, f32>,
                dx: &mut $view_mut<'_, f32>,
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
    };
}

gpu_impl!(CudaDevice, CudaView, CudaViewMut);
gpu_impl!(SimDevice, SimView, SimViewMut);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_functions_match_f64_over_their_range() {
        let mut worst = (0f64, 0f64, 0f64);
        for i in 0..200_001 {
            let x = -20.0 + 40.0 * i as f64 / 200_000.0;
            let xf = x as f32;
            let e = (fast_exp(xf) as f64 - (xf as f64).exp()).abs() / (xf as f64).exp();
            let t = (fast_tanh(xf) as f64 - (xf as f64).tanh()).abs();
            let r = (fast_erf(xf) as f64 - libm::erf(xf as f64)).abs();
            worst = (worst.0.max(e), worst.1.max(t), worst.2.max(r));
        }
        assert!(worst.0 < 3e-7, "exp relative error {}", worst.0);
        assert!(worst.1 < 3e-7, "tanh absolute error {}", worst.1);
        assert!(worst.2 < 6e-7, "erf absolute error {}", worst.2);
        assert_eq!(fast_exp(-200.0), fast_exp(-87.0));
        assert!(fast_exp(200.0).is_finite());
    }

    /// The CPU loops run in 8-lane AVX2 code where the CPU has it (`wide`); the scalar
    /// functions here are compiled for the baseline. Both must give the same bits.
    #[test]
    fn wide_loops_give_the_scalar_bits() {
        let dev = CpuDevice::new(0);
        let n = 3 * CHUNK + 77;
        let mut z: Vec<f32> = (0..n).map(|i| ((i * 7919 % 20011) as f32 - 10005.0) / 997.0).collect();
        // The edges, inside the vector body (not only in the scalar tail).
        let edges = [0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 1e-40, -1e-40, 88.5, -104.0, f32::MAX];
        z[100..100 + edges.len()].copy_from_slice(&edges);
        let dy: Vec<f32> = (0..n).map(|i| ((i % 29) as f32 - 14.0) / 3.0).collect();
        for act in Activation::ALL {
            let mut y = vec![0f32; n];
            dev.act_forward(act, &z.as_slice(), &mut y.as_mut_slice()).unwrap();
            let mut dx = vec![0f32; n];
            dev.act_backward(act, &z.as_slice(), &dy.as_slice(), &mut dx.as_mut_slice()).unwrap();
            let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
            for i in 0..n {
                assert!(same(y[i], act.apply(z[i])), "{act} forward at z={}: {} vs {}", z[i], y[i], act.apply(z[i]));
                let want = dy[i] * act.grad(z[i]);
                assert!(same(dx[i], want), "{act} backward at z={}: {} vs {want}", z[i], dx[i]);
            }
        }
    }
}
