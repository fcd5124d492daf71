//! What a new user and an adversary hit, through the command line: saves that must never destroy
//! or mix up data, printing into closed pipes, signals during a run, checkpoints resumed on other
//! data, data that is wrong before training starts, flags that once panicked or lied, and a CUDA
//! driver library that is not a whole driver.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{tessera, tessera_bin, tessera_env, tmp};
use tessera::checkpoint::Checkpoint;

/// A small, fast run.
const SMALL: [&str; 8] = ["train", "--device", "cpu", "--widths", "784,16,10", "--batch", "100", "--json"];

fn small(extra: &[&str]) -> (bool, String, String) {
    let mut a = SMALL.to_vec();
    a.extend_from_slice(extra);
    tessera(&a)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A fresh folder in the test's temporary folder.
fn fresh_dir(name: &str) -> PathBuf {
    let d = tmp(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect()
}

// ---- 2. Saving -------------------------------------------------------------------------------

#[test]
fn save_refuses_what_is_not_a_regular_file() {
    use std::os::unix::fs::FileTypeExt;
    let dir = fresh_dir("not-regular");
    let fifo = dir.join("fifo");
    let c = std::ffi::CString::new(s(&fifo)).unwrap();
    // SAFETY: mkfifo with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    for (target, kind) in [(s(&fifo), "a FIFO"), (s(&dir), "a directory"), ("/dev/null", "a character device")] {
        let (ok, _, err) = small(&["--steps", "1", "--save", target]);
        assert!(!ok, "--save {target} was accepted");
        assert!(err.contains(kind) && err.contains("not a regular file"), "{err}");
        // The pictures too: an SVG written into a FIFO would wait forever for a reader.
        let (ok, _, err) = small(&["--steps", "1", "--timeline", target]);
        assert!(!ok && err.contains(kind), "--timeline {target}: {err}");
        let (ok, _, err) = tessera(&["plan", "--device", "cpu:2", "--svg", target]);
        assert!(!ok && err.contains(kind), "--svg {target}: {err}");
    }
    assert!(std::fs::metadata("/dev/null").unwrap().file_type().is_char_device(), "/dev/null was replaced");
    assert!(std::fs::symlink_metadata(&fifo).unwrap().file_type().is_fifo());
    // The library refuses too, whatever the caller checked before.
    let e = tessera::checkpoint::write_atomically(&fifo, b"x").unwrap_err().to_string();
    assert!(e.contains("a FIFO"), "{e}");
    // A symbolic link to a regular file: the file is replaced, the link kept.
    let real = dir.join("real.st");
    std::fs::write(&real, b"old").unwrap();
    let link = dir.join("link.st");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let (ok, _, err) = small(&["--steps", "1", "--save", s(&link)]);
    assert!(ok, "{err}");
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
    assert!(Checkpoint::load(&real).is_ok());
    assert!(leftovers(&dir).is_empty(), "{:?}", leftovers(&dir));
}

/// A save that fails (the file-size limit standing in for a full disk) leaves no temporary file,
/// and the next save to the same place works.
#[test]
fn a_failed_save_leaves_nothing_behind() {
    let dir = fresh_dir("failed-save");
    let path = dir.join("c.st");
    let mut args: Vec<String> = SMALL.iter().map(|a| a.to_string()).collect();
    args.extend(["--steps", "1", "--save", s(&path)].map(String::from));
    // 64 KiB at most per file, and SIGXFSZ ignored: the write fails with EFBIG.
    let o = Command::new("bash")
        .arg("-c")
        .arg("ulimit -f 64; trap '' XFSZ; exec \"$0\" \"$@\"")
        .arg(tessera_bin())
        .args(&args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "the save did not fail under ulimit -f: {err}");
    assert!(err.contains("--save") && err.contains(s(&path)), "{err}");
    assert!(leftovers(&dir).is_empty(), "a failed save left {:?}", leftovers(&dir));
    assert!(!path.exists());
    let (ok, _, err) = small(&["--steps", "1", "--save", s(&path)]);
    assert!(ok, "{err}");
    assert!(Checkpoint::load(&path).is_ok());
}

/// `tessera train --save c.st | true`: stdout closes before the result is printed; the run
/// still saves and exits 0, without a panic.
#[test]
fn a_closed_stdout_does_not_lose_the_run() {
    let dir = fresh_dir("closed-stdout");
    let path = dir.join("c.st");
    let mut child = Command::new(tessera_bin())
        .args(["train", "--device", "cpu", "--widths", "784,16,10", "--steps", "3", "--save", s(&path)])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader is gone before anything was written
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("saved"), "{err}");
    assert_eq!(Checkpoint::load(&path).unwrap().step, 3);
}

/// `tessera kernels --verbose | head -1`: printing stops quietly, exit 0.
#[test]
fn a_reader_that_leaves_early_ends_printing_quietly() {
    let mut child = Command::new(tessera_bin())
        .args(["kernels", "--verbose"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    assert!(first.starts_with("manifest:"), "{first}");
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// `tessera ARGS --save save`, started and read up to its run line (printed once the signal
/// handler is in place): the child and the rest of its stderr.
fn start_training(args: &[&str], save: &Path) -> (std::process::Child, BufReader<std::process::ChildStderr>) {
    let mut child = Command::new(tessera_bin())
        .args(args)
        .args(["--save", s(save)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.starts_with("model:") {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "tessera ended before training");
    }
    (child, stderr)
}

/// SIGINT (or SIGTERM) during a run: it stops at a step boundary, saves, says so and exits
/// 130 (143); resuming gives exactly the weights of the uninterrupted run.
#[test]
fn a_signal_stops_the_run_at_a_step_and_saves_it() {
    let dir = fresh_dir("signal");
    for (sig, code, name) in [(libc::SIGINT, 130, "SIGINT"), (libc::SIGTERM, 143, "SIGTERM")] {
        let part = dir.join(format!("part-{name}.st"));
        let args = ["train", "--device", "cpu", "--widths", "784,32,10", "--batch", "50", "--steps", "20000"];
        // The run line is printed once the handler is in place; then let it take some steps.
        let (mut child, mut stderr) = start_training(&args, &part);
        std::thread::sleep(std::time::Duration::from_millis(300));
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, sig) };
        let mut err = String::new();
        stderr.read_to_string(&mut err).unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.code(), Some(code), "{err}");
        assert!(err.contains(&format!("interrupted by {name} at step")) && err.contains("--resume"), "{err}");
        let ck = Checkpoint::load(&part).unwrap();
        assert!(ck.step > 0 && ck.step < 20000, "stopped at step {}", ck.step);

        // Resumed to 600 steps past the stop, against one run of the same length.
        let total = (ck.step + 600).to_string();
        let (resumed, straight) = (dir.join("resumed.st"), dir.join("straight.st"));
        let (ok, _, err) =
            tessera(&["train", "--device", "cpu", "--resume", s(&part), "--steps", &total, "--save", s(&resumed)]);
        assert!(ok, "{err}");
        let mut a = args.to_vec();
        a[args.len() - 1] = &total;
        a.extend(["--save", s(&straight)]);
        let (ok, _, err) = tessera(&a);
        assert!(ok, "{err}");
        assert_eq!(Checkpoint::load(&resumed).unwrap().params, Checkpoint::load(&straight).unwrap().params);
    }
}

/// A second Ctrl-C while the first waits for the step to end: exit at once (130), nothing saved.
#[test]
fn a_second_signal_exits_at_once() {
    let dir = fresh_dir("second-signal");
    let part = dir.join("never.st");
    // Steps of a wide model on a large batch take tens of milliseconds: both signals land in one.
    let args = ["train", "--device", "cpu", "--widths", "784,8192,10", "--batch", "8000", "--steps", "1000"];
    let (mut child, mut stderr) = start_training(&args, &part);
    let mut line = String::new();
    // The first step (about 100 GFLOP) has begun and is far from its end.
    std::thread::sleep(std::time::Duration::from_millis(100));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    // The second only once the first was taken (two pending SIGINTs would merge into one).
    line.clear();
    while !line.contains("stopping after this step") {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "tessera ended without taking the first signal");
    }
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let mut err = String::new();
    stderr.read_to_string(&mut err).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(!err.contains("interrupted by SIGINT at step"), "the run went on to its step boundary:\n{err}");
    assert!(!part.exists());
}

// ---- 3. Loading ------------------------------------------------------------------------------

/// A checkpoint remembers its data: resuming on other data is refused, naming both.
#[test]
fn a_checkpoint_is_not_resumed_on_other_data() {
    let dir = fresh_dir("other-data");
    write_mnist_dir(&dir, 300, 100, 10, 784);
    let ck = dir.join("vendored.st");
    let (ok, _, err) = small(&["--steps", "2", "--save", s(&ck)]);
    assert!(ok, "{err}");
    let (ok, _, err) = tessera(&["train", "--device", "cpu", "--resume", s(&ck), "--steps", "4", "--data", s(&dir)]);
    assert!(!ok);
    assert!(err.contains("mnist-10k (vendored)") && err.contains(s(&dir)) && err.contains("same data"), "{err}");
    // And one directory's files from another's.
    let other = fresh_dir("other-data-2");
    write_mnist_dir(&other, 300, 100, 10, 784);
    std::fs::write(other.join("t10k-labels-idx1-ubyte"), idx(&[100], &[3u8; 100])).unwrap();
    let ck2 = dir.join("dir.st");
    let (ok, _, err) = small(&["--steps", "2", "--save", s(&ck2), "--data", s(&dir)]);
    assert!(ok, "{err}");
    let (ok, _, err) = tessera(&["train", "--device", "cpu", "--resume", s(&ck2), "--steps", "4", "--data", s(&other)]);
    assert!(!ok);
    assert!(err.contains("crc32"), "{err}");
    let (ok, _, err) = tessera(&["train", "--device", "cpu", "--resume", s(&ck2), "--steps", "4", "--data", s(&dir)]);
    assert!(ok, "{err}");
}

/// A flipped byte in a saved weight is refused before anything is used.
#[test]
fn a_flipped_byte_is_refused() {
    let dir = fresh_dir("flipped");
    let path = dir.join("c.st");
    let (ok, _, err) = small(&["--steps", "1", "--save", s(&path)]);
    assert!(ok, "{err}");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 1001] ^= 0x10;
    std::fs::write(&path, &bytes).unwrap();
    let (ok, _, err) = tessera(&["train", "--device", "cpu", "--resume", s(&path), "--steps", "2"]);
    assert!(!ok);
    assert!(err.contains("checksum") && err.contains("corrupt"), "{err}");
}

// ---- 4. Data ---------------------------------------------------------------------------------

fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, dims.len() as u8];
    for d in dims {
        v.extend(d.to_be_bytes());
    }
    v.extend_from_slice(data);
    v
}

/// Four IDX files: `train` and `test` rows of `dim` pixels, labels cycling through `classes`.
fn write_mnist_dir(dir: &Path, train: usize, test: usize, classes: u8, dim: usize) {
    let side = (dim as f64).sqrt() as u32;
    let (r, c) = if (side * side) as usize == dim { (side, side) } else { (1, dim as u32) };
    for (stem, n) in [("train", train), ("t10k", test)] {
        let pixels: Vec<u8> = (0..n * dim).map(|i| ((i * 37) % 251) as u8).collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % classes as usize) as u8).collect();
        std::fs::write(dir.join(format!("{stem}-images-idx3-ubyte")), idx(&[n as u32, r, c], &pixels)).unwrap();
        std::fs::write(dir.join(format!("{stem}-labels-idx1-ubyte")), idx(&[n as u32], &labels)).unwrap();
    }
}

#[test]
fn the_test_set_is_checked_before_training() {
    // Empty test set.
    let d = fresh_dir("empty-test");
    write_mnist_dir(&d, 200, 0, 10, 784);
    let (ok, out, err) = small(&["--steps", "1", "--data", s(&d)]);
    assert!(!ok, "{out}");
    assert!(err.contains("the test set is empty"), "{err}");
    // Test images of another size.
    let d = fresh_dir("other-size");
    write_mnist_dir(&d, 200, 50, 10, 784);
    let other = fresh_dir("other-size-src");
    write_mnist_dir(&other, 10, 50, 10, 400);
    std::fs::copy(other.join("t10k-images-idx3-ubyte"), d.join("t10k-images-idx3-ubyte")).unwrap();
    let (ok, _, err) = small(&["--steps", "1", "--data", s(&d)]);
    assert!(!ok);
    assert!(err.contains("the test images have 400 pixels, the training images 784"), "{err}");
    // A test label the model cannot give: 5 classes to train on, labels up to 9 in the test set.
    let d = fresh_dir("test-labels");
    write_mnist_dir(&d, 200, 50, 10, 784);
    let five = fresh_dir("five-classes");
    write_mnist_dir(&five, 200, 50, 5, 784);
    std::fs::copy(five.join("train-labels-idx1-ubyte"), d.join("train-labels-idx1-ubyte")).unwrap();
    let (ok, _, err) = tessera(&["train", "--device", "cpu", "--widths", "784,16,5", "--steps", "1", "--data", s(&d)]);
    assert!(!ok);
    assert!(err.contains("the test set has label 9") && err.contains("5 outputs"), "{err}");
    // Data with 5 classes says 5.
    let (ok, _, err) =
        tessera(&["train", "--device", "cpu", "--widths", "784,16,3", "--steps", "1", "--data", s(&five)]);
    assert!(!ok);
    assert!(err.contains("5 classes"), "{err}");
}

// ---- 5. Flags, plans, devices ----------------------------------------------------------------

#[test]
fn impossible_plans_are_explained_not_panics() {
    // Hidden widths of 511 = 7 x 73: no tensor-parallel split of 2, 4 or 1000 devices helps
    // either (where one does, the planner uses it: see tests/parallel.rs).
    const W: [&str; 2] = ["--widths", "784,511,511,10"];
    for args in [
        &["train", "--device", "cpu:1000", "--steps", "1", W[0], W[1]][..],
        &["train", "--device", "cpu:4", "--batch", "1", "--steps", "1", W[0], W[1]],
        &["plan", "--device", "cpu:1000", W[0], W[1]],
        &["plan", "--device", "cpu:4", "--batch", "1", W[0], W[1]],
    ] {
        let (ok, _, err) = tessera(args);
        assert!(!ok, "{args:?}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert!(err.contains("no plan splits batch"), "{args:?}: {err}");
    }
    let (ok, _, err) = tessera(&["plan", "--batch", "0"]);
    assert!(!ok && !err.contains("panicked") && err.contains("at least 1"), "{err}");
}

#[test]
fn a_model_that_cannot_fit_is_refused_before_allocating() {
    let (ok, _, err) = tessera(&["train", "--device", "cpu", "--widths", "784,100000000,10", "--steps", "1"]);
    assert!(!ok);
    assert!(err.contains("does not fit") && err.contains("the device has"), "{err}");
    // `plan` on one device honours --memory.
    let (ok, _, err) = tessera(&["plan", "--device", "cpu", "--memory", "1MiB"]);
    assert!(!ok);
    assert!(err.contains("does not fit") && err.contains("the device has 1.0 MiB"), "{err}");
    let (ok, out, err) = tessera(&["plan", "--device", "cpu", "--memory", "1GiB"]);
    assert!(ok, "{err}");
    assert!(out.contains("plan:"), "{out}");
    // Widths whose parameter count overflows are refused while parsing.
    let (ok, _, err) = tessera(&["train", "--device", "cpu", "--widths", "784,9000000000000,10", "--steps", "1"]);
    assert!(!ok && !err.contains("panicked"), "{err}");
}

#[test]
fn flags_out_of_range_are_refused() {
    let (ok, _, err) = small(&["--epochs", "292805461487453201"]);
    assert!(!ok);
    assert!(err.contains("--epochs") && err.contains("more than the step counter"), "{err}");
    let (ok, _, err) = small(&["--steps", "10", "--lr-schedule", "cosine", "--warmup", "11"]);
    assert!(!ok);
    assert!(err.contains("--warmup 11 is longer than the run (10 steps)"), "{err}");
    let (ok, _, err) = tessera(&["plan", "--device", "cpu:2", "--gflops", "1e-300"]);
    assert!(!ok);
    assert!(err.contains("--gflops"), "{err}");
    let (ok, _, err) = tessera(&["plan", "--device", "cpu:2", "--memory=-5GiB"]);
    assert!(!ok);
    assert!(err.contains("negative"), "{err}");
}

/// A fake `libcuda.so.1` in a folder put first on LD_LIBRARY_PATH: with only `cuInit` (a stub),
/// or complete but reporting no device.
fn fake_driver(name: &str, complete: bool) -> Option<PathBuf> {
    let dir = fresh_dir(name);
    let mut c = String::from("typedef int CUresult;\n");
    if complete {
        for sym in tessera::backend::cuda::REQUIRED_DRIVER_SYMBOLS {
            match *sym {
                "cuInit" => c.push_str("CUresult cuInit(unsigned f) { (void)f; return 100; }\n"),
                "cuDriverGetVersion" => c.push_str("CUresult cuDriverGetVersion(int* v) { *v = 13000; return 0; }\n"),
                other => c.push_str(&format!("CUresult {other}(void) {{ return 999; }}\n")),
            }
        }
    } else {
        c.push_str("CUresult cuInit(unsigned f) { (void)f; return 0; }\n");
    }
    std::fs::write(dir.join("fake.c"), c).unwrap();
    let lib = dir.join("libcuda.so.1");
    let cc = Command::new("cc").args(["-shared", "-fPIC", "-o", s(&lib), s(&dir.join("fake.c"))]).status();
    if !cc.is_ok_and(|s| s.success()) {
        eprintln!("skipped: no C compiler to build a fake libcuda");
        return None;
    }
    std::fs::copy(&lib, dir.join("libcuda.so")).unwrap();
    Some(dir)
}

#[test]
fn a_driver_library_without_its_entry_points_is_refused_not_a_panic() {
    let Some(dir) = fake_driver("stub-libcuda", false) else { return };
    let env = [("LD_LIBRARY_PATH", s(&dir))];
    let (ok, out, err) = tessera_env(&["devices"], &env);
    assert!(ok, "{err}");
    assert!(out.contains("CUDA driver: unusable") && out.contains("lacks"), "{out}");
    let (ok, out, err) = tessera_env(&["train", "--device", "auto", "--widths", "784,16,10", "--steps", "1"], &env);
    assert!(ok, "{err}");
    assert!(err.contains("device: auto chose cpu") && err.contains("lacks"), "{err}");
    assert!(out.contains("test accuracy"), "{out}");
    let (ok, _, err) = tessera_env(&["train", "--device", "cuda", "--steps", "1"], &env);
    assert!(!ok && !err.contains("panicked"), "{err}");
    assert!(err.contains("lacks"), "{err}");
}

#[test]
fn devices_exits_0_when_the_driver_sees_no_gpu() {
    let Some(dir) = fake_driver("no-device-libcuda", true) else { return };
    let (ok, out, err) = tessera_env(&["devices"], &[("LD_LIBRARY_PATH", s(&dir))]);
    assert!(ok, "{err}");
    assert!(out.contains("CUDA driver: 13000") && out.contains("GPUs: none visible"), "{out}");
}

/// A GPU test that finds no usable GPU (here a stub libcuda put first on the path, as a
/// toolkit's `stubs/` folder would be) says it skipped; with `TESSERA_REQUIRE_GPU=1`, as
/// `scripts/gpu-check.sh` sets, it fails instead of passing silently.
#[test]
fn require_gpu_turns_a_skip_into_a_failure() {
    // In the child processes below (this test run again), only the GPU lookup.
    if std::env::var_os("TESSERA_TEST_GPU_PROBE").is_some() {
        tessera::check::gpu_or_skip("the probe");
        return;
    }
    let Some(dir) = fake_driver("require-gpu-libcuda", false) else { return };
    let probe = |require: bool| {
        let mut c = Command::new(std::env::current_exe().unwrap());
        c.args(["--exact", "require_gpu_turns_a_skip_into_a_failure", "--nocapture"])
            .env("TESSERA_TEST_GPU_PROBE", "1")
            .env("LD_LIBRARY_PATH", s(&dir));
        if require {
            c.env("TESSERA_REQUIRE_GPU", "1");
        } else {
            c.env_remove("TESSERA_REQUIRE_GPU");
        }
        let o = c.output().unwrap();
        (o.status.success(), String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr))
    };
    let (ok, out) = probe(false);
    assert!(ok && out.contains("skipped: no CUDA device (the probe: ") && out.contains("lacks"), "{out}");
    let (ok, out) = probe(true);
    assert!(!ok && out.contains("TESSERA_REQUIRE_GPU=1 but no usable GPU for the probe"), "{out}");
}

/// `tessera devices` finds NCCL under the name its packages ship, `libnccl.so.2`, on
/// `LD_LIBRARY_PATH` (the loader's own search, as a real run uses), and says what it tried where
/// there is none.
#[test]
fn nccl_is_found_as_libnccl_so_2_on_the_library_path() {
    let dir = fresh_dir("fake-nccl");
    let c = tessera::check::fake_nccl_c_source();
    std::fs::write(dir.join("fake.c"), c).unwrap();
    let lib = dir.join("libnccl.so.2");
    let cc = Command::new("cc").args(["-shared", "-fPIC", "-o", s(&lib), s(&dir.join("fake.c"))]).status();
    if !cc.is_ok_and(|s| s.success()) {
        eprintln!("skipped: no C compiler to build a fake libnccl.so.2");
        return;
    }
    let (ok, out, err) = tessera_env(&["devices"], &[("LD_LIBRARY_PATH", s(&dir))]);
    assert!(ok, "{err}");
    assert!(out.contains("NCCL: 2.23.4 (libnccl.so.2)"), "{out}");
    let (ok, out, err) = tessera_env(&["devices"], &[("LD_LIBRARY_PATH", s(&fresh_dir("no-nccl")))]);
    assert!(ok, "{err}");
    if !out.contains("NCCL: 2.") {
        assert!(out.contains("NCCL: not usable") && out.contains("libnccl.so.2 (not found)"), "{out}");
    }
}
