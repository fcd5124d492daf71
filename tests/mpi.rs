//! Across processes: `mpirun -np 2` and `-np 4` on this machine with the CPU backend. The
//! equivalence oracle of the in-process engine holds across processes; a killed rank stops the
//! others with a clear error in bounded time; a checkpoint written by a 4-rank run resumes on
//! one process and on another plan.
//!
//! These tests need Open MPI's `mpirun` (scripts/setup.sh installs it). Where it is missing
//! they fail, saying so, unless TESSERA_SKIP_MPI_TESTS=1 (or the build has no `mpi` feature).
//! The same runs under Slurm's `srun --mpi=pmix` where a Slurm controller answers
//! (scripts/slurm-local.sh starts a one-node cluster; scripts/test.sh does).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{tessera, tessera_bin, tmp};
use tessera::checkpoint::Checkpoint;

fn mpirun_present() -> bool {
    // Built without the `mpi` feature (the GPU binaries are), tessera runs as one process
    // whatever mpirun says; TESSERA_SKIP_MPI_TESTS=1 skips even where an mpirun is installed.
    if !cfg!(feature = "mpi") {
        eprintln!("skipped: built without the `mpi` feature");
        return false;
    }
    if std::env::var("TESSERA_SKIP_MPI_TESTS").as_deref() == Ok("1") {
        eprintln!("skipped: TESSERA_SKIP_MPI_TESTS=1");
        return false;
    }
    if Command::new("mpirun").arg("--version").output().is_ok_and(|o| o.status.success()) {
        return true;
    }
    panic!("mpirun not found: run scripts/setup.sh (it installs Open MPI with apt), or set TESSERA_SKIP_MPI_TESTS=1");
}

/// `mpirun -np N tessera ARGS` (root allowed, more ranks than cores allowed).
fn mpirun_cmd(np: usize, args: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["-np", &np.to_string(), "--oversubscribe", "--bind-to", "none"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl", "self,vader,tcp")
        // Containers often forbid the cross-memory attach that vader's single copy uses.
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .arg(tessera_bin())
        .args(args);
    c
}

fn mpirun(np: usize, args: &[&str]) -> (bool, String, String) {
    let o = mpirun_cmd(np, args).env("TESSERA_COMM_TIMEOUT", "60").output().expect("run mpirun");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

const MODEL: [&str; 10] =
    ["--device", "cpu", "--widths", "784,48,32,24,10", "--batch", "60", "--clip", "1", "--lr-schedule", "cosine"];

fn args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["train"];
    v.extend_from_slice(&MODEL);
    v.extend_from_slice(extra);
    v
}

fn params(p: &Path) -> Vec<f32> {
    Checkpoint::load(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).params
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((*x - *y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// The single-process reference: `steps` steps on one device.
fn reference(steps: &str, path: &Path) -> Vec<f32> {
    let (ok, _, err) = tessera(&args(&["--steps", steps, "--save", path.to_str().unwrap()]));
    assert!(ok, "{err}");
    params(path)
}

/// 8 steps on `np` ranks started by `launch(np, args)` (-> ok, stdout, stderr) for each mesh,
/// against the single-process run: rank 0 alone prints the result, and the weights are within
/// the oracle's 1e-5.
fn ranks_match_one_process(
    launcher: &str,
    meshes: &[(usize, &[&str])],
    launch: impl Fn(usize, &[&str]) -> (bool, String, String),
) {
    let want = reference("8", &tmp(&format!("{launcher}-ref8.safetensors")));
    for &(np, mesh) in meshes {
        let out = tmp(&format!("{launcher}-{np}-{}.safetensors", mesh.join("")));
        let mut a = args(&["--steps", "8", "--save", out.to_str().unwrap(), "--json"]);
        a.extend_from_slice(mesh);
        let (ok, stdout, err) = launch(np, &a);
        assert!(ok, "{launcher} -n {np} {mesh:?} failed:\n{err}");
        let j: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|_| panic!("{stdout}"));
        assert_eq!(j["steps"], 8);
        assert_eq!(j["device"], "rank0:cpu:0", "rank 0 prints, once: {stdout}");
        let e = rel_err(&params(&out), &want);
        eprintln!("{launcher} -n {np} {mesh:?}: ||w - w_ref|| / ||w_ref|| = {e:.2e}");
        assert!(e <= 1e-5, "{launcher} -n {np} {mesh:?}: relative error {e:.3e}");
    }
}

#[test]
fn ranks_across_processes_match_the_single_device_run() {
    if !mpirun_present() {
        return;
    }
    let meshes: [(usize, &[&str]); 8] = [
        (2, &["--dp", "2"]),
        (2, &["--pp", "2", "--microbatches", "3"]),
        (4, &["--dp", "2", "--pp", "2", "--microbatches", "4"]),
        (4, &["--pp", "4", "--microbatches", "4", "--schedule", "gpipe"]),
        // ZeRO 1: reduce-scatter and all-gather over MPI.
        (2, &["--dp", "2", "--zero", "1"]),
        (4, &["--dp", "4", "--zero", "1"]),
        // Tensor parallelism across processes: MPI sub-communicators per tp and dp group.
        (4, &["--dp", "2", "--tp", "2", "--zero", "1"]),
        (4, &["--pp", "2", "--tp", "2", "--microbatches", "2"]),
    ];
    ranks_match_one_process("mpirun", &meshes, mpirun);
}

/// `kill -9 victim`, then waits (90 s at most) for the launcher `child` to end: its status, the
/// time it took after the kill, and its stderr.
fn kill_rank_and_wait(
    child: std::process::Child,
    victim: &str,
    launcher: &str,
) -> (std::process::ExitStatus, Duration, String) {
    assert!(Command::new("kill").args(["-9", victim]).status().unwrap().success());
    let killed = Instant::now();
    let (status, err) = wait_job(child, &format!("the {launcher} job, after a rank was killed,"));
    let took = killed.elapsed();
    eprintln!("after kill -9 of one rank, {launcher} exited in {took:?} with {status}:\n{err}");
    (status, took, err)
}

#[test]
fn a_killed_rank_stops_the_others_with_an_error_in_bounded_time() {
    if !mpirun_present() {
        return;
    }
    let a = args(&["--dp", "2", "--pp", "2", "--steps", "100000"]);
    let child = mpirun_cmd(4, &a)
        .env("TESSERA_COMM_TIMEOUT", "20")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run mpirun");
    // Let the ranks start training, then kill one of them (rank processes are mpirun's
    // children running the tessera binary).
    let pids = rank_pids(&child, Duration::from_secs(4));
    assert!(pids.len() >= 4, "expected 4 rank processes under mpirun, found {pids:?}");
    let (status, took, err) = kill_rank_and_wait(child, &pids[2], "mpirun");
    assert!(!status.success());
    assert!(took <= Duration::from_secs(60), "took {took:?}");
    // Named: by the launcher (the rank that died) and by tessera on the survivors.
    assert!(
        err.contains("rank") && (err.contains("signal 9") || err.contains("Killed") || err.contains("stopped or hung")),
        "{err}"
    );
    assert!(err.contains("error: rank"), "no tessera error from a surviving rank:\n{err}");
}

/// The rank processes of a launcher (its children running tessera), after giving them `wait`.
fn rank_pids(child: &std::process::Child, wait: Duration) -> Vec<String> {
    std::thread::sleep(wait);
    let out = Command::new("pgrep").args(["-P", &child.id().to_string()]).output().expect("pgrep");
    String::from_utf8_lossy(&out.stdout).split_whitespace().map(String::from).collect()
}

/// Waits (90 s at most) for `child` to end: its status and stderr; `what` names it if it does not.
fn wait_job(mut child: std::process::Child, what: &str) -> (std::process::ExitStatus, String) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(90) {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if child.try_wait().unwrap().is_none() {
        let _ = child.kill();
        panic!("{what} still ran 90 s on");
    }
    let out = child.wait_with_output().unwrap();
    (out.status, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A rank stopped with SIGSTOP: the job ends after the timeout, and the message names the stopped
/// rank's process (found on the node), not whichever neighbour waited on whom; it says how to
/// resume it and how to allow more time.
#[test]
fn a_stopped_rank_is_named() {
    if !mpirun_present() {
        return;
    }
    let a = args(&["--dp", "2", "--pp", "2", "--steps", "100000"]);
    let child = mpirun_cmd(4, &a)
        .env("TESSERA_COMM_TIMEOUT", "4")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run mpirun");
    let pids = rank_pids(&child, Duration::from_secs(4));
    assert!(pids.len() >= 4, "expected 4 rank processes under mpirun, found {pids:?}");
    assert!(Command::new("kill").args(["-STOP", &pids[1]]).status().unwrap().success());
    let (status, err) = wait_job(child, "the job");
    let _ = Command::new("kill").args(["-9", &pids[1]]).status();
    assert!(!status.success());
    assert!(err.contains(&format!("(pid {}) is stopped", pids[1])), "the stopped rank is not named:\n{err}");
    assert!(err.contains("kill -CONT") && err.contains("TESSERA_COMM_TIMEOUT"), "{err}");
    let other = pids.iter().filter(|p| **p != pids[1]).find(|p| err.contains(&format!("(pid {p}) is stopped")));
    assert!(other.is_none(), "a running rank was named as stopped:\n{err}");
}

/// Ctrl-C on mpirun: the ranks say the job was interrupted, not that a peer failed.
#[test]
fn ctrl_c_on_mpirun_says_the_job_was_interrupted() {
    if !mpirun_present() {
        return;
    }
    let a = args(&["--dp", "2", "--steps", "100000"]);
    let child = mpirun_cmd(2, &a).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("run mpirun");
    let pids = rank_pids(&child, Duration::from_secs(4));
    assert!(pids.len() >= 2, "{pids:?}");
    assert!(Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap().success());
    let (status, err) = wait_job(child, "the job");
    assert!(!status.success());
    assert!(err.contains("the job was interrupted") && !err.contains("failed or was killed"), "{err}");
}

#[test]
fn a_checkpoint_from_four_ranks_resumes_on_one_process_and_on_another_plan() {
    if !mpirun_present() {
        return;
    }
    let want = reference("12", &tmp("ref12.safetensors"));
    // 4 ranks (dp=2, pp=2, the optimizer state sharded: ZeRO 1) stop after 5 of 12 steps.
    let half = tmp("four-ranks-5.safetensors");
    let mut a = args(&["--steps", "12", "--stop-at", "5", "--save", half.to_str().unwrap()]);
    a.extend_from_slice(&["--dp", "2", "--pp", "2", "--microbatches", "2", "--zero", "1"]);
    let (ok, _, err) = mpirun(4, &a);
    assert!(ok, "{err}");
    let c = Checkpoint::load(&half).unwrap();
    assert_eq!(c.step, 5);
    // Resumed on one process, one device.
    let one = tmp("resumed-one.safetensors");
    let (ok, _, err) =
        tessera(&args(&["--resume", half.to_str().unwrap(), "--steps", "12", "--save", one.to_str().unwrap()]));
    assert!(ok, "{err}");
    let e1 = rel_err(&params(&one), &want);
    // Resumed on 4 ranks as dp=4, pp=1 (the whole state on every rank).
    let four = tmp("resumed-dp4.safetensors");
    let mut a = args(&["--resume", half.to_str().unwrap(), "--steps", "12", "--save", four.to_str().unwrap()]);
    a.extend_from_slice(&["--dp", "4"]);
    let (ok, _, err) = mpirun(4, &a);
    assert!(ok, "{err}");
    let e4 = rel_err(&params(&four), &want);
    eprintln!("resumed on one process: {e1:.2e}; on dp=4 across processes: {e4:.2e}");
    assert!(e1 <= 1e-5 && e4 <= 1e-5, "one process {e1:.3e}, dp=4 {e4:.3e}");
}

#[test]
fn a_mesh_that_does_not_match_the_ranks_is_refused_on_every_rank() {
    if !mpirun_present() {
        return;
    }
    let (ok, _, err) = mpirun(2, &args(&["--dp", "2", "--pp", "2", "--steps", "1"]));
    assert!(!ok);
    assert!(err.contains("needs 4 ranks, but the job has 2"), "{err}");
    let (ok, _, err) = mpirun(2, &["train", "--device", "cpu:2", "--steps", "1"]);
    assert!(!ok);
    assert!(err.contains("under MPI each rank runs one device"), "{err}");
    // Without --dp/--pp every rank runs the planner, timing its own device; they run rank 0's plan.
    let (ok, out, err) = mpirun(2, &args(&["--steps", "3"]));
    assert!(ok, "{err}");
    assert!(err.contains("plan: dp=") && out.contains("test accuracy"), "{out}{err}");
}

/// On a GPU: NCCL with one rank (a single card cannot host two ranks of one communicator):
/// its all-reduce, broadcast and bus bandwidth, and a training step whose gradients go through
/// it (`mpirun -np 1 ... --allreduce nccl`), against the same run without NCCL.
#[test]
fn nccl_one_rank_all_reduce_and_training_step_on_a_gpu() {
    if tessera::check::gpu_or_skip("NCCL with one rank").is_none() {
        return;
    }
    use tessera::parallel::comm::Communicator;
    use tessera::parallel::nccl::{bus_bandwidth, NcclComm};
    use tessera::Backend;
    let dev = tessera::CudaDevice::new(0).unwrap();
    let mut c = NcclComm::single(&dev).expect("NCCL one-rank communicator");
    let n = 16 << 20; // 64 MiB of f32
    let host: Vec<f32> = (0..n).map(|i| (i % 1000) as f32).collect();
    let mut buf = dev.upload(&host).unwrap();
    c.all_reduce_sum(&mut buf).unwrap();
    let t = Instant::now();
    let reps = 10;
    for _ in 0..reps {
        c.all_reduce_sum(&mut buf).unwrap();
    }
    let secs = t.elapsed().as_secs_f64() / reps as f64;
    assert_eq!(dev.download(&tessera::CudaDevice::view(&buf)).unwrap(), host, "a one-rank sum is the identity");
    c.broadcast(&mut buf, 0).unwrap();
    let bytes = n * 4;
    eprintln!(
        "NCCL all-reduce, 1 rank, {} MiB: {:.3} ms, algbw {:.1} GB/s, busbw = algbw * 2(n-1)/n = {:.1} GB/s",
        bytes >> 20,
        secs * 1e3,
        bytes as f64 / secs / 1e9,
        bus_bandwidth(bytes, 1, secs) / 1e9
    );
    // A training step whose gradient buckets go through the NCCL communicator, in process.
    use tessera::parallel::engine::Engine;
    use tessera::parallel::{Plan, ScheduleKind};
    use tessera::train::{Cursor, TrainConfig};
    let (train, _) = tessera::data::Dataset::mnist_10k().unwrap();
    let mlp = tessera::nn::MlpConfig::new(vec![784, 256, 10], tessera::Activation::Relu).unwrap();
    let model = mlp.model();
    let cfg = TrainConfig {
        optimizer: tessera::train::OptimizerConfig::AdamW(tessera::AdamW::default()),
        schedule: tessera::train::LrSchedule::Constant,
        clip_norm: None,
        seed: 3,
    };
    let p0 = mlp.init(cfg.seed);
    let plan = Plan::new(&mlp.info(), 1, 1, 2, ScheduleKind::OneFOneB).unwrap();
    let mut plain = Engine::new(std::slice::from_ref(&dev), &model, cfg.clone(), plan.clone()).unwrap();
    let mut with_nccl =
        Engine::with_communicators(std::slice::from_ref(&dev), &model, cfg, plan, &p0, None, 0, &mut |_, _, d| {
            Ok(Box::new(NcclComm::single(d)?) as Box<dyn Communicator<tessera::CudaDevice>>)
        })
        .unwrap();
    tessera::train::fit(&mut plain, &train, 128, 30, &mut Cursor::default(), |_, _, _| Ok(())).unwrap();
    let t = Instant::now();
    tessera::train::fit(&mut with_nccl, &train, 128, 30, &mut Cursor::default(), |_, _, _| Ok(())).unwrap();
    eprintln!(
        "30 NCCL-backed training steps (784-256-10, batch 128): {:.1} ms/step",
        t.elapsed().as_secs_f64() * 1e3 / 30.0
    );
    assert!(with_nccl.timeline().unwrap().lanes[0].comm.iter().any(|s| s.label.starts_with("all-reduce")));
    let e = rel_err(&with_nccl.params().unwrap(), &plain.params().unwrap());
    assert!(e <= 1e-6, "NCCL-backed steps vs plain: {e:.3e}");

    // And across processes, where Open MPI is installed: mpirun -np 1 ... --allreduce nccl.
    if !mpirun_present() {
        return;
    }
    let reference = tmp("gpu-ref.safetensors");
    let (ok, _, err) = tessera(&[
        "train",
        "--device",
        "cuda",
        "--widths",
        "784,256,10",
        "--steps",
        "30",
        "--save",
        reference.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let nccl = tmp("gpu-nccl.safetensors");
    let (ok, out, err) = mpirun(
        1,
        &[
            "train",
            "--device",
            "cuda",
            "--allreduce",
            "nccl",
            "--widths",
            "784,256,10",
            "--steps",
            "30",
            "--save",
            nccl.to_str().unwrap(),
        ],
    );
    assert!(ok, "{err}");
    eprintln!("{out}");
    let e = rel_err(&params(&nccl), &params(&reference));
    assert!(e <= 1e-5, "NCCL-backed step vs plain: {e:.3e}");
}

/// Whether to run the `srun` tests: only where asked (TESSERA_SLURM_TESTS=1, which
/// scripts/test.sh sets after scripts/slurm-local.sh started a one-node cluster), so that
/// `cargo test` on a cluster's login node never submits jobs to a real partition. Asked for,
/// a cluster that does not answer is a failure.
fn slurm_present() -> bool {
    if !cfg!(feature = "mpi") {
        eprintln!("skipped: built without the `mpi` feature");
        return false;
    }
    if std::env::var("TESSERA_SLURM_TESTS").as_deref() != Ok("1") {
        eprintln!(
            "skipped: TESSERA_SLURM_TESTS is not 1 (scripts/test.sh starts a one-node Slurm cluster and sets it)"
        );
        return false;
    }
    let answers = Command::new("sinfo").arg("-h").output().is_ok_and(|o| o.status.success());
    assert!(
        answers,
        "TESSERA_SLURM_TESTS=1 but no Slurm controller answers sinfo: run scripts/slurm-local.sh and set SLURM_CONF \
         to the configuration it prints"
    );
    true
}

/// The srun tests one at a time: each takes the one-node cluster's 4 CPUs.
static SLURM: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Cancels the Slurm job named `0` when dropped (a failed test leaves no job holding the node).
struct CancelJob(String);
impl Drop for CancelJob {
    fn drop(&mut self) {
        let _ = Command::new("scancel").args(["--name", &self.0]).output();
    }
}

/// The node for one srun test, as job `name` (`None`: the srun tests are not asked for). Holds
/// the lock that runs them one at a time, and cancels the job when the test ends, failed or not.
fn slurm_job(name: &str) -> Option<(std::sync::MutexGuard<'static, ()>, CancelJob)> {
    if !slurm_present() {
        return None;
    }
    Some((SLURM.lock().unwrap_or_else(|e| e.into_inner()), CancelJob(name.to_string())))
}

/// `srun -n N --mpi=pmix tessera ARGS` as job `name`: Slurm starts the ranks and hands them
/// their rank and size through PMIx, as on a cluster; no mpirun anywhere. A job that cannot get
/// the node within 60 s fails instead of queueing.
fn srun_cmd(np: usize, name: &str, args: &[&str]) -> Command {
    let mut c = Command::new("srun");
    c.args(["-n", &np.to_string(), "--mpi=pmix", "--quiet", "--immediate=60", "-J", name])
        .env("OMPI_MCA_btl", "self,vader,tcp")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .arg(tessera_bin())
        .args(args);
    c
}

#[test]
fn ranks_under_slurm_srun_match_the_single_device_run() {
    let name = format!("tessera-test-match-{}", std::process::id());
    let Some(_job) = slurm_job(&name) else { return };
    let meshes: [(usize, &[&str]); 2] = [(2, &["--dp", "2"]), (4, &["--dp", "2", "--pp", "2", "--microbatches", "4"])];
    ranks_match_one_process("srun", &meshes, |np, a| {
        let o = srun_cmd(np, &name, a).env("TESSERA_COMM_TIMEOUT", "60").output().expect("run srun");
        (o.status.success(), String::from_utf8_lossy(&o.stdout).into(), String::from_utf8_lossy(&o.stderr).into())
    });
}

/// The rank processes of a job: `tessera` processes whose environment holds `mark`.
fn processes_marked(mark: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() != "tessera" {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if env.split(|&b| b == 0).any(|kv| kv == mark.as_bytes()) {
            pids.push(pid);
        }
    }
    pids.sort();
    pids
}

#[test]
fn a_killed_rank_under_srun_stops_the_job_in_bounded_time() {
    let mark = format!("TESSERA_TEST_JOB=srun-kill-{}", std::process::id());
    let (k, v) = mark.split_once('=').unwrap();
    let Some(_job) = slurm_job(v) else { return };
    let a = args(&["--dp", "2", "--pp", "2", "--steps", "100000"]);
    let child = srun_cmd(4, v, &a)
        .env("TESSERA_COMM_TIMEOUT", "20")
        .env(k, v)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run srun");
    let started = Instant::now();
    let mut pids = Vec::new();
    while started.elapsed() < Duration::from_secs(30) && pids.len() < 4 {
        std::thread::sleep(Duration::from_millis(500));
        pids = processes_marked(&mark);
    }
    assert_eq!(pids.len(), 4, "expected 4 rank processes under srun, found {pids:?}");
    std::thread::sleep(Duration::from_secs(2)); // training, not starting up
    let (status, took, err) = kill_rank_and_wait(child, &pids[2].to_string(), "srun");
    assert!(!status.success());
    assert!(took <= Duration::from_secs(60), "took {took:?}");
    assert!(err.contains("task") && err.contains("Killed"), "srun does not name the killed task:\n{err}");
    assert!(processes_marked(&mark).is_empty(), "ranks left running after the job ended");
}

/// Runs example `name` under `mpirun -np np`: its stdout and stderr, after checking it succeeded.
fn mpirun_example(name: &str, np: usize) -> (String, String) {
    let dir = std::env::var_os("TESSERA_EXAMPLES_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tessera_bin().parent().unwrap().join("examples"));
    let exe = dir.join(name);
    assert!(exe.exists(), "{} was not built (cargo builds examples for the tests)", exe.display());
    let o = Command::new("mpirun")
        .args(["-np", &np.to_string(), "--oversubscribe", "--bind-to", "none"])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("TESSERA_COMM_TIMEOUT", "60")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .arg(&exe)
        .output()
        .unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned());
    assert!(o.status.success(), "mpirun -np {np} {name}: {out}{err}");
    (out, err)
}

#[test]
fn the_mpi_communicator_all_reduces_broadcasts_sends_and_receives() {
    if !mpirun_present() {
        return;
    }
    for np in [1, 3, 4] {
        let (out, err) = mpirun_example("mpi_collectives", np);
        assert!(out.contains(&format!("mpi collectives: ok on {np} ranks")), "{out}{err}");
    }
}

/// A researcher's own model (`examples/own_layer.rs`) across processes: dp 2 x pp 2 on 4
/// ranks, the blocks' shared matrix summed between the two stages' ranks, against one device.
#[test]
fn a_researchers_own_layer_trains_across_processes() {
    if !mpirun_present() {
        return;
    }
    let (out, err) = mpirun_example("own_layer_mpi", 4);
    assert!(out.contains("own layer under mpi: ok"), "{out}{err}");
}

/// The GPT across processes: `tessera train --model gpt` under `mpirun -np 2` (dp 2, with and
/// without ZeRO 1; and dp 2 x pp 2 with it) and
/// under `-np 4` the oracle grid's four-rank meshes (dp 2 x pp 2 and pp 4, each with 1 and 4
/// microbatches, GPipe and 1F1B; the tied wte on the first and last rank's stages) ends 5 SGD
/// steps with the single process's weights, within the oracle's 1e-5; rank 0 alone prints the
/// result.
#[test]
fn gpt_ranks_across_processes_match_the_single_device_run() {
    if !mpirun_present() {
        return;
    }
    let base = [
        "train",
        "--model",
        "gpt",
        "--device",
        "cpu",
        "--width",
        "32",
        "--heads",
        "2",
        "--layers",
        "2",
        "--context",
        "16",
        "--batch",
        "8",
        "--optimizer",
        "sgd",
        "--lr",
        "0.1",
        "--steps",
        "5",
        "--eval-every",
        "5",
    ];
    let reference = tmp("gpt-mpi-ref.safetensors");
    let mut a = base.to_vec();
    a.extend_from_slice(&["--save", reference.to_str().unwrap()]);
    let (ok, _, err) = tessera(&a);
    assert!(ok, "{err}");
    let want = params(&reference);
    let mut meshes: Vec<(usize, Vec<&str>)> = vec![(2, vec!["--dp", "2"]), (2, vec!["--dp", "2", "--zero", "1"])];
    meshes.push((4, vec!["--dp", "2", "--pp", "2", "--microbatches", "4", "--zero", "1"]));
    meshes.push((4, vec!["--dp", "2", "--tp", "2", "--zero", "1"]));
    meshes.push((4, vec!["--pp", "2", "--tp", "2", "--microbatches", "2"]));
    // The whole mesh: dp 2 x pp 2 x tp 2 with ZeRO 1 on 8 ranks.
    meshes.push((8, vec!["--dp", "2", "--pp", "2", "--tp", "2", "--zero", "1", "--microbatches", "2"]));
    for (dp, pp) in [("2", "2"), ("1", "4")] {
        for m in ["1", "4"] {
            for s in ["gpipe", "1f1b"] {
                meshes.push((4, vec!["--dp", dp, "--pp", pp, "--microbatches", m, "--schedule", s]));
            }
        }
    }
    for (np, mesh) in &meshes {
        let (np, mesh) = (*np, mesh.as_slice());
        let out = tmp(&format!("gpt-mpi-{np}-{}.safetensors", mesh.join("")));
        let mut a = base.to_vec();
        a.extend_from_slice(&["--save", out.to_str().unwrap(), "--json"]);
        a.extend_from_slice(mesh);
        let (ok, stdout, err) = mpirun(np, &a);
        assert!(ok, "mpirun -n {np} {mesh:?} failed:\n{err}");
        let j: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|_| panic!("{stdout}"));
        assert_eq!(j["steps"], 5, "rank 0 prints, once: {stdout}");
        let e = rel_err(&params(&out), &want);
        eprintln!("mpirun -n {np} {mesh:?} (gpt): ||w - w_ref|| / ||w_ref|| = {e:.2e}");
        assert!(e <= 1e-5, "mpirun -n {np} {mesh:?} (gpt): relative error {e:.3e}");
    }
}
