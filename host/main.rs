//! The `tessera` command line.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use tessera::backend::cuda;
use tessera::backend::sim::SIM_KERNELS;
use tessera::checkpoint::{Checkpoint, DataId};
use tessera::data::{batches_per_epoch, Dataset};
use tessera::kernels::{KERNELS, MANIFEST};
use tessera::nn::MlpConfig;
use tessera::parallel::comm::LocalGroup;
use tessera::parallel::engine::Engine;
use tessera::parallel::planner::{self, human_bytes, parse_bytes, Budget};
use tessera::parallel::schedule::Schedule;
use tessera::parallel::timeline::Timeline;
use tessera::parallel::{Plan, ScheduleKind};
use tessera::train::{fit, Cursor, LrSchedule, OptimizerConfig, TrainConfig};
use tessera::{Activation, AdamW, DeviceSpec, Devices, Error, Ops, Sgd};

/// Set once stdout (or stderr) is found closed under us, e.g. by `| head -1`: printing to it then
/// stops quietly, and the run goes on (a checkpoint is still saved). Rust ignores SIGPIPE, so a
/// closed pipe is a write error here, which `println!` would turn into a panic.
static STDOUT_GONE: AtomicBool = AtomicBool::new(false);
static STDERR_GONE: AtomicBool = AtomicBool::new(false);

/// Writes to stdout or stderr; a failed write (a closed pipe) marks the stream gone.
fn emit(to_stderr: bool, args: std::fmt::Arguments<'_>, newline: bool) {
    let gone = if to_stderr { &STDERR_GONE } else { &STDOUT_GONE };
    if gone.load(Ordering::Relaxed) {
        return;
    }
    let ok = if to_stderr {
        let mut e = std::io::stderr().lock();
        e.write_fmt(args).and_then(|_| if newline { e.write_all(b"\n") } else { Ok(()) })
    } else {
        let mut o = std::io::stdout().lock();
        o.write_fmt(args).and_then(|_| if newline { o.write_all(b"\n") } else { o.flush() })
    };
    if ok.is_err() {
        gone.store(true, Ordering::Relaxed);
    }
}

/// `println!` that never panics on a closed stdout.
macro_rules! outln {
    () => { emit(false, format_args!(""), true) };
    ($($t:tt)*) => { emit(false, format_args!($($t)*), true) };
}
/// `print!` that never panics on a closed stdout.
macro_rules! out {
    ($($t:tt)*) => { emit(false, format_args!($($t)*), false) };
}
/// `eprintln!` that never panics on a closed stderr.
macro_rules! errln {
    ($($t:tt)*) => { emit(true, format_args!($($t)*), true) };
}

/// SIGINT and SIGTERM during a single-process run: the first asks the run to stop at the next
/// step boundary (and save, when `--save` was given); a second exits at once.
mod interrupt {
    use super::{AtomicI32, Ordering};

    static CAUGHT: AtomicI32 = AtomicI32::new(0);

    extern "C" fn on_signal(sig: libc::c_int) {
        if CAUGHT.swap(sig, Ordering::SeqCst) != 0 {
            // SAFETY: _exit is async-signal-safe.
            unsafe { libc::_exit(128 + sig) };
        }
        let msg: &[u8] = b"\ninterrupted: stopping after this step (a second Ctrl-C quits at once)\n";
        // SAFETY: write(2) is async-signal-safe; the buffer is a static string.
        unsafe { libc::write(2, msg.as_ptr().cast(), msg.len()) };
    }

    /// Installs the handler for SIGINT and SIGTERM.
    pub fn install() {
        let handler = on_signal as extern "C" fn(libc::c_int);
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: the handler only touches an atomic and calls async-signal-safe functions.
            unsafe { libc::signal(sig, handler as libc::sighandler_t) };
        }
    }

    /// The signal caught, if any: its name and the exit status it asks for (128 + number).
    pub fn caught() -> Option<(&'static str, u8)> {
        match CAUGHT.load(Ordering::SeqCst) {
            0 => None,
            s if s == libc::SIGINT => Some(("SIGINT", 130)),
            s if s == libc::SIGTERM => Some(("SIGTERM", 143)),
            s => Some(("a signal", (128 + s).clamp(0, 255) as u8)),
        }
    }
}

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
    /// Print the plan of a run over several devices (mesh, stages, schedule chart, memory per
    /// device, estimated step time and bubble) without training.
    Plan(PlanArgs),
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
    /// Device: auto, cpu, cpu:N, cuda, cuda:K, cuda:KxN, sim, sim:N (the kernels in the CUDA simulator).
    #[arg(long, default_value = "auto")]
    device: String,
    /// Gradient all-reduce across processes (under mpirun/srun): ring (tessera's ring over MPI
    /// messages) or nccl (GPUs; the default there). `nccl` with --dp 1 still routes the
    /// gradients through a one-rank NCCL communicator, to check NCCL on one GPU.
    #[arg(long)]
    allreduce: Option<String>,
    /// Layer widths from inputs to classes [default: 784,512,512,10].
    #[arg(long)]
    widths: Option<String>,
    /// Activation between layers: relu, gelu, gelu-erf, silu [default: relu].
    #[arg(long)]
    activation: Option<String>,
    /// Samples per step [default: 128].
    #[arg(long)]
    batch: Option<usize>,
    /// Passes over the training set [default: 15] (ignored when --steps is given).
    #[arg(long)]
    epochs: Option<u64>,
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
    /// SGD momentum [default: 0.9] (sgd only).
    #[arg(long)]
    momentum: Option<f32>,
    /// Weight decay [default: 0.01 for adamw (decoupled), 0 for sgd].
    #[arg(long)]
    weight_decay: Option<f32>,
    /// Learning-rate schedule [default: constant].
    #[arg(long, value_enum)]
    lr_schedule: Option<SchedName>,
    /// Warm-up steps of the cosine schedule [default: 0] (cosine only).
    #[arg(long)]
    warmup: Option<u64>,
    /// Clip the global gradient norm to this value (positive).
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
    /// Write an SVG of what each device did during the last step.
    #[arg(long)]
    timeline: Option<PathBuf>,
    #[command(flatten)]
    mesh: MeshArgs,
}

/// A count of at least 1 (`--dp`, `--pp`, `--microbatches`, `--accumulate`).
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{s}` is not a whole number")),
    }
}

/// How to spread a step over the devices.
#[derive(clap::Args, Debug, Clone)]
struct MeshArgs {
    /// Data-parallel replicas (default: devices / pp).
    #[arg(long, value_parser = at_least_one)]
    dp: Option<usize>,
    /// Pipeline stages per replica [default: 1].
    #[arg(long, value_parser = at_least_one)]
    pp: Option<usize>,
    /// Microbatches per replica per step [default: 1, or pp x 2 when pp > 1].
    #[arg(long, value_parser = at_least_one)]
    microbatches: Option<usize>,
    /// Pipeline schedule: gpipe or 1f1b [default: 1f1b].
    #[arg(long)]
    schedule: Option<String>,
    /// Layers per stage, e.g. 1,2 (default: balanced by FLOPs).
    #[arg(long)]
    layers_per_stage: Option<String>,
    /// Pipeline passes whose gradients accumulate before the all-reduce.
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    accumulate: usize,
    /// `auto`: with several devices and no --dp/--pp, the planner picks dp, pp and
    /// microbatches; `manual`: the flags (and their defaults) decide.
    #[arg(long, default_value = "auto")]
    plan: String,
    /// Memory per device for the planner, e.g. 2GiB [default: the device's memory, shared
    /// among logical devices].
    #[arg(long)]
    memory: Option<String>,
}

/// `tessera plan`: what a run would do, without running it.
#[derive(clap::Args, Debug)]
struct PlanArgs {
    /// Devices: cpu:N, cuda:KxN, sim:N, ...
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Layer widths from inputs to classes.
    #[arg(long, default_value = "784,512,512,10")]
    widths: String,
    /// Optimizer (its state is part of the memory).
    #[arg(long, value_enum, default_value = "adamw")]
    optimizer: OptName,
    /// Samples per step.
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Sustained GEMM rate of one device in GFLOP/s (default: measured).
    #[arg(long)]
    gflops: Option<f64>,
    /// Draw the planned schedule as an SVG.
    #[arg(long)]
    svg: Option<PathBuf>,
    #[command(flatten)]
    mesh: MeshArgs,
}

/// The MPI world when started by an MPI launcher with more than one rank.
#[cfg(feature = "mpi")]
type World = Option<std::sync::Arc<tessera::parallel::mpi::MpiWorld>>;
#[cfg(not(feature = "mpi"))]
type World = Option<NoMpi>;

/// Built without the `mpi` feature: no world.
#[cfg(not(feature = "mpi"))]
#[derive(Debug, Clone)]
struct NoMpi;

fn main() -> ExitCode {
    let cli = Cli::parse();
    #[cfg(feature = "mpi")]
    let runtime = if tessera::parallel::mpi::launched() {
        let timeout = match comm_timeout() {
            Ok(t) => t,
            Err(e) => {
                errln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        match tessera::parallel::mpi::init_with_timeout(timeout) {
            Ok(rt) => Some(rt),
            Err(e) => {
                errln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    // Under a launcher, even a one-rank job runs as a rank (e.g. `mpirun -np 1 ... --allreduce
    // nccl` checks NCCL on one GPU).
    #[cfg(feature = "mpi")]
    let world: World = runtime.as_ref().map(|rt| rt.world().clone());
    // A panic on one rank must stop the job, not leave the others waiting in MPI_Finalize.
    #[cfg(feature = "mpi")]
    if let Some(w) = world.clone() {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default(info);
            w.abort(&format!("panicked: {info}"));
        }));
    }
    #[cfg(not(feature = "mpi"))]
    let world: World = None;
    let r = match cli.cmd {
        Cmd::Devices => devices(),
        Cmd::Kernels { verbose } => kernels(verbose),
        Cmd::Train(args) => train(args, world.clone()),
        Cmd::Plan(args) => plan(args),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        // Already reported, with what was saved; the status says which signal (130, 143).
        Err(Error::Interrupted { .. }) => ExitCode::from(interrupt::caught().map_or(130, |(_, code)| code)),
        Err(e) => {
            #[cfg(feature = "mpi")]
            if let Some(w) = &world {
                // The other ranks would wait for this one: stop them all, saying why.
                w.abort(&e.to_string());
            }
            errln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `TESSERA_COMM_TIMEOUT` (seconds; default 120): how long a wait on another device or rank may
/// last. Read here, in the command line only; the library takes it as a parameter.
fn comm_timeout() -> tessera::Result<std::time::Duration> {
    match std::env::var("TESSERA_COMM_TIMEOUT") {
        Ok(v) => tessera::parallel::parse_comm_timeout(&v).ok_or_else(|| {
            Error::Invalid(format!("TESSERA_COMM_TIMEOUT={v}: expected a positive number of seconds, e.g. 120"))
        }),
        Err(_) => Ok(tessera::parallel::DEFAULT_COMM_TIMEOUT),
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
    outln!("CPU: {} ({} threads)", cpu_model(), threads);
    outln!("  features: {}", cpu_features().join(" "));
    outln!("  devices: cpu, cpu:N (N logical devices sharing these cores)");
    outln!("  simulator: sim, sim:N (the CUDA kernels run on the CPU with every access checked; slow)");
    outln!("CUDA kernels: {}", manifest_line());
    // What the driver says is reported, never an error: this command says what is there.
    if let Some(why) = cuda::driver_problem() {
        if why.contains("lacks") {
            outln!("CUDA driver: unusable: {why}; no GPU can be used");
        } else {
            outln!("CUDA driver: not found (libcuda.so.1 could not be loaded); no GPU can be used");
        }
        return Ok(());
    }
    let v = match cuda::driver_version() {
        Ok(v) => v,
        Err(e) => {
            outln!("CUDA driver: unusable: {e}");
            return Ok(());
        }
    };
    outln!("CUDA driver: {} (CUDA {}.{})", v, v / 1000, (v % 1000) / 10);
    let n = match cuda::gpu_count() {
        Ok(n) => n,
        Err(e) => {
            outln!("GPUs: none usable: {e}");
            return Ok(());
        }
    };
    if n == 0 {
        outln!("GPUs: none visible to the driver");
    }
    for i in 0..n {
        let g = match cuda::describe(i) {
            Ok(g) => g,
            Err(e) => {
                outln!("GPU {i}: cannot be queried: {e}");
                continue;
            }
        };
        outln!(
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
    outln!("manifest: {}", manifest_line());
    if let Some(d) = MANIFEST.min_driver() {
        outln!("needs: a driver for CUDA {}.{} or newer", d / 1000, (d % 1000) / 10);
    }
    let sass: Vec<&str> = MANIFEST.archs.iter().copied().filter(|a| a.starts_with("sm_")).collect();
    out!("{:<28} {:<16} {:<18} {:<4}", "kernel", "file", "hash", "sim");
    for a in &sass {
        out!(" {:>22}", format!("{a} regs/smem/spill"));
    }
    outln!();
    for k in KERNELS {
        let hash = k.hash.map(|h| format!("{h:016x}")).unwrap_or_else(|| "-".into());
        let sim = match SIM_KERNELS.iter().find(|s| s.name == k.name).and_then(|s| s.unsupported.map(|_| ())) {
            None => "yes",
            Some(()) => "NO",
        };
        out!("{:<28} {:<16} {:<18} {sim:<4}", k.name, k.file, hash);
        for a in &sass {
            let cell = match k.ptxas.iter().find(|p| p.arch == *a) {
                Some(p) => format!("{}/{}/{}", p.registers, p.smem_bytes, p.spill_stores + p.spill_loads),
                None => "-".into(),
            };
            out!(" {cell:>22}");
        }
        outln!();
    }
    outln!("{} kernels", KERNELS.len());
    // The simulator: every kernel it cannot run is listed with the reason, never skipped quietly.
    let cannot: Vec<String> =
        SIM_KERNELS.iter().filter_map(|s| s.unsupported.map(|why| format!("{} ({}: {why})", s.name, s.file))).collect();
    if cannot.is_empty() {
        outln!("simulator (--device sim): runs all {} kernels", KERNELS.len());
    } else {
        outln!("simulator (--device sim): cannot run {}: {}", cannot.len(), cannot.join(", "));
    }
    let planted: Vec<&str> = SIM_KERNELS.iter().filter(|s| s.planted).map(|s| s.name).collect();
    outln!("simulator test kernels (kernels/sim/planted.cu, simulator only): {}", planted.join(", "));
    if verbose {
        outln!("\n{}", tessera::kernels::ptxas_report());
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
    let opt = a.optimizer.unwrap_or(OptName::Adamw);
    if opt == OptName::Adamw && a.momentum.is_some() {
        return Err(Error::Invalid(
            "--momentum is for --optimizer sgd (AdamW's moments are fixed by its betas)".into(),
        ));
    }
    let cosine = a.lr_schedule == Some(SchedName::Cosine);
    if a.warmup.is_some() && !cosine {
        return Err(Error::Invalid(
            "--warmup is the warm-up of --lr-schedule cosine: add that, or leave --warmup out".into(),
        ));
    }
    let optimizer = match opt {
        OptName::Adamw => OptimizerConfig::AdamW(AdamW {
            lr: a.lr.unwrap_or(1e-3),
            weight_decay: a.weight_decay.unwrap_or(0.01),
            ..AdamW::default()
        }),
        OptName::Sgd => OptimizerConfig::Sgd(Sgd {
            lr: a.lr.unwrap_or(0.05),
            momentum: a.momentum.unwrap_or(0.9),
            weight_decay: a.weight_decay.unwrap_or(0.0),
        }),
    };
    let schedule = match a.lr_schedule.unwrap_or(SchedName::Constant) {
        SchedName::Constant => LrSchedule::Constant,
        // The total is filled in once the data (and so the steps per epoch) is known.
        SchedName::Cosine => LrSchedule::Cosine { warmup: a.warmup.unwrap_or(0), total: 0, min_factor: 0.0 },
    };
    let batch = a.batch.unwrap_or(128);
    if batch == 0 || batch > tessera::checkpoint::MAX_BATCH {
        return Err(Error::Invalid(format!(
            "--batch {batch}: a batch holds at least 1 and at most {} samples",
            tessera::checkpoint::MAX_BATCH
        )));
    }
    // The optimizer's settings are checked before anything is loaded or printed.
    match &optimizer {
        OptimizerConfig::AdamW(o) => o.validate()?,
        OptimizerConfig::Sgd(o) => o.validate()?,
    }
    Ok((TrainConfig { model, optimizer, schedule, clip_norm: a.clip, seed: a.seed.unwrap_or(0) }, batch))
}

fn train(a: TrainArgs, world: World) -> tessera::Result<()> {
    let ckpt = a
        .resume
        .as_deref()
        .map(|p| Checkpoint::load(p).map_err(|e| Error::Invalid(format!("--resume: {e}"))))
        .transpose()?;
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
        if c.data.crc32 != data_id.crc32 {
            return Err(Error::Checkpoint {
                path: a.resume.as_ref().unwrap().display().to_string(),
                reason: format!(
                    "it was trained on {}, and this run's data is {}: resume on the same data (the same --data, or \
                     none for the vendored digits), or start a new run",
                    c.data, data_id
                ),
            });
        }
    }
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
    if let Some(&top) = test_set.y.iter().max().filter(|&&l| l as usize >= cfg.model.outputs()) {
        return Err(Error::Data {
            path: data_name.clone(),
            reason: format!(
                "the test set has label {top}, but the model ({}) gives {} outputs (labels 0..{}): use --widths \
                 ...,{} or other data",
                cfg.model.widths_string(),
                cfg.model.outputs(),
                cfg.model.outputs() - 1,
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
    if let Some(c) = &ckpt {
        if c.cursor.batch > per_epoch {
            return Err(Error::Checkpoint {
                path: a.resume.as_ref().unwrap().display().to_string(),
                reason: format!(
                    "it is at batch {} of an epoch, but batch {batch} over this data gives {per_epoch} batches an epoch",
                    c.cursor.batch
                ),
            });
        }
    }
    let spec: DeviceSpec = a.device.parse()?;
    #[cfg(feature = "mpi")]
    if let Some(w) = world {
        return train_mpi(&a, &w, spec, cfg, batch, ckpt, total_steps, &train_set, &test_set, data_id);
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
        errln!("{}", run_line(&cfg, batch, &data_name, &train_set, &test_set));
    }
    match devices {
        Devices::Cpu(d) => train_local(&d, &a, cfg, batch, ckpt, total_steps, &train_set, &test_set, data_id),
        Devices::Cuda(d) => train_local(&d, &a, cfg, batch, ckpt, total_steps, &train_set, &test_set, data_id),
        Devices::Sim(d) => train_local(&d, &a, cfg, batch, ckpt, total_steps, &train_set, &test_set, data_id),
    }
}

/// `model: MLP 784-512-512-10 (relu), ... parameters; adamw lr ...; batch ...; data: ...`.
fn run_line(cfg: &TrainConfig, batch: usize, data_name: &str, train_set: &Dataset, test_set: &Dataset) -> String {
    format!(
        "model: MLP {} ({}), {} parameters; {} lr {} ({}); batch {batch}; data: {data_name} ({} train, {} test)",
        cfg.model.widths_string(),
        cfg.model.act,
        cfg.model.param_count(),
        cfg.optimizer.name(),
        cfg.optimizer.lr(),
        cfg.schedule,
        train_set.len(),
        test_set.len()
    )
}

/// What the training command needs of an engine: the in-process one or the MPI one.
trait Run: tessera::train::Steps {
    fn steps(&self) -> u64;
    fn evaluate(&mut self, data: &Dataset, batch: usize) -> tessera::Result<tessera::train::Eval>;
    fn timeline(&self) -> Option<&Timeline>;
    fn plan(&self) -> &Plan;
    fn device_names(&self) -> Vec<String>;
    fn config(&self) -> &TrainConfig;
    fn params(&self) -> tessera::Result<Vec<f32>>;
    fn optimizer_state(&self) -> tessera::Result<Vec<Vec<f32>>>;
    /// Whether this process prints and writes files (rank 0, or the only process).
    fn root(&self) -> bool;
}

/// Both engines have these methods, under the same names.
macro_rules! impl_run {
    ($ty:ty, $bound:path, |$me:ident| $root:expr) => {
        impl<B: $bound> Run for $ty {
            fn steps(&self) -> u64 {
                <$ty>::steps(self)
            }
            fn evaluate(&mut self, data: &Dataset, batch: usize) -> tessera::Result<tessera::train::Eval> {
                <$ty>::evaluate(self, data, batch)
            }
            fn timeline(&self) -> Option<&Timeline> {
                <$ty>::timeline(self)
            }
            fn plan(&self) -> &Plan {
                <$ty>::plan(self)
            }
            fn device_names(&self) -> Vec<String> {
                <$ty>::device_names(self)
            }
            fn config(&self) -> &TrainConfig {
                <$ty>::config(self)
            }
            fn params(&self) -> tessera::Result<Vec<f32>> {
                <$ty>::params(self)
            }
            fn optimizer_state(&self) -> tessera::Result<Vec<Vec<f32>>> {
                <$ty>::optimizer_state(self)
            }
            fn root(&self) -> bool {
                let $me = self;
                $root
            }
        }
    };
}
impl_run!(Engine<B>, LocalGroup, |_e| true);
#[cfg(feature = "mpi")]
impl_run!(tessera::parallel::mpi::DistEngine<B>, Ops, |e| e.world().rank() == 0);

#[allow(clippy::too_many_arguments)]
fn train_local<B: LocalGroup>(
    devs: &[B],
    a: &TrainArgs,
    cfg: TrainConfig,
    batch: usize,
    ckpt: Option<Checkpoint>,
    total_steps: u64,
    train_set: &Dataset,
    test_set: &Dataset,
    data: DataId,
) -> tessera::Result<()> {
    let (plan, why, _) = make_plan(devs, &a.mesh, &cfg, batch, None, devs.len())?;
    if !a.json && devs.len() > 1 {
        errln!("plan: {} ({why})", plan.describe());
    }
    let (trainer, cursor) = match ckpt {
        Some(c) => (Engine::with_state(devs, cfg, plan, &c.params, Some(&c.state), c.step)?, c.cursor),
        None => (Engine::new(devs, cfg, plan)?, Cursor::default()),
    };
    run_training(trainer, cursor, a, batch, total_steps, train_set, test_set, data)
}

/// `mpirun -np N tessera train ...`: this process is one rank of the mesh.
#[cfg(feature = "mpi")]
#[allow(clippy::too_many_arguments)]
fn train_mpi(
    a: &TrainArgs,
    w: &std::sync::Arc<tessera::parallel::mpi::MpiWorld>,
    spec: DeviceSpec,
    cfg: TrainConfig,
    batch: usize,
    ckpt: Option<Checkpoint>,
    total_steps: u64,
    train_set: &Dataset,
    test_set: &Dataset,
    data: DataId,
) -> tessera::Result<()> {
    let data_name = data.name.clone();
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
    let explicit_gpu = a.device.contains(':');
    let pp = a.mesh.pp.unwrap_or(1);
    match a.mesh.dp {
        Some(dp) if dp * pp != w.size() => {
            return Err(Error::Invalid(format!(
                "--dp {dp} x --pp {pp} needs {} ranks, but the job has {} (use mpirun -np {})",
                dp * pp,
                w.size(),
                dp * pp
            )))
        }
        None if pp == 0 || w.size() % pp != 0 => {
            return Err(Error::Invalid(format!("--pp {pp} does not divide the job's {} ranks", w.size())))
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
        errln!("{}", run_line(&cfg, batch, &data_name, train_set, test_set));
    }
    let nccl = match a.allreduce.as_deref() {
        None => None,
        Some("ring") => Some(false),
        Some("nccl") => Some(true),
        Some(other) => return Err(Error::Invalid(format!("--allreduce {other}: use ring or nccl"))),
    };
    if nccl == Some(true) && !matches!(spec, DeviceSpec::Cuda { .. } | DeviceSpec::Auto) {
        return Err(Error::Invalid("--allreduce nccl needs GPUs (--device cuda)".into()));
    }
    macro_rules! go {
        ($dev:expr, $all_reduce:expr, $sharing:expr) => {{
            let dev = $dev;
            let devs = vec![dev.clone(); w.size()];
            let (plan, why, _) = make_plan(&devs, &a.mesh, &cfg, batch, None, $sharing)?;
            if w.rank() == 0 && !a.json {
                errln!("plan: {} ({why}), one rank per device", plan.describe());
            }
            let cfg = cfg.clone();
            let (params, state, step, cursor) = match ckpt {
                Some(c) => (c.params, Some(c.state), c.step, c.cursor),
                None => (cfg.model.init(cfg.seed), None, 0, Cursor::default()),
            };
            let trainer = tessera::parallel::mpi::DistEngine::with_all_reduce(
                w,
                &dev,
                cfg,
                plan,
                &params,
                state.as_deref(),
                step,
                $all_reduce,
            )?;
            tessera::parallel::mpi::install_termination_notice(w);
            run_training(trainer, cursor, a, batch, total_steps, train_set, test_set, data.clone())
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

/// The memory one of `n` logical devices may use: the machine's (CPU) or the GPU's memory,
/// shared evenly.
fn device_memory<B: Ops>(devs: &[B], sharing: usize) -> u64 {
    let any: &dyn std::any::Any = &devs[0];
    let total = if let Some(g) = any.downcast_ref::<tessera::CudaDevice>() {
        g.info().total_mem as u64
    } else {
        std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find(|l| l.starts_with("MemTotal"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .map(|kib| kib * 1024)
            .unwrap_or(8 << 30)
    };
    total / sharing.max(1) as u64
}

/// The plan for `devs` from the flags, or from the planner; returns it with a line of reasons.
/// `sharing`: how many of the devices share one piece of hardware (its memory and speed):
/// all of them in one process (logical devices), the ranks on a node under MPI for the CPU, one
/// for a GPU per rank.
fn make_plan<B: Ops>(
    devs: &[B],
    m: &MeshArgs,
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
    let kind = m.schedule.as_deref().map(str::parse::<ScheduleKind>).transpose()?;
    let manual = m.dp.is_some() || m.pp.is_some() || m.microbatches.is_some() || m.plan != "auto" || n == 1;
    if m.plan != "auto" && m.plan != "manual" {
        return Err(Error::Invalid(format!(
            "--plan {}: use auto (the planner decides) or give --dp/--pp/--microbatches",
            m.plan
        )));
    }
    let mut plan = if manual {
        let pp = m.pp.unwrap_or(1);
        if pp == 0 || (m.dp.is_none() && n % pp != 0) {
            return Err(Error::Invalid(format!("--pp {pp} does not divide the {n} devices opened")));
        }
        let dp = m.dp.unwrap_or(n / pp);
        if dp * pp != n {
            return Err(Error::Invalid(format!(
                "--dp {dp} x --pp {pp} needs {} devices, but --device opened {n}: use --device cpu:{} (or cuda:0x{})",
                dp * pp,
                dp * pp,
                dp * pp
            )));
        }
        let micro = m.microbatches.unwrap_or(if pp > 1 { 2 * pp } else { 1 });
        (
            Plan::new(&cfg.model, dp, pp, micro, kind.unwrap_or(ScheduleKind::OneFOneB))?,
            "given by the flags".to_string(),
            None,
        )
    } else {
        let memory = match &m.memory {
            Some(s) => parse_bytes(s)?,
            None => device_memory(devs, sharing),
        };
        let mut budget = Budget::measure(&devs[0], memory, sharing)?;
        if let Some(g) = gflops {
            budget.flops = g * 1e9;
        }
        let (p, _, why) = planner::choose(cfg, batch, n, &budget, kind)?;
        (p, format!("planner: {why}"), Some(budget))
    };
    if let Some(lps) = &m.layers_per_stage {
        let counts = MlpConfig::parse_widths(lps).map_err(|e| Error::Invalid(format!("--layers-per-stage: {e}")))?;
        plan.0 = plan.0.with_layers_per_stage(&cfg.model, &counts)?;
    }
    plan.0 = plan.0.with_accumulate(m.accumulate)?.with_comm_timeout(comm_timeout()?)?;
    if manual {
        // The planner checked its own choice; a plan given by the flags (or one device) is
        // checked here, before anything is allocated.
        let memory = match &m.memory {
            Some(s) => parse_bytes(s)?,
            None => device_memory(devs, sharing),
        };
        planner::check_fits(cfg, batch, &plan.0, memory)?;
    }
    Ok(plan)
}

fn plan(a: PlanArgs) -> tessera::Result<()> {
    let model = MlpConfig::new(MlpConfig::parse_widths(&a.widths)?, Activation::Relu)?;
    let optimizer = match a.optimizer {
        OptName::Adamw => OptimizerConfig::AdamW(AdamW::default()),
        OptName::Sgd => OptimizerConfig::Sgd(Sgd { lr: 0.05, momentum: 0.9, weight_decay: 0.0 }),
    };
    let cfg = TrainConfig { model, optimizer, schedule: LrSchedule::Constant, clip_norm: None, seed: 0 };
    let spec: DeviceSpec = a.device.parse()?;
    let (devices, chosen) = spec.open()?;
    outln!("{chosen}");
    match devices {
        Devices::Cpu(d) => print_plan(&d, &a, &cfg),
        Devices::Cuda(d) => print_plan(&d, &a, &cfg),
        Devices::Sim(d) => print_plan(&d, &a, &cfg),
    }
}

fn print_plan<B: Ops>(devs: &[B], a: &PlanArgs, cfg: &TrainConfig) -> tessera::Result<()> {
    let (plan, why, budget) = make_plan(devs, &a.mesh, cfg, a.batch, a.gflops, devs.len())?;
    let budget = match budget {
        Some(b) => b,
        None => {
            let memory = match &a.mesh.memory {
                Some(s) => parse_bytes(s)?,
                None => device_memory(devs, devs.len()),
            };
            let mut b = Budget::measure(&devs[0], memory, devs.len())?;
            if let Some(g) = a.gflops {
                b.flops = g * 1e9;
            }
            b
        }
    };
    let est = planner::estimate(cfg, a.batch, &plan, &budget);
    let mesh = plan.mesh;
    outln!(
        "model: {} ({} parameters), {}, batch {}",
        cfg.model.widths_string(),
        cfg.model.param_count(),
        cfg.optimizer.name(),
        a.batch
    );
    outln!("plan: {} ({why})", plan.describe());
    outln!("mesh: {} replica(s) x {} stage(s) over {} device(s):", mesh.dp, mesh.pp, mesh.devices());
    for r in 0..mesh.dp {
        let names: Vec<String> = (0..mesh.pp).map(|s| devs[mesh.device(r, s)].name()).collect();
        outln!("  replica {r}: {}", names.join(" -> "));
    }
    let layout = cfg.model.layout();
    outln!("stages:");
    for (s, layers) in plan.stages.iter().enumerate() {
        let params: usize = layout[layers.clone()].iter().map(|l| l.bias.end - l.weight.start).sum();
        let shapes: Vec<String> =
            layout[layers.clone()].iter().map(|l| format!("{}x{}", l.fan_in, l.fan_out)).collect();
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
    let stats = schedule.check()?;
    outln!("schedule: {} (checked: sound; activations in flight per stage {:?}), time by stage (F forward, B backward = 2 units):", plan.schedule, stats.peak_in_flight);
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
    if let Some(path) = &a.svg {
        let names: Vec<String> = (0..mesh.pp).map(|s| format!("stage {s} ({})", devs[s].name())).collect();
        let t = Timeline::from_schedule(&schedule, &vec![1.0; mesh.pp], &vec![2.0; mesh.pp], &names);
        let title = format!("planned {} for {}", plan.schedule, plan.describe());
        std::fs::write(path, t.to_svg(&title, "units"))
            .map_err(|source| Error::Io { path: path.display().to_string(), source })?;
        outln!("wrote {}", path.display());
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_training<T: Run>(
    mut trainer: T,
    mut cursor: Cursor,
    a: &TrainArgs,
    batch: usize,
    total_steps: u64,
    train_set: &Dataset,
    test_set: &Dataset,
    data: DataId,
) -> tessera::Result<()> {
    let root = trainer.root();
    if root {
        for (flag, path) in [("--save", &a.save), ("--timeline", &a.timeline)] {
            if let Some(p) = path {
                check_output(flag, p)?;
            }
        }
    }
    let per_epoch = batches_per_epoch(train_set.len(), batch) as u64;
    let start_step = trainer.steps();
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
    let fitted = fit(&mut trainer, train_set, batch, stop, &mut cursor, |t, stats, rows| {
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
        // A signal stops the run here, at a step boundary: the cursor and the step agree.
        if let Some((signal, _)) = interrupt::caught() {
            return Err(Error::Interrupted { signal, step: t.steps() });
        }
        Ok(())
    });
    let checkpoint = |trainer: &T, cursor: Cursor| -> tessera::Result<Checkpoint> {
        Ok(Checkpoint {
            config: trainer.config().clone(),
            batch,
            step: trainer.steps(),
            cursor,
            params: trainer.params()?,
            state: trainer.optimizer_state()?,
            data: data.clone(),
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
    let eval = trainer.evaluate(test_set, 1000)?;
    let wall = t0.elapsed().as_secs_f64();
    if let Some(path) = a.timeline.as_ref().filter(|_| root) {
        let t = trainer.timeline().ok_or_else(|| Error::Invalid("--timeline: no step was taken".into()))?;
        let title = format!(
            "step {} of {} on {}",
            trainer.steps(),
            trainer.plan().describe(),
            trainer.device_names().join(", ")
        );
        std::fs::write(path, t.to_svg(&title, "s"))
            .map_err(|source| Error::Io { path: path.display().to_string(), source })?;
        if !a.json {
            errln!(
                "wrote {}: measured idle {:.1}% (the GPipe bubble for this plan would be {:.1}%)",
                path.display(),
                100.0 * t.idle_fraction(),
                100.0
                    * tessera::parallel::schedule::bubble_fraction(trainer.plan().mesh.pp, trainer.plan().microbatches)
            );
        }
    }
    // Every rank takes part in gathering the parameters; rank 0 writes them, after the result.
    let gathered = match &a.save {
        Some(_) => Some(checkpoint(&trainer, cursor)?),
        None => None,
    };
    if !root {
        return Ok(());
    }
    if !eval.loss.is_finite() {
        errln!(
            "warning: the test loss is {}: the run diverged (the training loss was {last_loss:e}); lower the learning \
             rate (--lr) or clip gradients (--clip 1.0)",
            eval.loss
        );
    }
    let steps_run = trainer.steps() - start_step;
    let rate = samples as f64 / train_time.max(1e-9);
    if a.json {
        let j = serde_json::json!({
            "device": trainer.device_names().join(","),
            "plan": trainer.plan().describe(),
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
            trainer.device_names().join(","),
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

/// Checks before training that an output file of `flag` can be written where it is asked for
/// (its directory exists and takes a file), so that a run does not fail at its end for a typo.
fn check_output(flag: &str, path: &std::path::Path) -> tessera::Result<()> {
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
