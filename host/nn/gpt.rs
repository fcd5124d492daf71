//! A GPT (GPT-2's architecture: token and position embedding, blocks of pre-norm causal
//! self-attention and a GELU MLP with residual connections, a final LayerNorm, and the output
//! projection tied to the token embedding) as layers of the layer contract: [`TokenEmbedding`],
//! one [`Block`] per transformer block (so a model pipelines by blocks), and [`Head`]. A
//! sample's input is its `t` token ids (as f32 whole numbers), its labels the `t` next tokens.
//!
//! Parameters carry GPT-2's names (`wte`, `wpe`, `h.{i}.ln_1.weight`, `h.{i}.attn.c_attn.weight`,
//! ..., `ln_f.bias`), with every weight stored `inputs x outputs` as GPT-2's `Conv1D` does; `wte`
//! is one parameter shared by the embedding and the head.

use crate::error::{Error, Result};
use crate::nn::{part_of, Ctx, Layer, LayerCost, Model, ParamSpec, Saved, Work};
use crate::ops::activation::Activation;
use crate::ops::gemm::Gemm;
use crate::ops::transformer::{VocabPart, LAYERNORM_EPS};
use crate::ops::Ops;
use crate::rng::Rng;

/// A GPT's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GptConfig {
    /// Tokens in the vocabulary.
    pub vocab: usize,
    /// Context: positions per sequence.
    pub t: usize,
    /// Width (channels).
    pub c: usize,
    /// Attention heads (dividing the width).
    pub heads: usize,
    /// Transformer blocks.
    pub layers: usize,
}

impl GptConfig {
    /// Checks the shape: every size at least 1, heads dividing the width into heads of at most 256.
    pub fn validate(&self) -> Result<()> {
        let GptConfig { vocab, t, c, heads, layers } = *self;
        if vocab == 0 || t == 0 || c == 0 || heads == 0 || layers == 0 {
            return Err(Error::Invalid(format!("a GPT needs every size at least 1: {self:?}")));
        }
        if c % heads != 0 || c / heads > 256 {
            return Err(Error::Invalid(format!(
                "width {c} must split into {heads} heads of equal size, at most 256 each"
            )));
        }
        if self.checked_param_count().is_none() {
            return Err(Error::Invalid(format!("a GPT of {self:?} has more parameters than memory can address")));
        }
        Ok(())
    }

    /// `GPT 4 layers, width 128, 4 heads, context 64, vocabulary 65`: the model's name, which a
    /// checkpoint keeps and [`GptConfig::from_description`] reads back.
    pub fn describe(&self) -> String {
        format!(
            "GPT {} layers, width {}, {} heads, context {}, vocabulary {}",
            self.layers, self.c, self.heads, self.t, self.vocab
        )
    }

    /// The config that [`GptConfig::describe`] described, or `None` when `s` does not describe
    /// a valid GPT.
    pub fn from_description(s: &str) -> Option<GptConfig> {
        let rest = s.trim().strip_prefix("GPT ")?;
        let mut parts = rest.split(", ");
        let mut field = |suffix: &str, prefix: &str| -> Option<usize> {
            let p = parts.next()?;
            p.strip_prefix(prefix)?.strip_suffix(suffix)?.parse().ok()
        };
        let layers = field(" layers", "")?;
        let c = field("", "width ")?;
        let heads = field(" heads", "")?;
        let t = field("", "context ")?;
        let vocab = field("", "vocabulary ")?;
        if parts.next().is_some() {
            return None;
        }
        let g = GptConfig { vocab, t, c, heads, layers };
        g.validate().ok().map(|_| g)
    }

    /// Parameters in the model: `vocab x c + t x c`, 12 c^2 + 13 c per block, `2c` for `ln_f`
    /// (`usize::MAX` for a shape past what memory can address, which `validate` refuses).
    pub fn param_count(&self) -> usize {
        self.checked_param_count().unwrap_or(usize::MAX)
    }

    fn checked_param_count(&self) -> Option<usize> {
        let c = self.c;
        let embed = self.vocab.checked_add(self.t)?.checked_mul(c)?;
        let block = c.checked_mul(c)?.checked_mul(12)?.checked_add(c.checked_mul(13)?)?;
        embed.checked_add(self.layers.checked_mul(block)?)?.checked_add(c.checked_mul(2)?)
    }

    /// The model: embedding, `layers` blocks, head, with `vocab` classes per position.
    pub fn model<B: Ops>(&self) -> Result<Model<B>> {
        self.validate()?;
        let mut m = Model::new(&self.describe()).push(TokenEmbedding { vocab: self.vocab, t: self.t, c: self.c });
        for i in 0..self.layers {
            m = m.push(Block { index: i, layers: self.layers, t: self.t, c: self.c, heads: self.heads });
        }
        Ok(m.push(Head { vocab: self.vocab, t: self.t, c: self.c }).classes(self.vocab))
    }
}

/// The first `len` floats of a buffer.
fn head<B: Ops>(b: &B::Buf<f32>, len: usize) -> B::Ref<'_, f32> {
    B::view_range(b, 0..len)
}

/// The first `len` floats of a buffer, writable.
fn head_mut<B: Ops>(b: &mut B::Buf<f32>, len: usize) -> B::Mut<'_, f32> {
    B::view_range_mut(b, 0..len)
}

/// A whole buffer.
fn full<B: Ops>(b: &B::Buf<f32>) -> B::Ref<'_, f32> {
    B::view(b)
}

/// A whole buffer, writable.
fn full_mut<B: Ops>(b: &mut B::Buf<f32>) -> B::Mut<'_, f32> {
    B::view_mut(b)
}

/// A linear map's parameter gradients over `n` rows, parameters `(w, b)` of a map `fan_in ->
/// fan_out`: `dW = x^T dz` and `db` = the column sums of `dz`, each written with its beta.
#[allow(clippy::too_many_arguments)]
fn linear_grads<B: Ops>(
    dev: &B,
    work: &mut Work<'_, B>,
    (wi, bi): (usize, usize),
    n: usize,
    fan_in: usize,
    fan_out: usize,
    x: &B::Ref<'_, f32>,
    dz: &B::Ref<'_, f32>,
) -> Result<()> {
    {
        let (mut g, beta) = work.grad(wi);
        dev.gemm(&Gemm::new(fan_in, fan_out, n).trans_a(true).beta(beta), x, dz, None, &mut g, None)?;
    }
    let (mut g, beta) = work.grad(bi);
    dev.col_sum(n, fan_out, dz, beta, &mut g)
}

/// A LayerNorm's backward: `dx` written, and its gain and bias gradients (parameters `gi`,
/// `gi + 1`) through `dln` (`2c` floats of scratch).
#[allow(clippy::too_many_arguments)]
fn ln_grads<B: Ops>(
    dev: &B,
    work: &mut Work<'_, B>,
    gi: usize,
    c: usize,
    x: &B::Ref<'_, f32>,
    dy: &B::Ref<'_, f32>,
    gamma: &B::Ref<'_, f32>,
    mean: &B::Ref<'_, f32>,
    rstd: &B::Ref<'_, f32>,
    dx: &mut B::Mut<'_, f32>,
    dln: &mut B::Buf<f32>,
) -> Result<()> {
    {
        let (mut dg, mut db) = B::split_mut(dln, c);
        let (mut dg, mut db) = (B::sub_mut(&mut dg, 0..c), B::sub_mut(&mut db, 0..c));
        let done = dev.layernorm_backward(c, x, dy, gamma, mean, rstd, dx, 0.0, &mut dg, &mut db);
        done?;
    }
    work.put_grad(dev, gi, &B::view_range(dln, 0..c))?;
    work.put_grad(dev, gi + 1, &B::view_range(dln, c..2 * c))
}

/// Normal(0, std) initial values.
fn normal(rng: &mut Rng, values: &mut [f32], std: f32) {
    values.iter_mut().for_each(|v| *v = std * rng.normal());
}

/// Token and position embedding: `t` ids in, `t x c` out. Parameters `wte` (`vocab x c`, shared
/// with the head) and `wpe` (`t x c`).
#[derive(Debug, Clone, Copy)]
pub struct TokenEmbedding {
    /// Vocabulary.
    pub vocab: usize,
    /// Context.
    pub t: usize,
    /// Width.
    pub c: usize,
}

impl TokenEmbedding {
    /// Rank `rank`'s part of the token table in a group of `tp`.
    fn part(&self, tp: usize, rank: usize) -> VocabPart {
        let (first, _) = part_of(self.vocab, tp, rank);
        VocabPart { first, vocab: self.vocab, positions: rank == 0 }
    }
}

impl<B: Ops> Layer<B> for TokenEmbedding {
    fn describe(&self) -> String {
        format!("embedding {} tokens + {} positions x {}", self.vocab, self.t, self.c)
    }
    fn inputs(&self) -> usize {
        self.t
    }
    fn outputs(&self) -> usize {
        self.t * self.c
    }
    fn params(&self) -> Vec<ParamSpec> {
        // Under tensor parallelism the token table splits by rows (vocabulary-parallel; 65
        // tokens over 2 ranks: 33 and 32).
        vec![
            ParamSpec::shared("wte", &[self.vocab, self.c]).split_uneven(0),
            ParamSpec::shared("wpe", &[self.t, self.c]),
        ]
    }
    fn init(&self, _i: usize, rng: &mut Rng, values: &mut [f32]) {
        normal(rng, values, 0.02);
    }
    fn cost(&self) -> LayerCost {
        LayerCost {
            flops_per_sample: 3.0 * (self.t * self.c) as f64,
            tp_all_reduce_floats_per_sample: self.t * self.c,
            ..LayerCost::default()
        }
    }
    fn forward(&self, cx: &Ctx<'_, B>, x: &B::Ref<'_, f32>, y: &mut B::Mut<'_, f32>, _: &mut Saved<B>) -> Result<()> {
        let (rank, tp) = cx.tp();
        if tp == 1 {
            return cx.dev.embed_forward(self.t, self.c, x, &cx.param(0), &cx.param(1), y);
        }
        // Each rank embeds the tokens of its rows of the table (rank 0 adds the positions), and
        // the parts are summed.
        let part = self.part(tp, rank);
        cx.dev.embed_forward_part(self.t, self.c, part, x, &cx.param(0), &cx.param(1), y)?;
        cx.tp_all_reduce(y)
    }
    fn backward(
        &self,
        cx: &Ctx<'_, B>,
        x: &B::Ref<'_, f32>,
        dy: &B::Ref<'_, f32>,
        dx: Option<&mut B::Mut<'_, f32>>,
        _: &Saved<B>,
        work: &mut Work<'_, B>,
    ) -> Result<()> {
        if dx.is_some() {
            return Err(Error::Invalid(
                "the token embedding's input is token ids, which have no gradient: it must be the model's first layer"
                    .into(),
            ));
        }
        let dev = cx.dev;
        let n = self.t * self.c;
        let mut dpe = work.take_scratch(dev, n)?;
        let r = (|| {
            {
                let (rank, tp) = cx.tp();
                let (mut dwte, keep) = work.grad(0);
                // (Under tensor parallelism, this rank's rows of the table.)
                dev.embed_backward_part(
                    self.t,
                    self.c,
                    self.part(tp, rank),
                    x,
                    dy,
                    (keep, 0.0),
                    &mut dwte,
                    &mut B::view_range_mut(&mut dpe, 0..n),
                )?;
            }
            work.put_grad(dev, 1, &B::view_range(&dpe, 0..n))
        })();
        work.give_back(dpe);
        r
    }
}

/// A pre-norm transformer block on `t x c` per sample: `x2 = x + attn(ln_1(x))`, `y = x2 +
/// mlp(ln_2(x2))`, the attention causal over `heads` heads, the MLP `c -> 4c (GELU) -> c`.
#[derive(Debug, Clone, Copy)]
pub struct Block {
    /// Its index among the blocks (its parameters are `h.{index}.*`).
    pub index: usize,
    /// Blocks in the model (the residual projections start at 0.02 / sqrt(2 layers), as GPT-2).
    pub layers: usize,
    /// Context.
    pub t: usize,
    /// Width.
    pub c: usize,
    /// Heads.
    pub heads: usize,
}

/// Saved buffers of a block, by index.
const H1: usize = 0;
const M1: usize = 1;
const R1: usize = 2;
const QKV: usize = 3;
const ATT: usize = 4;
const LSE: usize = 5;
const X2: usize = 6;
const H2: usize = 7;
const M2: usize = 8;
const R2: usize = 9;
const FCZ: usize = 10;
const FCA: usize = 11;

impl Block {
    /// Width and heads on one rank of a tensor-parallel group of `tp` (its heads).
    fn local(&self, tp: usize) -> Result<(usize, usize)> {
        if self.heads % tp != 0 {
            return Err(crate::error::Error::Invalid(format!(
                "tp = {tp} does not divide block {}'s {} heads: attention splits by heads, so choose a tp that divides them",
                self.index, self.heads
            )));
        }
        Ok((self.c / tp, self.heads / tp))
    }
}

impl<B: Ops> Layer<B> for Block {
    fn describe(&self) -> String {
        format!("block {}: {} heads x {}, context {}", self.index, self.heads, self.c / self.heads, self.t)
    }
    fn inputs(&self) -> usize {
        self.t * self.c
    }
    fn outputs(&self) -> usize {
        self.t * self.c
    }
    fn params(&self) -> Vec<ParamSpec> {
        let (c, h) = (self.c, format!("h.{}", self.index));
        let p = |name: &str, shape: &[usize]| ParamSpec::shared(&format!("{h}.{name}"), shape);
        // Weight decay on the matrices only (GPT-2's and nanoGPT's rule).
        vec![
            p("ln_1.weight", &[c]).no_decay(),
            p("ln_1.bias", &[c]).no_decay(),
            // Under tensor parallelism: attention split by heads (q, k and v's columns of each
            // rank's heads; the projection's rows), the MLP by its hidden columns then rows.
            p("attn.c_attn.weight", &[c, 3 * c]).split(1, 3),
            p("attn.c_attn.bias", &[3 * c]).no_decay().split(0, 3),
            p("attn.c_proj.weight", &[c, c]).split(0, 1),
            p("attn.c_proj.bias", &[c]).no_decay(),
            p("ln_2.weight", &[c]).no_decay(),
            p("ln_2.bias", &[c]).no_decay(),
            p("mlp.c_fc.weight", &[c, 4 * c]).split(1, 1),
            p("mlp.c_fc.bias", &[4 * c]).no_decay().split(0, 1),
            p("mlp.c_proj.weight", &[4 * c, c]).split(0, 1),
            p("mlp.c_proj.bias", &[c]).no_decay(),
        ]
    }
    fn init(&self, i: usize, rng: &mut Rng, values: &mut [f32]) {
        match i {
            0 | 6 => values.fill(1.0),
            2 | 8 => normal(rng, values, 0.02),
            4 | 10 => normal(rng, values, 0.02 / (2.0 * self.layers as f32).sqrt()),
            _ => {}
        }
    }
    fn cost(&self) -> LayerCost {
        let (t, c) = (self.t as f64, self.c as f64);
        // Matrices: 12 c^2 multiply-adds per position, 3x for forward + backward; attention
        // t^2 c forward, about 2.5x that backward.
        LayerCost {
            flops_per_sample: 6.0 * 12.0 * c * c * t + 7.0 * t * t * c,
            saved_floats_per_sample: self.t * (13 * self.c + 4 + self.heads),
            scratch_floats_per_sample: self.t * (14 * self.c + self.heads),
            // Split: the attention's and the MLP's outputs summed forward, the gradients
            // reaching ln_2 and ln_1 summed backward.
            tp_all_reduce_floats_per_sample: 4 * self.t * self.c,
        }
    }
    fn tp_parts(&self) -> Option<usize> {
        // Attention splits by heads.
        Some(self.heads)
    }

    fn forward(
        &self,
        cx: &Ctx<'_, B>,
        x: &B::Ref<'_, f32>,
        y: &mut B::Mut<'_, f32>,
        saved: &mut Saved<B>,
    ) -> Result<()> {
        let (dev, c) = (cx.dev, self.c);
        let (rank, tp) = cx.tp();
        let (cl, hl) = self.local(tp)?;
        let n = cx.rows * self.t;
        let lens = [n * c, n, n, 3 * n * cl, n * cl, n * hl, n * c, n * c, n, n, 4 * n * cl, 4 * n * cl];
        let bufs: [&mut B::Buf<f32>; 12] = saved.keep_all(dev, &lens)?.try_into().ok().expect("12 buffers");
        let [h1, m1, r1, qkv, att, lse, x2, h2, m2, r2, fcz, fca] = bufs;
        let p = |i: usize| cx.param(i);
        let v = full::<B>;
        let vm = full_mut::<B>;
        dev.layernorm_forward(c, LAYERNORM_EPS, x, &p(0), &p(1), &mut vm(h1), &mut vm(m1), &mut vm(r1))?;
        dev.gemm(&Gemm::new(n, 3 * cl, c), &v(h1), &p(2), Some(&p(3)), &mut vm(qkv), None)?;
        dev.attention_forward(self.t, cl, hl, &v(qkv), &mut vm(att), &mut vm(lse))?;
        if tp == 1 {
            // x2 = x + att W + b: the residual first, then the projection added by the GEMM's beta.
            dev.copy(x, &mut vm(x2))?;
            dev.gemm(&Gemm::new(n, c, c).beta(1.0), &v(att), &p(4), Some(&p(5)), &mut vm(x2), None)?;
        } else {
            // Each rank's heads give part of the projection: summed over the group (the bias
            // once), then the residual.
            let bias = (rank == 0).then(|| p(5));
            dev.gemm(&Gemm::new(n, c, cl), &v(att), &p(4), bias.as_ref(), &mut vm(x2), None)?;
            cx.tp_all_reduce(&mut vm(x2))?;
            dev.axpy(1.0, x, &mut vm(x2))?;
        }
        dev.layernorm_forward(c, LAYERNORM_EPS, &v(x2), &p(6), &p(7), &mut vm(h2), &mut vm(m2), &mut vm(r2))?;
        let fc = Gemm::new(n, 4 * cl, c).activation(Activation::GeluTanh);
        dev.gemm(&fc, &v(h2), &p(8), Some(&p(9)), &mut vm(fcz), Some(&mut vm(fca)))?;
        if tp == 1 {
            dev.copy(&v(x2), y)?;
            return dev.gemm(&Gemm::new(n, c, 4 * c).beta(1.0), &v(fca), &p(10), Some(&p(11)), y, None);
        }
        let bias = (rank == 0).then(|| p(11));
        dev.gemm(&Gemm::new(n, c, 4 * cl), &v(fca), &p(10), bias.as_ref(), y, None)?;
        cx.tp_all_reduce(y)?;
        dev.axpy(1.0, &v(x2), y)
    }

    fn backward(
        &self,
        cx: &Ctx<'_, B>,
        x: &B::Ref<'_, f32>,
        dy: &B::Ref<'_, f32>,
        dx: Option<&mut B::Mut<'_, f32>>,
        saved: &Saved<B>,
        work: &mut Work<'_, B>,
    ) -> Result<()> {
        let (dev, c, t) = (cx.dev, self.c, self.t);
        let (cl, heads) = self.local(cx.tp().1)?;
        let n = cx.rows * t;
        let s = |i: usize| saved.get(i).map(|b| B::view(b));
        let p = |i: usize| cx.param(i);
        // Scratch: two of n x 4c (the MLP's hidden gradient before and after GELU), n x 3c
        // (qkv's gradient), three of n x c, the attention's row sums, and LayerNorm's gradients.
        let sizes = [4 * n * c, 4 * n * c, 3 * n * c, n * c, n * c, n * c, n * heads, 2 * c];
        let mut bufs = Vec::with_capacity(sizes.len());
        for &len in &sizes {
            match work.take_scratch(dev, len) {
                Ok(b) => bufs.push(b),
                Err(e) => {
                    bufs.into_iter().for_each(|b| work.give_back(b));
                    return Err(e);
                }
            }
        }
        let result = (|| -> Result<()> {
            let [df, dz, dqkv, dx2, da, dh, dsum, dln] = &mut bufs[..] else { unreachable!() };
            let w = head_mut::<B>;
            let r = head::<B>;
            // y = x2 + gelu(h2 Wfc + bfc) Wp2 + bp2
            // (Under tensor parallelism each rank holds its columns of the hidden layer: the
            // gradient reaching ln_2 is summed over the group, and likewise at ln_1.)
            linear_grads(dev, work, (10, 11), n, 4 * cl, c, &s(FCA)?, dy)?;
            dev.gemm(&Gemm::new(n, 4 * cl, c).trans_b(true), dy, &p(10), None, &mut w(df, 4 * n * cl), None)?;
            dev.act_backward(Activation::GeluTanh, &s(FCZ)?, &r(df, 4 * n * cl), &mut w(dz, 4 * n * cl))?;
            linear_grads(dev, work, (8, 9), n, c, 4 * cl, &s(H2)?, &r(dz, 4 * n * cl))?;
            dev.gemm(&Gemm::new(n, c, 4 * cl).trans_b(true), &r(dz, 4 * n * cl), &p(8), None, &mut w(dh, n * c), None)?;
            cx.tp_all_reduce(&mut w(dh, n * c))?;
            // Through ln_2, plus the residual: dx2 = ln_2'(dh) + dy.
            ln_grads(dev, work, 6, c, &s(X2)?, &r(dh, n * c), &p(6), &s(M2)?, &s(R2)?, &mut w(dx2, n * c), dln)?;
            dev.axpy(1.0, dy, &mut w(dx2, n * c))?;
            // x2 = x + attn(h1 Wqkv + bqkv) Wp + bp
            linear_grads(dev, work, (4, 5), n, cl, c, &s(ATT)?, &r(dx2, n * c))?;
            dev.gemm(&Gemm::new(n, cl, c).trans_b(true), &r(dx2, n * c), &p(4), None, &mut w(da, n * cl), None)?;
            dev.attention_backward(
                t,
                cl,
                heads,
                &s(QKV)?,
                &s(ATT)?,
                &r(da, n * cl),
                &s(LSE)?,
                &mut w(dqkv, 3 * n * cl),
                &mut w(dsum, n * heads),
            )?;
            linear_grads(dev, work, (2, 3), n, c, 3 * cl, &s(H1)?, &r(dqkv, 3 * n * cl))?;
            let dq = r(dqkv, 3 * n * cl);
            dev.gemm(&Gemm::new(n, c, 3 * cl).trans_b(true), &dq, &p(2), None, &mut w(dh, n * c), None)?;
            cx.tp_all_reduce(&mut w(dh, n * c))?;
            // Through ln_1 (into dx, or scratch when no input gradient is asked for), plus the
            // residual: dx = ln_1'(dh) + dx2.
            let (m1, r1) = (s(M1)?, s(R1)?);
            match dx {
                Some(d) => {
                    ln_grads(dev, work, 0, c, x, &r(dh, n * c), &p(0), &m1, &r1, d, dln)?;
                    dev.axpy(1.0, &r(dx2, n * c), d)
                }
                None => ln_grads(dev, work, 0, c, x, &r(dh, n * c), &p(0), &m1, &r1, &mut w(da, n * c), dln),
            }
        })();
        bufs.into_iter().for_each(|b| work.give_back(b));
        result
    }
}

/// The final LayerNorm and the output projection tied to the token embedding: `t x c` in,
/// `t x vocab` logits out. Parameters `ln_f.weight`, `ln_f.bias` and the shared `wte`.
#[derive(Debug, Clone, Copy)]
pub struct Head {
    /// Vocabulary.
    pub vocab: usize,
    /// Context.
    pub t: usize,
    /// Width.
    pub c: usize,
}

impl Head {
    /// The classes (rows of the tied table) this rank computes.
    fn local_vocab<B: Ops>(&self, cx: &Ctx<'_, B>) -> usize {
        let (rank, tp) = cx.tp();
        part_of(self.vocab, tp, rank).1
    }
}

impl<B: Ops> Layer<B> for Head {
    fn describe(&self) -> String {
        format!("head: ln_f, {} x {} tied to wte", self.c, self.vocab)
    }
    fn inputs(&self) -> usize {
        self.t * self.c
    }
    fn outputs(&self) -> usize {
        self.t * self.vocab
    }
    fn params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::shared("ln_f.weight", &[self.c]).no_decay(),
            ParamSpec::shared("ln_f.bias", &[self.c]).no_decay(),
            ParamSpec::shared("wte", &[self.vocab, self.c]).split_uneven(0),
        ]
    }
    fn class_part(&self, tp: usize, rank: usize) -> Option<std::ops::Range<usize>> {
        // Vocabulary-parallel: each rank's logits are those of its rows of the tied table.
        (tp > 1).then(|| {
            let (first, n) = part_of(self.vocab, tp, rank);
            first..first + n
        })
    }
    fn init(&self, i: usize, rng: &mut Rng, values: &mut [f32]) {
        match i {
            0 => values.fill(1.0),
            2 => normal(rng, values, 0.02),
            _ => {}
        }
    }
    fn cost(&self) -> LayerCost {
        LayerCost {
            flops_per_sample: 6.0 * (self.t * self.c * self.vocab) as f64,
            saved_floats_per_sample: self.t * (self.c + 2),
            scratch_floats_per_sample: self.t * self.c + 2 * self.c,
            // Split: the gradient reaching ln_f is summed over the classes' ranks.
            tp_all_reduce_floats_per_sample: self.t * self.c,
        }
    }
    fn forward(
        &self,
        cx: &Ctx<'_, B>,
        x: &B::Ref<'_, f32>,
        y: &mut B::Mut<'_, f32>,
        saved: &mut Saved<B>,
    ) -> Result<()> {
        let (dev, c) = (cx.dev, self.c);
        let n = cx.rows * self.t;
        let bufs: [&mut B::Buf<f32>; 3] = saved.keep_all(dev, &[n * c, n, n])?.try_into().ok().expect("3 buffers");
        let [h, m, r] = bufs;
        dev.layernorm_forward(
            c,
            LAYERNORM_EPS,
            x,
            &cx.param(0),
            &cx.param(1),
            &mut B::view_mut(h),
            &mut B::view_mut(m),
            &mut B::view_mut(r),
        )?;
        // logits = h wte^T (wte is vocab x c; under tensor parallelism this rank's rows of it,
        // giving its classes' logits at the front of the output).
        let v = self.local_vocab(cx);
        if v == 0 {
            return Ok(());
        }
        let y = &mut B::sub_mut(y, 0..n * v);
        dev.gemm(&Gemm::new(n, v, c).trans_b(true), &B::view(h), &cx.param(2), None, y, None)
    }
    fn backward(
        &self,
        cx: &Ctx<'_, B>,
        x: &B::Ref<'_, f32>,
        dy: &B::Ref<'_, f32>,
        dx: Option<&mut B::Mut<'_, f32>>,
        saved: &Saved<B>,
        work: &mut Work<'_, B>,
    ) -> Result<()> {
        let (dev, c) = (cx.dev, self.c);
        let v = self.local_vocab(cx);
        let n = cx.rows * self.t;
        let dy = &B::sub(dy, 0..n * v);
        {
            // dwte (vocab x c) += dy^T h (this rank's rows under tensor parallelism)
            let (mut g, beta) = work.grad(2);
            if v > 0 {
                let h = B::view(saved.get(0)?);
                dev.gemm(&Gemm::new(v, c, n).trans_a(true).beta(beta), dy, &h, None, &mut g, None)?;
            }
        }
        let mut dh = work.take_scratch(dev, n * c)?;
        let mut dln = match work.take_scratch(dev, 2 * c) {
            Ok(b) => b,
            Err(e) => {
                work.give_back(dh);
                return Err(e);
            }
        };
        let result = (|| -> Result<()> {
            {
                let mut dhv = B::view_range_mut(&mut dh, 0..n * c);
                if v > 0 {
                    dev.gemm(&Gemm::new(n, c, v), dy, &cx.param(2), None, &mut dhv, None)?;
                } else {
                    dev.write(&mut dhv, &vec![0.0; n * c])?;
                }
                // Each rank's classes give part of the gradient reaching ln_f: summed over the group.
                cx.tp_all_reduce(&mut dhv)?;
            }
            let (m, rs) = (B::view(saved.get(1)?), B::view(saved.get(2)?));
            let dhv = B::view_range(&dh, 0..n * c);
            match dx {
                Some(d) => ln_grads(dev, work, 0, c, x, &dhv, &cx.param(0), &m, &rs, d, &mut dln),
                None => {
                    let mut tmp = work.take_scratch(dev, n * c)?;
                    let r = ln_grads(
                        dev,
                        work,
                        0,
                        c,
                        x,
                        &dhv,
                        &cx.param(0),
                        &m,
                        &rs,
                        &mut B::view_range_mut(&mut tmp, 0..n * c),
                        &mut dln,
                    );
                    work.give_back(tmp);
                    r
                }
            }
        })();
        work.give_back(dh);
        work.give_back(dln);
        result
    }
}
