//! A contiguous range of a model's layers on one device: a pipeline stage, or the whole model.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use crate::backend::{Backend, ViewLen};
use crate::error::{Error, Result};
use crate::nn::{Ctx, Layer, Model, ModelInfo, Saved, StageLayout, TpGroup, Work};
use crate::ops::Ops;

/// Called by [`Stage::backward`] with a local layer index and the gradient buffer as soon as
/// that layer's gradients are final for the microbatch.
pub type LayerDone<'a, B> = dyn FnMut(usize, &<B as Backend>::Buf<f32>) -> Result<()> + 'a;

/// What one microbatch keeps between its forward and its backward on a stage.
struct Acts<B: Backend> {
    rows: usize,
    /// The stage's input (`rows x inputs`).
    x: B::Buf<f32>,
    /// Labels, on the last stage (`rows x labels per sample`).
    labels: B::Buf<i32>,
    /// Each layer's output.
    outs: Vec<B::Buf<f32>>,
    /// What each layer kept for its backward.
    saved: Vec<Saved<B>>,
}

/// A contiguous range of a model's layers on one device: a pipeline stage, or the whole model.
///
/// Its parameters and gradients are one buffer each, laid out by [`ModelInfo::stage_layout`].
/// Several microbatches may be in flight: each keeps its activations, in a slot keyed by the
/// microbatch number, from its forward to its backward. The stage's output is its last layer's
/// output (the logits on the last stage); its backward takes the gradient of that output and
/// leaves the gradient of its input for the previous stage.
pub struct Stage<B: Ops> {
    info: ModelInfo,
    layers: Vec<Arc<dyn Layer<B>>>,
    layout: StageLayout,
    /// Per layer, its parameters' ranges in the buffers (from `layout`, computed once).
    ranges: Vec<Vec<Range<usize>>>,
    params: B::Buf<f32>,
    grads: B::Buf<f32>,
    /// Per parameter of the stage: whether the gradient buffer holds this step's gradient yet
    /// (else the next contribution overwrites instead of adding).
    live: Vec<bool>,
    slots: HashMap<usize, Acts<B>>,
    spare: Vec<Acts<B>>,
    /// Backward's two gradient buffers (`rows x widest`), taking turns as a layer's output
    /// gradient and its input gradient; `dx_at` says which holds the stage's input gradient.
    g: [B::Buf<f32>; 2],
    g_rows: usize,
    dx_at: usize,
    scratch: Vec<B::Buf<f32>>,
    /// The cross-entropy's scratch when its loss stays on the device: per-row losses (as many
    /// as the largest microbatch's labels) and the bad-label flag.
    xent_ws: Option<(B::Buf<f32>, B::Buf<i32>)>,
    /// The tensor-parallel group its layers run in, if any.
    tp: Option<TpGroup<B>>,
}

impl<B: Ops> Stage<B> {
    /// Layers `layers` of `model`, holding `params` (the stage's buffer, in the order of
    /// [`ModelInfo::stage_layout`]; [`StageLayout::gather`] makes it from the model's flat vector).
    pub fn new(dev: &B, model: &Model<B>, layers: Range<usize>, params: &[f32]) -> Result<Self> {
        Self::with_tp(dev, model, layers, params, None)
    }

    /// [`Stage::new`] on one rank of a tensor-parallel group: `params` holds the rank's parts
    /// of the split parameters ([`ModelInfo::stage_layout_tp`]), and its layers sum over `tp`.
    pub fn with_tp(
        dev: &B,
        model: &Model<B>,
        layers: Range<usize>,
        params: &[f32],
        tp: Option<TpGroup<B>>,
    ) -> Result<Self> {
        let info = model.info()?;
        let (rank, size) = tp.as_ref().map_or((0, 1), |g| (g.rank(), g.size()));
        info.check_tp(size)?;
        if layers.is_empty() || layers.end > info.depth() {
            return Err(Error::Invalid(format!(
                "stage layers {layers:?} are not inside the model's {} layers",
                info.depth()
            )));
        }
        let layout = info.stage_layout_tp(layers.clone(), size, rank);
        if params.len() != layout.len {
            return Err(Error::shape(
                "Stage::new",
                format!("{} parameters for layers {layers:?}, which hold {}", params.len(), layout.len),
            ));
        }
        let ranges =
            layout.layer_params.iter().map(|ps| ps.iter().map(|&k| layout.local[k].clone()).collect()).collect();
        Ok(Stage {
            layers: model.layers()[layers].to_vec(),
            ranges,
            live: vec![false; layout.params.len()],
            params: dev.upload(params)?,
            grads: dev.alloc(layout.len)?,
            layout,
            info,
            slots: HashMap::new(),
            spare: Vec::new(),
            g: [dev.alloc(0)?, dev.alloc(0)?],
            g_rows: 0,
            dx_at: 0,
            scratch: Vec::new(),
            xent_ws: None,
            tp,
        })
    }

    /// The tensor-parallel group its layers run in, if any.
    pub fn tp_group(&self) -> Option<&TpGroup<B>> {
        self.tp.as_ref()
    }

    /// The model it is part of.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }
    /// Where its parameters sit in its buffer.
    pub fn layout(&self) -> &StageLayout {
        &self.layout
    }
    /// The model's layers it holds.
    pub fn layers(&self) -> Range<usize> {
        self.layout.layers.clone()
    }
    /// Whether it holds the model's first layer (its input is data).
    pub fn is_first(&self) -> bool {
        self.layout.layers.start == 0
    }
    /// Whether it holds the model's last layer (it computes the loss).
    pub fn is_last(&self) -> bool {
        self.layout.layers.end == self.info.depth()
    }
    /// Features of its input.
    pub fn fan_in(&self) -> usize {
        self.layers[0].inputs()
    }
    /// Features of its output.
    pub fn fan_out(&self) -> usize {
        self.layers.last().unwrap().outputs()
    }
    /// Parameters.
    pub fn params(&self) -> &B::Buf<f32> {
        &self.params
    }
    /// Gradients.
    pub fn grads(&self) -> &B::Buf<f32> {
        &self.grads
    }
    /// Gradients, writable (to all-reduce or scale them).
    pub fn grads_mut(&mut self) -> &mut B::Buf<f32> {
        &mut self.grads
    }
    /// Parameters (writable) and gradients, for an optimizer step.
    pub fn params_and_grads(&mut self) -> (&mut B::Buf<f32>, &B::Buf<f32>) {
        (&mut self.params, &self.grads)
    }
    /// Starts a new step: the next backward overwrites the gradients instead of adding.
    pub fn start_step(&mut self) {
        self.live.iter_mut().for_each(|l| *l = false);
    }
    /// Microbatches whose activations are held (forwarded, not yet backwarded).
    pub fn in_flight(&self) -> usize {
        self.slots.len()
    }

    fn slot(&mut self, dev: &B, mb: usize, rows: usize) -> Result<&mut Acts<B>> {
        if !self.slots.contains_key(&mb) {
            let acts = match self.spare.iter().position(|a| a.rows == rows) {
                Some(i) => self.spare.swap_remove(i),
                None => {
                    let outs = self.layers.iter().map(|l| dev.alloc(rows * l.outputs())).collect::<Result<Vec<_>>>()?;
                    Acts {
                        rows,
                        x: dev.alloc(rows * self.fan_in())?,
                        labels: dev.alloc(rows * self.info.labels_per_sample())?,
                        outs,
                        saved: self.layers.iter().map(|_| Saved::default()).collect(),
                    }
                }
            };
            self.slots.insert(mb, acts);
        }
        let acts = self.slots.get_mut(&mb).unwrap();
        if acts.rows != rows {
            return Err(Error::Invalid(format!("microbatch {mb} is in flight with {} rows, not {rows}", acts.rows)));
        }
        Ok(acts)
    }

    /// The input buffer of microbatch `mb` (`rows x fan_in`), to be filled before its forward.
    pub(crate) fn input_mut(&mut self, dev: &B, mb: usize, rows: usize) -> Result<&mut B::Buf<f32>> {
        Ok(&mut self.slot(dev, mb, rows)?.x)
    }

    /// The rows that `labels` label (labels per sample of the model each), or an error.
    fn rows_of(&self, what: &'static str, labels: usize) -> Result<usize> {
        let per = self.info.labels_per_sample();
        if labels == 0 {
            return Err(Error::shape(what, "the batch is empty"));
        }
        if labels % per != 0 {
            return Err(Error::shape(
                what,
                format!("{labels} labels is not a whole number of samples of {per} labels each"),
            ));
        }
        Ok(labels / per)
    }

    /// An error naming the first label outside `0..classes` (checked on the host, before the
    /// labels reach a device whose check could only be read back later).
    fn check_labels(&self, labels: &[i32]) -> Result<()> {
        let classes = self.info.classes;
        match labels.iter().position(|&l| l < 0 || l as usize >= classes) {
            Some(row) => Err(Error::Label { row, label: labels[row] as i64, classes }),
            None => Ok(()),
        }
    }

    /// Writes microbatch `mb`'s input and (on the last stage) labels from the host.
    pub fn load(&mut self, dev: &B, mb: usize, x: &[f32], labels: &[i32]) -> Result<()> {
        let rows = self.rows_of("Stage::load", labels.len())?;
        if self.is_last() {
            self.check_labels(labels)?;
        }
        let fan_in = self.fan_in();
        if x.len() != rows * fan_in {
            return Err(Error::shape(
                "Stage::load",
                format!(
                    "inputs hold {} values for {rows} samples; the model takes {fan_in} features per sample ({} expected)",
                    x.len(),
                    rows * fan_in
                ),
            ));
        }
        let acts = self.slot(dev, mb, rows)?;
        dev.write(&mut B::view_mut(&mut acts.x), x)?;
        dev.write(&mut B::view_mut(&mut acts.labels), labels)
    }

    /// Writes microbatch `mb`'s labels (last stage) from the host.
    pub fn load_labels(&mut self, dev: &B, mb: usize, labels: &[i32]) -> Result<()> {
        let rows = self.rows_of("Stage::load_labels", labels.len())?;
        self.check_labels(labels)?;
        let acts = self.slot(dev, mb, rows)?;
        dev.write(&mut B::view_mut(&mut acts.labels), labels)
    }

    fn ctx<'a>(
        dev: &'a B,
        rows: usize,
        params: &'a B::Buf<f32>,
        ranges: &'a [Range<usize>],
        tp: Option<&'a TpGroup<B>>,
    ) -> Ctx<'a, B> {
        Ctx { dev, rows, params: B::view(params), ranges, tp }
    }

    /// Forward of microbatch `mb`, whose input is loaded.
    pub fn forward(&mut self, dev: &B, mb: usize) -> Result<()> {
        let Stage { slots, layers, layout, ranges, params, tp, .. } = self;
        let acts =
            slots.get_mut(&mb).ok_or_else(|| Error::Invalid(format!("forward of microbatch {mb} before its input")))?;
        let rows = acts.rows;
        for (i, layer) in layers.iter().enumerate() {
            let cx = Self::ctx(dev, rows, params, &ranges[i], tp.as_ref());
            let (before, rest) = acts.outs.split_at_mut(i);
            let input = if i == 0 { B::view(&acts.x) } else { B::view(&before[i - 1]) };
            layer
                .forward(&cx, &input, &mut B::view_mut(&mut rest[0]), &mut acts.saved[i])
                .map_err(|e| in_layer(layout.layers.start + i, layer.as_ref(), e))?;
        }
        Ok(())
    }

    /// The output of microbatch `mb`'s forward: the stage's last layer's output (the logits on
    /// the last stage).
    pub fn output(&self, mb: usize) -> Result<&B::Buf<f32>> {
        let acts =
            self.slots.get(&mb).ok_or_else(|| Error::Invalid(format!("no forward of microbatch {mb} in flight")))?;
        Ok(acts.outs.last().unwrap())
    }

    /// Mean cross-entropy of microbatch `mb`'s logits (last stage). With a vocabulary-parallel
    /// head every rank of the stage's tensor-parallel group must call it (they sum their parts).
    pub fn loss(&self, dev: &B, mb: usize) -> Result<f32> {
        let acts =
            self.slots.get(&mb).ok_or_else(|| Error::Invalid(format!("no forward of microbatch {mb} in flight")))?;
        let lps = self.info.labels_per_sample();
        let n = acts.rows * lps;
        let logits = B::view(acts.outs.last().unwrap());
        let labels = B::view(&acts.labels);
        match (self.class_part(), self.tp.as_ref()) {
            (Some(part), Some(group)) => {
                let cols = part.len();
                let stats = Self::class_stats(dev, group, n, &part, self.info.classes, &logits, &labels)?;
                let (mut dl, mut rl, mut l) = (dev.alloc::<f32>(n * cols)?, dev.alloc::<f32>(n)?, dev.alloc::<f32>(1)?);
                let lv = B::sub(&logits, 0..n * cols);
                dev.xent_part_backward(
                    n,
                    cols,
                    part.start,
                    group.size(),
                    &lv,
                    &labels,
                    &B::view(&stats),
                    1.0 / n.max(1) as f32,
                    &mut B::view_mut(&mut dl),
                    &mut B::view_mut(&mut rl),
                    &mut B::view_mut(&mut l),
                )?;
                let got = dev.download(&B::view(&l))?;
                Ok(got[0])
            }
            _ => dev.xent(n, self.info.classes, &logits, &labels),
        }
    }

    /// Rows of microbatch `mb` (last stage) whose largest logit is their label's (`labels`, as
    /// loaded). With a vocabulary-parallel head every rank of the group must call it: each
    /// offers its part's best class and the group agrees on the best (ties to the lowest class).
    pub fn correct(&self, dev: &B, mb: usize, labels: &[i32]) -> Result<usize> {
        let acts =
            self.slots.get(&mb).ok_or_else(|| Error::Invalid(format!("no forward of microbatch {mb} in flight")))?;
        let (part, slots, me) = match (self.class_part(), self.tp.as_ref()) {
            (Some(p), Some(g)) => (p, g.size(), g.rank()),
            _ => (0..self.info.classes, 1, 0),
        };
        let cols = part.len();
        let n = labels.len();
        // The rank's logits only (a split head leaves the rest of the output unwritten).
        let logits = dev.download(&B::view_range(acts.outs.last().unwrap(), 0..n * cols))?;
        // Per row and rank: (best logit, its class), this rank's slot filled.
        let mut best = vec![0f32; n * slots * 2];
        for r in 0..n {
            let row = &logits[r * cols..(r + 1) * cols];
            let (mut v, mut at) = (f32::NEG_INFINITY, part.start);
            for (j, &x) in row.iter().enumerate() {
                if x > v {
                    (v, at) = (x, part.start + j);
                }
            }
            best[(r * slots + me) * 2] = v;
            best[(r * slots + me) * 2 + 1] = at as f32;
        }
        if let Some(g) = self.tp.as_ref().filter(|_| slots > 1) {
            let mut buf = dev.upload(&best)?;
            g.all_reduce(dev, &mut B::view_mut(&mut buf))?;
            best = dev.download(&B::view(&buf))?;
        }
        Ok((0..n)
            .filter(|&r| {
                let mut pick = (f32::NEG_INFINITY, usize::MAX);
                for k in 0..slots {
                    let (v, at) = (best[(r * slots + k) * 2], best[(r * slots + k) * 2 + 1] as usize);
                    if v > pick.0 || (v == pick.0 && at < pick.1) {
                        pick = (v, at);
                    }
                }
                pick.1 as i64 == labels[r] as i64
            })
            .count())
    }

    /// The classes of a vocabulary-parallel head on this rank (last stage, tp > 1).
    fn class_part(&self) -> Option<Range<usize>> {
        let g = self.tp.as_ref().filter(|g| g.size() > 1)?;
        if !self.is_last() {
            return None;
        }
        self.layers.last()?.class_part(g.size(), g.rank())
    }

    /// The summed per-row statistics of a vocabulary-parallel cross-entropy over `group`.
    #[allow(clippy::too_many_arguments)]
    fn class_stats(
        dev: &B,
        group: &TpGroup<B>,
        n: usize,
        part: &Range<usize>,
        classes: usize,
        logits: &B::Ref<'_, f32>,
        labels: &B::Ref<'_, i32>,
    ) -> Result<B::Buf<f32>> {
        let slots = group.size();
        let mut stats = dev.alloc::<f32>(n * (slots + 1))?;
        let lv = B::sub(logits, 0..n * part.len());
        dev.xent_part_stats(
            n,
            part.len(),
            part.start,
            classes,
            (group.rank(), slots),
            &lv,
            labels,
            &mut B::view_mut(&mut stats),
        )?;
        group.all_reduce(dev, &mut B::view_mut(&mut stats))?;
        Ok(stats)
    }

    fn grad_buffers(&mut self, dev: &B, rows: usize) -> Result<()> {
        if self.g_rows < rows {
            let widest = self.layers.iter().map(|l| l.inputs().max(l.outputs())).max().unwrap();
            self.g = [dev.alloc(rows * widest)?, dev.alloc(rows * widest)?];
            self.g_rows = rows;
        }
        Ok(())
    }

    /// Backward of microbatch `mb`: on the last stage from the loss (`dlogits = loss_scale *
    /// (softmax - onehot)`, `loss_scale` = 1 / labels of the whole batch), elsewhere from
    /// `grad_out`, the gradient of the stage's output. Adds to the gradients (overwrites each
    /// one's first contribution of a step), leaves the input gradient for
    /// [`Stage::input_grad`] (except on the first stage) and calls `layer_done(i)` as soon as
    /// local layer `i`'s gradients are final for this microbatch. The activations stay until
    /// [`Stage::release`]. Returns the microbatch's share of the loss on the last stage.
    pub fn backward(
        &mut self,
        dev: &B,
        mb: usize,
        grad_out: Option<&B::Ref<'_, f32>>,
        loss_scale: f32,
        layer_done: &mut LayerDone<'_, B>,
    ) -> Result<Option<f32>> {
        self.backward_impl(dev, mb, grad_out, loss_scale, layer_done, None)
    }

    /// [`Stage::backward`] with the loss left on the device, in `loss[0]` (last stage), so that
    /// the host does not wait for it; read it with the next download. A label out of range is
    /// refused by [`Stage::load`]; [`Stage::check_loss_flags`] reads the device's own check.
    pub fn backward_to(
        &mut self,
        dev: &B,
        mb: usize,
        grad_out: Option<&B::Ref<'_, f32>>,
        loss_scale: f32,
        layer_done: &mut LayerDone<'_, B>,
        loss: &mut B::Mut<'_, f32>,
    ) -> Result<()> {
        self.backward_impl(dev, mb, grad_out, loss_scale, layer_done, Some(loss)).map(|_| ())
    }

    /// An error if the device's cross-entropy met a label out of range since the stage was made
    /// (one download: call it where the loss is read anyway).
    pub fn check_loss_flags(&self, dev: &B) -> Result<()> {
        let Some((_, err)) = &self.xent_ws else { return Ok(()) };
        match dev.download(&B::view(err))?[0] {
            0 => Ok(()),
            bad => Err(Error::Invalid(format!(
                "the cross-entropy on {} met a label outside 0..{} in row {} of a batch: the labels are corrupt on                  the device (the host checked them when they were loaded)",
                dev.name(),
                self.info.classes,
                bad - 1
            ))),
        }
    }

    fn backward_impl(
        &mut self,
        dev: &B,
        mb: usize,
        grad_out: Option<&B::Ref<'_, f32>>,
        loss_scale: f32,
        layer_done: &mut LayerDone<'_, B>,
        loss_to: Option<&mut B::Mut<'_, f32>>,
    ) -> Result<Option<f32>> {
        let rows = self
            .slots
            .get(&mb)
            .ok_or_else(|| Error::Invalid(format!("backward of microbatch {mb} without its forward")))?
            .rows;
        self.grad_buffers(dev, rows)?;
        let (is_first, is_last) = (self.is_first(), self.is_last());
        let lps = self.info.labels_per_sample();
        let classes = self.info.classes;
        let class_part = self.class_part();
        if is_last && loss_to.is_some() && self.xent_ws.as_ref().is_none_or(|(r, _)| B::buf_len(r) < rows * lps) {
            let err = match self.xent_ws.take() {
                Some((_, err)) => err,
                None => dev.alloc::<i32>(1)?,
            };
            self.xent_ws = Some((dev.alloc(rows * lps)?, err));
        }
        let Stage { slots, layers, layout, ranges, params, grads, live, g, scratch, dx_at, xent_ws, tp, .. } = self;
        let acts = &slots[&mb];
        let out_w = layers.last().unwrap().outputs();
        let mut loss = None;
        // Which of `g` holds the current output gradient (None: `grad_out`).
        let mut cur: Option<usize> = None;
        if is_last {
            let logits = B::view(acts.outs.last().unwrap());
            let mut dy = B::view_range_mut(&mut g[0], 0..rows * out_w);
            let labels = B::view(&acts.labels);
            match (class_part, loss_to) {
                (Some(part), loss_to) => {
                    // Vocabulary-parallel: each rank's classes, the rows' statistics summed
                    // over the group, each rank its columns of the gradient.
                    let group = tp.as_ref().expect("a split head runs in a group");
                    let (n, cols) = (rows * lps, part.len());
                    let stats = Self::class_stats(dev, group, n, &part, classes, &logits, &labels)?;
                    let mut rl = dev.alloc::<f32>(n)?;
                    let lv = B::sub(&logits, 0..n * cols);
                    let mut dl = B::sub_mut(&mut dy, 0..n * cols);
                    let (sv, slots) = (B::view(&stats), group.size());
                    let mut rlv = B::view_mut(&mut rl);
                    match loss_to {
                        Some(out) => dev.xent_part_backward(
                            n, cols, part.start, slots, &lv, &labels, &sv, loss_scale, &mut dl, &mut rlv, out,
                        )?,
                        None => {
                            let mut l = dev.alloc::<f32>(1)?;
                            let mut lv1 = B::view_mut(&mut l);
                            dev.xent_part_backward(
                                n, cols, part.start, slots, &lv, &labels, &sv, loss_scale, &mut dl, &mut rlv, &mut lv1,
                            )?;
                            drop(lv1);
                            loss = Some(dev.download(&B::view(&l))?[0]);
                        }
                    }
                }
                (None, None) => {
                    loss = Some(dev.xent_backward_scaled(
                        rows * lps,
                        classes,
                        &logits,
                        &B::view(&acts.labels),
                        loss_scale,
                        &mut dy,
                    )?)
                }
                (None, Some(out)) => {
                    let (row_loss, err) = xent_ws.as_mut().expect("allocated above");
                    dev.xent_backward_to(
                        rows * lps,
                        classes,
                        &logits,
                        &B::view(&acts.labels),
                        loss_scale,
                        &mut dy,
                        &mut B::view_range_mut(row_loss, 0..rows * lps),
                        out,
                        &mut B::view_mut(err),
                    )?
                }
            }
            cur = Some(0);
        } else {
            let g = grad_out
                .ok_or_else(|| Error::Invalid("a non-last stage's backward needs the output gradient".into()))?;
            if g.view_len() != rows * out_w {
                return Err(Error::shape(
                    "Stage::backward",
                    format!(
                        "the output gradient of microbatch {mb} holds {} values; its {rows} rows of {out_w} features need {}",
                        g.view_len(),
                        rows * out_w
                    ),
                ));
            }
        }
        for i in (0..layers.len()).rev() {
            let layer = &layers[i];
            let cx = Self::ctx(dev, rows, params, &ranges[i], tp.as_ref());
            let input = if i == 0 { B::view(&acts.x) } else { B::view(&acts.outs[i - 1]) };
            let want_dx = i > 0 || !is_first;
            let to = match cur {
                Some(c) => 1 - c,
                None => 0,
            };
            let (g0, g1) = g.split_at_mut(1);
            let (from_buf, to_buf) = if to == 1 { (&g0[0], &mut g1[0]) } else { (&g1[0], &mut g0[0]) };
            let dy = match cur {
                Some(_) => B::view_range(from_buf, 0..rows * layer.outputs()),
                None => B::sub(grad_out.unwrap(), 0..rows * layer.outputs()),
            };
            let mut dx = B::view_range_mut(to_buf, 0..rows * layer.inputs());
            let slots_of = &layout.layer_params[i];
            let mut work =
                Work { grads, ranges: &ranges[i], slots: slots_of, live, taken: vec![false; slots_of.len()], scratch };
            let model_i = layout.layers.start + i;
            layer
                .backward(&cx, &input, &dy, want_dx.then_some(&mut dx), &acts.saved[i], &mut work)
                .map_err(|e| in_layer(model_i, layer.as_ref(), e))?;
            if let Some(k) = work.taken.iter().position(|t| !t) {
                return Err(Error::Invalid(format!(
                    "layer {model_i} ({}) did not write the gradient of its parameter {k} in backward: a layer \
                     takes every one of its gradients with Work::grad",
                    layer.describe()
                )));
            }
            drop(work);
            layer_done(i, grads)?;
            cur = Some(to);
        }
        if !is_first {
            *dx_at = cur.unwrap();
        }
        Ok(loss)
    }

    /// Frees microbatch `mb`'s activations (after its backward); their buffers are reused.
    pub fn release(&mut self, mb: usize) {
        if let Some(acts) = self.slots.remove(&mb) {
            if self.spare.len() >= 4 {
                self.spare.remove(0);
            }
            self.spare.push(acts);
        }
    }

    /// The gradient of the stage's input from the last backward (`rows x fan_in`), to send to
    /// the previous stage.
    pub fn input_grad(&self, rows: usize) -> B::Ref<'_, f32> {
        B::view_range(&self.g[self.dx_at], 0..rows * self.fan_in())
    }
}

/// An error of a layer, with the layer named.
fn in_layer<B: Backend>(i: usize, layer: &dyn Layer<B>, e: Error) -> Error {
    match e {
        Error::Shape { op, detail } => {
            Error::Shape { op, detail: format!("{detail} (in layer {i}, {})", layer.describe()) }
        }
        e => e,
    }
}
