//! Models as sequences of layers, and the contract a layer keeps so that the engine can split
//! any model across pipeline stages and data-parallel replicas.
//!
//! # The layer contract
//!
//! A [`Layer`] maps `rows x inputs` features to `rows x outputs` features. It
//!
//! - names its parameters and their shapes ([`Layer::params`]); the model prefixes each local
//!   name with `layers.{i}.`, and those names are what checkpoints use. A parameter declared
//!   with [`ParamSpec::shared`] keeps its name as given, and every layer that declares the same
//!   name uses the same parameter (a GPT's token embedding and its output head);
//! - fills its parameters' initial values from the model's seeded generator ([`Layer::init`]);
//! - tells the planner its cost ([`Layer::cost`]: FLOPs and the floats it keeps per sample);
//! - runs forward on a microbatch ([`Layer::forward`]), keeping what its backward needs in the
//!   microbatch's [`Saved`] buffers: several microbatches may be in flight at once, each with
//!   its own;
//! - runs backward ([`Layer::backward`]) from the gradient of its output to the gradient of its
//!   input (when asked for one), writing or adding its parameters' gradients through [`Work`],
//!   which says for each whether to overwrite (the first contribution of a step) or add.
//!
//! Layers hold no per-microbatch state of their own, so one layer value serves every device.
//!
//! # Models and stages
//!
//! A [`Model`] is a sequence of layers with a softmax cross-entropy on the last layer's output.
//! [`Model::info`] checks it (each layer's inputs are the previous layer's outputs; a shared
//! parameter has one shape) and describes it without a device: parameter names, shapes and
//! offsets in the flat parameter vector, and costs. The engine cuts the model into [`Stage`]s
//! at layer boundaries; a stage keeps its parameters and gradients in one buffer each, and
//! tells the engine as soon as each layer's gradients are final, so that the all-reduce of that
//! layer's bucket overlaps the rest of backward. A shared parameter whose layers land on two
//! stages is held by both; the engine sums the copies' gradients, so they stay identical.
//!
//! The MLP ([`MlpConfig::model`]) is one such model, built of [`Linear`] layers;
//! `examples/own_layer.rs` builds another from a layer of its own.
//!
//! # Tensor parallelism
//!
//! A layer may split its parameters across the `tp` ranks of a tensor-parallel group
//! (Megatron-LM's way): it declares which dimension of a parameter is split
//! ([`ParamSpec::split`]; the checkpoint keeps the whole parameter, and each rank holds its
//! part), reads its rank and the group's size from [`Ctx::tp`], computes on its parts and sums
//! partial results over the group with [`Ctx::tp_all_reduce`]. Every rank of a group runs the
//! same layers on the same rows, so every rank must make the same all-reduces in the same
//! order. A parameter that is not split is replicated: each rank holds it whole and must
//! compute the same gradient for it (as after a conjugate all-reduce of Megatron's `f` and `g`).
//! [`Linear::column`] and [`Linear::row`] are the two halves of a split MLP; the GPT's
//! [`gpt::Block`] splits attention by heads and its MLP by columns then rows, and its
//! embedding and tied head split the vocabulary ([`ParamSpec::split_uneven`],
//! [`Layer::class_part`]: the stage's cross-entropy then runs split too). A layer that splits
//! nothing runs whole on every rank.

pub mod decode;
pub mod gpt;
mod linear;
mod mlp;
mod stage;

use std::ops::Range;
use std::sync::Arc;

pub use decode::GptDecoder;
pub use gpt::GptConfig;
pub use linear::{Linear, LinearSplit};
pub use mlp::{MlpConfig, Network};
pub use stage::{LayerDone, Stage};

use std::collections::HashMap;
use std::sync::Mutex;

use crate::backend::{Backend, Elem, ViewLen};
use crate::error::{Error, Result};
use crate::rng::Rng;

/// One parameter of a layer: its name and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    /// The layer-local name (`weight`), or the model-wide name of a shared parameter.
    pub name: String,
    /// The shape (row-major); the parameter holds the product of its dimensions.
    pub shape: Vec<usize>,
    /// Whether `name` is model-wide, so that every layer declaring it shares one parameter.
    pub shared: bool,
    /// Whether the optimizer's weight decay applies to it (true unless [`ParamSpec::no_decay`]:
    /// GPT-2 and its kin decay matrices, not biases and normalisation gains).
    pub decay: bool,
    /// How it is split across a tensor-parallel group ([`ParamSpec::split`]); `None`: every
    /// rank holds it whole.
    pub split: Option<Split>,
}

/// How a parameter is split across the ranks of a tensor-parallel group: dimension `dim` of its
/// shape is seen as `groups` equal groups, and each group is cut into `tp` equal contiguous
/// parts, rank `k` holding part `k` of every group (in group order). `groups` is 1 for a plain
/// column or row split, 3 for a fused `q | k | v` projection split by heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    /// The dimension cut.
    pub dim: usize,
    /// Groups along it, each cut on its own.
    pub groups: usize,
    /// Whether the parts may differ by one (`tp` need not divide the dimension: rank `k`
    /// holds `part_of(n, tp, k)`, as a vocabulary of 65 tokens over 2 ranks: 33 and 32).
    pub uneven: bool,
}

/// `(start, len)` of rank `rank`'s part of `n` over `tp` ranks: the first `n % tp` ranks hold one
/// more (the parts of `parallel::comm::chunks`).
pub fn part_of(n: usize, tp: usize, rank: usize) -> (usize, usize) {
    let tp = tp.max(1);
    let (q, r) = (n / tp, n % tp);
    (rank * q + rank.min(r), q + usize::from(rank < r))
}

/// The geometry of a split parameter of shape `shape`: values before the split dimension
/// (`outer`), after it (`inner`), and along it per group.
fn split_geometry(shape: &[usize], split: Split) -> (usize, usize, usize) {
    let outer: usize = shape[..split.dim].iter().product();
    let inner: usize = shape[split.dim + 1..].iter().product();
    (outer, inner, shape[split.dim] / split.groups)
}

impl ParamSpec {
    /// A parameter of this layer alone, named `layers.{i}.{name}` in the model.
    pub fn new(name: &str, shape: &[usize]) -> Self {
        ParamSpec { name: name.to_string(), shape: shape.to_vec(), shared: false, decay: true, split: None }
    }
    /// A parameter named `name` in the whole model, shared by every layer that declares it.
    pub fn shared(name: &str, shape: &[usize]) -> Self {
        ParamSpec { name: name.to_string(), shape: shape.to_vec(), shared: true, decay: true, split: None }
    }
    /// The same parameter, left out of the optimizer's weight decay.
    pub fn no_decay(mut self) -> Self {
        self.decay = false;
        self
    }
    /// The same parameter, split across a tensor-parallel group along dimension `dim` seen as
    /// `groups` groups ([`Split`]).
    pub fn split(mut self, dim: usize, groups: usize) -> Self {
        self.split = Some(Split { dim, groups, uneven: false });
        self
    }
    /// The same parameter, split along dimension `dim` in parts that may differ by one (a
    /// vocabulary-parallel token table: any `tp` splits it).
    pub fn split_uneven(mut self, dim: usize) -> Self {
        self.split = Some(Split { dim, groups: 1, uneven: true });
        self
    }
    /// Number of values.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }
    /// Whether it holds no value.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a layer costs per sample, for the planner.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LayerCost {
    /// FLOPs of forward and backward together, per sample.
    pub flops_per_sample: f64,
    /// Floats the layer keeps per sample between forward and backward (its output, which the
    /// stage holds, not counted).
    pub saved_floats_per_sample: usize,
    /// Floats of scratch per sample its backward uses (shared by the microbatches).
    pub scratch_floats_per_sample: usize,
    /// Floats per sample it sums over its tensor-parallel group in a forward and backward
    /// together ([`Ctx::tp_all_reduce`]), when split (0 for a layer that splits nothing).
    pub tp_all_reduce_floats_per_sample: usize,
}

/// What a layer's forward and backward read: the device, the microbatch's rows and the
/// layer's parameters.
pub struct Ctx<'a, B: Backend> {
    /// The device.
    pub dev: &'a B,
    /// Rows (samples) of the microbatch.
    pub rows: usize,
    params: B::Ref<'a, f32>,
    ranges: &'a [Range<usize>],
    tp: Option<&'a TpGroup<B>>,
}

impl<'a, B: Backend> Ctx<'a, B> {
    /// Parameter `i` (in the order of [`Layer::params`]): this rank's part of it when it is split.
    pub fn param(&self, i: usize) -> B::Ref<'_, f32> {
        B::sub(&self.params, self.ranges[i].clone())
    }
    /// This rank and the ranks of the tensor-parallel group (`(0, 1)` without one).
    pub fn tp(&self) -> (usize, usize) {
        self.tp.map_or((0, 1), |g| (g.rank(), g.size()))
    }
    /// Sums `v` over the tensor-parallel group, in place (nothing to do without one). Every rank
    /// of the group must make the same calls in the same order.
    pub fn tp_all_reduce(&self, v: &mut B::Mut<'_, f32>) -> Result<()> {
        match self.tp {
            Some(g) if g.size() > 1 => g.all_reduce(self.dev, v),
            _ => Ok(()),
        }
    }
}

/// The buffers a layer keeps for one microbatch between its forward and its backward.
///
/// Forward asks for buffer `i` of a length with [`Saved::keep`] (allocated once, then reused by
/// later microbatches); backward reads it with [`Saved::get`].
pub struct Saved<B: Backend> {
    bufs: Vec<Option<B::Buf<f32>>>,
}

impl<B: Backend> Default for Saved<B> {
    fn default() -> Self {
        Saved { bufs: Vec::new() }
    }
}

impl<B: Backend> Saved<B> {
    /// Buffer `i`, `len` floats, to write in forward (its old contents are undefined).
    pub fn keep(&mut self, dev: &B, i: usize, len: usize) -> Result<&mut B::Buf<f32>> {
        if self.bufs.len() <= i {
            self.bufs.resize_with(i + 1, || None);
        }
        if self.bufs[i].as_ref().is_none_or(|b| B::buf_len(b) != len) {
            self.bufs[i] = Some(dev.alloc(len)?);
        }
        Ok(self.bufs[i].as_mut().unwrap())
    }
    /// Buffers `0..lens.len()`, buffer `i` of `lens[i]` floats, all at once (to write several in
    /// one forward).
    pub fn keep_all(&mut self, dev: &B, lens: &[usize]) -> Result<Vec<&mut B::Buf<f32>>> {
        for (i, &len) in lens.iter().enumerate() {
            self.keep(dev, i, len)?;
        }
        Ok(self.bufs.iter_mut().take(lens.len()).map(|b| b.as_mut().expect("kept above")).collect())
    }
    /// Buffer `i` as forward left it.
    pub fn get(&self, i: usize) -> Result<&B::Buf<f32>> {
        self.bufs.get(i).and_then(|b| b.as_ref()).ok_or_else(|| {
            Error::Invalid(format!("a layer's backward read saved buffer {i}, which its forward did not keep"))
        })
    }
}

/// What a layer's backward writes: its parameters' gradients, and scratch.
pub struct Work<'a, B: Backend> {
    grads: &'a mut B::Buf<f32>,
    /// The layer's parameters: their ranges in the stage's buffer and their stage indices.
    ranges: &'a [Range<usize>],
    slots: &'a [usize],
    /// Per stage parameter: whether it holds this step's gradient yet.
    live: &'a mut [bool],
    taken: Vec<bool>,
    scratch: &'a mut Vec<B::Buf<f32>>,
}

impl<'a, B: Backend> Work<'a, B> {
    /// The gradient of parameter `i` and the `beta` to write it with: 0 for the first
    /// contribution of the step (overwrite: the buffer holds stale values), 1 after (add).
    /// A layer must write every gradient it takes, and take every one of its parameters'.
    pub fn grad(&mut self, i: usize) -> (B::Mut<'_, f32>, f32) {
        let slot = self.slots[i];
        let beta = if self.live[slot] { 1.0 } else { 0.0 };
        self.live[slot] = true;
        self.taken[i] = true;
        (B::view_range_mut(self.grads, self.ranges[i].clone()), beta)
    }
    /// A scratch buffer of at least `len` floats (give it back with [`Work::give_back`]).
    pub fn take_scratch(&mut self, dev: &B, len: usize) -> Result<B::Buf<f32>> {
        match self.scratch.iter().position(|b| B::buf_len(b) >= len) {
            Some(i) => Ok(self.scratch.swap_remove(i)),
            None => dev.alloc(len),
        }
    }
    /// Returns a scratch buffer for later use.
    pub fn give_back(&mut self, buf: B::Buf<f32>) {
        self.scratch.push(buf);
    }
    /// Writes `src` as parameter `i`'s gradient (a copy for the step's first contribution, an
    /// add after): for ops that compute several gradients into scratch at once.
    pub fn put_grad(&mut self, dev: &B, i: usize, src: &B::Ref<'_, f32>) -> Result<()>
    where
        B: crate::ops::Ops,
    {
        let (mut g, beta) = self.grad(i);
        if beta == 0.0 {
            dev.copy(src, &mut g)
        } else {
            dev.axpy(1.0, src, &mut g)
        }
    }
}

/// A layer of a model: see the module documentation for the contract.
pub trait Layer<B: Backend>: Send + Sync + 'static {
    /// A short description for plans and messages, e.g. `linear 784x512 relu`.
    fn describe(&self) -> String;
    /// Features per sample in.
    fn inputs(&self) -> usize;
    /// Features per sample out.
    fn outputs(&self) -> usize;
    /// Its parameters, in the order [`Ctx::param`] and [`Work::grad`] index them.
    fn params(&self) -> Vec<ParamSpec>;
    /// Initial values of parameter `i` (`values` is zero-filled, `params()[i].len()` long),
    /// drawn from the model's generator. Called in layer order, once per parameter (for a
    /// shared one, by the first layer that declares it).
    fn init(&self, i: usize, rng: &mut Rng, values: &mut [f32]);
    /// Its cost per sample.
    fn cost(&self) -> LayerCost;
    /// The parts its work splits into across a tensor-parallel group, beyond its split
    /// parameters cutting evenly: `tp` must divide it (attention's heads; `None`, the default:
    /// no constraint). Checked with the model ([`ModelInfo::check_tp`]) before anything runs.
    fn tp_parts(&self) -> Option<usize> {
        None
    }
    /// When its output is the logits and it splits them by class across a tensor-parallel
    /// group of `tp` (a vocabulary-parallel head): the classes rank `rank` holds. Its output
    /// then holds that rank's `rows x classes` logits at the front, and the stage's
    /// cross-entropy runs split the same way (the whole logits never exist on one device).
    /// `None` (the default): the output is whole.
    fn class_part(&self, tp: usize, rank: usize) -> Option<Range<usize>> {
        let _ = (tp, rank);
        None
    }
    /// `y = f(x)` for `cx.rows` rows (`x`: `rows x inputs`, `y`: `rows x outputs`, whose old
    /// contents are undefined), keeping in `saved` what backward needs.
    fn forward(
        &self,
        cx: &Ctx<'_, B>,
        x: &B::Ref<'_, f32>,
        y: &mut B::Mut<'_, f32>,
        saved: &mut Saved<B>,
    ) -> Result<()>;
    /// From `dy` (`rows x outputs`), the gradient of the output of the forward that left
    /// `saved` (on input `x`): writes `dx` (`rows x inputs`) when asked for, and each
    /// parameter's gradient through `work`.
    fn backward(
        &self,
        cx: &Ctx<'_, B>,
        x: &B::Ref<'_, f32>,
        dy: &B::Ref<'_, f32>,
        dx: Option<&mut B::Mut<'_, f32>>,
        saved: &Saved<B>,
        work: &mut Work<'_, B>,
    ) -> Result<()>;
}

/// One parameter of a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamInfo {
    /// The name checkpoints use: `layers.{i}.{local}`, or a shared parameter's own name.
    pub name: String,
    /// The shape.
    pub shape: Vec<usize>,
    /// Where it sits in the model's flat parameter vector.
    pub range: Range<usize>,
    /// The layers that use it (more than one for a shared parameter).
    pub layers: Vec<usize>,
    /// Whether the optimizer's weight decay applies to it ([`ParamSpec::decay`]).
    pub decay: bool,
    /// How it is split across a tensor-parallel group ([`ParamSpec::split`]).
    pub split: Option<Split>,
}

impl ParamInfo {
    /// Values rank `rank` of a tensor-parallel group of `tp` holds.
    pub fn local_len(&self, tp: usize, rank: usize) -> usize {
        match self.split.filter(|_| tp > 1) {
            Some(split) => {
                let (outer, inner, group) = split_geometry(&self.shape, split);
                outer * split.groups * part_of(group, tp, rank).1 * inner
            }
            None => self.range.len(),
        }
    }

    /// Rank `rank`'s part of the whole parameter `whole` in a group of `tp` (`whole` itself
    /// when it is not split).
    pub fn shard(&self, whole: &[f32], tp: usize, rank: usize) -> Vec<f32> {
        let Some(split) = self.split.filter(|_| tp > 1) else { return whole.to_vec() };
        let (outer, inner, group) = split_geometry(&self.shape, split);
        let (start, size) = part_of(group, tp, rank);
        let mut out = Vec::with_capacity(self.local_len(tp, rank));
        for o in 0..outer {
            for g in 0..split.groups {
                let row = o * group * split.groups + g * group + start;
                out.extend_from_slice(&whole[row * inner..(row + size) * inner]);
            }
        }
        out
    }

    /// Writes rank `rank`'s part `part` back into the whole parameter `whole` ([`ParamInfo::shard`]'s inverse).
    pub fn unshard(&self, part: &[f32], tp: usize, rank: usize, whole: &mut [f32]) {
        let Some(split) = self.split.filter(|_| tp > 1) else { return whole.copy_from_slice(part) };
        let (outer, inner, group) = split_geometry(&self.shape, split);
        let (start, size) = part_of(group, tp, rank);
        let mut at = 0;
        for o in 0..outer {
            for g in 0..split.groups {
                let row = o * group * split.groups + g * group + start;
                whole[row * inner..(row + size) * inner].copy_from_slice(&part[at..at + size * inner]);
                at += size * inner;
            }
        }
    }
}

/// A layer's view of its tensor-parallel group: the sum over the ranks, in place (the engine
/// gives one made from its communicator).
pub trait TpReduce<B: Backend>: Send {
    /// Sums `buf` over the group's ranks, in place on every rank, the same bits on each.
    fn all_reduce_sum(&mut self, buf: &mut B::Buf<f32>) -> Result<()>;
}

/// A group's reduction and its staging buffers by length.
type TpInner<B> = (Box<dyn TpReduce<B>>, HashMap<usize, <B as Backend>::Buf<f32>>);

/// The tensor-parallel group of a stage: its rank, its size and the sum over it.
pub struct TpGroup<B: Backend> {
    rank: usize,
    size: usize,
    /// The reduction, and staging buffers by length (a view is summed through one).
    inner: Mutex<TpInner<B>>,
    /// The sums since the last [`TpGroup::take_log`]: start, end, floats.
    log: Mutex<Vec<(std::time::Instant, std::time::Instant, usize)>>,
}

impl<B: Backend> TpGroup<B> {
    /// Rank `rank` of a group of `size`, summing through `reduce`.
    pub fn new(rank: usize, size: usize, reduce: Box<dyn TpReduce<B>>) -> Self {
        TpGroup { rank, size, inner: Mutex::new((reduce, HashMap::new())), log: Mutex::new(Vec::new()) }
    }
    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }
    /// Ranks in the group.
    pub fn size(&self) -> usize {
        self.size
    }
    /// The sums made since the last call (start, end, floats summed), oldest first.
    pub fn take_log(&self) -> Vec<(std::time::Instant, std::time::Instant, usize)> {
        std::mem::take(&mut *self.log.lock().unwrap_or_else(|e| e.into_inner()))
    }
    /// Sums `v` over the group, in place.
    pub fn all_reduce(&self, dev: &B, v: &mut B::Mut<'_, f32>) -> Result<()> {
        let len = v.view_len();
        let start = std::time::Instant::now();
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (reduce, staging) = &mut *guard;
        let buf = match staging.entry(len) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(dev.alloc(len)?),
        };
        dev.copy(&B::reborrow(v), &mut B::view_mut(buf))?;
        reduce.all_reduce_sum(buf)?;
        let r = dev.copy(&B::view(buf), v);
        drop(guard);
        self.log.lock().unwrap_or_else(|e| e.into_inner()).push((start, std::time::Instant::now(), len));
        r
    }
}

/// One layer of a model, described without a device.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerInfo {
    /// [`Layer::describe`].
    pub kind: String,
    /// Features per sample in.
    pub inputs: usize,
    /// Features per sample out.
    pub outputs: usize,
    /// Its parameters, as indices into [`ModelInfo::params`], in the layer's order.
    pub params: Vec<usize>,
    /// Its cost per sample.
    pub cost: LayerCost,
    /// [`Layer::tp_parts`].
    pub tp_parts: Option<usize>,
}

/// A model described without a device: what the planner, checkpoints and messages need.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// The model's name, e.g. `MLP 784-512-512-10 (relu)`.
    pub name: String,
    /// Its layers.
    pub layers: Vec<LayerInfo>,
    /// Its parameters, in order of first use; the flat parameter vector holds them in this order.
    pub params: Vec<ParamInfo>,
    /// Classes of the cross-entropy: each sample's output holds `outputs / classes` rows of
    /// logits, with one label each.
    pub classes: usize,
}

impl ModelInfo {
    /// Layers.
    pub fn depth(&self) -> usize {
        self.layers.len()
    }
    /// Features per sample in.
    pub fn inputs(&self) -> usize {
        self.layers[0].inputs
    }
    /// Features per sample out.
    pub fn outputs(&self) -> usize {
        self.layers.last().unwrap().outputs
    }
    /// Labels per sample (`outputs / classes`).
    pub fn labels_per_sample(&self) -> usize {
        self.outputs() / self.classes
    }
    /// Total parameters.
    pub fn param_count(&self) -> usize {
        self.params.last().map_or(0, |p| p.range.end)
    }
    /// FLOPs of forward and backward per sample.
    pub fn flops_per_sample(&self) -> f64 {
        self.layers.iter().map(|l| l.cost.flops_per_sample).sum()
    }
    /// The parameter named `name`.
    pub fn param(&self, name: &str) -> Option<&ParamInfo> {
        self.params.iter().find(|p| p.name == name)
    }

    /// An error unless every split parameter cuts evenly into `tp` parts, naming the first
    /// that does not.
    pub fn check_tp(&self, tp: usize) -> Result<()> {
        for (i, l) in self.layers.iter().enumerate() {
            if let Some(parts) = l.tp_parts.filter(|p| tp == 0 || p % tp != 0) {
                return Err(Error::Invalid(format!(
                    "tp = {tp} does not divide the {parts} parts of layer {i} ({}): choose a tp that divides them",
                    l.kind
                )));
            }
        }
        for p in &self.params {
            if let Some(s) = p.split.filter(|s| !s.uneven) {
                let group = p.shape[s.dim] / s.groups;
                if tp == 0 || group % tp != 0 {
                    return Err(Error::Invalid(format!(
                        "tp = {tp}: `{}` of shape {:?} has {group} {} along dimension {} to share among the tensor-parallel ranks, which {tp} does not divide: choose a tp that divides it",
                        p.name,
                        p.shape,
                        if s.groups > 1 { "per group" } else { "values" },
                        s.dim
                    )));
                }
            }
        }
        Ok(())
    }

    /// Where the parameters of layers `layers` sit in a stage's flat buffer: each parameter
    /// once, in order of first use, so that the parameters a layer uses first are contiguous
    /// (its bucket).
    pub fn stage_layout(&self, layers: Range<usize>) -> StageLayout {
        self.stage_layout_tp(layers, 1, 0)
    }

    /// [`ModelInfo::stage_layout`] on rank `rank` of a tensor-parallel group of `tp`: each split
    /// parameter holds the rank's part.
    pub fn stage_layout_tp(&self, layers: Range<usize>, tp: usize, rank: usize) -> StageLayout {
        let mut params: Vec<usize> = Vec::new();
        let mut local = Vec::new();
        let mut buckets = Vec::new();
        let mut layer_params = Vec::new();
        let mut off = 0;
        for l in layers.clone() {
            let start = off;
            let mut mine = Vec::new();
            for &p in &self.layers[l].params {
                let at = match params.iter().position(|&q| q == p) {
                    Some(at) => at,
                    None => {
                        let n = self.params[p].local_len(tp, rank);
                        params.push(p);
                        local.push(off..off + n);
                        off += n;
                        params.len() - 1
                    }
                };
                mine.push(at);
            }
            buckets.push(start..off);
            layer_params.push(mine);
        }
        // The ranges the optimizer's weight decay skips, merged where they touch.
        let mut no_decay: Vec<Range<usize>> = Vec::new();
        for (k, _) in params.iter().enumerate().filter(|(_, &p)| !self.params[p].decay) {
            let r = local[k].clone();
            match no_decay.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => no_decay.push(r),
            }
        }
        StageLayout { layers, params, local, buckets, layer_params, no_decay, len: off, tp, tp_rank: rank }
    }
}

/// How a stage's parameters sit in its flat buffer ([`ModelInfo::stage_layout`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageLayout {
    /// The model's layers on the stage.
    pub layers: Range<usize>,
    /// The model parameters it holds (indices into [`ModelInfo::params`]), in buffer order.
    pub params: Vec<usize>,
    /// Where each sits in the stage's buffer.
    pub local: Vec<Range<usize>>,
    /// Per layer of the stage, the range of the parameters it uses first: its all-reduce bucket
    /// (empty for a layer without parameters of its own).
    pub buckets: Vec<Range<usize>>,
    /// Per layer of the stage, its parameters as indices into `params`.
    pub layer_params: Vec<Vec<usize>>,
    /// The ranges of the buffer the optimizer's weight decay skips (sorted, merged).
    pub no_decay: Vec<Range<usize>>,
    /// Floats in the stage's buffer.
    pub len: usize,
    /// The tensor-parallel group's size, and the rank whose parts of split parameters it holds.
    pub tp: usize,
    /// See `tp`.
    pub tp_rank: usize,
}

impl StageLayout {
    /// This stage's part of the model's flat vector `full`.
    pub fn gather(&self, info: &ModelInfo, full: &[f32]) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.len);
        for &p in &self.params {
            let info = &info.params[p];
            out.extend_from_slice(&info.shard(&full[info.range.clone()], self.tp, self.tp_rank));
        }
        out
    }
    /// Writes this stage's buffer `part` into the model's flat vector `full` (its rank's parts
    /// of split parameters).
    pub fn scatter(&self, info: &ModelInfo, part: &[f32], full: &mut [f32]) {
        for (k, &p) in self.params.iter().enumerate() {
            let info = &info.params[p];
            info.unshard(&part[self.local[k].clone()], self.tp, self.tp_rank, &mut full[info.range.clone()]);
        }
    }
}

/// A sequence of layers with a softmax cross-entropy on the last one's output: what the
/// engine splits across devices. Cheap to clone (the layers are shared).
pub struct Model<B: Backend> {
    name: String,
    layers: Vec<Arc<dyn Layer<B>>>,
    classes: Option<usize>,
}

impl<B: Backend> Clone for Model<B> {
    fn clone(&self) -> Self {
        Model { name: self.name.clone(), layers: self.layers.clone(), classes: self.classes }
    }
}

impl<B: Backend> Model<B> {
    /// An empty model named `name` (for plans and messages).
    pub fn new(name: &str) -> Self {
        Model { name: name.to_string(), layers: Vec::new(), classes: None }
    }
    /// Appends a layer.
    pub fn push(mut self, layer: impl Layer<B>) -> Self {
        self.layers.push(Arc::new(layer));
        self
    }
    /// Appends a shared layer value.
    pub fn push_arc(mut self, layer: Arc<dyn Layer<B>>) -> Self {
        self.layers.push(layer);
        self
    }
    /// Sets the classes of the loss when each sample's output holds several rows of logits
    /// (a language model: `context x vocabulary`); by default the output is one row per sample.
    pub fn classes(mut self, classes: usize) -> Self {
        self.classes = Some(classes);
        self
    }
    /// The model's name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The layers.
    pub fn layers(&self) -> &[Arc<dyn Layer<B>>] {
        &self.layers
    }

    /// Checks the model and describes it: an error names the first layer whose inputs are not
    /// the previous layer's outputs, a parameter with no values, or a shared parameter
    /// declared with two shapes.
    pub fn info(&self) -> Result<ModelInfo> {
        let bad = |why: String| Error::Invalid(format!("model `{}`: {why}", self.name));
        if self.layers.is_empty() {
            return Err(bad("it has no layers".into()));
        }
        let mut params: Vec<ParamInfo> = Vec::new();
        let mut layers = Vec::with_capacity(self.layers.len());
        let mut off = 0usize;
        for (i, l) in self.layers.iter().enumerate() {
            if l.inputs() == 0 || l.outputs() == 0 {
                return Err(bad(format!(
                    "layer {i} ({}) has {} inputs and {} outputs",
                    l.describe(),
                    l.inputs(),
                    l.outputs()
                )));
            }
            if i > 0 && l.inputs() != self.layers[i - 1].outputs() {
                return Err(bad(format!(
                    "layer {i} ({}) takes {} features, but layer {} ({}) gives {}",
                    l.describe(),
                    l.inputs(),
                    i - 1,
                    self.layers[i - 1].describe(),
                    self.layers[i - 1].outputs()
                )));
            }
            let mut mine = Vec::new();
            for spec in l.params() {
                if spec.is_empty() {
                    return Err(bad(format!(
                        "parameter `{}` of layer {i} has shape {:?}, no values",
                        spec.name, spec.shape
                    )));
                }
                let name = if spec.shared { spec.name.clone() } else { format!("layers.{i}.{}", spec.name) };
                match params.iter().position(|p| p.name == name) {
                    Some(p) if spec.shared && params[p].shape == spec.shape => {
                        params[p].layers.push(i);
                        mine.push(p);
                    }
                    Some(p) if spec.shared => {
                        return Err(bad(format!(
                            "shared parameter `{name}` is {:?} in layer {i} but {:?} in layer {}",
                            spec.shape, params[p].shape, params[p].layers[0]
                        )))
                    }
                    Some(_) => return Err(bad(format!("layer {i} declares parameter `{}` twice", spec.name))),
                    None => {
                        let n = spec.len();
                        if let Some(s) = spec.split {
                            if s.dim >= spec.shape.len() || s.groups == 0 || spec.shape[s.dim] % s.groups != 0 {
                                return Err(bad(format!(
                                    "parameter `{name}` of shape {:?} cannot be split along dimension {} in {} groups",
                                    spec.shape, s.dim, s.groups
                                )));
                            }
                        }
                        params.push(ParamInfo {
                            name,
                            shape: spec.shape,
                            range: off..off + n,
                            layers: vec![i],
                            decay: spec.decay,
                            split: spec.split,
                        });
                        off = off.checked_add(n).ok_or_else(|| bad("more parameters than an address holds".into()))?;
                        mine.push(params.len() - 1);
                    }
                }
            }
            layers.push(LayerInfo {
                kind: l.describe(),
                inputs: l.inputs(),
                outputs: l.outputs(),
                params: mine,
                cost: l.cost(),
                tp_parts: l.tp_parts(),
            });
        }
        let outputs = layers.last().unwrap().outputs;
        let classes = self.classes.unwrap_or(outputs);
        if classes == 0 || outputs % classes != 0 {
            return Err(bad(format!(
                "its output of {outputs} features is not a whole number of rows of {classes} classes"
            )));
        }
        Ok(ModelInfo { name: self.name.clone(), layers, params, classes })
    }

    /// Seeded initial parameters, the model's flat vector: one generator for the whole model,
    /// drawn from by each layer in order ([`Layer::init`]).
    pub fn init(&self, seed: u64) -> Result<Vec<f32>> {
        let info = self.info()?;
        let mut rng = Rng::new(seed);
        let mut flat = vec![0f32; info.param_count()];
        let mut done = vec![false; info.params.len()];
        for (i, l) in self.layers.iter().enumerate() {
            for (k, &p) in info.layers[i].params.iter().enumerate() {
                if !done[p] {
                    l.init(k, &mut rng, &mut flat[info.params[p].range.clone()]);
                    done[p] = true;
                }
            }
        }
        Ok(flat)
    }
}

/// Checks that a flat vector has the model's parameter count, for `what`.
pub(crate) fn check_flat<T: Elem>(what: &'static str, info: &ModelInfo, v: &[T]) -> Result<()> {
    if v.len() != info.param_count() {
        return Err(Error::shape(
            what,
            format!("{} values given, the model `{}` has {} parameters", v.len(), info.name, info.param_count()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuDevice;
    use crate::ops::activation::Activation;

    /// A layer that breaks the contract: its backward skips its gradient, or reads a saved
    /// buffer its forward did not keep.
    struct Careless {
        skip_grad: bool,
    }

    impl Layer<CpuDevice> for Careless {
        fn describe(&self) -> String {
            "careless".into()
        }
        fn inputs(&self) -> usize {
            3
        }
        fn outputs(&self) -> usize {
            3
        }
        fn params(&self) -> Vec<ParamSpec> {
            vec![ParamSpec::new("scale", &[3])]
        }
        fn init(&self, _: usize, _: &mut Rng, values: &mut [f32]) {
            values.fill(1.0);
        }
        fn cost(&self) -> LayerCost {
            LayerCost::default()
        }
        fn forward(
            &self,
            _: &Ctx<'_, CpuDevice>,
            x: &&[f32],
            y: &mut &mut [f32],
            _: &mut Saved<CpuDevice>,
        ) -> Result<()> {
            y.copy_from_slice(x);
            Ok(())
        }
        fn backward(
            &self,
            _: &Ctx<'_, CpuDevice>,
            _: &&[f32],
            dy: &&[f32],
            dx: Option<&mut &mut [f32]>,
            saved: &Saved<CpuDevice>,
            work: &mut Work<'_, CpuDevice>,
        ) -> Result<()> {
            if let Some(dx) = dx {
                dx.copy_from_slice(dy);
            }
            if self.skip_grad {
                return Ok(());
            }
            saved.get(0)?;
            work.grad(0).0.fill(0.0);
            Ok(())
        }
    }

    fn model(skip_grad: bool) -> Model<CpuDevice> {
        Model::new("careless").push(crate::nn::Linear::new(2, 3, Activation::Relu)).push(Careless { skip_grad })
    }

    #[test]
    fn a_layer_that_breaks_the_contract_is_named() {
        let dev = CpuDevice::new(0);
        for (skip, says) in [(true, "did not write the gradient of its parameter 0"), (false, "saved buffer 0")] {
            let m = model(skip);
            let mut net = Network::new(&dev, &m, 1).unwrap();
            net.load_batch(&dev, &[0.5, -1.0, 2.0, 1.0], &[0, 2]).unwrap();
            net.forward(&dev).unwrap();
            let e = net.backward(&dev, false).unwrap_err().to_string();
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn a_stage_refuses_an_output_gradient_of_the_wrong_size() {
        let dev = CpuDevice::new(0);
        let m = model(false).push(crate::nn::Linear::new(3, 4, Activation::None));
        let info = m.info().unwrap();
        let p = m.init(3).unwrap();
        let layout = info.stage_layout(0..1);
        let mut st = Stage::new(&dev, &m, 0..1, &layout.gather(&info, &p)).unwrap();
        st.load(&dev, 0, &[0.5, -1.0, 2.0, 1.0], &[0, 1]).unwrap();
        st.forward(&dev, 0).unwrap();
        let short = vec![0f32; 5];
        let e = st.backward(&dev, 0, Some(&short.as_slice()), 0.5, &mut |_, _| Ok(())).unwrap_err().to_string();
        assert!(e.contains("holds 5 values; its 2 rows of 3 features need 6"), "{e}");
        let e = Stage::new(&dev, &m, 0..1, &p).err().unwrap().to_string();
        assert!(e.contains("parameters for layers 0..1, which hold 9"), "{e}");
        assert_eq!(info.stage_layout(1..3).buckets, vec![0..3, 3..19]);
    }
}
