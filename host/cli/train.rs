//! `tessera train`: the run's config (from the flags or a checkpoint), its data and devices, the
//! training loop with its progress, the result, the checkpoint.

use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
#[cfg(feature = "mpi")]
use tessera::backend::cuda;
use tessera::checkpoint::{Checkpoint, DataId};
use tessera::data::{batches_per_epoch, Dataset};
use tessera::nn::MlpConfig;
use tessera::parallel::comm::LocalGroup;
use tessera::parallel::engine::Engine;
use tessera::parallel::timeline::{Timeline, Traffic};
use tessera::parallel::Plan;
use tessera::train::{fit_reading, Cursor, LrSchedule, OptimizerConfig, Run, TrainConfig};
#[cfg(feature = "mpi")]
use tessera::Ops;
use tessera::{Activation, AdamW, DeviceSpec, Devices, Error, Sgd};

#[cfg(feature = "mpi")]
use super::args::AllReduceName;
use super::args::{OptName, SchedName, TrainArgs};
use super::interrupt;
use super::plan::make_plan;
use super::World;

/// The run's config from the flags, or from a checkpoint being resumed (flags that contradict
/// it are an error: the resumed run would not be the same run).
pub(crate) fn train_config(
    a: &TrainArgs,
    ckpt: Option<&Checkpoint>,
) -> tessera::Result<(MlpConfig, TrainConfig, usize)> {
    let widths = a.widths.as_ref().map(|w| w.0.clone());
    let act = a.activation;
    if let Some(c) = ckpt {
        let path = a.resume.as_ref().unwrap().display().to_string();
        if tessera::nn::GptConfig::from_description(&c.model).is_some() {
            return Err(Error::Checkpoint {
                path,
                reason: format!("it holds the model `{}`: resume it with --model gpt", c.model),
            });
        }
        let mlp = MlpConfig::from_description(&c.model).ok_or_else(|| Error::Checkpoint {
            path: path.clone(),
            reason: format!(
                "it holds the model `{}`, which `tessera train` cannot build (it trains MLPs); load it with the \
                 library, into the model that wrote it",
                c.model
            ),
        })?;
        let mut conflicts = Vec::new();
        if widths.as_ref().is_some_and(|w| *w != mlp.widths) {
            conflicts.push(format!("--widths (checkpoint: {})", mlp.widths_string()));
        }
        if act.is_some_and(|x| x != mlp.act) {
            conflicts.push(format!("--activation (checkpoint: {})", mlp.act));
        }
        conflicts.extend(run_conflicts(a, c));
        refuse_conflicts(a, conflicts)?;
        return Ok((mlp, c.config.clone(), c.batch));
    }
    let model = MlpConfig::new(widths.unwrap_or_else(|| vec![784, 512, 512, 10]), act.unwrap_or(Activation::Relu))?;
    let cosine = a.lr_schedule == Some(SchedName::Cosine);
    if a.warmup.is_some() && !cosine {
        return Err(Error::Invalid(
            "--warmup is the warm-up of --lr-schedule cosine: add that, or leave --warmup out".into(),
        ));
    }
    let optimizer =
        optimizer_from_flags(a, OptDefaults { adamw_lr: 1e-3, adamw_decay: 0.01, beta2: None, sgd_lr: 0.05 })?;
    let schedule = match a.lr_schedule.unwrap_or(SchedName::Constant) {
        SchedName::Constant => LrSchedule::Constant,
        // The total is filled in once the data (and so the steps per epoch) is known.
        SchedName::Cosine => LrSchedule::Cosine { warmup: a.warmup.unwrap_or(0), total: 0, min_factor: 0.0 },
    };
    let batch = batch_from_flags(a, 128)?;
    Ok((model, TrainConfig { optimizer, schedule, clip_norm: a.clip, seed: a.seed.unwrap_or(0) }, batch))
}

/// The flags that contradict the run a checkpoint continues (batch, seed, optimizer and its
/// settings, schedule, clipping), each named with the checkpoint's value.
pub(crate) fn run_conflicts(a: &TrainArgs, c: &Checkpoint) -> Vec<String> {
    let mut conflicts = Vec::new();
    let cc = &c.config;
    if a.batch.is_some_and(|b| b != c.batch) {
        conflicts.push(format!("--batch (checkpoint: {})", c.batch));
    }
    if a.seed.is_some_and(|s| s != cc.seed) {
        conflicts.push(format!("--seed (checkpoint: {})", cc.seed));
    }
    if a.optimizer.is_some_and(|o| (o == OptName::Sgd) != matches!(cc.optimizer, OptimizerConfig::Sgd(_))) {
        conflicts.push(format!("--optimizer (checkpoint: {})", cc.optimizer.name()));
    }
    if a.lr.is_some_and(|lr| lr != cc.optimizer.lr()) {
        conflicts.push(format!("--lr (checkpoint: {})", cc.optimizer.lr()));
    }
    let (wd, momentum) = match &cc.optimizer {
        OptimizerConfig::AdamW(o) => (o.weight_decay, None),
        OptimizerConfig::Sgd(o) => (o.weight_decay, Some(o.momentum)),
    };
    if a.weight_decay.is_some_and(|w| w != wd) {
        conflicts.push(format!("--weight-decay (checkpoint: {wd})"));
    }
    if a.momentum.is_some_and(|m| Some(m) != momentum) {
        conflicts.push(match momentum {
            Some(m) => format!("--momentum (checkpoint: {m})"),
            None => "--momentum (the checkpoint's optimizer is adamw, which has none)".to_string(),
        });
    }
    let cosine = matches!(cc.schedule, LrSchedule::Cosine { .. });
    if a.lr_schedule.is_some_and(|s| (s == SchedName::Cosine) != cosine) {
        conflicts.push(format!("--lr-schedule (checkpoint: {})", cc.schedule));
    }
    if let Some(w) = a.warmup {
        if !matches!(cc.schedule, LrSchedule::Cosine { warmup, .. } if warmup == w) {
            conflicts.push(format!("--warmup (checkpoint: {})", cc.schedule));
        }
    }
    if a.clip != cc.clip_norm && a.clip.is_some() {
        let was = cc.clip_norm.map_or("no clipping".to_string(), |c| c.to_string());
        conflicts.push(format!("--clip (checkpoint: {was})"));
    }
    conflicts
}

/// An error naming `conflicts`, the flags that contradict the checkpoint being resumed.
pub(crate) fn refuse_conflicts(a: &TrainArgs, conflicts: Vec<String>) -> tessera::Result<()> {
    if conflicts.is_empty() {
        return Ok(());
    }
    Err(Error::Checkpoint {
        path: a.resume.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        reason: format!(
            "it was saved by a run with other settings: {}. Leave these flags out to continue that run",
            conflicts.join(", ")
        ),
    })
}

/// A model's defaults for the optimizer flags.
pub(crate) struct OptDefaults {
    pub(crate) adamw_lr: f32,
    pub(crate) adamw_decay: f32,
    /// AdamW's beta2 (`None`: AdamW's default).
    pub(crate) beta2: Option<f32>,
    pub(crate) sgd_lr: f32,
}

/// The optimizer the flags name (`--optimizer`, `--lr`, `--weight-decay`, `--momentum`), with a
/// model's defaults where they are silent, checked before anything is loaded or printed.
pub(crate) fn optimizer_from_flags(a: &TrainArgs, d: OptDefaults) -> tessera::Result<OptimizerConfig> {
    let opt = a.optimizer.unwrap_or(OptName::Adamw);
    if opt == OptName::Adamw && a.momentum.is_some() {
        return Err(Error::Invalid(
            "--momentum is for --optimizer sgd (AdamW's moments are fixed by its betas)".into(),
        ));
    }
    let optimizer = match opt {
        OptName::Adamw => {
            let base = AdamW::default();
            OptimizerConfig::AdamW(AdamW {
                lr: a.lr.unwrap_or(d.adamw_lr),
                weight_decay: a.weight_decay.unwrap_or(d.adamw_decay),
                beta2: d.beta2.unwrap_or(base.beta2),
                ..base
            })
        }
        OptName::Sgd => OptimizerConfig::Sgd(Sgd {
            lr: a.lr.unwrap_or(d.sgd_lr),
            momentum: a.momentum.unwrap_or(0.9),
            weight_decay: a.weight_decay.unwrap_or(0.0),
        }),
    };
    match &optimizer {
        OptimizerConfig::AdamW(o) => o.validate()?,
        OptimizerConfig::Sgd(o) => o.validate()?,
    }
    Ok(optimizer)
}

/// `--batch`, or the model's default, within 1 and the largest batch a checkpoint records.
pub(crate) fn batch_from_flags(a: &TrainArgs, default: usize) -> tessera::Result<usize> {
    let batch = a.batch.unwrap_or(default);
    if batch == 0 || batch > tessera::checkpoint::MAX_BATCH {
        return Err(Error::Invalid(format!(
            "--batch {batch}: a batch holds at least 1 and at most {} samples",
            tessera::checkpoint::MAX_BATCH
        )));
    }
    Ok(batch)
}

pub(crate) fn train(a: TrainArgs, world: World) -> tessera::Result<()> {
    if a.model == super::args::ModelName::Gpt {
        return super::gpt::train_gpt(&a, world);
    }
    for (flag, given) in [
        (a.shape.first_given().unwrap_or_default(), a.shape.first_given().is_some()),
        ("--eval-every", a.eval_every.is_some()),
        ("--val-windows", a.val_windows.is_some()),
    ] {
        if given {
            return Err(Error::Invalid(format!("{flag} is a GPT's flag: add --model gpt, or leave {flag} out")));
        }
    }
    let ckpt = a
        .resume
        .as_deref()
        .map(|p| Checkpoint::load(p).map_err(|e| Error::Invalid(format!("--resume: {e}"))))
        .transpose()?;
    let (mlp, mut cfg, batch) = train_config(&a, ckpt.as_ref())?;
    let (train_set, test_set, data_name) = match &a.data {
        Some(dir) => {
            let (tr, te) = Dataset::mnist_dir(dir)?;
            (tr, te, dir.display().to_string())
        }
        None => {
            let (tr, te) = Dataset::mnist_10k()?;
            (tr, te, "mnist-10k (vendored)".to_string())
        }
    };
    if test_set.is_empty() {
        return Err(Error::Data {
            path: data_name.clone(),
            reason: "the test set is empty: there is nothing to measure the run on".into(),
        });
    }
    if test_set.dim != train_set.dim {
        return Err(Error::Data {
            path: data_name.clone(),
            reason: format!(
                "the test images have {} pixels, the training images {}: they are not the same kind of data",
                test_set.dim, train_set.dim
            ),
        });
    }
    if train_set.is_empty() {
        return Err(Error::Data { path: data_name.clone(), reason: "the training set is empty".into() });
    }
    let data_id = DataId::of(&data_name, &train_set, &test_set);
    if let Some(c) = &ckpt {
        // The model, the data and the place in the epoch, checked by the library.
        let per_epoch = batches_per_epoch(train_set.len(), batch) as u64;
        c.check_resume(&mlp.info(), &data_id, per_epoch).map_err(|e| {
            let hint = if c.data.crc32 != data_id.crc32 {
                " (the same data: the same --data, or none for the vendored digits)"
            } else {
                ""
            };
            let m = match e {
                Error::Invalid(m) => m,
                e => e.to_string(),
            };
            Error::Checkpoint { path: a.resume.as_ref().unwrap().display().to_string(), reason: format!("{m}{hint}") }
        })?;
    }
    if train_set.dim != mlp.inputs() || train_set.classes > mlp.outputs() {
        return Err(Error::Invalid(format!(
            "the data has {} features and {} classes; the widths {} take {} inputs and give {} outputs (use --widths {},...,{})",
            train_set.dim,
            train_set.classes,
            mlp.widths_string(),
            mlp.inputs(),
            mlp.outputs(),
            train_set.dim,
            train_set.classes
        )));
    }
    if let Some(&top) = test_set.y.iter().max().filter(|&&l| l as usize >= mlp.outputs()) {
        return Err(Error::Data {
            path: data_name.clone(),
            reason: format!(
                "the test set has label {top}, but the model ({}) gives {} outputs (labels 0..{}): use --widths \
                 ...,{} or other data",
                mlp.widths_string(),
                mlp.outputs(),
                mlp.outputs() - 1,
                top + 1
            ),
        });
    }
    let per_epoch = batches_per_epoch(train_set.len(), batch) as u64;
    let epochs = a.epochs.unwrap_or(15);
    let mut total_steps = match a.steps {
        Some(s) => s,
        None => epochs.checked_mul(per_epoch).ok_or_else(|| {
            Error::Invalid(format!(
                "--epochs {epochs} is {epochs} x {per_epoch} steps, more than the step counter holds (2^64 - 1): ask \
                 for fewer"
            ))
        })?,
    };
    if let Some(c) = &ckpt {
        let path = a.resume.as_ref().unwrap().display().to_string();
        // A cosine schedule fixed the run's length when it started: the resumed run ends there.
        if let LrSchedule::Cosine { total, .. } = c.config.schedule {
            if let Some(e) = a.epochs.filter(|e| a.steps.is_none() && e.checked_mul(per_epoch) != Some(total)) {
                return Err(Error::Checkpoint {
                    path,
                    reason: format!(
                        "--epochs {e} ({} steps): its run's cosine schedule ends at step {total}, so the resumed \
                         run does too. Leave --epochs out (or start a new run for another length)",
                        e.saturating_mul(per_epoch)
                    ),
                });
            }
            match a.steps {
                Some(s) if s != total => {
                    return Err(Error::Checkpoint {
                        path,
                        reason: format!(
                            "--steps {s}: its run's cosine schedule ends at step {total}, so the resumed run \
                             does too. Leave --steps out (or start a new run for another length)"
                        ),
                    })
                }
                _ => total_steps = total,
            }
        }
        if total_steps < c.step {
            return Err(Error::Checkpoint {
                path,
                reason: format!(
                    "it is at step {}, past the {total_steps} steps asked for (--steps and --epochs count the \
                     whole run, the steps before --resume included): ask for more",
                    c.step
                ),
            });
        }
    }
    if let LrSchedule::Cosine { total, warmup, .. } = &mut cfg.schedule {
        if *total == 0 {
            *total = total_steps;
        }
        if *warmup > *total {
            return Err(Error::Invalid(format!(
                "--warmup {warmup} is longer than the run ({total} steps): the learning rate would never reach its \
                 peak. Give fewer warm-up steps, or more --steps / --epochs"
            )));
        }
    }
    let spec: DeviceSpec = a.device.spec;
    #[cfg(feature = "mpi")]
    if let Some(w) = world {
        let line = run_line(&mlp, &cfg, batch, &data_name, &train_set, &test_set);
        let job =
            Job { a: &a, mlp: &mlp, batch, total_steps, train_set: &train_set, test_set: &test_set, data: data_id };
        return train_mpi(&a, &w, spec, &job, cfg, batch, ckpt, &line);
    }
    let _ = world;
    if let Some(ar) = &a.allreduce {
        return Err(Error::Invalid(format!(
            "--allreduce {ar} is for runs across processes (mpirun -np N tessera train ...); in one process the \
             gradients are reduced by the in-process ring"
        )));
    }
    let (devices, chosen) = spec.open()?;
    interrupt::install();
    if !a.json {
        errln!("{chosen}");
        errln!("{}", run_line(&mlp, &cfg, batch, &data_name, &train_set, &test_set));
    }
    let job = Job { a: &a, mlp: &mlp, batch, total_steps, train_set: &train_set, test_set: &test_set, data: data_id };
    match devices {
        Devices::Cpu(d) => train_local(&d, &job, cfg, ckpt),
        Devices::Cuda(d) => train_local(&d, &job, cfg, ckpt),
        Devices::Sim(d) => train_local(&d, &job, cfg, ckpt),
    }
}

/// `model: MLP 784-512-512-10 (relu), ... parameters; adamw lr ...; batch ...; data: ...`.
pub(crate) fn run_line(
    mlp: &MlpConfig,
    cfg: &TrainConfig,
    batch: usize,
    data_name: &str,
    train_set: &Dataset,
    test_set: &Dataset,
) -> String {
    format!(
        "model: {}, {} parameters; {} lr {} ({}); batch {batch}; data: {data_name} ({} train, {} test)",
        mlp.describe(),
        mlp.param_count(),
        cfg.optimizer.name(),
        cfg.optimizer.lr(),
        cfg.schedule,
        train_set.len(),
        test_set.len()
    )
}

/// What the command line needs of a run beyond the library's [`Run`]: the plan and the timeline
/// of the parallel engines.
pub(crate) trait Pipelined: Run {
    fn plan(&self) -> &Plan;
    fn timeline(&self) -> Option<&Timeline>;
}

impl<B: LocalGroup> Pipelined for Engine<B> {
    fn plan(&self) -> &Plan {
        Engine::plan(self)
    }
    fn timeline(&self) -> Option<&Timeline> {
        Engine::timeline(self)
    }
}

#[cfg(feature = "mpi")]
impl<B: Ops> Pipelined for tessera::parallel::mpi::DistEngine<B> {
    fn plan(&self) -> &Plan {
        tessera::parallel::mpi::DistEngine::plan(self)
    }
    fn timeline(&self) -> Option<&Timeline> {
        tessera::parallel::mpi::DistEngine::timeline(self)
    }
}

/// What a training command runs: its flags, the model, the data and the run's length.
pub(crate) struct Job<'a> {
    pub(crate) a: &'a TrainArgs,
    pub(crate) mlp: &'a MlpConfig,
    pub(crate) batch: usize,
    pub(crate) total_steps: u64,
    pub(crate) train_set: &'a Dataset,
    pub(crate) test_set: &'a Dataset,
    pub(crate) data: DataId,
}

pub(crate) fn train_local<B: LocalGroup>(
    devs: &[B],
    job: &Job<'_>,
    cfg: TrainConfig,
    ckpt: Option<Checkpoint>,
) -> tessera::Result<()> {
    let a = job.a;
    let model = job.mlp.model::<B>();
    let (plan, why, _) = make_plan(devs, &a.mesh, &model.info()?, &cfg, job.batch, None, devs.len())?;
    if !a.json && devs.len() > 1 {
        errln!("plan: {} ({why})", plan.describe());
    }
    let (trainer, cursor) = match ckpt {
        Some(c) => (Engine::with_state(devs, &model, cfg, plan, &c.params, Some(&c.state), c.step)?, c.cursor),
        None => (Engine::new(devs, &model, cfg, plan)?, Cursor::default()),
    };
    run_training(trainer, cursor, job)
}

/// What one rank of an MPI job trains: the model it builds, and the run once its engine exists.
#[cfg(feature = "mpi")]
pub(crate) trait RankJob {
    /// The model, on any device type.
    fn model<B: Ops>(&self) -> tessera::Result<tessera::nn::Model<B>>;
    /// The run from `cursor` on, with `trainer` on this rank's `dev`.
    fn run<T: Pipelined, B: Ops>(&self, trainer: T, dev: &B, cursor: Cursor) -> tessera::Result<()>;
}

#[cfg(feature = "mpi")]
impl RankJob for Job<'_> {
    fn model<B: Ops>(&self) -> tessera::Result<tessera::nn::Model<B>> {
        Ok(self.mlp.model())
    }
    fn run<T: Pipelined, B: Ops>(&self, trainer: T, _dev: &B, cursor: Cursor) -> tessera::Result<()> {
        run_training(trainer, cursor, self)
    }
}

/// `job`'s model on the device type of `_dev`.
#[cfg(feature = "mpi")]
fn model_on<B: Ops, J: RankJob>(job: &J, _dev: &B) -> tessera::Result<tessera::nn::Model<B>> {
    job.model()
}

/// `mpirun -np N tessera train ...`: this process is one rank of the mesh, running `job` (rank 0
/// prints `run_line` first).
#[cfg(feature = "mpi")]
#[allow(clippy::too_many_arguments)]
pub(crate) fn train_mpi<J: RankJob>(
    a: &TrainArgs,
    w: &std::sync::Arc<tessera::parallel::mpi::MpiWorld>,
    spec: DeviceSpec,
    job: &J,
    cfg: TrainConfig,
    batch: usize,
    ckpt: Option<Checkpoint>,
    run_line: &str,
) -> tessera::Result<()> {
    let one = |count: usize| -> tessera::Result<()> {
        if count != 1 {
            return Err(Error::Invalid(format!(
                "--device {spec}: under MPI each rank runs one device; use --device cpu, cuda (GPU = the local rank) or sim"
            )));
        }
        Ok(())
    };
    let gpu = |ordinal: Option<usize>| -> tessera::Result<tessera::CudaDevice> {
        // `cuda` takes the GPU of the local rank (modulo the GPUs this process sees: a launcher
        // that gives each rank one GPU shows it as GPU 0); `cuda:K` pins GPU K.
        let visible = cuda::gpu_count().unwrap_or(0).max(1);
        let k = ordinal.unwrap_or(w.local_rank() % visible);
        tessera::CudaDevice::new(k)
    };
    let explicit_gpu = a.device.explicit;
    // A stage's tensor-parallel ranks count as one: pp x tp ranks per replica.
    let (pp, tp) = (a.mesh.pp.unwrap_or(1), a.mesh.tp.unwrap_or(1));
    let tps = if tp > 1 { format!(" x --tp {tp}") } else { String::new() };
    match a.mesh.dp {
        Some(dp) if dp * pp * tp != w.size() => {
            return Err(Error::Invalid(format!(
                "--dp {dp} x --pp {pp}{tps} needs {} ranks, but the job has {} (use mpirun -np {})",
                dp * pp * tp,
                w.size(),
                dp * pp * tp
            )))
        }
        None if w.size() % (pp * tp) != 0 => {
            return Err(Error::Invalid(format!("--pp {pp}{tps} does not divide the job's {} ranks", w.size())))
        }
        _ => {}
    }
    if w.rank() == 0 && !a.json {
        let per_rank = match spec {
            DeviceSpec::Cpu { .. } => "the CPU".to_string(),
            DeviceSpec::Sim { .. } => "a simulated GPU".to_string(),
            DeviceSpec::Cuda { ordinal, .. } if explicit_gpu => format!("GPU {ordinal}"),
            DeviceSpec::Cuda { .. } | DeviceSpec::Auto => "the GPU of its local rank (the CPU without one)".to_string(),
        };
        errln!("mpi: {} ranks; each runs on {per_rank}", w.size());
        errln!("{run_line}");
    }
    let nccl = a.allreduce.map(|r| r == AllReduceName::Nccl);
    if nccl == Some(true) && !matches!(spec, DeviceSpec::Cuda { .. } | DeviceSpec::Auto) {
        return Err(Error::Invalid("--allreduce nccl needs GPUs (--device cuda)".into()));
    }
    macro_rules! go {
        ($dev:expr, $all_reduce:expr, $sharing:expr) => {{
            let dev = $dev;
            let model = model_on(job, &dev)?;
            let devs = vec![dev.clone(); w.size()];
            let (plan, why, _) = make_plan(&devs, &a.mesh, &model.info()?, &cfg, batch, None, $sharing)?;
            if w.rank() == 0 && !a.json {
                errln!("plan: {} ({why}), one rank per device", plan.describe());
            }
            let cfg = cfg.clone();
            let (params, state, step, cursor) = match ckpt {
                Some(c) => (c.params, Some(c.state), c.step, c.cursor),
                None => (model.init(cfg.seed)?, None, 0, Cursor::default()),
            };
            let trainer = tessera::parallel::mpi::DistEngine::with_all_reduce(
                w,
                &dev,
                &model,
                cfg,
                plan,
                &params,
                state.as_deref(),
                step,
                $all_reduce,
            )?;
            tessera::parallel::mpi::install_termination_notice(w);
            job.run(trainer, &dev, cursor)
        }};
    }
    use tessera::parallel::mpi::{AllReduce, StageGroup};
    let gpu_all_reduce = |nccl: Option<bool>| -> AllReduce<tessera::CudaDevice> {
        if nccl == Some(false) {
            return AllReduce::Ring;
        }
        AllReduce::Custom {
            make: Box::new(|g: StageGroup, dev: &tessera::CudaDevice| {
                let id = if g.rank == 0 { Some(tessera::parallel::nccl::new_id()?) } else { None };
                let id = g.share_bytes(id);
                let c = tessera::parallel::nccl::NcclComm::new(dev, g.rank, g.size, &id)?;
                Ok(Box::new(c) as Box<dyn tessera::parallel::comm::Communicator<tessera::CudaDevice>>)
            }),
            force: nccl == Some(true),
        }
    };
    match spec {
        DeviceSpec::Cpu { count } => {
            one(count)?;
            go!(tessera::CpuDevice::new(0), AllReduce::Ring, w.local_size())
        }
        DeviceSpec::Sim { count } => {
            one(count)?;
            go!(tessera::SimDevice::new(0), AllReduce::Ring, w.local_size())
        }
        DeviceSpec::Cuda { ordinal, count } => {
            one(count)?;
            go!(gpu(explicit_gpu.then_some(ordinal))?, gpu_all_reduce(nccl), 1)
        }
        DeviceSpec::Auto => {
            if cuda::gpu_count().unwrap_or(0) > 0 {
                go!(gpu(None)?, gpu_all_reduce(nccl), 1)
            } else if nccl == Some(true) {
                Err(Error::Invalid("--allreduce nccl: this rank sees no GPU (--device auto chose the CPU)".into()))
            } else {
                go!(tessera::CpuDevice::new(0), AllReduce::Ring, w.local_size())
            }
        }
    }
}

pub(crate) fn run_training<T: Pipelined>(mut trainer: T, mut cursor: Cursor, job: &Job<'_>) -> tessera::Result<()> {
    let Job { a, batch, total_steps, train_set, test_set, .. } = *job;
    let data = &job.data;
    let root = trainer.is_root();
    if root {
        for (flag, path) in [("--save", &a.save), ("--timeline", &a.timeline)] {
            if let Some(p) = path {
                check_output(flag, p)?;
            }
        }
    }
    let per_epoch = batches_per_epoch(train_set.len(), batch) as u64;
    let start_step = trainer.steps_done();
    let pb = if a.json || !root {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(a.stop_at.map_or(total_steps, |s| s.min(total_steps)))
    };
    pb.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  epoch {prefix}  loss {msg}  [{elapsed_precise}<{eta_precise}]",
        )
        .unwrap(),
    );
    pb.set_position(start_step);
    let t0 = Instant::now();
    let mut samples = 0usize;
    let mut last_loss = f32::NAN;
    let mut ema = None::<f32>;
    let stop = a.stop_at.map_or(total_steps, |s| s.min(total_steps));
    let simulated = trainer.devices().iter().all(|d| d.starts_with("sim:") || d.contains(":sim:"));
    let mut counted = tessera::backend::sim::counts();
    let mut per_step: Vec<tessera::backend::sim::SimCounts> = Vec::new();
    let mut sent: Vec<Traffic> = Vec::new();
    let fitted = fit_reading(&mut trainer, train_set, batch, stop, &mut cursor, a.loss_every, |t, stats, rows| {
        if a.profile {
            let now = tessera::backend::sim::counts();
            per_step.push(now - counted);
            counted = now;
            sent.push(traffic_of(t));
        }
        samples += rows;
        pb.set_position(t.steps_done());
        if stats.loss_steps > 0 {
            last_loss = stats.loss;
            if !stats.loss.is_finite() {
                return Err(Error::Invalid(format!(
                    "the loss became {} by step {}: lower the learning rate (--lr) or clip gradients (--clip 1.0)",
                    stats.loss,
                    t.steps_done()
                )));
            }
            // Each read is the mean of loss_steps steps: weigh it as that many.
            let keep = 0.95f32.powi(stats.loss_steps as i32);
            let e = ema.map_or(stats.loss, |e| keep * e + (1.0 - keep) * stats.loss);
            ema = Some(e);
            pb.set_prefix(format!("{}", t.steps_done().div_ceil(per_epoch)));
            let rate = samples as f64 / t0.elapsed().as_secs_f64().max(1e-9);
            pb.set_message(format!("{e:.4}  {rate:.0} samples/s"));
        }
        // A signal stops the run here, at a step boundary: the cursor and the step agree.
        if let Some((signal, _)) = interrupt::caught() {
            return Err(Error::Interrupted { signal, step: t.steps_done() });
        }
        Ok(())
    });
    let checkpoint = |trainer: &T, cursor: Cursor| -> tessera::Result<Checkpoint> {
        Ok(Checkpoint {
            model: trainer.model_info().name.clone(),
            tensors: Checkpoint::tensors_of(trainer.model_info()),
            config: trainer.train_config().clone(),
            batch,
            step: trainer.steps_done(),
            cursor,
            params: trainer.flat_params()?,
            state: trainer.flat_optimizer_state()?,
            data: data.clone(),
            vocab: None,
        })
    };
    if let Err(Error::Interrupted { signal, step }) = fitted {
        pb.finish_and_clear();
        let saved = match &a.save {
            Some(path) => {
                checkpoint(&trainer, cursor)?.save(path).map_err(|e| Error::Invalid(format!("--save: {e}")))?;
                format!("saved {} (continue the run with --resume {})", path.display(), path.display())
            }
            None => "nothing saved (give --save FILE to keep a run's progress)".to_string(),
        };
        errln!("interrupted by {signal} at step {step} of {total_steps}: {saved}");
        return Err(Error::Interrupted { signal, step });
    }
    fitted?;
    let train_time = t0.elapsed().as_secs_f64();
    pb.finish_and_clear();
    let eval = trainer.evaluate_on(test_set, 1000)?;
    let wall = t0.elapsed().as_secs_f64();
    if let Some(path) = a.timeline.as_ref().filter(|_| root) {
        write_timeline(&trainer, path, a.json)?;
    }
    // Every rank takes part in gathering the parameters; rank 0 writes them, after the result.
    let gathered = match &a.save {
        Some(_) => Some(checkpoint(&trainer, cursor)?),
        None => None,
    };
    if !root {
        return Ok(());
    }
    let profile = if a.profile { profile_report(simulated, &per_step, &sent, start_step, a.json) } else { None };
    if !eval.loss.is_finite() {
        errln!(
            "warning: the test loss is {}: the run diverged (the training loss was {last_loss:e}); lower the learning \
             rate (--lr) or clip gradients (--clip 1.0)",
            eval.loss
        );
    }
    let steps_run = trainer.steps_done() - start_step;
    let rate = samples as f64 / train_time.max(1e-9);
    if a.json {
        let j = serde_json::json!({
            "device": trainer.devices().join(","),
            "plan": trainer.plan().describe(),
            "model": trainer.model_info().name,
            "widths": job.mlp.widths,
            "activation": job.mlp.act.to_string(),
            "optimizer": trainer.train_config().optimizer.name(),
            "batch": batch,
            "steps": trainer.steps_done(),
            "steps_this_run": steps_run,
            "epochs": trainer.steps_done() as f64 / per_epoch as f64,
            "final_train_loss": last_loss,
            "test_loss": eval.loss,
            "test_accuracy": eval.accuracy(),
            "test_correct": eval.correct,
            "test_total": eval.total,
            "samples_per_second": rate,
            "train_seconds": train_time,
            "wall_seconds": wall,
        });
        let mut j = j;
        if let Some(p) = profile {
            j["profile"] = p;
        }
        outln!("{j}");
    } else {
        outln!(
            "test accuracy {:.2}% ({}/{}), test loss {:.4}; {} steps ({:.1} epochs) on {} in {:.1} s ({:.0} samples/s), wall {:.1} s",
            100.0 * eval.accuracy(),
            eval.correct,
            eval.total,
            eval.loss,
            steps_run,
            steps_run as f64 / per_epoch as f64,
            trainer.devices().join(","),
            train_time,
            rate,
            wall
        );
    }
    if let (Some(path), Some(c)) = (&a.save, gathered) {
        c.save(path).map_err(|e| Error::Invalid(format!("--save: {e}")))?;
        if !a.json {
            errln!("saved {} (step {})", path.display(), c.step);
        }
    }
    Ok(())
}

/// `--timeline FILE`: the last step's timeline drawn as SVG, with its idle fraction against
/// the GPipe bubble of the plan.
pub(crate) fn write_timeline<T: Pipelined>(trainer: &T, path: &std::path::Path, json: bool) -> tessera::Result<()> {
    let t = trainer.timeline().ok_or_else(|| Error::Invalid("--timeline: no step was taken".into()))?;
    let title =
        format!("step {} of {} on {}", trainer.steps_done(), trainer.plan().describe(), trainer.devices().join(", "));
    tessera::checkpoint::write_atomically(path, t.to_svg(&title, "s").as_bytes())?;
    if !json {
        errln!(
            "wrote {}: measured idle {:.1}% (the GPipe bubble for this plan would be {:.1}%)",
            path.display(),
            100.0 * t.idle_fraction(),
            100.0 * tessera::parallel::schedule::bubble_fraction(trainer.plan().mesh.pp, trainer.plan().microbatches)
        );
    }
    Ok(())
}

/// `--profile`: each step's host work on simulated devices (launches, syncs, allocations,
/// copies), printed unless `json`, and as JSON for `--json`; `None` (with a note) when the
/// devices are not simulated.
/// The bytes the devices of this process sent in the last step, by group.
pub(crate) fn traffic_of<T: Pipelined>(t: &T) -> Traffic {
    t.timeline().map_or(Traffic::default(), |tl| tl.lanes.iter().fold(Traffic::default(), |acc, l| acc.add(&l.sent)))
}

pub(crate) fn profile_report(
    simulated: bool,
    per_step: &[tessera::backend::sim::SimCounts],
    sent: &[Traffic],
    start_step: u64,
    json: bool,
) -> Option<serde_json::Value> {
    // Bytes by group, counted on any device.
    if !json {
        for (i, t) in sent.iter().enumerate() {
            errln!(
                "profile: step {}: bytes sent by this process's devices: data-parallel {:.0}, tensor-parallel {:.0}, pipeline {:.0} ({} collectives)",
                start_step + i as u64 + 1,
                t.dp,
                t.tp,
                t.pp,
                t.collectives
            );
        }
    }
    let traffic: Vec<serde_json::Value> = sent
        .iter()
        .map(
            |t| serde_json::json!({"dp_bytes": t.dp, "tp_bytes": t.tp, "pp_bytes": t.pp, "collectives": t.collectives}),
        )
        .collect();
    if !simulated {
        errln!(
            "profile: host work is counted on simulated devices, which run the GPU's code path: run with --device \
             sim (or sim:N)"
        );
        return (!traffic.is_empty()).then_some(serde_json::Value::Array(traffic));
    }
    if !json {
        for (i, c) in per_step.iter().enumerate() {
            errln!(
                "profile: step {}: {} launches, {} host syncs, {} allocations, {} host->device, {} device->host, {} \
                 device->device copies",
                start_step + i as u64 + 1,
                c.launches,
                c.host_syncs,
                c.allocations,
                c.host_to_device,
                c.device_to_host,
                c.device_to_device
            );
        }
    }
    Some(
        per_step
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut j = serde_json::json!({
                    "launches": c.launches,
                    "host_syncs": c.host_syncs,
                    "allocations": c.allocations,
                    "host_to_device": c.host_to_device,
                    "device_to_host": c.device_to_host,
                    "device_to_device": c.device_to_device,
                });
                if let (Some(t), Some(o)) = (traffic.get(i), j.as_object_mut()) {
                    o.extend(t.as_object().cloned().unwrap_or_default());
                }
                j
            })
            .collect(),
    )
}

/// Checks before training that an output file of `flag` can be written where it is asked for
/// (its directory exists and takes a file), so that a run does not fail at its end for a typo.
pub(crate) fn check_output(flag: &str, path: &std::path::Path) -> tessera::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    if !dir.is_dir() {
        return Err(Error::Invalid(format!(
            "{flag} {}: the directory {} does not exist (create it first, or give another path)",
            path.display(),
            dir.display()
        )));
    }
    // Following a symbolic link: the file it names is what would be replaced.
    if let Ok(meta) = std::fs::metadata(path) {
        if !meta.is_file() {
            return Err(Error::Invalid(format!(
                "{flag} {}: that is {}, not a regular file; give the path of a file to write",
                path.display(),
                tessera::checkpoint::file_kind(&meta)
            )));
        }
    }
    // Writable: a probe file made and removed there.
    let probe = dir.join(format!(".tessera-write-probe-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .map_err(|e| Error::Invalid(format!("{flag} {}: cannot write in {}: {e}", path.display(), dir.display())))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}
