//! Who holds what of a stage's parameters beyond its layout: the parameters shared with other
//! stages of a replica ([`Tied`]), and ZeRO stage 1's shard of each gradient bucket
//! ([`Shard`]). Used by the engines and by the planner's memory estimate.

use std::ops::Range;

use crate::nn::{ModelInfo, StageLayout};
use crate::parallel::comm::chunks;
use crate::parallel::Plan;

/// A shared parameter of which this stage holds a copy, as do other stages of its replica.
#[derive(Debug, Clone)]
pub(crate) struct Tied {
    /// Its index among the stage's parameters.
    pub(crate) slot: usize,
    /// Its index among the model's parameters.
    pub(crate) param: usize,
    /// The stages holding a copy, in order (this one among them).
    pub(crate) holders: Vec<usize>,
}

/// The shared parameters that stage `s` of `plan` holds with other stages.
pub(crate) fn tied_params(info: &ModelInfo, plan: &Plan, s: usize) -> Vec<Tied> {
    let layout = info.stage_layout(plan.stages[s].clone());
    layout
        .params
        .iter()
        .enumerate()
        .filter_map(|(slot, &param)| {
            let holders: Vec<usize> = (0..plan.stages.len())
                .filter(|&q| info.params[param].layers.iter().any(|l| plan.stages[q].contains(l)))
                .collect();
            (holders.len() > 1).then_some(Tied { slot, param, holders })
        })
        .collect()
}

/// ZeRO stage 1 on one worker: the part of each gradient bucket (a layer's parameters) that
/// this replica reduces, updates and keeps optimizer state for.
///
/// A bucket is split into the dp replicas' parts [`chunks`]`(len, dp)`, the communicators'
/// reduce-scatter parts; a bucket that holds a parameter shared with another stage stays
/// whole on every replica (all-reduced as without ZeRO), since the stages' copies of that
/// parameter are summed after the reduction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Shard {
    /// This replica and the replicas.
    pub(crate) replica: usize,
    pub(crate) dp: usize,
    /// Per bucket: the range of the stage's buffer this replica updates, and whether it is the
    /// replica's part of a split bucket (else the whole bucket).
    pub(crate) owned: Vec<(Range<usize>, bool)>,
    /// Per bucket: where its owned range starts in the optimizer state.
    pub(crate) state_at: Vec<usize>,
    /// Floats of each optimizer state buffer.
    pub(crate) state_len: usize,
}

impl Shard {
    /// Replica `replica`'s shard of a stage of layout `layout` with shared parameters `tied`.
    pub(crate) fn new(layout: &StageLayout, tied: &[Tied], dp: usize, replica: usize) -> Shard {
        let (mut owned, mut state_at, mut at) = (Vec::new(), Vec::new(), 0);
        for b in &layout.buckets {
            let whole = tied.iter().any(|t| {
                let r = &layout.local[t.slot];
                r.start < b.end && b.start < r.end
            });
            let range = if whole {
                b.clone()
            } else {
                let c = chunks(b.len(), dp)[replica].clone();
                b.start + c.start..b.start + c.end
            };
            state_at.push(at);
            at += range.len();
            owned.push((range, !whole));
        }
        Shard { replica, dp, owned, state_at, state_len: at }
    }

    /// This shard's part of a whole stage vector (in state order).
    pub(crate) fn gather(&self, stage_vec: &[f32]) -> Vec<f32> {
        self.owned.iter().flat_map(|(r, _)| stage_vec[r.clone()].iter().copied()).collect()
    }

    /// Writes this shard's part `part` (in state order) into a whole stage vector.
    pub(crate) fn scatter(&self, part: &[f32], stage_vec: &mut [f32]) {
        for ((r, _), &at) in self.owned.iter().zip(&self.state_at) {
            stage_vec[r.clone()].copy_from_slice(&part[at..at + r.len()]);
        }
    }
}

/// The shard of replica `r` of a stage laid out as `layout`, if the plan shards the optimizer
/// state.
pub(crate) fn shard_of(layout: &StageLayout, plan: &Plan, tied: &[Tied], reduce: bool, r: usize) -> Option<Shard> {
    (plan.zero >= 1 && reduce).then(|| Shard::new(layout, tied, plan.mesh.dp, r))
}
