//! `tessera plan`, and the plan of a training run: from the flags, or from the planner.

use tessera::nn::{MlpConfig, ModelInfo};
use tessera::parallel::planner::{self, human_bytes, Budget};
use tessera::parallel::schedule::Schedule;
use tessera::parallel::timeline::Timeline;
use tessera::parallel::{Plan, ScheduleKind};
use tessera::train::{LrSchedule, OptimizerConfig, TrainConfig};
use tessera::{Activation, AdamW, DeviceSpec, Devices, Error, Ops, Sgd};

use super::args::{MeshArgs, ModelName, OptName, PlanArgs, PlanMode};
use super::comm_timeout;

/// The memory one of `n` logical devices may use: the machine's (CPU) or the GPU's memory,
/// shared evenly.
pub(crate) fn device_memory<B: Ops>(devs: &[B], sharing: usize) -> u64 {
    devs[0].total_memory() / sharing.max(1) as u64
}

/// The plan for `devs` from the flags, or from the planner; returns it with a line of reasons.
/// `sharing`: how many of the devices share one piece of hardware (its memory and speed):
/// all of them in one process (logical devices), the ranks on a node under MPI for the CPU, one
/// for a GPU per rank.
pub(crate) fn make_plan<B: Ops>(
    devs: &[B],
    m: &MeshArgs,
    model: &ModelInfo,
    cfg: &TrainConfig,
    batch: usize,
    gflops: Option<f64>,
    sharing: usize,
) -> tessera::Result<(Plan, String, Option<Budget>)> {
    let n = devs.len();
    // A rate outside this range makes every estimate 0 or infinite: no plan can be told apart.
    if let Some(g) = gflops.filter(|g| !(1e-3..=1e9).contains(g)) {
        return Err(Error::Invalid(format!(
            "--gflops {g}: a device's GEMM rate in GFLOP/s, between 0.001 and 1e9 (e.g. 100)"
        )));
    }
    if batch == 0 || batch > tessera::checkpoint::MAX_BATCH {
        return Err(Error::Invalid(format!(
            "--batch {batch}: a batch holds at least 1 and at most {} samples",
            tessera::checkpoint::MAX_BATCH
        )));
    }
    let kind = m.schedule;
    let manual = m.dp.is_some()
        || m.pp.is_some()
        || m.tp.is_some()
        || m.microbatches.is_some()
        || m.plan == PlanMode::Manual
        || n == 1;
    let mut plan = if manual {
        let (pp, tp) = (m.pp.unwrap_or(1), m.tp.unwrap_or(1));
        if m.dp.is_none() && n % (pp * tp) != 0 {
            let what = if tp > 1 { format!("--pp {pp} x --tp {tp}") } else { format!("--pp {pp}") };
            return Err(Error::Invalid(format!("{what} does not divide the {n} devices opened")));
        }
        let dp = m.dp.unwrap_or(n / (pp * tp));
        if dp * pp * tp != n {
            let tps = if tp > 1 { format!(" x --tp {tp}") } else { String::new() };
            let need = dp * pp * tp;
            return Err(Error::Invalid(format!(
                "--dp {dp} x --pp {pp}{tps} needs {need} devices, but --device opened {n}: use --device cpu:{need} (or cuda:0x{need})"
            )));
        }
        let micro = m.microbatches.unwrap_or(if pp > 1 { 2 * pp } else { 1 });
        (
            Plan::new(model, dp, pp, micro, kind.unwrap_or(ScheduleKind::OneFOneB))?.with_tp(tp)?,
            "given by the flags".to_string(),
            None,
        )
    } else {
        let memory = m.memory.unwrap_or_else(|| device_memory(devs, sharing));
        let mut budget = Budget::measure(&devs[0], memory, sharing)?;
        if let Some(g) = gflops {
            budget.flops = g * 1e9;
        }
        let (p, _, why) = planner::choose(model, cfg, batch, n, &budget, kind)?;
        (p, format!("planner: {why}"), Some(budget))
    };
    if let Some(counts) = &m.layers_per_stage {
        plan.0 = plan.0.with_layers_per_stage(model, &counts.0)?;
    }
    plan.0 = plan.0.with_accumulate(m.accumulate)?.with_comm_timeout(comm_timeout()?)?;
    plan.0.validate(model)?;
    match m.zero {
        Some(1) if plan.0.mesh.dp == 1 => {
            return Err(Error::Invalid(format!(
                "--zero 1 shards the optimizer state across data-parallel replicas, but the plan has one ({}): use --dp 2 or more, or leave --zero out",
                plan.0.describe()
            )))
        }
        Some(z) => plan.0 = plan.0.with_zero(z)?,
        None => {}
    }
    if manual {
        // The planner checked its own choice; a plan given by the flags (or one device) is
        // checked here, before anything is allocated.
        let memory = m.memory.unwrap_or_else(|| device_memory(devs, sharing));
        planner::check_fits(model, cfg, batch, &plan.0, memory)?;
    }
    Ok(plan)
}

pub(crate) fn plan(a: PlanArgs) -> tessera::Result<()> {
    if let Some(p) = &a.svg {
        super::train::check_output("--svg", p)?;
    }
    let gpt_flag = a.shape.first_given().or(a.vocab.map(|_| "--vocab"));
    let model = match a.model {
        ModelName::Mlp => {
            if let Some(flag) = gpt_flag {
                return Err(Error::Invalid(format!("{flag} shapes a GPT: add --model gpt")));
            }
            MlpConfig::new(a.widths.0.clone(), Activation::Relu)?.info()
        }
        ModelName::Gpt => {
            let gpt = a.shape.config(a.vocab.unwrap_or(65));
            gpt.validate()?;
            gpt.model::<tessera::CpuDevice>()?.info()?
        }
    };
    let optimizer = match a.optimizer {
        OptName::Adamw => OptimizerConfig::AdamW(AdamW::default()),
        OptName::Sgd => OptimizerConfig::Sgd(Sgd { lr: 0.05, momentum: 0.9, weight_decay: 0.0 }),
    };
    let cfg = TrainConfig { optimizer, schedule: LrSchedule::Constant, clip_norm: None, seed: 0 };
    let spec: DeviceSpec = a.device.spec;
    let (devices, chosen) = spec.open()?;
    outln!("{chosen}");
    match devices {
        Devices::Cpu(d) => print_plan(&d, &a, &model, &cfg),
        Devices::Cuda(d) => print_plan(&d, &a, &model, &cfg),
        Devices::Sim(d) => print_plan(&d, &a, &model, &cfg),
    }
}

pub(crate) fn print_plan<B: Ops>(
    devs: &[B],
    a: &PlanArgs,
    model: &ModelInfo,
    cfg: &TrainConfig,
) -> tessera::Result<()> {
    let (plan, why, budget) = make_plan(devs, &a.mesh, model, cfg, a.batch, a.gflops, devs.len())?;
    let budget = match budget {
        Some(b) => b,
        None => {
            let memory = a.mesh.memory.unwrap_or_else(|| device_memory(devs, devs.len()));
            let mut b = Budget::measure(&devs[0], memory, devs.len())?;
            if let Some(g) = a.gflops {
                b.flops = g * 1e9;
            }
            b
        }
    };
    let est = planner::estimate(model, cfg, a.batch, &plan, &budget);
    let mesh = plan.mesh;
    outln!("model: {} ({} parameters), {}, batch {}", model.name, model.param_count(), cfg.optimizer.name(), a.batch);
    outln!("plan: {} ({why})", plan.describe());
    if mesh.tp > 1 {
        outln!(
            "mesh: {} replica(s) x {} stage(s) x {} tensor-parallel rank(s) over {} device(s) (a stage's ranks in brackets):",
            mesh.dp,
            mesh.pp,
            mesh.tp,
            mesh.devices()
        );
    } else {
        outln!("mesh: {} replica(s) x {} stage(s) over {} device(s):", mesh.dp, mesh.pp, mesh.devices());
    }
    for r in 0..mesh.dp {
        let names: Vec<String> = (0..mesh.pp)
            .map(|s| {
                let ranks: Vec<String> = (0..mesh.tp).map(|k| devs[mesh.index(r, s, k)].name()).collect();
                if mesh.tp > 1 {
                    format!("[{}]", ranks.join(" "))
                } else {
                    ranks.join("")
                }
            })
            .collect();
        outln!("  replica {r}: {}", names.join(" -> "));
    }
    outln!("stages:");
    for (s, layers) in plan.stages.iter().enumerate() {
        let params = model.stage_layout_tp(layers.clone(), mesh.tp, 0).len;
        let shapes: Vec<String> = model.layers[layers.clone()].iter().map(|l| l.kind.clone()).collect();
        let m = &est.memory[s];
        outln!(
            "  stage {s}: layers {layers:?} ({}), {params} parameters; memory {} (weights {}, gradients {}, optimizer {}, activations {})",
            shapes.join(", "),
            human_bytes(m.total()),
            human_bytes(m.weights),
            human_bytes(m.grads),
            human_bytes(m.optimizer),
            human_bytes(m.activations)
        );
    }
    let buckets: Vec<usize> = plan.stages.iter().map(|r| if mesh.dp > 1 { r.len() } else { 0 }).collect();
    let schedule = Schedule::build(plan.schedule, mesh.pp, plan.microbatches, &buckets)?;
    let stats = schedule.check_tp(mesh.tp, &plan.stage_sums(model))?;
    let ranks = if mesh.tp > 1 {
        format!(" on each of {} tensor-parallel ranks, their sums met in the same order", mesh.tp)
    } else {
        String::new()
    };
    outln!("schedule: {} (checked: sound{ranks}; activations in flight per stage {:?}), time by stage (F forward, B backward = 2 units):", plan.schedule, stats.peak_in_flight);
    out!("{}", schedule.chart());
    outln!(
        "estimate: step {:.2} ms = pipeline {:.2} ms + transfers {:.2} ms + all-reduce {:.2} ms; bubble (p-1)/(m+p-1) = {:.1}%; device budget {} at {:.1} GFLOP/s, links {:.1} GB/s",
        est.step * 1e3,
        est.pipeline * 1e3,
        est.transfer * 1e3,
        est.all_reduce * 1e3,
        100.0 * est.bubble,
        human_bytes(budget.memory),
        budget.flops / 1e9,
        budget.link / 1e9
    );
    if mesh.tp > 1 {
        let rows = a.batch.div_ceil(mesh.dp).div_ceil(plan.microbatches * plan.accumulate).max(1);
        outln!(
            "tensor-parallel sums inside the layers (every rank of a stage makes the same ones, in layer order, in each F and B of a microbatch of {rows} samples; {:.2} ms a step on the busiest stage):",
            est.tp_comm * 1e3
        );
        for (s, layers) in plan.stages.iter().enumerate() {
            let sums: Vec<String> = model.layers[layers.clone()]
                .iter()
                .enumerate()
                .filter(|(_, l)| l.cost.tp_all_reduce_floats_per_sample > 0)
                .map(|(i, l)| {
                    format!(
                        "layer {} {}",
                        layers.start + i,
                        human_bytes((4 * rows * l.cost.tp_all_reduce_floats_per_sample) as u64)
                    )
                })
                .collect();
            let list =
                if sums.is_empty() { "none (its layers are whole on every rank)".to_string() } else { sums.join(", ") };
            outln!("  stage {s}: {list}");
        }
    }
    if let Some(path) = &a.svg {
        let names: Vec<String> = (0..mesh.pp).map(|s| format!("stage {s} ({})", devs[s].name())).collect();
        let t = Timeline::from_schedule(&schedule, &vec![1.0; mesh.pp], &vec![2.0; mesh.pp], &names);
        let title = format!("planned {} for {}", plan.schedule, plan.describe());
        tessera::checkpoint::write_atomically(path, t.to_svg(&title, "units").as_bytes())?;
        outln!("wrote {}", path.display());
    }
    Ok(())
}
