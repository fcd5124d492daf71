//! Matrix multiply with a fused epilogue: `C = alpha*op(A)*op(B) + beta*C + bias`, then an
//! optional activation, all row-major f32, any M, N, K. A Linear layer's forward is one call
//! (one launch on a GPU): the pre-activation goes to `c`, the activation to `act_out`.
//!
//! CPU: `matrixmultiply` or the `gemm` crate, whichever measured faster for the shape (see
//! [`cpu_gemm_crate_for`]), with a rayon epilogue.
//! CUDA: `kernels/gemm.cu`, a 128x128 register-blocked tile, or 64x64 where the big tile
//! would leave SMs idle ([`GemmKernel::Auto`]); the pipelined 128x128 candidates
//! (`gemm_pipe8_*`, `gemm_pipe16_*`, `gemm_wide8_*`, `gemm_wide16_*`) run when asked for by
//! [`Gemm::kernel`] or `TESSERA_GEMM_KERNEL`. Where even the 64x64 tiles leave SMs idle, the
//! k dimension is split across blocks ([`GemmKernel::SplitK`]) and the partial products are
//! summed in a fixed order: [`gemm_plan`] says which, and why a GEMM cannot fill the GPU.

use cudarc::driver::LaunchConfig;
use rayon::prelude::*;

use crate::backend::cpu::CpuDevice;
use crate::backend::cuda::CudaDevice;
use crate::backend::sim::{SimDevice, SimView, SimViewMut};
use crate::backend::{check_len, Backend, ViewLen};
use crate::error::{Error, Result};
use crate::kernels::consts;
use crate::ops::activation::Activation;
use crate::ops::{as_i32, as_u32};
#[allow(unused_imports)]
use cudarc::driver::{CudaView, CudaViewMut};

/// Which CUDA kernel family runs a GEMM. The CPU ignores it. Every family but
/// [`GemmKernel::SplitK`] computes the same result (each output summed over k in the same order,
/// so the same values); they differ in speed. Split-K sums k in chunks, then the chunks in a fixed
/// order: its results are as deterministic, and differ from the others' by rounding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GemmKernel {
    /// The default: the family `TESSERA_GEMM_KERNEL` names when set; else
    /// [`GemmKernel::Tiled`], or [`GemmKernel::Small`] when the 128x128 tiles would be fewer
    /// than the device's SMs.
    #[default]
    Auto,
    /// `gemm_{nn,nt,tn,tt}`: 128x128 block tile, BK = 8, 8x8 outputs per thread, the next
    /// k-tile staged through registers (double-buffered shared memory).
    Tiled,
    /// `gemm_small_*`: 64x64 block tile, BK = 16, 4x4 outputs per thread.
    Small,
    /// `gemm_pipe8_*`: the 128x128 tile with BK = 8 and three shared-memory stages filled by
    /// asynchronous copies (cp.async, sm_80 and later).
    Pipe8,
    /// `gemm_pipe16_*`: the 128x128 tile with BK = 16 and two stages filled by asynchronous copies.
    Pipe16,
    /// `gemm_wide8_*`: the 128x128 tile computed by 128 threads of 8x16 outputs, BK = 8, three
    /// stages filled by asynchronous copies.
    Wide8,
    /// `gemm_wide16_*`: as `Wide8` with BK = 16 and two stages.
    Wide16,
    /// `gemm_splitk_*` then `gemm_splitk_reduce`: the 64x64 tile over one chunk of k per block
    /// (grid.z), the partial products summed in chunk order with the epilogue. For shapes whose
    /// C has too few tiles to fill the GPU (a small batch, a narrow layer, a long k). The split
    /// count is [`Gemm::split_k`] when set, else what fills one wave ([`gemm_plan`]).
    SplitK,
}

impl GemmKernel {
    /// Every family, [`GemmKernel::Auto`] first.
    pub const ALL: [GemmKernel; 8] = [
        GemmKernel::Auto,
        GemmKernel::Tiled,
        GemmKernel::Small,
        GemmKernel::Pipe8,
        GemmKernel::Pipe16,
        GemmKernel::Wide8,
        GemmKernel::Wide16,
        GemmKernel::SplitK,
    ];

    /// The kernel-name stem: `auto`, `tiled`, `small`, `pipe8`, `pipe16`, `wide8`, `wide16`,
    /// `splitk`.
    pub fn name(self) -> &'static str {
        match self {
            GemmKernel::Auto => "auto",
            GemmKernel::Tiled => "tiled",
            GemmKernel::Small => "small",
            GemmKernel::Pipe8 => "pipe8",
            GemmKernel::Pipe16 => "pipe16",
            GemmKernel::Wide8 => "wide8",
            GemmKernel::Wide16 => "wide16",
            GemmKernel::SplitK => "splitk",
        }
    }
}

impl std::str::FromStr for GemmKernel {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        GemmKernel::ALL.into_iter().find(|k| k.name() == s.trim().to_ascii_lowercase()).ok_or_else(|| {
            Error::Invalid(format!(
                "unknown GEMM kernel family `{s}`: use auto, tiled, small, pipe8, pipe16, wide8, wide16 or splitk"
            ))
        })
    }
}

/// What [`GemmKernel::Auto`] resolves to on a GPU: `TESSERA_GEMM_KERNEL` (`tiled`, `small`,
/// `pipe8`, `pipe16`, `wide8`, `wide16`; read once) when set, so a whole training run can be timed with one
/// family; else the size heuristic. A bad value is an error at the first GEMM.
fn auto_kernel() -> Result<GemmKernel> {
    static CHOICE: std::sync::OnceLock<std::result::Result<GemmKernel, String>> = std::sync::OnceLock::new();
    CHOICE
        .get_or_init(|| match std::env::var("TESSERA_GEMM_KERNEL") {
            Ok(v) if !v.trim().is_empty() => v.parse::<GemmKernel>().map_err(|e| format!("TESSERA_GEMM_KERNEL: {e}")),
            _ => Ok(GemmKernel::Auto),
        })
        .clone()
        .map_err(Error::Invalid)
}

/// The shape and scalars of one GEMM.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gemm {
    /// Rows of `op(A)` and `C`.
    pub m: usize,
    /// Columns of `op(B)` and `C`.
    pub n: usize,
    /// Columns of `op(A)`, rows of `op(B)`.
    pub k: usize,
    /// `A` is stored `k x m` and used transposed.
    pub trans_a: bool,
    /// `B` is stored `n x k` and used transposed.
    pub trans_b: bool,
    /// Scale of the product.
    pub alpha: f32,
    /// Scale of the old `C` (0: `C` is not read, it may hold anything).
    pub beta: f32,
    /// Activation applied after the bias.
    pub act: Activation,
    /// The CUDA kernel family (default [`GemmKernel::Auto`]).
    pub kernel: GemmKernel,
    /// Chunks of k for [`GemmKernel::SplitK`] (0: as [`gemm_plan`] chooses). The CPU ignores it.
    pub split_k: usize,
}

impl Gemm {
    /// `C = A*B` for `A` m x k, `B` k x n.
    pub fn new(m: usize, n: usize, k: usize) -> Self {
        Gemm {
            m,
            n,
            k,
            trans_a: false,
            trans_b: false,
            alpha: 1.0,
            beta: 0.0,
            act: Activation::None,
            kernel: GemmKernel::Auto,
            split_k: 0,
        }
    }
    /// Sets whether `A` is used transposed.
    pub fn trans_a(mut self, t: bool) -> Self {
        self.trans_a = t;
        self
    }
    /// Sets whether `B` is used transposed.
    pub fn trans_b(mut self, t: bool) -> Self {
        self.trans_b = t;
        self
    }
    /// Sets `alpha`.
    pub fn alpha(mut self, a: f32) -> Self {
        self.alpha = a;
        self
    }
    /// Sets `beta`.
    pub fn beta(mut self, b: f32) -> Self {
        self.beta = b;
        self
    }
    /// Sets the epilogue's activation.
    pub fn activation(mut self, act: Activation) -> Self {
        self.act = act;
        self
    }
    /// The CUDA kernel family to run (the CPU ignores it); for benchmarks and tuning.
    pub fn kernel(mut self, kernel: GemmKernel) -> Self {
        self.kernel = kernel;
        self
    }
    /// Splits k into `chunks` for [`GemmKernel::SplitK`] (each a multiple of 16 long, so the
    /// count run may be lower: see [`gemm_plan`]); sets the family to `SplitK`.
    pub fn split_k(mut self, chunks: usize) -> Self {
        self.kernel = GemmKernel::SplitK;
        self.split_k = chunks;
        self
    }
    /// Floating-point operations of the product, `2*m*n*k`.
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }
    /// Checks operand lengths: `a` m*k, `b` k*n, `bias` n, `c` and `act_out` m*n.
    pub fn check(&self, a: usize, b: usize, bias: Option<usize>, c: usize, act_out: Option<usize>) -> Result<()> {
        let (m, n, k) = (self.m, self.n, self.k);
        let sa = if self.trans_a { format!("A ({k}x{m}, transposed)") } else { format!("A ({m}x{k})") };
        let sb = if self.trans_b { format!("B ({n}x{k}, transposed)") } else { format!("B ({k}x{n})") };
        check_len("gemm", &sa, a, m * k)?;
        check_len("gemm", &sb, b, k * n)?;
        check_len("gemm", &format!("C ({m}x{n})"), c, m * n)?;
        if let Some(l) = bias {
            check_len("gemm", &format!("bias (one per column of C, {n})"), l, n)?;
        }
        if let Some(l) = act_out {
            check_len("gemm", &format!("act_out ({m}x{n})"), l, m * n)?;
        }
        if !self.alpha.is_finite() || !self.beta.is_finite() {
            return Err(Error::Invalid(format!("gemm: alpha {} and beta {} must be finite", self.alpha, self.beta)));
        }
        Ok(())
    }
}

/// Whether the CPU runs `g` with the `gemm` crate (else `matrixmultiply`). Measured on the
/// 2-core AVX2 machine (best of 6 interleaved rounds, 2026-11-26): the `gemm` crate was 1.1-1.3x
/// faster for A used as stored (`nn`, `nt`) up to 512^3 multiply-adds (128x512x784: 149 against
/// 112 GFLOP/s), `matrixmultiply` 1.05-1.15x faster with A transposed (the weight gradients,
/// 784x512x128: 126 against 115) and at 1024^3 (127 against 112). The choice depends only on the
/// shape, so a result depends only on the shape and the data.
pub fn cpu_gemm_crate_for(g: &Gemm) -> bool {
    !g.trans_a && (g.m as f64) * (g.n as f64) * (g.k as f64) <= 512.0 * 512.0 * 512.0
}

/// Matrix multiply with the fused bias and activation epilogue.
pub trait GemmOps: Backend {
    /// `c = alpha*op(a)*op(b) + beta*c + bias`; then, if `act_out` is given,
    /// `act_out = act(c)` (`c` keeps the pre-activation, as backward needs), else `c = act(c)`.
    fn gemm(
        &self,
        g: &Gemm,
        a: &Self::Ref<'_, f32>,
        b: &Self::Ref<'_, f32>,
        bias: Option<&Self::Ref<'_, f32>>,
        c: &mut Self::Mut<'_, f32>,
        act_out: Option<&mut Self::Mut<'_, f32>>,
    ) -> Result<()>;
}

impl GemmOps for CpuDevice {
    fn gemm(
        &self,
        g: &Gemm,
        a: &&[f32],
        b: &&[f32],
        bias: Option<&&[f32]>,
        c: &mut &mut [f32],
        act_out: Option<&mut &mut [f32]>,
    ) -> Result<()> {
        g.check(a.len(), b.len(), bias.map(|x| x.len()), c.len(), act_out.as_ref().map(|x| x.view_len()))?;
        let (m, n, k) = (g.m, g.n, g.k);
        if m == 0 || n == 0 {
            return Ok(());
        }
        // Row and column strides of A and B as stored (the transposes are strides).
        let (rsa, csa) = if g.trans_a { (1, m as isize) } else { (k as isize, 1) };
        let (rsb, csb) = if g.trans_b { (1, k as isize) } else { (n as isize, 1) };
        if k == 0 {
            let beta = g.beta;
            c.par_iter_mut().for_each(|x| *x = if beta == 0.0 { 0.0 } else { beta * *x });
        } else if cpu_gemm_crate_for(g) {
            // SAFETY: the strides address exactly the m*k, k*n and m*n elements of a, b and c
            // (lengths checked above); c does not overlap a or b (a `&mut` borrow). The crate
            // computes dst = alpha*dst + beta*(lhs rhs) and reads dst only when told to: when
            // our beta is non-zero, so a C holding NaN is never read otherwise.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    c.as_mut_ptr(),
                    1,
                    n as isize,
                    g.beta != 0.0,
                    a.as_ptr(),
                    csa,
                    rsa,
                    b.as_ptr(),
                    csb,
                    rsb,
                    g.beta,
                    g.alpha,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(rayon::current_num_threads()),
                );
            }
        } else {
            // SAFETY: lengths checked above: a holds m*k, b k*n, c m*n elements, and the strides
            // address exactly those elements; matrixmultiply does not read c when beta == 0.
            unsafe {
                matrixmultiply::sgemm(
                    m,
                    k,
                    n,
                    g.alpha,
                    a.as_ptr(),
                    rsa,
                    csa,
                    b.as_ptr(),
                    rsb,
                    csb,
                    g.beta,
                    c.as_mut_ptr(),
                    n as isize,
                    1,
                );
            }
        }
        let act = g.act;
        let rows_per_task = (crate::backend::cpu::CHUNK / n).max(1);
        match act_out {
            Some(out) => {
                c.par_chunks_mut(rows_per_task * n).zip(out.par_chunks_mut(rows_per_task * n)).for_each(|(cc, oo)| {
                    for (crow, orow) in cc.chunks_mut(n).zip(oo.chunks_mut(n)) {
                        if let Some(bias) = bias {
                            crow.iter_mut().zip(bias.iter()).for_each(|(x, b)| *x += b);
                        }
                        orow.iter_mut().zip(crow.iter()).for_each(|(o, z)| *o = act.apply(*z));
                    }
                });
            }
            None if bias.is_some() || act != Activation::None => {
                c.par_chunks_mut(rows_per_task * n).for_each(|cc| {
                    for crow in cc.chunks_mut(n) {
                        if let Some(bias) = bias {
                            crow.iter_mut().zip(bias.iter()).for_each(|(x, b)| *x += b);
                        }
                        if act != Activation::None {
                            crow.iter_mut().for_each(|x| *x = act.apply(*x));
                        }
                    }
                });
            }
            None => {}
        }
        Ok(())
    }
}

/// Shortest k chunk split-K makes (two k-tiles of 16): shorter, and the workspace traffic and
/// the reduce cost more than the parallelism gains.
pub const SPLITK_MIN_CHUNK: usize = 32;

/// How a GEMM runs on a GPU with `sms` streaming multiprocessors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GemmPlan {
    /// The family (never [`GemmKernel::Auto`]).
    pub kernel: GemmKernel,
    /// Chunks of k (1: not split).
    pub splits: usize,
    /// Length of each chunk but the last (k when not split).
    pub chunk: usize,
    /// Blocks launched for the product (tiles of C times splits).
    pub blocks: usize,
    /// Why the blocks are fewer than the SMs (one wave not filled), when they are.
    pub short_of_a_wave: Option<String>,
}

/// The split of k that gives at least `sms` blocks over `tiles` 64x64 tiles, or the most the
/// minimum chunk allows: `(splits, chunk)`, or `None` when k cannot be split at all.
fn wave_split(tiles: usize, k: usize, sms: usize) -> Option<(usize, usize)> {
    let needed = sms.div_ceil(tiles.max(1));
    let fill = (k / needed.max(1)) / 16 * 16;
    let chunk = if fill >= SPLITK_MIN_CHUNK {
        fill
    } else {
        let most = k / SPLITK_MIN_CHUNK;
        if most < 2 {
            return None;
        }
        k.div_ceil(most).next_multiple_of(16)
    };
    let splits = k.div_ceil(chunk);
    (splits >= 2).then_some((splits, chunk))
}

/// Which kernel runs GEMM `g` on a GPU of `sms` SMs, with how many k splits, and whether the
/// launch fills one wave (a block per SM) or why not. [`GemmKernel::Auto`] takes the 128x128
/// tile when its tiles are at least the SMs, else the 64x64 tile when its are, else split-K
/// over the 64x64 tile where k allows; `TESSERA_GEMM_KERNEL` overrides it. A pure function of
/// the shape, unit-tested over the training jobs' GEMMs.
pub fn gemm_plan(g: &Gemm, sms: usize) -> Result<GemmPlan> {
    let tiles = |bm: usize, bn: usize| g.m.div_ceil(bm) * g.n.div_ceil(bn);
    let (big, small) = (tiles(consts::GEMM_BM as usize, consts::GEMM_BN as usize), tiles(64, 64));
    let asked = if g.kernel == GemmKernel::Auto { auto_kernel()? } else { g.kernel };
    let (kernel, splits, chunk) = match asked {
        GemmKernel::Auto if big >= sms => (GemmKernel::Tiled, 1, g.k),
        GemmKernel::Auto if small >= sms => (GemmKernel::Small, 1, g.k),
        GemmKernel::Auto => match wave_split(small, g.k, sms) {
            Some((s, c)) => (GemmKernel::SplitK, s, c),
            None => (GemmKernel::Small, 1, g.k),
        },
        GemmKernel::SplitK => {
            let chunk = match g.split_k {
                0 => wave_split(small, g.k, sms).map_or(g.k.max(1), |(_, c)| c),
                s => g.k.div_ceil(s).next_multiple_of(16).max(16),
            };
            (GemmKernel::SplitK, g.k.div_ceil(chunk).max(1), chunk)
        }
        k => (k, 1, g.k),
    };
    let tiles_run = if matches!(kernel, GemmKernel::Small | GemmKernel::SplitK) { small } else { big };
    let blocks = tiles_run * splits;
    let short_of_a_wave = (blocks < sms).then(|| {
        let why_k = if g.k / SPLITK_MIN_CHUNK < 2 {
            format!("k = {} is too short to split (chunks of at least {SPLITK_MIN_CHUNK})", g.k)
        } else {
            format!(
                "k = {} splits at most {} ways in chunks of at least {SPLITK_MIN_CHUNK}",
                g.k,
                g.k / SPLITK_MIN_CHUNK
            )
        };
        match asked {
            GemmKernel::Auto | GemmKernel::SplitK => {
                format!("C ({}x{}) has {small} tiles of 64x64 and {why_k}: {blocks} blocks for {sms} SMs", g.m, g.n)
            }
            k => format!("the {} family was asked for: {blocks} blocks for {sms} SMs", k.name()),
        }
    });
    Ok(GemmPlan { kernel, splits, chunk, blocks, short_of_a_wave })
}

/// The launch of GEMM `g` by kernel family `kernel` (resolved: not [`GemmKernel::Auto`]): one
/// block per tile of C (x over column tiles, y over row tiles), the family's block size. A pure
/// function of the shape, so the launch limits are unit-tested at extreme shapes: an error where
/// the row tiles exceed grid.y's 65535 or the column tiles a grid dimension.
pub(crate) fn gemm_launch(g: &Gemm, kernel: GemmKernel) -> Result<LaunchConfig> {
    let (bm, bn, threads) = match kernel {
        GemmKernel::Small | GemmKernel::SplitK => {
            (consts::GEMM_SMALL_BM, consts::GEMM_SMALL_BN, consts::GEMM_SMALL_THREADS)
        }
        GemmKernel::Wide8 | GemmKernel::Wide16 => (consts::GEMM_BM, consts::GEMM_BN, consts::GEMM_WIDE_THREADS),
        _ => (consts::GEMM_BM, consts::GEMM_BN, consts::GEMM_THREADS),
    };
    let cfg = LaunchConfig {
        grid_dim: (
            as_u32("gemm", "column tiles", g.n.div_ceil(bn as usize))?,
            as_u32("gemm", "row tiles", g.m.div_ceil(bm as usize))?,
            1,
        ),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    if cfg.grid_dim.1 > 65535 {
        return Err(Error::shape("gemm", format!("m = {} needs more than 65535 row tiles", g.m)));
    }
    Ok(cfg)
}

/// The GPU side, written once for the CUDA device and the simulator: the same launches of the
/// same kernels, over `CudaView`s or `SimView`s.
macro_rules! gpu_impl {
    ($dev:ident, $view:ident, $view_mut:ident) => {
        impl GemmOps for $dev {
            fn gemm(
                &self,
                g: &Gemm,
                a: &$view<'_, f32>,
                b: &$view<'_, f32>,
                bias: Option<&$view<'_, f32>>,
                c: &mut $view_mut<'_, f32>,
                act_out: Option<&mut $view_mut<'_, f32>>,
            ) -> Result<()> {
                g.check(a.len(), b.len(), bias.map(|x| x.len()), c.len(), act_out.as_ref().map(|x| x.len()))?;
                if g.m == 0 || g.n == 0 {
                    return Ok(());
                }
                let (m, n, k) = (as_i32("gemm", "m", g.m)?, as_i32("gemm", "n", g.n)?, as_i32("gemm", "k", g.k)?);
                // The kernels step k in tiles of up to 16 with int arithmetic.
                if g.k > (i32::MAX - 64) as usize {
                    return Err(Error::shape("gemm", format!("k = {} is beyond the CUDA kernels' 2^31 - 65", g.k)));
                }
                let plan = gemm_plan(g, self.sms())?;
                let kernel = plan.kernel;
                let mut cfg = gemm_launch(g, kernel)?;
                let kk = &self.kernels().gemm;
                let s = self.stream();
                let act = g.act.code();
                if kernel == GemmKernel::SplitK && plan.splits > 1 {
                    // k in `splits` chunks into the stream's workspace, then their sum in chunk order.
                    cfg.grid_dim.2 = as_u32("gemm", "k splits", plan.splits)?;
                    let mn = g.m * g.n;
                    let need = plan
                        .splits
                        .checked_mul(mn)
                        .ok_or_else(|| Error::shape("gemm", "the split-K workspace overflows"))?;
                    let mut ws = self.gemm_workspace().lock().unwrap_or_else(|e| e.into_inner());
                    if ws.as_ref().is_none_or(|w| Self::buf_len(w) < need) {
                        *ws = None;
                        *ws = Some(self.alloc::<f32>(need)?);
                    }
                    let w = ws.as_mut().expect("allocated above");
                    let chunk = as_i32("gemm", "k chunk", plan.chunk)?;
                    {
                        let mut wv = Self::view_range_mut(w, 0..need);
                        // SAFETY: lengths checked by `g.check`; the workspace holds splits*m*n floats;
                        // block (x, y, z) writes its 64x64 tile of chunk z's product at ws[z*m*n ..]
                        // (guarded at the edges).
                        unsafe {
                            match (g.trans_a, g.trans_b) {
                                (false, false) => kk.gemm_splitk_nn(s, cfg, m, n, k, chunk, a, b, &mut wv),
                                (false, true) => kk.gemm_splitk_nt(s, cfg, m, n, k, chunk, a, b, &mut wv),
                                (true, false) => kk.gemm_splitk_tn(s, cfg, m, n, k, chunk, a, b, &mut wv),
                                (true, true) => kk.gemm_splitk_tt(s, cfg, m, n, k, chunk, a, b, &mut wv),
                            }
                        }
                        .map_err(Error::driver("launching gemm_splitk"))?;
                    }
                    let rcfg = crate::ops::elementwise_cfg(mn, self.sms());
                    let splits = as_i32("gemm", "k splits", plan.splits)?;
                    // SAFETY: the workspace holds splits*m*n floats, c and act_out m*n, bias n
                    // (checked); grid-stride over m*n.
                    return unsafe {
                        kk.gemm_splitk_reduce(
                            s,
                            rcfg,
                            mn as i64,
                            n,
                            splits,
                            &Self::view_range(w, 0..need),
                            g.alpha,
                            g.beta,
                            c,
                            bias,
                            act,
                            act_out,
                        )
                    }
                    .map_err(Error::driver("launching gemm_splitk_reduce"));
                }
                // One launch of the kernel `$name` with the common arguments.
                macro_rules! launch {
                    ($name:ident) => {
                        kk.$name(s, cfg, m, n, k, g.alpha, a, b, g.beta, c, bias, act, act_out)
                    };
                }
                // SAFETY: lengths checked by `g.check` (a m*k, b k*n, c and act_out m*n, bias n);
                // m, n, k fit in int; the grid covers C with the tile size the kernel was written for,
                // and the kernel guards every edge tile, so no access leaves the checked ranges.
                let r = unsafe {
                    use GemmKernel::*;
                    match (kernel, g.trans_a, g.trans_b) {
                        (Auto | Tiled, false, false) => launch!(gemm_nn),
                        (Auto | Tiled, false, true) => launch!(gemm_nt),
                        (Auto | Tiled, true, false) => launch!(gemm_tn),
                        (Auto | Tiled, true, true) => launch!(gemm_tt),
                        // Split-K with one chunk is the 64x64 tile.
                        (Small | SplitK, false, false) => launch!(gemm_small_nn),
                        (Small | SplitK, false, true) => launch!(gemm_small_nt),
                        (Small | SplitK, true, false) => launch!(gemm_small_tn),
                        (Small | SplitK, true, true) => launch!(gemm_small_tt),
                        (Pipe8, false, false) => launch!(gemm_pipe8_nn),
                        (Pipe8, false, true) => launch!(gemm_pipe8_nt),
                        (Pipe8, true, false) => launch!(gemm_pipe8_tn),
                        (Pipe8, true, true) => launch!(gemm_pipe8_tt),
                        (Pipe16, false, false) => launch!(gemm_pipe16_nn),
                        (Pipe16, false, true) => launch!(gemm_pipe16_nt),
                        (Pipe16, true, false) => launch!(gemm_pipe16_tn),
                        (Pipe16, true, true) => launch!(gemm_pipe16_tt),
                        (Wide8, false, false) => launch!(gemm_wide8_nn),
                        (Wide8, false, true) => launch!(gemm_wide8_nt),
                        (Wide8, true, false) => launch!(gemm_wide8_tn),
                        (Wide8, true, true) => launch!(gemm_wide8_tt),
                        (Wide16, false, false) => launch!(gemm_wide16_nn),
                        (Wide16, false, true) => launch!(gemm_wide16_nt),
                        (Wide16, true, false) => launch!(gemm_wide16_tn),
                        (Wide16, true, true) => launch!(gemm_wide16_tt),
                    }
                };
                r.map_err(Error::driver("launching gemm"))
            }
        }
    };
}

gpu_impl!(CudaDevice, CudaView, CudaViewMut);
gpu_impl!(SimDevice, SimView, SimViewMut);

#[cfg(test)]
mod launch_tests {
    use super::*;

    /// The launch shape at the edges: one tile, n near 2^31, m at and past grid.y's limit,
    /// k = 0; the block size is the one each family's `__launch_bounds__` declares.
    #[test]
    fn gemm_launches_cover_c_within_the_grid_limits() {
        let bounds = |name: &str| {
            crate::kernels::KERNELS.iter().find(|k| k.name == name).and_then(|k| k.launch_bounds()).map(|b| b.0)
        };
        for (kernel, name, tile) in [
            (GemmKernel::Tiled, "gemm_nn", 128),
            (GemmKernel::Small, "gemm_small_nn", 64),
            (GemmKernel::Wide8, "gemm_wide8_nn", 128),
            (GemmKernel::Pipe16, "gemm_pipe16_nn", 128),
        ] {
            let c = gemm_launch(&Gemm::new(1, 1, 1), kernel).unwrap();
            assert_eq!(c.grid_dim, (1, 1, 1));
            if let Some(t) = bounds(name) {
                assert_eq!(c.block_dim.0, t, "{name}: launched with a block size other than its launch bounds");
            }
            let c = gemm_launch(&Gemm::new(tile * 65535, (1 << 31) - 1, 0), kernel).unwrap();
            assert_eq!(c.grid_dim, ((((1u64 << 31) - 1).div_ceil(tile as u64)) as u32, 65535, 1));
            let e = gemm_launch(&Gemm::new(tile * 65535 + 1, 8, 8), kernel).unwrap_err().to_string();
            assert!(e.contains("more than 65535 row tiles"), "{e}");
        }
    }

    /// The GEMMs of a training step of an MLP (`widths`, batch `b`): each layer's forward
    /// (b x out, k = in), input gradient (b x in, k = out; not the first layer's) and weight
    /// gradient (in x out, k = b, A transposed).
    fn mlp_gemms(widths: &[usize], b: usize) -> Vec<(String, Gemm)> {
        let mut out = Vec::new();
        for (l, w) in widths.windows(2).enumerate() {
            let (i, o) = (w[0], w[1]);
            out.push((format!("layer {l} forward"), Gemm::new(b, o, i)));
            if l > 0 {
                out.push((format!("layer {l} input gradient"), Gemm::new(b, i, o).trans_b(true)));
            }
            out.push((format!("layer {l} weight gradient"), Gemm::new(i, o, b).trans_a(true)));
        }
        out
    }

    /// The GEMMs of a character-level GPT of issue #16's size (6 layers of width 384, 6 heads,
    /// context 256, batch 64, a vocabulary of 65): tokens x (3 width) for the fused QKV
    /// projection, the attention output and MLP projections, the MLP's 4x expansion, and the
    /// head; each forward with its two gradients.
    fn gpt_gemms() -> Vec<(String, Gemm)> {
        let (t, d, v) = (64 * 256, 384, 65);
        let mut out = Vec::new();
        for (name, i, o) in
            [("qkv", d, 3 * d), ("attention out", d, d), ("mlp up", d, 4 * d), ("mlp down", 4 * d, d), ("head", d, v)]
        {
            out.push((format!("{name} forward"), Gemm::new(t, o, i)));
            out.push((format!("{name} input gradient"), Gemm::new(t, i, o).trans_b(true)));
            out.push((format!("{name} weight gradient"), Gemm::new(i, o, t).trans_a(true)));
        }
        out
    }

    /// For every GEMM of the default job (784-512-512-10, batch 128), the large MLP
    /// (784-4096x3-10, batch 1024) and the GPT, on 132 SMs (an H100 SXM or H200): the launch
    /// fills at least one wave (a block per SM), or the plan says why it cannot. The ones that
    /// cannot are exactly the expected few (C of at most 16 tiles with a short k).
    #[test]
    fn every_training_gemm_fills_a_wave_or_says_why() {
        let sms = 132;
        let mut short = Vec::new();
        let jobs = [
            ("default", mlp_gemms(&[784, 512, 512, 10], 128)),
            ("large", mlp_gemms(&[784, 4096, 4096, 4096, 10], 1024)),
            ("gpt", gpt_gemms()),
        ];
        for (job, gemms) in jobs {
            for (what, g) in gemms {
                let p = gemm_plan(&g, sms).unwrap();
                assert_ne!(p.kernel, GemmKernel::Auto);
                let tiles = g.m.div_ceil(64) * g.n.div_ceil(64);
                if p.kernel == GemmKernel::SplitK {
                    assert!(p.splits >= 2 && p.chunk % 16 == 0 && p.chunk >= SPLITK_MIN_CHUNK, "{job} {what}: {p:?}");
                    assert_eq!(p.splits, g.k.div_ceil(p.chunk), "{job} {what}: {p:?}");
                    assert_eq!(p.blocks, tiles * p.splits, "{job} {what}: {p:?}");
                }
                match &p.short_of_a_wave {
                    None => assert!(p.blocks >= sms, "{job} {what}: {p:?}"),
                    Some(why) => {
                        assert!(p.blocks < sms && why.contains("blocks for 132 SMs"), "{job} {what}: {why}");
                        short.push(format!("{job} {what} ({}x{}x{}): {why}", g.m, g.n, g.k));
                    }
                }
            }
        }
        eprintln!("GEMMs short of a wave on 132 SMs:\n{}", short.join("\n"));
        // The default job's 10-class head: its forward (128x10, k = 512), weight gradient
        // (512x10, k = 128), and the last hidden layer's input gradient (128x512, k = 10) are
        // too small in C and k; everything else fills a wave.
        assert_eq!(short.len(), 3, "{short:#?}");
        assert!(short.iter().all(|s| s.starts_with("default layer 2")), "{short:#?}");
        // The default job's first layer: split-K lifts 16 tiles to at least a wave.
        let p = gemm_plan(&Gemm::new(128, 512, 784), sms).unwrap();
        assert_eq!((p.kernel, p.splits, p.chunk, p.blocks), (GemmKernel::SplitK, 10, 80, 160));
    }

    /// Explicit split counts round the chunk up to a multiple of 16 (so fewer chunks may run);
    /// the launch adds the chunks as grid.z over the 64x64 tiles.
    #[test]
    fn split_k_plans_round_chunks_and_launch_one_z_per_chunk() {
        let g = Gemm::new(70, 33, 100).split_k(3);
        let p = gemm_plan(&g, 132).unwrap();
        assert_eq!((p.splits, p.chunk), (3, 48));
        let p = gemm_plan(&Gemm::new(70, 33, 100).split_k(100), 132).unwrap();
        assert_eq!((p.splits, p.chunk), (7, 16), "chunks are at least one k-tile");
        let p = gemm_plan(&Gemm::new(70, 33, 0).split_k(4), 132).unwrap();
        assert_eq!(p.splits, 1, "k = 0 is not split");
        let c = gemm_launch(&g, GemmKernel::SplitK).unwrap();
        assert_eq!((c.grid_dim.0, c.grid_dim.1, c.block_dim.0), (1, 2, consts::GEMM_SMALL_THREADS as u32));
        // A family asked for by name is not split, and says so when it leaves SMs idle.
        let p = gemm_plan(&Gemm::new(128, 512, 784).kernel(GemmKernel::Tiled), 132).unwrap();
        assert_eq!((p.kernel, p.splits, p.blocks), (GemmKernel::Tiled, 1, 4));
        assert!(p.short_of_a_wave.unwrap().contains("the tiled family was asked for"));
    }

    /// The elementwise launch: at least one block, at most 16 per SM, 4 elements per thread in
    /// flight, and the block size of the kernels' `__launch_bounds__`.
    #[test]
    fn elementwise_launches_stay_within_their_limits() {
        use crate::ops::elementwise_cfg;
        let ew = crate::kernels::consts::EW_THREADS as u32;
        for (n, sms, blocks) in
            [(0usize, 132usize, 1u32), (1, 132, 1), (1024, 132, 1), (1025, 132, 2), (usize::MAX / 2, 132, 132 * 16)]
        {
            let c = elementwise_cfg(n, sms);
            assert_eq!(c.grid_dim, (blocks, 1, 1), "n = {n}");
            assert_eq!(c.block_dim, (ew, 1, 1));
        }
        for name in ["act_fwd", "act_bwd", "sgd_step", "adamw_step"] {
            let k = crate::kernels::KERNELS.iter().find(|k| k.name == name).unwrap();
            assert_eq!(k.launch_bounds().map(|b| b.0), Some(ew), "{name}");
        }
    }
}
