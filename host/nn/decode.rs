//! Writing text with a trained GPT: incremental decoding on the host CPU with a key/value cache
//! ([`GptDecoder`]), so each new token costs one row of each matrix product instead of a
//! forward pass over the whole context, and sampling from the logits ([`sample_logits`]:
//! temperature, top-k, or greedy).
//!
//! The decoder computes what [`GptConfig::model`]'s forward computes (LayerNorm with
//! [`LAYERNORM_EPS`], causal attention scaled by `1 / sqrt(head size)`, tanh GELU, the head
//! tied to `wte`), in f32, one position at a time; a test holds its logits to the model's on
//! the CPU backend.
//!
//! When the text outgrows the context (position embeddings stop at `t`), the cache restarts
//! from the last `t / 2` tokens (a context shift, as llama.cpp does): every token still sees at
//! least `t / 2` tokens of history, and the cost per token stays a cache step plus, once every
//! `t / 2` tokens, a prefill of `t / 2`, instead of a full forward pass per token.

use crate::backend::cpu::wide;
use crate::error::{Error, Result};
use crate::nn::gpt::GptConfig;
use crate::ops::activation::Activation;
use crate::ops::transformer::LAYERNORM_EPS;
use crate::rng::Rng;

/// One block's parameters (weights `inputs x outputs`, as the model stores them).
struct BlockParams {
    ln_1: (Vec<f32>, Vec<f32>),
    c_attn: (Vec<f32>, Vec<f32>),
    c_proj: (Vec<f32>, Vec<f32>),
    ln_2: (Vec<f32>, Vec<f32>),
    c_fc: (Vec<f32>, Vec<f32>),
    mlp_proj: (Vec<f32>, Vec<f32>),
}

/// A GPT's incremental decoder on the host CPU: the parameters, and per block the keys and
/// values of the positions fed so far.
pub struct GptDecoder {
    cfg: GptConfig,
    wte: Vec<f32>,
    wpe: Vec<f32>,
    blocks: Vec<BlockParams>,
    ln_f: (Vec<f32>, Vec<f32>),
    /// Per block: `t x c` keys and `t x c` values.
    cache: Vec<(Vec<f32>, Vec<f32>)>,
    len: usize,
    logits: Vec<f32>,
}

impl GptDecoder {
    /// A decoder for `cfg` from its parameters by name: `tensors` lists each parameter's name
    /// and shape in the order of the flat `params` (a checkpoint's `tensors` and `params`).
    /// Every parameter the model has must be there with its shape.
    pub fn new(cfg: GptConfig, tensors: &[(String, Vec<usize>)], params: &[f32]) -> Result<Self> {
        cfg.validate()?;
        let total: usize = tensors.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        if total != params.len() {
            return Err(Error::shape(
                "GptDecoder::new",
                format!("the tensors hold {total} values, the parameters {}", params.len()),
            ));
        }
        let mut offsets = std::collections::HashMap::new();
        let mut off = 0;
        for (name, shape) in tensors {
            let n: usize = shape.iter().product();
            offsets.insert(name.as_str(), (off, shape.clone()));
            off += n;
        }
        let get = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            let (o, s) = offsets.get(name).ok_or_else(|| {
                Error::Invalid(format!(
                    "parameter `{name}` is missing: these are not the parameters of a {}",
                    cfg.describe()
                ))
            })?;
            if s != shape {
                return Err(Error::Invalid(format!(
                    "parameter `{name}` is {s:?}, but a {} has it {shape:?}",
                    cfg.describe()
                )));
            }
            Ok(params[*o..*o + s.iter().product::<usize>()].to_vec())
        };
        let GptConfig { vocab, t, c, layers, .. } = cfg;
        let pair = |name: &str, w: &[usize], b: &[usize]| -> Result<(Vec<f32>, Vec<f32>)> {
            Ok((get(&format!("{name}.weight"), w)?, get(&format!("{name}.bias"), b)?))
        };
        let blocks = (0..layers)
            .map(|i| {
                let h = format!("h.{i}");
                Ok(BlockParams {
                    ln_1: pair(&format!("{h}.ln_1"), &[c], &[c])?,
                    c_attn: pair(&format!("{h}.attn.c_attn"), &[c, 3 * c], &[3 * c])?,
                    c_proj: pair(&format!("{h}.attn.c_proj"), &[c, c], &[c])?,
                    ln_2: pair(&format!("{h}.ln_2"), &[c], &[c])?,
                    c_fc: pair(&format!("{h}.mlp.c_fc"), &[c, 4 * c], &[4 * c])?,
                    mlp_proj: pair(&format!("{h}.mlp.c_proj"), &[4 * c, c], &[c])?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(GptDecoder {
            cfg,
            wte: get("wte", &[vocab, c])?,
            wpe: get("wpe", &[t, c])?,
            blocks,
            ln_f: pair("ln_f", &[c], &[c])?,
            cache: (0..layers).map(|_| (vec![0f32; t * c], vec![0f32; t * c])).collect(),
            len: 0,
            logits: vec![0f32; vocab],
        })
    }

    /// The model's shape.
    pub fn config(&self) -> GptConfig {
        self.cfg
    }

    /// Positions in the cache (the next token's position).
    pub fn len(&self) -> usize {
        self.len
    }

    /// True before the first token.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Empties the cache: the next token is at position 0.
    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// Feeds `token` at the next position and returns the logits of the token after it. An
    /// error when the cache is full (`t` positions: [`GptDecoder::reset`] first) or the token
    /// is outside the vocabulary.
    pub fn feed(&mut self, token: u32) -> Result<&[f32]> {
        let GptConfig { vocab, t, c, heads, .. } = self.cfg;
        if token as usize >= vocab {
            return Err(Error::Invalid(format!("token {token} is outside the vocabulary of {vocab}")));
        }
        if self.len >= t {
            return Err(Error::Invalid(format!("the context of {t} positions is full: reset the decoder first")));
        }
        let pos = self.len;
        wide(|| {
            let tok = token as usize;
            let mut x: Vec<f32> =
                self.wte[tok * c..][..c].iter().zip(&self.wpe[pos * c..][..c]).map(|(a, b)| a + b).collect();
            let (mut h, mut qkv, mut att, mut fc) =
                (vec![0f32; c], vec![0f32; 3 * c], vec![0f32; c], vec![0f32; 4 * c]);
            let mut scores = vec![0f32; pos + 1];
            let d = c / heads;
            let scale = 1.0 / (d as f32).sqrt();
            for (b, (keys, values)) in self.blocks.iter().zip(self.cache.iter_mut()) {
                layernorm(&x, &b.ln_1, &mut h);
                linear(&h, &b.c_attn, &mut qkv);
                keys[pos * c..][..c].copy_from_slice(&qkv[c..2 * c]);
                values[pos * c..][..c].copy_from_slice(&qkv[2 * c..]);
                for hd in 0..heads {
                    let q = &qkv[hd * d..][..d];
                    for (j, s) in scores.iter_mut().enumerate() {
                        *s = scale * q.iter().zip(&keys[j * c + hd * d..][..d]).map(|(a, b)| a * b).sum::<f32>();
                    }
                    let m = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                    let mut sum = 0f32;
                    scores.iter_mut().for_each(|s| {
                        *s = (*s - m).exp();
                        sum += *s;
                    });
                    let out = &mut att[hd * d..][..d];
                    out.fill(0.0);
                    for (j, &p) in scores.iter().enumerate() {
                        out.iter_mut().zip(&values[j * c + hd * d..][..d]).for_each(|(o, v)| *o += p * v);
                    }
                    out.iter_mut().for_each(|o| *o /= sum);
                }
                linear_add(&att, &b.c_proj, &mut x);
                layernorm(&x, &b.ln_2, &mut h);
                linear(&h, &b.c_fc, &mut fc);
                fc.iter_mut().for_each(|z| *z = Activation::GeluTanh.apply(*z));
                linear_add(&fc, &b.mlp_proj, &mut x);
            }
            layernorm(&x, &self.ln_f, &mut h);
            for (l, w) in self.logits.iter_mut().zip(self.wte.chunks_exact(c)) {
                *l = h.iter().zip(w).map(|(a, b)| a * b).sum();
            }
        });
        self.len += 1;
        Ok(&self.logits)
    }

    /// Writes up to `tokens` tokens after `prompt` (its ids; at least one, at most the
    /// context), each drawn by [`sample_logits`] with `temperature` and `top_k` from `rng`,
    /// handing each to `emit` as it is chosen; `emit` returns false to stop early (a reader
    /// went away). Returns how many were written. Past the context, the cache restarts from the
    /// last `t / 2` tokens (see the module's documentation); only the last `t` tokens are kept,
    /// so memory does not grow with `tokens`.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        tokens: usize,
        temperature: f32,
        top_k: Option<usize>,
        rng: &mut Rng,
        mut emit: impl FnMut(u32) -> bool,
    ) -> Result<usize> {
        let t = self.cfg.t;
        if prompt.is_empty() {
            return Err(Error::Invalid("the prompt is empty: give at least one token to start from".into()));
        }
        if prompt.len() > t {
            return Err(Error::Invalid(format!(
                "the prompt is {} tokens, longer than the model's context of {t}: shorten it",
                prompt.len()
            )));
        }
        check_sampling(temperature, top_k)?;
        self.reset();
        // Not sized by `tokens`: a huge count grows the text as it is written, never up front.
        let mut history: Vec<u32> = prompt.to_vec();
        let mut logits = Vec::new();
        for &p in prompt {
            logits = self.feed(p)?.to_vec();
        }
        for n in 0..tokens {
            let next = sample_logits(&logits, temperature, top_k, rng);
            let more = emit(next);
            history.push(next);
            if history.len() > 2 * t {
                history.drain(..history.len() - t);
            }
            if n + 1 == tokens || !more {
                return Ok(n + 1);
            }
            if self.len == t {
                // Context shift: restart from the last t / 2 tokens (the new one included).
                self.reset();
                let keep = (t / 2).max(1);
                for &p in &history[history.len() - keep..] {
                    logits = self.feed(p)?.to_vec();
                }
            } else {
                logits = self.feed(next)?.to_vec();
            }
        }
        Ok(0)
    }
}

/// An error unless `temperature` is 0 or more (and finite) and `top_k`, if given, at least 1.
pub fn check_sampling(temperature: f32, top_k: Option<usize>) -> Result<()> {
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(Error::Invalid(format!(
            "temperature {temperature}: give 0 (always the likeliest token) or a positive number (1 samples the \
             model's distribution; lower is more conservative)"
        )));
    }
    if top_k == Some(0) {
        return Err(Error::Invalid("top-k 0 leaves no token to choose: give 1 or more".into()));
    }
    Ok(())
}

/// A token drawn from `softmax(logits / temperature)` restricted to the `top_k` likeliest
/// tokens (all without `top_k`); the likeliest token (the first of equals) when `temperature`
/// is 0. The probabilities are computed in f64.
pub fn sample_logits(logits: &[f32], temperature: f32, top_k: Option<usize>, rng: &mut Rng) -> u32 {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    // Likeliest first; equal logits by id, so the choice depends only on the values.
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if temperature == 0.0 {
        return order[0] as u32;
    }
    order.truncate(top_k.unwrap_or(order.len()).max(1));
    let top = logits[order[0]] as f64;
    let weights: Vec<f64> = order.iter().map(|&i| ((logits[i] as f64 - top) / temperature as f64).exp()).collect();
    let total: f64 = weights.iter().sum();
    let mut u = rng.uniform() * total;
    for (&i, w) in order.iter().zip(&weights) {
        if u < *w {
            return i as u32;
        }
        u -= w;
    }
    order[weights.iter().rposition(|w| *w > 0.0).unwrap_or(0)] as u32
}

/// `y = LayerNorm(x) * gamma + beta` over one row.
fn layernorm(x: &[f32], (gamma, beta): &(Vec<f32>, Vec<f32>), y: &mut [f32]) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    let (m, r) = (mean as f32, (1.0 / (var + LAYERNORM_EPS as f64).sqrt()) as f32);
    for ((y, &x), (&g, &b)) in y.iter_mut().zip(x).zip(gamma.iter().zip(beta)) {
        *y = (x - m) * r * g + b;
    }
}

/// `y = x W + b` for one row, `W` stored `inputs x outputs`.
fn linear(x: &[f32], (w, b): &(Vec<f32>, Vec<f32>), y: &mut [f32]) {
    y.copy_from_slice(b);
    linear_acc(x, w, y);
}

/// `y += x W + b` for one row.
fn linear_add(x: &[f32], (w, b): &(Vec<f32>, Vec<f32>), y: &mut [f32]) {
    y.iter_mut().zip(b).for_each(|(y, b)| *y += b);
    linear_acc(x, w, y);
}

/// `y += x W`: row `i` of `W` scaled by `x[i]`, added in order (vectorises over the outputs).
fn linear_acc(x: &[f32], w: &[f32], y: &mut [f32]) {
    let n = y.len();
    for (&xi, row) in x.iter().zip(w.chunks_exact(n)) {
        y.iter_mut().zip(row).for_each(|(y, &w)| *y += xi * w);
    }
}
