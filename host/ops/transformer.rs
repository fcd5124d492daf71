//! The transformer's own ops: token + position embedding (forward, and a backward that
//! scatters into the tables deterministically) and LayerNorm (one-pass Welford statistics;
//! backward with its two row reductions fused, and the parameters' gradients as fixed-order
//! column sums), and causal multi-head self-attention fused in the FlashAttention manner (online
//! softmax, no T x T matrix in memory; the backward recomputes the probabilities from the saved
//! log-sum-exp, in a fixed order). CUDA: `kernels/transformer.cu`.
//!
//! Rows are `rows = B * T` positions of `c` channels, row `r` being position `r % T` of
//! sequence `r / T`. Token ids are f32 whole numbers (a model's first input is f32 data).

use cudarc::driver::{CudaView, CudaViewMut, LaunchConfig};
use rayon::prelude::*;

use crate::backend::cpu::math::fast_exp;
use crate::backend::cpu::{lane_sum, wide, CpuDevice};
use crate::backend::cuda::CudaDevice;
use crate::backend::sim::{SimDevice, SimView, SimViewMut};
use crate::backend::{check_len, Backend, ViewLen};
use crate::error::{Error, Result};
use crate::kernels::consts;
use crate::ops::{as_i32, as_u32};

/// Rows per partial sum of the CPU's LayerNorm parameter gradients.
const LN_BLOCK_ROWS: usize = 64;

/// The LayerNorm epsilon of PyTorch and GPT-2.
pub const LAYERNORM_EPS: f32 = 1e-5;

/// Which rows of a `vocab x c` token table a part holds (a vocabulary-parallel rank's: rows
/// `first..first + rows of the part`), and whether it adds the positions (one rank of a group
/// does, so that the parts sum to the whole embedding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VocabPart {
    /// The first token of the part.
    pub first: usize,
    /// Tokens of the whole table (ids must lie in `0..vocab`).
    pub vocab: usize,
    /// Whether this part adds the position embedding.
    pub positions: bool,
}

/// Embedding and LayerNorm.
pub trait TransformerOps: Backend {
    /// `out[r, :] = wte[ids[r], :] + wpe[r % t, :]` for `rows = ids.len()` rows of `c` channels:
    /// `wte` holds a `vocab x c` token table, `wpe` at least `t x c` positions. An id that is not a
    /// whole number in `0..vocab` is an error on the CPU and a NaN row on a GPU (which cannot
    /// report it without waiting): check ids on the host, where they come from.
    #[allow(clippy::too_many_arguments)]
    fn embed_forward(
        &self,
        t: usize,
        c: usize,
        ids: &Self::Ref<'_, f32>,
        wte: &Self::Ref<'_, f32>,
        wpe: &Self::Ref<'_, f32>,
        out: &mut Self::Mut<'_, f32>,
    ) -> Result<()> {
        let part = VocabPart { first: 0, vocab: wte.view_len() / c.max(1), positions: true };
        self.embed_forward_part(t, c, part, ids, wte, wpe, out)
    }
    /// [`TransformerOps::embed_forward`] with a part of the token table (`wte` holds rows
    /// `part.first..` of a `part.vocab x c` table): a token outside the part takes a zero row,
    /// and the positions are added only if `part.positions`. The parts of a table, summed, give
    /// the whole embedding (the first with positions): a vocabulary-parallel embedding.
    #[allow(clippy::too_many_arguments)]
    fn embed_forward_part(
        &self,
        t: usize,
        c: usize,
        part: VocabPart,
        ids: &Self::Ref<'_, f32>,
        wte: &Self::Ref<'_, f32>,
        wpe: &Self::Ref<'_, f32>,
        out: &mut Self::Mut<'_, f32>,
    ) -> Result<()>;
    /// The tables' gradients from `dout` (`rows x c`): `dwte = keep.0 * dwte + ` the sum of the
    /// rows of each token, `dwpe[p] = keep.1 * dwpe[p] + ` the sum over sequences of position
    /// `p`'s rows (the first `t` rows of `dwpe`; the rest untouched). Sums run in row order,
    /// whatever the device: the same bits every run. A keep of 0: the old values are not read.
    #[allow(clippy::too_many_arguments)]
    fn embed_backward(
        &self,
        t: usize,
        c: usize,
        ids: &Self::Ref<'_, f32>,
        dout: &Self::Ref<'_, f32>,
        keep: (f32, f32),
        dwte: &mut Self::Mut<'_, f32>,
        dwpe: &mut Self::Mut<'_, f32>,
    ) -> Result<()> {
        let part = VocabPart { first: 0, vocab: dwte.view_len() / c.max(1), positions: true };
        self.embed_backward_part(t, c, part, ids, dout, keep, dwte, dwpe)
    }
    /// [`TransformerOps::embed_backward`] for a part of the token table: `dwte` holds the
    /// gradient of rows `part.first..` only (each summing its token's rows); `dwpe` as there
    /// (whole, whatever the part).
    #[allow(clippy::too_many_arguments)]
    fn embed_backward_part(
        &self,
        t: usize,
        c: usize,
        part: VocabPart,
        ids: &Self::Ref<'_, f32>,
        dout: &Self::Ref<'_, f32>,
        keep: (f32, f32),
        dwte: &mut Self::Mut<'_, f32>,
        dwpe: &mut Self::Mut<'_, f32>,
    ) -> Result<()>;
    /// LayerNorm over rows of `c`: `y = (x - mean) / sqrt(var + eps) * gamma + beta` with the
    /// biased variance; `mean` and `rstd` (one per row) are kept for the backward.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_forward(
        &self,
        c: usize,
        eps: f32,
        x: &Self::Ref<'_, f32>,
        gamma: &Self::Ref<'_, f32>,
        beta: &Self::Ref<'_, f32>,
        y: &mut Self::Mut<'_, f32>,
        mean: &mut Self::Mut<'_, f32>,
        rstd: &mut Self::Mut<'_, f32>,
    ) -> Result<()>;
    /// Causal self-attention over `heads` heads of `qkv` (`rows x 3c`: q, k and v side by side, as
    /// one projection makes them; head `h` uses channels `[h d, h d + d)` of each, `d = c / heads`
    /// at most 256): `out` (`rows x c`) = softmax(q k^T / sqrt(d), each position seeing itself
    /// and the earlier ones of its sequence of `t`) v, per head; `lse` (`rows x heads`, at
    /// `(sequence * heads + head) * t + position`) keeps each row's log-sum-exp for the backward.
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        t: usize,
        c: usize,
        heads: usize,
        qkv: &Self::Ref<'_, f32>,
        out: &mut Self::Mut<'_, f32>,
        lse: &mut Self::Mut<'_, f32>,
    ) -> Result<()>;
    /// The attention's backward: `dqkv` (`rows x 3c`, written) from `dout`, recomputing the
    /// probabilities from `qkv` and `lse`; `dsum` (`rows x heads`) is scratch. Every sum runs in
    /// a fixed order: the same bits every run.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        t: usize,
        c: usize,
        heads: usize,
        qkv: &Self::Ref<'_, f32>,
        out: &Self::Ref<'_, f32>,
        dout: &Self::Ref<'_, f32>,
        lse: &Self::Ref<'_, f32>,
        dqkv: &mut Self::Mut<'_, f32>,
        dsum: &mut Self::Mut<'_, f32>,
    ) -> Result<()>;
    /// LayerNorm's backward: `dx` (written), and `dgamma = keep * dgamma + sum_r dy xhat`,
    /// `dbeta = keep * dbeta + sum_r dy`, summed in row order.
    #[allow(clippy::too_many_arguments)]
    fn layernorm_backward(
        &self,
        c: usize,
        x: &Self::Ref<'_, f32>,
        dy: &Self::Ref<'_, f32>,
        gamma: &Self::Ref<'_, f32>,
        mean: &Self::Ref<'_, f32>,
        rstd: &Self::Ref<'_, f32>,
        dx: &mut Self::Mut<'_, f32>,
        keep: f32,
        dgamma: &mut Self::Mut<'_, f32>,
        dbeta: &mut Self::Mut<'_, f32>,
    ) -> Result<()>;
}

/// [`check_embed`] for a part of the table: the part inside the whole `part.vocab` rows.
/// Returns `(rows, rows of the part)`.
fn check_embed_part(
    t: usize,
    c: usize,
    part: VocabPart,
    ids: usize,
    wte: usize,
    wpe: usize,
    out: usize,
) -> Result<(usize, usize)> {
    // A part may hold no rows (a rank of a group larger than the vocabulary).
    let (rows, count) = match wte {
        0 => (check_embed(t, c, ids, c, wpe, out)?.0, 0),
        _ => check_embed(t, c, ids, wte, wpe, out)?,
    };
    if part.first + count > part.vocab {
        return Err(Error::shape(
            "embedding",
            format!(
                "a part of {count} token rows from token {} does not fit a vocabulary of {}",
                part.first, part.vocab
            ),
        ));
    }
    Ok((rows, count))
}

/// Rows of an embedding, checked: `ids` a whole number of sequences of `t`, the tables holding
/// whole rows of `c` (and `wpe` at least `t`), `out` rows x c. Returns `(rows, vocab)`.
fn check_embed(t: usize, c: usize, ids: usize, wte: usize, wpe: usize, out: usize) -> Result<(usize, usize)> {
    if t == 0 || c == 0 {
        return Err(Error::shape("embedding", format!("sequence length {t} and width {c} must be at least 1")));
    }
    if ids % t != 0 {
        return Err(Error::shape("embedding", format!("{ids} ids are not a whole number of sequences of {t}")));
    }
    if wte % c != 0 || wte == 0 {
        return Err(Error::shape("embedding", format!("the token table holds {wte} values, not rows of {c}")));
    }
    if wpe % c != 0 || wpe / c < t {
        return Err(Error::shape(
            "embedding",
            format!("the position table holds {wpe} values: {t} positions of {c} need at least {}", t * c),
        ));
    }
    check_len("embedding", &format!("out ({ids}x{c})"), out, ids * c)?;
    Ok((ids, wte / c))
}

fn check_layernorm(c: usize, x: usize, params: &[usize], y: usize, stats: &[usize]) -> Result<usize> {
    if c == 0 || x % c != 0 {
        return Err(Error::shape("layernorm", format!("{x} values are not rows of {c}")));
    }
    for &p in params {
        check_len("layernorm", "gamma/beta", p, c)?;
    }
    check_len("layernorm", "output", y, x)?;
    for &s in stats {
        check_len("layernorm", "mean/rstd (one per row)", s, x / c)?;
    }
    Ok(x / c)
}

/// An attention's shape, checked: returns `(rows, head size)`.
fn check_attention(t: usize, c: usize, heads: usize, qkv: usize, out: usize, lse: usize) -> Result<(usize, usize)> {
    if t == 0 || c == 0 || heads == 0 || c % heads != 0 {
        return Err(Error::shape(
            "attention",
            format!("width {c} must split into {heads} heads of equal size (and t = {t} be at least 1)"),
        ));
    }
    let d = c / heads;
    if d > consts::ATTN_MAX_HEAD as usize {
        return Err(Error::shape(
            "attention",
            format!("heads of {d} channels: at most {} (use more heads)", consts::ATTN_MAX_HEAD),
        ));
    }
    if out % (t * c) != 0 {
        return Err(Error::shape("attention", format!("{out} outputs are not whole sequences of {t} x {c}")));
    }
    let rows = out / c;
    check_len("attention", &format!("qkv ({rows}x{})", 3 * c), qkv, rows * 3 * c)?;
    check_len("attention", &format!("lse ({rows}x{heads})"), lse, rows * heads)?;
    if rows.checked_mul(heads).is_none_or(|w| w >= i32::MAX as usize / 2) {
        return Err(Error::shape("attention", format!("{rows} rows x {heads} heads exceed the kernels' 2^30 rows")));
    }
    Ok((rows, d))
}

/// The token at position `r`, or an error naming it.
fn token(ids: &[f32], r: usize, vocab: usize) -> Result<usize> {
    let f = ids[r];
    if f >= 0.0 && (f as f64) < vocab as f64 && f.fract() == 0.0 {
        Ok(f as usize)
    } else {
        Err(Error::Invalid(format!("token id {f} at position {r} is not a whole number in 0..{vocab}")))
    }
}

/// `a . b` in f32 with eight independent lanes added in lane order (vectorises; the order
/// depends only on the length).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in ra.iter().zip(rb).enumerate() {
        acc[l] += x * y;
    }
    acc.iter().sum()
}

/// Head `h`'s rows of sequence `b` from a `t x width` matrix whose parts of `c` columns each
/// hold the heads side by side (`qkv`: width 3c, parts q, k, v; `out`: width c, one part): for
/// each of its parts (up to 3), a contiguous `t x d` copy (empty for parts it lacks).
fn gather_head(m: &[f32], t: usize, c: usize, width: usize, d: usize, b: usize, h: usize) -> [Vec<f32>; 3] {
    let parts = width / c;
    std::array::from_fn(|part| {
        if part >= parts {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(t * d);
        for i in 0..t {
            out.extend_from_slice(&m[(b * t + i) * width + part * c + h * d..][..d]);
        }
        out
    })
}

/// `c = op(a) op(b)` for small row-major matrices (`m x k` times `k x n`; `a_t`: `a` is stored
/// `k x m`, `b_t`: `b` is stored `n x k`), with `matrixmultiply` (single-threaded at these
/// sizes, the same order of additions every run).
#[allow(clippy::too_many_arguments)]
fn small_mm(m: usize, k: usize, n: usize, a: &[f32], a_t: bool, b: &[f32], b_t: bool, c: &mut [f32]) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, "small_mm: operands too short");
    let (rsa, csa) = if a_t { (1, m as isize) } else { (k as isize, 1) };
    let (rsb, csb) = if b_t { (1, k as isize) } else { (n as isize, 1) };
    // SAFETY: the strides address exactly m x k of `a`, k x n of `b` and m x n of `c` (checked
    // above); with beta 0, `c` is only written.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            rsa,
            csa,
            b.as_ptr(),
            rsb,
            csb,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        )
    }
}

impl TransformerOps for CpuDevice {
    fn embed_forward_part(
        &self,
        t: usize,
        c: usize,
        part: VocabPart,
        ids: &&[f32],
        wte: &&[f32],
        wpe: &&[f32],
        out: &mut &mut [f32],
    ) -> Result<()> {
        let (rows, count) = check_embed_part(t, c, part, ids.len(), wte.len(), wpe.len(), out.len())?;
        let toks = (0..rows).map(|r| token(ids, r, part.vocab)).collect::<Result<Vec<_>>>()?;
        let pos = if part.positions { 1.0f32 } else { 0.0 };
        out.par_chunks_mut(c).enumerate().for_each(|(r, o)| {
            let p = &wpe[(r % t) * c..][..c];
            match toks[r].checked_sub(part.first).filter(|&v| v < count) {
                Some(v) => {
                    let w = &wte[v * c..][..c];
                    o.iter_mut().zip(w.iter().zip(p)).for_each(|(o, (a, b))| *o = a + pos * b);
                }
                None => o.iter_mut().zip(p).for_each(|(o, b)| *o = 0.0 + pos * b),
            }
        });
        Ok(())
    }

    fn embed_backward_part(
        &self,
        t: usize,
        c: usize,
        part: VocabPart,
        ids: &&[f32],
        dout: &&[f32],
        keep: (f32, f32),
        dwte: &mut &mut [f32],
        dwpe: &mut &mut [f32],
    ) -> Result<()> {
        let (rows, count) = check_embed_part(t, c, part, ids.len(), dwte.len(), dwpe.len(), dout.len())?;
        // Each token's rows in increasing order (a stable bucketing), then each table row sums its
        // own: the order of the GPU kernel.
        let mut by_token: Vec<Vec<usize>> = vec![Vec::new(); count];
        for r in 0..rows {
            if let Some(v) = token(ids, r, part.vocab)?.checked_sub(part.first).filter(|&v| v < count) {
                by_token[v].push(r);
            }
        }
        dwte.par_chunks_mut(c).zip(by_token.par_iter()).for_each(|(w, rs)| {
            let mut acc = vec![0f32; c];
            for &r in rs {
                acc.iter_mut().zip(&dout[r * c..][..c]).for_each(|(a, d)| *a += d);
            }
            w.iter_mut().zip(acc).for_each(|(w, a)| *w = if keep.0 != 0.0 { keep.0 * *w + a } else { a });
        });
        dwpe[..t * c].par_chunks_mut(c).enumerate().for_each(|(p, w)| {
            let mut acc = vec![0f32; c];
            for r in (p..rows).step_by(t) {
                acc.iter_mut().zip(&dout[r * c..][..c]).for_each(|(a, d)| *a += d);
            }
            w.iter_mut().zip(acc).for_each(|(w, a)| *w = if keep.1 != 0.0 { keep.1 * *w + a } else { a });
        });
        Ok(())
    }

    fn attention_forward(
        &self,
        t: usize,
        c: usize,
        heads: usize,
        qkv: &&[f32],
        out: &mut &mut [f32],
        lse: &mut &mut [f32],
    ) -> Result<()> {
        let (rows, d) = check_attention(t, c, heads, qkv.len(), out.len(), lse.len())?;
        let scale = 1.0 / (d as f32).sqrt();
        // One task per (sequence, head) with its q, k and v gathered: the scores S = q k^T as
        // one small product, each row's causal softmax (the max first, so the exponentials
        // never overflow; zero above the diagonal), then P v as another. Every sum runs in a
        // fixed order, whatever the threads.
        let res: Vec<(Vec<f32>, Vec<f32>)> = (0..(rows / t) * heads)
            .into_par_iter()
            .map(|task| {
                let (h, b) = (task % heads, task / heads);
                wide(|| {
                    let [q, k, v] = gather_head(qkv, t, c, 3 * c, d, b, h);
                    let mut p = vec![0f32; t * t];
                    small_mm(t, d, t, &q, false, &k, true, &mut p);
                    let mut l = vec![0f32; t];
                    for (i, row) in p.chunks_exact_mut(t).enumerate() {
                        let (live, masked) = row.split_at_mut(i + 1);
                        live.iter_mut().for_each(|x| *x *= scale);
                        let m = live.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                        live.iter_mut().for_each(|x| *x = fast_exp(*x - m));
                        let sum: f32 = live.iter().sum();
                        let inv = 1.0 / sum;
                        live.iter_mut().for_each(|x| *x *= inv);
                        masked.fill(0.0);
                        l[i] = m + sum.ln();
                    }
                    let mut o = vec![0f32; t * d];
                    small_mm(t, t, d, &p, false, &v, false, &mut o);
                    (o, l)
                })
            })
            .collect();
        for (task, (o, l)) in res.into_iter().enumerate() {
            let (h, b) = (task % heads, task / heads);
            for i in 0..t {
                out[(b * t + i) * c + h * d..][..d].copy_from_slice(&o[i * d..][..d]);
            }
            lse[task * t..][..t].copy_from_slice(&l);
        }
        Ok(())
    }

    fn attention_backward(
        &self,
        t: usize,
        c: usize,
        heads: usize,
        qkv: &&[f32],
        out: &&[f32],
        dout: &&[f32],
        lse: &&[f32],
        dqkv: &mut &mut [f32],
        dsum: &mut &mut [f32],
    ) -> Result<()> {
        let (rows, d) = check_attention(t, c, heads, qkv.len(), out.len(), lse.len())?;
        check_len("attention", "dout", dout.len(), out.len())?;
        check_len("attention", "dqkv", dqkv.len(), qkv.len())?;
        check_len("attention", "dsum", dsum.len(), lse.len())?;
        let scale = 1.0 / (d as f32).sqrt();
        // One task per (sequence, head): the probabilities P recomputed from the scores and the
        // kept log-sum-exp, dP = dout v^T, dS = scale P (dP - rowsum(dout o)), then dq = dS k,
        // dk = dS^T q and dv = P^T dout as small products, each in a fixed order.
        let res: Vec<(Vec<f32>, Vec<f32>)> = (0..(rows / t) * heads)
            .into_par_iter()
            .map(|task| {
                let (h, b) = (task % heads, task / heads);
                wide(|| {
                    let [q, k, v] = gather_head(qkv, t, c, 3 * c, d, b, h);
                    let [g, _, _] = gather_head(dout, t, c, c, d, b, h);
                    let [o, _, _] = gather_head(out, t, c, c, d, b, h);
                    let lse = &lse[task * t..][..t];
                    let sums: Vec<f32> = (0..t).map(|i| dot(&g[i * d..][..d], &o[i * d..][..d])).collect();
                    let (mut p, mut ds) = (vec![0f32; t * t], vec![0f32; t * t]);
                    small_mm(t, d, t, &q, false, &k, true, &mut p);
                    small_mm(t, d, t, &g, false, &v, true, &mut ds);
                    for (i, (pr, dr)) in p.chunks_exact_mut(t).zip(ds.chunks_exact_mut(t)).enumerate() {
                        let (live, masked) = pr.split_at_mut(i + 1);
                        live.iter_mut().for_each(|x| *x = fast_exp(scale * *x - lse[i]));
                        masked.fill(0.0);
                        for (x, &pp) in dr.iter_mut().zip(pr.iter()) {
                            *x = scale * pp * (*x - sums[i]);
                        }
                    }
                    let mut grads = vec![0f32; 3 * t * d];
                    let (dq, dkv) = grads.split_at_mut(t * d);
                    let (dk, dv) = dkv.split_at_mut(t * d);
                    small_mm(t, t, d, &ds, false, &k, false, dq);
                    small_mm(t, t, d, &ds, true, &q, false, dk);
                    small_mm(t, t, d, &p, true, &g, false, dv);
                    (grads, sums)
                })
            })
            .collect();
        for (task, (g, sums)) in res.into_iter().enumerate() {
            let (h, b) = (task % heads, task / heads);
            for i in 0..t {
                for part in 0..3 {
                    dqkv[(b * t + i) * 3 * c + part * c + h * d..][..d].copy_from_slice(&g[(part * t + i) * d..][..d]);
                }
            }
            dsum[task * t..][..t].copy_from_slice(&sums);
        }
        Ok(())
    }

    fn layernorm_forward(
        &self,
        c: usize,
        eps: f32,
        x: &&[f32],
        gamma: &&[f32],
        beta: &&[f32],
        y: &mut &mut [f32],
        mean: &mut &mut [f32],
        rstd: &mut &mut [f32],
    ) -> Result<()> {
        check_layernorm(c, x.len(), &[gamma.len(), beta.len()], y.len(), &[mean.len(), rstd.len()])?;
        y.par_chunks_mut(c).zip(x.par_chunks(c)).zip(mean.par_iter_mut().zip(rstd.par_iter_mut())).for_each(
            |((yr, xr), (m, s))| {
                wide(|| {
                    // Two passes over the row (in cache) with f64 lane sums: as sound as Welford.
                    let mu = lane_sum(xr, |v| v as f64) / c as f64;
                    let var = lane_sum(xr, |v| (v as f64 - mu) * (v as f64 - mu)) / c as f64;
                    let (mu32, rs32) = (mu as f32, (1.0 / (var + eps as f64).sqrt()) as f32);
                    for ((y, &x), (&g, &b)) in yr.iter_mut().zip(xr).zip(gamma.iter().zip(beta.iter())) {
                        *y = (x - mu32) * rs32 * g + b;
                    }
                    *m = mu32;
                    *s = rs32;
                })
            },
        );
        Ok(())
    }

    fn layernorm_backward(
        &self,
        c: usize,
        x: &&[f32],
        dy: &&[f32],
        gamma: &&[f32],
        mean: &&[f32],
        rstd: &&[f32],
        dx: &mut &mut [f32],
        keep: f32,
        dgamma: &mut &mut [f32],
        dbeta: &mut &mut [f32],
    ) -> Result<()> {
        let rows = check_layernorm(
            c,
            x.len(),
            &[gamma.len(), dgamma.len(), dbeta.len()],
            dx.len(),
            &[mean.len(), rstd.len()],
        )?;
        check_len("layernorm", "dy", dy.len(), x.len())?;
        dx.par_chunks_mut(c).enumerate().for_each(|(r, dxr)| {
            let (xr, dyr, mu, rs) = (&x[r * c..][..c], &dy[r * c..][..c], mean[r], rstd[r]);
            let (mut sg, mut sgx) = (0f32, 0f32);
            for j in 0..c {
                let g = dyr[j] * gamma[j];
                sg += g;
                sgx += g * (xr[j] - mu) * rs;
            }
            let (sg, sgx) = (sg / c as f32, sgx / c as f32);
            for j in 0..c {
                dxr[j] = rs * (dyr[j] * gamma[j] - sg - (xr[j] - mu) * rs * sgx);
            }
        });
        // The parameters' gradients: per block of LN_BLOCK_ROWS rows (in parallel) a partial sum
        // in row order, then the blocks' partials in block order. The blocks are fixed by the
        // shape, not the thread count: the same bits on any machine.
        let parts: Vec<(Vec<f32>, Vec<f32>)> = (0..rows.div_ceil(LN_BLOCK_ROWS))
            .into_par_iter()
            .map(|blk| {
                wide(|| {
                    let (mut ag, mut ab) = (vec![0f32; c], vec![0f32; c]);
                    for r in blk * LN_BLOCK_ROWS..((blk + 1) * LN_BLOCK_ROWS).min(rows) {
                        let (xr, dyr, mu, rs) = (&x[r * c..][..c], &dy[r * c..][..c], mean[r], rstd[r]);
                        for j in 0..c {
                            ag[j] += dyr[j] * (xr[j] - mu) * rs;
                            ab[j] += dyr[j];
                        }
                    }
                    (ag, ab)
                })
            })
            .collect();
        for j in 0..c {
            let (mut ag, mut ab) = (0f32, 0f32);
            for (pg, pb) in &parts {
                ag += pg[j];
                ab += pb[j];
            }
            dgamma[j] = if keep != 0.0 { keep * dgamma[j] + ag } else { ag };
            dbeta[j] = if keep != 0.0 { keep * dbeta[j] + ab } else { ab };
        }
        Ok(())
    }
}

/// The launches of the embedding kernels: one block per row (or table row) up to 16 per SM,
/// `TESSERA_EMBED_THREADS` channels per block along y.
pub(crate) fn embed_launch(rows: usize, c: usize, sms: usize) -> Result<LaunchConfig> {
    let threads = consts::EMBED_THREADS as usize;
    let x = as_u32("embedding", "rows", rows.clamp(1, sms * 16))?;
    let y = as_u32("embedding", "channel blocks", c.div_ceil(threads).max(1))?;
    if y > 65535 {
        return Err(Error::shape("embedding", format!("width {c} needs more than 65535 blocks of {threads}")));
    }
    Ok(LaunchConfig { grid_dim: (x, y, 1), block_dim: (threads as u32, 1, 1), shared_mem_bytes: 0 })
}

/// A launch of `threads`-thread blocks with a warp per row (grid-stride), up to 16 blocks per SM.
fn warp_per_row_launch(rows: usize, threads: usize, sms: usize) -> LaunchConfig {
    let blocks = rows.div_ceil(threads / 32).clamp(1, sms * 16);
    LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (threads as u32, 1, 1), shared_mem_bytes: 0 }
}

/// The launch of the attention kernels: a warp per (sequence, head, position).
pub(crate) fn attention_launch(rows_heads: usize, sms: usize) -> LaunchConfig {
    warp_per_row_launch(rows_heads, consts::ATTN_THREADS as usize, sms)
}

/// The launch of `layernorm_fwd` / `layernorm_bwd`: a warp per row.
pub(crate) fn layernorm_launch(rows: usize, sms: usize) -> LaunchConfig {
    warp_per_row_launch(rows, consts::LN_THREADS as usize, sms)
}

/// The GPU side, written once for the CUDA device and the simulator.
macro_rules! gpu_impl {
    ($dev:ident, $view:ident, $view_mut:ident) => {
        impl TransformerOps for $dev {
            fn embed_forward_part(
                &self,
                t: usize,
                c: usize,
                part: VocabPart,
                ids: &$view<'_, f32>,
                wte: &$view<'_, f32>,
                wpe: &$view<'_, f32>,
                out: &mut $view_mut<'_, f32>,
            ) -> Result<()> {
                let (rows, count) = check_embed_part(t, c, part, ids.len(), wte.len(), wpe.len(), out.len())?;
                let (r, t32, c32, v) = (
                    as_i32("embedding", "rows", rows)?,
                    as_i32("embedding", "t", t)?,
                    as_i32("embedding", "c", c)?,
                    as_i32("embedding", "vocab", part.vocab)?,
                );
                let (first, n) = (as_i32("embedding", "first", part.first)?, as_i32("embedding", "count", count)?);
                let pos = if part.positions { 1.0f32 } else { 0.0 };
                let mut cfg = embed_launch(rows, c, self.sms())?;
                cfg.grid_dim.1 = 1;
                // SAFETY: ids hold rows, out rows*c, wte count*c and wpe at least t*c elements
                // (checked); the kernel reads wte only at ids it has range-checked into the part.
                unsafe {
                    self.kernels().transformer.embed_fwd(
                        self.stream(),
                        cfg,
                        r,
                        t32,
                        c32,
                        v,
                        first,
                        n,
                        pos,
                        ids,
                        wte,
                        wpe,
                        out,
                    )
                }
                .map_err(Error::driver("launching embed_fwd"))
            }

            fn embed_backward_part(
                &self,
                t: usize,
                c: usize,
                part: VocabPart,
                ids: &$view<'_, f32>,
                dout: &$view<'_, f32>,
                keep: (f32, f32),
                dwte: &mut $view_mut<'_, f32>,
                dwpe: &mut $view_mut<'_, f32>,
            ) -> Result<()> {
                let (rows, count) = check_embed_part(t, c, part, ids.len(), dwte.len(), dwpe.len(), dout.len())?;
                let (r, t32, c32) =
                    (as_i32("embedding", "rows", rows)?, as_i32("embedding", "t", t)?, as_i32("embedding", "c", c)?);
                let (first, n) = (as_i32("embedding", "first", part.first)?, as_i32("embedding", "count", count)?);
                let k = &self.kernels().transformer;
                let cfg = embed_launch(count, c, self.sms())?;
                // SAFETY: ids hold rows, dout rows*c, dwte count*c (checked); block (x, y) owns the
                // part's rows x, x + gridDim.x, ... for channels of its y block, guarded by c.
                unsafe { k.embed_bwd_wte(self.stream(), cfg, r, c32, first, n, ids, dout, keep.0, dwte) }
                    .map_err(Error::driver("launching embed_bwd_wte"))?;
                let cfg = embed_launch(t, c, self.sms())?;
                // SAFETY: dout holds rows*c with rows a multiple of t, dwpe at least t*c (checked).
                unsafe { k.embed_bwd_wpe(self.stream(), cfg, r, t32, c32, dout, keep.1, dwpe) }
                    .map_err(Error::driver("launching embed_bwd_wpe"))
            }

            fn attention_forward(
                &self,
                t: usize,
                c: usize,
                heads: usize,
                qkv: &$view<'_, f32>,
                out: &mut $view_mut<'_, f32>,
                lse: &mut $view_mut<'_, f32>,
            ) -> Result<()> {
                let (rows, d) = check_attention(t, c, heads, qkv.len(), out.len(), lse.len())?;
                let scale = 1.0 / (d as f32).sqrt();
                let (b, t32, h, d32) = ((rows / t) as i32, t as i32, heads as i32, d as i32);
                let cfg = attention_launch(rows * heads, self.sms());
                // SAFETY: qkv holds rows*3c, out rows*c, lse rows*heads (checked); rows*heads < 2^30
                // (checked), so the kernel's int row index does not overflow.
                unsafe { self.kernels().transformer.attn_fwd(self.stream(), cfg, b, t32, h, d32, scale, qkv, out, lse) }
                    .map_err(Error::driver("launching attn_fwd"))
            }

            fn attention_backward(
                &self,
                t: usize,
                c: usize,
                heads: usize,
                qkv: &$view<'_, f32>,
                out: &$view<'_, f32>,
                dout: &$view<'_, f32>,
                lse: &$view<'_, f32>,
                dqkv: &mut $view_mut<'_, f32>,
                dsum: &mut $view_mut<'_, f32>,
            ) -> Result<()> {
                let (rows, d) = check_attention(t, c, heads, qkv.len(), out.len(), lse.len())?;
                check_len("attention", "dout", dout.len(), out.len())?;
                check_len("attention", "dqkv", dqkv.len(), qkv.len())?;
                check_len("attention", "dsum", dsum.len(), lse.len())?;
                let scale = 1.0 / (d as f32).sqrt();
                let (b, t32, h, d32) = ((rows / t) as i32, t as i32, heads as i32, d as i32);
                let k = &self.kernels().transformer;
                let cfg = attention_launch(rows * heads, self.sms());
                // SAFETY: as in the forward; dout rows*c, dqkv rows*3c, dsum rows*heads (checked).
                unsafe { k.attn_bwd_dq(self.stream(), cfg, b, t32, h, d32, scale, qkv, out, dout, lse, dsum, dqkv) }
                    .map_err(Error::driver("launching attn_bwd_dq"))?;
                // SAFETY: as above; runs after attn_bwd_dq (stream order), which wrote dsum.
                unsafe {
                    k.attn_bwd_dkv(self.stream(), cfg, b, t32, h, d32, scale, qkv, dout, lse, &dsum.as_view(), dqkv)
                }
                .map_err(Error::driver("launching attn_bwd_dkv"))
            }

            fn layernorm_forward(
                &self,
                c: usize,
                eps: f32,
                x: &$view<'_, f32>,
                gamma: &$view<'_, f32>,
                beta: &$view<'_, f32>,
                y: &mut $view_mut<'_, f32>,
                mean: &mut $view_mut<'_, f32>,
                rstd: &mut $view_mut<'_, f32>,
            ) -> Result<()> {
                let rows = check_layernorm(c, x.len(), &[gamma.len(), beta.len()], y.len(), &[mean.len(), rstd.len()])?;
                let (r, c32) = (as_i32("layernorm", "rows", rows)?, as_i32("layernorm", "c", c)?);
                let cfg = layernorm_launch(rows, self.sms());
                // SAFETY: x and y hold rows*c, gamma and beta c, mean and rstd rows (checked); a
                // warp per row, grid-stride.
                unsafe {
                    self.kernels().transformer.layernorm_fwd(
                        self.stream(),
                        cfg,
                        r,
                        c32,
                        eps,
                        x,
                        gamma,
                        beta,
                        y,
                        mean,
                        rstd,
                    )
                }
                .map_err(Error::driver("launching layernorm_fwd"))
            }

            fn layernorm_backward(
                &self,
                c: usize,
                x: &$view<'_, f32>,
                dy: &$view<'_, f32>,
                gamma: &$view<'_, f32>,
                mean: &$view<'_, f32>,
                rstd: &$view<'_, f32>,
                dx: &mut $view_mut<'_, f32>,
                keep: f32,
                dgamma: &mut $view_mut<'_, f32>,
                dbeta: &mut $view_mut<'_, f32>,
            ) -> Result<()> {
                let rows = check_layernorm(
                    c,
                    x.len(),
                    &[gamma.len(), dgamma.len(), dbeta.len()],
                    dx.len(),
                    &[mean.len(), rstd.len()],
                )?;
                check_len("layernorm", "dy", dy.len(), x.len())?;
                let (r, c32) = (as_i32("layernorm", "rows", rows)?, as_i32("layernorm", "c", c)?);
                let k = &self.kernels().transformer;
                let cfg = layernorm_launch(rows, self.sms());
                // SAFETY: x, dy and dx hold rows*c, gamma c, mean and rstd rows (checked).
                unsafe { k.layernorm_bwd(self.stream(), cfg, r, c32, x, dy, gamma, mean, rstd, dx) }
                    .map_err(Error::driver("launching layernorm_bwd"))?;
                let cols = as_u32("layernorm", "column blocks", c.div_ceil(consts::COLSUM_COLS as usize))?;
                let cfg = LaunchConfig {
                    grid_dim: (cols, 1, 1),
                    block_dim: (consts::COLSUM_COLS as u32, consts::COLSUM_ROWS as u32, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: as above; dgamma and dbeta hold c (checked); block x owns columns
                // [32x, 32x + 32) below c.
                unsafe { k.layernorm_dparams(self.stream(), cfg, r, c32, x, dy, mean, rstd, keep, dgamma, dbeta) }
                    .map_err(Error::driver("launching layernorm_dparams"))
            }
        }
    };
}

gpu_impl!(CudaDevice, CudaView, CudaViewMut);
gpu_impl!(SimDevice, SimView, SimViewMut);

#[cfg(test)]
mod launch_tests {
    use super::*;

    /// The launches at the edges, with the block size of the kernels' `__launch_bounds__`.
    #[test]
    fn transformer_launches_stay_within_their_limits() {
        let bounds = |name: &str| {
            crate::kernels::KERNELS.iter().find(|k| k.name == name).and_then(|k| k.launch_bounds()).map(|b| b.0)
        };
        let e = embed_launch(0, 1, 132).unwrap();
        assert_eq!((e.grid_dim, e.block_dim.0), ((1, 1, 1), consts::EMBED_THREADS as u32));
        let e = embed_launch(50257, 768, 132).unwrap();
        assert_eq!(e.grid_dim, (132 * 16, 3, 1));
        assert!(embed_launch(4, 256 * 65536, 132).unwrap_err().to_string().contains("65535"));
        let l = layernorm_launch(1, 132);
        assert_eq!(l.grid_dim, (1, 1, 1));
        assert_eq!(layernorm_launch(16384, 132).grid_dim.0, 16384 / 8);
        assert_eq!(layernorm_launch(1 << 30, 132).grid_dim.0, 132 * 16);
        // A warp per (sequence, head, position): the default GPT job's 12 x 64 rows x 4 heads.
        assert_eq!(attention_launch(12 * 64 * 4, 132).grid_dim.0, 12 * 64 * 4 / 8);
        assert_eq!(attention_launch(1, 132).grid_dim.0, 1);
        let e = check_attention(1, 4, 1, 12, 4, 1 << 30).unwrap_err().to_string();
        assert!(e.contains("lse"), "{e}");
        let e = check_attention(1, 1, 1, 3 << 30, 1 << 30, 1 << 30).unwrap_err().to_string();
        assert!(e.contains("2^30 rows"), "{e}");
        for (name, threads) in [
            ("embed_fwd", consts::EMBED_THREADS),
            ("embed_bwd_wte", consts::EMBED_THREADS),
            ("embed_bwd_wpe", consts::EMBED_THREADS),
            ("layernorm_fwd", consts::LN_THREADS),
            ("layernorm_bwd", consts::LN_THREADS),
            ("layernorm_dparams", consts::COLSUM_COLS * consts::COLSUM_ROWS),
            ("attn_fwd", consts::ATTN_THREADS),
            ("attn_bwd_dq", consts::ATTN_THREADS),
            ("attn_bwd_dkv", consts::ATTN_THREADS),
        ] {
            if let Some(t) = bounds(name) {
                assert_eq!(t, threads as u32, "{name}");
            }
        }
    }
}
