//! Bench cases shared by the criterion suites and the report: each case is one op at one
//! shape on one device, with the work it does (FLOPs or bytes moved) and, beside it, the peer
//! it is measured against in the same run: cuBLAS SGEMM or a device-to-device copy on a GPU;
//! the `gemm` crate or a memcpy on the CPU.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm as _, GemmConfig};
use tessera::check::inputs;
use tessera::{Activation, AdamW, Backend, CpuDevice, CudaDevice, Gemm, GemmKernel, Ops, Sgd};

/// What a case's throughput is counted in.
#[derive(Clone, Copy, Debug)]
pub enum Work {
    /// Floating-point operations per run.
    Flops(f64),
    /// Bytes read and written per run.
    Bytes(f64),
}

/// A closure that queues one run (no synchronisation).
pub type Run = Box<dyn FnMut()>;

/// One op at one shape, with its peer.
pub struct Case {
    /// Family (criterion group): gemm, activation, reduce, loss, optim.
    pub family: &'static str,
    /// e.g. `nn 4096x4096x4096`.
    pub name: String,
    /// Work per run.
    pub work: Work,
    /// tessera's kernel.
    pub run: Run,
    /// The peer's name and run.
    pub peer: Option<(&'static str, Run)>,
}

/// GPU 0, or None (and a line saying so).
pub fn gpu() -> Option<CudaDevice> {
    tessera::check::gpu_or_skip("the GPU bench groups")
}

/// Times `iters` runs between two synchronisations.
pub fn time_runs(run: &mut Run, sync: &dyn Fn(), iters: u64) -> Duration {
    sync();
    let t = Instant::now();
    for _ in 0..iters {
        run();
    }
    sync();
    t.elapsed()
}

fn buf<B: Backend>(d: &B, seed: u64, n: usize) -> B::Buf<f32> {
    d.upload(&inputs(seed, n, 1.0)).unwrap()
}

/// tessera's GEMM at `m x n x k` with transposes.
pub fn gemm_run<B: Ops>(d: &B, m: usize, n: usize, k: usize, ta: bool, tb: bool) -> Run {
    gemm_kernel_run(d, m, n, k, ta, tb, GemmKernel::Auto)
}

/// The same with a chosen CUDA kernel family.
pub fn gemm_kernel_run<B: Ops>(d: &B, m: usize, n: usize, k: usize, ta: bool, tb: bool, kernel: GemmKernel) -> Run {
    let d = d.clone();
    let g = Gemm::new(m, n, k).trans_a(ta).trans_b(tb).kernel(kernel);
    let (a, b, mut c) = (buf(&d, 1, m * k), buf(&d, 2, k * n), buf(&d, 3, m * n));
    Box::new(move || d.gemm(&g, &B::view(&a), &B::view(&b), None, &mut B::view_mut(&mut c), None).unwrap())
}

/// cuBLAS SGEMM on the same row-major problem (row-major C = op(A) op(B) is column-major
/// C^T = op(B)^T op(A)^T, so the operands swap). Strict FP32: TF32 is not enabled.
pub fn cublas_run(d: &CudaDevice, m: usize, n: usize, k: usize, ta: bool, tb: bool) -> Option<Run> {
    // SAFETY: only tries to load the library.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        eprintln!("skipped: cuBLAS (libcublas.so) not found, so no baseline; put its directory on LD_LIBRARY_PATH");
        return None;
    }
    let blas = CudaBlas::new(d.stream().clone()).unwrap();
    let (a, b, mut c) = (buf(d, 1, m * k), buf(d, 2, k * n), buf(d, 3, m * n));
    let op = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
    let cfg = GemmConfig {
        transa: op(tb),
        transb: op(ta),
        m: n as i32,
        n: m as i32,
        k: k as i32,
        alpha: 1.0f32,
        lda: if tb { k } else { n } as i32,
        ldb: if ta { m } else { k } as i32,
        beta: 0.0f32,
        ldc: n as i32,
    };
    // SAFETY: the buffers hold exactly the elements the config addresses.
    Some(Box::new(move || unsafe { blas.gemm(cfg, &b, &a, &mut c) }.unwrap()))
}

/// The `gemm` crate (rayon) on the same row-major problem: the CPU peer.
pub fn gemm_crate_run(m: usize, n: usize, k: usize, ta: bool, tb: bool) -> Run {
    let a = inputs(1, m * k, 1.0);
    let b = inputs(2, k * n, 1.0);
    let mut c = vec![0f32; m * n];
    let threads = rayon::current_num_threads();
    Box::new(move || {
        let (rsa, csa) = if ta { (1, m as isize) } else { (k as isize, 1) };
        let (rsb, csb) = if tb { (1, k as isize) } else { (n as isize, 1) };
        // SAFETY: the strides address the m*k, k*n and m*n elements of a, b and c.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                csa,
                rsa,
                b.as_ptr(),
                csb,
                rsb,
                0.0f32,
                1.0f32,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(threads),
            )
        }
    })
}

/// A device-to-device copy of `n` floats: the bandwidth peer of the memory-bound kernels.
pub fn copy_run<B: Backend>(d: &B, n: usize) -> Run {
    let d = d.clone();
    let (src, mut dst) = (buf(&d, 9, n), buf(&d, 10, n));
    Box::new(move || d.copy(&B::view(&src), &mut B::view_mut(&mut dst)).unwrap())
}

/// GEMM cases: square sizes, the default MLP's shapes, and all four transposes at one size.
pub fn gemm_cases<B: Ops>(
    d: &B,
    squares: &[usize],
    peer: &dyn Fn(usize, usize, usize, bool, bool) -> Option<(&'static str, Run)>,
) -> Vec<Case> {
    let mut shapes: Vec<(usize, usize, usize, bool, bool)> = squares.iter().map(|&s| (s, s, s, false, false)).collect();
    // MLP 784-512-512-10 at batch 128: forward (nn), weight gradient (tn), input gradient (nt).
    for &(m, n, k) in &[(128, 512, 784), (128, 512, 512), (128, 10, 512)] {
        shapes.push((m, n, k, false, false));
    }
    shapes.push((784, 512, 128, true, false));
    shapes.push((128, 784, 512, false, true));
    let t = squares.iter().copied().max().unwrap_or(256).min(4096);
    for (ta, tb) in [(false, true), (true, false), (true, true)] {
        shapes.push((t, t, t, ta, tb));
    }
    shapes
        .into_iter()
        .map(|(m, n, k, ta, tb)| {
            let tag = format!("{}{}", if ta { 't' } else { 'n' }, if tb { 't' } else { 'n' });
            Case {
                family: "gemm",
                name: format!("{tag} {m}x{n}x{k}"),
                work: Work::Flops(2.0 * m as f64 * n as f64 * k as f64),
                run: gemm_run(d, m, n, k, ta, tb),
                peer: peer(m, n, k, ta, tb),
            }
        })
        .collect()
}

/// Memory-bound cases at `n` elements, each with a copy of the same size as its peer.
pub fn memory_cases<B: Ops>(d: &B, n: usize) -> Vec<Case> {
    let f = 4.0 * n as f64;
    let mut v = Vec::new();
    let mut add = |family: &'static str, name: &str, bytes: f64, run: Run| {
        // The peer copies as many bytes as the kernel moves: bytes / 8 floats each way.
        let copy_n = ((bytes / 8.0) as usize).max(1);
        v.push(Case {
            family,
            name: format!("{name} n={n}"),
            work: Work::Bytes(bytes),
            run,
            peer: Some(("copy", copy_run(d, copy_n))),
        });
    };
    for act in [Activation::Relu, Activation::GeluTanh, Activation::GeluErf, Activation::Silu] {
        let dd = d.clone();
        let (x, mut y) = (buf(d, 1, n), buf(d, 2, n));
        add(
            "activation",
            &format!("{act} forward"),
            2.0 * f,
            Box::new(move || dd.act_forward(act, &B::view(&x), &mut B::view_mut(&mut y)).unwrap()),
        );
        let dd = d.clone();
        let (z, dy, mut dx) = (buf(d, 1, n), buf(d, 2, n), buf(d, 3, n));
        add(
            "activation",
            &format!("{act} backward"),
            3.0 * f,
            Box::new(move || dd.act_backward(act, &B::view(&z), &B::view(&dy), &mut B::view_mut(&mut dx)).unwrap()),
        );
    }
    {
        let dd = d.clone();
        let (x, mut y) = (buf(d, 1, n), buf(d, 2, n));
        add("reduce", "axpy", 3.0 * f, Box::new(move || dd.axpy(0.5, &B::view(&x), &mut B::view_mut(&mut y)).unwrap()));
        let dd = d.clone();
        let (a, b, mut o) = (buf(d, 1, n), buf(d, 2, n), buf(d, 3, n));
        add(
            "reduce",
            "sum_scaled k=2",
            3.0 * f,
            Box::new(move || dd.sum_scaled(&[&B::view(&a), &B::view(&b)], 0.5, &mut B::view_mut(&mut o)).unwrap()),
        );
        let dd = d.clone();
        let x = buf(d, 1, n);
        add(
            "reduce",
            "l2_norm",
            f,
            Box::new(move || {
                let _ = dd.l2_norm(&B::view(&x)).unwrap();
            }),
        );
        let cols = 512;
        let rows = (n / cols).max(1);
        let dd = d.clone();
        let (x, mut o) = (buf(d, 1, rows * cols), buf(d, 2, cols));
        add(
            "reduce",
            &format!("col_sum {rows}x{cols}"),
            4.0 * (rows * cols + cols) as f64,
            Box::new(move || dd.col_sum(rows, cols, &B::view(&x), 0.0, &mut B::view_mut(&mut o)).unwrap()),
        );
    }
    {
        let cols = 1000;
        let rows = (n / cols).max(1);
        let dd = d.clone();
        let logits = buf(d, 1, rows * cols);
        let labels = d.upload(&(0..rows).map(|i| (i % cols) as i32).collect::<Vec<_>>()).unwrap();
        let mut dl = buf(d, 2, rows * cols);
        add(
            "loss",
            &format!("xent fwd+bwd {rows}x{cols}"),
            8.0 * (rows * cols) as f64,
            Box::new(move || {
                let _ = dd
                    .xent_backward(rows, cols, &B::view(&logits), &B::view(&labels), &mut B::view_mut(&mut dl))
                    .unwrap();
            }),
        );
        let dd = d.clone();
        let (p, t, mut g) = (buf(d, 1, n), buf(d, 2, n), buf(d, 3, n));
        add(
            "loss",
            "mse fwd+bwd",
            5.0 * f,
            Box::new(move || {
                let _ = dd.mse_backward(&B::view(&p), &B::view(&t), &mut B::view_mut(&mut g)).unwrap();
            }),
        );
    }
    {
        let sgd = Sgd { lr: 0.01, momentum: 0.9, weight_decay: 0.0 };
        let dd = d.clone();
        let (mut w, g, mut m) = (buf(d, 1, n), buf(d, 2, n), buf(d, 3, n));
        add(
            "optim",
            "sgd momentum",
            5.0 * f,
            Box::new(move || {
                dd.sgd_step(&sgd, 1.0, &mut B::view_mut(&mut w), &B::view(&g), &mut B::view_mut(&mut m)).unwrap()
            }),
        );
        let adam = AdamW::default();
        let dd = d.clone();
        let (mut w, g, mut m, mut v2) = (buf(d, 1, n), buf(d, 2, n), buf(d, 3, n), d.alloc::<f32>(n).unwrap());
        add(
            "optim",
            "adamw",
            7.0 * f,
            Box::new(move || {
                dd.adamw_step(
                    &adam,
                    10,
                    1.0,
                    &mut B::view_mut(&mut w),
                    &B::view(&g),
                    &mut B::view_mut(&mut m),
                    &mut B::view_mut(&mut v2),
                )
                .unwrap()
            }),
        );
    }
    {
        // The GPT's shapes: rows of 128 (the default job) and 768 (GPT-2 small) channels.
        for c in [128usize, 768] {
            let rows = (n / c).max(1);
            let dd = d.clone();
            let (x, g, b) = (buf(d, 1, rows * c), buf(d, 2, c), buf(d, 3, c));
            let (mut y, mut m, mut s) = (buf(d, 4, rows * c), buf(d, 5, rows), buf(d, 6, rows));
            add(
                "transformer",
                &format!("layernorm fwd {rows}x{c}"),
                4.0 * (2 * rows * c + 2 * rows) as f64,
                Box::new(move || {
                    dd.layernorm_forward(
                        c,
                        1e-5,
                        &B::view(&x),
                        &B::view(&g),
                        &B::view(&b),
                        &mut B::view_mut(&mut y),
                        &mut B::view_mut(&mut m),
                        &mut B::view_mut(&mut s),
                    )
                    .unwrap()
                }),
            );
            let dd = d.clone();
            let (x, dy, g, m, s) =
                (buf(d, 1, rows * c), buf(d, 2, rows * c), buf(d, 3, c), buf(d, 4, rows), buf(d, 5, rows));
            let (mut dx, mut dg, mut db) = (buf(d, 6, rows * c), buf(d, 7, c), buf(d, 8, c));
            add(
                "transformer",
                &format!("layernorm bwd {rows}x{c}"),
                // x and dy read twice (dx, then the parameters' sums), dx written.
                4.0 * (5 * rows * c) as f64,
                Box::new(move || {
                    dd.layernorm_backward(
                        c,
                        &B::view(&x),
                        &B::view(&dy),
                        &B::view(&g),
                        &B::view(&m),
                        &B::view(&s),
                        &mut B::view_mut(&mut dx),
                        0.0,
                        &mut B::view_mut(&mut dg),
                        &mut B::view_mut(&mut db),
                    )
                    .unwrap()
                }),
            );
            // Causal attention at the default GPT job's shape (t 64, 4 heads), as many
            // sequences as fill n: bytes of qkv read and out written (the scores stay on chip).
            let (t, heads) = (64usize, 4usize);
            let seqs = (rows / t).max(1);
            let dd = d.clone();
            let (qkv, mut o, mut l) =
                (buf(d, 1, seqs * t * 3 * c), buf(d, 2, seqs * t * c), buf(d, 3, seqs * t * heads));
            add(
                "transformer",
                &format!("attention fwd {seqs}x{t}x{c} heads {heads}"),
                4.0 * (4 * seqs * t * c) as f64,
                Box::new(move || {
                    dd.attention_forward(
                        t,
                        c,
                        heads,
                        &B::view(&qkv),
                        &mut B::view_mut(&mut o),
                        &mut B::view_mut(&mut l),
                    )
                    .unwrap()
                }),
            );
            let (t, vocab) = (64usize, 65usize);
            let rows = (rows / t).max(1) * t;
            let dd = d.clone();
            let ids = d.upload(&(0..rows).map(|i| ((i * 7) % vocab) as f32).collect::<Vec<_>>()).unwrap();
            let (wte, wpe, mut out) = (buf(d, 1, vocab * c), buf(d, 2, t * c), buf(d, 3, rows * c));
            add(
                "transformer",
                &format!("embedding fwd {rows}x{c}"),
                4.0 * (3 * rows * c) as f64,
                Box::new(move || {
                    dd.embed_forward(t, c, &B::view(&ids), &B::view(&wte), &B::view(&wpe), &mut B::view_mut(&mut out))
                        .unwrap()
                }),
            );
        }
    }
    v
}

/// The CPU device the benches use.
pub fn cpu() -> CpuDevice {
    CpuDevice::new(0)
}
