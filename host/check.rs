//! The comparison harness every op test goes through: worst absolute and relative error,
//! the first mismatches, seeded awkward inputs and output poisoning.

use std::fmt;

use crate::rng::Rng;

/// The value outputs are filled with before an op runs, so an element it forgets to write
/// shows up as a mismatch instead of a lucky zero.
pub const POISON: f32 = f32::NAN;

/// The outcome of comparing a result with the reference.
#[derive(Debug, Clone)]
pub struct Report {
    /// What was compared.
    pub name: String,
    /// Elements compared.
    pub len: usize,
    /// Worst `|got - want|`.
    pub max_abs: f64,
    /// Worst `|got - want| / |want|` over the elements whose `|want|` is at least 1e-3 of
    /// the largest (near-zero references make relative errors meaningless).
    pub max_rel: f64,
    /// Elements outside `atol + rtol*|want|`.
    pub mismatches: usize,
    /// The first few mismatches: (index, got, want).
    pub first: Vec<(usize, f32, f64)>,
}

impl Report {
    /// Whether every element was within tolerance.
    pub fn ok(&self) -> bool {
        self.mismatches == 0
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} elements, max abs err {:.3e}, max rel err {:.3e}, {} mismatches",
            self.name, self.len, self.max_abs, self.max_rel, self.mismatches
        )?;
        for (i, g, w) in &self.first {
            write!(f, "\n    [{i}] got {g} want {w}")?;
        }
        Ok(())
    }
}

/// Compares `got` with `want`: element `i` passes when `|got - want| <= atol + rtol*|want|`.
/// A NaN (a poisoned, unwritten element) or a length difference always fails.
pub fn compare(name: &str, got: &[f32], want: &[f64], atol: f64, rtol: f64) -> Report {
    let mut r =
        Report { name: name.to_string(), len: want.len(), max_abs: 0.0, max_rel: 0.0, mismatches: 0, first: vec![] };
    if got.len() != want.len() {
        r.mismatches = got.len().abs_diff(want.len()).max(1);
        r.first.push((got.len().min(want.len()), f32::NAN, f64::NAN));
        r.name = format!("{name} (length {} vs reference {})", got.len(), want.len());
        return r;
    }
    let floor = 1e-3 * want.iter().fold(0f64, |m, w| m.max(w.abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let abs = (g as f64 - w).abs();
        let rel = abs / w.abs().max(1e-30);
        // Written so that a NaN error counts as bad.
        let within = abs <= atol + rtol * w.abs();
        let bad = !within;
        if abs.is_nan() {
            r.max_abs = f64::NAN;
            r.max_rel = f64::NAN;
        } else if !r.max_abs.is_nan() {
            r.max_abs = r.max_abs.max(abs);
            r.max_rel = r.max_rel.max(if w.abs() >= floor { rel } else { 0.0 });
        }
        if bad {
            r.mismatches += 1;
            if r.first.len() < 5 {
                r.first.push((i, g, w));
            }
        }
    }
    r
}

/// Panics with the report when it failed; prints it when it passed.
pub fn assert_close(name: &str, got: &[f32], want: &[f64], atol: f64, rtol: f64) -> Report {
    let r = compare(name, got, want, atol, rtol);
    assert!(r.ok(), "{r}");
    r
}

/// Seeded inputs in `[-scale, scale)`, never all zeros.
pub fn inputs(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    Rng::new(seed).vec(n, -scale, scale)
}

/// Central finite difference of `f` at `x` along coordinate `i`.
pub fn finite_diff(f: impl Fn(&[f64]) -> f64, x: &[f64], i: usize, h: f64) -> f64 {
    let mut xp = x.to_vec();
    let mut xm = x.to_vec();
    xp[i] += h;
    xm[i] -= h;
    (f(&xp) - f(&xm)) / (2.0 * h)
}

/// GPU 0 for a test or bench that needs one, or `None` after a line saying why it skipped (no
/// driver, a driver that cannot be used, no GPU, `cuInit` failing as a toolkit's stub library
/// does). With `TESSERA_REQUIRE_GPU=1` (set by `scripts/gpu-check.sh`) a missing GPU is a
/// failure instead: on the machine that is meant to have one, a test that skips would pass
/// silently. A GPU that is there but cannot run the kernels always fails.
pub fn gpu_or_skip(what: &str) -> Option<crate::CudaDevice> {
    let why = match crate::backend::cuda::gpu_count() {
        Ok(0) => {
            crate::backend::cuda::driver_problem().map_or_else(|| "the driver sees no GPU".into(), |p| p.to_string())
        }
        Ok(_) => {
            return Some(
                crate::CudaDevice::new(0).unwrap_or_else(|e| panic!("a GPU is present but tessera cannot use it: {e}")),
            )
        }
        Err(e) => e.to_string(),
    };
    if std::env::var("TESSERA_REQUIRE_GPU").is_ok_and(|v| v == "1") {
        panic!("TESSERA_REQUIRE_GPU=1 but no usable GPU for {what}: {why}");
    }
    eprintln!("skipped: no CUDA device ({what}: {why})");
    None
}

/// C source of a fake NCCL 2.23.4: `ncclGetVersion` and every other entry point tessera binds
/// (which fail if called), to test how NCCL is found without NCCL (build it with `cc -shared
/// -fPIC` as `libnccl.so.2`).
pub fn fake_nccl_c_source() -> String {
    let mut c = String::from("int ncclGetVersion(int* v) { *v = 22304; return 0; }\n");
    for f in [
        "ncclGetUniqueId",
        "ncclCommInitRank",
        "ncclCommDestroy",
        "ncclAllReduce",
        "ncclBroadcast",
        "ncclReduceScatter",
        "ncclAllGather",
        "ncclSend",
        "ncclRecv",
    ] {
        c.push_str(&format!("int {f}(void) {{ return 1; }}\n"));
    }
    c.push_str("const char* ncclGetErrorString(int r) { (void)r; return \"fake\"; }\n");
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_flags_nan_and_far_values() {
        let r = compare("x", &[1.0, f32::NAN, 3.5], &[1.0, 2.0, 3.0], 1e-6, 1e-6);
        assert_eq!(r.mismatches, 2);
        assert_eq!(r.first[0].0, 1);
        assert!(r.to_string().contains("[2] got 3.5 want 3"), "{r}");
        let r = compare("y", &[1.0, 2.0], &[1.0, 2.0 + 1e-9], 1e-6, 1e-6);
        assert!(r.ok());
        assert!(!compare("z", &[1.0], &[1.0, 2.0], 1.0, 1.0).ok());
    }

    #[test]
    fn finite_diff_of_a_square() {
        let d = finite_diff(|x| x[0] * x[0], &[3.0], 0, 1e-4);
        assert!((d - 6.0).abs() < 1e-6);
    }
}
