//! `tessera train --model gpt`: a character-level GPT on tiny Shakespeare (or a text file of
//! one's own), nanoGPT's CPU configuration by default, on any devices and plan of one process,
//! printing the validation loss (the mean over fixed windows of the validation text) at
//! intervals and at the end.

use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use tessera::data::TextCorpus;
use tessera::nn::{GptConfig, Network};
use tessera::parallel::comm::LocalGroup;
use tessera::parallel::engine::Engine;
use tessera::train::{LrSchedule, Run, TrainConfig};
use tessera::{Devices, Error};

use super::args::{SchedName, TrainArgs};
use super::interrupt;
use super::plan::make_plan;
use super::train::{batch_from_flags, optimizer_from_flags, OptDefaults};

/// Validation windows in the loss the run reports.
const VAL_WINDOWS: usize = 200;

/// The run's model and config from the flags: nanoGPT's CPU configuration where they are silent.
fn gpt_config(a: &TrainArgs, vocab: usize) -> tessera::Result<(GptConfig, TrainConfig, usize, u64)> {
    for (flag, given, why) in [
        ("--widths", a.widths.is_some(), "shapes an MLP (a GPT's are --layers, --heads, --width, --context)"),
        ("--activation", a.activation.is_some(), "is an MLP's (a GPT's MLP uses GELU)"),
        ("--epochs", a.epochs.is_some(), "counts passes over images; a GPT's run is --steps long"),
        ("--resume", a.resume.is_some(), "does not take a GPT's checkpoint yet (issue #16)"),
        ("--save", a.save.is_some(), "does not write a GPT's checkpoint yet (issue #16)"),
        ("--stop-at", a.stop_at.is_some(), "needs --save and --resume, which a GPT run lacks yet (issue #16)"),
        ("--timeline", a.timeline.is_some(), "is not drawn for a GPT run yet (issue #16)"),
        ("--profile", a.profile, "counts an MLP run's host work (issue #16)"),
        ("--allreduce", a.allreduce.is_some(), "is for runs across processes, which a GPT run does not make yet"),
    ] {
        if given {
            return Err(Error::Invalid(format!("{flag} {why}: leave it out with --model gpt")));
        }
    }
    let gpt = GptConfig {
        vocab,
        t: a.context.unwrap_or(64),
        c: a.width.unwrap_or(128),
        heads: a.heads.unwrap_or(4),
        layers: a.layers.unwrap_or(4),
    };
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
pub(crate) fn train_gpt(a: &TrainArgs, under_mpi: bool) -> tessera::Result<()> {
    if under_mpi {
        return Err(Error::Invalid(
            "--model gpt runs in one process for now (issue #16): run it without mpirun, with --device cpu:N or \
             cuda:KxN for several devices"
                .into(),
        ));
    }
    let text = match &a.data {
        Some(path) => TextCorpus::from_file(path)?,
        None => TextCorpus::tiny_shakespeare()?,
    };
    let (gpt, cfg, batch, steps) = gpt_config(a, text.vocab.len())?;
    let (val_x, val_y) = text.val_windows(VAL_WINDOWS, gpt.t)?;
    // Checks the text can hold a training window before any device is opened.
    text.train_batch(cfg.seed, 0, 1, gpt.t)?;
    let (devices, chosen) = a.device.spec.open()?;
    interrupt::install();
    if !a.json {
        errln!("{chosen}");
        errln!(
            "model: GPT {} blocks, width {}, {} heads, context {}, vocabulary {}; {} lr {} ({}), clip {}; batch {batch}; data: {} ({} train, {} validation characters)",
            gpt.layers,
            gpt.c,
            gpt.heads,
            gpt.t,
            gpt.vocab,
            cfg.optimizer.name(),
            cfg.optimizer.lr(),
            cfg.schedule,
            cfg.clip_norm.unwrap_or(0.0),
            text.name,
            text.train.len(),
            text.val.len()
        );
    }
    let job = Job { a, gpt, text: &text, batch, steps, val: (&val_x, &val_y) };
    match devices {
        Devices::Cpu(d) => run(&d, &job, cfg),
        Devices::Cuda(d) => run(&d, &job, cfg),
        Devices::Sim(d) => run(&d, &job, cfg),
    }
}

struct Job<'a> {
    a: &'a TrainArgs,
    gpt: GptConfig,
    text: &'a TextCorpus,
    batch: usize,
    steps: u64,
    val: (&'a [f32], &'a [i32]),
}

/// The validation loss of `params` on the first device: the mean cross-entropy over the fixed
/// windows, in batches of 32 windows.
fn val_loss<B: LocalGroup>(dev: &B, job: &Job<'_>, params: &[f32]) -> tessera::Result<f64> {
    let t = job.gpt.t;
    let mut net = Network::with_params(dev, &job.gpt.model::<B>()?, params)?;
    let (x, y) = job.val;
    let rows = x.len() / t;
    let mut total = 0f64;
    for start in (0..rows).step_by(32) {
        let end = (start + 32).min(rows);
        net.load_batch(dev, &x[start * t..end * t], &y[start * t..end * t])?;
        net.forward(dev)?;
        total += net.loss(dev)? as f64 * (end - start) as f64;
    }
    Ok(total / rows as f64)
}

fn run<B: LocalGroup>(devs: &[B], job: &Job<'_>, cfg: TrainConfig) -> tessera::Result<()> {
    let a = job.a;
    let model = job.gpt.model::<B>()?;
    let info = model.info()?;
    let (plan, why, _) = make_plan(devs, &a.mesh, &info, &cfg, job.batch, None, devs.len())?;
    if !a.json && devs.len() > 1 {
        errln!("plan: {} ({why})", plan.describe());
    }
    let seed = cfg.seed;
    let mut trainer = Engine::new(devs, &model, cfg, plan)?;
    let every = a.eval_every.unwrap_or(250);
    let pb = if a.json { ProgressBar::hidden() } else { ProgressBar::new(job.steps) };
    pb.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  loss {msg}  [{elapsed_precise}<{eta_precise}]")
            .unwrap(),
    );
    let t0 = Instant::now();
    let mut evals: Vec<(u64, f64)> = Vec::new();
    let mut last_loss = f32::NAN;
    for step in 0..job.steps {
        let (x, y) = job.text.train_batch(seed, step, job.batch, job.gpt.t)?;
        let done = step + 1;
        let s = trainer.train_step_reading(&x, &y, done % a.loss_every == 0 || done == job.steps)?;
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
        if done % every == 0 || done == job.steps {
            let v = val_loss(&devs[0], job, &trainer.flat_params()?)?;
            evals.push((done, v));
            if !a.json {
                pb.suspend(|| {
                    outln!(
                        "step {done:>6}: train loss {last_loss:.4}, validation loss {v:.4} ({:.1} s)",
                        t0.elapsed().as_secs_f64()
                    )
                });
            }
        }
        if let Some((signal, _)) = interrupt::caught() {
            pb.finish_and_clear();
            errln!("interrupted by {signal} at step {done} of {}", job.steps);
            return Err(Error::Interrupted { signal, step: done });
        }
    }
    pb.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    let (_, val) = *evals.last().expect("the last step evaluates");
    if a.json {
        let j = serde_json::json!({
            "model": "gpt",
            "layers": job.gpt.layers,
            "width": job.gpt.c,
            "heads": job.gpt.heads,
            "context": job.gpt.t,
            "vocab": job.gpt.vocab,
            "steps": job.steps,
            "batch": job.batch,
            "devices": trainer.devices(),
            "plan": trainer.plan().describe(),
            "final_train_loss": last_loss,
            "val_loss": val,
            "val_losses": evals.iter().map(|(s, v)| serde_json::json!({"step": s, "val_loss": v})).collect::<Vec<_>>(),
            "seconds": secs,
            "steps_per_second": job.steps as f64 / secs.max(1e-9),
        });
        outln!("{j}");
    } else {
        outln!(
            "validation loss {val:.4} after {} steps on {} in {secs:.1} s ({:.2} steps/s)",
            job.steps,
            trainer.devices().join(","),
            job.steps as f64 / secs.max(1e-9)
        );
    }
    Ok(())
}
