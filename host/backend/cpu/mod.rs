//! The CPU device: buffers are `Vec`s, ops run on rayon's pool and a kept GEMM crate.
//!
//! `cpu:N` makes N logical CPU devices that share the machine's cores; they are real devices
//! for every purpose of the parallel engine (own buffers, copies between them).

pub mod math;

use std::ops::Range;

use crate::backend::{check_len, Backend, Elem};
use crate::error::Result;

/// A logical CPU device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuDevice {
    index: usize,
}

impl CpuDevice {
    /// Logical CPU device number `index`.
    pub fn new(index: usize) -> Self {
        CpuDevice { index }
    }

    /// Its index among the logical CPU devices.
    pub fn index(&self) -> usize {
        self.index
    }
}

impl Default for CpuDevice {
    fn default() -> Self {
        CpuDevice::new(0)
    }
}

impl Backend for CpuDevice {
    type Buf<T: Elem> = Vec<T>;
    type Ref<'a, T: Elem> = &'a [T];
    type Mut<'a, T: Elem> = &'a mut [T];

    fn total_memory(&self) -> u64 {
        crate::backend::host_memory()
    }
    fn name(&self) -> String {
        format!("cpu:{}", self.index)
    }
    fn alloc<T: Elem>(&self, len: usize) -> Result<Vec<T>> {
        Ok(vec![T::zeroed(); len])
    }
    fn upload<T: Elem>(&self, data: &[T]) -> Result<Vec<T>> {
        Ok(data.to_vec())
    }
    fn write<T: Elem>(&self, dst: &mut &mut [T], data: &[T]) -> Result<()> {
        check_len("write", "destination", dst.len(), data.len())?;
        dst.copy_from_slice(data);
        Ok(())
    }
    fn download<T: Elem>(&self, src: &&[T]) -> Result<Vec<T>> {
        Ok(src.to_vec())
    }
    fn copy<T: Elem>(&self, src: &&[T], dst: &mut &mut [T]) -> Result<()> {
        check_len("copy", "destination", dst.len(), src.len())?;
        dst.copy_from_slice(src);
        Ok(())
    }
    fn with_own_queue(&self) -> Result<Self> {
        Ok(self.clone())
    }
    fn duplicate<T: Elem>(&self, src: &&[T]) -> Result<Vec<T>> {
        Ok(src.to_vec())
    }
    fn adopt<T: Elem>(&self, buf: Vec<T>) -> Result<Vec<T>> {
        Ok(buf)
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    type Event = ();
    fn record_event(&self) -> Result<()> {
        Ok(())
    }
    fn wait_event(&self, _event: &()) -> Result<()> {
        Ok(())
    }
    fn sync_event(&self, _event: &()) -> Result<()> {
        Ok(())
    }
    fn buf_len<T: Elem>(buf: &Vec<T>) -> usize {
        buf.len()
    }
    fn view<T: Elem>(buf: &Vec<T>) -> &[T] {
        buf
    }
    fn view_mut<T: Elem>(buf: &mut Vec<T>) -> &mut [T] {
        buf
    }
    fn view_range<T: Elem>(buf: &Vec<T>, range: Range<usize>) -> &[T] {
        &buf[range]
    }
    fn view_range_mut<T: Elem>(buf: &mut Vec<T>, range: Range<usize>) -> &mut [T] {
        &mut buf[range]
    }
    fn sub<'a, T: Elem>(v: &'a &[T], range: Range<usize>) -> &'a [T] {
        &v[range]
    }
    fn sub_mut<'a, T: Elem>(v: &'a mut &mut [T], range: Range<usize>) -> &'a mut [T] {
        &mut v[range]
    }
    fn split_mut<T: Elem>(buf: &mut Vec<T>, mid: usize) -> (&mut [T], &mut [T]) {
        buf.split_at_mut(mid)
    }
    fn reborrow<'a, T: Elem>(v: &'a &mut [T]) -> &'a [T] {
        v
    }
}

/// Elements per rayon task for elementwise work: large enough to amortise the task, small
/// enough to spread 1M elements over many cores.
pub(crate) const CHUNK: usize = 1 << 14;

/// Runs `f` with its loops compiled for AVX2 and FMA where this CPU has them (checked once, at
/// run time), and for the baseline x86-64 (SSE2) elsewhere. Elementwise loops over
/// [`math::fast_exp`] and friends are compute-bound at 4 lanes;
/// 8 lanes roughly double them. The results are the same bits either way: Rust never fuses a
/// multiply and an add on its own, and the lane reductions fix their order by the length.
#[inline(always)]
pub(crate) fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has both features (checked just above).
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// Independent partial sums in the fixed-order reductions below: element `i` of a slice goes
/// to lane `i % LANES`, and the lanes are added in lane order at the end. The order depends
/// only on the length, never on threads; and the lanes are independent chains, so the loop
/// vectorises instead of waiting on one add after another.
const LANES: usize = 8;

/// `sum f(x[i])` in f64 over `x`, in the fixed lane order.
#[inline]
pub(crate) fn lane_sum(x: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut acc = [0f64; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            acc[j] += f(c[j]);
        }
    }
    for (a, &v) in acc.iter_mut().zip(rest) {
        *a += f(v);
    }
    acc.iter().sum()
}

/// `sum f(x[i], y[i])` in f64 over two slices of one length, in the fixed lane order.
#[inline]
pub(crate) fn lane_sum2(x: &[f32], y: &[f32], f: impl Fn(f32, f32) -> f64) -> f64 {
    debug_assert_eq!(x.len(), y.len());
    let mut acc = [0f64; LANES];
    let (cx, cy) = (x.chunks_exact(LANES), y.chunks_exact(LANES));
    let (rx, ry) = (cx.remainder(), cy.remainder());
    for (a, b) in cx.zip(cy) {
        for j in 0..LANES {
            acc[j] += f(a[j], b[j]);
        }
    }
    for ((s, &a), &b) in acc.iter_mut().zip(rx).zip(ry) {
        *s += f(a, b);
    }
    acc.iter().sum()
}

/// The largest element (NaNs ignored, like `f32::max`; `-inf` for an empty slice), in lanes.
#[inline]
pub(crate) fn lane_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..LANES {
            acc[j] = if c[j] > acc[j] { c[j] } else { acc[j] };
        }
    }
    for (a, &v) in acc.iter_mut().zip(rest) {
        *a = if v > *a { v } else { *a };
    }
    acc.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_reductions_match_plain_loops() {
        // The lane order itself: element i into lane i % 8, lanes added in order, whatever the
        // blocking (so a result never depends on how the loop is cut).
        let in_lanes = |x: &[f32], f: &dyn Fn(usize) -> f64| {
            let mut acc = [0f64; LANES];
            (0..x.len()).for_each(|i| acc[i % LANES] += f(i));
            acc.iter().sum::<f64>()
        };
        for n in [0, 1, 7, 8, 9, 63, 255, 256, 257, 1000, 4099] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1009) as f32 - 500.0) / 3.0).collect();
            let y: Vec<f32> = (0..n).map(|i| (i % 17) as f32 / 7.0).collect();
            assert_eq!(lane_sum(&x, |v| v as f64 * 1.1), in_lanes(&x, &|i| x[i] as f64 * 1.1), "n={n}");
            let d = |a: f32, b: f32| ((a - b) as f64).powi(2);
            assert_eq!(lane_sum2(&x, &y, d), in_lanes(&x, &|i| d(x[i], y[i])), "n={n}");
        }
        for n in [0, 1, 7, 8, 9, 63, 1000] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
            let y: Vec<f32> = (0..n).map(|i| (i % 13) as f32 / 3.0).collect();
            let plain: f64 = x.iter().map(|&v| v as f64).sum();
            assert!((lane_sum(&x, |v| v as f64) - plain).abs() < 1e-9 * (1.0 + plain.abs()), "sum n={n}");
            let sq: f64 = x.iter().zip(&y).map(|(&a, &b)| ((a - b) as f64).powi(2)).sum();
            let got = lane_sum2(&x, &y, |a, b| ((a - b) as f64).powi(2));
            assert!((got - sq).abs() < 1e-9 * (1.0 + sq), "sum2 n={n}");
            assert_eq!(lane_max(&x), x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)), "max n={n}");
        }
        let mut x = vec![1.0f32, f32::NAN, 3.0, -2.0];
        assert_eq!(lane_max(&x), 3.0, "NaN ignored");
        x.extend([f32::NAN; 9]);
        assert_eq!(lane_max(&x), 3.0, "NaN ignored in the lanes");
    }
}
