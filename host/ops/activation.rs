//! Activations: ReLU, GELU (tanh approximation and exact erf), SiLU; forward, and backward
//! from the saved pre-activation. CUDA: `kernels/activation.cu` (float4 where aligned).

use std::fmt;
use std::str::FromStr;

use rayon::prelude::*;

use crate::backend::cpu::math::{erfcx, fast_exp, neg_half_square, Exp};
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

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
/// `1 / sqrt(2 pi)`.
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// For GELU (tanh): `u = sqrt(2/pi) (z + 0.044715 z^3)`, its sign, and `-2|u|` as a sum of two
/// f32 (computed in f64: at z = -10, `-2|u|` is -87 and its f32 rounding alone would cost 1e-5
/// of the result), and `du/dz`.
#[inline(always)]
fn gelu_tanh_arg(z: f32) -> (bool, f32, f32, f32) {
    let zd = z as f64;
    let u = SQRT_2_OVER_PI * (zd + 0.044715 * zd * zd * zd);
    let a = -2.0 * u.abs();
    let hi = a as f32;
    let du = (SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * zd * zd)) as f32;
    (u >= 0.0, hi, (a - hi as f64) as f32, du)
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

    /// Below this the fast path's f32 arithmetic could lose the 1e-6 relative accuracy (the
    /// argument of an exponential rounded in f32 at large `|z|`, or `e^z` subnormal), and
    /// [`Activation::apply_tail`] takes over; `-inf` for activations without a tail.
    #[inline(always)]
    pub fn tail_below(self) -> f32 {
        match self {
            Activation::None | Activation::Relu => f32::NEG_INFINITY,
            Activation::GeluTanh => -2.5,
            Activation::GeluErf => -2.0,
            Activation::Silu => -80.0,
        }
    }

    /// `act(z)` in f32, as the CPU backend computes it: [`Activation::apply_fast`] above
    /// [`Activation::tail_below`], [`Activation::apply_tail`] below (the CPU's loops run the
    /// fast path over everything, then redo the few tail elements). Within 1e-6 relative of the
    /// exact value wherever that is a normal float; the signed zero where it underflows.
    #[inline(always)]
    pub fn apply(self, z: f32) -> f32 {
        if z < self.tail_below() {
            self.apply_tail(z)
        } else {
            self.apply_fast(z)
        }
    }

    /// `act'(z)` in f32 (`relu'(0) = 0`), as [`Activation::apply`]: fast path, then tail.
    #[inline(always)]
    pub fn grad(self, z: f32) -> f32 {
        if z < self.tail_below() {
            self.grad_tail(z)
        } else {
            self.grad_fast(z)
        }
    }

    /// `act(z)` in plain f32, accurate from [`Activation::tail_below`] up. Always inlined: the
    /// CPU's loops are compiled for AVX2 around it (`wide`) and vectorise only with its body inside.
    #[inline(always)]
    pub fn apply_fast(self, z: f32) -> f32 {
        match self {
            Activation::None => z,
            Activation::Relu => z.max(0.0),
            Activation::GeluTanh => {
                // z sigmoid(2u) = z / (1 + e) for u >= 0, z e / (1 + e) below, e = exp(-2|u|).
                let u = SQRT_2_OVER_PI as f32 * (z + 0.044715 * z * z * z);
                let e = fast_exp(-2.0 * u.abs());
                z * if u >= 0.0 { 1.0 } else { e } / (1.0 + e)
            }
            Activation::GeluErf => {
                let g = fast_exp(-0.5 * z * z);
                let w = 0.5 * erfcx(z.abs() * std::f32::consts::FRAC_1_SQRT_2);
                if z < 0.0 {
                    z * (g * w)
                } else {
                    z * (1.0 - g * w)
                }
            }
            Activation::Silu => {
                let e = fast_exp(-z.abs());
                z * if z < 0.0 { e } else { 1.0 } / (1.0 + e)
            }
        }
    }

    /// `act'(z)` in plain f32, accurate from [`Activation::tail_below`] up.
    #[inline(always)]
    pub fn grad_fast(self, z: f32) -> f32 {
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
                let c = SQRT_2_OVER_PI as f32;
                let u = c * (z + 0.044715 * z * z * z);
                let e = fast_exp(-2.0 * u.abs());
                let d = 1.0 + e;
                let h = if u >= 0.0 { 1.0 } else { e } / d;
                h + 2.0 * z * (e / (d * d)) * c * (1.0 + 3.0 * 0.044715 * z * z)
            }
            Activation::GeluErf => {
                let g = fast_exp(-0.5 * z * z);
                let w = 0.5 * erfcx(z.abs() * std::f32::consts::FRAC_1_SQRT_2);
                if z < 0.0 {
                    g * (w + z * INV_SQRT_2PI)
                } else {
                    1.0 - g * (w - z * INV_SQRT_2PI)
                }
            }
            Activation::Silu => {
                // s (1 + z (1 - s)) from e = e^-|z|: s = 1 / (1 + e) and 1 - s = e / (1 + e) above 0,
                // the other way round below (no 1 - s to cancel).
                let e = fast_exp(-z.abs());
                let d = 1.0 + e;
                if z < 0.0 {
                    e * (1.0 + z / d) / d
                } else {
                    (1.0 + z * e / d) / d
                }
            }
        }
    }

    /// `act(z)` in f32 on the tail path: the argument of GELU (tanh) in f64, `-z^2/2` as an exact
    /// sum of two floats, and the exponential applied last ([`Exp`]), so the result keeps 1e-6
    /// relative accuracy wherever it is a normal float and is the signed zero where it
    /// underflows. About four times the work of [`Activation::apply_fast`].
    #[inline(always)]
    pub fn apply_tail(self, z: f32) -> f32 {
        match self {
            Activation::None => z,
            Activation::Relu => z.max(0.0),
            Activation::GeluTanh => {
                // z sigmoid(2u): z / (1 + e) for u >= 0, z e / (1 + e) for u < 0, e = exp(-2|u|).
                let (pos, a, lo, _) = gelu_tanh_arg(z);
                let e = Exp::new(a, lo);
                let d = 1.0 + e.times(1.0);
                if pos {
                    z / d
                } else {
                    e.times(z / d)
                }
            }
            Activation::GeluErf => {
                // z Phi(z), Phi(z) = e^(-z^2/2) erfcx(|z|/sqrt 2) / 2 for z < 0, 1 minus that above:
                // no 1 + erf(z) to cancel in the negative tail.
                let (a, lo) = neg_half_square(z);
                let g = Exp::new(a, lo);
                let w = 0.5 * erfcx(z.abs() * std::f32::consts::FRAC_1_SQRT_2);
                if z < 0.0 {
                    g.times(z * w)
                } else {
                    z * (1.0 - g.times(w))
                }
            }
            Activation::Silu => {
                // z / (1 + e^-z) for z >= 0; z e^z / (1 + e^z) below, the e^z applied last.
                let e = Exp::new(-z.abs(), 0.0);
                let d = 1.0 + e.times(1.0);
                if z < 0.0 {
                    e.times(z / d)
                } else {
                    z / d
                }
            }
        }
    }

    /// `act'(z)` on the tail path, as [`Activation::apply_tail`].
    #[inline(always)]
    pub fn grad_tail(self, z: f32) -> f32 {
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
                // sigmoid(2u) + z 2e / (1 + e)^2 du/dz, e = exp(-2|u|); for u < 0 the sigmoid is
                // e / (1 + e), so the factor e is applied last.
                let (pos, a, lo, du) = gelu_tanh_arg(z);
                let e = Exp::new(a, lo);
                let d = 1.0 + e.times(1.0);
                let slope = 2.0 * z * du / (d * d);
                if pos {
                    1.0 / d + e.times(slope)
                } else {
                    e.times(1.0 / d + slope)
                }
            }
            Activation::GeluErf => {
                // Phi(z) + z phi(z), phi(z) = e^(-z^2/2) / sqrt(2 pi).
                let (a, lo) = neg_half_square(z);
                let g = Exp::new(a, lo);
                let w = 0.5 * erfcx(z.abs() * std::f32::consts::FRAC_1_SQRT_2);
                if z < 0.0 {
                    g.times(w + z * INV_SQRT_2PI)
                } else {
                    1.0 - g.times(w - z * INV_SQRT_2PI)
                }
            }
            Activation::Silu => {
                // s (1 + z (1 - s)), s = sigmoid(z) = 1 / (1 + e^-z), from e = e^-|z|.
                let e = Exp::new(-z.abs(), 0.0);
                let ev = e.times(1.0);
                let d = 1.0 + ev;
                if z < 0.0 {
                    e.times((1.0 + z / d) / d)
                } else {
                    (1.0 + z * ev / d) / d
                }
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

/// Calls `f(i)` for every `x[i] < t`, cheaply where there is none: a vectorised test over
/// blocks of 64 first, then a look at each element of the blocks that have one. (A plain
/// conditional loop would be vectorised by computing the tail path for every element.)
#[inline(always)]
fn for_tail(x: &[f32], t: f32, mut f: impl FnMut(usize)) {
    if t == f32::NEG_INFINITY {
        return;
    }
    for (b, block) in x.chunks(64).enumerate() {
        // An OR of comparisons vectorises (a minimum, with its NaN rules, does not).
        if block.iter().fold(false, |any, &v| any | (v < t)) {
            for (i, &v) in block.iter().enumerate() {
                if v < t {
                    f(b * 64 + i);
                }
            }
        }
    }
}

/// [`Activation::apply_tail`] kept out of line, so the loop that calls it for the rare tail
/// elements stays a loop of calls rather than a vector loop computing it everywhere.
#[inline(never)]
fn tail_apply(a: Activation, z: f32) -> f32 {
    a.apply_tail(z)
}

/// [`Activation::grad_tail`] out of line, as [`tail_apply`].
#[inline(never)]
fn tail_grad(a: Activation, z: f32) -> f32 {
    a.grad_tail(z)
}

impl ActivationOps for CpuDevice {
    fn act_forward(&self, act: Activation, x: &&[f32], y: &mut &mut [f32]) -> Result<()> {
        check_len("act_forward", "y", y.len(), x.len())?;
        // One loop per activation (the match outside), so each loop vectorises: the fast path over
        // every element, then the few below the activation's tail threshold again, accurately.
        macro_rules! each {
            ($a:expr) => {
                y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(y, x)| {
                    wide(|| {
                        y.iter_mut().zip(x).for_each(|(y, x)| *y = $a.apply_fast(*x));
                        for_tail(x, $a.tail_below(), |i| y[i] = tail_apply($a, x[i]));
                    })
                })
            };
        }
        match act {
            Activation::None => y.copy_from_slice(x),
            Activation::Relu => each!(Activation::Relu),
            Activation::GeluTanh => each!(Activation::GeluTanh),
            Activation::GeluErf => each!(Activation::GeluErf),
            Activation::Silu => each!(Activation::Silu),
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
                            *dx = dy * $a.grad_fast(*z);
                        }
                        for_tail(z, $a.tail_below(), |i| dx[i] = dy[i] * tail_grad($a, z[i]));
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
