//! The oracle: any plan trains to the same weights as one device on the same batches.

mod common;
#[path = "../examples/own_layer.rs"]
#[allow(dead_code)]
mod own_layer;

use common::{tessera, tmp};
use tessera::data::Dataset;
use tessera::nn::{MlpConfig, ModelInfo};
use tessera::parallel::engine::Engine;
use tessera::parallel::{Plan, ScheduleKind};
use tessera::train::{Cursor, LrSchedule, OptimizerConfig, TrainConfig, Trainer};
use tessera::{Activation, AdamW, CpuDevice, Sgd};

const WIDTHS: [usize; 5] = [12, 16, 16, 16, 5];

fn mlp() -> MlpConfig {
    MlpConfig::new(WIDTHS.to_vec(), Activation::GeluTanh).unwrap()
}

fn info() -> ModelInfo {
    mlp().info()
}

fn config(opt: OptimizerConfig) -> TrainConfig {
    TrainConfig { optimizer: opt, schedule: LrSchedule::Constant, clip_norm: None, seed: 5 }
}

fn sgd() -> OptimizerConfig {
    OptimizerConfig::Sgd(Sgd { lr: 0.1, momentum: 0.9, weight_decay: 1e-3 })
}

fn data() -> Dataset {
    Dataset::synthetic(26 * 5, &[12, 20, 5], 9).unwrap()
}

/// The single-device reference: 5 steps of 26 rows (a batch that splits unevenly).
fn reference(cfg: &TrainConfig, steps: u64) -> Vec<f32> {
    let dev = CpuDevice::new(0);
    let mut t = Trainer::new(&dev, &mlp().model(), cfg.clone()).unwrap();
    t.fit(&data(), 26, steps, &mut Cursor::default(), |_, _, _| Ok(())).unwrap();
    t.network().download_params(&dev).unwrap()
}

fn run(cfg: &TrainConfig, plan: Plan, steps: u64) -> (Vec<f32>, Engine<CpuDevice>) {
    let devs: Vec<CpuDevice> = (0..plan.mesh.devices()).map(CpuDevice::new).collect();
    let mut e = Engine::new(&devs, &mlp().model(), cfg.clone(), plan).unwrap();
    tessera::train::fit(&mut e, &data(), 26, steps, &mut Cursor::default(), |_, _, _| Ok(())).unwrap();
    (e.params().unwrap(), e)
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>().sqrt();
    let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
    d / n
}

#[test]
fn every_plan_of_the_grid_matches_one_device() {
    let cfg = config(sgd());
    let want = reference(&cfg, 5);
    let mut worst = 0f64;
    for dp in [1, 2, 4] {
        for pp in [1, 2, 3] {
            for m in [1, 2, 4, 6] {
                for kind in [ScheduleKind::GPipe, ScheduleKind::OneFOneB] {
                    let plan = Plan::new(&info(), dp, pp, m, kind).unwrap();
                    let desc = plan.describe();
                    let (got, e) = run(&cfg, plan, 5);
                    let err = rel_err(&got, &want);
                    worst = worst.max(err);
                    assert!(err <= 1e-5, "{desc}: ||w - w_ref|| / ||w_ref|| = {err:.3e}");
                    assert!(e.replicas_identical().unwrap(), "{desc}: replicas diverged");
                }
            }
        }
    }
    eprintln!("worst relative error over the grid: {worst:.3e}");
}

#[test]
fn adamw_with_clipping_and_a_schedule_matches_on_several_plans() {
    let mut cfg = config(OptimizerConfig::AdamW(AdamW { lr: 1e-2, ..AdamW::default() }));
    cfg.clip_norm = Some(0.3);
    cfg.schedule = LrSchedule::Cosine { warmup: 2, total: 5, min_factor: 0.1 };
    let want = reference(&cfg, 5);
    for (dp, pp, m, kind) in
        [(2, 2, 4, ScheduleKind::OneFOneB), (4, 1, 1, ScheduleKind::GPipe), (1, 3, 6, ScheduleKind::GPipe)]
    {
        let plan = Plan::new(&info(), dp, pp, m, kind).unwrap();
        let desc = plan.describe();
        let (got, e) = run(&cfg, plan, 5);
        let err = rel_err(&got, &want);
        assert!(err <= 1e-4, "{desc}: relative error {err:.3e}");
        assert!(e.replicas_identical().unwrap());
    }
}

#[test]
fn one_device_is_the_same_computation_as_the_trainer() {
    let cfg = config(sgd());
    let (got, _) = run(&cfg, Plan::single(&info()), 5);
    assert_eq!(got, reference(&cfg, 5), "dp=pp=m=1 must be bit-identical to the single-device trainer");
}

#[test]
fn gradient_accumulation_equals_more_microbatches() {
    let cfg = config(sgd());
    let want = reference(&cfg, 5);
    let plan = Plan::new(&info(), 2, 2, 2, ScheduleKind::OneFOneB).unwrap().with_accumulate(3).unwrap();
    let (got, e) = run(&cfg, plan.clone(), 5);
    assert!(rel_err(&got, &want) <= 1e-5);
    assert!(e.replicas_identical().unwrap());
    // And with the state sharded and the layers split: the reduce-scatter after the last pass.
    let plan = plan.with_zero(1).unwrap().with_tp(2).unwrap();
    let (got, e) = run(&cfg, plan, 5);
    assert!(rel_err(&got, &want) <= 1e-5);
    assert!(e.replicas_identical().unwrap());
}

#[test]
fn batches_too_small_for_the_plan_are_refused_clearly() {
    let cfg = config(sgd());
    let devs: Vec<CpuDevice> = (0..4).map(CpuDevice::new).collect();
    let plan = Plan::new(&info(), 2, 2, 4, ScheduleKind::GPipe).unwrap();
    let mut e = Engine::new(&devs, &mlp().model(), cfg.clone(), plan.clone()).unwrap();
    let d = data();
    let (x, y) = d.gather(&[0, 1, 2, 3, 4]);
    let err = e.step(&x, &y).unwrap_err().to_string();
    assert!(
        err.contains("a batch of 5 rows cannot be split into dp=2 replicas x 4 microbatches")
            && err.contains("at least 8"),
        "{err}"
    );
    let err = Engine::new(&devs[..3], &mlp().model(), cfg.clone(), plan.clone()).err().unwrap().to_string();
    assert!(err.contains("needs 4 devices, 3 given"), "{err}");
    // A clipping norm that would stop (0) or reverse (< 0) every update is refused, as by the
    // one-device trainer.
    for c in [0.0, -1.0, f32::NAN] {
        let bad = TrainConfig { clip_norm: Some(c), ..cfg.clone() };
        let err = Engine::new(&devs, &mlp().model(), bad.clone(), plan.clone()).err().unwrap().to_string();
        assert!(err.contains("must be a positive number"), "{err}");
        assert!(Trainer::new(&devs[0], &mlp().model(), bad).is_err());
    }
}

#[test]
fn a_checkpoint_moves_between_plans() {
    let cfg = config(OptimizerConfig::AdamW(AdamW { lr: 1e-2, ..AdamW::default() }));
    let want = reference(&cfg, 5);
    // 2 steps on dp=2 x pp=2, then 3 more on dp=1 x pp=3 from its parameters and state.
    let plan = Plan::new(&info(), 2, 2, 2, ScheduleKind::GPipe).unwrap();
    let devs: Vec<CpuDevice> = (0..4).map(CpuDevice::new).collect();
    let mut a = Engine::new(&devs, &mlp().model(), cfg.clone(), plan).unwrap();
    let mut cursor = Cursor::default();
    tessera::train::fit(&mut a, &data(), 26, 2, &mut cursor, |_, _, _| Ok(())).unwrap();
    let (p, s) = (a.params().unwrap(), a.optimizer_state().unwrap());
    let plan = Plan::new(&info(), 1, 3, 3, ScheduleKind::OneFOneB).unwrap();
    let devs: Vec<CpuDevice> = (0..3).map(CpuDevice::new).collect();
    let mut b = Engine::with_state(&devs, &mlp().model(), cfg, plan, &p, Some(&s), 2).unwrap();
    tessera::train::fit(&mut b, &data(), 26, 5, &mut cursor, |_, _, _| Ok(())).unwrap();
    assert!(rel_err(&b.params().unwrap(), &want) <= 1e-4);
}

#[test]
fn the_timeline_shows_every_device_and_its_idle_time() {
    let cfg = config(sgd());
    let plan = Plan::new(&info(), 2, 2, 4, ScheduleKind::GPipe).unwrap();
    let (_, e) = run(&cfg, plan, 1);
    let t = e.timeline().unwrap();
    assert_eq!(t.lanes.len(), 4);
    for lane in &t.lanes {
        let f = lane.spans.iter().filter(|s| s.label.starts_with('F')).count();
        let b = lane.spans.iter().filter(|s| s.label.starts_with('B')).count();
        assert_eq!((f, b), (4, 4), "{}", lane.name);
        assert!(!lane.comm.is_empty(), "{}: no all-reduce recorded", lane.name);
    }
    let idle = t.idle_fraction();
    assert!((0.0..1.0).contains(&idle), "{idle}");
    let svg = t.to_svg("step", "s");
    assert!(svg.contains("replica 1, stage 1") && svg.contains("all-reduce"), "{}", &svg[..200.min(svg.len())]);
}

#[test]
fn cli_trains_on_a_mesh_to_the_accuracy_of_one_device() {
    let timeline = tmp("timeline.svg");
    let common = ["train", "--widths", "784,128,64,10", "--steps", "120", "--json"];
    let mut one = common.to_vec();
    one.extend(["--device", "cpu"]);
    let (ok, out1, err) = tessera(&one);
    assert!(ok, "{err}");
    let mut mesh = common.to_vec();
    mesh.extend(["--device", "cpu:4", "--dp", "2", "--pp", "2", "--microbatches", "4", "--schedule", "gpipe"]);
    mesh.extend(["--timeline", timeline.to_str().unwrap()]);
    let (ok, out4, err) = tessera(&mesh);
    assert!(ok, "{err}");
    let a: serde_json::Value = serde_json::from_str(out1.trim()).unwrap();
    let b: serde_json::Value = serde_json::from_str(out4.trim()).unwrap();
    assert_eq!(b["plan"], "dp=2 x pp=2, 4 microbatches, gpipe, stages [0..1, 1..3]");
    let (x, y) = (a["test_accuracy"].as_f64().unwrap(), b["test_accuracy"].as_f64().unwrap());
    assert!(x > 0.85 && (x - y).abs() <= 0.005, "one device {x}, dp=2 x pp=2 {y}");
    let svg = std::fs::read_to_string(&timeline).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("cpu:3 (replica 1, stage 1)"), "{}", &svg[..300.min(svg.len())]);
}

#[test]
fn cli_plan_prints_the_mesh_the_chart_and_the_estimate() {
    let svg = tmp("plan.svg");
    let (ok, out, err) = tessera(&[
        "plan",
        "--device",
        "cpu:4",
        "--dp",
        "2",
        "--pp",
        "2",
        "--microbatches",
        "3",
        "--schedule",
        "1f1b",
        "--gflops",
        "50",
        "--svg",
        svg.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    for want in [
        "plan: dp=2 x pp=2, 3 microbatches, 1f1b",
        "replica 1: cpu:2 -> cpu:3",
        "stage 1: layers 1..3",
        "activations in flight per stage [2, 1]",
        "stage 0: F0 F1 ",
        "bubble (p-1)/(m+p-1) = 25.0%",
        "at 50.0 GFLOP/s",
    ] {
        assert!(out.contains(want), "missing `{want}` in:\n{out}");
    }
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));

    let (ok, out, err) = tessera(&[
        "plan",
        "--device",
        "cpu:2",
        "--widths",
        "784,4096,4096,4096,4096,10",
        "--memory",
        "700MiB",
        "--batch",
        "256",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("pp=2 to fit"), "{out}");
    let (ok, _, err) =
        tessera(&["plan", "--device", "cpu:2", "--widths", "784,4096,4096,4096,4096,10", "--memory", "100MiB"]);
    assert!(!ok && err.contains("does not fit") && err.contains("short by"), "{err}");
}

#[test]
fn cli_refuses_meshes_that_do_not_match_the_devices() {
    let (ok, _, err) = tessera(&["train", "--device", "cpu:3", "--dp", "2", "--pp", "2", "--steps", "1"]);
    assert!(!ok && err.contains("--dp 2 x --pp 2 needs 4 devices, but --device opened 3"), "{err}");
    let (ok, _, err) = tessera(&["train", "--device", "cpu:2", "--pp", "5", "--steps", "1"]);
    assert!(!ok && err.contains("--pp 5 does not divide the 2 devices"), "{err}");
    let (ok, _, err) = tessera(&["train", "--device", "cpu:2", "--pp", "2", "--widths", "784,10", "--steps", "1"]);
    assert!(!ok && err.contains("each stage needs at least one layer"), "{err}");
    let (ok, _, err) = tessera(&["train", "--device", "cpu:2", "--schedule", "zigzag", "--steps", "1"]);
    assert!(!ok && err.contains("unknown pipeline schedule `zigzag`"), "{err}");
}

#[test]
fn logical_devices_of_one_gpu_match_the_cpu_reference() {
    let Some(g0) = tessera::check::gpu_or_skip("logical devices of one GPU") else { return };
    let mut gpus = vec![g0.clone()];
    for i in 1..4 {
        gpus.push(g0.logical(i).unwrap());
    }
    let cfg = config(sgd());
    let want = reference(&cfg, 5);
    for (dp, pp, m, kind) in [
        (1, 1, 1, ScheduleKind::GPipe),
        (2, 2, 4, ScheduleKind::OneFOneB),
        (4, 1, 2, ScheduleKind::GPipe),
        (1, 3, 6, ScheduleKind::GPipe),
    ] {
        let plan = Plan::new(&info(), dp, pp, m, kind).unwrap();
        let desc = plan.describe();
        let mut e = Engine::new(&gpus[..dp * pp], &mlp().model(), cfg.clone(), plan).unwrap();
        tessera::train::fit(&mut e, &data(), 26, 5, &mut Cursor::default(), |_, _, _| Ok(())).unwrap();
        let err = rel_err(&e.params().unwrap(), &want);
        assert!(err <= 1e-5, "cuda {desc}: relative error {err:.3e}");
        assert!(e.replicas_identical().unwrap(), "cuda {desc}: replicas diverged");
    }
}

/// The equivalence oracle on simulated GPUs: the CUDA kernels, run by the simulator on four
/// logical devices, under data and pipeline parallelism, against the single-device CPU run.
#[test]
fn simulated_devices_match_the_cpu_reference() {
    use tessera::StreamOrder;
    let cfg = config(sgd());
    let want = reference(&cfg, 5);
    // Each launch at once; then deferred (work runs only when waited on, and a missing event
    // between the engine's streams, or a buffer freed while another stream uses it, is an
    // error), in a fixed and in a shuffled order.
    for order in
        [StreamOrder::Immediate, StreamOrder::Deferred { shuffle: None }, StreamOrder::Deferred { shuffle: Some(7) }]
    {
        let sims = tessera::SimDevice::group(4, order);
        for (dp, pp, m, kind) in [(2, 2, 4, ScheduleKind::OneFOneB), (1, 3, 6, ScheduleKind::GPipe)] {
            let plan = Plan::new(&info(), dp, pp, m, kind).unwrap();
            let desc = plan.describe();
            let mut e = Engine::new(&sims[..dp * pp], &mlp().model(), cfg.clone(), plan).unwrap();
            tessera::train::fit(&mut e, &data(), 26, 5, &mut Cursor::default(), |_, _, _| Ok(())).unwrap();
            let err = rel_err(&e.params().unwrap(), &want);
            assert!(err <= 1e-5, "sim ({order}) {desc}: relative error {err:.3e}");
            assert!(e.replicas_identical().unwrap(), "sim ({order}) {desc}: replicas diverged");
        }
    }
}

/// A communicator given from outside (here a one-rank ring; on a GPU, NCCL) carries the
/// gradient buckets even at dp = 1, and changes nothing in the result.
#[test]
fn given_communicators_carry_the_gradients() {
    let cfg = config(sgd());
    let want = reference(&cfg, 5);
    let devs = [CpuDevice::new(0)];
    let plan = Plan::new(&info(), 1, 1, 2, ScheduleKind::GPipe).unwrap();
    let params = mlp().init(cfg.seed);
    let mut made = 0;
    let mut e = Engine::with_communicators(
        &devs,
        &mlp().model(),
        cfg.clone(),
        plan,
        &params,
        None,
        0,
        &mut |s, r, d: &CpuDevice| {
            made += 1;
            assert_eq!((s, r), (0, 0));
            let c: Box<dyn tessera::parallel::comm::Communicator<CpuDevice>> =
                Box::new(tessera::parallel::comm::LocalComm::group(std::slice::from_ref(d)).pop().unwrap());
            Ok(c)
        },
    )
    .unwrap();
    assert_eq!(made, 1);
    tessera::train::fit(&mut e, &data(), 26, 5, &mut Cursor::default(), |_, _, _| Ok(())).unwrap();
    let t = e.timeline().unwrap();
    assert!(t.lanes[0].comm.iter().any(|s| s.label.starts_with("all-reduce")), "the buckets did not go through it");
    let err = rel_err(&e.params().unwrap(), &want);
    assert!(err <= 1e-6, "relative error {err:.3e}");
}

/// A researcher's own layer (`examples/own_layer.rs`: residual blocks sharing one matrix) goes
/// through the same oracle: every plan trains to the single-device weights, the replicas stay
/// identical, and so do the copies of the shared matrix where the blocks land on two stages.
#[test]
fn a_researchers_own_layer_passes_the_oracle_grid() {
    let model = own_layer::model::<CpuDevice>();
    let info = model.info().unwrap();
    assert_eq!(info.param("blocks.weight").unwrap().layers, vec![1, 2], "the blocks share one matrix");
    for (cfg, tol) in [
        (config(sgd()), 1e-5),
        (
            TrainConfig {
                clip_norm: Some(0.3),
                ..config(OptimizerConfig::AdamW(AdamW { lr: 1e-2, ..AdamW::default() }))
            },
            1e-4,
        ),
    ] {
        let dev = CpuDevice::new(0);
        let mut t = Trainer::new(&dev, &model, cfg.clone()).unwrap();
        t.fit(&data(), 26, 5, &mut Cursor::default(), |_, _, _| Ok(())).unwrap();
        let want = t.network().download_params(&dev).unwrap();
        let mut worst = 0f64;
        for dp in [1, 2] {
            for pp in [1, 2, 3, 4] {
                for m in [1, 2, 4] {
                    for kind in [ScheduleKind::GPipe, ScheduleKind::OneFOneB] {
                        let plan = Plan::new(&info, dp, pp, m, kind).unwrap();
                        let desc = plan.describe();
                        let devs: Vec<CpuDevice> = (0..dp * pp).map(CpuDevice::new).collect();
                        let mut e = Engine::new(&devs, &model, cfg.clone(), plan).unwrap();
                        tessera::train::fit(&mut e, &data(), 26, 5, &mut Cursor::default(), |_, _, _| Ok(())).unwrap();
                        let err = rel_err(&e.params().unwrap(), &want);
                        worst = worst.max(err);
                        assert!(err <= tol, "{desc}: relative error {err:.3e}");
                        assert!(e.replicas_identical().unwrap(), "{desc}: replicas or shared copies diverged");
                    }
                }
            }
        }
        // Its layers split nothing: under tensor parallelism they run whole on every rank,
        // and ZeRO shards their state (the shared matrix's buckets stay whole).
        for (dp, pp, tp, zero) in [(1, 1, 2, 0), (2, 2, 2, 1), (2, 3, 1, 1)] {
            let plan = Plan::new(&info, dp, pp, 2, ScheduleKind::OneFOneB)
                .unwrap()
                .with_tp(tp)
                .unwrap()
                .with_zero(zero)
                .unwrap();
            let desc = plan.describe();
            let devs: Vec<CpuDevice> = (0..dp * pp * tp).map(CpuDevice::new).collect();
            let mut e = Engine::new(&devs, &model, cfg.clone(), plan).unwrap();
            tessera::train::fit(&mut e, &data(), 26, 5, &mut Cursor::default(), |_, _, _| Ok(())).unwrap();
            let err = rel_err(&e.params().unwrap(), &want);
            worst = worst.max(err);
            assert!(err <= tol, "{desc}: relative error {err:.3e}");
            assert!(e.replicas_identical().unwrap(), "{desc}: replicas or shared copies diverged");
        }
        eprintln!("own layer, {}: worst relative error over the grid {worst:.3e}", cfg.optimizer.name());
    }
}

/// A model whose layers do not fit together, or whose shared parameter has two shapes, is
/// refused with the layer named, before anything is allocated.
#[test]
fn a_model_that_does_not_fit_together_is_refused() {
    use tessera::nn::{Linear, Model};
    let m: Model<CpuDevice> =
        Model::new("bad").push(Linear::new(12, 24, Activation::Relu)).push(Linear::new(20, 5, Activation::None));
    let e = m.info().unwrap_err().to_string();
    assert!(e.contains("layer 1 (linear 20x5) takes 20 features, but layer 0 (linear 12x24 relu) gives 24"), "{e}");
    let m: Model<CpuDevice> = Model::new("bad shared")
        .push(own_layer::Residual { width: 8, act: Activation::Relu, shared: Some("w") })
        .push(own_layer::Residual { width: 8, act: Activation::Relu, shared: None })
        .push(Linear::new(8, 8, Activation::Relu))
        .push(own_layer::Residual { width: 8, act: Activation::Relu, shared: Some("w") });
    assert!(m.info().is_ok());
    let m: Model<CpuDevice> = Model::new("two shapes")
        .push(own_layer::Residual { width: 8, act: Activation::Relu, shared: Some("w") })
        .push(Linear::new(8, 4, Activation::Relu))
        .push(own_layer::Residual { width: 4, act: Activation::Relu, shared: Some("w") });
    let e = m.info().unwrap_err().to_string();
    assert!(e.contains("shared parameter `w` is [4, 4] in layer 2 but [8, 8] in layer 0"), "{e}");
    let devs: Vec<CpuDevice> = (0..2).map(CpuDevice::new).collect();
    let plan = Plan::new(&info(), 1, 2, 2, ScheduleKind::GPipe).unwrap();
    let e = Engine::new(&devs, &m, config(sgd()), plan).err().unwrap().to_string();
    assert!(e.contains("two shapes"), "{e}");
}

/// ZeRO stage 1: gradients reduce-scattered over the replicas, each replica updating its part
/// with its part of the optimizer state, the parameters all-gathered. The grid of dp x pp x
/// microbatches x schedule matches one device as without ZeRO: SGD within 1e-5, AdamW with
/// clipping and a schedule within 1e-4.
#[test]
fn zero_1_matches_one_device() {
    let sgd_cfg = config(sgd());
    let mut adamw_cfg = config(OptimizerConfig::AdamW(AdamW { lr: 1e-2, ..AdamW::default() }));
    adamw_cfg.clip_norm = Some(0.3);
    adamw_cfg.schedule = LrSchedule::Cosine { warmup: 2, total: 5, min_factor: 0.1 };
    for (cfg, tol) in [(&sgd_cfg, 1e-5), (&adamw_cfg, 1e-4)] {
        let want = reference(cfg, 5);
        for dp in [2, 4] {
            for pp in [1, 2, 3] {
                for (m, kind) in [(1, ScheduleKind::GPipe), (4, ScheduleKind::OneFOneB)] {
                    let plan = Plan::new(&info(), dp, pp, m, kind).unwrap().with_zero(1).unwrap();
                    let desc = plan.describe();
                    assert!(desc.contains("zero 1"), "{desc}");
                    let (got, e) = run(cfg, plan, 5);
                    let err = rel_err(&got, &want);
                    assert!(err <= tol, "{desc}: relative error {err:.3e}");
                    assert!(e.replicas_identical().unwrap(), "{desc}: replicas' parameters diverged");
                    // The state put together from the shards is the one-device run's state.
                    let plan1 = Plan::new(&info(), 1, pp, m, kind).unwrap();
                    let (_, whole) = run(cfg, plan1, 5);
                    for (a, b) in e.optimizer_state().unwrap().iter().zip(&whole.optimizer_state().unwrap()) {
                        assert!(rel_err(a, b) <= tol * 10.0, "{desc}: optimizer state {:.3e}", rel_err(a, b));
                    }
                }
            }
        }
    }
}

/// A run saved with ZeRO 1 (and tensor parallelism) resumes without it, and the reverse: the
/// checkpoint holds the whole state, whatever the sharding was.
#[test]
fn zero_1_checkpoints_move_to_and_from_plans_without_it() {
    let cfg = config(OptimizerConfig::AdamW(AdamW { lr: 1e-2, ..AdamW::default() }));
    let want = reference(&cfg, 5);
    let zero = Plan::new(&info(), 2, 2, 2, ScheduleKind::GPipe).unwrap().with_zero(1).unwrap();
    let plain = Plan::new(&info(), 1, 3, 3, ScheduleKind::OneFOneB).unwrap();
    // And with tensor parallelism: tp 2 and ZeRO 1 to one device, and back.
    let tp = Plan::new(&info(), 2, 1, 2, ScheduleKind::OneFOneB).unwrap().with_tp(2).unwrap().with_zero(1).unwrap();
    let one = Plan::single(&info());
    for (first, second) in [(zero.clone(), plain.clone()), (plain, zero), (tp.clone(), one.clone()), (one, tp)] {
        let what = format!("{} then {}", first.describe(), second.describe());
        let devs: Vec<CpuDevice> = (0..first.mesh.devices()).map(CpuDevice::new).collect();
        let mut a = Engine::new(&devs, &mlp().model(), cfg.clone(), first).unwrap();
        let mut cursor = Cursor::default();
        tessera::train::fit(&mut a, &data(), 26, 2, &mut cursor, |_, _, _| Ok(())).unwrap();
        let (p, s) = (a.params().unwrap(), a.optimizer_state().unwrap());
        let devs: Vec<CpuDevice> = (0..second.mesh.devices()).map(CpuDevice::new).collect();
        let mut b = Engine::with_state(&devs, &mlp().model(), cfg.clone(), second, &p, Some(&s), 2).unwrap();
        assert_eq!(b.optimizer_state().unwrap(), s, "{what}: the state survives the move");
        tessera::train::fit(&mut b, &data(), 26, 5, &mut cursor, |_, _, _| Ok(())).unwrap();
        let err = rel_err(&b.params().unwrap(), &want);
        assert!(err <= 1e-4, "{what}: relative error {err:.3e}");
    }
}

#[test]
fn zero_stages_other_than_0_and_1_are_refused() {
    let err = Plan::single(&info()).with_zero(2).unwrap_err().to_string();
    assert!(err.contains("ZeRO stage 2") && err.contains("stage 1"), "{err}");
}

/// ZeRO 1 at dp = 4 gives back three quarters of the optimizer state on every device: measured
/// as the bytes the simulated devices hold, and as the planner predicts.
#[test]
fn zero_1_at_dp_4_holds_a_quarter_of_the_optimizer_state() {
    use tessera::backend::sim::memory_in_use;
    use tessera::parallel::planner::{estimate, Budget};
    let cfg = config(OptimizerConfig::AdamW(AdamW::default()));
    let n = info().param_count() as u64;
    let budget = Budget { memory: 1 << 30, flops: 1e12, link: 1e10, overhead: 0.0 };
    let mut held = Vec::new();
    let mut trained = Vec::new();
    let mut predicted = Vec::new();
    for zero in [0, 1] {
        let plan = Plan::new(&info(), 4, 1, 1, ScheduleKind::GPipe).unwrap().with_zero(zero).unwrap();
        predicted.push(estimate(&info(), &cfg, 26, &plan, &budget).memory[0].optimizer);
        // Device indices no other test of this file uses: the counts are per index.
        let sims: Vec<tessera::SimDevice> = (60..64).map(tessera::SimDevice::new).collect();
        let before: Vec<u64> = (60..64).map(memory_in_use).collect();
        let mut e = Engine::new(&sims, &mlp().model(), cfg.clone(), plan).unwrap();
        held.push((60..64).zip(&before).map(|(i, b)| memory_in_use(i) - b).collect::<Vec<u64>>());
        // It trains (and the saving stays once activations and staging are allocated too).
        tessera::train::fit(&mut e, &data(), 26, 2, &mut Cursor::default(), |_, _, _| Ok(())).unwrap();
        trained.push((60..64).zip(&before).map(|(i, b)| memory_in_use(i) - b).collect::<Vec<u64>>());
    }
    // Two AdamW moments of every parameter, whole; a quarter of them (each bucket's part), sharded.
    assert_eq!(predicted[0], 2 * 4 * n);
    let whole = 2 * 4 * n;
    for r in 0..4 {
        let dropped = held[0][r] - held[1][r];
        // Each layer's bucket splits into 4 parts that differ by at most one float.
        let buckets = info().depth() as u64;
        assert!(dropped.abs_diff(whole * 3 / 4) <= 2 * 4 * buckets, "replica {r}: {dropped} of {whole} bytes");
        assert_eq!(trained[0][r] - trained[1][r], dropped, "replica {r} after two steps");
    }
    assert_eq!(held[0][0] - held[1][0], predicted[0] - predicted[1], "the planner predicts replica 0's saving");
}

/// `--zero 1` on the command line: the same accuracy as one device, its reduce-scatters and
/// all-gathers on the timeline, a checkpoint that resumes without it; and the settings it
/// cannot honour refused.
#[test]
fn cli_zero_1_trains_like_one_device_and_resumes_without_it() {
    let timeline = tmp("zero-timeline.svg");
    let ckpt = tmp("zero.st");
    let common = ["train", "--widths", "784,128,64,10", "--steps", "120", "--json"];
    let mut one = common.to_vec();
    one.extend(["--device", "cpu"]);
    let (ok, out1, err) = tessera(&one);
    assert!(ok, "{err}");
    let mut mesh = common.to_vec();
    mesh.extend(["--device", "cpu:4", "--dp", "2", "--pp", "2", "--zero", "1"]);
    mesh.extend(["--timeline", timeline.to_str().unwrap(), "--save", ckpt.to_str().unwrap()]);
    let (ok, out4, err) = tessera(&mesh);
    assert!(ok, "{err}");
    let a: serde_json::Value = serde_json::from_str(out1.trim()).unwrap();
    let b: serde_json::Value = serde_json::from_str(out4.trim()).unwrap();
    assert!(b["plan"].as_str().unwrap().contains("zero 1"), "{}", b["plan"]);
    let (x, y) = (a["test_accuracy"].as_f64().unwrap(), b["test_accuracy"].as_f64().unwrap());
    assert!(x > 0.85 && (x - y).abs() <= 0.005, "one device {x}, dp=2 x pp=2 zero 1 {y}");
    let svg = std::fs::read_to_string(&timeline).unwrap();
    assert!(
        svg.contains("reduce-scatter layer") && svg.contains("all-gather layer"),
        "the timeline shows ZeRO's collectives"
    );
    // Resumed on one device without ZeRO: the state the shards made is whole again.
    let (ok, _, err) = tessera(&["train", "--resume", ckpt.to_str().unwrap(), "--steps", "130", "--device", "cpu"]);
    assert!(ok, "{err}");
    for (args, want) in [
        (
            &["train", "--device", "cpu:2", "--dp", "1", "--pp", "2", "--zero", "1"][..],
            "--zero 1 shards the optimizer state across data-parallel replicas",
        ),
        (&["train", "--device", "cpu:2", "--zero", "2"][..], "ZeRO stage 0"),
    ] {
        let (ok, _, err) = tessera(args);
        assert!(!ok && err.contains(want), "{args:?}: {err}");
    }
}

/// Tensor parallelism on the MLP (its hidden layers split: column- then row-parallel pairs):
/// the grid dp in {1, 2} x pp in {1, 2} x tp in {1, 2, 4} x zero in {0, 1} against one device,
/// SGD within 1e-5 and AdamW (clipping, schedule) within 1e-4.
#[test]
fn tensor_parallel_grid_matches_one_device() {
    let sgd_cfg = config(sgd());
    let mut adamw_cfg = config(OptimizerConfig::AdamW(AdamW { lr: 1e-2, ..AdamW::default() }));
    adamw_cfg.clip_norm = Some(0.3);
    adamw_cfg.schedule = LrSchedule::Cosine { warmup: 2, total: 5, min_factor: 0.1 };
    let mut runs = 0;
    for (cfg, tol) in [(&sgd_cfg, 1e-5), (&adamw_cfg, 1e-4)] {
        let want = reference(cfg, 5);
        for dp in [1, 2] {
            for pp in [1, 2] {
                for tp in [1, 2, 4] {
                    for zero in [0, 1] {
                        let plan = Plan::new(&info(), dp, pp, 2, ScheduleKind::OneFOneB)
                            .unwrap()
                            .with_tp(tp)
                            .unwrap()
                            .with_zero(zero)
                            .unwrap();
                        let desc = plan.describe();
                        let (got, e) = run(cfg, plan, 5);
                        let err = rel_err(&got, &want);
                        assert!(err <= tol, "{desc}: relative error {err:.3e}");
                        assert!(e.replicas_identical().unwrap(), "{desc}: replicas diverged");
                        runs += 1;
                    }
                }
            }
        }
    }
    assert_eq!(runs, 48);
}

/// Each tensor-parallel rank holds its part of the split parameters (with their gradients and
/// optimizer state): at tp = 4 a device of the MLP holds little more than a quarter of one
/// device's bytes, and its timeline lanes name the ranks.
#[test]
fn tensor_parallel_ranks_hold_their_parts() {
    use tessera::backend::sim::memory_in_use;
    let cfg = config(OptimizerConfig::AdamW(AdamW::default()));
    let mut held = Vec::new();
    for (tp, first) in [(1, 80), (4, 81)] {
        let plan = Plan::new(&info(), 1, 1, 1, ScheduleKind::GPipe).unwrap().with_tp(tp).unwrap();
        let sims: Vec<tessera::SimDevice> = (first..first + tp).map(tessera::SimDevice::new).collect();
        let before = memory_in_use(first);
        let mut e = Engine::new(&sims, &mlp().model(), cfg.clone(), plan).unwrap();
        held.push(memory_in_use(first) - before);
        let d = data();
        let (x, y) = d.gather(&(0..26).collect::<Vec<_>>());
        e.step(&x, &y).unwrap();
        if tp > 1 {
            let names: Vec<String> = e.timeline().unwrap().lanes.iter().map(|l| l.name.clone()).collect();
            assert!(names.iter().any(|n| n.contains("tp rank 3")), "{names:?}");
        }
    }
    // Weights, gradients and two moments of every parameter: the split ones by a quarter (the
    // row-parallel layers' biases stay whole).
    let n = info().param_count() as u64;
    assert_eq!(held[0], 16 * n);
    assert!(held[1] * 10 < held[0] * 3, "tp=4 holds {} of one device's {} bytes", held[1], held[0]);
}

/// `tessera plan` with --tp shows each stage's ranks and the sums inside its layers; without
/// flags, on a layer too big for one device, the planner splits it and says why.
#[test]
fn cli_plan_shows_tensor_parallel_ranks_and_explains_a_tp_choice() {
    let (ok, out, err) =
        tessera(&["plan", "--device", "cpu:8", "--dp", "2", "--pp", "2", "--tp", "2", "--gflops", "50"]);
    assert!(ok, "{err}");
    assert!(out.contains("replica 1: [cpu:4 cpu:5] -> [cpu:6 cpu:7]"), "{out}");
    assert!(out.contains("tensor-parallel sums inside the layers") && out.contains("stage 0: layer 0"), "{out}");
    let big = ["plan", "--device", "cpu:4", "--widths", "784,8192,8192,10", "--batch", "64", "--memory", "700MiB"];
    let (ok, out, err) = tessera(&[&big[..], &["--gflops", "50"]].concat());
    assert!(ok, "{err}");
    assert!(out.contains("x tp=") && out.contains("no plan of whole layers fits"), "{out}");
    // The GPT: its blocks sum inside, and so do its vocabulary-parallel embedding and head.
    let gpt = ["plan", "--model", "gpt", "--device", "cpu:4", "--tp", "2", "--zero", "1", "--batch", "12"];
    let (ok, out, err) = tessera(&[&gpt[..], &["--gflops", "50"]].concat());
    assert!(ok, "{err}");
    assert!(
        out.contains("dp=2 x pp=1 x tp=2") && out.contains("stage 0: layer 0 ") && out.contains("layer 5 "),
        "{out}"
    );
    let (ok, _, err) =
        tessera(&["plan", "--model", "gpt", "--heads", "2", "--width", "64", "--device", "cpu:4", "--tp", "4"]);
    assert!(!ok && err.contains("tp = 4 does not divide the 2 parts of layer 1 (block 0"), "{err}");
    let (ok, _, err) = tessera(&["plan", "--heads", "2"]);
    assert!(!ok && err.contains("--heads shapes a GPT: add --model gpt"), "{err}");
}

/// Tensor parallelism on simulated GPUs, work deferred and shuffled (a sum read before its
/// layer wrote it, or a missing wait between the ranks' queues, is an error): the grid's
/// corners match the CPU reference.
#[test]
fn tensor_parallel_on_simulated_devices_matches_the_cpu_reference() {
    use tessera::StreamOrder;
    let cfg = config(sgd());
    let want = reference(&cfg, 5);
    for order in [StreamOrder::Immediate, StreamOrder::Deferred { shuffle: Some(3) }] {
        let sims = tessera::SimDevice::group(8, order);
        for (dp, pp, tp, zero) in [(1, 1, 4, 0), (2, 2, 2, 1)] {
            let plan = Plan::new(&info(), dp, pp, 2, ScheduleKind::OneFOneB)
                .unwrap()
                .with_tp(tp)
                .unwrap()
                .with_zero(zero)
                .unwrap();
            let desc = plan.describe();
            let mut e = Engine::new(&sims[..dp * pp * tp], &mlp().model(), cfg.clone(), plan).unwrap();
            tessera::train::fit(&mut e, &data(), 26, 5, &mut Cursor::default(), |_, _, _| Ok(())).unwrap();
            let err = rel_err(&e.params().unwrap(), &want);
            assert!(err <= 1e-5, "sim ({order}) {desc}: relative error {err:.3e}");
            assert!(e.replicas_identical().unwrap(), "sim ({order}) {desc}");
        }
    }
}
