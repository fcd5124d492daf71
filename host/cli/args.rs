//! The command line's arguments (clap).

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
use tessera::nn::MlpConfig;
use tessera::parallel::planner::parse_bytes;
use tessera::parallel::ScheduleKind;
use tessera::{Activation, DeviceSpec};

/// tessera: hand-written CUDA kernels and a host library for training on CPU and GPU devices.
#[derive(Parser)]
#[command(name = "tessera", version, about)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub(crate) enum Cmd {
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
    /// 8,000 to train, 2,000 to test) and report the test accuracy; or, with --model gpt, a
    /// character-level GPT on tiny Shakespeare and report the validation loss.
    Train(TrainArgs),
    /// Write text from a GPT checkpoint (tessera train --model gpt --save FILE), decoded on the
    /// CPU with a key/value cache.
    Sample(SampleArgs),
    /// Print the plan of a run over several devices (mesh, stages, schedule chart, memory per
    /// device, estimated step time and bubble) without training.
    Plan(PlanArgs),
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq, Default)]
pub(crate) enum ModelName {
    /// An MLP classifier on images (MNIST).
    #[default]
    Mlp,
    /// A character-level GPT on text (tiny Shakespeare).
    Gpt,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum OptName {
    Adamw,
    Sgd,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum SchedName {
    Constant,
    Cosine,
}

/// `--allreduce`: the gradient all-reduce across processes.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum AllReduceName {
    /// tessera's ring over MPI messages.
    Ring,
    /// NCCL (GPUs).
    Nccl,
}

impl std::fmt::Display for AllReduceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AllReduceName::Ring => "ring",
            AllReduceName::Nccl => "nccl",
        })
    }
}

/// `--plan`: who decides dp, pp and microbatches.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(crate) enum PlanMode {
    /// The planner, with several devices and no --dp/--pp/--microbatches.
    Auto,
    /// The flags and their defaults.
    Manual,
}

/// `--device`: the library's [`DeviceSpec`], and whether a GPU ordinal was written out
/// (`cuda:1`, not `cuda`: under MPI, `cuda` means the GPU of the local rank).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct DeviceArg {
    pub(crate) spec: DeviceSpec,
    pub(crate) explicit: bool,
}

impl std::str::FromStr for DeviceArg {
    type Err = tessera::Error;
    fn from_str(s: &str) -> tessera::Result<Self> {
        Ok(DeviceArg { spec: s.parse()?, explicit: s.contains(':') })
    }
}

impl std::fmt::Display for DeviceArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.spec.fmt(f)
    }
}

/// A list of whole numbers: `--widths 784,512,10`, `--layers-per-stage 1,2`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Counts(pub(crate) Vec<usize>);

impl std::str::FromStr for Counts {
    type Err = tessera::Error;
    fn from_str(s: &str) -> tessera::Result<Self> {
        MlpConfig::parse_widths(s).map(Counts)
    }
}

/// `tessera sample`'s flags.
#[derive(clap::Args, Debug)]
pub(crate) struct SampleArgs {
    /// The GPT checkpoint (written by tessera train --model gpt --save FILE).
    #[arg(long)]
    pub(crate) checkpoint: PathBuf,
    /// The text to continue (characters of the model's vocabulary, at most its context).
    #[arg(long, default_value = "\n")]
    pub(crate) prompt: String,
    /// Tokens (characters) to write after the prompt.
    #[arg(long, default_value_t = 500)]
    pub(crate) tokens: usize,
    /// Softmax temperature: 1 samples the model's distribution, lower is more conservative, 0
    /// always takes the likeliest character.
    #[arg(long, default_value_t = 0.8, allow_negative_numbers = true)]
    pub(crate) temperature: f32,
    /// Sample among the K likeliest characters only.
    #[arg(long = "top-k")]
    pub(crate) top_k: Option<usize>,
    /// Seed of the sampling: the same seed, checkpoint and flags write the same text.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// One JSON line (the text, tokens, tokens/s) instead of the text as it is written.
    #[arg(long)]
    pub(crate) json: bool,
}

/// A size in bytes: `2GiB`, `512MiB`, `3000000`.
pub(crate) fn bytes_arg(s: &str) -> Result<u64, String> {
    parse_bytes(s).map_err(|e| e.to_string())
}

#[derive(clap::Args, Debug)]
pub(crate) struct TrainArgs {
    /// Device: auto, cpu, cpu:N, cuda, cuda:K, cuda:KxN, sim, sim:N (the kernels in the CUDA simulator).
    #[arg(long, default_value = "auto")]
    pub(crate) device: DeviceArg,
    /// Gradient all-reduce across processes (under mpirun/srun): ring (tessera's ring over MPI
    /// messages) or nccl (GPUs; the default there). `nccl` with --dp 1 still routes the
    /// gradients through a one-rank NCCL communicator, to check NCCL on one GPU.
    #[arg(long, value_enum)]
    pub(crate) allreduce: Option<AllReduceName>,
    /// The model: mlp (an MLP on MNIST digits) or gpt (a character-level GPT on tiny
    /// Shakespeare, nanoGPT's CPU configuration by default).
    #[arg(long, value_enum, default_value = "mlp")]
    pub(crate) model: ModelName,
    #[command(flatten)]
    pub(crate) shape: GptShape,
    /// GPT: the validation loss every N steps (and at the end) [default: 250].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) eval_every: Option<u64>,
    /// GPT: measure the validation loss on N windows evenly spaced over the validation text
    /// instead of the whole text (faster, noisier) [default: the whole text].
    #[arg(long, value_parser = at_least_one)]
    pub(crate) val_windows: Option<usize>,
    /// Layer widths from inputs to classes [default: 784,512,512,10].
    #[arg(long)]
    pub(crate) widths: Option<Counts>,
    /// Activation between layers: relu, gelu, gelu-erf, silu [default: relu].
    #[arg(long)]
    pub(crate) activation: Option<Activation>,
    /// Samples per step [default: 128].
    #[arg(long)]
    pub(crate) batch: Option<usize>,
    /// Passes over the training set [default: 15] (ignored when --steps is given).
    #[arg(long)]
    pub(crate) epochs: Option<u64>,
    /// Total optimizer steps (overrides --epochs; counts steps done before a --resume).
    #[arg(long)]
    pub(crate) steps: Option<u64>,
    /// Stop after this many steps in all (to resume later with --resume): the run, its
    /// schedule included, is still the one of --steps / --epochs.
    #[arg(long)]
    pub(crate) stop_at: Option<u64>,
    /// Print the host work of each step: kernel launches, host synchronisations, allocations and
    /// copies, counted on simulated devices (--device sim or sim:N) through the GPU's code path.
    #[arg(long)]
    pub(crate) profile: bool,
    /// Read the loss back from the device every N steps (their mean is shown): between reads a
    /// single-device run queues its steps without waiting for the device.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) loss_every: u64,
    /// Learning rate [default: 1e-3 for adamw, 0.05 for sgd].
    #[arg(long)]
    pub(crate) lr: Option<f32>,
    /// Optimizer [default: adamw].
    #[arg(long, value_enum)]
    pub(crate) optimizer: Option<OptName>,
    /// SGD momentum [default: 0.9] (sgd only).
    #[arg(long)]
    pub(crate) momentum: Option<f32>,
    /// Weight decay [default: 0.01 for adamw (decoupled), 0 for sgd].
    #[arg(long)]
    pub(crate) weight_decay: Option<f32>,
    /// Learning-rate schedule [default: constant].
    #[arg(long, value_enum)]
    pub(crate) lr_schedule: Option<SchedName>,
    /// Warm-up steps of the cosine schedule [default: 0] (cosine only).
    #[arg(long)]
    pub(crate) warmup: Option<u64>,
    /// Clip the global gradient norm to this value (positive).
    #[arg(long)]
    pub(crate) clip: Option<f32>,
    /// Seed of the initialisation and the data order [default: 0].
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// A directory with full MNIST (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz],
    /// t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]) instead of the vendored 10k.
    #[arg(long)]
    pub(crate) data: Option<PathBuf>,
    /// Write a checkpoint (safetensors) here at the end.
    #[arg(long)]
    pub(crate) save: Option<PathBuf>,
    /// Continue the run saved in this checkpoint.
    #[arg(long)]
    pub(crate) resume: Option<PathBuf>,
    /// Print a machine-readable summary (JSON) instead of the progress bar and text.
    #[arg(long)]
    pub(crate) json: bool,
    /// Write an SVG of what each device did during the last step.
    #[arg(long)]
    pub(crate) timeline: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) mesh: MeshArgs,
}

/// A count of at least 1 (`--dp`, `--pp`, `--microbatches`, `--accumulate`).
pub(crate) fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{s}` is not a whole number")),
    }
}

/// A GPT's shape flags (`train --model gpt` and `plan --model gpt`).
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct GptShape {
    /// GPT: transformer blocks [default: 4].
    #[arg(long, value_parser = at_least_one)]
    pub(crate) layers: Option<usize>,
    /// GPT: attention heads [default: 4].
    #[arg(long, value_parser = at_least_one)]
    pub(crate) heads: Option<usize>,
    /// GPT: width (channels) [default: 128].
    #[arg(long, value_parser = at_least_one)]
    pub(crate) width: Option<usize>,
    /// GPT: context (characters per window) [default: 64].
    #[arg(long, value_parser = at_least_one)]
    pub(crate) context: Option<usize>,
}

impl GptShape {
    /// The GPT of these flags over `vocab` tokens, nanoGPT's CPU configuration where they are
    /// silent.
    pub(crate) fn config(&self, vocab: usize) -> tessera::nn::GptConfig {
        tessera::nn::GptConfig {
            vocab,
            t: self.context.unwrap_or(64),
            c: self.width.unwrap_or(128),
            heads: self.heads.unwrap_or(4),
            layers: self.layers.unwrap_or(4),
        }
    }
    /// The first of the flags given, if any.
    pub(crate) fn first_given(&self) -> Option<&'static str> {
        [("--layers", self.layers), ("--heads", self.heads), ("--width", self.width), ("--context", self.context)]
            .into_iter()
            .find(|(_, v)| v.is_some())
            .map(|(f, _)| f)
    }
}

/// `--zero`: 0 or 1.
pub(crate) fn zero_stage(s: &str) -> Result<usize, String> {
    match s {
        "0" => Ok(0),
        "1" => Ok(1),
        _ => Err(format!(
            "`{s}`: tessera has ZeRO stage 0 (optimizer state whole on every replica) and 1 (sharded across the dp replicas)"
        )),
    }
}

/// How to spread a step over the devices.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct MeshArgs {
    /// Data-parallel replicas (default: devices / pp).
    #[arg(long, value_parser = at_least_one)]
    pub(crate) dp: Option<usize>,
    /// Pipeline stages per replica [default: 1].
    #[arg(long, value_parser = at_least_one)]
    pub(crate) pp: Option<usize>,
    /// Tensor-parallel devices per stage: each layer's matrices split over them (the MLP's
    /// hidden layers in column/row pairs; the GPT's attention by heads, its MLP by columns)
    /// [default: 1].
    #[arg(long, value_parser = at_least_one)]
    pub(crate) tp: Option<usize>,
    /// Microbatches per replica per step [default: 1, or pp x 2 when pp > 1].
    #[arg(long, value_parser = at_least_one)]
    pub(crate) microbatches: Option<usize>,
    /// Pipeline schedule: gpipe or 1f1b [default: 1f1b].
    #[arg(long)]
    pub(crate) schedule: Option<ScheduleKind>,
    /// Layers per stage, e.g. 1,2 (default: balanced by FLOPs).
    #[arg(long)]
    pub(crate) layers_per_stage: Option<Counts>,
    /// Pipeline passes whose gradients accumulate before the all-reduce.
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    pub(crate) accumulate: usize,
    /// ZeRO stage: 1 shards the optimizer state across the dp replicas (gradients
    /// reduce-scattered, parameters all-gathered), 0 keeps it whole [default: 0, or the
    /// planner's choice].
    #[arg(long, value_parser = zero_stage)]
    pub(crate) zero: Option<usize>,
    /// `auto`: with several devices and no --dp/--pp, the planner picks dp, pp and
    /// microbatches; `manual`: the flags (and their defaults) decide.
    #[arg(long, value_enum, default_value = "auto")]
    pub(crate) plan: PlanMode,
    /// Memory per device for the planner, e.g. 2GiB [default: the device's memory, shared
    /// among logical devices].
    #[arg(long, value_parser = bytes_arg)]
    pub(crate) memory: Option<u64>,
}

/// `tessera plan`: what a run would do, without running it.
#[derive(clap::Args, Debug)]
pub(crate) struct PlanArgs {
    /// Devices: cpu:N, cuda:KxN, sim:N, ...
    #[arg(long, default_value = "cpu")]
    pub(crate) device: DeviceArg,
    /// Layer widths from inputs to classes (the MLP).
    #[arg(long, default_value = "784,512,512,10")]
    pub(crate) widths: Counts,
    /// The model: mlp (shaped by --widths) or gpt (shaped by --layers, --heads, --width,
    /// --context, --vocab).
    #[arg(long, value_enum, default_value = "mlp")]
    pub(crate) model: ModelName,
    #[command(flatten)]
    pub(crate) shape: GptShape,
    /// GPT: vocabulary [default: 65, tiny Shakespeare's characters].
    #[arg(long, value_parser = at_least_one)]
    pub(crate) vocab: Option<usize>,
    /// Optimizer (its state is part of the memory).
    #[arg(long, value_enum, default_value = "adamw")]
    pub(crate) optimizer: OptName,
    /// Samples per step.
    #[arg(long, default_value_t = 128)]
    pub(crate) batch: usize,
    /// Sustained GEMM rate of one device in GFLOP/s (default: measured).
    #[arg(long)]
    pub(crate) gflops: Option<f64>,
    /// Draw the planned schedule as an SVG.
    #[arg(long)]
    pub(crate) svg: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) mesh: MeshArgs,
}
