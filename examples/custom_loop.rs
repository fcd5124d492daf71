//! A custom training loop written from tessera's low-level ops, without the trainer: a
//! two-layer classifier (Linear + GELU, Linear) on a synthetic teacher's labels, with AdamW.
//! It is what a researcher starts from to try something the trainer does not do.
//!
//! `cargo run --release --example custom_loop` (add `-- cuda` to run it on GPU 0).

use tessera::data::Dataset;
use tessera::{Activation, AdamW, Backend, CpuDevice, CudaDevice, Gemm, Ops, Result, Tensor};

fn train<B: Ops>(dev: &B) -> Result<(f32, f32)> {
    let (inputs, hidden, classes, batch) = (20, 64, 5, 100);
    let data = Dataset::synthetic(batch, &[inputs, 48, classes], 1)?;
    let mut rng = tessera::rng::Rng::new(0);
    let s1 = (6.0 / inputs as f32).sqrt();
    let s2 = (6.0 / (hidden + classes) as f32).sqrt();

    // Parameters, their gradients and AdamW's moments: plain tensors.
    let mut w1 = Tensor::from_vec(dev, &[inputs, hidden], rng.vec(inputs * hidden, -s1, s1))?;
    let mut b1 = Tensor::<B>::zeros(dev, &[hidden])?;
    let mut w2 = Tensor::from_vec(dev, &[hidden, classes], rng.vec(hidden * classes, -s2, s2))?;
    let mut b2 = Tensor::<B>::zeros(dev, &[classes])?;
    let shapes = [inputs * hidden, hidden, hidden * classes, classes];
    let mut grads: Vec<Tensor<B>> = shapes.iter().map(|&n| Tensor::zeros(dev, &[n])).collect::<Result<_>>()?;
    let mut m: Vec<Tensor<B>> = shapes.iter().map(|&n| Tensor::zeros(dev, &[n])).collect::<Result<_>>()?;
    let mut v: Vec<Tensor<B>> = shapes.iter().map(|&n| Tensor::zeros(dev, &[n])).collect::<Result<_>>()?;

    let x = Tensor::from_slice(dev, &[batch, inputs], &data.x)?;
    let y = Tensor::<B, i32>::from_slice(dev, &[batch], &data.y)?;
    let mut z1 = Tensor::<B>::zeros(dev, &[batch, hidden])?;
    let mut h1 = Tensor::<B>::zeros(dev, &[batch, hidden])?;
    let mut logits = Tensor::<B>::zeros(dev, &[batch, classes])?;
    let mut dlogits = Tensor::<B>::zeros(dev, &[batch, classes])?;
    let mut dh1 = Tensor::<B>::zeros(dev, &[batch, hidden])?;
    let mut dz1 = Tensor::<B>::zeros(dev, &[batch, hidden])?;
    let opt = AdamW { lr: 1e-2, ..AdamW::default() };

    let mut first = None;
    let mut loss = 0.0;
    for step in 1..=200u64 {
        // Forward: two fused GEMM launches (bias and GELU in the first one's epilogue).
        let g1 = Gemm::new(batch, hidden, inputs).activation(Activation::GeluTanh);
        dev.gemm(&g1, &x.view(), &w1.view(), Some(&b1.view()), &mut z1.view_mut(), Some(&mut h1.view_mut()))?;
        dev.gemm(
            &Gemm::new(batch, classes, hidden),
            &h1.view(),
            &w2.view(),
            Some(&b2.view()),
            &mut logits.view_mut(),
            None,
        )?;
        // Loss and its gradient in one pass.
        loss = dev.xent_backward(batch, classes, &logits.view(), &y.view(), &mut dlogits.view_mut())?;
        first.get_or_insert(loss);
        // Backward.
        let [gw1, gb1, gw2, gb2] = &mut grads[..] else { unreachable!() };
        dev.gemm(
            &Gemm::new(hidden, classes, batch).trans_a(true),
            &h1.view(),
            &dlogits.view(),
            None,
            &mut gw2.view_mut(),
            None,
        )?;
        dev.col_sum(batch, classes, &dlogits.view(), 0.0, &mut gb2.view_mut())?;
        dev.gemm(
            &Gemm::new(batch, hidden, classes).trans_b(true),
            &dlogits.view(),
            &w2.view(),
            None,
            &mut dh1.view_mut(),
            None,
        )?;
        dev.act_backward(Activation::GeluTanh, &z1.view(), &dh1.view(), &mut dz1.view_mut())?;
        dev.gemm(
            &Gemm::new(inputs, hidden, batch).trans_a(true),
            &x.view(),
            &dz1.view(),
            None,
            &mut gw1.view_mut(),
            None,
        )?;
        dev.col_sum(batch, hidden, &dz1.view(), 0.0, &mut gb1.view_mut())?;
        // AdamW on each parameter tensor.
        for (i, p) in [&mut w1, &mut b1, &mut w2, &mut b2].into_iter().enumerate() {
            let (mi, vi) = (&mut m[i], &mut v[i]);
            dev.adamw_step(
                &opt,
                step,
                1.0,
                &mut p.view_mut(),
                &grads[i].view(),
                &mut mi.view_mut(),
                &mut vi.view_mut(),
            )?;
        }
    }
    dev.synchronize()?;
    Ok((first.unwrap(), loss))
}

fn main() -> Result<()> {
    let (first, last, name) = if std::env::args().nth(1).as_deref() == Some("cuda") {
        let d = CudaDevice::new(0)?;
        let (a, b) = train(&d)?;
        (a, b, d.name())
    } else {
        let d = CpuDevice::new(0);
        let (a, b) = train(&d)?;
        (a, b, d.name())
    };
    println!("{name}: loss fell from {first:.4} to {last:.4} in 200 steps");
    let halved = last < 0.5 * first;
    if !halved {
        eprintln!("the loss did not halve: something is wrong");
        std::process::exit(1);
    }
    Ok(())
}
