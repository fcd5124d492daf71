//! The planner: from the model, the batch, the devices and their memory, it estimates memory
//! per device (weights, gradients, optimizer state, activations of the microbatches in
//! flight) and step time (compute from a measured or stated FLOP rate, transfers between
//! stages, the pipeline bubble, the all-reduce), picks dp, pp and microbatches, and says why.

use std::time::Instant;

use crate::error::{Error, Result};
use crate::nn::ModelInfo;
use crate::ops::gemm::Gemm;
use crate::ops::Ops;
use crate::parallel::schedule::{bubble_fraction, Schedule, ScheduleKind};
use crate::parallel::shard::{tied_params, Shard};
use crate::parallel::Plan;
use crate::train::TrainConfig;

/// What one device offers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    /// Memory per device, bytes.
    pub memory: u64,
    /// Sustained f32 GEMM rate of one device, FLOP/s.
    pub flops: f64,
    /// Bandwidth of a transfer between two devices, bytes/s.
    pub link: f64,
    /// Fixed cost of each forward or backward of a microbatch on a stage (launches,
    /// synchronisation, hand-offs), seconds: what keeps tiny microbatches from looking free.
    pub overhead: f64,
}

impl Budget {
    /// Measures a device's GEMM rate and copy bandwidth (a fraction of a second) and takes
    /// `memory` as its memory. Logical devices sharing one CPU or GPU share its rate: pass
    /// `sharing` = how many of them there are.
    pub fn measure<B: Ops>(dev: &B, memory: u64, sharing: usize) -> Result<Self> {
        let n = 384;
        let a = dev.upload(&vec![0.5f32; n * n])?;
        let mut c = dev.alloc::<f32>(n * n)?;
        let g = Gemm::new(n, n, n);
        let run = |c: &mut B::Buf<f32>| dev.gemm(&g, &B::view(&a), &B::view(&a), None, &mut B::view_mut(c), None);
        run(&mut c)?;
        dev.synchronize()?;
        let reps = 5;
        let t = Instant::now();
        for _ in 0..reps {
            run(&mut c)?;
        }
        dev.synchronize()?;
        let flops = g.flops() * reps as f64 / t.elapsed().as_secs_f64().max(1e-9);
        let len = 1 << 20;
        let src = dev.alloc::<f32>(len)?;
        let mut dst = dev.alloc::<f32>(len)?;
        dev.copy(&B::view(&src), &mut B::view_mut(&mut dst))?;
        dev.synchronize()?;
        let t = Instant::now();
        for _ in 0..reps {
            dev.copy(&B::view(&src), &mut B::view_mut(&mut dst))?;
        }
        dev.synchronize()?;
        let link = (len * 4 * reps) as f64 / t.elapsed().as_secs_f64().max(1e-9);
        let k = sharing.max(1) as f64;
        Ok(Budget { memory, flops: flops / k, link: link / k, overhead: 50e-6 })
    }
}

/// The estimate of one plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Estimate {
    /// The plan.
    pub plan: Plan,
    /// Bytes per device, per stage: weights, gradients, optimizer state, staging, activations.
    pub memory: Vec<MemoryUse>,
    /// Pipeline time of forward and backward, bubble included, seconds.
    pub pipeline: f64,
    /// Stage-to-stage transfers, seconds.
    pub transfer: f64,
    /// Gradient all-reduce, seconds (an upper bound: buckets overlap backward).
    pub all_reduce: f64,
    /// Tensor-parallel all-reduces inside the layers on the busiest stage, seconds (part of
    /// `pipeline`: the layers wait for them).
    pub tp_comm: f64,
    /// The step, seconds.
    pub step: f64,
    /// GPipe's bubble `(p - 1) / (m + p - 1)` for this plan.
    pub bubble: f64,
}

/// Memory of one stage's device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryUse {
    /// Weights, bytes.
    pub weights: u64,
    /// Gradients (and the all-reduce staging), bytes.
    pub grads: u64,
    /// Optimizer state, bytes.
    pub optimizer: u64,
    /// Activations of the microbatches in flight and backward scratch, bytes.
    pub activations: u64,
}

impl MemoryUse {
    /// All of it (saturating).
    pub fn total(&self) -> u64 {
        self.weights.saturating_add(self.grads).saturating_add(self.optimizer).saturating_add(self.activations)
    }
}

/// `1.5 GiB`, `320 MiB`, `12 KiB`.
pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

/// Parses `2GiB`, `512MiB`, `1.5G`, `3000000` (bytes).
pub fn parse_bytes(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let x: f64 =
        num.trim().parse().map_err(|_| Error::Invalid(format!("`{s}` is not a size: use e.g. 2GiB, 512MiB")))?;
    if x.is_sign_negative() && x != 0.0 {
        return Err(Error::Invalid(format!("`{s}` is negative: a size is 0 or more, e.g. 2GiB")));
    }
    if !x.is_finite() {
        return Err(Error::Invalid(format!("`{s}` is not a size: use e.g. 2GiB, 512MiB")));
    }
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1u64,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(Error::Invalid(format!("unknown size unit `{other}` in `{s}`: use KiB, MiB, GiB"))),
    };
    let bytes = x * mult as f64;
    if bytes >= 2f64.powi(63) {
        return Err(Error::Invalid(format!("`{s}` is more memory than any machine has (at most 8 EiB)")));
    }
    Ok(bytes as u64)
}

/// Estimates memory and step time of `plan` for `model` trained as `cfg` says at global batch
/// `batch`.
pub fn estimate(model: &ModelInfo, cfg: &TrainConfig, batch: usize, plan: &Plan, budget: &Budget) -> Estimate {
    let (dp, pp, tp) = (plan.mesh.dp, plan.mesh.pp, plan.mesh.tp);
    // A ring all-reduce sends 2 (n - 1) / n of the buffer from each rank.
    let ring = |n: usize| if n > 1 { 2.0 * (n - 1) as f64 / n as f64 } else { 0.0 };
    let mut tp_comm: f64 = 0.0;
    let mbs = plan.microbatches * plan.accumulate;
    let rows = batch.div_ceil(dp).div_ceil(mbs).max(1) as u64;
    let slots = cfg.optimizer.slots().len() as u64;
    let sched = Schedule::build(plan.schedule, pp, plan.microbatches, &vec![0; pp]).ok();
    let peak =
        sched.as_ref().and_then(|s| s.check().ok()).map(|s| s.peak_in_flight).unwrap_or(vec![plan.microbatches; pp]);
    let mut memory = Vec::with_capacity(pp);
    let mut fwd = Vec::with_capacity(pp);
    for (s, layers) in plan.stages.iter().enumerate() {
        let ls = &model.layers[layers.clone()];
        let layout = model.stage_layout_tp(layers.clone(), tp, 0);
        let params = layout.len as u64;
        // ZeRO 1: replica 0's shard (the largest: the parts of uneven buckets come first).
        let state = if plan.zero >= 1 && dp > 1 {
            Shard::new(&layout, &tied_params(model, plan, s), dp, 0).state_len as u64
        } else {
            params
        };
        // Per sample in flight: the stage's input, each layer's output and what it keeps.
        let per_row: u64 = ls[0].inputs as u64
            + ls.iter().map(|l| (l.outputs as u64).saturating_add(l.cost.saved_floats_per_sample as u64)).sum::<u64>();
        // Backward's two gradient buffers and the largest scratch, shared by the microbatches.
        let widest = ls.iter().map(|l| l.inputs.max(l.outputs) as u64).max().unwrap_or(0);
        let scratch = ls.iter().map(|l| l.cost.scratch_floats_per_sample as u64).max().unwrap_or(0);
        memory.push(MemoryUse {
            weights: 4u64.saturating_mul(params),
            grads: 4u64.saturating_mul(params).saturating_mul(if dp > 1 { 2 } else { 1 }),
            optimizer: 4u64.saturating_mul(state).saturating_mul(slots),
            // Saturating: an absurd batch or width reads as "does not fit", never an overflow.
            activations: 4u64.saturating_mul(rows).saturating_mul(
                per_row.saturating_mul(peak[s] as u64).saturating_add(widest.saturating_mul(2)).saturating_add(scratch),
            ),
        });
        // Forward is a third of forward and backward; a layer that splits its parameters
        // splits its work across the tensor-parallel ranks, and waits for its sums.
        let split = |l: &crate::nn::LayerInfo| l.params.iter().any(|&p| model.params[p].split.is_some());
        let share = |l: &crate::nn::LayerInfo| if split(l) { tp as f64 } else { 1.0 };
        let flops: f64 = ls.iter().map(|l| rows as f64 * l.cost.flops_per_sample / 3.0 / share(l)).sum();
        let sums: f64 = ls.iter().map(|l| rows as f64 * l.cost.tp_all_reduce_floats_per_sample as f64).sum();
        let sum_time = if tp > 1 { 4.0 * sums * ring(tp) / budget.link } else { 0.0 };
        tp_comm = tp_comm.max(sum_time * mbs as f64);
        fwd.push((flops / budget.flops + budget.overhead, sum_time / 2.0));
    }
    let bwd: Vec<f64> = fwd.iter().map(|(f, c)| 2.0 * (f - budget.overhead) + budget.overhead + c).collect();
    let fwd: Vec<f64> = fwd.iter().map(|(f, c)| f + c).collect();
    let pipeline = match &sched {
        Some(s) => s.simulate(&fwd, &bwd).1 * plan.accumulate as f64,
        None => f64::INFINITY,
    };
    let boundary = plan.stages.iter().skip(1).map(|r| model.layers[r.start].inputs).max().unwrap_or(0) as f64;
    let transfer = if pp > 1 { (mbs as f64) * 2.0 * rows as f64 * boundary * 4.0 / budget.link } else { 0.0 };
    let biggest = memory.iter().map(|m| m.weights).max().unwrap_or(0) as f64;
    let all_reduce = ring(dp) * biggest / budget.link;
    Estimate {
        plan: plan.clone(),
        memory,
        pipeline,
        transfer,
        all_reduce,
        tp_comm,
        step: pipeline + transfer + all_reduce,
        bubble: bubble_fraction(pp, plan.microbatches),
    }
}

/// An error unless `plan` fits in `memory` bytes per device: what its fullest device needs
/// (weights, gradients, optimizer state, activations) against what it has, and what to do.
pub fn check_fits(model: &ModelInfo, cfg: &TrainConfig, batch: usize, plan: &Plan, memory: u64) -> Result<()> {
    let budget = Budget { memory, flops: 1e12, link: 1e10, overhead: 0.0 };
    let est = estimate(model, cfg, batch, plan, &budget);
    let Some((s, m)) = est.memory.iter().enumerate().max_by_key(|(_, m)| m.total()) else { return Ok(()) };
    if m.total() <= memory {
        return Ok(());
    }
    Err(Error::Parallel(format!(
        "{} in {} at batch {batch} does not fit: {} ({}stage {s}) needs {} (weights {}, gradients {}, optimizer {}, \
         activations {}), the device has {}: use narrower --widths, a smaller --batch, more pipeline stages (--pp) \
         on more devices, or say how much memory there is with --memory",
        model.name,
        cfg.optimizer.name(),
        plan.describe(),
        if plan.mesh.pp > 1 { "its fullest device, " } else { "" },
        human_bytes(m.total()),
        human_bytes(m.weights),
        human_bytes(m.grads),
        human_bytes(m.optimizer),
        human_bytes(m.activations),
        human_bytes(memory)
    )))
}

/// Chooses dp, pp and microbatches for `devices` devices: the fastest estimated plan that fits
/// in memory. `schedule` fixes the pipeline schedule (default 1F1B, which holds fewer
/// activations). Returns the plan, its estimate and the reasons.
pub fn choose(
    model: &ModelInfo,
    cfg: &TrainConfig,
    batch: usize,
    devices: usize,
    budget: &Budget,
    schedule: Option<ScheduleKind>,
) -> Result<(Plan, Estimate, String)> {
    let kind = schedule.unwrap_or(ScheduleKind::OneFOneB);
    if batch == 0 {
        return Err(Error::Invalid("the batch must hold at least one sample (--batch 1 or more)".into()));
    }
    if devices == 0 {
        return Err(Error::Invalid("no devices to plan for".into()));
    }
    let mut candidates = Vec::new();
    // Tensor parallelism where the model's split parameters cut evenly.
    let tps: Vec<usize> = (1..=devices).filter(|t| devices % t == 0 && model.check_tp(*t).is_ok()).collect();
    for &tp in &tps {
        let rest = devices / tp;
        for pp in (1..=rest.min(model.depth())).filter(|p| rest % p == 0) {
            let dp = rest / pp;
            for m in [1usize, 2, 4, 8, 16, 32] {
                if dp * m > batch || (pp == 1 && m > 1) {
                    continue;
                }
                let plan = Plan::new(model, dp, pp, m, kind)?.with_tp(tp)?;
                candidates.push(estimate(model, cfg, batch, &plan, budget));
                // ZeRO 1 moves the same bytes as the all-reduce: a candidate wherever there are
                // replicas to shard the optimizer state across.
                if dp > 1 && !cfg.optimizer.slots().is_empty() {
                    candidates.push(estimate(model, cfg, batch, &plan.with_zero(1)?, budget));
                }
            }
        }
    }
    if candidates.is_empty() {
        // Every plan needs dp x pp = devices, dp at most the batch (a sample per replica) and pp
        // at most the layers: say which of these rules out every split.
        let max_pp = (1..=devices.min(model.depth())).filter(|p| devices % p == 0).max().unwrap_or(1);
        return Err(Error::Parallel(format!(
            "no plan splits batch {batch} over {devices} devices: every replica needs at least one sample, and the \
             {} layers of {} allow at most {max_pp} pipeline stages dividing {devices}, so at least {} replicas. Use \
             --batch {} or more, or fewer devices (e.g. --device cpu:{})",
            model.depth(),
            model.name,
            devices / max_pp,
            devices / max_pp,
            (batch * max_pp).min(devices).max(1)
        )));
    }
    let replica = estimate(model, cfg, batch, &Plan::new(model, 1, 1, 1, kind)?, budget);
    let need_one = replica.memory[0].total();
    let mut fits: Vec<&Estimate> =
        candidates.iter().filter(|e| e.memory.iter().all(|m| m.total() <= budget.memory)).collect();
    // Tensor parallelism is for what does not fit otherwise: its sums inside every layer wait
    // on the slowest rank, a cost the estimate does not see.
    if fits.iter().any(|e| e.plan.mesh.tp == 1) {
        fits.retain(|e| e.plan.mesh.tp == 1);
    }
    // Ties go to fewer stages, fewer tensor-parallel ranks, then to the whole optimizer state
    // (ZeRO's extra collectives cost latency the estimate does not see).
    let best = fits.iter().min_by(|a, b| {
        a.step
            .total_cmp(&b.step)
            .then(a.plan.mesh.pp.cmp(&b.plan.mesh.pp))
            .then(a.plan.mesh.tp.cmp(&b.plan.mesh.tp))
            .then(a.plan.zero.cmp(&b.plan.zero))
    });
    let opt = cfg.optimizer.name();
    let Some(best) = best else {
        let fullest = |e: &Estimate| e.memory.iter().map(|m| m.total()).max().unwrap_or(0);
        let least = candidates.iter().min_by_key(|e| fullest(e)).unwrap_or(&replica);
        let worst = fullest(least);
        return Err(Error::Parallel(format!(
            "{} in {opt} at batch {batch} does not fit: the leanest plan over {devices} device(s) ({}) needs {} on its fullest device, {} per device given: short by {}",
            model.name,
            least.plan.describe(),
            human_bytes(worst),
            human_bytes(budget.memory),
            human_bytes(worst - budget.memory)
        )));
    };
    let fullest = best.memory.iter().map(|m| m.total()).max().unwrap_or(0);
    let mut why = format!(
        "{} in {opt} at batch {batch} needs {} per replica ({} weights, {} gradients, {} optimizer state, {} activations); {} per device given",
        model.name,
        human_bytes(need_one),
        human_bytes(replica.memory[0].weights),
        human_bytes(replica.memory[0].grads),
        human_bytes(replica.memory[0].optimizer),
        human_bytes(replica.memory[0].activations),
        human_bytes(budget.memory)
    );
    let (dp, pp) = (best.plan.mesh.dp, best.plan.mesh.pp);
    if pp > 1 && need_one > budget.memory {
        why.push_str(&format!(": pp={pp} to fit ({} on the fullest stage)", human_bytes(fullest)));
    } else if pp > 1 {
        why.push_str(&format!(": pp={pp} is estimated fastest"));
    } else if best.plan.mesh.tp > 1 {
        why.push_str(": one stage");
    } else {
        why.push_str(": one stage fits");
    }
    let tp = best.plan.mesh.tp;
    if tp > 1 {
        let whole_candidates = candidates.iter().any(|e| e.plan.mesh.tp == 1);
        // The largest layer, whole: its weights, gradients and optimizer state.
        let per_param = 4 * (2 + cfg.optimizer.slots().len() as u64);
        let (big, bytes) = model
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| (i, per_param * l.params.iter().map(|&p| model.params[p].range.len() as u64).sum::<u64>()))
            .max_by_key(|x| x.1)
            .unwrap_or((0, 0));
        let reason = if whole_candidates {
            format!(
                "no plan of whole layers fits (layer {big}, {}, alone needs {} for its weights, gradients and optimizer state)",
                model.layers[big].kind,
                human_bytes(bytes)
            )
        } else {
            format!(
                "no plan of whole layers splits batch {batch} over {devices} devices (every replica needs a sample; a stage's tensor-parallel ranks share theirs)"
            )
        };
        why.push_str(&format!(
            "; tp={tp} splits each layer's matrices over {tp} devices: {reason}; the sums inside the layers cost {:.2} ms a step",
            best.tp_comm * 1e3
        ));
    }
    if best.plan.zero >= 1 {
        // Why the state is sharded: the same plan with it whole does not fit.
        let whole = estimate(model, cfg, batch, &Plan { zero: 0, ..best.plan.clone() }, budget);
        let full = whole.memory.iter().map(|m| m.total()).max().unwrap_or(0);
        why.push_str(&format!(
            "; zero 1 shards the optimizer state across the {dp} replicas ({} instead of {} on the fullest device)",
            human_bytes(fullest),
            human_bytes(full)
        ));
    }
    why.push_str(&format!(
        "; dp={dp}, {} microbatch(es), {}: estimated step {:.2} ms (pipeline {:.2} ms, bubble {:.0}%, transfers {:.2} ms, all-reduce {:.2} ms{})",
        best.plan.microbatches,
        best.plan.schedule,
        best.step * 1e3,
        best.pipeline * 1e3,
        100.0 * best.bubble,
        best.transfer * 1e3,
        best.all_reduce * 1e3,
        if tp > 1 { format!(", tensor-parallel sums {:.2} ms", best.tp_comm * 1e3) } else { String::new() }
    ));
    Ok((best.plan.clone(), (*best).clone(), why))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::MlpConfig;
    use crate::train::{LrSchedule, OptimizerConfig};
    use crate::{Activation, AdamW};

    fn cfg(widths: Vec<usize>) -> (ModelInfo, TrainConfig) {
        let model = MlpConfig::new(widths, Activation::Relu).unwrap().info();
        (
            model,
            TrainConfig {
                optimizer: OptimizerConfig::AdamW(AdamW::default()),
                schedule: LrSchedule::Constant,
                clip_norm: None,
                seed: 0,
            },
        )
    }

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(parse_bytes("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("512 MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1000").unwrap(), 1000);
        assert!(parse_bytes("2 parsecs").is_err());
        assert!(parse_bytes("-5GiB").unwrap_err().to_string().contains("negative"));
        assert!(parse_bytes("nan").is_err() && parse_bytes("inf GiB").is_err());
        assert!(parse_bytes("99999999999 TiB").unwrap_err().to_string().contains("more memory"));
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }

    #[test]
    fn a_model_too_big_for_one_device_is_split_and_the_reason_given() {
        // 784-8192x8-10: about 470M parameters... too many for a test; use 784-4096x4-10.
        let mut widths = vec![784];
        widths.extend([4096; 4]);
        widths.push(10);
        let (m, c) = cfg(widths);
        let budget = Budget { memory: 700 << 20, flops: 1e12, link: 1e10, overhead: 50e-6 };
        let (plan, est, why) = choose(&m, &c, 256, 2, &budget, None).unwrap();
        assert_eq!(plan.mesh.pp, 2, "{why}");
        assert!(why.contains("per replica") && why.contains("pp=2 to fit"), "{why}");
        assert!(est.memory.iter().all(|m| m.total() <= budget.memory));
        // Weights, gradients and two AdamW moments: 16 bytes a parameter.
        let p = m.param_count() as u64;
        let one = estimate(&m, &c, 256, &Plan::single(&m), &budget);
        assert_eq!(one.memory[0].weights + one.memory[0].grads + one.memory[0].optimizer, 16 * p);

        let tiny = Budget { memory: 10 << 20, ..budget };
        let e = choose(&m, &c, 256, 2, &tiny, None).unwrap_err().to_string();
        assert!(e.contains("does not fit") && e.contains("short by"), "{e}");
    }

    /// More devices than the batch can feed, a batch of 0: an error that says why, never a panic.
    #[test]
    fn impossible_splits_are_explained() {
        // Hidden widths of 511 = 7 x 73: no tensor-parallel split of 2, 4 or 1000.
        let (m, c) = cfg(vec![784, 511, 511, 10]);
        let budget = Budget { memory: 8 << 30, flops: 1e11, link: 1e10, overhead: 50e-6 };
        for (batch, devices) in [(128, 1000), (1, 4), (3, 1000)] {
            let e = choose(&m, &c, batch, devices, &budget, None).unwrap_err().to_string();
            assert!(e.contains("no plan splits batch") && e.contains("--batch"), "{e}");
        }
        // Where the widths split, the ranks of a tensor-parallel stage share their samples: one
        // sample on 4 devices.
        let (m4, c4) = cfg(vec![784, 512, 512, 10]);
        let (plan, _, why) = choose(&m4, &c4, 1, 4, &budget, None).unwrap();
        assert_eq!(plan.mesh.tp, 4, "{why}");
        assert!(why.contains("no plan of whole layers splits batch 1 over 4 devices"), "{why}");
        let e = choose(&m, &c, 0, 2, &budget, None).unwrap_err().to_string();
        assert!(e.contains("at least one sample"), "{e}");
        // One device that cannot hold the model: the bytes against the device's.
        let (bm, big) = cfg(vec![784, 100_000_000, 10]);
        let e = check_fits(&bm, &big, 128, &Plan::single(&bm), 23 << 30).unwrap_err().to_string();
        assert!(e.contains("does not fit") && e.contains("the device has 23.0 GiB"), "{e}");
        assert!(check_fits(&m, &c, 128, &Plan::single(&m), 1 << 30).is_ok());
    }

    /// A layer too big for one device: no pipeline cut helps, tensor parallelism splits it, and
    /// the planner says so; the estimate counts the split parameters and the sums.
    #[test]
    fn a_layer_too_big_for_one_device_is_split_by_tensor_parallelism() {
        let (m, c) = cfg(vec![784, 8192, 8192, 10]);
        let budget = Budget { memory: 700 << 20, flops: 1e12, link: 1e10, overhead: 50e-6 };
        let (plan, est, why) = choose(&m, &c, 64, 4, &budget, None).unwrap();
        assert!(plan.mesh.tp > 1, "{why}");
        assert!(why.contains("no plan of whole layers fits") && why.contains("layer 1"), "{why}");
        assert!(est.memory.iter().all(|x| x.total() <= budget.memory));
        assert!(est.tp_comm > 0.0);
        // Split parameters by tp; the row-parallel layer's bias and the unpaired last layer whole.
        let one = estimate(&m, &c, 64, &Plan::single(&m), &budget);
        let two = estimate(&m, &c, 64, &Plan::single(&m).with_tp(2).unwrap(), &budget);
        let whole = 8192 + 8192 * 10 + 10;
        assert_eq!(two.memory[0].weights, (one.memory[0].weights - 4 * whole) / 2 + 4 * whole);
    }

    #[test]
    fn enough_memory_means_data_parallel() {
        let (m, c) = cfg(vec![784, 512, 512, 10]);
        let budget = Budget { memory: 8 << 30, flops: 1e11, link: 1e10, overhead: 50e-6 };
        let (plan, _, why) = choose(&m, &c, 128, 4, &budget, None).unwrap();
        assert_eq!(plan.mesh.dp * plan.mesh.pp, 4, "{why}");
        assert_eq!(plan.mesh.dp, 4, "{why}");
    }
}
