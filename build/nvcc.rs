//! Finding nvcc and compiling the kernels: one fatbin per `.cu` file, the `ptxas -v` report,
//! the PTX of the lowest PTX arch to read, a hash per kernel.

use std::collections::BTreeMap;
use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::parse::Family;

#[derive(Default, Clone)]
pub(crate) struct PtxasEntry {
    pub(crate) registers: u32,
    pub(crate) smem: u32,
    pub(crate) stack: u32,
    pub(crate) spill_stores: u32,
    pub(crate) spill_loads: u32,
}

pub(crate) struct Build {
    pub(crate) toolkit: String,
    pub(crate) ptx_isa: String,
    pub(crate) fatbins: BTreeMap<String, PathBuf>,
    /// (kernel, arch) -> report
    pub(crate) ptxas: BTreeMap<(String, String), PtxasEntry>,
    pub(crate) hashes: BTreeMap<String, u64>,
}

/// The shared toolchain folder: `$XDG_DATA_HOME/tessera/cuda`, else
/// `$HOME/.local/share/tessera/cuda` (scripts/setup.sh computes the same).
pub(crate) fn shared_toolchain() -> Option<PathBuf> {
    let data = env::var_os("XDG_DATA_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").filter(|h| !h.is_empty()).map(|h| PathBuf::from(h).join(".local/share")))?;
    Some(data.join("tessera/cuda"))
}

pub(crate) fn find_nvcc(root: &Path) -> Option<PathBuf> {
    let exe = if cfg!(windows) { "nvcc.exe" } else { "nvcc" };
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(p) = env::var("NVCC") {
        candidates.push(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(p) = env::var(var) {
            candidates.push(Path::new(&p).join("bin").join(exe));
        }
    }
    if let Some(path) = env::var_os("PATH") {
        candidates.extend(env::split_paths(&path).map(|d| d.join(exe)));
    }
    // The pinned wheels where scripts/setup.sh puts them: $TESSERA_CUDA_TOOLCHAIN, the
    // project's .toolchain/cuda, and the shared folder (`setup.sh --shared`) that a crate
    // depending on tessera through git (built from cargo's checkout) finds too.
    let wheel = |dir: PathBuf| dir.join("nvidia/cu13/bin").join(exe);
    if let Some(dir) = env::var_os("TESSERA_CUDA_TOOLCHAIN") {
        candidates.push(wheel(PathBuf::from(dir)));
    }
    candidates.push(wheel(root.join(".toolchain/cuda")));
    if let Some(shared) = shared_toolchain() {
        candidates.push(wheel(shared));
    }
    candidates.into_iter().find(|c| c.is_file())
}

pub(crate) fn compile_all(nvcc: &Path, kdir: &Path, out: &Path, families: &[Family], archs: &[String]) -> Build {
    let version =
        Command::new(nvcc).arg("--version").output().unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
    let vtext = String::from_utf8_lossy(&version.stdout).to_string();
    let toolkit = vtext
        .lines()
        .find_map(|l| l.split("release ").nth(1))
        .map(|s| s.split(',').next().unwrap().trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let ptx_arch = archs
        .iter()
        .filter(|a| a.starts_with("compute_"))
        .min()
        .cloned()
        .unwrap_or_else(|| archs.iter().min().unwrap().replace("sm_", "compute_"));

    let mut gencode = Vec::new();
    for a in archs {
        let num = a.trim_start_matches("sm_").trim_start_matches("compute_");
        gencode.push("-gencode".to_string());
        gencode.push(format!("arch=compute_{num},code={a}"));
    }

    // Compile every family in parallel: nvcc is single-threaded per file.
    let results: Vec<(String, String, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = families
            .iter()
            .map(|f| {
                let gencode = gencode.clone();
                let ptx_arch = ptx_arch.clone();
                s.spawn(move || {
                    let fatbin = out.join(format!("{}.fatbin", f.stem));
                    let ptx = out.join(format!("{}.ptx", f.stem));
                    let mut cmd = Command::new(nvcc);
                    cmd.args(["-fatbin", "-O3", "-std=c++17", "-Xptxas", "-v", "-lineinfo"])
                        .arg(format!("-I{}", kdir.display()))
                        .args(&gencode)
                        .arg(&f.path)
                        .arg("-o")
                        .arg(&fatbin);
                    let o = cmd.output().unwrap_or_else(|e| panic!("cannot run nvcc: {e}"));
                    let report = String::from_utf8_lossy(&o.stderr).to_string();
                    if !o.status.success() {
                        panic!(
                            "nvcc failed on kernels/{}:\n{:?}\n{}{}",
                            f.file,
                            cmd,
                            String::from_utf8_lossy(&o.stdout),
                            report
                        );
                    }
                    let mut pcmd = Command::new(nvcc);
                    pcmd.args(["-ptx", "-O3", "-std=c++17"])
                        .arg(format!("-arch={ptx_arch}"))
                        .arg(format!("-I{}", kdir.display()))
                        .arg(&f.path)
                        .arg("-o")
                        .arg(&ptx);
                    let o = pcmd.output().unwrap_or_else(|e| panic!("cannot run nvcc: {e}"));
                    if !o.status.success() {
                        panic!("nvcc -ptx failed on kernels/{}:\n{}", f.file, String::from_utf8_lossy(&o.stderr));
                    }
                    let ptx_text = fs::read_to_string(&ptx).unwrap();
                    (f.stem.clone(), report, ptx_text)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let mut fatbins = BTreeMap::new();
    let mut ptxas = BTreeMap::new();
    let mut hashes = BTreeMap::new();
    let mut ptx_isa = String::from("unknown");
    let mut report_all = String::new();
    for (stem, report, ptx_text) in &results {
        let fatbin = out.join(format!("{stem}.fatbin"));
        let len = fs::metadata(&fatbin).map(|m| m.len()).unwrap_or(0);
        assert!(len > 0, "nvcc produced an empty fatbin for kernels/{stem}.cu");
        fatbins.insert(stem.clone(), fatbin);
        parse_ptxas(report, &mut ptxas);
        report_all.push_str(&format!("== kernels/{stem}.cu\n{report}\n"));
        if let Some(v) = ptx_text.lines().find_map(|l| l.strip_prefix(".version ")) {
            ptx_isa = v.trim().to_string();
        }
        for (name, body) in ptx_entries(ptx_text) {
            hashes.insert(name, fnv1a(body.as_bytes()));
        }
    }
    fs::write(out.join("ptxas-report.txt"), report_all).unwrap();
    for f in families {
        for k in &f.kernels {
            assert!(
                hashes.contains_key(&k.name),
                "kernel `{}` of kernels/{} is missing from nvcc's PTX output",
                k.name,
                f.file
            );
        }
    }
    Build { toolkit, ptx_isa, fatbins, ptxas, hashes }
}

pub(crate) fn parse_ptxas(report: &str, into: &mut BTreeMap<(String, String), PtxasEntry>) {
    let mut current: Option<(String, String)> = None;
    for line in report.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap().to_string();
            let arch = rest.split("for '").nth(1).and_then(|r| r.split('\'').next()).unwrap_or("?");
            let key = (name, arch.to_string());
            into.insert(key.clone(), PtxasEntry::default());
            current = Some(key);
            continue;
        }
        let Some(key) = &current else { continue };
        let e = into.get_mut(key).unwrap();
        let num_before = |word: &str| -> Option<u32> {
            let idx = line.find(word)?;
            line[..idx].split(|c: char| !c.is_ascii_digit()).rfind(|s| !s.is_empty())?.parse().ok()
        };
        if line.contains("stack frame") {
            e.stack = num_before("bytes stack frame").unwrap_or(0);
            e.spill_stores = num_before("bytes spill stores").unwrap_or(0);
            e.spill_loads = num_before("bytes spill loads").unwrap_or(0);
        }
        if line.contains("Used") && line.contains("registers") {
            e.registers = num_before("registers").unwrap_or(0);
            e.smem = num_before("bytes smem").unwrap_or(0);
        }
    }
}

/// `(name, text)` of each `.entry` in a PTX file, for the per-kernel hash.
pub(crate) fn ptx_entries(ptx: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut cur: Option<(String, String)> = None;
    for line in ptx.lines() {
        if let Some(rest) = line.split(".entry ").nth(1) {
            let name = rest.split('(').next().unwrap().trim().to_string();
            cur = Some((name, String::new()));
        }
        if let Some((_, body)) = cur.as_mut() {
            body.push_str(line);
            body.push('\n');
            if line == "}" {
                out.push(cur.take().unwrap());
            }
        }
    }
    out
}

pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}
