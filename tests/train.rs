//! Training end to end: accuracy on real digits, exact resumption from a checkpoint, model
//! gradients against finite differences, clear errors for bad input, CPU/GPU agreement, and
//! the researcher example.

mod common;

use common::{tessera, tmp};
use std::path::PathBuf;
use std::process::Command;

use tessera::checkpoint::Checkpoint;
use tessera::data::Dataset;
use tessera::nn::{MlpConfig, Network};
use tessera::reference as r;
use tessera::train::{Cursor, LrSchedule, OptimizerConfig, TrainConfig, Trainer};
use tessera::{Activation, AdamW, Backend, CpuDevice, Sgd};

fn adamw_config(widths: Vec<usize>, act: Activation) -> (MlpConfig, TrainConfig) {
    let cfg = TrainConfig {
        optimizer: OptimizerConfig::AdamW(AdamW::default()),
        schedule: LrSchedule::Constant,
        clip_norm: None,
        seed: 7,
    };
    (MlpConfig::new(widths, act).unwrap(), cfg)
}

#[test]
fn a_few_hundred_steps_learn_the_digits() {
    let dev = CpuDevice::new(0);
    let (train, test) = Dataset::mnist_10k().unwrap();
    let (mlp, cfg) = adamw_config(vec![784, 256, 10], Activation::Relu);
    let mut t = Trainer::new(&dev, &mlp.model(), cfg).unwrap();
    let before = t.evaluate(&test, 1000).unwrap();
    let mut losses = Vec::new();
    t.fit(&train, 128, 300, &mut Cursor::default(), |_, s, _| {
        losses.push(s.loss);
        Ok(())
    })
    .unwrap();
    let after = t.evaluate(&test, 1000).unwrap();
    assert!(before.accuracy() < 0.3, "untrained accuracy {}", before.accuracy());
    assert!(after.accuracy() >= 0.93, "accuracy after 300 steps: {:.4}", after.accuracy());
    assert!(
        losses[..20].iter().sum::<f32>() > 4.0 * losses[280..].iter().sum::<f32>(),
        "loss did not fall: {losses:?}"
    );
}

fn synthetic_run(steps: u64) -> (MlpConfig, TrainConfig, Dataset) {
    let (mlp, mut cfg) = adamw_config(vec![12, 16, 16, 4], Activation::GeluTanh);
    cfg.schedule = LrSchedule::Cosine { warmup: 5, total: steps, min_factor: 0.1 };
    cfg.clip_norm = Some(0.5);
    (mlp, cfg, Dataset::synthetic(300, &[12, 24, 4], 3).unwrap())
}

#[test]
fn resuming_from_a_checkpoint_continues_exactly() {
    let dev = CpuDevice::new(0);
    let (mlp, cfg, data) = synthetic_run(40);
    let model = mlp.model();
    let batch = 32; // 300 rows: a short last batch, and epochs roll over mid-run
    let mut straight = Trainer::new(&dev, &model, cfg.clone()).unwrap();
    straight.fit(&data, batch, 40, &mut Cursor::default(), |_, _, _| Ok(())).unwrap();

    let mut first = Trainer::new(&dev, &model, cfg.clone()).unwrap();
    let mut cursor = Cursor::default();
    first.fit(&data, batch, 17, &mut cursor, |_, _, _| Ok(())).unwrap();
    let info = model.info().unwrap();
    let ck = Checkpoint {
        model: info.name.clone(),
        tensors: Checkpoint::tensors_of(&info),
        config: cfg.clone(),
        batch,
        step: first.steps(),
        cursor,
        params: first.network().download_params(&dev).unwrap(),
        state: first.optimizer_state().unwrap(),
        data: tessera::checkpoint::DataId { name: "synthetic".into(), crc32: 7 },
        vocab: None,
    };
    let ck = Checkpoint::from_bytes("mem", &ck.to_bytes().unwrap()).unwrap();
    ck.check_model(&info).unwrap();
    let net = Network::with_params(&dev, &model, &ck.params).unwrap();
    let mut resumed = Trainer::from_parts(&dev, ck.config.clone(), net, Some(&ck.state), ck.step).unwrap();
    let mut cursor = ck.cursor;
    resumed.fit(&data, batch, 40, &mut cursor, |_, _, _| Ok(())).unwrap();

    assert_eq!(resumed.steps(), 40);
    let a = straight.network().download_params(&dev).unwrap();
    let b = resumed.network().download_params(&dev).unwrap();
    assert_eq!(a, b, "resumed run diverged from the uninterrupted one");
    assert_eq!(straight.optimizer_state().unwrap(), resumed.optimizer_state().unwrap());
}

#[test]
fn the_same_seed_trains_to_the_same_weights_and_another_seed_does_not() {
    let dev = CpuDevice::new(0);
    let (mlp, cfg, data) = synthetic_run(10);
    let run = |seed| {
        let mut t = Trainer::new(&dev, &mlp.model(), TrainConfig { seed, ..cfg.clone() }).unwrap();
        t.fit(&data, 50, 10, &mut Cursor::default(), |_, _, _| Ok(())).unwrap();
        t.network().download_params(&dev).unwrap()
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
}

/// f64 forward of the MLP and its mean cross-entropy, for finite differences.
fn loss_f64(cfg: &MlpConfig, p: &[f64], x: &[f32], y: &[i32]) -> f64 {
    let batch = y.len();
    let mut h: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let info = cfg.info();
    for (i, l) in info.layers.iter().enumerate() {
        let (w, b) = (info.params[l.params[0]].range.clone(), info.params[l.params[1]].range.clone());
        let (fan_in, fan_out) = (l.inputs, l.outputs);
        let mut o = vec![0f64; batch * fan_out];
        for r in 0..batch {
            for j in 0..fan_out {
                let mut s = p[b.start + j];
                for k in 0..fan_in {
                    s += h[r * fan_in + k] * p[w.start + k * fan_out + j];
                }
                o[r * fan_out + j] = if i + 1 < info.depth() { r::act(cfg.act, s) } else { s };
            }
        }
        h = o;
    }
    let c = cfg.outputs();
    (0..batch)
        .map(|rr| {
            let row = &h[rr * c..(rr + 1) * c];
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln() - row[y[rr] as usize]
        })
        .sum::<f64>()
        / batch as f64
}

#[test]
fn model_gradients_match_finite_differences() {
    let dev = CpuDevice::new(0);
    for act in [Activation::Relu, Activation::GeluTanh, Activation::GeluErf, Activation::Silu] {
        let cfg = MlpConfig::new(vec![5, 7, 6, 3], act).unwrap();
        let mut p = cfg.init(11);
        // Non-zero biases, so that their gradients are exercised.
        for bias in cfg.info().params.iter().filter(|q| q.name.ends_with("bias")).map(|q| q.range.clone()) {
            for (k, b) in p[bias].iter_mut().enumerate() {
                *b = 0.1 * (k as f32 - 2.0);
            }
        }
        let data = Dataset::synthetic(9, &[5, 3], 4).unwrap();
        let mut model = Network::with_params(&dev, &cfg.model(), &p).unwrap();
        model.load_batch(&dev, &data.x, &data.y).unwrap();
        model.forward(&dev).unwrap();
        let loss = model.backward(&dev, false).unwrap();
        let g = dev.download(&CpuDevice::view(model.grads())).unwrap();
        let p64: Vec<f64> = p.iter().map(|&v| v as f64).collect();
        let want_loss = loss_f64(&cfg, &p64, &data.x, &data.y);
        assert!((loss as f64 - want_loss).abs() < 1e-5, "{act}: loss {loss} vs {want_loss}");
        for (i, &gi) in g.iter().enumerate() {
            let fd = tessera::check::finite_diff(|q| loss_f64(&cfg, q, &data.x, &data.y), &p64, i, 1e-6);
            assert!((gi as f64 - fd).abs() <= 2e-5 + 1e-3 * fd.abs(), "{act}: d loss / d param[{i}] = {gi} vs fd {fd}");
        }
        // Accumulation adds the same gradient again.
        model.backward(&dev, true).unwrap();
        let g2 = dev.download(&CpuDevice::view(model.grads())).unwrap();
        for (a, b) in g.iter().zip(&g2) {
            assert!((2.0 * a - b).abs() <= 1e-6 * a.abs().max(1.0));
        }
    }
}

#[test]
fn sgd_trains_too() {
    let dev = CpuDevice::new(0);
    let data = Dataset::synthetic(512, &[10, 32, 3], 5).unwrap();
    let (mlp, mut cfg) = adamw_config(vec![10, 32, 3], Activation::Silu);
    cfg.optimizer = OptimizerConfig::Sgd(Sgd { lr: 0.1, momentum: 0.9, weight_decay: 1e-4 });
    let mut t = Trainer::new(&dev, &mlp.model(), cfg).unwrap();
    let before = t.evaluate(&data, 512).unwrap();
    t.fit(&data, 64, 200, &mut Cursor::default(), |_, _, _| Ok(())).unwrap();
    let after = t.evaluate(&data, 512).unwrap();
    assert!(after.loss < 0.5 * before.loss, "{before:?} -> {after:?}");
    assert!(after.accuracy() > 0.85, "{after:?}");
}

/// The CUDA kernels in the simulator take the same first steps as the CPU backend (a small
/// model: the simulator is slow), and `--device sim` trains from the CLI.
#[test]
fn cpu_and_simulator_take_the_same_first_steps() {
    let cpu = CpuDevice::new(0);
    let (train, _) = Dataset::mnist_10k().unwrap();
    let (mlp, cfg) = adamw_config(vec![784, 48, 10], Activation::GeluTanh);
    let mut a = Trainer::new(&cpu, &mlp.model(), cfg.clone()).unwrap();
    let mut la = Vec::new();
    a.fit(&train, 64, 4, &mut Cursor::default(), |_, s, _| {
        la.push(s.loss);
        Ok(())
    })
    .unwrap();
    let mut runs = Vec::new();
    for order in [tessera::StreamOrder::Immediate, tessera::StreamOrder::Deferred { shuffle: None }] {
        let sim = tessera::SimDevice::group(1, order).remove(0);
        let mut b = Trainer::new(&sim, &mlp.model(), cfg.clone()).unwrap();
        let mut lb = Vec::new();
        b.fit(&train, 64, 4, &mut Cursor::default(), |_, s, _| {
            lb.push(s.loss);
            Ok(())
        })
        .unwrap();
        for (x, y) in la.iter().zip(&lb) {
            assert!((x - y).abs() <= 1e-4 * x.abs(), "cpu {la:?} vs sim ({order}) {lb:?}");
        }
        runs.push((lb, b.network().download_params(&sim).unwrap()));
    }
    assert_eq!(runs[0], runs[1], "deferred work must give the same bits as immediate");
    let (ok, out, err) = common::tessera(&["train", "--device", "sim", "--widths", "784,32,10", "--steps", "3"]);
    assert!(ok, "{err}");
    assert!(err.contains("device: sim:1") || out.contains("device: sim:1"), "{out}{err}");
    // The CLI's simulated devices in deferred mode, with a pipeline (events between stages).
    let (ok, out, err) = common::tessera_env(
        &["train", "--device", "sim:2", "--pp", "2", "--widths", "784,32,16,10", "--steps", "2"],
        &[("TESSERA_SIM_STREAMS", "deferred:3")],
    );
    assert!(ok, "{err}");
    assert!(format!("{out}{err}").contains("streams deferred:3"), "{out}{err}");
    let (ok, _, err) =
        common::tessera_env(&["train", "--device", "sim", "--steps", "1"], &[("TESSERA_SIM_STREAMS", "later")]);
    assert!(!ok && err.contains("TESSERA_SIM_STREAMS=later: use immediate, deferred"), "{err}");
}

#[test]
fn cpu_and_gpu_take_the_same_first_steps() {
    let Some(gpu) = tessera::check::gpu_or_skip("training on the GPU") else { return };
    let cpu = CpuDevice::new(0);
    let (train, test) = Dataset::mnist_10k().unwrap();
    let (mlp, cfg) = adamw_config(vec![784, 512, 512, 10], Activation::Relu);
    let mut a = Trainer::new(&cpu, &mlp.model(), cfg.clone()).unwrap();
    let mut b = Trainer::new(&gpu, &mlp.model(), cfg).unwrap();
    let (mut la, mut lb) = (Vec::new(), Vec::new());
    a.fit(&train, 128, 5, &mut Cursor::default(), |_, s, _| {
        la.push(s.loss);
        Ok(())
    })
    .unwrap();
    b.fit(&train, 128, 5, &mut Cursor::default(), |_, s, _| {
        lb.push(s.loss);
        Ok(())
    })
    .unwrap();
    for (x, y) in la.iter().zip(&lb) {
        assert!((x - y).abs() <= 1e-4 * x.abs(), "cpu {la:?} vs cuda {lb:?}");
    }
    // And the GPU run trains to the same accuracy.
    b.fit(&train, 128, 945, &mut Cursor { epoch: 0, batch: 5 }, |_, _, _| Ok(())).unwrap();
    let acc = b.evaluate(&test, 1000).unwrap().accuracy();
    assert!(acc >= 0.96, "cuda accuracy {acc}");
}

#[test]
fn cli_save_and_resume_match_an_uninterrupted_run() {
    let (a, b, c) = (tmp("a.safetensors"), tmp("b.safetensors"), tmp("c.safetensors"));
    let common = [
        "train",
        "--device",
        "cpu",
        "--widths",
        "784,64,10",
        "--batch",
        "100",
        "--lr-schedule",
        "cosine",
        "--clip",
        "1",
    ];
    let run = |extra: &[&str]| {
        let mut args = common.to_vec();
        args.extend_from_slice(extra);
        let (ok, out, err) = tessera(&args);
        assert!(ok, "{err}");
        out
    };
    let out = run(&["--steps", "30", "--save", a.to_str().unwrap(), "--json"]);
    let j: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(j["steps"], 30);
    assert!(j["test_accuracy"].as_f64().unwrap() > 0.5, "{j}");
    assert_eq!(j["test_total"], 2000);
    // The same 30-step run (its cosine schedule spans 30 steps), stopped after 12 and resumed.
    let out = run(&["--steps", "30", "--stop-at", "12", "--save", b.to_str().unwrap(), "--json"]);
    let j: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(j["steps"], 12);
    let (ok, _, err) = tessera(&[
        "train",
        "--device",
        "cpu",
        "--resume",
        b.to_str().unwrap(),
        "--steps",
        "30",
        "--save",
        c.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let ca = Checkpoint::load(&a).unwrap();
    let cc = Checkpoint::load(&c).unwrap();
    assert_eq!(cc.step, 30);
    assert_eq!(ca.params, cc.params);
}

/// `tessera train --device cpu ARGS --save path`, which must succeed.
fn saved_run(args: &[&str], path: &std::path::Path) {
    let mut a = vec!["train", "--device", "cpu"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["--save", path.to_str().unwrap()]);
    let (ok, _, err) = tessera(&a);
    assert!(ok, "{args:?}: {err}");
}

#[test]
fn cli_refuses_bad_input_in_plain_words() {
    let bad = tmp("bad.safetensors");
    std::fs::write(&bad, b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":").unwrap();
    let (ok, _, err) = tessera(&["train", "--device", "cpu", "--resume", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("bad.safetensors: not a readable safetensors file"), "{err}");

    let (ok, _, err) = tessera(&["train", "--device", "cpu", "--widths", "784,abc,10"]);
    assert!(!ok);
    assert!(err.contains("width list `784,abc,10`: `abc` is not a whole number"), "{err}");

    let (ok, _, err) = tessera(&["train", "--device", "cpu", "--widths", "100,10"]);
    assert!(!ok);
    assert!(err.contains("the data has 784 features") && err.contains("--widths 784"), "{err}");

    let (ok, _, err) = tessera(&["train", "--device", "cpu", "--widths", "784"]);
    assert!(!ok);
    assert!(err.contains("at least an input and an output width"), "{err}");

    let (ok, _, err) = tessera(&["train", "--device", "cpu", "--data", "/nonexistent-dir"]);
    assert!(!ok);
    assert!(err.contains("/nonexistent-dir: does not exist") && err.contains("MNIST IDX files"), "{err}");

    let good = tmp("good.safetensors");
    saved_run(&["--widths", "784,32,10", "--steps", "2"], &good);
    let (ok, _, err) =
        tessera(&["train", "--device", "cpu", "--resume", good.to_str().unwrap(), "--widths", "784,64,10"]);
    assert!(!ok);
    assert!(err.contains("--widths (checkpoint: 784-32-10)"), "{err}");
}

/// Flags that would train wrongly, or be silently ignored, are refused before any training;
/// so are the settings of a resumed run that are not its own, and outputs that cannot be
/// written.
#[test]
fn cli_refuses_settings_that_would_mislead() {
    let refused = |args: &[&str], want: &str| {
        let mut a = vec!["train", "--steps", "2"];
        for (flag, default) in [("--device", "cpu"), ("--widths", "784,16,10")] {
            if !args.contains(&flag) {
                a.extend_from_slice(&[flag, default]);
            }
        }
        a.extend_from_slice(args);
        let (ok, out, err) = tessera(&a);
        assert!(!ok, "{args:?} was accepted: {out}");
        assert!(err.contains(want), "{args:?}: expected `{want}` in:\n{err}");
        assert!(!err.contains("panicked"), "{err}");
    };
    refused(&["--clip", "0"], "--clip) 0: must be a positive number");
    refused(&["--clip=-1"], "--clip) -1: must be a positive number");
    refused(&["--momentum", "0.5"], "--momentum is for --optimizer sgd");
    refused(&["--warmup", "3"], "--warmup is the warm-up of --lr-schedule cosine");
    refused(&["--widths", "784,-3,10"], "`-3` is not a whole number");
    refused(&["--widths", "784,+3,10"], "`+3` is not a whole number");
    refused(&["--widths", "784,,10"], "an empty item");
    refused(&["--device", "cpu:2", "--dp", "0"], "'--dp <DP>': must be at least 1");
    refused(&["--save", "/nonexistent-dir/x.safetensors"], "--save /nonexistent-dir/x.safetensors: the directory");
    refused(&["--resume", "/nonexistent-dir/x.safetensors"], "--resume: /nonexistent-dir/x.safetensors");

    // A cosine run stopped at step 4 of 10: its length and settings are its own.
    let half = tmp("cosine-4-of-10.safetensors");
    saved_run(&["--widths", "784,16,10", "--steps", "10", "--stop-at", "4", "--lr-schedule", "cosine"], &half);
    let resumed = |args: &[&str]| {
        let mut a = vec!["train", "--device", "cpu", "--resume", half.to_str().unwrap(), "--json"];
        a.extend_from_slice(args);
        tessera(&a)
    };
    let (ok, _, err) = resumed(&["--steps", "20"]);
    assert!(!ok && err.contains("--steps 20: its run's cosine schedule ends at step 10"), "{err}");
    let (ok, _, err) = resumed(&["--epochs", "3"]);
    assert!(!ok && err.contains("--epochs 3 (189 steps): its run's cosine schedule ends at step 10"), "{err}");
    let (ok, _, err) = resumed(&["--clip", "0.5", "--weight-decay", "0.5", "--warmup", "3", "--momentum", "0.1"]);
    assert!(!ok, "{err}");
    for flag in ["--clip (checkpoint: no clipping)", "--weight-decay (checkpoint: 0.01)", "--warmup", "--momentum"] {
        assert!(err.contains(flag), "{flag} not named:\n{err}");
    }
    let (ok, _, err) = resumed(&["--lr-schedule", "constant"]);
    assert!(!ok && err.contains("--lr-schedule (checkpoint: cosine"), "{err}");
    // Left out, the run ends where its schedule does.
    let (ok, out, err) = resumed(&[]);
    assert!(ok, "{err}");
    let j: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!((j["steps"].as_u64(), j["steps_this_run"].as_u64()), (Some(10), Some(6)), "{j}");
    // And a run cannot be resumed backwards.
    let (ok, _, err) = tessera(&["train", "--device", "cpu", "--resume", half.to_str().unwrap(), "--steps", "10"]);
    assert!(ok, "{err}");
    let const4 = tmp("constant-4.safetensors");
    saved_run(&["--widths", "784,16,10", "--steps", "4"], &const4);
    let (ok, _, err) = tessera(&["train", "--device", "cpu", "--resume", const4.to_str().unwrap(), "--steps", "3"]);
    assert!(!ok && err.contains("it is at step 4, past the 3 steps asked for"), "{err}");
}

#[test]
fn the_researcher_example_builds_and_learns() {
    // `cargo test` builds the examples next to the test binaries.
    let exe = std::env::current_exe().unwrap();
    let dir = match std::env::var_os("TESSERA_EXAMPLES_DIR") {
        Some(d) => PathBuf::from(d),
        None => exe.parent().unwrap().parent().unwrap().join("examples"),
    };
    let bin = dir.join(format!("custom_loop{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} was not built: run plain `cargo test` (it builds the examples) or `cargo build --examples` first",
        bin.display()
    );
    let o = Command::new(&bin).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("loss fell from"), "{out}");
}

/// A checkpoint of a model of one's own (not an MLP) is refused by `tessera train --resume`
/// with what it holds and where to load it, and one whose tensors do not match its MLP names
/// the tensor.
#[test]
fn cli_resume_refuses_a_model_it_cannot_build() {
    let (mlp, cfg, _) = synthetic_run(10);
    let info = mlp.info();
    let mut ck = Checkpoint {
        model: "residual 12-24x2-5".into(),
        tensors: Checkpoint::tensors_of(&info),
        config: cfg,
        batch: 32,
        step: 1,
        cursor: Cursor::default(),
        params: mlp.init(1),
        state: vec![vec![0.0; info.param_count()]; 2],
        data: tessera::checkpoint::DataId { name: "x".into(), crc32: 1 },
        vocab: None,
    };
    let p = common::tmp("own-model.safetensors");
    ck.save(&p).unwrap();
    let (ok, _, err) = common::tessera(&["train", "--resume", p.to_str().unwrap(), "--steps", "2"]);
    assert!(
        !ok && err.contains("it holds the model `residual 12-24x2-5`, which `tessera train` cannot build"),
        "{err}"
    );
    // An MLP name whose tensors belong to another MLP.
    ck.model = "MLP 12-16-4 (gelu-tanh)".into();
    ck.save(&p).unwrap();
    let (ok, _, err) = common::tessera(&["train", "--resume", p.to_str().unwrap(), "--steps", "2"]);
    assert!(!ok && err.contains("`layers.1.weight` is [16, 16] in the file, [16, 4] in the model"), "{err}");
}

/// `--profile` counts the host work of each step on simulated devices, through the GPU's code
/// path: the counts are deterministic, reported per step in `--json`, and meet the goals of a
/// step that never waits on the host. On one device, a steady-state step (after the first,
/// which allocates the activations) that does not read the loss queues its launches and the
/// batch's two uploads and nothing else: no host synchronisation, no allocation, no download.
/// The step that reads the loss (every --loss-every steps, and the last) downloads the losses
/// since the last read and the device's label check. The same holds with work deferred until
/// waited on (and so checked for races between streams).
#[test]
fn profile_counts_the_host_work_of_a_step_on_simulated_devices() {
    let count = |s: &serde_json::Value, k: &str| s[k].as_u64().unwrap();
    let profile = |device: &[&str], env: &[(&str, &str)]| {
        let mut args =
            vec!["train", "--widths", "784,32,10", "--steps", "6", "--loss-every", "3", "--profile", "--json"];
        args.extend_from_slice(device);
        let (ok, out, err) = common::tessera_env(&args, env);
        assert!(ok, "{err}");
        let j: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
        let steps = j["profile"].as_array().expect("a profile per step").clone();
        assert_eq!(steps.len(), 6, "{j}");
        for k in ["launches", "host_syncs", "allocations", "host_to_device", "device_to_host", "device_to_device"] {
            // Steps 2 and 4 (quiet), 3 and 6 (reading) do the same work; the first allocates.
            assert_eq!(count(&steps[1], k), count(&steps[3], k), "{device:?}: `{k}` differs between quiet steps: {j}");
            assert_eq!(
                count(&steps[2], k),
                count(&steps[5], k),
                "{device:?}: `{k}` differs between reading steps: {j}"
            );
            assert!(count(&steps[0], k) >= count(&steps[1], k), "{device:?}: {k}: {j}");
        }
        assert!(count(&steps[0], "allocations") > count(&steps[1], "allocations"), "the first step allocates: {j}");
        assert!(count(&steps[1], "launches") >= 8, "{j}");
        assert!(j["final_train_loss"].as_f64().unwrap().is_finite(), "{j}");
        steps
    };
    for env in [&[][..], &[("TESSERA_SIM_STREAMS", "deferred:4")][..]] {
        let steps = profile(&["--device", "sim"], env);
        let (quiet, reading) = (&steps[1], &steps[2]);
        for (k, want) in [("host_syncs", 0), ("allocations", 0), ("device_to_host", 0), ("host_to_device", 2)] {
            assert_eq!(count(quiet, k), want, "a quiet step on one device: `{k}` ({env:?}): {steps:?}");
        }
        assert_eq!(count(reading, "allocations"), 0, "{steps:?}");
        assert_eq!(count(reading, "device_to_host"), 2, "the losses and the label check: {steps:?}");
        assert_eq!(count(reading, "host_syncs"), 2, "{steps:?}");
        assert_eq!(count(reading, "launches"), count(quiet, "launches"), "{steps:?}");
    }
    // Two replicas: the quiet steps read nothing back either (the buckets' all-reduce through
    // the host is the waiting that remains).
    let steps = profile(&["--device", "sim:2", "--dp", "2"], &[("TESSERA_SIM_STREAMS", "deferred")]);
    assert_eq!(count(&steps[1], "device_to_host"), 0, "{steps:?}");
    let (ok, _, err) = tessera(&["train", "--widths", "784,32,10", "--steps", "1", "--profile", "--device", "cpu"]);
    assert!(ok && err.contains("run with --device sim"), "{err}");
}

/// A small GPT's data: `seqs` windows of `t` characters of tiny Shakespeare and their next
/// characters, as a model takes them.
fn gpt_batch(seqs: usize, t: usize) -> (tessera::data::TextCorpus, Vec<f32>, Vec<i32>) {
    let text = tessera::data::TextCorpus::tiny_shakespeare().unwrap();
    let (x, y) = text.train_batch(3, 0, seqs, t).unwrap();
    (text, x, y)
}

/// The GPT's layers (embedding, blocks, tied head) give the gradients of their loss: every
/// parameter tensor checked against central differences of the f32 loss at a spread of indices
/// (wte, shared by the embedding and the head, gets both contributions); the parameters carry
/// GPT-2's names.
#[test]
fn gpt_gradients_match_finite_differences() {
    use tessera::nn::GptConfig;
    let dev = CpuDevice::new(0);
    let (text, x, y) = gpt_batch(3, 6);
    let cfg = GptConfig { vocab: text.vocab.len(), t: 6, c: 8, heads: 2, layers: 2 };
    let model = cfg.model::<CpuDevice>().unwrap();
    let info = model.info().unwrap();
    let names: Vec<&str> = info.params.iter().map(|p| p.name.as_str()).collect();
    for want in ["wte", "wpe", "h.0.ln_1.weight", "h.1.attn.c_attn.weight", "h.1.mlp.c_proj.bias", "ln_f.weight"] {
        assert!(names.contains(&want), "{want} not among {names:?}");
    }
    assert_eq!(names.iter().filter(|n| **n == "wte").count(), 1, "one wte, shared by embedding and head");
    let mut p = model.init(5).unwrap();
    // Biases and LayerNorm parameters away from their initial 0 and 1, so that every path counts.
    for q in info.params.iter().filter(|q| q.name.ends_with("bias") || q.name.contains("ln_")) {
        for (k, v) in p[q.range.clone()].iter_mut().enumerate() {
            *v += 0.05 * ((k % 7) as f32 - 3.0);
        }
    }
    let loss_at = |params: &[f32]| -> f64 {
        let mut net = Network::with_params(&dev, &model, params).unwrap();
        net.load_batch(&dev, &x, &y).unwrap();
        net.forward(&dev).unwrap();
        net.loss(&dev).unwrap() as f64
    };
    let mut net = Network::with_params(&dev, &model, &p).unwrap();
    net.load_batch(&dev, &x, &y).unwrap();
    net.forward(&dev).unwrap();
    let loss = net.backward(&dev, false).unwrap();
    assert!((loss as f64 - loss_at(&p)).abs() < 1e-6, "backward's loss is the forward's");
    // Uniform random guessing over 65 characters is ln 65 = 4.17; a fresh model is near it.
    assert!((loss - (text.vocab.len() as f32).ln()).abs() < 0.3, "{loss}");
    let g = dev.download(&CpuDevice::view(net.grads())).unwrap();
    let h = 1e-2f32;
    let mut checked = 0;
    for q in &info.params {
        let len = q.range.len();
        for k in [0, len / 3, len / 2, len - 1] {
            let i = q.range.start + k;
            let (mut up, mut down) = (p.clone(), p.clone());
            up[i] += h;
            down[i] -= h;
            let fd = (loss_at(&up) - loss_at(&down)) / (2.0 * h as f64);
            let gi = g[i] as f64;
            assert!((gi - fd).abs() <= 3e-4 + 2e-2 * fd.abs(), "d loss / d {}[{k}] = {gi} vs fd {fd}", q.name);
            checked += 1;
        }
    }
    assert!(checked >= 4 * 27, "{checked}");
}

/// SGD with momentum 0.9 at `lr`, no schedule or clipping: the oracle's optimizer (no
/// rounding of AdamW's division to amplify differences).
fn sgd_config(lr: f32, seed: u64) -> TrainConfig {
    TrainConfig {
        optimizer: OptimizerConfig::Sgd(Sgd { lr, momentum: 0.9, weight_decay: 0.0 }),
        schedule: LrSchedule::Constant,
        clip_norm: None,
        seed,
    }
}

/// The GPT on the CUDA simulator (the transformer's kernels through the GPU's code path, work
/// deferred until waited on and shuffled) takes the same first steps as on the CPU.
#[test]
fn gpt_runs_in_the_simulator_as_on_the_cpu() {
    use tessera::nn::GptConfig;
    let (text, _, _) = gpt_batch(1, 4);
    let cfg = GptConfig { vocab: text.vocab.len(), t: 8, c: 16, heads: 2, layers: 2 };
    let tc = sgd_config(0.1, 4);
    let batches: Vec<(Vec<f32>, Vec<i32>)> = (0..3).map(|s| text.train_batch(9, s, 4, 8).unwrap()).collect();
    let cpu = CpuDevice::new(0);
    let mut a = Trainer::new(&cpu, &cfg.model().unwrap(), tc.clone()).unwrap();
    let la: Vec<f32> = batches.iter().map(|(x, y)| a.step(x, y).unwrap().loss).collect();
    let sim = tessera::SimDevice::group(1, tessera::StreamOrder::Deferred { shuffle: Some(2) }).remove(0);
    let mut b = Trainer::new(&sim, &cfg.model().unwrap(), tc.clone()).unwrap();
    let lb: Vec<f32> = batches.iter().map(|(x, y)| b.step(x, y).unwrap().loss).collect();
    for (x, y) in la.iter().zip(&lb) {
        assert!((x - y).abs() <= 1e-4 * x.abs(), "cpu {la:?} vs sim {lb:?}");
    }
    // Split over two simulated GPUs by heads (tp 2): the attention kernels on one head each.
    use tessera::parallel::{engine::Engine, Plan, ScheduleKind};
    let model = cfg.model().unwrap();
    let plan = Plan::new(&model.info().unwrap(), 1, 1, 1, ScheduleKind::GPipe).unwrap().with_tp(2).unwrap();
    let sims = tessera::SimDevice::group(2, tessera::StreamOrder::Deferred { shuffle: Some(5) });
    let mut c = Engine::new(&sims, &model, tc, plan).unwrap();
    let lc: Vec<f32> = batches.iter().map(|(x, y)| c.step(x, y).unwrap().loss).collect();
    for (x, y) in la.iter().zip(&lc) {
        assert!((x - y).abs() <= 1e-4 * x.abs(), "cpu {la:?} vs sim tp 2 {lc:?}");
    }
}

/// AdamW decays the GPT's matrices only: the stage layout's undecayed ranges are exactly its
/// biases and LayerNorm parameters, and the masked update equals AdamW without decay there and
/// with it elsewhere. An MLP (every parameter decayed) updates as one call did.
#[test]
fn weight_decay_skips_what_the_model_marks() {
    use tessera::nn::GptConfig;
    use tessera::train::{apply_optimizer, apply_optimizer_masked};
    let dev = CpuDevice::new(0);
    let cfg = GptConfig { vocab: 11, t: 4, c: 8, heads: 2, layers: 2 };
    let model = cfg.model::<CpuDevice>().unwrap();
    let info = model.info().unwrap();
    let layout = info.stage_layout(0..info.depth());
    let mut want: Vec<std::ops::Range<usize>> = Vec::new();
    for (k, &p) in layout.params.iter().enumerate() {
        let name = &info.params[p].name;
        if name.ends_with("bias") || name.contains("ln_") {
            let r = layout.local[k].clone();
            match want.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => want.push(r),
            }
        }
    }
    assert_eq!(layout.no_decay, want);
    assert!(layout.no_decay.len() >= 8, "{:?}", layout.no_decay);
    let n = layout.len;
    let (w0, g) = (tessera::check::inputs(1, n, 1.0), tessera::check::inputs(2, n, 1.0));
    let adamw = |wd: f32| OptimizerConfig::AdamW(AdamW { lr: 0.01, weight_decay: wd, ..AdamW::default() });
    let step = |opt: &OptimizerConfig, mask: &[std::ops::Range<usize>]| {
        let mut w = w0.clone();
        let mut state = vec![vec![0f32; n], vec![0f32; n]];
        apply_optimizer_masked(&dev, opt, 0.01, 1, 1.0, &mut w, &g, &mut state, mask).unwrap();
        w
    };
    let masked = step(&adamw(0.1), &layout.no_decay);
    let (all, none) = (step(&adamw(0.1), &[]), step(&adamw(0.0), &[]));
    for i in 0..n {
        let skipped = layout.no_decay.iter().any(|r| r.contains(&i));
        assert_eq!(masked[i], if skipped { none[i] } else { all[i] }, "parameter {i} (skipped: {skipped})");
    }
    assert_ne!(all, none);
    // Every parameter decayed: the same bits as the single call.
    let mut w = w0.clone();
    let mut state = vec![vec![0f32; n], vec![0f32; n]];
    apply_optimizer(&dev, &adamw(0.1), 0.01, 1, 1.0, &mut w, &g, &mut state).unwrap();
    assert_eq!(w, all);
    let bad = apply_optimizer_masked(&dev, &adamw(0.1), 0.01, 1, 1.0, &mut w, &g, &mut state, &[5..9, 2..3]);
    assert!(bad.unwrap_err().to_string().contains("sorted"));
}

/// `tessera train --model gpt`: a small GPT trains on the vendored text, on one device, in
/// pipeline stages and on simulated devices (deferred streams), printing the validation loss
/// at intervals; flags of the MLP, and GPT flags without --model gpt, are refused.
#[test]
fn cli_trains_a_gpt_and_reports_the_validation_loss() {
    let small = ["train", "--model", "gpt", "--width", "32", "--heads", "2", "--layers", "2", "--context", "16"];
    let run = |extra: &[&str], env: &[(&str, &str)]| {
        let mut args = small.to_vec();
        args.extend_from_slice(extra);
        args.push("--json");
        let (ok, out, err) = common::tessera_env(&args, env);
        assert!(ok, "{err}");
        serde_json::from_str::<serde_json::Value>(out.lines().last().unwrap()).unwrap()
    };
    let j = run(&["--steps", "20", "--eval-every", "10"], &[]);
    let vals = j["val_losses"].as_array().unwrap();
    assert_eq!(vals.len(), 2, "{j}");
    let (first, last) = (vals[0]["val_loss"].as_f64().unwrap(), vals[1]["val_loss"].as_f64().unwrap());
    assert!(last < first && last < (65f64).ln(), "the validation loss falls: {j}");
    // Two pipeline stages and two replicas give the one-device run's losses (SGD: no rounding
    // of AdamW's division to amplify).
    let one = run(&["--steps", "4", "--optimizer", "sgd", "--lr", "0.1"], &[]);
    let pp =
        run(&["--steps", "4", "--optimizer", "sgd", "--lr", "0.1", "--device", "cpu:4", "--pp", "2", "--dp", "2"], &[]);
    let (a, b) = (one["val_loss"].as_f64().unwrap(), pp["val_loss"].as_f64().unwrap());
    assert!((a - b).abs() < 1e-4 * a, "{one} vs {pp}");
    let sim = run(
        &["--steps", "2", "--device", "sim", "--batch", "2", "--val-windows", "4"],
        &[("TESSERA_SIM_STREAMS", "deferred:5")],
    );
    assert!(sim["val_loss"].as_f64().unwrap().is_finite(), "{sim}");
    for (args, want) in [
        (&["train", "--model", "gpt", "--widths", "3,4"][..], "--widths shapes an MLP"),
        (&["train", "--model", "gpt", "--epochs", "2"][..], "--epochs counts passes over images"),
        (&["train", "--model", "gpt", "--width", "130", "--heads", "4"][..], "width 130 must split into 4 heads"),
        (&["train", "--heads", "4"][..], "--heads is a GPT's flag: add --model gpt"),
        (&["train", "--model", "gpt", "--momentum", "0.5"][..], "--momentum is for --optimizer sgd"),
        (&["train", "--model", "gpt", "--batch", "0"][..], "--batch 0: a batch holds at least 1"),
    ] {
        let (ok, _, err) = tessera(args);
        assert!(!ok && err.contains(want), "{args:?}: {err}");
    }
}

/// The oracle grid on the GPT: every mesh of dp in {1, 2} x pp in {1, 2, 4} x microbatches in
/// {1, 4} x {GPipe, 1F1B} (the tied wte on the first and last stage when split), and at dp 2
/// with ZeRO 1 too, takes 5 SGD steps to the weights of one device, within 1e-5 relative.
#[test]
fn gpt_oracle_grid_matches_one_device() {
    use tessera::nn::GptConfig;
    use tessera::parallel::engine::Engine;
    use tessera::parallel::{Plan, ScheduleKind};
    let (text, _, _) = gpt_batch(1, 4);
    // Embedding, 4 blocks and the head: 6 layers, so 4 stages exist.
    let cfg = GptConfig { vocab: text.vocab.len(), t: 8, c: 16, heads: 2, layers: 4 };
    let tc = sgd_config(0.2, 11);
    let batches: Vec<(Vec<f32>, Vec<i32>)> = (0..5).map(|s| text.train_batch(2, s, 8, 8).unwrap()).collect();
    let cpu = CpuDevice::new(0);
    let model = cfg.model::<CpuDevice>().unwrap();
    let mut one = Trainer::new(&cpu, &model, tc.clone()).unwrap();
    for (x, y) in &batches {
        one.step(x, y).unwrap();
    }
    let want = one.network().download_params(&cpu).unwrap();
    let w0 = model.init(tc.seed).unwrap();
    let moved = want.iter().zip(&w0).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(moved > 1e-3, "the steps move the weights ({moved})");
    let info = model.info().unwrap();
    let cpus: Vec<CpuDevice> = (0..8).map(CpuDevice::new).collect();
    let mut runs = 0;
    for (dp, zero) in [(1, 0), (2, 0), (2, 1)] {
        for pp in [1, 2, 4] {
            for m in [1, 4] {
                for kind in [ScheduleKind::GPipe, ScheduleKind::OneFOneB] {
                    let plan = Plan::new(&info, dp, pp, m, kind).unwrap().with_zero(zero).unwrap();
                    let desc = plan.describe();
                    let mut e = Engine::new(&cpus[..dp * pp], &model, tc.clone(), plan).unwrap();
                    for (x, y) in &batches {
                        e.step(x, y).unwrap();
                    }
                    let got = e.params().unwrap();
                    let num: f64 = got.iter().zip(&want).map(|(g, w)| ((g - w) as f64).powi(2)).sum();
                    let den: f64 = want.iter().map(|w| (*w as f64).powi(2)).sum();
                    let err = (num / den).sqrt();
                    assert!(err <= 1e-5, "{desc}: relative difference {err:e}");
                    assert!(e.replicas_identical().unwrap(), "{desc}");
                    runs += 1;
                }
            }
        }
    }
    assert_eq!(runs, 36);
}

/// A GPT's shape, parameter names and shapes, flat parameters, and one window (inputs, ids).
type GptCase = (tessera::nn::GptConfig, Vec<(String, Vec<usize>)>, Vec<f32>, Vec<f32>, Vec<i32>);

/// A small GPT with its parameters moved off their initial values (biases and LayerNorms too).
fn trained_gpt() -> GptCase {
    use tessera::nn::GptConfig;
    let (text, x, _) = gpt_batch(1, 8);
    let cfg = GptConfig { vocab: text.vocab.len(), t: 8, c: 16, heads: 2, layers: 2 };
    let model = cfg.model::<CpuDevice>().unwrap();
    let info = model.info().unwrap();
    let mut p = model.init(3).unwrap();
    let mut rng = tessera::rng::Rng::new(8);
    p.iter_mut().for_each(|v| *v += 0.1 * rng.normal());
    let ids: Vec<i32> = x.iter().map(|v| *v as i32).collect();
    (cfg, Checkpoint::tensors_of(&info), p, x, ids)
}

/// The host decoder with its key/value cache gives the logits of the model's forward pass on
/// the CPU backend at every position; after a reset it starts again at position 0; a full
/// cache and a token outside the vocabulary are refused.
#[test]
fn gpt_decoder_matches_the_model_forward() {
    use tessera::nn::GptDecoder;
    let (cfg, tensors, p, x, ids) = trained_gpt();
    let dev = CpuDevice::new(0);
    let mut net = Network::with_params(&dev, &cfg.model::<CpuDevice>().unwrap(), &p).unwrap();
    net.load_batch(&dev, &x, &ids).unwrap();
    net.forward(&dev).unwrap();
    let want = net.logits(&dev).unwrap();
    let mut dec = GptDecoder::new(cfg, &tensors, &p).unwrap();
    for round in 0..2 {
        dec.reset();
        for (i, &id) in ids.iter().enumerate() {
            let got = dec.feed(id as u32).unwrap().to_vec();
            let row = &want[i * cfg.vocab..][..cfg.vocab];
            for (k, (g, w)) in got.iter().zip(row).enumerate() {
                assert!((g - w).abs() <= 1e-4 + 1e-4 * w.abs(), "round {round} position {i} logit {k}: {g} vs {w}");
            }
        }
    }
    assert_eq!(dec.len(), cfg.t);
    assert!(dec.feed(0).unwrap_err().to_string().contains("context of 8 positions is full"));
    dec.reset();
    assert!(dec.feed(cfg.vocab as u32).unwrap_err().to_string().contains("outside the vocabulary"));
    // Parameters of another shape are named.
    let mut other = tensors.clone();
    other[0].1 = vec![cfg.vocab + 1, cfg.c];
    let e = GptDecoder::new(cfg, &other, &vec![0.0; p.len() + cfg.c]).err().unwrap().to_string();
    assert!(e.contains("`wte`"), "{e}");
}

/// Sampling: temperature 0 and top-k 1 take the likeliest token; temperature 1 draws by the
/// softmax's probabilities; the same seed writes the same tokens; the generator shifts its
/// context past the model's and keeps writing.
#[test]
fn gpt_sampling_draws_from_the_softmax() {
    use tessera::nn::decode::sample_logits;
    use tessera::nn::GptDecoder;
    use tessera::rng::Rng;
    let mut rng = Rng::new(1);
    let logits = [0.0f32, 3f32.ln(), -1.0, 0.5];
    assert_eq!(sample_logits(&logits, 0.0, None, &mut rng), 1);
    assert_eq!(sample_logits(&logits, 5.0, Some(1), &mut rng), 1);
    let (n, mut hits) = (20_000, [0usize; 4]);
    for _ in 0..n {
        hits[sample_logits(&logits, 1.0, Some(2), &mut rng) as usize] += 1;
    }
    // Top 2: ids 1 and 3 with weights 3 and e^0.5.
    let p1 = 3.0 / (3.0 + 0.5f64.exp());
    assert_eq!(hits[0] + hits[2], 0, "{hits:?}");
    assert!((hits[1] as f64 / n as f64 - p1).abs() < 0.015, "{hits:?} vs p = {p1}");
    let (cfg, tensors, p, _, ids) = trained_gpt();
    let mut dec = GptDecoder::new(cfg, &tensors, &p).unwrap();
    let prompt: Vec<u32> = ids[..3].iter().map(|&i| i as u32).collect();
    let mut write = |tokens: usize, temperature: f32, seed: u64| {
        let mut out = Vec::new();
        let n = dec
            .generate(&prompt, tokens, temperature, None, &mut Rng::new(seed), |t| {
                out.push(t);
                true
            })
            .unwrap();
        assert_eq!(n, out.len());
        out
    };
    let (a, b) = (write(30, 0.8, 5), write(30, 0.8, 5));
    assert_eq!(a.len(), 30);
    assert_eq!(a, b, "same seed, same text");
    assert!(a.iter().all(|&t| (t as usize) < cfg.vocab));
    // Greedy past the context: after the shift, each token is the argmax of a forward pass
    // over the tokens since the restart.
    let g = write(12, 0.0, 0);
    // A reader that stops after 4 tokens stops the writing there.
    let mut taken = 0;
    let n = dec.generate(&prompt, 100, 1.0, None, &mut rng, |_| {
        taken += 1;
        taken < 4
    });
    assert_eq!((n.unwrap(), taken), (4, 4));
    let mut all = prompt.clone();
    all.extend(&g);
    // Positions: the prompt and tokens up to the context; then restart from the last t/2.
    let t = cfg.t;
    let restart = t; // the first shift happens once t tokens are in the cache
    let window = &all[restart - t / 2 + 1..restart + 1];
    let mut check = GptDecoder::new(cfg, &tensors, &p).unwrap();
    let mut last = Vec::new();
    for &w in window {
        last = check.feed(w).unwrap().to_vec();
    }
    let argmax = last.iter().enumerate().fold(0, |b, (i, v)| if *v > last[b] { i } else { b });
    assert_eq!(argmax as u32, all[restart + 1], "the token after the shift: {all:?}");
    assert!(dec.generate(&[], 3, 1.0, None, &mut rng, |_| true).unwrap_err().to_string().contains("empty"));
    let long = vec![0u32; t + 1];
    assert!(dec.generate(&long, 3, 1.0, None, &mut rng, |_| true).unwrap_err().to_string().contains("longer than"));
    let e = dec.generate(&prompt, 3, -1.0, None, &mut rng, |_| true).unwrap_err().to_string();
    assert!(e.contains("temperature"), "{e}");
}

/// `tessera train --model gpt --save` and `--resume`: a run stopped at step 3 and resumed
/// ends with the weights of the uninterrupted run; the checkpoint carries GPT-2's names, the
/// model's shape and its vocabulary; flags that contradict it, and the wrong model kind, are
/// refused. `tessera sample` writes text from it, and refuses bad input with the reason.
#[test]
fn cli_gpt_checkpoints_resume_and_sample() {
    let small = ["train", "--model", "gpt", "--width", "32", "--heads", "2", "--layers", "2", "--context", "16"];
    let run = |extra: &[&str]| {
        let mut args = small.to_vec();
        args.extend_from_slice(extra);
        let (ok, out, err) = tessera(&args);
        assert!(ok, "{args:?}: {err}");
        (out, err)
    };
    let (straight, first, resumed) = (tmp("gpt-straight.st"), tmp("gpt-first.st"), tmp("gpt-resumed.st"));
    let s = |p: &PathBuf| p.to_str().unwrap().to_string();
    run(&["--steps", "6", "--save", &s(&straight)]);
    let (_, err) = run(&["--steps", "6", "--stop-at", "3", "--save", &s(&first)]);
    assert!(err.contains("continue the run with --resume"), "{err}");
    let c = Checkpoint::load(&first).unwrap();
    assert_eq!(c.step, 3);
    assert_eq!(c.model, "GPT 2 layers, width 32, 2 heads, context 16, vocabulary 65");
    assert_eq!(c.vocab.as_deref().map(|v| v.chars().count()), Some(65));
    let names: Vec<&str> = c.tensors.iter().map(|t| t.0.as_str()).collect();
    for want in ["wte", "wpe", "h.0.ln_1.weight", "h.0.attn.c_attn.weight", "h.1.mlp.c_proj.bias", "ln_f.bias"] {
        assert!(names.contains(&want), "{want} not in {names:?}");
    }
    // Resumed with the flags left out: the run's own settings.
    let (ok, _, err) = tessera(&["train", "--model", "gpt", "--resume", &s(&first), "--save", &s(&resumed)]);
    assert!(ok, "{err}");
    let (a, b) = (Checkpoint::load(&straight).unwrap(), Checkpoint::load(&resumed).unwrap());
    assert_eq!(b.step, 6);
    assert_eq!(a.params, b.params, "resumed = uninterrupted, bit for bit");
    assert_eq!(a.state, b.state);
    for (args, want) in [
        (vec!["train", "--model", "gpt", "--resume", &s(&first), "--width", "64"], "--width (checkpoint: 32)"),
        (vec!["train", "--model", "gpt", "--resume", &s(&first), "--steps", "9"], "cosine schedule ends at step 6"),
        (vec!["train", "--resume", &s(&first)], "resume it with --model gpt"),
        (vec!["train", "--model", "gpt", "--resume", &s(&first), "--stop-at", "2"], "resumed at step 3"),
        (
            vec!["train", "--model", "gpt", "--width", "4294967296", "--heads", "16777216", "--layers", "1"],
            "more parameters than memory can address",
        ),
        (vec!["train", "--model", "gpt", "--eval-every", "0"], "'0' for '--eval-every"),
    ] {
        let (ok, _, err) = tessera(&args);
        assert!(!ok && err.contains(want), "{args:?}: {err}");
    }
    // The timeline of a pipelined run, and the host work of simulated steps.
    let svg = tmp("gpt-timeline.svg");
    run(&["--steps", "2", "--device", "cpu:2", "--pp", "2", "--microbatches", "2", "--timeline", &s(&svg)]);
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
    let (out, _) =
        run(&["--steps", "2", "--device", "sim", "--batch", "2", "--val-windows", "2", "--profile", "--json"]);
    let j: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(j["profile"].as_array().map(|a| a.len()), Some(2), "{j}");
    assert!(j["profile"][1]["launches"].as_u64().unwrap() > 20, "{j}");
    // Other text: refused, naming the data.
    let other = tmp("other.txt");
    std::fs::write(&other, "to be or not to be, that is the question: ".repeat(50)).unwrap();
    let (ok, _, err) = tessera(&["train", "--model", "gpt", "--resume", &s(&first), "--data", &s(&other)]);
    assert!(!ok && err.contains("it was trained on tinyshakespeare"), "{err}");

    // Sampling.
    let (ok, out, err) =
        tessera(&["sample", "--checkpoint", &s(&resumed), "--prompt", "ROMEO:", "--tokens", "40", "--seed", "1"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("ROMEO:") && out.trim_end().chars().count() <= 46, "{out}");
    assert!(err.contains("40 tokens in"), "{err}");
    let resumed_path = s(&resumed);
    let json = |args: &[&str]| {
        let mut v = vec!["sample", "--checkpoint", resumed_path.as_str(), "--json"];
        v.extend_from_slice(args);
        let (ok, out, err) = tessera(&v);
        assert!(ok, "{err}");
        serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()
    };
    let (j1, j2) = (json(&["--tokens", "100", "--seed", "3"]), json(&["--tokens", "100", "--seed", "3"]));
    assert_eq!(j1["text"], j2["text"], "same seed, same text");
    assert_eq!(j1["tokens"], 100);
    assert_eq!(j1["text"].as_str().unwrap().chars().count(), 100);
    let mlp = tmp("mlp-for-sample.st");
    let (ok, _, err) = tessera(&["train", "--widths", "784,8,10", "--steps", "1", "--save", &s(&mlp)]);
    assert!(ok, "{err}");
    let corrupt = tmp("corrupt.st");
    std::fs::write(&corrupt, b"not a checkpoint").unwrap();
    for (args, want) in [
        (vec!["--checkpoint", &s(&mlp)], "an image classifier"),
        (
            vec!["--checkpoint", &s(&resumed), "--prompt", "caf\u{e9}"],
            "'\u{e9}' (at 3) is not in the model's vocabulary",
        ),
        (vec!["--checkpoint", &s(&resumed), "--prompt", &"a".repeat(17)], "longer than the model's context of 16"),
        (vec!["--checkpoint", &s(&resumed), "--prompt", ""], "--prompt is empty"),
        (vec!["--checkpoint", &s(&resumed), "--temperature", "-1"], "temperature -1"),
        (vec!["--checkpoint", &s(&resumed), "--top-k", "0"], "top-k 0"),
        (vec!["--checkpoint", &s(&corrupt)], "not a readable safetensors file"),
        (vec!["--checkpoint", "/nonexistent/gpt.st"], "/nonexistent/gpt.st"),
    ] {
        let mut v = vec!["sample"];
        v.extend_from_slice(&args);
        let (ok, _, err) = tessera(&v);
        assert!(!ok && err.contains(want), "{args:?}: {err}");
    }
}

/// Tensor parallelism on the GPT (attention split by heads, the MLP by columns then rows, the
/// embedding, the tied head and the cross-entropy split by vocabulary: tiny Shakespeare's 65
/// characters unevenly, 33 + 32 and 17 + 16 + 16 + 16): the grid dp in {1, 2} x pp in {1, 2} x tp in {1, 2,
/// 4} x zero in {0, 1} takes 5 SGD steps to one device's weights within 1e-5, and 5 AdamW
/// steps with clipping on a few of its meshes within 1e-4.
#[test]
fn gpt_tensor_parallel_grid_matches_one_device() {
    use tessera::nn::GptConfig;
    use tessera::parallel::engine::Engine;
    use tessera::parallel::{Plan, ScheduleKind};
    let (text, _, _) = gpt_batch(1, 4);
    let cfg = GptConfig { vocab: text.vocab.len(), t: 8, c: 16, heads: 4, layers: 2 };
    assert_eq!(cfg.vocab, 65, "a vocabulary no tp divides");
    let batches: Vec<(Vec<f32>, Vec<i32>)> = (0..5).map(|s| text.train_batch(2, s, 8, 8).unwrap()).collect();
    let cpu = CpuDevice::new(0);
    let model = cfg.model::<CpuDevice>().unwrap();
    let info = model.info().unwrap();
    let cpus: Vec<CpuDevice> = (0..16).map(CpuDevice::new).collect();
    // Each rank holds its rows of the token table: 33 and 32 at tp 2.
    let wte = info.param("wte").unwrap();
    assert_eq!((wte.local_len(2, 0), wte.local_len(2, 1)), (33 * 16, 32 * 16));
    // AdamW with weight decay on the matrices, a warm-up and clipping that bites.
    let adamw = TrainConfig {
        optimizer: OptimizerConfig::AdamW(tessera::AdamW { lr: 1e-2, weight_decay: 0.1, ..Default::default() }),
        schedule: LrSchedule::Cosine { warmup: 2, total: 5, min_factor: 0.1 },
        clip_norm: Some(0.5),
        seed: 11,
    };
    let mut runs = 0;
    for (tc, tol) in [(sgd_config(0.2, 11), 1e-5), (adamw, 1e-4)] {
        let mut one = Trainer::new(&cpu, &model, tc.clone()).unwrap();
        for (x, y) in &batches {
            one.step(x, y).unwrap();
        }
        let want = one.network().download_params(&cpu).unwrap();
        for dp in [1, 2] {
            for pp in [1, 2] {
                for tp in [1, 2, 4] {
                    for zero in [0, 1] {
                        let plan = Plan::new(&info, dp, pp, 2, ScheduleKind::OneFOneB)
                            .unwrap()
                            .with_tp(tp)
                            .unwrap()
                            .with_zero(zero)
                            .unwrap();
                        let desc = plan.describe();
                        let mut e = Engine::new(&cpus[..dp * pp * tp], &model, tc.clone(), plan).unwrap();
                        for (x, y) in &batches {
                            e.step(x, y).unwrap();
                        }
                        let got = e.params().unwrap();
                        let num: f64 = got.iter().zip(&want).map(|(g, w)| ((g - w) as f64).powi(2)).sum();
                        let den: f64 = want.iter().map(|w| (*w as f64).powi(2)).sum();
                        let err = (num / den).sqrt();
                        assert!(err <= tol, "{desc}: relative difference {err:e}");
                        assert!(e.replicas_identical().unwrap(), "{desc}");
                        runs += 1;
                    }
                }
            }
        }
    }
    assert_eq!(runs, 48);
    // A tp that does not divide the heads is refused before anything runs.
    let plan = Plan::new(&info, 1, 1, 1, ScheduleKind::GPipe).unwrap().with_tp(3).unwrap();
    let err = Engine::new(&cpus[..3], &model, sgd_config(0.2, 11), plan).err().unwrap().to_string();
    assert!(err.contains("tp = 3"), "{err}");
}

/// The mesh on the command line: `--device cpu:8 --dp 2 --pp 2 --tp 2 --zero 1` trains
/// the GPT to one device's losses; meshes the model cannot split are refused in plain words.
#[test]
fn cli_gpt_on_a_dp_pp_tp_zero_mesh_trains_like_one_device() {
    let base = ["train", "--model", "gpt", "--steps", "6", "--json", "--val-windows", "20", "--eval-every", "3"];
    let run = |extra: &[&str]| -> serde_json::Value {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        let (ok, out, err) = tessera(&a);
        assert!(ok, "{extra:?}: {err}");
        serde_json::from_str(out.trim()).unwrap()
    };
    let one = run(&["--device", "cpu"]);
    let mesh = run(&["--device", "cpu:8", "--dp", "2", "--pp", "2", "--tp", "2", "--zero", "1"]);
    assert_eq!(mesh["plan"], "dp=2 x pp=2 x tp=2, 4 microbatches, 1f1b, zero 1, stages [0..3, 3..6]");
    for key in ["final_train_loss", "val_loss"] {
        let (a, b) = (one[key].as_f64().unwrap(), mesh[key].as_f64().unwrap());
        assert!((a - b).abs() <= 1e-4 * a.abs(), "{key}: one device {a}, mesh {b}");
    }
    let curve = |v: &serde_json::Value| -> Vec<f64> {
        v["val_losses"].as_array().unwrap().iter().map(|p| p["val_loss"].as_f64().unwrap()).collect()
    };
    let (a, b) = (curve(&one), curve(&mesh));
    assert_eq!(a.len(), 2);
    assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= 1e-4 * x), "{a:?} against {b:?}");
    for (args, want) in [
        (&["--device", "cpu:8", "--tp", "8"][..], "does not divide the 4 parts of layer 1 (block 0"),
        (&["--device", "cpu:3", "--tp", "3"][..], "tp = 3 does not divide"),
        (&["--device", "cpu:4", "--dp", "1", "--tp", "2"][..], "--dp 1 x --pp 1 x --tp 2 needs 2 devices"),
        (&["--device", "cpu:4", "--tp", "0"][..], "at least 1"),
    ] {
        let mut a = base.to_vec();
        a.extend_from_slice(args);
        let (ok, _, err) = tessera(&a);
        assert!(!ok && err.contains(want), "{args:?}: {err}");
    }
}

/// The bytes each group moves in a step, as the engine counts them (what a ring sends for each
/// collective it issues), are the textbook volumes: for tp, two all-reduces of batch x context
/// x width per block forward and two backward (and one each for the vocabulary-parallel
/// embedding and head, and the cross-entropy's row statistics: the logits never move); for ZeRO 1, a reduce-scatter plus an all-gather,
/// the same as the all-reduce it replaces; between stages, each microbatch's activation and
/// its gradient. And `--profile` prints them.
#[test]
fn bytes_moved_by_each_group_are_the_textbook_volumes() {
    use tessera::nn::GptConfig;
    use tessera::parallel::engine::Engine;
    use tessera::parallel::timeline::Traffic;
    use tessera::parallel::{Plan, ScheduleKind};
    let (text, _, _) = gpt_batch(1, 4);
    let (b, t, c, blocks) = (4usize, 8usize, 16usize, 2usize);
    let cfg = GptConfig { vocab: text.vocab.len(), t, c, heads: 4, layers: blocks };
    let model = cfg.model::<CpuDevice>().unwrap();
    let info = model.info().unwrap();
    let (x, y) = text.train_batch(3, 0, b, t).unwrap();
    let cpus: Vec<CpuDevice> = (0..8).map(CpuDevice::new).collect();
    let sent = |dp: usize, pp: usize, tp: usize, zero: usize| -> Traffic {
        let plan = Plan::new(&info, dp, pp, 2, ScheduleKind::OneFOneB).unwrap().with_tp(tp).unwrap().with_zero(zero);
        let mut e = Engine::new(&cpus[..dp * pp * tp], &model, sgd_config(0.1, 1), plan.unwrap()).unwrap();
        e.step(&x, &y).unwrap();
        e.timeline().unwrap().lanes.iter().fold(Traffic::default(), |a, l| a.add(&l.sent))
    };
    // tp = 2: per block 4 sums of b x t x c floats, and the vocabulary-parallel embedding's
    // output and head's input gradient (b x t x c each), and the cross-entropy's row statistics
    // (b x t x (tp + 1)); each rank sends 2 (2 - 1) / 2 of each.
    let tp = sent(1, 1, 2, 0);
    let sums = ((blocks * 4 + 2) * b * t * c * 4 + b * t * 3 * 4) as f64;
    assert_eq!(tp.tp, 2.0 * Traffic::ring(1, 2, true) * sums, "{tp:?}");
    assert_eq!((tp.dp, tp.pp), (0.0, 0.0));
    // dp = 2: every gradient all-reduced once, 2 (2 - 1) / 2 of it sent by each replica; with
    // ZeRO 1 a reduce-scatter and an all-gather of each layer instead, the same bytes.
    let params = (info.param_count() * 4) as f64;
    let plain = sent(2, 1, 1, 0);
    assert_eq!(plain.dp, 2.0 * Traffic::ring(1, 2, true) * params, "{plain:?}");
    let zero = sent(2, 1, 1, 1);
    assert_eq!(zero.dp, plain.dp, "ZeRO 1 moves what the all-reduce moved");
    assert_eq!(zero.collectives, 2 * plain.collectives, "a reduce-scatter and an all-gather per layer");
    // pp = 2: each of the 2 microbatches' boundary activation forward and its gradient back.
    let pp = sent(1, 2, 1, 0);
    assert_eq!(pp.pp, (2 * b * t * c * 4) as f64, "{pp:?}");
    // The command line prints them.
    let (ok, _, err) = tessera(&[
        "train",
        "--model",
        "gpt",
        "--device",
        "cpu:2",
        "--tp",
        "2",
        "--steps",
        "2",
        "--width",
        "32",
        "--heads",
        "2",
        "--layers",
        "2",
        "--context",
        "16",
        "--profile",
        "--val-windows",
        "4",
    ]);
    assert!(ok, "{err}");
    // 2 blocks x 4 sums of 12 x 16 x 32 floats, the embedding's and the head's (as many), the
    // cross-entropy's statistics (12 x 16 x 3) on each of 2 ranks, plus the clipping norm's
    // exchange (a float per rank, summed over the pair).
    let per_rank = ((2 * 4 + 2) * 12 * 16 * 32 * 4 + 12 * 16 * 3 * 4) as f64;
    let want = per_rank * Traffic::ring(1, 2, true) * 2.0 + 2.0 * Traffic::ring(8, 2, true);
    assert!(err.contains(&format!("tensor-parallel {want:.0}")), "expected {want:.0} bytes: {err}");
}

/// Evaluation through a vocabulary-parallel head: a GPT of context 1 (one label per sample, so
/// a `Dataset` holds it) evaluated on 2 and 4 tensor-parallel ranks gives one device's loss and
/// the same count of correct rows (each rank offers its classes' best, the group agrees).
#[test]
fn a_vocabulary_parallel_head_evaluates_like_one_device() {
    use tessera::nn::GptConfig;
    use tessera::parallel::engine::Engine;
    use tessera::parallel::{Plan, ScheduleKind};
    let (text, _, _) = gpt_batch(1, 4);
    let cfg = GptConfig { vocab: text.vocab.len(), t: 1, c: 16, heads: 4, layers: 1 };
    let (x, y) = text.train_batch(5, 0, 200, 1).unwrap();
    let data = Dataset { x, y, dim: 1, classes: cfg.vocab };
    let model = cfg.model::<CpuDevice>().unwrap();
    let info = model.info().unwrap();
    let cpus: Vec<CpuDevice> = (0..4).map(CpuDevice::new).collect();
    let tc = sgd_config(0.5, 2);
    let mut results = Vec::new();
    for tp in [1, 2, 4] {
        let plan = Plan::new(&info, 1, 1, 1, ScheduleKind::GPipe).unwrap().with_tp(tp).unwrap();
        let mut e = Engine::new(&cpus[..tp], &model, tc.clone(), plan).unwrap();
        for s in 0..20 {
            let (bx, by) = text.train_batch(6, s, 32, 1).unwrap();
            e.step(&bx, &by).unwrap();
        }
        let ev = e.evaluate(&data, 64).unwrap();
        results.push((ev.loss, ev.correct));
    }
    let (l1, c1) = results[0];
    assert!(c1 > 10, "it learned something: {c1} of 200");
    for &(l, c) in &results[1..] {
        assert!((l - l1).abs() <= 1e-4 * l1, "loss {l} vs one device {l1}");
        assert_eq!(c, c1, "correct rows");
    }
}
