//! Training over several devices: a mesh of `dp` data-parallel replicas, each a pipeline of
//! `pp` stages (model parallelism), and everything the engine needs: plans (which layers go
//! to which stage, how many microbatches, which schedule), schedules as checked data,
//! communicators, the executor, the planner and timelines.
//!
//! The shard arithmetic lives here as pure functions; one device is the degenerate plan
//! (dp = pp = microbatches = 1) of the same engine.

pub mod comm;
pub mod engine;
#[cfg(feature = "mpi")]
pub mod mpi;
pub mod nccl;
pub mod planner;
pub mod schedule;
pub(crate) mod shard;
pub mod timeline;

use std::ops::Range;

use crate::error::{Error, Result};
use crate::nn::ModelInfo;
pub use schedule::ScheduleKind;

/// The shape of the device grid: `dp` replicas of a `pp`-stage pipeline, each stage spread
/// over `tp` devices (tensor parallelism). Device `(r * pp + s) * tp + k` of the list runs
/// tensor-parallel rank `k` of stage `s` of replica `r`: tp is innermost, so that a stage's
/// devices are neighbours (on a machine with several GPUs, the ones with the fastest links).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mesh {
    /// Data-parallel replicas.
    pub dp: usize,
    /// Pipeline stages per replica.
    pub pp: usize,
    /// Tensor-parallel devices per stage.
    pub tp: usize,
}

impl Mesh {
    /// Devices the mesh needs.
    pub fn devices(&self) -> usize {
        self.dp * self.pp * self.tp
    }
    /// The device index of tensor-parallel rank 0 of stage `s` of replica `r`.
    pub fn device(&self, r: usize, s: usize) -> usize {
        self.index(r, s, 0)
    }
    /// The device index of tensor-parallel rank `k` of stage `s` of replica `r`.
    pub fn index(&self, r: usize, s: usize, k: usize) -> usize {
        (r * self.pp + s) * self.tp + k
    }
    /// `(replica, stage, tensor-parallel rank)` of device `i`.
    pub fn coords(&self, i: usize) -> (usize, usize, usize) {
        (i / (self.pp * self.tp), (i / self.tp) % self.pp, i % self.tp)
    }
}

/// How one training step runs on a mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The mesh.
    pub mesh: Mesh,
    /// The model's layers on each stage: contiguous, in order, covering every layer.
    pub stages: Vec<Range<usize>>,
    /// Microbatches per replica per step.
    pub microbatches: usize,
    /// The pipeline schedule.
    pub schedule: ScheduleKind,
    /// Pipeline passes per step whose gradients accumulate before the one all-reduce
    /// (gradient accumulation; 1: none).
    pub accumulate: usize,
    /// ZeRO stage: 0 keeps the whole optimizer state on every replica; 1 shards it across the
    /// dp replicas (gradients reduce-scattered, each replica updates its part of the
    /// parameters, then they are all-gathered). Set with [`Plan::with_zero`].
    pub zero: usize,
    /// How long any wait on another device or rank may last before the step fails with an
    /// error naming it ([`DEFAULT_COMM_TIMEOUT`] unless set with [`Plan::with_comm_timeout`];
    /// the command line reads `TESSERA_COMM_TIMEOUT`).
    pub comm_timeout: std::time::Duration,
}

/// The format tag of [`Plan::encode`].
const PLAN_FORMAT: u64 = 0x7465_7373_706c_0002; // "tesspl", version 2

/// The default of [`Plan::comm_timeout`]: two minutes.
pub const DEFAULT_COMM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// A timeout in seconds (`120`, `0.5`), or `None` if it is not a positive number.
pub fn parse_comm_timeout(v: &str) -> Option<std::time::Duration> {
    v.trim().parse::<f64>().ok().and_then(|s| std::time::Duration::try_from_secs_f64(s).ok()).filter(|d| !d.is_zero())
}

impl Plan {
    /// A plan whose stages are balanced by FLOPs.
    pub fn new(model: &ModelInfo, dp: usize, pp: usize, microbatches: usize, schedule: ScheduleKind) -> Result<Self> {
        if dp == 0 || pp == 0 || microbatches == 0 {
            return Err(Error::Invalid(format!(
                "dp, pp and microbatches must be at least 1 (got {dp}, {pp}, {microbatches})"
            )));
        }
        if pp > model.depth() {
            return Err(Error::Invalid(format!(
                "pp = {pp} stages for a model of {} layers ({}): each stage needs at least one layer",
                model.depth(),
                model.name
            )));
        }
        Ok(Plan {
            mesh: Mesh { dp, pp, tp: 1 },
            stages: balance(model, pp),
            microbatches,
            schedule,
            accumulate: 1,
            zero: 0,
            comm_timeout: DEFAULT_COMM_TIMEOUT,
        })
    }

    /// The single-device plan.
    pub fn single(model: &ModelInfo) -> Self {
        Plan::new(model, 1, 1, 1, ScheduleKind::GPipe).unwrap()
    }

    /// Replaces the stage assignment with the user's (layer counts per stage, e.g. `[1, 3]`).
    pub fn with_layers_per_stage(mut self, model: &ModelInfo, counts: &[usize]) -> Result<Self> {
        if counts.len() != self.mesh.pp || counts.contains(&0) || counts.iter().sum::<usize>() != model.depth() {
            return Err(Error::Invalid(format!(
                "layers per stage {counts:?}: need {} positive counts summing to the model's {} layers",
                self.mesh.pp,
                model.depth()
            )));
        }
        let mut start = 0;
        self.stages = counts
            .iter()
            .map(|c| {
                let r = start..start + c;
                start += c;
                r
            })
            .collect();
        Ok(self)
    }

    /// The plan as integers, to send between processes: a format tag, dp, pp, tp, microbatches,
    /// accumulation passes, the ZeRO stage, the schedule (0 GPipe, 1 1F1B), the number of stages, then each
    /// stage's end layer. The timeout is each process's own and is not encoded.
    pub fn encode(&self) -> Vec<u64> {
        let mut v = vec![
            PLAN_FORMAT,
            self.mesh.dp as u64,
            self.mesh.pp as u64,
            self.mesh.tp as u64,
            self.microbatches as u64,
            self.accumulate as u64,
            self.zero as u64,
            match self.schedule {
                ScheduleKind::GPipe => 0,
                ScheduleKind::OneFOneB => 1,
            },
            self.stages.len() as u64,
        ];
        v.extend(self.stages.iter().map(|r| r.end as u64));
        v
    }

    /// The plan [`Plan::encode`] wrote (with the default timeout), or an error saying what in
    /// `v` is not a plan: another format, a wrong length, a zero count, an unknown schedule, or
    /// stages that are not contiguous, non-empty and in order.
    pub fn decode(v: &[u64]) -> Result<Plan> {
        let bad = |why: String| Error::Parallel(format!("a plan received from another rank is not valid: {why}"));
        if v.len() < 9 || v[0] != PLAN_FORMAT {
            return Err(bad(format!("format {:?} (expected {PLAN_FORMAT}) in {} numbers", v.first(), v.len())));
        }
        let n = |x: u64| usize::try_from(x).map_err(|_| bad(format!("{x} does not fit this machine")));
        let (dp, pp, tp, microbatches, accumulate) = (n(v[1])?, n(v[2])?, n(v[3])?, n(v[4])?, n(v[5])?);
        if dp == 0 || pp == 0 || tp == 0 || microbatches == 0 || accumulate == 0 {
            return Err(bad(format!(
                "dp {dp}, pp {pp}, tp {tp}, microbatches {microbatches}, passes {accumulate}: none may be 0"
            )));
        }
        let zero = n(v[6])?;
        if zero > 1 {
            return Err(bad(format!("ZeRO stage {zero} (0 or 1)")));
        }
        let schedule = match v[7] {
            0 => ScheduleKind::GPipe,
            1 => ScheduleKind::OneFOneB,
            s => return Err(bad(format!("unknown schedule code {s}"))),
        };
        let stages = n(v[8])?;
        if stages != pp || v.len() != 9 + stages {
            return Err(bad(format!("{stages} stages for pp {pp} in {} numbers", v.len())));
        }
        let mut start = 0;
        let mut ranges = Vec::with_capacity(stages);
        for &end in &v[9..] {
            let end = n(end)?;
            if end <= start {
                return Err(bad(format!("stage ending at layer {end} after one ending at {start}")));
            }
            ranges.push(start..end);
            start = end;
        }
        Ok(Plan {
            mesh: Mesh { dp, pp, tp },
            stages: ranges,
            microbatches,
            schedule,
            accumulate,
            zero,
            comm_timeout: DEFAULT_COMM_TIMEOUT,
        })
    }

    /// Sets how long a wait on another device or rank may last.
    pub fn with_comm_timeout(mut self, timeout: std::time::Duration) -> Result<Self> {
        if timeout.is_zero() {
            return Err(Error::Invalid("the communication timeout must be positive".into()));
        }
        self.comm_timeout = timeout;
        Ok(self)
    }

    /// Sets the tensor-parallel devices per stage (every split parameter of the model must
    /// cut evenly into `tp` parts: checked against the model by [`Plan::validate`]).
    pub fn with_tp(mut self, tp: usize) -> Result<Self> {
        if tp == 0 {
            return Err(Error::Invalid("tp must be at least 1".into()));
        }
        self.mesh.tp = tp;
        Ok(self)
    }

    /// Sets the ZeRO stage: 0 (the optimizer state whole on every replica) or 1 (sharded across
    /// the dp replicas; with dp = 1 there is nothing to shard and it changes nothing).
    pub fn with_zero(mut self, stage: usize) -> Result<Self> {
        if stage > 1 {
            return Err(Error::Invalid(format!(
                "ZeRO stage {stage}: tessera has stage 0 (off) and stage 1 (optimizer state sharded across the dp replicas)"
            )));
        }
        self.zero = stage;
        Ok(self)
    }

    /// Sets the gradient-accumulation passes.
    pub fn with_accumulate(mut self, passes: usize) -> Result<Self> {
        if passes == 0 {
            return Err(Error::Invalid("gradient accumulation needs at least 1 pass".into()));
        }
        self.accumulate = passes;
        Ok(self)
    }

    /// Per stage: whether its layers sum over their tensor-parallel group inside forward and
    /// backward (with tp > 1; the collectives [`Schedule::check_tp`](schedule::Schedule::check_tp)
    /// sees).
    pub fn stage_sums(&self, model: &ModelInfo) -> Vec<bool> {
        self.stages
            .iter()
            .map(|r| {
                self.mesh.tp > 1 && model.layers[r.clone()].iter().any(|l| l.cost.tp_all_reduce_floats_per_sample > 0)
            })
            .collect()
    }

    /// Checks the plan against a model.
    pub fn validate(&self, model: &ModelInfo) -> Result<()> {
        let mut next = 0;
        for (s, r) in self.stages.iter().enumerate() {
            if r.start != next || r.is_empty() {
                return Err(Error::Invalid(format!(
                    "stage {s} holds layers {r:?}; stages must be contiguous and non-empty"
                )));
            }
            next = r.end;
        }
        model.check_tp(self.mesh.tp)?;
        if next != model.depth() || self.stages.len() != self.mesh.pp {
            return Err(Error::Invalid(format!(
                "the stages cover layers 0..{next} in {} stages; the model has {} layers and the mesh {} stages",
                self.stages.len(),
                model.depth(),
                self.mesh.pp
            )));
        }
        Ok(())
    }

    /// A one-line description, e.g. `dp=2 x pp=2, 4 microbatches, 1f1b, stages [0..2, 2..3]`.
    pub fn describe(&self) -> String {
        let acc =
            if self.accumulate > 1 { format!(", {} accumulation passes", self.accumulate) } else { String::new() };
        let acc = if self.zero > 0 { format!("{acc}, zero {}", self.zero) } else { acc };
        let tp = if self.mesh.tp > 1 { format!(" x tp={}", self.mesh.tp) } else { String::new() };
        format!(
            "dp={} x pp={}{tp}, {} microbatch{}, {}{acc}, stages {:?}",
            self.mesh.dp,
            self.mesh.pp,
            self.microbatches,
            if self.microbatches == 1 { "" } else { "es" },
            self.schedule,
            self.stages
        )
    }
}

/// Splits the model's layers into `pp` contiguous stages minimising the largest stage's FLOPs
/// (exact, by dynamic programming over the layers).
pub fn balance(model: &ModelInfo, pp: usize) -> Vec<Range<usize>> {
    let cost: Vec<f64> = model.layers.iter().map(|l| l.cost.flops_per_sample).collect();
    let n = cost.len();
    let pp = pp.clamp(1, n);
    let prefix: Vec<f64> = std::iter::once(0.0)
        .chain(cost.iter().scan(0.0, |a, c| {
            *a += c;
            Some(*a)
        }))
        .collect();
    // best[k][i]: the least max-stage cost of layers 0..i in k stages; cut[k][i]: where the last starts.
    let mut best = vec![vec![f64::INFINITY; n + 1]; pp + 1];
    let mut cut = vec![vec![0usize; n + 1]; pp + 1];
    best[0][0] = 0.0;
    for k in 1..=pp {
        for i in k..=n {
            for j in (k - 1)..i {
                let c = best[k - 1][j].max(prefix[i] - prefix[j]);
                if c < best[k][i] {
                    best[k][i] = c;
                    cut[k][i] = j;
                }
            }
        }
    }
    let mut stages = Vec::with_capacity(pp);
    let mut end = n;
    for k in (1..=pp).rev() {
        let start = cut[k][end];
        stages.push(start..end);
        end = start;
    }
    stages.reverse();
    stages
}

/// Splits `n` rows into `parts` contiguous shares as evenly as possible (the first `n % parts`
/// get one more). Every share must get a row: otherwise an error that says how many rows the
/// split needs.
pub fn split_rows(n: usize, parts: usize, what: &str) -> Result<Vec<Range<usize>>> {
    if parts == 0 {
        return Err(Error::Invalid(format!("cannot split {n} rows into 0 {what}")));
    }
    if n < parts {
        return Err(Error::Invalid(format!(
            "a batch of {n} rows cannot be split into {parts} {what}: each needs at least one row (use a batch of at least {parts})"
        )));
    }
    Ok(comm::chunks(n, parts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::MlpConfig;
    use crate::Activation;

    fn mlp(widths: Vec<usize>) -> ModelInfo {
        MlpConfig::new(widths, Activation::Relu).unwrap().info()
    }

    #[test]
    fn balance_minimises_the_largest_stage() {
        let m = mlp(vec![784, 512, 512, 10]);
        assert_eq!(balance(&m, 1), vec![0..3]);
        assert_eq!(balance(&m, 2), vec![0..1, 1..3]);
        assert_eq!(balance(&m, 3), vec![0..1, 1..2, 2..3]);
        let m = mlp(vec![8, 8, 8, 8, 8, 8, 8]);
        assert_eq!(balance(&m, 3), vec![0..2, 2..4, 4..6]);
        assert_eq!(balance(&m, 4).iter().map(|r| r.len()).max(), Some(2));
    }

    #[test]
    fn split_rows_is_even_and_refuses_empty_shares() {
        assert_eq!(split_rows(10, 4, "replicas").unwrap(), vec![0..3, 3..6, 6..8, 8..10]);
        let e = split_rows(3, 4, "replicas x microbatches").unwrap_err().to_string();
        assert!(e.contains("a batch of 3 rows cannot be split into 4 replicas x microbatches"), "{e}");
    }

    #[test]
    fn plans_check_their_stages() {
        let m = mlp(vec![4, 4, 4, 4]);
        let p = Plan::new(&m, 2, 2, 3, ScheduleKind::OneFOneB).unwrap();
        p.validate(&m).unwrap();
        assert_eq!(p.describe(), "dp=2 x pp=2, 3 microbatches, 1f1b, stages [0..1, 1..3]");
        assert!(Plan::new(&m, 1, 4, 1, ScheduleKind::GPipe)
            .unwrap_err()
            .to_string()
            .contains("each stage needs at least one layer"));
        let p = p.with_layers_per_stage(&m, &[2, 1]).unwrap();
        assert_eq!(p.stages, vec![0..2, 2..3]);
        assert!(Plan::new(&m, 1, 2, 1, ScheduleKind::GPipe).unwrap().with_layers_per_stage(&m, &[3, 1]).is_err());
    }

    #[test]
    fn plans_travel_as_integers_and_bad_ones_are_refused() {
        let m = mlp(vec![8, 7, 6, 5, 4]);
        let p = Plan::new(&m, 2, 3, 4, ScheduleKind::GPipe).unwrap().with_accumulate(2).unwrap();
        assert_eq!(Plan::decode(&p.encode()).unwrap(), p);
        let t = p.clone().with_tp(2).unwrap().with_zero(1).unwrap();
        assert_eq!(Plan::decode(&t.encode()).unwrap(), t);
        let q = Plan::new(&m, 1, 1, 1, ScheduleKind::OneFOneB).unwrap();
        assert_eq!(Plan::decode(&q.encode()).unwrap(), q);
        let good = p.encode();
        let mut cases: Vec<(Vec<u64>, &str)> = vec![
            (good[..7].to_vec(), "format"),
            (vec![1; good.len()], "format"),
            (good[..good.len() - 1].to_vec(), "stages for pp"),
        ];
        let mut zero = good.clone();
        zero[1] = 0;
        cases.push((zero, "none may be 0"));
        let mut sched = good.clone();
        sched[7] = 9;
        cases.push((sched, "unknown schedule"));
        let mut zero_stage = good.clone();
        zero_stage[6] = 2;
        cases.push((zero_stage, "ZeRO stage 2"));
        let mut order = good.clone();
        order[10] = order[9];
        cases.push((order, "after one ending"));
        for (v, says) in cases {
            let e = Plan::decode(&v).unwrap_err().to_string();
            assert!(e.contains(says), "{v:?}: {e}");
        }
    }
}
