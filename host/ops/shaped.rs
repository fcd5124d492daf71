//! The op families on [`Tensor`]s: m, n, k and lengths come from the tensors' shapes, and a
//! mismatch is refused with the shapes named (a transposed operand with the right element count
//! included). The explicit style, device views with the sizes given (`dev.gemm(&Gemm::new(m,
//! n, k), ...)`), stays for those who keep their own buffers.
//!
//! ```
//! use tessera::prelude::*;
//! use tessera::ops::shaped::MatMul;
//!
//! # fn main() -> Result<()> {
//! let dev = CpuDevice::new(0);
//! let x = Tensor::from_vec(&dev, &[2, 3], vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0])?;
//! let w = Tensor::from_vec(&dev, &[3, 2], vec![1.0f32, -1.0, 0.5, 0.5, 0.0, 1.0])?;
//! let b = Tensor::from_vec(&dev, &[2], vec![0.1f32, -10.0])?;
//! // y = relu(x w + b), and the pre-activation kept for backward: one launch on a GPU.
//! let mm = MatMul::new(&x, &w).bias(&b).activation(Activation::Relu);
//! let (mut pre, mut y) = (mm.output(&dev)?, mm.output(&dev)?);
//! mm.run_keeping_preactivation(&dev, &mut pre, &mut y)?;
//! assert_eq!(y.to_vec(&dev)?, vec![2.1, 0.0, 6.6, 0.0]);
//! // A weight of the wrong orientation is caught, though it holds the same six values.
//! let wt = Tensor::from_vec(&dev, &[2, 3], vec![0.0f32; 6])?;
//! assert!(MatMul::new(&x, &wt).output(&dev).is_err());
//! # Ok(())
//! # }
//! ```

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::ops::activation::{Activation, ActivationOps};
use crate::ops::gemm::{Gemm, GemmOps};
use crate::ops::loss::LossOps;
use crate::ops::reduce::ReduceOps;
use crate::tensor::Tensor;

/// `(rows, cols)` of a 2-D tensor, or an error naming `what`.
fn matrix<B: Backend, T: crate::Elem>(op: &'static str, what: &str, t: &Tensor<B, T>) -> Result<(usize, usize)> {
    match *t.shape() {
        [r, c] => Ok((r, c)),
        ref s => Err(Error::shape(op, format!("{what} must be a matrix (2-D), it is {s:?}"))),
    }
}

/// An error unless `t` has shape `want`.
fn expect_shape<B: Backend, T: crate::Elem>(
    op: &'static str,
    what: &str,
    t: &Tensor<B, T>,
    want: &[usize],
) -> Result<()> {
    if t.shape() != want {
        return Err(Error::shape(op, format!("{what} is {:?}, expected {want:?}", t.shape())));
    }
    Ok(())
}

/// `out = act(alpha * op(a) op(b) + beta * out + bias)` with every size read from the
/// operands: `op(a)` is `m x k`, `op(b)` is `k x n`, `bias` is `[n]`, the output `[m, n]`.
/// Built up by name, then run into one output ([`MatMul::run`]) or into the pre-activation and
/// the activation ([`MatMul::run_keeping_preactivation`], what backward needs).
pub struct MatMul<'a, B: Backend> {
    a: &'a Tensor<B>,
    b: &'a Tensor<B>,
    bias: Option<&'a Tensor<B>>,
    trans_a: bool,
    trans_b: bool,
    act: Activation,
    alpha: f32,
    beta: f32,
}

impl<'a, B: GemmOps> MatMul<'a, B> {
    /// `a b`.
    pub fn new(a: &'a Tensor<B>, b: &'a Tensor<B>) -> Self {
        MatMul { a, b, bias: None, trans_a: false, trans_b: false, act: Activation::None, alpha: 1.0, beta: 0.0 }
    }
    /// Uses `a` transposed (`a` is stored `k x m`).
    pub fn trans_a(mut self) -> Self {
        self.trans_a = true;
        self
    }
    /// Uses `b` transposed (`b` is stored `n x k`).
    pub fn trans_b(mut self) -> Self {
        self.trans_b = true;
        self
    }
    /// Adds `bias` (`[n]`) to every row.
    pub fn bias(mut self, bias: &'a Tensor<B>) -> Self {
        self.bias = Some(bias);
        self
    }
    /// Applies `act` after the bias.
    pub fn activation(mut self, act: Activation) -> Self {
        self.act = act;
        self
    }
    /// Scales the product.
    pub fn alpha(mut self, alpha: f32) -> Self {
        self.alpha = alpha;
        self
    }
    /// Adds `beta` times the output's old contents (1: accumulate).
    pub fn beta(mut self, beta: f32) -> Self {
        self.beta = beta;
        self
    }

    /// The GEMM the operands' shapes make, or an error naming the shapes that do not fit.
    pub fn gemm(&self) -> Result<Gemm> {
        const OP: &str = "MatMul";
        let (ar, ac) = matrix(OP, "a", self.a)?;
        let (br, bc) = matrix(OP, "b", self.b)?;
        let (m, k) = if self.trans_a { (ac, ar) } else { (ar, ac) };
        let (k2, n) = if self.trans_b { (bc, br) } else { (br, bc) };
        if k != k2 {
            let ta = if self.trans_a { "^T" } else { "" };
            let tb = if self.trans_b { "^T" } else { "" };
            return Err(Error::shape(
                OP,
                format!(
                    "a{ta} is {m}x{k} and b{tb} is {k2}x{n}: the inner sizes differ (a {:?}, b {:?})",
                    self.a.shape(),
                    self.b.shape()
                ),
            ));
        }
        if let Some(b) = self.bias {
            expect_shape(OP, "the bias", b, &[n])?;
        }
        Ok(Gemm::new(m, n, k)
            .trans_a(self.trans_a)
            .trans_b(self.trans_b)
            .alpha(self.alpha)
            .beta(self.beta)
            .activation(self.act))
    }

    /// A zero-filled tensor of the output's shape `[m, n]`.
    pub fn output(&self, dev: &B) -> Result<Tensor<B>> {
        let g = self.gemm()?;
        Tensor::zeros(dev, &[g.m, g.n])
    }

    /// `out = act(...)`.
    pub fn run(&self, dev: &B, out: &mut Tensor<B>) -> Result<()> {
        let g = self.gemm()?;
        expect_shape("MatMul", "the output", out, &[g.m, g.n])?;
        let bias = self.bias.map(|b| b.view());
        dev.gemm(&g, &self.a.view(), &self.b.view(), bias.as_ref(), &mut out.view_mut(), None)
    }

    /// `pre = alpha * op(a) op(b) + beta * pre + bias` (the pre-activation, which backward
    /// needs) and `post = act(pre)`, in one pass.
    pub fn run_keeping_preactivation(&self, dev: &B, pre: &mut Tensor<B>, post: &mut Tensor<B>) -> Result<()> {
        let g = self.gemm()?;
        expect_shape("MatMul", "the pre-activation output", pre, &[g.m, g.n])?;
        expect_shape("MatMul", "the activation output", post, &[g.m, g.n])?;
        let bias = self.bias.map(|b| b.view());
        dev.gemm(&g, &self.a.view(), &self.b.view(), bias.as_ref(), &mut pre.view_mut(), Some(&mut post.view_mut()))
    }
}

impl<B: ActivationOps> Tensor<B> {
    /// `out = act(self)`; the shapes must be equal.
    pub fn activation(&self, dev: &B, act: Activation, out: &mut Tensor<B>) -> Result<()> {
        expect_shape("activation", "the output", out, self.shape())?;
        dev.act_forward(act, &self.view(), &mut out.view_mut())
    }
    /// `dz = dy * act'(z)`, `z` the pre-activation; the three shapes must be equal.
    pub fn activation_backward(
        dev: &B,
        act: Activation,
        z: &Tensor<B>,
        dy: &Tensor<B>,
        dz: &mut Tensor<B>,
    ) -> Result<()> {
        expect_shape("activation_backward", "dy", dy, z.shape())?;
        expect_shape("activation_backward", "dz", dz, z.shape())?;
        dev.act_backward(act, &z.view(), &dy.view(), &mut dz.view_mut())
    }
}

impl<B: ReduceOps> Tensor<B> {
    /// `out = column sums of self + beta * out`: `self` is `[rows, cols]`, `out` `[cols]`.
    pub fn col_sum(&self, dev: &B, beta: f32, out: &mut Tensor<B>) -> Result<()> {
        let (rows, cols) = matrix("col_sum", "the input", self)?;
        expect_shape("col_sum", "the output", out, &[cols])?;
        dev.col_sum(rows, cols, &self.view(), beta, &mut out.view_mut())
    }
    /// `self += a * x`; the shapes must be equal.
    pub fn axpy(&mut self, dev: &B, a: f32, x: &Tensor<B>) -> Result<()> {
        expect_shape("axpy", "x", x, self.shape())?;
        dev.axpy(a, &x.view(), &mut self.view_mut())
    }
    /// The sum of the elements (of their squares with `squared`).
    pub fn sum(&self, dev: &B, squared: bool) -> Result<f32> {
        dev.sum(&self.view(), squared)
    }
}

impl<B: LossOps> Tensor<B> {
    /// Mean softmax cross-entropy of `self` (logits, `[rows, classes]`) against `labels`
    /// (`[rows]`).
    pub fn cross_entropy(&self, dev: &B, labels: &Tensor<B, i32>) -> Result<f32> {
        let (rows, classes) = matrix("cross_entropy", "the logits", self)?;
        expect_shape("cross_entropy", "the labels", labels, &[rows])?;
        dev.xent(rows, classes, &self.view(), &labels.view())
    }
    /// The mean cross-entropy and its gradient `dlogits = (softmax - onehot) / rows`, same shape
    /// as the logits.
    pub fn cross_entropy_backward(&self, dev: &B, labels: &Tensor<B, i32>, dlogits: &mut Tensor<B>) -> Result<f32> {
        let (rows, classes) = matrix("cross_entropy_backward", "the logits", self)?;
        expect_shape("cross_entropy_backward", "the labels", labels, &[rows])?;
        expect_shape("cross_entropy_backward", "dlogits", dlogits, self.shape())?;
        dev.xent_backward(rows, classes, &self.view(), &labels.view(), &mut dlogits.view_mut())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuDevice;

    #[test]
    fn shapes_are_read_and_mismatches_named() {
        let dev = CpuDevice::new(0);
        let t = |shape: &[usize]| Tensor::<CpuDevice>::zeros(&dev, shape).unwrap();
        let (x, w, wt, b) = (t(&[4, 3]), t(&[3, 5]), t(&[5, 3]), t(&[5]));
        let g = MatMul::new(&x, &w).bias(&b).gemm().unwrap();
        assert_eq!((g.m, g.n, g.k), (4, 5, 3));
        let g = MatMul::new(&x, &wt).trans_b().gemm().unwrap();
        assert_eq!((g.m, g.n, g.k), (4, 5, 3));
        // The transposed weight (same 15 values) without trans_b: refused.
        let e = MatMul::new(&x, &wt).gemm().unwrap_err().to_string();
        assert!(e.contains("a is 4x3 and b is 5x3: the inner sizes differ"), "{e}");
        // dW = x^T dy: 3x4 times 4x5.
        let dy = t(&[4, 5]);
        let g = MatMul::new(&x, &dy).trans_a().gemm().unwrap();
        assert_eq!((g.m, g.n, g.k), (3, 5, 4));
        // An output of the transposed shape is refused, and so is a bias of the wrong length.
        let e = MatMul::new(&x, &w).run(&dev, &mut t(&[5, 4])).unwrap_err().to_string();
        assert!(e.contains("the output is [5, 4], expected [4, 5]"), "{e}");
        let e = MatMul::new(&x, &w).bias(&t(&[3])).gemm().unwrap_err().to_string();
        assert!(e.contains("the bias is [3], expected [5]"), "{e}");
        let e = MatMul::new(&t(&[12]), &w).gemm().unwrap_err().to_string();
        assert!(e.contains("a must be a matrix (2-D), it is [12]"), "{e}");
        // Column sums of a [4, 5] go to a [5]; a [4] is refused.
        let e = dy.col_sum(&dev, 0.0, &mut t(&[4])).unwrap_err().to_string();
        assert!(e.contains("the output is [4], expected [5]"), "{e}");
        let labels = Tensor::<CpuDevice, i32>::zeros(&dev, &[5]).unwrap();
        let e = dy.cross_entropy(&dev, &labels).unwrap_err().to_string();
        assert!(e.contains("the labels is [5], expected [4]") || e.contains("labels"), "{e}");
    }

    #[test]
    fn the_shaped_ops_compute_what_the_explicit_ones_do() {
        let dev = CpuDevice::new(0);
        let mut rng = crate::rng::Rng::new(3);
        let x = Tensor::from_vec(&dev, &[7, 5], rng.vec(35, -1.0, 1.0)).unwrap();
        let w = Tensor::from_vec(&dev, &[5, 3], rng.vec(15, -1.0, 1.0)).unwrap();
        let b = Tensor::from_vec(&dev, &[3], rng.vec(3, -1.0, 1.0)).unwrap();
        let mm = MatMul::new(&x, &w).bias(&b).activation(Activation::Silu);
        let (mut pre, mut post) = (mm.output(&dev).unwrap(), mm.output(&dev).unwrap());
        mm.run_keeping_preactivation(&dev, &mut pre, &mut post).unwrap();
        let (mut z, mut y) = (vec![0f32; 21], vec![0f32; 21]);
        let g = Gemm::new(7, 3, 5).activation(Activation::Silu);
        dev.gemm(&g, &x.view(), &w.view(), Some(&b.view()), &mut z.as_mut_slice(), Some(&mut y.as_mut_slice()))
            .unwrap();
        assert_eq!(pre.to_vec(&dev).unwrap(), z);
        assert_eq!(post.to_vec(&dev).unwrap(), y);
    }
}
