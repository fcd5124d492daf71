//! Losses: softmax cross-entropy (mean over the batch, stable for large logits) with its fused
//! backward, and mean squared error. A label outside `0..classes` is an error, never a read
//! out of bounds. CUDA: `kernels/loss.cu`, one warp per row.

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig};
use rayon::prelude::*;

use crate::backend::cpu::math::fast_exp;
use crate::backend::cpu::{lane_max, lane_sum, lane_sum2, wide, CpuDevice, CHUNK};
use crate::backend::cuda::CudaDevice;
use crate::backend::sim::{SimDevice, SimView, SimViewMut};
use crate::backend::{check_len, Backend};
use crate::error::{Error, Result};
use crate::kernels::consts;
use crate::ops::reduce::ReduceOps;
use crate::ops::{as_i32, as_i64, as_u32, elementwise_cfg};

/// Loss functions. Each returns the mean loss.
pub trait LossOps: Backend {
    /// Mean softmax cross-entropy of `logits` (rows x cols) against class `labels` (rows).
    fn xent(&self, rows: usize, cols: usize, logits: &Self::Ref<'_, f32>, labels: &Self::Ref<'_, i32>) -> Result<f32>;
    /// The same, and `dlogits = (softmax(logits) - onehot(labels)) / rows` in the same pass.
    fn xent_backward(
        &self,
        rows: usize,
        cols: usize,
        logits: &Self::Ref<'_, f32>,
        labels: &Self::Ref<'_, i32>,
        dlogits: &mut Self::Mut<'_, f32>,
    ) -> Result<f32> {
        self.xent_backward_scaled(rows, cols, logits, labels, 1.0 / rows.max(1) as f32, dlogits)
    }
    /// The general form: `dlogits = scale * (softmax - onehot)`, returns `scale * sum of row
    /// losses`. With `scale = 1 / (rows of the whole batch)` each microbatch of a split batch
    /// contributes exactly its share to the batch's mean loss and gradient.
    fn xent_backward_scaled(
        &self,
        rows: usize,
        cols: usize,
        logits: &Self::Ref<'_, f32>,
        labels: &Self::Ref<'_, i32>,
        scale: f32,
        dlogits: &mut Self::Mut<'_, f32>,
    ) -> Result<f32>;
    /// [`LossOps::xent_backward_scaled`] with nothing read back, so the host does not wait:
    /// `loss[0] = scale * sum of row losses` stays on the device. `row_loss` (`rows` elements) is
    /// scratch; `err[0]`, zero before the first call, gets 1 + a row whose label is out of range
    /// and keeps it (devices that can check at once return [`Error::Label`] instead).
    #[allow(clippy::too_many_arguments)]
    fn xent_backward_to(
        &self,
        rows: usize,
        cols: usize,
        logits: &Self::Ref<'_, f32>,
        labels: &Self::Ref<'_, i32>,
        scale: f32,
        dlogits: &mut Self::Mut<'_, f32>,
        row_loss: &mut Self::Mut<'_, f32>,
        loss: &mut Self::Mut<'_, f32>,
        err: &mut Self::Mut<'_, i32>,
    ) -> Result<()> {
        let _ = (row_loss, err);
        let l = self.xent_backward_scaled(rows, cols, logits, labels, scale, dlogits)?;
        self.write(loss, &[l])
    }
    /// Mean squared error `mean((pred - target)^2)` over all elements.
    fn mse(&self, pred: &Self::Ref<'_, f32>, target: &Self::Ref<'_, f32>) -> Result<f32>;
    /// The same, and `dpred = 2 (pred - target) / n`.
    fn mse_backward(
        &self,
        pred: &Self::Ref<'_, f32>,
        target: &Self::Ref<'_, f32>,
        dpred: &mut Self::Mut<'_, f32>,
    ) -> Result<f32>;
    /// One rank's part of a vocabulary-parallel softmax cross-entropy: `logits` holds columns
    /// `first..first + cols` of each of `rows` rows of a `rows x vocab` matrix, `labels` the
    /// rows' classes in `0..vocab`. Writes `stats` (`rows x (slots + 1)`): this rank's log-sum-exp
    /// in slot `slot` (zeros in the others, up to `slots`), and in the last column the label's
    /// logit where the label is this rank's, else 0. Summed over the group's `slots` ranks, they
    /// give [`LossOps::xent_part_backward`] what it needs.
    #[allow(clippy::too_many_arguments)]
    fn xent_part_stats(
        &self,
        rows: usize,
        cols: usize,
        first: usize,
        vocab: usize,
        slot: (usize, usize),
        logits: &Self::Ref<'_, f32>,
        labels: &Self::Ref<'_, i32>,
        stats: &mut Self::Mut<'_, f32>,
    ) -> Result<()>;
    /// From the group's summed `stats` ([`LossOps::xent_part_stats`]): `row_loss[r] =
    /// logsumexp(row) - logit[label]`, this rank's columns of `dlogits = scale * (softmax -
    /// onehot)`, and `loss[0] = scale * sum of row_loss` (left on the device).
    #[allow(clippy::too_many_arguments)]
    fn xent_part_backward(
        &self,
        rows: usize,
        cols: usize,
        first: usize,
        slots: usize,
        logits: &Self::Ref<'_, f32>,
        labels: &Self::Ref<'_, i32>,
        stats: &Self::Ref<'_, f32>,
        scale: f32,
        dlogits: &mut Self::Mut<'_, f32>,
        row_loss: &mut Self::Mut<'_, f32>,
        loss: &mut Self::Mut<'_, f32>,
    ) -> Result<()>;
}

/// Shapes of a vocabulary-parallel part, checked.
#[allow(clippy::too_many_arguments)]
fn check_xent_part(
    rows: usize,
    cols: usize,
    first: usize,
    vocab: usize,
    slots: usize,
    logits: usize,
    labels: usize,
    stats: usize,
) -> Result<()> {
    if first + cols > vocab || slots == 0 {
        return Err(Error::shape(
            "cross-entropy",
            format!("a part of {cols} classes from {first} in {vocab}, over {slots} ranks"),
        ));
    }
    check_len("cross-entropy", &format!("logits ({rows}x{cols})"), logits, rows * cols)?;
    check_len("cross-entropy", "labels (one per row)", labels, rows)?;
    check_len("cross-entropy", &format!("stats ({rows}x{})", slots + 1), stats, rows * (slots + 1))
}

fn check_xent(rows: usize, cols: usize, logits: usize, labels: usize) -> Result<()> {
    if cols == 0 {
        return Err(Error::shape("cross-entropy", "logits have 0 classes"));
    }
    check_len("cross-entropy", &format!("logits ({rows}x{cols})"), logits, rows * cols)?;
    check_len("cross-entropy", "labels (one per row)", labels, rows)
}

/// Loss of one row; writes the scaled gradient when `grad` is given (one `exp` per element:
/// the exponentials are kept in the gradient row, then normalised).
/// The max and the sums run in independent lanes (`lane_max`, `lane_sum`), so they vectorise.
/// The sum of the other classes' terms is kept apart from the label's, so that a row whose label
/// holds (nearly) the largest logit, whose loss is small, is `log1p(others)` with no cancellation
/// ([`row_loss`]).
#[inline(always)]
fn xent_row(row: &[f32], label: i32, grad: Option<(&mut [f32], f32)>) -> f32 {
    let l = label as usize;
    let max = lane_max(row);
    // (max - x[label]) is exact for nearby floats; adding max first would round at large logits.
    let d = max - row[l];
    match grad {
        Some((g, scale)) => {
            for (g, &x) in g.iter_mut().zip(row.iter()) {
                *g = fast_exp(x - max);
            }
            let el = g[l];
            let others = lane_sum(&g[..l], |e| e as f64) + lane_sum(&g[l + 1..], |e| e as f64);
            let sum = (others + el as f64) as f32;
            let k = scale / sum;
            g.iter_mut().for_each(|g| *g *= k);
            g[l] -= scale;
            row_loss(d, others, sum)
        }
        None => {
            let f = |x: f32| fast_exp(x - max) as f64;
            let others = lane_sum(&row[..l], f) + lane_sum(&row[l + 1..], f);
            row_loss(d, others, (others + fast_exp(row[l] - max) as f64) as f32)
        }
    }
}

/// `log(sum_c exp(x_c - max)) + (max - x_label)` from `d = max - x_label`, the sum of the other
/// classes' `exp(x_c - max)` and the whole sum: `log1p(others * e^d)` while `d` is small (the loss
/// is then small and `log(sum)` would cancel against `d`), `d + log(sum)` above (the loss is then
/// at least `d`, and `others * e^d` could overflow).
#[inline(always)]
fn row_loss(d: f32, others: f64, sum: f32) -> f32 {
    if d <= 16.0 {
        (others * (d as f64).exp()).ln_1p() as f32
    } else {
        d + sum.ln()
    }
}

fn first_bad_label(labels: &[i32], cols: usize) -> Option<(usize, i32)> {
    labels.iter().enumerate().find(|(_, &l)| l < 0 || l as usize >= cols).map(|(r, &l)| (r, l))
}

impl LossOps for CpuDevice {
    fn xent_part_stats(
        &self,
        rows: usize,
        cols: usize,
        first: usize,
        vocab: usize,
        slot: (usize, usize),
        logits: &&[f32],
        labels: &&[i32],
        stats: &mut &mut [f32],
    ) -> Result<()> {
        let (k, slots) = slot;
        check_xent_part(rows, cols, first, vocab, slots, logits.len(), labels.len(), stats.len())?;
        if k >= slots {
            return Err(Error::shape("cross-entropy", format!("slot {k} of {slots}")));
        }
        stats.par_chunks_mut(slots + 1).enumerate().for_each(|(r, st)| {
            let x = &logits[r * cols..(r + 1) * cols];
            let label = labels[r];
            let mx = x.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
            let s: f64 = if mx == f32::NEG_INFINITY { 0.0 } else { x.iter().map(|&v| ((v - mx) as f64).exp()).sum() };
            st.fill(0.0);
            st[k] = if label < 0 || label as usize >= vocab {
                f32::NAN
            } else if mx == f32::NEG_INFINITY {
                f32::NEG_INFINITY
            } else {
                mx + (s.ln() as f32)
            };
            let l = label as i64 - first as i64;
            st[slots] = if l >= 0 && (l as usize) < cols { x[l as usize] } else { 0.0 };
        });
        Ok(())
    }

    fn xent_part_backward(
        &self,
        rows: usize,
        cols: usize,
        first: usize,
        slots: usize,
        logits: &&[f32],
        labels: &&[i32],
        stats: &&[f32],
        scale: f32,
        dlogits: &mut &mut [f32],
        row_loss: &mut &mut [f32],
        loss: &mut &mut [f32],
    ) -> Result<()> {
        check_xent_part(rows, cols, first, first + cols, slots, logits.len(), labels.len(), stats.len())?;
        check_len("cross-entropy", "dlogits", dlogits.len(), rows * cols)?;
        check_len("cross-entropy", "row_loss", row_loss.len(), rows)?;
        check_len("cross-entropy", "loss", loss.len(), 1)?;
        let lse: Vec<f32> = stats
            .chunks(slots + 1)
            .map(|st| {
                let part = &st[..slots];
                if part.iter().any(|v| v.is_nan()) {
                    return f32::NAN;
                }
                let mx = part.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let s: f64 = part.iter().filter(|v| **v != f32::NEG_INFINITY).map(|&v| ((v - mx) as f64).exp()).sum();
                mx + s.ln() as f32
            })
            .collect();
        for (r, l) in row_loss.iter_mut().enumerate() {
            *l = lse[r] - stats[r * (slots + 1) + slots];
        }
        // (A rank without classes has no columns to write.)
        dlogits.par_chunks_mut(cols.max(1)).enumerate().for_each(|(r, d)| {
            let x = &logits[r * cols..(r + 1) * cols];
            let label = labels[r] as i64 - first as i64;
            for (c, (d, &v)) in d.iter_mut().zip(x).enumerate() {
                *d = scale * ((v - lse[r]).exp() - if c as i64 == label { 1.0 } else { 0.0 });
            }
        });
        loss[0] = scale * row_loss.iter().map(|&v| v as f64).sum::<f64>() as f32;
        Ok(())
    }
    fn xent(&self, rows: usize, cols: usize, logits: &&[f32], labels: &&[i32]) -> Result<f32> {
        check_xent(rows, cols, logits.len(), labels.len())?;
        if let Some((row, label)) = first_bad_label(labels, cols) {
            return Err(Error::Label { row, label: label as i64, classes: cols });
        }
        let losses: Vec<f32> =
            logits.par_chunks(cols).zip(labels.par_iter()).map(|(r, &l)| wide(|| xent_row(r, l, None))).collect();
        Ok(self.sum(&losses.as_slice(), false)? / rows.max(1) as f32)
    }

    fn xent_backward_scaled(
        &self,
        rows: usize,
        cols: usize,
        logits: &&[f32],
        labels: &&[i32],
        scale: f32,
        dlogits: &mut &mut [f32],
    ) -> Result<f32> {
        check_xent(rows, cols, logits.len(), labels.len())?;
        check_len("cross-entropy", "dlogits", dlogits.len(), rows * cols)?;
        if let Some((row, label)) = first_bad_label(labels, cols) {
            return Err(Error::Label { row, label: label as i64, classes: cols });
        }
        let losses: Vec<f32> = logits
            .par_chunks(cols)
            .zip(labels.par_iter())
            .zip(dlogits.par_chunks_mut(cols))
            .map(|((r, &l), g)| wide(|| xent_row(r, l, Some((g, scale)))))
            .collect();
        Ok(self.sum(&losses.as_slice(), false)? * scale)
    }

    fn mse(&self, pred: &&[f32], target: &&[f32]) -> Result<f32> {
        check_len("mse", "target", target.len(), pred.len())?;
        let parts: Vec<f64> = pred
            .par_chunks(CHUNK)
            .zip(target.par_chunks(CHUNK))
            .map(|(p, t)| wide(|| lane_sum2(p, t, |p, t| ((p - t) as f64).powi(2))))
            .collect();
        Ok((parts.iter().sum::<f64>() / pred.len().max(1) as f64) as f32)
    }

    fn mse_backward(&self, pred: &&[f32], target: &&[f32], dpred: &mut &mut [f32]) -> Result<f32> {
        check_len("mse", "dpred", dpred.len(), pred.len())?;
        let loss = self.mse(pred, target)?;
        let scale = 2.0 / pred.len().max(1) as f32;
        dpred.par_chunks_mut(CHUNK).zip(pred.par_chunks(CHUNK).zip(target.par_chunks(CHUNK))).for_each(
            |(d, (p, t))| {
                wide(|| {
                    for ((d, p), t) in d.iter_mut().zip(p).zip(t) {
                        *d = scale * (p - t);
                    }
                })
            },
        );
        Ok(loss)
    }
}

/// The launch of the cross-entropy kernels over `rows` rows: one warp per row, the block size of
/// their `__launch_bounds__`. A pure function of the shape, unit-tested at the edges.
pub(crate) fn xent_launch(rows: usize) -> Result<LaunchConfig> {
    let warps = (consts::XENT_THREADS / 32) as usize;
    Ok(LaunchConfig {
        grid_dim: (as_u32("cross-entropy", "row blocks", rows.div_ceil(warps))?, 1, 1),
        block_dim: (consts::XENT_THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// The GPU side, written once for the CUDA device and the simulator: the same launches of the
/// same kernels, over `CudaView`s or `SimView`s.
macro_rules! gpu_impl {
    ($dev:ident, $view:ident, $view_mut:ident) => {
        impl $dev {
            fn xent_launch(
                &self,
                rows: usize,
                cols: usize,
                logits: &$view<'_, f32>,
                labels: &$view<'_, i32>,
                scale: f32,
                dlogits: Option<&mut $view_mut<'_, f32>>,
            ) -> Result<f32> {
                check_xent(rows, cols, logits.len(), labels.len())?;
                if rows == 0 {
                    return Ok(0.0);
                }
                let mut row_loss = self.alloc::<f32>(rows)?;
                let mut err = self.alloc::<i32>(1)?;
                let cfg = xent_launch(rows)?;
                let (r, c) = (as_i32("cross-entropy", "rows", rows)?, as_i32("cross-entropy", "cols", cols)?);
                let k = &self.kernels().loss;
                let s = self.stream();
                // SAFETY: logits (and dlogits) hold rows*cols, labels and row_loss rows elements, err one
                // (checked or allocated here); one warp per row; labels are range-checked in the kernel.
                let launched = unsafe {
                    match dlogits {
                        Some(d) => k.xent_fwd_bwd(
                            s,
                            cfg,
                            r,
                            c,
                            logits,
                            labels,
                            scale,
                            &mut row_loss.as_view_mut(),
                            d,
                            &mut err.as_view_mut(),
                        ),
                        None => k.xent_fwd(
                            s,
                            cfg,
                            r,
                            c,
                            logits,
                            labels,
                            &mut row_loss.as_view_mut(),
                            &mut err.as_view_mut(),
                        ),
                    }
                };
                launched.map_err(Error::driver("launching cross-entropy"))?;
                let bad = self.download(&err.as_view())?[0];
                if bad != 0 {
                    let row = (bad - 1) as usize;
                    let label = self.download(&labels.slice(row..row + 1))?[0];
                    return Err(Error::Label { row, label: label as i64, classes: cols });
                }
                self.finish_sum(&row_loss.as_view(), scale)
            }
        }

        impl LossOps for $dev {
            fn xent_part_stats(
                &self,
                rows: usize,
                cols: usize,
                first: usize,
                vocab: usize,
                slot: (usize, usize),
                logits: &$view<'_, f32>,
                labels: &$view<'_, i32>,
                stats: &mut $view_mut<'_, f32>,
            ) -> Result<()> {
                let (k, slots) = slot;
                check_xent_part(rows, cols, first, vocab, slots, logits.len(), labels.len(), stats.len())?;
                if k >= slots {
                    return Err(Error::shape("cross-entropy", format!("slot {k} of {slots}")));
                }
                if rows == 0 {
                    return Ok(());
                }
                let what = "cross-entropy";
                let (r, c, f, v) = (
                    as_i32(what, "rows", rows)?,
                    as_i32(what, "cols", cols)?,
                    as_i32(what, "first", first)?,
                    as_i32(what, "vocab", vocab)?,
                );
                let (s32, k32) = (as_i32(what, "slots", slots)?, as_i32(what, "slot", k)?);
                let cfg = xent_launch(rows)?;
                // SAFETY: logits hold rows*cols, labels rows, stats rows*(slots+1) (checked); one
                // warp per row, lane 0 writing the row's stats.
                unsafe {
                    self.kernels().loss.xent_part_stats(self.stream(), cfg, r, c, f, v, s32, k32, logits, labels, stats)
                }
                .map_err(Error::driver("launching xent_part_stats"))
            }

            fn xent_part_backward(
                &self,
                rows: usize,
                cols: usize,
                first: usize,
                slots: usize,
                logits: &$view<'_, f32>,
                labels: &$view<'_, i32>,
                stats: &$view<'_, f32>,
                scale: f32,
                dlogits: &mut $view_mut<'_, f32>,
                row_loss: &mut $view_mut<'_, f32>,
                loss: &mut $view_mut<'_, f32>,
            ) -> Result<()> {
                check_xent_part(rows, cols, first, first + cols, slots, logits.len(), labels.len(), stats.len())?;
                check_len("cross-entropy", "dlogits", dlogits.len(), rows * cols)?;
                check_len("cross-entropy", "row_loss", row_loss.len(), rows)?;
                check_len("cross-entropy", "loss", loss.len(), 1)?;
                let what = "cross-entropy";
                let (r, c, f, s32) = (
                    as_i32(what, "rows", rows)?,
                    as_i32(what, "cols", cols)?,
                    as_i32(what, "first", first)?,
                    as_i32(what, "slots", slots)?,
                );
                if rows > 0 {
                    let cfg = xent_launch(rows)?;
                    // SAFETY: logits and dlogits hold rows*cols, labels and row_loss rows, stats
                    // rows*(slots+1) (checked); one warp per row.
                    unsafe {
                        self.kernels().loss.xent_part_bwd(
                            self.stream(),
                            cfg,
                            r,
                            c,
                            f,
                            s32,
                            logits,
                            labels,
                            stats,
                            scale,
                            row_loss,
                            dlogits,
                        )
                    }
                    .map_err(Error::driver("launching xent_part_bwd"))?;
                }
                let cfg = crate::ops::reduce::final_sum_launch();
                // SAFETY: row_loss holds rows elements, loss one (checked); final_sum runs as one block.
                unsafe { self.kernels().reduce.final_sum(self.stream(), cfg, r, &row_loss.as_view(), scale, loss) }
                    .map_err(Error::driver("launching final_sum"))
            }
            fn xent(&self, rows: usize, cols: usize, logits: &$view<'_, f32>, labels: &$view<'_, i32>) -> Result<f32> {
                self.xent_launch(rows, cols, logits, labels, 1.0 / rows.max(1) as f32, None)
            }

            fn xent_backward_scaled(
                &self,
                rows: usize,
                cols: usize,
                logits: &$view<'_, f32>,
                labels: &$view<'_, i32>,
                scale: f32,
                dlogits: &mut $view_mut<'_, f32>,
            ) -> Result<f32> {
                check_len("cross-entropy", "dlogits", dlogits.len(), rows * cols)?;
                self.xent_launch(rows, cols, logits, labels, scale, Some(dlogits))
            }

            #[allow(clippy::too_many_arguments)]
            fn xent_backward_to(
                &self,
                rows: usize,
                cols: usize,
                logits: &$view<'_, f32>,
                labels: &$view<'_, i32>,
                scale: f32,
                dlogits: &mut $view_mut<'_, f32>,
                row_loss: &mut $view_mut<'_, f32>,
                loss: &mut $view_mut<'_, f32>,
                err: &mut $view_mut<'_, i32>,
            ) -> Result<()> {
                check_xent(rows, cols, logits.len(), labels.len())?;
                check_len("cross-entropy", "dlogits", dlogits.len(), rows * cols)?;
                check_len("cross-entropy", "row_loss", row_loss.len(), rows)?;
                check_len("cross-entropy", "loss", loss.len(), 1)?;
                check_len("cross-entropy", "err", err.len(), 1)?;
                let (r, c) = (as_i32("cross-entropy", "rows", rows)?, as_i32("cross-entropy", "cols", cols)?);
                if rows > 0 {
                    let cfg = xent_launch(rows)?;
                    // SAFETY: logits and dlogits hold rows*cols, labels and row_loss rows elements, err
                    // one (checked); one warp per row; labels are range-checked in the kernel.
                    unsafe {
                        self.kernels().loss.xent_fwd_bwd(
                            self.stream(),
                            cfg,
                            r,
                            c,
                            logits,
                            labels,
                            scale,
                            row_loss,
                            dlogits,
                            err,
                        )
                    }
                    .map_err(Error::driver("launching cross-entropy"))?;
                }
                let cfg = crate::ops::reduce::final_sum_launch();
                // SAFETY: row_loss holds rows elements, loss one (checked); final_sum runs as one block
                // (rows = 0 writes 0).
                unsafe { self.kernels().reduce.final_sum(self.stream(), cfg, r, &row_loss.as_view(), scale, loss) }
                    .map_err(Error::driver("launching final_sum"))
            }

            fn mse(&self, pred: &$view<'_, f32>, target: &$view<'_, f32>) -> Result<f32> {
                check_len("mse", "target", target.len(), pred.len())?;
                let mut partials = self.alloc::<f32>(consts::REDUCE_BLOCKS as usize)?;
                let n = as_i64("mse", "n", pred.len())?;
                // SAFETY: pred and target hold n elements; partials one per block of the fixed grid.
                unsafe {
                    self.kernels().reduce.mse_partial(
                        self.stream(),
                        crate::ops::reduce::partial_sum_launch(),
                        n,
                        pred,
                        target,
                        &mut partials.as_view_mut(),
                    )
                }
                .map_err(Error::driver("launching mse_partial"))?;
                self.finish_sum(&partials.as_view(), 1.0 / pred.len().max(1) as f32)
            }

            fn mse_backward(
                &self,
                pred: &$view<'_, f32>,
                target: &$view<'_, f32>,
                dpred: &mut $view_mut<'_, f32>,
            ) -> Result<f32> {
                check_len("mse", "dpred", dpred.len(), pred.len())?;
                let loss = self.mse(pred, target)?;
                let n = as_i64("mse", "n", pred.len())?;
                let scale = 2.0 / pred.len().max(1) as f32;
                let cfg = elementwise_cfg(pred.len(), self.sms());
                // SAFETY: pred, target and dpred hold n elements; grid-stride kernel.
                unsafe { self.kernels().reduce.mse_bwd(self.stream(), cfg, n, scale, pred, target, dpred) }
                    .map_err(Error::driver("launching mse_bwd"))?;
                Ok(loss)
            }
        }
    };
}

gpu_impl!(CudaDevice, CudaView, CudaViewMut);
gpu_impl!(SimDevice, SimView, SimViewMut);

#[cfg(test)]
mod launch_tests {
    /// One warp per row up to rows near 2^31, in the block size of the kernels' launch bounds.
    #[test]
    fn xent_launches_cover_every_row() {
        let warps = (crate::kernels::consts::XENT_THREADS / 32) as u64;
        for rows in [1usize, 7, 8, 9, 1000, (1 << 31) - 1] {
            let c = super::xent_launch(rows).unwrap();
            assert_eq!(c.grid_dim, ((rows as u64).div_ceil(warps) as u32, 1, 1), "rows = {rows}");
            assert!(c.grid_dim.0 as u64 * warps >= rows as u64);
        }
        for name in ["xent_fwd", "xent_fwd_bwd"] {
            let k = crate::kernels::KERNELS.iter().find(|k| k.name == name).unwrap();
            let want = crate::kernels::consts::XENT_THREADS as u32;
            assert_eq!(super::xent_launch(5).unwrap().block_dim.0, want);
            assert_eq!(k.launch_bounds().map(|b| b.0), Some(want), "{name}");
        }
    }
}
