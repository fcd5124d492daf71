//! The `tessera` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use tessera::backend::cuda;
use tessera::checkpoint::Checkpoint;
use tessera::data::{batches_per_epoch, Dataset};
use tessera::kernels::{KERNELS, MANIFEST};
use tessera::nn::{Mlp, MlpConfig};
use tessera::train::{Cursor, LrSchedule, OptimizerConfig, TrainConfig, Trainer};
use tessera::{Activation, AdamW, DeviceSpec, Devices, Error, Ops, Sgd};

/// tessera: hand-written CUDA kernels and a host library for training on CPU and GPU devices.
#[derive(Parser)]
#[command(name = "tessera", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// What is there: the CPU and its features, GPUs with name, memory, compute capability and
    /// driver version, and whether this build's kernels can run on them.
    Devices,
    /// Every kernel with its ptxas report (registers, shared memory, spills) and the build's
    /// compatibility manifest.
    Kernels {
        /// Also print nvcc's whole `ptxas -v` output.
        #[arg(long)]
        verbose: bool,
    },
    /// Train an MLP classifier (by default 784-512-512-10 on the 10,000 vendored MNIST digits:
    /// 8,000 to train, 2,000 to test) and report the test accuracy.
    Train(TrainArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum OptName {
    Adamw,
    Sgd,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
enum SchedName {
    Constant,
    Cosine,
}

#[derive(clap::Args, Debug)]
struct TrainArgs {
    /// Device: auto, cpu, cuda, cuda:K.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Layer widths from inputs to classes [default: 784,512,512,10].
    #[arg(long)]
    widths: Option<String>,
    /// Activation between layers: relu, gelu, gelu-erf, silu [default: relu].
    #[arg(long)]
    activation: Option<String>,
    /// Samples per step [default: 128].
    #[arg(long)]
    batch: Option<usize>,
    /// Passes over the training set (ignored when --steps is given).
    #[arg(long, default_value_t = 15)]
    epochs: u64,
    /// Total optimizer steps (overrides --epochs; counts steps done before a --resume).
    #[arg(long)]
    steps: Option<u64>,
    /// Stop after this many steps in all (to resume later with --resume): the run, its
    /// schedule included, is still the one of --steps / --epochs.
    #[arg(long)]
    stop_at: Option<u64>,
    /// Learning rate [default: 1e-3 for adamw, 0.05 for sgd].
    #[arg(long)]
    lr: Option<f32>,
    /// Optimizer [default: adamw].
    #[arg(long, value_enum)]
    optimizer: Option<OptName>,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    momentum: f32,
    /// Weight decay [default: 0.01 for adamw (decoupled), 0 for sgd].
    #[arg(long)]
    weight_decay: Option<f32>,
    /// Learning-rate schedule [default: constant].
    #[arg(long, value_enum)]
    schedule: Option<SchedName>,
    /// Warm-up steps of the cosine schedule.
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// Clip the global gradient norm to this value.
    #[arg(long)]
    clip: Option<f32>,
    /// Seed of the initialisation and the data order [default: 0].
    #[arg(long)]
    seed: Option<u64>,
    /// A directory with full MNIST (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz],
    /// t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]) instead of the vendored 10k.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Write a checkpoint (safetensors) here at the end.
    #[arg(long)]
    save: Option<PathBuf>,
    /// Continue the run saved in this checkpoint.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Print a machine-readable summary (JSON) instead of the progress bar and text.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Devices => devices(),
        Cmd::Kernels { verbose } => kernels(verbose),
        Cmd::Train(args) => train(args),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

fn cpu_features() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut f = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("sse4.2") {
            f.push("sse4.2");
        }
        if is_x86_feature_detected!("avx") {
            f.push("avx");
        }
        if is_x86_feature_detected!("avx2") {
            f.push("avx2");
        }
        if is_x86_feature_detected!("fma") {
            f.push("fma");
        }
        if is_x86_feature_detected!("avx512f") {
            f.push("avx512f");
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            f.push("neon");
        }
    }
    f
}

fn manifest_line() -> String {
    if MANIFEST.built {
        format!("built by CUDA {} (PTX ISA {}) for {}", MANIFEST.toolkit, MANIFEST.ptx_isa, MANIFEST.archs.join(", "))
    } else {
        "NOT BUILT: nvcc was not found when tessera was compiled. Run scripts/setup.sh (installs the pinned \
         CUDA compiler into .toolchain/cuda), then rebuild; or set NVCC=/path/to/nvcc"
            .to_string()
    }
}

fn devices() -> tessera::Result<()> {
    let threads = rayon::current_num_threads();
    println!("CPU: {} ({} threads)", cpu_model(), threads);
    println!("  features: {}", cpu_features().join(" "));
    println!("  devices: cpu, cpu:N (N logical devices sharing these cores)");
    println!("CUDA kernels: {}", manifest_line());
    if !cuda::driver_present() {
        println!("CUDA driver: not found (libcuda.so.1 could not be loaded); no GPU can be used");
        return Ok(());
    }
    let v = cuda::driver_version()?;
    println!("CUDA driver: {} (CUDA {}.{})", v, v / 1000, (v % 1000) / 10);
    let n = cuda::gpu_count()?;
    if n == 0 {
        println!("GPUs: none visible to the driver");
    }
    for i in 0..n {
        let g = cuda::describe(i)?;
        println!(
            "GPU {i}: {}, {:.1} GiB, compute capability {}.{}, {} SMs; kernels: {}",
            g.name,
            g.total_mem as f64 / (1u64 << 30) as f64,
            g.compute_capability.0,
            g.compute_capability.1,
            g.sms,
            match &g.runs_kernels {
                Ok(how) => format!("run ({how})"),
                Err(why) => format!("cannot run: {why}"),
            }
        );
    }
    Ok(())
}

fn kernels(verbose: bool) -> tessera::Result<()> {
    println!("manifest: {}", manifest_line());
    if let Some(d) = MANIFEST.min_driver() {
        println!("needs: a driver for CUDA {}.{} or newer", d / 1000, (d % 1000) / 10);
    }
    let sass: Vec<&str> = MANIFEST.archs.iter().copied().filter(|a| a.starts_with("sm_")).collect();
    print!("{:<16} {:<14} {:<18}", "kernel", "file", "hash");
    for a in &sass {
        print!(" {:>22}", format!("{a} regs/smem/spill"));
    }
    println!();
    for k in KERNELS {
        let hash = k.hash.map(|h| format!("{h:016x}")).unwrap_or_else(|| "-".into());
        print!("{:<16} {:<14} {:<18}", k.name, k.file, hash);
        for a in &sass {
            let cell = match k.ptxas.iter().find(|p| p.arch == *a) {
                Some(p) => format!("{}/{}/{}", p.registers, p.smem_bytes, p.spill_stores + p.spill_loads),
                None => "-".into(),
            };
            print!(" {cell:>22}");
        }
        println!();
    }
    println!("{} kernels", KERNELS.len());
    if verbose {
        println!("\n{}", tessera::kernels::ptxas_report());
    }
    Ok(())
}

/// The run's config from the flags, or from a checkpoint being resumed (flags that contradict
/// it are an error: the resumed run would not be the same run).
fn train_config(a: &TrainArgs, ckpt: Option<&Checkpoint>) -> tessera::Result<(TrainConfig, usize)> {
    let widths = a.widths.as_deref().map(MlpConfig::parse_widths).transpose()?;
    let act = a.activation.as_deref().map(|s| s.parse::<Activation>()).transpose()?;
    if let Some(c) = ckpt {
        let mut conflicts = Vec::new();
        let cc = &c.config;
        if widths.as_ref().is_some_and(|w| *w != cc.model.widths) {
            conflicts.push(format!("--widths (checkpoint: {})", cc.model.widths_string()));
        }
        if act.is_some_and(|x| x != cc.model.act) {
            conflicts.push(format!("--activation (checkpoint: {})", cc.model.act));
        }
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
        if !conflicts.is_empty() {
            return Err(Error::Checkpoint {
                path: a.resume.as_ref().unwrap().display().to_string(),
                reason: format!(
                    "it was saved by a run with other settings: {}. Leave these flags out to continue that run",
                    conflicts.join(", ")
                ),
            });
        }
        return Ok((cc.clone(), c.batch));
    }
    let model = MlpConfig::new(widths.unwrap_or_else(|| vec![784, 512, 512, 10]), act.unwrap_or(Activation::Relu))?;
    let optimizer = match a.optimizer.unwrap_or(OptName::Adamw) {
        OptName::Adamw => OptimizerConfig::AdamW(AdamW {
            lr: a.lr.unwrap_or(1e-3),
            weight_decay: a.weight_decay.unwrap_or(0.01),
            ..AdamW::default()
        }),
        OptName::Sgd => OptimizerConfig::Sgd(Sgd {
            lr: a.lr.unwrap_or(0.05),
            momentum: a.momentum,
            weight_decay: a.weight_decay.unwrap_or(0.0),
        }),
    };
    let schedule = match a.schedule.unwrap_or(SchedName::Constant) {
        SchedName::Constant => LrSchedule::Constant,
        // The total is filled in once the data (and so the steps per epoch) is known.
        SchedName::Cosine => LrSchedule::Cosine { warmup: a.warmup, total: 0, min_factor: 0.0 },
    };
    let batch = a.batch.unwrap_or(128);
    if batch == 0 {
        return Err(Error::Invalid("--batch must be at least 1".into()));
    }
    Ok((TrainConfig { model, optimizer, schedule, clip_norm: a.clip, seed: a.seed.unwrap_or(0) }, batch))
}

fn train(a: TrainArgs) -> tessera::Result<()> {
    let ckpt = a.resume.as_deref().map(Checkpoint::load).transpose()?;
    let (mut cfg, batch) = train_config(&a, ckpt.as_ref())?;
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
    if train_set.dim != cfg.model.inputs() || train_set.classes > cfg.model.outputs() {
        return Err(Error::Invalid(format!(
            "the data has {} features and {} classes; the widths {} take {} inputs and give {} outputs (use --widths {},...,{})",
            train_set.dim,
            train_set.classes,
            cfg.model.widths_string(),
            cfg.model.inputs(),
            cfg.model.outputs(),
            train_set.dim,
            train_set.classes
        )));
    }
    let per_epoch = batches_per_epoch(train_set.len(), batch) as u64;
    let total_steps = a.steps.unwrap_or(a.epochs * per_epoch);
    if let LrSchedule::Cosine { total, .. } = &mut cfg.schedule {
        if *total == 0 {
            *total = total_steps;
        }
    }
    let spec: DeviceSpec = a.device.parse()?;
    let (devices, chosen) = spec.open()?;
    if devices.len() > 1 {
        return Err(Error::Invalid(format!(
            "--device {spec} opens {} devices; `tessera train` runs on one device (cpu, cuda or cuda:K)",
            devices.len()
        )));
    }
    if !a.json {
        eprintln!("{chosen}");
        eprintln!(
            "model: MLP {} ({}), {} parameters; {} lr {} ({}); batch {batch}; data: {data_name} ({} train, {} test)",
            cfg.model.widths_string(),
            cfg.model.act,
            cfg.model.param_count(),
            cfg.optimizer.name(),
            cfg.optimizer.lr(),
            cfg.schedule,
            train_set.len(),
            test_set.len()
        );
    }
    match devices {
        Devices::Cpu(d) => run_training(&d[0], &a, cfg, batch, ckpt, total_steps, &train_set, &test_set),
        Devices::Cuda(d) => run_training(&d[0], &a, cfg, batch, ckpt, total_steps, &train_set, &test_set),
    }
}

#[allow(clippy::too_many_arguments)]
fn run_training<B: Ops>(
    dev: &B,
    a: &TrainArgs,
    cfg: TrainConfig,
    batch: usize,
    ckpt: Option<Checkpoint>,
    total_steps: u64,
    train_set: &Dataset,
    test_set: &Dataset,
) -> tessera::Result<()> {
    let (mut trainer, mut cursor) = match ckpt {
        Some(c) => {
            let model = Mlp::with_params(dev, cfg.model.clone(), &c.params)?;
            (Trainer::from_parts(dev, cfg, model, Some(&c.state), c.step)?, c.cursor)
        }
        None => (Trainer::new(dev, cfg)?, Cursor::default()),
    };
    let per_epoch = batches_per_epoch(train_set.len(), batch) as u64;
    let start_step = trainer.steps();
    let pb = if a.json {
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
    trainer.fit(train_set, batch, stop, &mut cursor, |t, stats, rows| {
        samples += rows;
        last_loss = stats.loss;
        if !stats.loss.is_finite() {
            return Err(Error::Invalid(format!(
                "the loss became {} at step {}: lower the learning rate (--lr) or clip gradients (--clip 1.0)",
                stats.loss,
                t.steps()
            )));
        }
        let e = ema.map_or(stats.loss, |e| 0.95 * e + 0.05 * stats.loss);
        ema = Some(e);
        pb.set_position(t.steps());
        pb.set_prefix(format!("{}", t.steps().div_ceil(per_epoch)));
        let rate = samples as f64 / t0.elapsed().as_secs_f64().max(1e-9);
        pb.set_message(format!("{e:.4}  {rate:.0} samples/s"));
        Ok(())
    })?;
    dev.synchronize()?;
    let train_time = t0.elapsed().as_secs_f64();
    pb.finish_and_clear();
    let eval = trainer.evaluate(test_set, 1000)?;
    let wall = t0.elapsed().as_secs_f64();
    if let Some(path) = &a.save {
        let c = Checkpoint {
            config: trainer.config().clone(),
            batch,
            step: trainer.steps(),
            cursor,
            params: trainer.model().download_params(dev)?,
            state: trainer.optimizer_state()?,
        };
        c.save(path)?;
        if !a.json {
            eprintln!("saved {} (step {})", path.display(), trainer.steps());
        }
    }
    let steps_run = trainer.steps() - start_step;
    let rate = samples as f64 / train_time.max(1e-9);
    if a.json {
        let j = serde_json::json!({
            "device": dev.name(),
            "widths": trainer.config().model.widths,
            "activation": trainer.config().model.act.to_string(),
            "optimizer": trainer.config().optimizer.name(),
            "batch": batch,
            "steps": trainer.steps(),
            "steps_this_run": steps_run,
            "epochs": trainer.steps() as f64 / per_epoch as f64,
            "final_train_loss": last_loss,
            "test_loss": eval.loss,
            "test_accuracy": eval.accuracy(),
            "test_correct": eval.correct,
            "test_total": eval.total,
            "samples_per_second": rate,
            "train_seconds": train_time,
            "wall_seconds": wall,
        });
        println!("{j}");
    } else {
        println!(
            "test accuracy {:.2}% ({}/{}), test loss {:.4}; {} steps ({:.1} epochs) on {} in {:.1} s ({:.0} samples/s), wall {:.1} s",
            100.0 * eval.accuracy(),
            eval.correct,
            eval.total,
            eval.loss,
            steps_run,
            steps_run as f64 / per_epoch as f64,
            dev.name(),
            train_time,
            rate,
            wall
        );
    }
    Ok(())
}
