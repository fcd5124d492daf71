//! Reductions: column sums (the bias gradient), the scaled sum of K buffers (gradient
//! reduction and averaging), axpy and scale, and sums and the L2 norm in a fixed order, so a
//! result depends only on the data, never on the thread count or timing.
//! CUDA: `kernels/reduce.cu` (512 fixed blocks of partial sums, then one block).

use cudarc::driver::{CudaView, CudaViewMut, DevicePtr, LaunchConfig};
use rayon::prelude::*;

use crate::backend::cpu::{lane_sum, wide, CpuDevice, CHUNK};
use crate::backend::cuda::CudaDevice;
use crate::backend::sim::{SimDevice, SimView, SimViewMut};
use crate::backend::{check_len, Backend};
use crate::error::{Error, Result};
use crate::kernels::consts;
use crate::ops::{as_i32, as_i64, as_u32, elementwise_cfg};

/// Reductions and BLAS-1 updates.
pub trait ReduceOps: Backend {
    /// `out[j] = beta*out[j] + sum_i x[i, j]` for `x` rows x cols (`beta = 0`: `out` not read).
    fn col_sum(
        &self,
        rows: usize,
        cols: usize,
        x: &Self::Ref<'_, f32>,
        beta: f32,
        out: &mut Self::Mut<'_, f32>,
    ) -> Result<()>;
    /// `out = scale * (srcs[0] + srcs[1] + ...)`, summed in that order.
    fn sum_scaled(&self, srcs: &[&Self::Ref<'_, f32>], scale: f32, out: &mut Self::Mut<'_, f32>) -> Result<()>;
    /// `y += a*x`.
    fn axpy(&self, a: f32, x: &Self::Ref<'_, f32>, y: &mut Self::Mut<'_, f32>) -> Result<()>;
    /// `x *= a`.
    fn scale(&self, a: f32, x: &mut Self::Mut<'_, f32>) -> Result<()>;
    /// The sum of `x` (of `x*x` when `squared`), in a fixed order.
    fn sum(&self, x: &Self::Ref<'_, f32>, squared: bool) -> Result<f32>;
    /// The L2 norm of `x`, deterministic.
    fn l2_norm(&self, x: &Self::Ref<'_, f32>) -> Result<f32> {
        Ok(self.sum(x, true)?.sqrt())
    }
}

impl ReduceOps for CpuDevice {
    fn col_sum(&self, rows: usize, cols: usize, x: &&[f32], beta: f32, out: &mut &mut [f32]) -> Result<()> {
        check_len("col_sum", &format!("x ({rows}x{cols})"), x.len(), rows * cols)?;
        check_len("col_sum", "out", out.len(), cols)?;
        if cols == 0 {
            return Ok(());
        }
        // Fixed row blocks, summed in order: the result does not depend on the thread count.
        let rows_per = (CHUNK / cols).max(1);
        let partials: Vec<Vec<f32>> = x
            .par_chunks(rows_per * cols)
            .map(|blk| {
                let mut acc = vec![0f32; cols];
                wide(|| {
                    for row in blk.chunks(cols) {
                        acc.iter_mut().zip(row).for_each(|(a, v)| *a += v);
                    }
                });
                acc
            })
            .collect();
        for (j, o) in out.iter_mut().enumerate() {
            let mut s = if beta == 0.0 { 0.0 } else { beta * *o };
            for p in &partials {
                s += p[j];
            }
            *o = s;
        }
        Ok(())
    }

    fn sum_scaled(&self, srcs: &[&&[f32]], scale: f32, out: &mut &mut [f32]) -> Result<()> {
        if srcs.is_empty() {
            return Err(Error::shape("sum_scaled", "no source buffer given"));
        }
        for (i, s) in srcs.iter().enumerate() {
            check_len("sum_scaled", &format!("source {i}"), s.len(), out.len())?;
        }
        out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
            let range = c * CHUNK..c * CHUNK + o.len();
            o.copy_from_slice(&srcs[0][range.clone()]);
            for s in &srcs[1..] {
                o.iter_mut().zip(&s[range.clone()]).for_each(|(o, v)| *o += v);
            }
            o.iter_mut().for_each(|o| *o *= scale);
        });
        Ok(())
    }

    fn axpy(&self, a: f32, x: &&[f32], y: &mut &mut [f32]) -> Result<()> {
        check_len("axpy", "y", y.len(), x.len())?;
        y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(y, x)| {
            wide(|| y.iter_mut().zip(x).for_each(|(y, x)| *y += a * x));
        });
        Ok(())
    }

    fn scale(&self, a: f32, x: &mut &mut [f32]) -> Result<()> {
        x.par_chunks_mut(CHUNK).for_each(|x| x.iter_mut().for_each(|v| *v *= a));
        Ok(())
    }

    fn sum(&self, x: &&[f32], squared: bool) -> Result<f32> {
        let parts: Vec<f64> = x
            .par_chunks(CHUNK)
            .map(|c| wide(|| if squared { lane_sum(c, |v| v as f64 * v as f64) } else { lane_sum(c, |v| v as f64) }))
            .collect();
        Ok(parts.iter().sum::<f64>() as f32)
    }
}

/// The launches of a column sum of `rows x cols`: `segments`, when the input is tall enough for
/// two passes, is the per-segment pass and its segment count; `last` sums (the segments, or the
/// rows) into the output. One pass for short inputs and for inputs too tall for a grid of
/// segments (grid.y <= 65535): both choices depend only on the shape. A pure function,
/// unit-tested at the edges.
pub(crate) struct ColSumLaunch {
    pub(crate) segments: Option<(LaunchConfig, usize)>,
    pub(crate) last: LaunchConfig,
}

/// The launch `partial_sum` and `mse_partial` are written for: a fixed grid of
/// `REDUCE_BLOCKS` blocks, each writing one partial (grid-stride over any n, 64-bit indices).
pub(crate) fn partial_sum_launch() -> LaunchConfig {
    LaunchConfig {
        grid_dim: (consts::REDUCE_BLOCKS as u32, 1, 1),
        block_dim: (consts::REDUCE_THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The launch `final_sum` is written for: one block, whatever the number of partials.
pub(crate) fn final_sum_launch() -> LaunchConfig {
    LaunchConfig { grid_dim: (1, 1, 1), block_dim: (consts::REDUCE_THREADS as u32, 1, 1), shared_mem_bytes: 0 }
}

pub(crate) fn col_sum_launch(rows: usize, cols: usize) -> Result<ColSumLaunch> {
    let col_blocks = as_u32("col_sum", "column blocks", cols.div_ceil(consts::COLSUM_COLS as usize))?;
    let block_dim = (consts::COLSUM_COLS as u32, consts::COLSUM_ROWS as u32, 1);
    let last = LaunchConfig { grid_dim: (col_blocks, 1, 1), block_dim, shared_mem_bytes: 0 };
    let segs = rows.div_ceil(consts::COLSUM_SEG as usize);
    if rows < consts::COLSUM_TWO_PASS_ROWS as usize || segs > 65535 {
        return Ok(ColSumLaunch { segments: None, last });
    }
    let seg = LaunchConfig { grid_dim: (col_blocks, segs as u32, 1), block_dim, shared_mem_bytes: 0 };
    Ok(ColSumLaunch { segments: Some((seg, segs)), last })
}

/// The GPU side, written once for the CUDA device and the simulator: the same launches of the
/// same kernels, over `CudaView`s or `SimView`s.
macro_rules! gpu_impl {
    ($dev:ident, $view:ident, $view_mut:ident) => {
        impl $dev {
            /// Runs `partial_sum`-shaped kernel output through `final_sum` and downloads the scalar.
            pub(crate) fn finish_sum(&self, partials: &$view<'_, f32>, scale: f32) -> Result<f32> {
                let mut out = self.alloc::<f32>(1)?;
                let m = as_i32("sum", "partials", partials.len())?;
                let cfg = final_sum_launch();
                // SAFETY: partials holds m elements, out one; final_sum runs as one block.
                unsafe {
                    self.kernels().reduce.final_sum(self.stream(), cfg, m, partials, scale, &mut out.as_view_mut())
                }
                .map_err(Error::driver("launching final_sum"))?;
                Ok(self.download(&out.as_view())?[0])
            }
        }

        impl ReduceOps for $dev {
            fn col_sum(
                &self,
                rows: usize,
                cols: usize,
                x: &$view<'_, f32>,
                beta: f32,
                out: &mut $view_mut<'_, f32>,
            ) -> Result<()> {
                check_len("col_sum", &format!("x ({rows}x{cols})"), x.len(), rows * cols)?;
                check_len("col_sum", "out", out.len(), cols)?;
                if cols == 0 {
                    return Ok(());
                }
                let (r, c) = (as_i32("col_sum", "rows", rows)?, as_i32("col_sum", "cols", cols)?);
                let launch = col_sum_launch(rows, cols)?;
                let cfg = launch.last;
                let Some((seg_cfg, segs)) = launch.segments else {
                    // SAFETY: x holds rows*cols, out cols elements (checked); grid covers cols in 32s.
                    return unsafe { self.kernels().reduce.col_sum(self.stream(), cfg, r, c, x, beta, out) }
                        .map_err(Error::driver("launching col_sum"));
                };
                // Tall: per-segment partials (one block per 32 columns x 64 rows), then their column sums.
                let mut partials = self.alloc::<f32>(segs * cols)?;
                // SAFETY: x holds rows*cols elements, partials segs*cols; block (bx, s) reads rows
                // [64 s, min(rows, 64 s + 64)) of columns [32 bx, 32 bx + 32) below cols, and
                // writes partials[s*cols + j] for those columns.
                unsafe {
                    self.kernels().reduce.col_sum_seg(self.stream(), seg_cfg, r, c, x, &mut partials.as_view_mut())
                }
                .map_err(Error::driver("launching col_sum_seg"))?;
                // SAFETY: partials holds segs*cols, out cols elements; grid covers cols in 32s.
                unsafe {
                    self.kernels().reduce.col_sum(self.stream(), cfg, segs as i32, c, &partials.as_view(), beta, out)
                }
                .map_err(Error::driver("launching col_sum"))
            }

            fn sum_scaled(&self, srcs: &[&$view<'_, f32>], scale: f32, out: &mut $view_mut<'_, f32>) -> Result<()> {
                if srcs.is_empty() {
                    return Err(Error::shape("sum_scaled", "no source buffer given"));
                }
                for (i, s) in srcs.iter().enumerate() {
                    check_len("sum_scaled", &format!("source {i}"), s.len(), out.len())?;
                }
                // The table of device pointers. The guards keep each source's read recorded until the
                // launch is queued, so its stream waits for this kernel before writing it again.
                let mut guards = Vec::with_capacity(srcs.len());
                let ptrs: Vec<u64> = srcs
                    .iter()
                    .map(|v| {
                        let (p, guard) = v.device_ptr(self.stream());
                        guards.push(guard);
                        p
                    })
                    .collect();
                let table = self.stream().clone_htod(&ptrs).map_err(Error::driver("uploading a pointer table"))?;
                let k = as_i32("sum_scaled", "sources", srcs.len())?;
                let n = as_i64("sum_scaled", "n", out.len())?;
                let cfg = elementwise_cfg(out.len(), self.sms());
                // SAFETY: the table holds k device pointers, each to n floats on this context (checked
                // lengths); the table is freed in stream order after the launch.
                unsafe { self.kernels().reduce.sum_scaled(self.stream(), cfg, k, n, &table.as_view(), scale, out) }
                    .map_err(Error::driver("launching sum_scaled"))?;
                drop(guards);
                Ok(())
            }

            fn axpy(&self, a: f32, x: &$view<'_, f32>, y: &mut $view_mut<'_, f32>) -> Result<()> {
                check_len("axpy", "y", y.len(), x.len())?;
                let n = as_i64("axpy", "n", x.len())?;
                // SAFETY: x and y hold n elements; grid-stride kernel.
                unsafe { self.kernels().reduce.axpy(self.stream(), elementwise_cfg(x.len(), self.sms()), n, a, x, y) }
                    .map_err(Error::driver("launching axpy"))
            }

            fn scale(&self, a: f32, x: &mut $view_mut<'_, f32>) -> Result<()> {
                let n = as_i64("scale", "n", x.len())?;
                let cfg = elementwise_cfg(x.len(), self.sms());
                // SAFETY: x holds n elements; grid-stride kernel.
                unsafe { self.kernels().reduce.scale(self.stream(), cfg, n, a, x) }
                    .map_err(Error::driver("launching scale"))
            }

            fn sum(&self, x: &$view<'_, f32>, squared: bool) -> Result<f32> {
                let mut partials = self.alloc::<f32>(consts::REDUCE_BLOCKS as usize)?;
                let n = as_i64("sum", "n", x.len())?;
                // SAFETY: x holds n elements; partials one per block of the fixed grid.
                unsafe {
                    self.kernels().reduce.partial_sum(
                        self.stream(),
                        partial_sum_launch(),
                        n,
                        squared as i32,
                        x,
                        &mut partials.as_view_mut(),
                    )
                }
                .map_err(Error::driver("launching partial_sum"))?;
                self.finish_sum(&partials.as_view(), 1.0)
            }
        }
    };
}

gpu_impl!(CudaDevice, CudaView, CudaViewMut);
gpu_impl!(SimDevice, SimView, SimViewMut);

#[cfg(test)]
mod launch_tests {
    use crate::kernels::consts;

    /// One pass below the two-pass threshold and above grid.y's segments, two between; every
    /// column covered, cols near 2^31 included.
    #[test]
    fn col_sum_launches_stay_within_the_grid() {
        let (two, seg) = (consts::COLSUM_TWO_PASS_ROWS as usize, consts::COLSUM_SEG as usize);
        let l = super::col_sum_launch(1, 1).unwrap();
        assert!(l.segments.is_none());
        assert_eq!(l.last.grid_dim, (1, 1, 1));
        assert!(super::col_sum_launch(two - 1, 512).unwrap().segments.is_none());
        let l = super::col_sum_launch(two, 512).unwrap();
        let (s, n) = l.segments.expect("two passes at the threshold");
        assert_eq!((s.grid_dim.1 as usize, n), (two.div_ceil(seg), two.div_ceil(seg)));
        assert!(super::col_sum_launch(65536 * seg, 4).unwrap().segments.is_none(), "segments beyond grid.y");
        let l = super::col_sum_launch(65535 * seg, 4).unwrap();
        assert_eq!(l.segments.unwrap().1, 65535);
        let cols = (1usize << 31) - 1;
        let l = super::col_sum_launch(3, cols).unwrap();
        assert!(l.last.grid_dim.0 as usize * consts::COLSUM_COLS as usize >= cols);
    }

    /// The fixed-shape reductions launch the block size their kernels' `__launch_bounds__`
    /// declare: `partial_sum` and `mse_partial` a fixed grid of partials that `final_sum`'s one
    /// block reduces; the grid-stride ones (`sum_scaled`, `axpy`, `scale`, `mse_bwd`, split-K's
    /// reduce) the elementwise block. Sizes beyond the kernels' index types are refused.
    #[test]
    fn fixed_shape_reductions_launch_what_their_kernels_are_written_for() {
        let bounds = |name: &str| {
            crate::kernels::KERNELS.iter().find(|k| k.name == name).and_then(|k| k.launch_bounds()).map(|b| b.0)
        };
        let p = super::partial_sum_launch();
        assert_eq!(p.grid_dim, (consts::REDUCE_BLOCKS as u32, 1, 1));
        let f = super::final_sum_launch();
        assert_eq!(f.grid_dim, (1, 1, 1));
        for (name, cfg) in [("partial_sum", p), ("mse_partial", p), ("final_sum", f)] {
            if let Some(t) = bounds(name) {
                assert_eq!(cfg.block_dim, (t, 1, 1), "{name}");
            }
        }
        // final_sum takes the partials' count as an int.
        assert!(super::as_i32("sum", "partials", consts::REDUCE_BLOCKS as usize).is_ok());
        let ew = crate::ops::elementwise_cfg(1 << 40, 132);
        for name in ["sum_scaled", "axpy", "scale", "mse_bwd", "gemm_splitk_reduce"] {
            if let Some(t) = bounds(name) {
                assert_eq!(ew.block_dim, (t, 1, 1), "{name}");
            }
        }
        // n is a long long: any buffer length up to 2^63 - 1, and not beyond.
        assert!(super::as_i64("sum", "n", (1usize << 63) - 1).is_ok());
        let e = super::as_i64("sum", "n", usize::MAX).unwrap_err().to_string();
        assert!(e.contains("sum"), "{e}");
    }
}
