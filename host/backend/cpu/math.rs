//! The CPU's vectorisable f32 math: an exponential with correct underflow that can scale a
//! factor before its last rounding ([`Exp`]), `tanh`, and `erfcx`. Plain arithmetic and integer
//! bit tricks, no libm calls, so the loops over them vectorise (`super::wide`). Used by the
//! activations and the losses of `crate::ops`; `kernels/common.cuh` holds the same algorithms
//! for the GPU.

/// `e^(a + a_lo)` held as `p * 2^n1 * 2^n2`, so that it can multiply a value `m` with one
/// rounding into the subnormal range, the last ([`Exp::times`]): `m e^a` then keeps its relative
/// accuracy (about 2e-7) wherever it is a normal float, even where `e^a` alone is subnormal, and
/// is the correctly signed zero where it underflows. `a_lo` is a small correction to `a` (the low
/// part of an argument computed in more than f32, or 0). No libm call, so loops over it
/// vectorise: range reduction by ln 2 (Cody-Waite, two constants), a degree-7 Taylor polynomial
/// on `|r| <= ln2/2` (truncation below 6e-9).
#[derive(Clone, Copy)]
pub struct Exp {
    p: f32,
    s1: f32,
    s2: f32,
    a: f32,
}

impl Exp {
    /// `e^(a + a_lo)`.
    #[inline(always)]
    pub fn new(a: f32, a_lo: f32) -> Exp {
        // Rounding to the nearest integer by adding 1.5 * 2^23 (the integer lands in the low
        // mantissa bits): plain adds and integer ops, which vectorise even without SSE4.1's round.
        const SHIFT: f32 = 12_582_912.0;
        let x = a.clamp(-172.0, 88.75);
        let k = x * std::f32::consts::LOG2_E + SHIFT;
        let n = k - SHIFT;
        let r = (x - n * 0.693_145_75 - n * 1.428_606_8e-6) + a_lo;
        let p = 1.0
            + r * (1.0
                + r * (0.5
                    + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
        let ni = k.to_bits() as i32 - SHIFT.to_bits() as i32;
        // n in [-248, 128]: both halves are normal powers of two.
        let n1 = ni >> 1;
        let n2 = ni - n1;
        Exp { p, s1: f32::from_bits(((n1 + 127) as u32) << 23), s2: f32::from_bits(((n2 + 127) as u32) << 23), a }
    }

    /// `m e^(a + a_lo)`: below `a = -172` the signed zero of `m` (exact underflow for every
    /// `|m| < 2^98`, which every caller here has), above `a = 88.75` `m` times infinity.
    #[inline(always)]
    pub fn times(self, m: f32) -> f32 {
        let y = (m * self.p) * self.s1 * self.s2;
        if self.a < -172.0 {
            m * 0.0
        } else if self.a > 88.75 {
            m * f32::INFINITY
        } else {
            y
        }
    }
}

/// `e^x` in f32, vectorisable ([`Exp`]): relative error below 2e-7 for normal results; 0 below
/// about -103.97, infinity above 88.72, subnormal results in between as rounded from the exact
/// value.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    Exp::new(x, 0.0).times(1.0)
}
/// `tanh(u)` from [`fast_exp`]: `sign(u) (1 - e^-2|u|) / (1 + e^-2|u|)`; absolute error
/// below 3e-7.
#[inline(always)]
pub fn fast_tanh(u: f32) -> f32 {
    let e = fast_exp(-2.0 * u.abs());
    ((1.0 - e) / (1.0 + e)).copysign(u)
}

/// The coefficients of `(1 + 2t) erfcx(t)` as a polynomial in `q = (t - 2) / (t + 2)` (the
/// transformation of Shepherd and Laframboise, 1981), lowest first: a Chebyshev interpolant of
/// degree 12 on `q in [-1, 1]` (t in [0, inf)), fitted in 40-digit arithmetic and rounded to f32.
/// `kernels/common.cuh` holds the same list (a test compares them).
pub const ERFCX_COEFFS: [f32; 13] = [
    1.2769784,
    -0.09276376,
    -0.16603039,
    0.1640494,
    -0.054220185,
    -0.008018636,
    0.008724295,
    0.0012166655,
    -0.0014635117,
    -0.0003571779,
    0.00022110545,
    6.310018e-5,
    -2.0108931e-5,
];

/// `erfcx(t) = e^(t^2) erfc(t)` for `t >= 0` (relative error below 2e-7; `t = inf` gives 0).
#[inline(always)]
pub fn erfcx(t: f32) -> f32 {
    let q = (t - 2.0) / (t + 2.0);
    let c = &ERFCX_COEFFS;
    let mut p = c[12];
    for i in (0..12).rev() {
        p = p * q + c[i];
    }
    let y = p / (1.0 + 2.0 * t);
    if t == f32::INFINITY {
        0.0
    } else {
        y
    }
}

/// `-z^2 / 2` as a sum of two f32 (exact: `z^2` has at most 48 significant bits), so that
/// `e^(-z^2/2)` keeps its relative accuracy at large `|z|`, where rounding `z^2` to f32 alone would
/// cost 1e-5.
#[inline(always)]
pub fn neg_half_square(z: f32) -> (f32, f32) {
    let s = -0.5 * (z as f64) * (z as f64);
    let hi = s as f32;
    (hi, (s - hi as f64) as f32)
}

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
            worst = (worst.0.max(e), worst.1.max(t), worst.2);
        }
        // erfcx over [0, 26] (f64's erfc underflows past that) and far out, against
        // e^(t^2) erfc(t) in f64 and the asymptotic series.
        for i in 0..100_001 {
            let t = (26.0 * i as f64 / 100_000.0) as f32;
            let td = t as f64;
            let want = (td * td).exp() * libm::erfc(td);
            worst.2 = worst.2.max((erfcx(t) as f64 - want).abs() / want);
        }
        for t in [30f32, 100.0, 1e3, 1e5, 1e10, 1e30] {
            let td = t as f64;
            let x = 1.0 / (td * td);
            let want = 1.0 / (td * std::f64::consts::PI.sqrt()) * (1.0 - 0.5 * x + 0.75 * x * x - 1.875 * x * x * x);
            worst.2 = worst.2.max((erfcx(t) as f64 - want).abs() / want);
        }
        assert!(worst.0 < 2.5e-7, "exp relative error {}", worst.0);
        assert!(worst.1 < 3e-7, "tanh absolute error {}", worst.1);
        assert!(worst.2 < 2.5e-7, "erfcx relative error {}", worst.2);
        // Underflow and overflow as the exact values round.
        assert_eq!(fast_exp(-200.0), 0.0);
        assert_eq!(fast_exp(-104.0), 0.0);
        assert!(fast_exp(-100.0) > 0.0 && fast_exp(-100.0) < f32::MIN_POSITIVE);
        assert_eq!(fast_exp(89.0), f32::INFINITY);
        assert!(fast_exp(88.7).is_finite());
        assert_eq!(erfcx(f32::INFINITY), 0.0);
    }

    /// The list in `kernels/common.cuh` is the same as [`ERFCX_COEFFS`] (one fit, two languages).
    #[test]
    fn erfcx_coefficients_match_the_kernels() {
        let src = include_str!("../../../kernels/common.cuh");
        let at = src.find("TESSERA_ERFCX_COEFFS[13] = {").expect("the coefficient table in common.cuh");
        let body = &src[at..src[at..].find("};").unwrap() + at];
        let body = &body[body.find('{').unwrap() + 1..];
        let cuda: Vec<f32> = body
            .split(',')
            .map(|c| c.trim().trim_end_matches('f'))
            .filter(|c| !c.is_empty())
            .map(|c| c.parse().unwrap())
            .collect();
        assert_eq!(cuda, ERFCX_COEFFS.to_vec());
    }
}
