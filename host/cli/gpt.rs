//! `tessera train --model gpt`: a character-level GPT on tiny Shakespeare (or a text file of
//! one's own), nanoGPT's CPU configuration by default, on any devices and plan (in one process
//! or one rank per process under mpirun), printing the validation loss (the mean over the whole
//! validation text, in windows of the context side by side) at intervals and at the end; `--save` and `--resume` keep a
//! run's progress in a checkpoint that `tessera sample` writes text from.

use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use tessera::checkpoint::{Checkpoint, DataId};
use tessera::data::TextCorpus;
use tessera::nn::{GptConfig, MlpConfig, Network};
use tessera::parallel::comm::LocalGroup;
use tessera::parallel::engine::Engine;
use tessera::train::{Cursor, LrSchedule, TrainConfig};
use tessera::{CpuDevice, Devices, Error, Ops};

use super::args::{SchedName, TrainArgs};
use super::interrupt;
use super::plan::make_plan;
use super::train::{
    batch_from_flags, check_output, optimizer_from_flags, profile_report, refuse_conflicts, run_conflicts, traffic_of,
    write_timeline, OptDefaults, Pipelined,
};
use super::World;

/// The flags that shape an MLP run, refused with a GPT.
fn refuse_mlp_flags(a: &TrainArgs) -> tessera::Result<()> {
    for (flag, given, why) in [
        ("--widths", a.widths.is_some(), "shapes an MLP (a GPT's are --layers, --heads, --width, --context)"),
        ("--activation", a.activation.is_some(), "is an MLP's (a GPT's MLP uses GELU)"),
        ("--epochs", a.epochs.is_some(), "counts passes over images; a GPT's run is --steps long"),
    ] {
        if given {
            return Err(Error::Invalid(format!("{flag} {why}: leave it out with --model gpt")));
        }
    }
    Ok(())
}

/// The run's model, config, batch and length: from the checkpoint being resumed (flags that
/// contradict it are an error), or from the flags with nanoGPT's CPU configuration where they
/// are silent.
fn gpt_config(
    a: &TrainArgs,
    text: &TextCorpus,
    data: &DataId,
    ckpt: Option<&Checkpoint>,
) -> tessera::Result<(GptConfig, TrainConfig, usize, u64)> {
    let vocab = text.vocab.len();
    if let Some(c) = ckpt {
        let path = a.resume.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        let fail = |reason: String| Error::Checkpoint { path: path.clone(), reason };
        let gpt = GptConfig::from_description(&c.model).ok_or_else(|| {
            fail(if MlpConfig::from_description(&c.model).is_some() {
                format!("it holds the model `{}`: resume it without --model gpt", c.model)
            } else {
                format!("it holds the model `{}`, which --model gpt cannot build", c.model)
            })
        })?;
        // Windows are drawn by step, not by epoch: any place in an "epoch" exists.
        let info = gpt.model::<CpuDevice>()?.info()?;
        c.check_resume(&info, data, u64::MAX).map_err(|e| {
            let hint = if c.data.crc32 != data.crc32 {
                " (the same text: the same --data, or none for the vendored tiny Shakespeare)"
            } else {
                ""
            };
            fail(match e {
                Error::Invalid(m) => format!("{m}{hint}"),
                e => format!("{e}{hint}"),
            })
        })?;
        let mut conflicts = Vec::new();
        for (flag, given, was) in [
            ("--layers", a.shape.layers, gpt.layers),
            ("--heads", a.shape.heads, gpt.heads),
            ("--width", a.shape.width, gpt.c),
            ("--context", a.shape.context, gpt.t),
        ] {
            if given.is_some_and(|g| g != was) {
                conflicts.push(format!("{flag} (checkpoint: {was})"));
            }
        }
        conflicts.extend(run_conflicts(a, c));
        refuse_conflicts(a, conflicts)?;
        let steps = match c.config.schedule {
            // The cosine schedule fixed the run's length when it started.
            LrSchedule::Cosine { total, .. } => match a.steps {
                Some(s) if s != total => {
                    return Err(fail(format!(
                        "--steps {s}: its run's cosine schedule ends at step {total}, so the resumed run does too. \
                         Leave --steps out (or start a new run for another length)"
                    )))
                }
                _ => total,
            },
            LrSchedule::Constant => a.steps.unwrap_or(2000),
        };
        if steps < c.step {
            return Err(fail(format!(
                "it is at step {}, past the {steps} steps asked for (--steps counts the whole run, the steps before \
                 --resume included): ask for more",
                c.step
            )));
        }
        return Ok((gpt, c.config.clone(), c.batch, steps));
    }
    let gpt = a.shape.config(vocab);
    gpt.validate()?;
    let steps = a.steps.unwrap_or(2000);
    let optimizer =
        optimizer_from_flags(a, OptDefaults { adamw_lr: 1e-3, adamw_decay: 0.1, beta2: Some(0.99), sgd_lr: 1e-3 })?;
    let schedule = match a.lr_schedule.unwrap_or(SchedName::Cosine) {
        SchedName::Constant if a.warmup.is_some() => {
            return Err(Error::Invalid("--warmup is the warm-up of the cosine schedule: leave it out".into()))
        }
        SchedName::Constant => LrSchedule::Constant,
        SchedName::Cosine => {
            if steps == 0 {
                return Err(Error::Invalid(
                    "--steps 0: a cosine schedule needs at least one step (or use --lr-schedule constant)".into(),
                ));
            }
            let warmup = a.warmup.unwrap_or(100.min(steps / 2));
            if warmup > steps {
                return Err(Error::Invalid(format!("--warmup {warmup} is longer than the run ({steps} steps)")));
            }
            // To a tenth of the peak at the last step (nanoGPT: 1e-3 down to 1e-4).
            LrSchedule::Cosine { warmup, total: steps, min_factor: 0.1 }
        }
    };
    let cfg = TrainConfig { optimizer, schedule, clip_norm: Some(a.clip.unwrap_or(1.0)), seed: a.seed.unwrap_or(0) };
    cfg.validate()?;
    Ok((gpt, cfg, batch_from_flags(a, 12)?, steps))
}

/// `tessera train --model gpt`.
pub(crate) fn train_gpt(a: &TrainArgs, world: World) -> tessera::Result<()> {
    refuse_mlp_flags(a)?;
    let ckpt = a
        .resume
        .as_deref()
        .map(|p| Checkpoint::load(p).map_err(|e| Error::Invalid(format!("--resume: {e}"))))
        .transpose()?;
    let text = match &a.data {
        Some(path) => TextCorpus::from_file(path)?,
        None => TextCorpus::tiny_shakespeare()?,
    };
    let data = DataId::of_text(&text);
    let (gpt, cfg, batch, steps) = gpt_config(a, &text, &data, ckpt.as_ref())?;
    let (val_x, val_y) = match a.val_windows {
        Some(n) => text.val_windows(n, gpt.t)?,
        None => text.val_text_windows(gpt.t)?,
    };
    // Checks the text can hold a training window before any device is opened.
    text.train_batch(cfg.seed, 0, 1, gpt.t)?;
    let line = format!(
        "model: {} ({} parameters); {} lr {} ({}), clip {}; batch {batch}; data: {} ({} train, {} validation characters)",
        gpt.describe(),
        gpt.param_count(),
        cfg.optimizer.name(),
        cfg.optimizer.lr(),
        cfg.schedule,
        cfg.clip_norm.map_or("none".to_string(), |c| c.to_string()),
        text.name,
        text.train.len(),
        text.val.len()
    );
    let job = GptJob { a, gpt, text: &text, data, batch, steps, val: (&val_x, &val_y) };
    #[cfg(feature = "mpi")]
    if let Some(w) = world {
        return super::train::train_mpi(a, &w, a.device.spec, &job, cfg, batch, ckpt, &line);
    }
    let _ = world;
    if let Some(ar) = &a.allreduce {
        return Err(Error::Invalid(format!(
            "--allreduce {ar} is for runs across processes (mpirun -np N tessera train ...); in one process the \
             gradients are reduced by the in-process ring"
        )));
    }
    let (devices, chosen) = a.device.spec.open()?;
    interrupt::install();
    if !a.json {
        errln!("{chosen}");
        errln!("{line}");
    }
    match devices {
        Devices::Cpu(d) => run_local(&d, &job, cfg, ckpt),
        Devices::Cuda(d) => run_local(&d, &job, cfg, ckpt),
        Devices::Sim(d) => run_local(&d, &job, cfg, ckpt),
    }
}

/// A GPT run: its flags, shape, text, batch and length, and the fixed validation windows.
pub(crate) struct GptJob<'a> {
    a: &'a TrainArgs,
    gpt: GptConfig,
    text: &'a TextCorpus,
    data: DataId,
    batch: usize,
    steps: u64,
    val: (&'a [f32], &'a [i32]),
}

#[cfg(feature = "mpi")]
impl super::train::RankJob for GptJob<'_> {
    fn model<B: Ops>(&self) -> tessera::Result<tessera::nn::Model<B>> {
        self.gpt.model()
    }
    fn run<T: Pipelined, B: Ops>(&self, trainer: T, dev: &B, _cursor: Cursor) -> tessera::Result<()> {
        run_gpt(trainer, dev, self)
    }
}

fn run_local<B: LocalGroup>(
    devs: &[B],
    job: &GptJob<'_>,
    cfg: TrainConfig,
    ckpt: Option<Checkpoint>,
) -> tessera::Result<()> {
    let a = job.a;
    let model = job.gpt.model::<B>()?;
    let info = model.info()?;
    let (plan, why, _) = make_plan(devs, &a.mesh, &info, &cfg, job.batch, None, devs.len())?;
    if !a.json && devs.len() > 1 {
        errln!("plan: {} ({why})", plan.describe());
    }
    let trainer = match ckpt {
        Some(c) => Engine::with_state(devs, &model, cfg, plan, &c.params, Some(&c.state), c.step)?,
        None => Engine::new(devs, &model, cfg, plan)?,
    };
    run_gpt(trainer, &devs[0], job)
}

/// The validation loss of `params` on `dev`: the mean cross-entropy over the whole validation
/// text (windows side by side), in batches of 64 windows.
fn val_loss<B: Ops>(dev: &B, job: &GptJob<'_>, params: &[f32]) -> tessera::Result<f64> {
    let mut net = Network::with_params(dev, &job.gpt.model::<B>()?, params)?;
    net.mean_loss(dev, job.val.0, job.val.1, 64)
}

/// The training loop of a GPT run on any engine (every rank calls it; rank 0 reports and saves).
fn run_gpt<T: Pipelined, B: Ops>(mut trainer: T, dev: &B, job: &GptJob<'_>) -> tessera::Result<()> {
    let a = job.a;
    let root = trainer.is_root();
    if root {
        for (flag, path) in [("--save", &a.save), ("--timeline", &a.timeline)] {
            if let Some(p) = path {
                check_output(flag, p)?;
            }
        }
    }
    let seed = trainer.train_config().seed;
    let start = trainer.steps_done();
    if let Some(s) = a.stop_at.filter(|&s| s < start) {
        return Err(Error::Invalid(format!(
            "--stop-at {s}: the run resumed at step {start}, past it; give a later step (or leave --stop-at out)"
        )));
    }
    let stop = a.stop_at.map_or(job.steps, |s| s.min(job.steps));
    let every = a.eval_every.unwrap_or(250);
    // How to go on from a checkpoint of this run: a constant schedule does not record the
    // run's length, so the hint names it.
    let constant = matches!(trainer.train_config().schedule, LrSchedule::Constant);
    let resume_hint = |path: &std::path::Path| match constant {
        true => format!("--resume {} --steps {}", path.display(), job.steps),
        false => format!("--resume {}", path.display()),
    };
    let pb = if a.json || !root { ProgressBar::hidden() } else { ProgressBar::new(stop) };
    pb.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  loss {msg}  [{elapsed_precise}<{eta_precise}]")
            .unwrap(),
    );
    pb.set_position(start);
    let simulated = trainer.devices().iter().all(|d| d.starts_with("sim:") || d.contains(":sim:"));
    let mut counted = tessera::backend::sim::counts();
    let mut per_step: Vec<tessera::backend::sim::SimCounts> = Vec::new();
    let mut sent: Vec<tessera::parallel::timeline::Traffic> = Vec::new();
    let t0 = Instant::now();
    let mut evals: Vec<(u64, f64)> = Vec::new();
    let mut last_loss = f32::NAN;
    let mut evaluate = |trainer: &T, done: u64, last_loss: f32| -> tessera::Result<()> {
        // Every rank gathers the parameters; rank 0 measures them.
        let params = trainer.flat_params()?;
        if !root {
            return Ok(());
        }
        let v = val_loss(dev, job, &params)?;
        evals.push((done, v));
        if !a.json {
            pb.suspend(|| {
                outln!(
                    "step {done:>6}: train loss {last_loss:.4}, validation loss {v:.4} ({:.1} s)",
                    t0.elapsed().as_secs_f64()
                )
            });
        }
        Ok(())
    };
    let checkpoint = |trainer: &T| -> tessera::Result<Checkpoint> {
        Ok(Checkpoint {
            model: trainer.model_info().name.clone(),
            tensors: Checkpoint::tensors_of(trainer.model_info()),
            config: trainer.train_config().clone(),
            batch: job.batch,
            step: trainer.steps_done(),
            cursor: Cursor::default(),
            params: trainer.flat_params()?,
            state: trainer.flat_optimizer_state()?,
            data: job.data.clone(),
            vocab: Some(job.text.vocab.iter().collect()),
        })
    };
    for step in start..stop {
        let (x, y) = job.text.train_batch(seed, step, job.batch, job.gpt.t)?;
        let done = step + 1;
        // Evaluation steps read the loss too, so the line they print is this step's.
        let read = done % a.loss_every == 0 || done % every == 0 || done == stop;
        let s = trainer.train_step_reading(&x, &y, read)?;
        if a.profile {
            let now = tessera::backend::sim::counts();
            per_step.push(now - counted);
            sent.push(traffic_of(&trainer));
            counted = now;
        }
        pb.set_position(done);
        if s.loss_steps > 0 {
            if !s.loss.is_finite() {
                return Err(Error::Invalid(format!(
                    "the loss became {} by step {done}: lower the learning rate (--lr)",
                    s.loss
                )));
            }
            last_loss = s.loss;
            pb.set_message(format!("{:.4}", s.loss));
        }
        if done % every == 0 || done == stop {
            evaluate(&trainer, done, last_loss)?;
        }
        if let Some((signal, _)) = interrupt::caught() {
            pb.finish_and_clear();
            let saved = match &a.save {
                Some(path) => {
                    let c = checkpoint(&trainer)?;
                    if root {
                        c.save(path).map_err(|e| Error::Invalid(format!("--save: {e}")))?;
                    }
                    format!("saved {} (continue the run with {})", path.display(), resume_hint(path))
                }
                None => "nothing saved (give --save FILE to keep a run's progress)".to_string(),
            };
            if root {
                errln!("interrupted by {signal} at step {done} of {}: {saved}", job.steps);
            }
            return Err(Error::Interrupted { signal, step: done });
        }
    }
    if start == stop {
        evaluate(&trainer, stop, last_loss)?;
    }
    pb.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    if let Some(path) = a.timeline.as_ref().filter(|_| root) {
        write_timeline(&trainer, path, a.json)?;
    }
    // Every rank takes part in gathering the checkpoint; rank 0 writes it, after the result.
    let gathered = match &a.save {
        Some(_) => Some(checkpoint(&trainer)?),
        None => None,
    };
    if !root {
        return Ok(());
    }
    let profile = if a.profile { profile_report(simulated, &per_step, &sent, start, a.json) } else { None };
    let (_, val) = *evals.last().expect("the last step evaluates");
    let run_steps = stop - start;
    let rate = run_steps as f64 / secs.max(1e-9);
    if a.json {
        let mut j = serde_json::json!({
            "model": "gpt",
            "description": trainer.model_info().name,
            "layers": job.gpt.layers,
            "width": job.gpt.c,
            "heads": job.gpt.heads,
            "context": job.gpt.t,
            "vocab": job.gpt.vocab,
            "params": job.gpt.param_count(),
            "steps": trainer.steps_done(),
            "steps_this_run": run_steps,
            "total_steps": job.steps,
            "batch": job.batch,
            "devices": trainer.devices(),
            "plan": trainer.plan().describe(),
            "final_train_loss": last_loss,
            "val_loss": val,
            "val_losses": evals.iter().map(|(s, v)| serde_json::json!({"step": s, "val_loss": v})).collect::<Vec<_>>(),
            "seconds": secs,
            "steps_per_second": rate,
        });
        if let Some(p) = profile {
            j["profile"] = p;
        }
        outln!("{j}");
    } else {
        outln!(
            "validation loss {val:.4} after {} steps ({run_steps} this run) on {} in {secs:.1} s ({rate:.2} steps/s)",
            trainer.steps_done(),
            trainer.devices().join(","),
        );
    }
    if let (Some(path), Some(c)) = (&a.save, gathered) {
        c.save(path).map_err(|e| Error::Invalid(format!("--save: {e}")))?;
        if !a.json {
            let more = if c.step < job.steps {
                format!("; continue the run with {}", resume_hint(path))
            } else {
                format!("; write text with: tessera sample --checkpoint {}", path.display())
            };
            errln!("saved {} (step {}{more})", path.display(), c.step);
        }
    }
    Ok(())
}
