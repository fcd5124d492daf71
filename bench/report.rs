//! The kernel report: every op checked against the f64 reference (worst relative error) and
//! timed beside its peer in the same run (cuBLAS SGEMM or a device copy on a GPU; the `gemm`
//! crate or a memcpy on the CPU). Prints one table per device, last. Not a criterion suite:
//! `cargo bench --bench report` (or the prebuilt binary in `scripts/gpu-check.sh`).
//!
//! `TESSERA_REPORT_QUICK=1` uses small sizes (a smoke run).

mod common;

use std::time::Duration;

use tessera::check::{compare, inputs};
use tessera::reference as r;
use tessera::{Activation, AdamW, Gemm, Ops, Sgd};

use common::{Case, Run, Work};

/// Worst relative error of each op against the reference, at awkward shapes.
fn checks<B: Ops>(d: &B) -> Vec<(String, f64, bool)> {
    let up = |x: &[f32]| d.upload(x).unwrap();
    let down = |b: &B::Buf<f32>| d.download(&B::view(b)).unwrap();
    let mut out = Vec::new();
    let mut record = |name: String, got: &[f32], want: &[f64], atol: f64, rtol: f64| {
        let rep = compare(&name, got, want, atol, rtol);
        if !rep.ok() {
            eprintln!("MISMATCH {rep}");
        }
        out.push((name, rep.max_rel, rep.ok()));
    };
    let (m, n, k) = (257, 129, 67);
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let g = Gemm::new(m, n, k).trans_a(ta).trans_b(tb).activation(Activation::Relu);
        let (a, b, bias) = (inputs(1, m * k, 1.0), inputs(2, k * n, 1.0), inputs(3, n, 1.0));
        let (ab, bb, biasb) = (up(&a), up(&b), up(&bias));
        let mut c = up(&vec![f32::NAN; m * n]);
        let mut y = up(&vec![f32::NAN; m * n]);
        d.gemm(
            &g,
            &B::view(&ab),
            &B::view(&bb),
            Some(&B::view(&biasb)),
            &mut B::view_mut(&mut c),
            Some(&mut B::view_mut(&mut y)),
        )
        .unwrap();
        let (_, want) = r::gemm(&g, &a, &b, Some(&bias), &[]);
        let tag = format!("{}{}", if ta { 't' } else { 'n' }, if tb { 't' } else { 'n' });
        record(format!("gemm {tag} (+bias+relu)"), &down(&y), &want, 1e-4, 1e-4);
    }
    let nn = 70_001;
    let x = inputs(4, nn, 5.0);
    let dy = inputs(5, nn, 1.0);
    let (xb, dyb) = (up(&x), up(&dy));
    for act in Activation::ALL {
        let mut y = up(&vec![f32::NAN; nn]);
        d.act_forward(act, &B::view(&xb), &mut B::view_mut(&mut y)).unwrap();
        record(
            format!("{act} forward"),
            &down(&y),
            &x.iter().map(|&z| r::act(act, z as f64)).collect::<Vec<_>>(),
            1e-6,
            1e-5,
        );
        d.act_backward(act, &B::view(&xb), &B::view(&dyb), &mut B::view_mut(&mut y)).unwrap();
        let want: Vec<f64> = x.iter().zip(&dy).map(|(&z, &g)| g as f64 * r::act_grad(act, z as f64)).collect();
        record(format!("{act} backward"), &down(&y), &want, 1e-6, 1e-5);
    }
    let mut y = up(&dy);
    d.axpy(0.5, &B::view(&xb), &mut B::view_mut(&mut y)).unwrap();
    record(
        "axpy".into(),
        &down(&y),
        &x.iter().zip(&dy).map(|(&a, &b)| b as f64 + 0.5 * a as f64).collect::<Vec<_>>(),
        1e-6,
        1e-5,
    );
    let mut o = up(&vec![f32::NAN; nn]);
    d.sum_scaled(&[&B::view(&xb), &B::view(&dyb)], 0.5, &mut B::view_mut(&mut o)).unwrap();
    record("sum_scaled".into(), &down(&o), &r::sum_scaled(&[&x, &dy], 0.5), 1e-6, 1e-5);
    let norm = d.l2_norm(&B::view(&xb)).unwrap();
    record("l2_norm".into(), &[norm], &[r::sum(&x, true).sqrt()], 0.0, 1e-5);
    let (rows, cols) = (1000, 67);
    let xc = inputs(6, rows * cols, 1.0);
    let mut cs = up(&vec![f32::NAN; cols]);
    d.col_sum(rows, cols, &B::view(&up(&xc)), 0.0, &mut B::view_mut(&mut cs)).unwrap();
    record("col_sum".into(), &down(&cs), &r::col_sum(rows, cols, &xc, 0.0, &[]), 1e-5, 1e-5);
    let (rows, cols) = (300, 1000);
    let logits = inputs(7, rows * cols, 8.0);
    let labels: Vec<i32> = (0..rows).map(|i| (i * 7 % cols) as i32).collect();
    let (lb, yb) = (up(&logits), d.upload(&labels).unwrap());
    let mut dl = up(&vec![f32::NAN; rows * cols]);
    let loss = d.xent_backward(rows, cols, &B::view(&lb), &B::view(&yb), &mut B::view_mut(&mut dl)).unwrap();
    let (rl, grad) = r::xent(rows, cols, &logits, &labels, 1.0 / rows as f64);
    record("xent fwd+bwd (loss)".into(), &[loss], &[rl.iter().sum::<f64>() / rows as f64], 0.0, 1e-5);
    record("xent fwd+bwd (grad)".into(), &down(&dl), &grad, 1e-7, 1e-4);
    let t = inputs(8, nn, 1.0);
    let mut g = up(&vec![f32::NAN; nn]);
    let l = d.mse_backward(&B::view(&xb), &B::view(&up(&t)), &mut B::view_mut(&mut g)).unwrap();
    record("mse (loss)".into(), &[l], &[r::mse(&x, &t)], 0.0, 1e-5);
    let sgd = Sgd { lr: 0.1, momentum: 0.9, weight_decay: 0.01 };
    let (mut w, mut mom) = (up(&x), up(&dy));
    d.sgd_step(&sgd, 0.7, &mut B::view_mut(&mut w), &B::view(&up(&t)), &mut B::view_mut(&mut mom)).unwrap();
    record("sgd momentum".into(), &down(&w), &r::sgd(&sgd, 0.7, &x, &t, &dy).0, 1e-6, 1e-5);
    let adam = AdamW::default();
    let v0: Vec<f32> = dy.iter().map(|v| v * v).collect();
    let (mut w, mut m1, mut v1) = (up(&x), up(&dy), up(&v0));
    d.adamw_step(
        &adam,
        3,
        0.7,
        &mut B::view_mut(&mut w),
        &B::view(&up(&t)),
        &mut B::view_mut(&mut m1),
        &mut B::view_mut(&mut v1),
    )
    .unwrap();
    record("adamw".into(), &down(&w), &r::adamw(&adam, 3, 0.7, &x, &t, &dy, &v0).0, 1e-6, 1e-5);
    out
}

/// Best time per run over three batches of about 0.2 s each.
fn measure(run: &mut Run, sync: &dyn Fn()) -> Duration {
    let one = common::time_runs(run, sync, 1).max(Duration::from_micros(1));
    let iters = (Duration::from_millis(200).as_secs_f64() / one.as_secs_f64()).clamp(2.0, 2000.0) as u64;
    (0..3).map(|_| common::time_runs(run, sync, iters) / iters as u32).min().unwrap()
}

fn rate(work: Work, t: Duration) -> String {
    match work {
        Work::Flops(f) => format!("{:.1} GFLOP/s", f / t.as_secs_f64() / 1e9),
        Work::Bytes(b) => format!("{:.1} GB/s", b / t.as_secs_f64() / 1e9),
    }
}

fn report<B: Ops>(d: &B, title: &str, cases: Vec<Case>) -> bool {
    let checks = checks(d);
    let sync = || d.synchronize().unwrap();
    println!("\n## {title}\n");
    println!("| kernel | max rel err | tessera | peer | peer rate | ratio |");
    println!("|---|---|---|---|---|---|");
    let mut all_ok = true;
    for (name, rel, ok) in &checks {
        all_ok &= ok;
        println!("| {name} | {rel:.2e}{} | | | | |", if *ok { "" } else { " FAIL" });
    }
    for mut c in cases {
        let t = measure(&mut c.run, &sync);
        let (peer, peer_rate, ratio) = match c.peer.as_mut() {
            Some((name, p)) => {
                let tp = measure(p, &sync);
                (name.to_string(), rate(c.work, tp), format!("{:.2}", tp.as_secs_f64() / t.as_secs_f64()))
            }
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!("| {} {} | | {} | {peer} | {peer_rate} | {ratio} |", c.family, c.name, rate(c.work, t));
    }
    println!(
        "\nratio = peer time / tessera time (above 1: tessera is faster). {}",
        if all_ok { "All kernels match the reference." } else { "SOME KERNELS FAILED." }
    );
    all_ok
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken.
    let quick = std::env::var("TESSERA_REPORT_QUICK").is_ok();
    let cpu = common::cpu();
    let sq: &[usize] = if quick { &[128] } else { &[512, 1024] };
    let cases =
        common::gemm_cases(&cpu, sq, &|m, n, k, ta, tb| Some(("gemm-crate", common::gemm_crate_run(m, n, k, ta, tb))));
    let mut cases = cases;
    cases.extend(common::memory_cases(&cpu, if quick { 1 << 14 } else { 1 << 22 }));
    let title = format!("cpu ({} threads)", rayon::current_num_threads());
    let mut ok = report(&cpu, &title, cases);
    if let Some(gpu) = common::gpu() {
        let info = gpu.info().clone();
        let g2 = gpu.clone();
        let sq: &[usize] = if quick { &[256] } else { &[1024, 2048, 4096, 8192] };
        let mut cases = common::gemm_cases(&gpu, sq, &move |m, n, k, ta, tb| {
            common::cublas_run(&g2, m, n, k, ta, tb).map(|r| ("cublas", r))
        });
        cases.extend(common::memory_cases(&gpu, if quick { 1 << 16 } else { 1 << 26 }));
        let title = format!(
            "{} (compute capability {}.{}, driver {}, {} SMs)",
            info.name, info.compute_capability.0, info.compute_capability.1, info.driver_version, info.sms
        );
        ok &= report(&gpu, &title, cases);
    }
    if !ok {
        std::process::exit(1);
    }
}
