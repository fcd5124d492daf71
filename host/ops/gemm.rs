//! Matrix multiply with a fused epilogue: `C = alpha*op(A)*op(B) + beta*C + bias`, then an
//! optional activation, all row-major f32, any M, N, K. A Linear layer's forward is one call
//! (one launch on a GPU): the pre-activation goes to `c`, the activation to `act_out`.
//!
//! CPU: `matrixmultiply` or the `gemm` crate, whichever measured faster for the shape (see
//! [`cpu_gemm_crate_for`]), with a rayon epilogue.
//! CUDA: `kernels/gemm.cu`, a 128x128 register-blocked tile, or 64x64 where the big tile
//! would leave SMs idle ([`GemmKernel::Auto`]); the pipelined 128x128 candidates
//! (`gemm_pipe8_*`, `gemm_pipe16_*`, `gemm_wide8_*`, `gemm_wide16_*`) run when asked for by
//! [`Gemm::kernel`] or `TESSERA_GEMM_KERNEL`.

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

/// Which CUDA kernel family runs a GEMM. The CPU ignores it. Every family computes the same
/// result (each output summed over k in the same order, so the same values); they differ in speed.
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
}

impl GemmKernel {
    /// Every family, [`GemmKernel::Auto`] first.
    pub const ALL: [GemmKernel; 7] = [
        GemmKernel::Auto,
        GemmKernel::Tiled,
        GemmKernel::Small,
        GemmKernel::Pipe8,
        GemmKernel::Pipe16,
        GemmKernel::Wide8,
        GemmKernel::Wide16,
    ];

    /// The kernel-name stem: `auto`, `tiled`, `small`, `pipe8`, `pipe16`, `wide8`, `wide16`.
    pub fn name(self) -> &'static str {
        match self {
            GemmKernel::Auto => "auto",
            GemmKernel::Tiled => "tiled",
            GemmKernel::Small => "small",
            GemmKernel::Pipe8 => "pipe8",
            GemmKernel::Pipe16 => "pipe16",
            GemmKernel::Wide8 => "wide8",
            GemmKernel::Wide16 => "wide16",
        }
    }
}

impl std::str::FromStr for GemmKernel {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        GemmKernel::ALL.into_iter().find(|k| k.name() == s.trim().to_ascii_lowercase()).ok_or_else(|| {
            Error::Invalid(format!(
                "unknown GEMM kernel family `{s}`: use auto, tiled, small, pipe8, pipe16, wide8 or wide16"
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

/// The launch of GEMM `g` by kernel family `kernel` (resolved: not [`GemmKernel::Auto`]): one
/// block per tile of C (x over column tiles, y over row tiles), the family's block size. A pure
/// function of the shape, so the launch limits are unit-tested at extreme shapes: an error where
/// the row tiles exceed grid.y's 65535 or the column tiles a grid dimension.
pub(crate) fn gemm_launch(g: &Gemm, kernel: GemmKernel) -> Result<LaunchConfig> {
    let (bm, bn, threads) = match kernel {
        GemmKernel::Small => (consts::GEMM_SMALL_BM, consts::GEMM_SMALL_BN, consts::GEMM_SMALL_THREADS),
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
                let big_tiles = g.m.div_ceil(consts::GEMM_BM as usize) * g.n.div_ceil(consts::GEMM_BN as usize);
                let asked = if g.kernel == GemmKernel::Auto { auto_kernel()? } else { g.kernel };
                let kernel = match asked {
                    // The 128x128 tile needs about one block per SM to fill the GPU; below that the
                    // 64x64 tile gives four times the blocks.
                    GemmKernel::Auto if big_tiles < self.sms() => GemmKernel::Small,
                    GemmKernel::Auto => GemmKernel::Tiled,
                    k => k,
                };
                let cfg = gemm_launch(g, kernel)?;
                let kk = &self.kernels().gemm;
                let s = self.stream();
                let act = g.act.code();
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
                        (Small, false, false) => launch!(gemm_small_nn),
                        (Small, false, true) => launch!(gemm_small_nt),
                        (Small, true, false) => launch!(gemm_small_tn),
                        (Small, true, true) => launch!(gemm_small_tt),
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
