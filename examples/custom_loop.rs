//! A custom training loop written from tessera's ops on tensors, without the trainer: a
//! two-layer classifier (Linear + GELU, Linear) on a synthetic teacher's labels, with an AdamW
//! object that owns its moments. Every op reads its sizes from the tensors' shapes and refuses
//! a mismatch. It is what a researcher starts from to try something the trainer does not do.
//!
//! `cargo run --release --example custom_loop` (add `-- cuda` to run it on GPU 0).

use tessera::data::Dataset;
use tessera::ops::shaped::MatMul;
use tessera::{Activation, AdamW, Backend, CpuDevice, CudaDevice, Ops, Optimizer, Result, Tensor};

fn train<B: Ops>(dev: &B) -> Result<(f32, f32)> {
    let (inputs, hidden, classes, batch) = (20, 64, 5, 100);
    let data = Dataset::synthetic(batch, &[inputs, 48, classes], 1)?;
    let mut rng = tessera::rng::Rng::new(0);
    let s1 = (6.0 / inputs as f32).sqrt();
    let s2 = (6.0 / (hidden + classes) as f32).sqrt();

    // Parameters and their gradients: plain tensors, whose shapes every op reads and checks.
    let mut w1 = Tensor::from_vec(dev, &[inputs, hidden], rng.vec(inputs * hidden, -s1, s1))?;
    let mut b1 = Tensor::<B>::zeros(dev, &[hidden])?;
    let mut w2 = Tensor::from_vec(dev, &[hidden, classes], rng.vec(hidden * classes, -s2, s2))?;
    let mut b2 = Tensor::<B>::zeros(dev, &[classes])?;
    let zeros_like = |t: &Tensor<B>| Tensor::<B>::zeros(dev, t.shape());
    let (mut gw1, mut gb1, mut gw2, mut gb2) = (zeros_like(&w1)?, zeros_like(&b1)?, zeros_like(&w2)?, zeros_like(&b2)?);
    // AdamW owns its moments, one pair per parameter.
    let mut opt = Optimizer::new(dev, AdamW { lr: 1e-2, ..AdamW::default() }, &[&w1, &b1, &w2, &b2])?;

    let x = Tensor::from_slice(dev, &[batch, inputs], &data.x)?;
    let y = Tensor::<B, i32>::from_slice(dev, &[batch], &data.y)?;
    let mut z1 = Tensor::<B>::zeros(dev, &[batch, hidden])?;
    let mut h1 = zeros_like(&z1)?;
    let mut logits = Tensor::<B>::zeros(dev, &[batch, classes])?;
    let mut dlogits = zeros_like(&logits)?;
    let (mut dh1, mut dz1) = (zeros_like(&z1)?, zeros_like(&z1)?);

    let mut first = None;
    let mut loss = 0.0;
    for _ in 0..200 {
        // Forward: two fused GEMM launches (bias and GELU in the first one's epilogue), the
        // pre-activation z1 kept for backward.
        MatMul::new(&x, &w1)
            .bias(&b1)
            .activation(Activation::GeluTanh)
            .run_keeping_preactivation(dev, &mut z1, &mut h1)?;
        MatMul::new(&h1, &w2).bias(&b2).run(dev, &mut logits)?;
        // Loss and its gradient in one pass.
        loss = logits.cross_entropy_backward(dev, &y, &mut dlogits)?;
        first.get_or_insert(loss);
        // Backward: dW2 = h1^T dlogits, db2, dh1 = dlogits W2^T, through GELU, dW1, db1.
        MatMul::new(&h1, &dlogits).trans_a().run(dev, &mut gw2)?;
        dlogits.col_sum(dev, 0.0, &mut gb2)?;
        MatMul::new(&dlogits, &w2).trans_b().run(dev, &mut dh1)?;
        Tensor::activation_backward(dev, Activation::GeluTanh, &z1, &dh1, &mut dz1)?;
        MatMul::new(&x, &dz1).trans_a().run(dev, &mut gw1)?;
        dz1.col_sum(dev, 0.0, &mut gb1)?;
        // One AdamW step over the four tensors.
        opt.step(dev, &mut [&mut w1, &mut b1, &mut w2, &mut b2], &[&gw1, &gb1, &gw2, &gb2])?;
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
