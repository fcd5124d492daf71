//! Plain f64 reference implementations of every op, kept apart from the fast code and written
//! for obviousness, not speed. Tests and `scripts/gpu-check.sh` compare each backend with these.

use crate::ops::activation::Activation;
use crate::ops::gemm::Gemm;
use crate::ops::optim::{AdamW, Sgd};

/// `act(z)` in f64, in forms that do not cancel in the tails (GELU through `erfc` and a
/// sigmoid, not `1 + erf` and `1 + tanh`), so they are exact to f64 rounding wherever the f32
/// result is representable.
pub fn act(a: Activation, z: f64) -> f64 {
    let sig = |z: f64| 1.0 / (1.0 + (-z).exp());
    match a {
        Activation::None => z,
        Activation::Relu => z.max(0.0),
        Activation::GeluTanh => z * sig(2.0 * gelu_tanh_u(z)),
        Activation::GeluErf => 0.5 * z * libm::erfc(-z / std::f64::consts::SQRT_2),
        Activation::Silu => z * sig(z),
    }
}

/// `sqrt(2/pi) (z + 0.044715 z^3)`, the argument of GELU's tanh.
fn gelu_tanh_u(z: f64) -> f64 {
    (2.0 / std::f64::consts::PI).sqrt() * (z + 0.044715 * z * z * z)
}

/// `act'(z)` in f64, analytically (`relu'(0) = 0`), in the same tail-safe forms as [`act`].
pub fn act_grad(a: Activation, z: f64) -> f64 {
    let sig = |z: f64| 1.0 / (1.0 + (-z).exp());
    match a {
        Activation::None => 1.0,
        Activation::Relu => (z > 0.0) as i32 as f64,
        Activation::GeluTanh => {
            // d/dz z sigmoid(2u) = s + z 2 s (1 - s) du/dz, with 1 - s = sigmoid(-2u).
            let u = gelu_tanh_u(z);
            let c = (2.0 / std::f64::consts::PI).sqrt();
            sig(2.0 * u) + 2.0 * z * sig(2.0 * u) * sig(-2.0 * u) * c * (1.0 + 3.0 * 0.044715 * z * z)
        }
        Activation::GeluErf => {
            0.5 * libm::erfc(-z / std::f64::consts::SQRT_2)
                + z * (-0.5 * z * z).exp() / (2.0 * std::f64::consts::PI).sqrt()
        }
        Activation::Silu => sig(z) * (1.0 + z * sig(-z)),
    }
}

/// erf in f64 (libm's, correctly rounded to a few ulp).
pub fn erf(x: f64) -> f64 {
    libm::erf(x)
}

/// Reference GEMM with the epilogue: returns `(c, act_out)` where `c` is the pre-activation.
pub fn gemm(g: &Gemm, a: &[f32], b: &[f32], bias: Option<&[f32]>, c_in: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let (m, n, k) = (g.m, g.n, g.k);
    let av = |i: usize, p: usize| if g.trans_a { a[p * m + i] } else { a[i * k + p] } as f64;
    let bv = |p: usize, j: usize| if g.trans_b { b[j * k + p] } else { b[p * n + j] } as f64;
    let mut c = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f64;
            for p in 0..k {
                s += av(i, p) * bv(p, j);
            }
            let mut v = g.alpha as f64 * s;
            if g.beta != 0.0 {
                v += g.beta as f64 * c_in[i * n + j] as f64;
            }
            if let Some(bias) = bias {
                v += bias[j] as f64;
            }
            c[i * n + j] = v;
        }
    }
    let out = c.iter().map(|&z| act(g.act, z)).collect();
    (c, out)
}

/// Column sums `beta*out + sum_i x[i, :]`.
pub fn col_sum(rows: usize, cols: usize, x: &[f32], beta: f32, out_in: &[f32]) -> Vec<f64> {
    (0..cols)
        .map(|j| {
            let s: f64 = (0..rows).map(|i| x[i * cols + j] as f64).sum();
            if beta != 0.0 {
                s + beta as f64 * out_in[j] as f64
            } else {
                s
            }
        })
        .collect()
}

/// `scale * sum of srcs`.
pub fn sum_scaled(srcs: &[&[f32]], scale: f32) -> Vec<f64> {
    (0..srcs[0].len()).map(|i| scale as f64 * srcs.iter().map(|s| s[i] as f64).sum::<f64>()).collect()
}

/// Sum of `x` or of its squares.
pub fn sum(x: &[f32], squared: bool) -> f64 {
    x.iter().map(|&v| if squared { v as f64 * v as f64 } else { v as f64 }).sum()
}

/// Per-row softmax cross-entropy losses and `(softmax - onehot) * scale`.
pub fn xent(rows: usize, cols: usize, logits: &[f32], labels: &[i32], scale: f64) -> (Vec<f64>, Vec<f64>) {
    let mut loss = Vec::with_capacity(rows);
    let mut grad = vec![0f64; rows * cols];
    for r in 0..rows {
        let row: Vec<f64> = logits[r * cols..(r + 1) * cols].iter().map(|&x| x as f64).collect();
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = row.iter().map(|x| (x - max).exp()).sum();
        let l = labels[r] as usize;
        // log1p of the other classes' terms relative to the label's: no cancellation when the
        // label holds the largest logit and the loss is small.
        let others: f64 = row.iter().enumerate().filter(|&(c, _)| c != l).map(|(_, x)| (x - row[l]).exp()).sum();
        loss.push(if max - row[l] < 30.0 { others.ln_1p() } else { max + sum.ln() - row[l] });
        for c in 0..cols {
            grad[r * cols + c] = scale * ((row[c] - max).exp() / sum - if c == l { 1.0 } else { 0.0 });
        }
    }
    (loss, grad)
}

/// Mean squared error.
pub fn mse(pred: &[f32], target: &[f32]) -> f64 {
    pred.iter().zip(target).map(|(p, t)| (*p as f64 - *t as f64).powi(2)).sum::<f64>() / pred.len() as f64
}

/// One SGD step: returns `(w, mom)`.
pub fn sgd(o: &Sgd, s: f32, w: &[f32], g: &[f32], mom: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let mut wo = Vec::new();
    let mut mo = Vec::new();
    for i in 0..w.len() {
        let gg = s as f64 * g[i] as f64 + o.weight_decay as f64 * w[i] as f64;
        let m = o.momentum as f64 * mom[i] as f64 + gg;
        wo.push(w[i] as f64 - o.lr as f64 * m);
        mo.push(m);
    }
    (wo, mo)
}

/// One AdamW step number `t`: returns `(w, m, v)`.
pub fn adamw(o: &AdamW, t: u64, s: f32, w: &[f32], g: &[f32], m: &[f32], v: &[f32]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (b1, b2) = (o.beta1 as f64, o.beta2 as f64);
    let bc1 = 1.0 - b1.powi(t as i32);
    let bc2 = 1.0 - b2.powi(t as i32);
    let (mut wo, mut mo, mut vo) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..w.len() {
        let gg = s as f64 * g[i] as f64;
        let mm = b1 * m[i] as f64 + (1.0 - b1) * gg;
        let vv = b2 * v[i] as f64 + (1.0 - b2) * gg * gg;
        let lr = o.lr as f64;
        wo.push(
            w[i] as f64 * (1.0 - lr * o.weight_decay as f64) - lr * (mm / bc1) / ((vv / bc2).sqrt() + o.eps as f64),
        );
        mo.push(mm);
        vo.push(vv);
    }
    (wo, mo, vo)
}

/// Token + position embedding: `out[r] = wte[ids[r]] + wpe[r % t]` (rows of `c`).
pub fn embed(t: usize, c: usize, ids: &[f32], wte: &[f32], wpe: &[f32]) -> Vec<f64> {
    let mut out = vec![0f64; ids.len() * c];
    for (r, &id) in ids.iter().enumerate() {
        let tok = id as usize;
        for j in 0..c {
            out[r * c + j] = wte[tok * c + j] as f64 + wpe[(r % t) * c + j] as f64;
        }
    }
    out
}

/// The embedding tables' gradients: `dwte = keep.0 * dwte_in + ` each token's rows of `dout`,
/// `dwpe[p] = keep.1 * dwpe_in[p] + ` position `p`'s rows, for `p < t` (the rest kept as given).
pub fn embed_backward(
    t: usize,
    c: usize,
    ids: &[f32],
    dout: &[f32],
    keep: (f32, f32),
    dwte_in: &[f32],
    dwpe_in: &[f32],
) -> (Vec<f64>, Vec<f64>) {
    let (k0, k1) = (keep.0 as f64, keep.1 as f64);
    let mut dwte: Vec<f64> = dwte_in.iter().map(|&v| if keep.0 != 0.0 { k0 * v as f64 } else { 0.0 }).collect();
    let mut dwpe: Vec<f64> = dwpe_in
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            if i >= t * c {
                v as f64
            } else if keep.1 != 0.0 {
                k1 * v as f64
            } else {
                0.0
            }
        })
        .collect();
    for (r, &id) in ids.iter().enumerate() {
        for j in 0..c {
            dwte[id as usize * c + j] += dout[r * c + j] as f64;
            dwpe[(r % t) * c + j] += dout[r * c + j] as f64;
        }
    }
    (dwte, dwpe)
}

/// LayerNorm over rows of `c` (biased variance): `(y, mean, rstd)`.
pub fn layernorm(c: usize, eps: f32, x: &[f32], gamma: &[f32], beta: &[f32]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let rows = x.len() / c;
    let (mut y, mut mean, mut rstd) = (vec![0f64; x.len()], vec![0f64; rows], vec![0f64; rows]);
    for r in 0..rows {
        let xr = &x[r * c..][..c];
        let mu = xr.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
        let var = xr.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / c as f64;
        let rs = 1.0 / (var + eps as f64).sqrt();
        for j in 0..c {
            y[r * c + j] = (xr[j] as f64 - mu) * rs * gamma[j] as f64 + beta[j] as f64;
        }
        mean[r] = mu;
        rstd[r] = rs;
    }
    (y, mean, rstd)
}

/// LayerNorm's backward: `(dx, dgamma, dbeta)` with `dgamma = keep * dgamma_in + sum dy xhat`,
/// `dbeta = keep * dbeta_in + sum dy` (the statistics recomputed in f64).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    c: usize,
    eps: f32,
    x: &[f32],
    dy: &[f32],
    gamma: &[f32],
    keep: f32,
    dgamma_in: &[f32],
    dbeta_in: &[f32],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let rows = x.len() / c;
    let (_, mean, rstd) = layernorm(c, eps, x, gamma, gamma);
    let k = keep as f64;
    let mut dgamma: Vec<f64> = dgamma_in.iter().map(|&v| if keep != 0.0 { k * v as f64 } else { 0.0 }).collect();
    let mut dbeta: Vec<f64> = dbeta_in.iter().map(|&v| if keep != 0.0 { k * v as f64 } else { 0.0 }).collect();
    let mut dx = vec![0f64; x.len()];
    for r in 0..rows {
        let xh: Vec<f64> = (0..c).map(|j| (x[r * c + j] as f64 - mean[r]) * rstd[r]).collect();
        let g: Vec<f64> = (0..c).map(|j| dy[r * c + j] as f64 * gamma[j] as f64).collect();
        let mg = g.iter().sum::<f64>() / c as f64;
        let mgx = g.iter().zip(&xh).map(|(a, b)| a * b).sum::<f64>() / c as f64;
        for j in 0..c {
            dx[r * c + j] = rstd[r] * (g[j] - mg - xh[j] * mgx);
            dgamma[j] += dy[r * c + j] as f64 * xh[j];
            dbeta[j] += dy[r * c + j] as f64;
        }
    }
    (dx, dgamma, dbeta)
}

/// Causal self-attention, unfused: per sequence of `t` and head, the full score matrix
/// `q k^T / sqrt(d)` masked above the diagonal, its row softmax, times v. `qkv` is `rows x 3c`
/// (q, k, v side by side), the result `rows x c`; also each row's probabilities (`[w][j]` for
/// `w = (b * heads + h) * t + i`, `j <= i`), for the backward.
pub fn attention(t: usize, c: usize, heads: usize, qkv: &[f32]) -> (Vec<f64>, Vec<Vec<f64>>) {
    let d = c / heads;
    let rows = qkv.len() / (3 * c);
    let scale = 1.0 / (d as f64).sqrt();
    let at = |r: usize, part: usize, h: usize, e: usize| qkv[r * 3 * c + part * c + h * d + e] as f64;
    let mut out = vec![0f64; rows * c];
    let mut probs = vec![Vec::new(); rows * heads];
    for b in 0..rows / t {
        for h in 0..heads {
            for i in 0..t {
                let r = b * t + i;
                let s: Vec<f64> = (0..=i)
                    .map(|j| scale * (0..d).map(|e| at(r, 0, h, e) * at(b * t + j, 1, h, e)).sum::<f64>())
                    .collect();
                let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|v| (v - mx).exp()).sum();
                let p: Vec<f64> = s.iter().map(|v| (v - mx).exp() / z).collect();
                for e in 0..d {
                    out[r * c + h * d + e] = p.iter().enumerate().map(|(j, pj)| pj * at(b * t + j, 2, h, e)).sum();
                }
                probs[(b * heads + h) * t + i] = p;
            }
        }
    }
    (out, probs)
}

/// The attention's backward, unfused: `dqkv` (`rows x 3c`) from `dout` (`rows x c`):
/// `dv = P^T dout`, `dP = dout v^T`, `dS = P (dP - rowsum(P dP))`, `dq = dS k / sqrt(d)`,
/// `dk = dS^T q / sqrt(d)`.
pub fn attention_backward(t: usize, c: usize, heads: usize, qkv: &[f32], dout: &[f32]) -> Vec<f64> {
    let d = c / heads;
    let rows = qkv.len() / (3 * c);
    let scale = 1.0 / (d as f64).sqrt();
    let (_, probs) = attention(t, c, heads, qkv);
    let at = |r: usize, part: usize, h: usize, e: usize| qkv[r * 3 * c + part * c + h * d + e] as f64;
    let mut dqkv = vec![0f64; rows * 3 * c];
    for b in 0..rows / t {
        for h in 0..heads {
            for i in 0..t {
                let r = b * t + i;
                let p = &probs[(b * heads + h) * t + i];
                let g = |e: usize| dout[r * c + h * d + e] as f64;
                let dp: Vec<f64> = (0..=i).map(|j| (0..d).map(|e| g(e) * at(b * t + j, 2, h, e)).sum()).collect();
                let pdp: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                for j in 0..=i {
                    let ds = p[j] * (dp[j] - pdp);
                    let rj = b * t + j;
                    for e in 0..d {
                        dqkv[r * 3 * c + h * d + e] += scale * ds * at(rj, 1, h, e);
                        dqkv[rj * 3 * c + c + h * d + e] += scale * ds * at(r, 0, h, e);
                        dqkv[rj * 3 * c + 2 * c + h * d + e] += p[j] * g(e);
                    }
                }
            }
        }
    }
    dqkv
}
