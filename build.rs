//! Build script: compiles `kernels/*.cu` with nvcc and generates the Rust side of every kernel.
//!
//! For each `kernels/<family>.cu` it
//! - parses every `extern "C" __global__ void NAME(ARGS)` line and generates a typed launch
//!   method (argument names and types from the `.cu`), so a kernel's name is written once;
//! - compiles one fatbin (SASS for every `sm_XX` in the arch list, PTX for every `compute_XX`),
//!   keeps the `.ptx` of the lowest PTX arch to read, and parses the `ptxas -v` report;
//! - records a compatibility manifest: toolkit version, PTX ISA, archs, a hash per kernel.
//!
//! The `#define TESSERA_NAME <int>` lines of `kernels/common.cuh` become Rust constants.
//!
//! nvcc is looked up in `$NVCC`, `$CUDA_HOME/bin`, `$CUDA_PATH/bin`, `PATH`, then the project's
//! `.toolchain/cuda` (installed by `scripts/setup.sh`). Without nvcc the crate still builds, with a
//! warning; the CUDA backend then refuses to start and says how to install the toolchain. An nvcc
//! error fails the build with the file name and nvcc's whole output. It never runs `nvidia-smi`.

use std::collections::BTreeMap;
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const DEFAULT_ARCHS: &str = "sm_80,sm_86,sm_89,sm_90,compute_80";

fn main() {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    let kdir = root.join("kernels");
    println!("cargo:rerun-if-changed=kernels");
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "PATH", "TESSERA_CUDA_ARCHS", "TESSERA_NO_NVCC"] {
        println!("cargo:rerun-if-env-changed={var}");
    }

    let mut sources: Vec<PathBuf> = fs::read_dir(&kdir)
        .expect("kernels/ directory is missing")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("cu" | "cuh")))
        .collect();
    sources.sort();
    for s in &sources {
        println!("cargo:rerun-if-changed={}", s.display());
    }
    let cu_files: Vec<PathBuf> =
        sources.iter().filter(|p| p.extension().and_then(|e| e.to_str()) == Some("cu")).cloned().collect();

    let defines = parse_defines(&fs::read_to_string(kdir.join("common.cuh")).unwrap_or_default());

    let mut families = Vec::new();
    for path in &cu_files {
        let src = fs::read_to_string(path).unwrap();
        let file = path.file_name().unwrap().to_str().unwrap().to_string();
        let kernels = parse_kernels(&file, &src);
        families.push(Family {
            file,
            stem: path.file_stem().unwrap().to_str().unwrap().to_string(),
            path: path.clone(),
            kernels,
        });
    }

    let archs_env = env::var("TESSERA_CUDA_ARCHS").unwrap_or_else(|_| DEFAULT_ARCHS.to_string());
    let archs: Vec<String> = archs_env.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    for a in &archs {
        if !(a.starts_with("sm_") || a.starts_with("compute_")) {
            panic!("TESSERA_CUDA_ARCHS: `{a}` is neither sm_XX nor compute_XX (example: {DEFAULT_ARCHS})");
        }
    }

    // TESSERA_NO_NVCC=1 (any value but empty or 0) builds without kernels, as where nvcc is missing.
    let no_nvcc = env::var("TESSERA_NO_NVCC").is_ok_and(|v| !v.is_empty() && v != "0");
    let nvcc = if no_nvcc { None } else { find_nvcc(&root) };
    let build = match &nvcc {
        Some(nvcc) => Some(compile_all(nvcc, &kdir, &out, &families, &archs)),
        None => {
            println!(
                "cargo:warning=tessera: nvcc not found ($NVCC, $CUDA_HOME/bin, $CUDA_PATH/bin, PATH, \
                 .toolchain/cuda); CUDA kernels not built. Run scripts/setup.sh to install the pinned \
                 CUDA compiler, then rebuild."
            );
            None
        }
    };

    if build.is_none() {
        fs::write(out.join("ptxas-report.txt"), "").unwrap();
    }
    let code = generate(&families, &defines, build.as_ref(), &archs);
    fs::write(out.join("kernels.rs"), code).unwrap();

    // The simulator: the same sources, compiled for the host (kernels/sim/).
    let planted_path = kdir.join("sim/planted.cu");
    println!("cargo:rerun-if-changed={}", planted_path.display());
    let planted_src = fs::read_to_string(&planted_path).expect("kernels/sim/planted.cu is missing");
    let planted = Family {
        file: "sim/planted.cu".into(),
        stem: "planted".into(),
        path: planted_path,
        kernels: parse_kernels("sim/planted.cu", &planted_src),
    };
    let sim = build_simulator(&kdir, &out, &families, &planted);
    fs::write(out.join("sim_kernels.rs"), sim).unwrap();
}

struct Param {
    name: String,
    ty: String,
}

struct Kernel {
    name: String,
    signature: String,
    params: Vec<Param>,
}

struct Family {
    file: String,
    stem: String,
    path: PathBuf,
    kernels: Vec<Kernel>,
}

#[derive(Default, Clone)]
struct PtxasEntry {
    registers: u32,
    smem: u32,
    stack: u32,
    spill_stores: u32,
    spill_loads: u32,
}

struct Build {
    toolkit: String,
    ptx_isa: String,
    fatbins: BTreeMap<String, PathBuf>,
    /// (kernel, arch) -> report
    ptxas: BTreeMap<(String, String), PtxasEntry>,
    hashes: BTreeMap<String, u64>,
}

fn parse_defines(src: &str) -> Vec<(String, i64)> {
    let mut v = Vec::new();
    for line in src.lines() {
        let mut it = line.split_whitespace();
        if it.next() != Some("#define") {
            continue;
        }
        let (Some(name), Some(val)) = (it.next(), it.next()) else { continue };
        if let (true, Ok(x)) = (name.starts_with("TESSERA_"), val.parse::<i64>()) {
            v.push((name.trim_start_matches("TESSERA_").to_string(), x));
        }
    }
    v
}

fn parse_kernels(file: &str, src: &str) -> Vec<Kernel> {
    let mut out = Vec::new();
    for line in src.lines() {
        let l = line.trim();
        if !l.starts_with("extern \"C\"") || !l.contains("__global__") {
            continue;
        }
        // The name is the word between `void` and the next '(' (`__launch_bounds__(N)` may
        // stand before `void`).
        let void = l.find(" void ").unwrap_or_else(|| panic!("{file}: cannot parse kernel line `{l}`"));
        let open = void + l[void..].find('(').unwrap_or_else(|| panic!("{file}: cannot parse kernel line `{l}`"));
        let head = &l[void..open];
        let name = head.split_whitespace().last().unwrap().to_string();
        let close =
            l.rfind(')').unwrap_or_else(|| panic!("{file}: kernel `{name}`: the parameter list must sit on one line"));
        let args = &l[open + 1..close];
        let mut params = Vec::new();
        for a in args.split(',').map(str::trim).filter(|a| !a.is_empty()) {
            let a = a.replace("__restrict__", " ");
            let toks: Vec<&str> = a.split_whitespace().collect();
            let pname = toks.last().unwrap().trim_start_matches('*').to_string();
            let ty = a[..a.rfind(&pname).unwrap()].split_whitespace().collect::<Vec<_>>().join(" ");
            let ty = ty.replace(" *", "*").replace("* ", "*").replace("*const", "* const");
            if rust_type(&ty, &pname).is_none() {
                panic!(
                    "{file}: kernel `{name}` parameter `{pname}` has type `{ty}`, which the generator does \
                     not know; use int, long long, float, const float*, float*, const int*, int* or \
                     const float* const*"
                );
            }
            params.push(Param { name: pname, ty });
        }
        let signature = l.trim_end_matches('{').trim().to_string();
        out.push(Kernel { name, signature, params });
    }
    out
}

/// The Rust parameter type of a C parameter, and how it is pushed to the launch builder.
fn rust_type(ty: &str, name: &str) -> Option<&'static str> {
    let opt = name.ends_with("_opt");
    Some(match (ty, opt) {
        ("int", _) => "i32",
        ("long long", _) => "i64",
        ("float", _) => "f32",
        ("const float*", false) => "&CudaView<'_, f32>",
        ("const float*", true) => "Option<&CudaView<'_, f32>>",
        ("float*", false) => "&mut CudaViewMut<'_, f32>",
        ("float*", true) => "Option<&mut CudaViewMut<'_, f32>>",
        ("const int*", false) => "&CudaView<'_, i32>",
        ("int*", false) => "&mut CudaViewMut<'_, i32>",
        ("const float* const*", false) => "&CudaView<'_, u64>",
        _ => return None,
    })
}

fn find_nvcc(root: &Path) -> Option<PathBuf> {
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
    candidates.push(root.join(".toolchain/cuda/nvidia/cu13/bin").join(exe));
    candidates.into_iter().find(|c| c.is_file())
}

fn compile_all(nvcc: &Path, kdir: &Path, out: &Path, families: &[Family], archs: &[String]) -> Build {
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

fn parse_ptxas(report: &str, into: &mut BTreeMap<(String, String), PtxasEntry>) {
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
fn ptx_entries(ptx: &str) -> Vec<(String, String)> {
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

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

fn camel(s: &str) -> String {
    s.split('_')
        .map(|w| {
            let mut c = w.chars();
            c.next().map(|f| f.to_ascii_uppercase().to_string() + c.as_str()).unwrap_or_default()
        })
        .collect()
}

fn generate(families: &[Family], defines: &[(String, i64)], build: Option<&Build>, archs: &[String]) -> String {
    let mut s = String::new();
    s.push_str("// @generated by build.rs from kernels/*.cu; do not edit.\n\n");

    // Constants from common.cuh.
    s.push_str("/// Constants shared with the kernels, from the `#define TESSERA_*` lines of `kernels/common.cuh`.\n");
    s.push_str("pub mod consts {\n");
    for (name, v) in defines {
        let _ = writeln!(s, "    /// `TESSERA_{name}` in `kernels/common.cuh`.\n    pub const {name}: i64 = {v};");
    }
    s.push_str("}\n\n");

    // Manifest.
    let _ = writeln!(
        s,
        "/// What the build produced: toolkit, PTX ISA, archs. `built` is false where nvcc was missing.\npub const MANIFEST: Manifest = Manifest {{\n    built: {},\n    toolkit: {:?},\n    ptx_isa: {:?},\n    archs: &[{}],\n}};\n",
        build.is_some(),
        build.map(|b| b.toolkit.as_str()).unwrap_or(""),
        build.map(|b| b.ptx_isa.as_str()).unwrap_or(""),
        archs.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(", ")
    );

    // Kernel table.
    s.push_str("/// Every kernel of `kernels/`, with its ptxas report per arch when built.\npub const KERNELS: &[KernelInfo] = &[\n");
    for f in families {
        for k in &f.kernels {
            let hash = build.and_then(|b| b.hashes.get(&k.name)).copied();
            let mut rep = String::new();
            if let Some(b) = build {
                for ((kn, arch), e) in &b.ptxas {
                    if kn == &k.name {
                        let _ = write!(
                            rep,
                            "PtxasReport {{ arch: {arch:?}, registers: {}, smem_bytes: {}, stack_bytes: {}, spill_stores: {}, spill_loads: {} }}, ",
                            e.registers, e.smem, e.stack, e.spill_stores, e.spill_loads
                        );
                    }
                }
            }
            let _ = writeln!(
                s,
                "    KernelInfo {{ name: {:?}, file: {:?}, signature: {:?}, hash: {:?}, ptxas: &[{rep}] }},",
                k.name, f.file, k.signature, hash
            );
        }
    }
    s.push_str("];\n\n");

    // Fatbins and typed handles.
    for f in families {
        let ty = format!("{}Kernels", camel(&f.stem));
        let fat = match build.and_then(|b| b.fatbins.get(&f.stem)) {
            Some(p) => format!("Some(include_bytes!({:?}))", p.display().to_string()),
            None => "None".to_string(),
        };
        let _ = writeln!(
            s,
            "/// The fatbin of `kernels/{}`, or `None` where nvcc was missing at build time.\npub const {}_FATBIN: Option<&[u8]> = {fat};\n",
            f.file,
            f.stem.to_uppercase()
        );
        let _ = writeln!(s, "/// The kernels of `kernels/{}`, loaded into one CUDA context.\n#[derive(Debug, Clone)]\npub struct {ty} {{", f.file);
        for k in &f.kernels {
            let _ = writeln!(s, "    {}: CudaFunction,", k.name);
        }
        s.push_str("}\n\n");
        let _ = writeln!(s, "impl {ty} {{");
        let _ = writeln!(
            s,
            "    /// Loads the module into `ctx` and resolves every kernel.\n    pub fn load(ctx: &Arc<CudaContext>) -> Result<Self, KernelLoadError> {{\n        let image = {}_FATBIN.ok_or(KernelLoadError::NotBuilt({:?}))?;\n        let module = ctx.load_module(Ptx::from_binary(image.to_vec())).map_err(|e| KernelLoadError::Driver({:?}, e))?;",
            f.stem.to_uppercase(),
            f.file,
            f.file
        );
        s.push_str("        Ok(Self {\n");
        for k in &f.kernels {
            let _ = writeln!(
                s,
                "            {0}: module.load_function({0:?}).map_err(|e| KernelLoadError::Driver({0:?}, e))?,",
                k.name
            );
        }
        s.push_str("        })\n    }\n\n");
        for k in &f.kernels {
            let mut args = String::new();
            let mut pushes = String::new();
            for p in &k.params {
                let rt = rust_type(&p.ty, &p.name).unwrap();
                let _ = write!(args, ", {}: {rt}", p.name);
                if rt.starts_with("Option<") {
                    let _ = writeln!(
                        pushes,
                        "        match {0} {{ Some(x) => {{ __args.arg(x); }} None => {{ __args.arg(&NULL); }} }}",
                        p.name
                    );
                } else if rt.starts_with('&') {
                    let _ = writeln!(pushes, "        __args.arg({});", p.name);
                } else {
                    let _ = writeln!(pushes, "        __args.arg(&{});", p.name);
                }
            }
            let _ = writeln!(
                s,
                "    /// Launches `{}`.\n    ///\n    /// # Safety\n    /// The caller checks what the kernel assumes: every buffer holds the elements the\n    /// size arguments imply, and `cfg` is the launch shape documented in `kernels/{}`.\n    #[allow(clippy::too_many_arguments)]\n    pub unsafe fn {}(&self, __stream: &CudaStream, __cfg: LaunchConfig{args}) -> Result<(), DriverError> {{\n        const NULL: u64 = 0;\n        let _ = NULL;\n        let mut __args = __stream.launch_builder(&self.{});\n{pushes}        // SAFETY: forwarded to the caller (see `# Safety`).\n        unsafe {{ __args.launch(__cfg) }}.map(|_| ())\n    }}\n",
                k.signature, f.file, k.name, k.name
            );
        }
        s.push_str("}\n\n");
    }
    // All families together.
    s.push_str("/// Every kernel family, loaded into one context.\n#[derive(Debug, Clone)]\npub struct AllKernels {\n");
    for f in families {
        let _ = writeln!(s, "    /// `kernels/{}`.\n    pub {}: {}Kernels,", f.file, f.stem, camel(&f.stem));
    }
    s.push_str("}\n\nimpl AllKernels {\n    /// Loads every family into `ctx`.\n    pub fn load(ctx: &Arc<CudaContext>) -> Result<Self, KernelLoadError> {\n        Ok(Self {\n");
    for f in families {
        let _ = writeln!(s, "            {}: {}Kernels::load(ctx)?,", f.stem, camel(&f.stem));
    }
    s.push_str("        })\n    }\n}\n");
    s
}

// ---- the simulator ----------------------------------------------------------------------------

/// Why a kernel file cannot run in the simulator (inline PTX, tensor cores), or `None`.
fn sim_unsupported(src: &str) -> Option<&'static str> {
    let code: String = src.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
    if code.contains("asm(") || code.contains("asm volatile") || code.contains("asm (") {
        Some("inline PTX (asm)")
    } else if code.contains("wmma::") || code.contains("mma.sync") || code.contains("wgmma") {
        Some("tensor-core instructions (wmma/mma)")
    } else if code.contains("cooperative_groups") {
        Some("cooperative groups")
    } else if code.contains("__activemask") {
        Some("__activemask (the simulator does not model which lanes are converged)")
    } else {
        None
    }
}

/// Rewrites one line of a kernel source for the host build. Three rewrites, each on one line,
/// line numbers kept: `extern "C" __global__` becomes internal linkage (the simulator's launch
/// thunks call the kernels; the names stay private to the library); a `__shared__` variable
/// becomes a reference into the simulated block's shared memory; an `extern __shared__` array
/// becomes a pointer to the launch's dynamic shared memory.
fn sim_rewrite_line(file: &str, lineno: usize, line: &str) -> String {
    let trimmed = line.trim_start();
    let indent = &line[..line.len() - trimmed.len()];
    if let Some(rest) = trimmed.strip_prefix("extern \"C\" __global__") {
        return format!("{indent}static __global__{rest}");
    }
    let strip_align = |decl: &str| -> (String, Option<String>) {
        if let Some(i) = decl.find("__align__(") {
            let j = i + decl[i..].find(')').unwrap_or_else(|| panic!("{file}:{lineno}: unclosed __align__("));
            let n = decl[i + "__align__(".len()..j].trim().to_string();
            (format!("{}{}", &decl[..i], &decl[j + 1..]), Some(n))
        } else {
            (decl.to_string(), None)
        }
    };
    if let Some(rest) = trimmed.strip_prefix("extern __shared__") {
        let decl = rest.split(';').next().unwrap();
        let (decl, _) = strip_align(decl);
        let open = decl
            .find('[')
            .unwrap_or_else(|| panic!("{file}:{lineno}: `extern __shared__` must declare an array `T name[]`"));
        let head = decl[..open].trim();
        let name = head.split_whitespace().last().unwrap();
        let ty = head[..head.len() - name.len()].trim();
        return format!("{indent}{ty}* {name} = reinterpret_cast<{ty}*>(tsim_dynamic_smem());");
    }
    if let Some(rest) = trimmed.strip_prefix("__shared__") {
        let semi =
            rest.find(';').unwrap_or_else(|| panic!("{file}:{lineno}: a __shared__ declaration must end on its line"));
        let (decl, align) = strip_align(&rest[..semi]);
        let tail = &rest[semi + 1..];
        if decl.contains(',') || decl.contains('=') {
            panic!(
                "{file}:{lineno}: the simulator needs one variable per __shared__ declaration, without an initializer"
            );
        }
        let (head, dims) = match decl.find('[') {
            Some(i) => (decl[..i].trim().to_string(), decl[i..].trim().to_string()),
            None => (decl.trim().to_string(), String::new()),
        };
        let name = head.split_whitespace().last().unwrap().to_string();
        let ty = head[..head.len() - name.len()].trim().to_string();
        let align = match align {
            Some(a) => format!("(alignof({ty}) > {a} ? alignof({ty}) : {a})"),
            None => format!("alignof({ty})"),
        };
        let full = format!("{ty}{dims}");
        return format!(
            "{indent}static char tsim_tag_{name}; {ty} (&{name}){dims} = *reinterpret_cast<{ty} (*){dims}>(tsim_shared(&tsim_tag_{name}, sizeof({full}), {align}, sizeof({ty}), \"{name}\"));{tail}"
        );
    }
    line.to_string()
}

fn sim_rewrite(file: &str, src: &str) -> String {
    let mut out = String::new();
    let mut depth = 0i32;
    for (i, line) in src.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        let t = code.trim_start();
        if depth == 0 && t.starts_with("__shared__") {
            panic!(
                "kernels/{file}:{}: a __shared__ variable at file scope: declare it inside the kernel (the simulator \
                 gives each launch its block's shared memory)",
                i + 1
            );
        }
        let rewritten = sim_rewrite_line(file, i + 1, line);
        // A two-line rewrite (#undef + #define) must keep the line numbers of what follows.
        if rewritten.contains('\n') {
            out.push_str(&rewritten);
            out.push_str(&format!("\n#line {} \"kernels/{file}\"\n", i + 2));
        } else {
            out.push_str(&rewritten);
            out.push('\n');
        }
        depth += code.matches('{').count() as i32 - code.matches('}').count() as i32;
    }
    out
}

/// The C++ expression that turns simulator argument `i` into parameter type `ty`.
fn sim_cast(ty: &str, i: usize) -> String {
    match ty {
        "int" => format!("(int)a[{i}].i"),
        "long long" => format!("(long long)a[{i}].i"),
        "float" => format!("a[{i}].f"),
        other => format!("({other})a[{i}].p"),
    }
}

/// The Rust parameter type of a kernel parameter on the simulator.
fn sim_rust_type(ty: &str, name: &str) -> &'static str {
    let opt = name.ends_with("_opt");
    match (ty, opt) {
        ("int", _) => "i32",
        ("long long", _) => "i64",
        ("float", _) => "f32",
        ("const float*", false) => "&SimView<'_, f32>",
        ("const float*", true) => "Option<&SimView<'_, f32>>",
        ("float*", false) => "&mut SimViewMut<'_, f32>",
        ("float*", true) => "Option<&mut SimViewMut<'_, f32>>",
        ("const int*", false) => "&SimView<'_, i32>",
        ("int*", false) => "&mut SimViewMut<'_, i32>",
        ("const float* const*", false) => "&SimView<'_, u64>",
        _ => unreachable!("checked by parse_kernels"),
    }
}

fn sim_arg_expr(ty: &str, name: &str) -> String {
    let opt = name.ends_with("_opt");
    match (ty, opt) {
        ("int", _) => format!("SimArg::int(c{name:?}, i64::from({name}))"),
        ("long long", _) => format!("SimArg::int(c{name:?}, {name})"),
        ("float", _) => format!("SimArg::float(c{name:?}, {name})"),
        ("const float* const*", _) => format!("SimArg::table(c{name:?}, {name})"),
        (t, false) if t.starts_with("const ") => format!("SimArg::input(c{name:?}, {name})"),
        (t, true) if t.starts_with("const ") => format!("SimArg::opt_input(c{name:?}, {name})"),
        (_, false) => format!("SimArg::output(c{name:?}, {name})"),
        (_, true) => format!("SimArg::opt_output(c{name:?}, {name})"),
    }
}

/// `__launch_bounds__(N...)` of a kernel line: N, or 0 when absent.
fn launch_bounds(signature: &str) -> u32 {
    signature
        .split("__launch_bounds__(")
        .nth(1)
        .and_then(|r| r.split([',', ')']).next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Compiles the kernels for the host with the simulator's shim and runtime, and returns the
/// generated Rust: one `Sim<Family>Kernels` per file with the same launch methods as the CUDA
/// handles, and the simulator status of every kernel.
fn build_simulator(kdir: &Path, out: &Path, families: &[Family], planted: &Family) -> String {
    let simdir = out.join("sim");
    fs::create_dir_all(&simdir).unwrap();
    for name in ["sim/cuda_sim.h", "sim/runtime.cc"] {
        println!("cargo:rerun-if-changed={}", kdir.join(name).display());
    }
    // Rewritten copies of the headers, found before the originals.
    for e in fs::read_dir(kdir).unwrap().filter_map(|e| e.ok()) {
        let p = e.path();
        if p.extension().and_then(|x| x.to_str()) == Some("cuh") {
            let f = p.file_name().unwrap().to_str().unwrap().to_string();
            let src = fs::read_to_string(&p).unwrap();
            let text = format!("#line 1 \"kernels/{f}\"\n{}", sim_rewrite(&f, &src));
            fs::write(simdir.join(&f), text).unwrap();
        }
    }
    let mut kernels_build = cc::Build::new();
    kernels_build
        .cpp(true)
        .std("c++20")
        .opt_level(2)
        .debug(false)
        .warnings(false)
        .flag("-fsanitize=thread")
        .flag("-Wno-unknown-pragmas")
        .include(&simdir)
        .include(kdir);
    let mut rust = String::new();
    rust.push_str("// @generated by build.rs: the simulator's launch handles.\n\n");
    let mut status = String::new();
    let mut all: Vec<&Family> = families.iter().collect();
    all.push(planted);
    let mut compiled = 0;
    let mut externs = String::new();
    for f in &all {
        let src = fs::read_to_string(&f.path).unwrap();
        let unsupported = sim_unsupported(&src);
        let ty = format!("Sim{}Kernels", camel(&f.stem));
        let _ = writeln!(rust, "/// The kernels of `kernels/{}`, run by the simulator.\n#[derive(Debug, Clone, Copy, Default)]\npub struct {ty};\n", f.file);
        let _ = writeln!(rust, "impl {ty} {{");
        let mut thunks = String::new();
        for k in &f.kernels {
            let _ = writeln!(
                status,
                "    SimStatus {{ name: {:?}, file: {:?}, unsupported: {:?}, planted: {} }},",
                k.name,
                f.file,
                unsupported,
                f.stem == "planted"
            );
            let mut args = String::new();
            let mut list = String::new();
            let mut casts = Vec::new();
            for (i, p) in k.params.iter().enumerate() {
                let _ = write!(args, ", {}: {}", p.name, sim_rust_type(&p.ty, &p.name));
                let _ = write!(list, "{}, ", sim_arg_expr(&p.ty, &p.name));
                casts.push(sim_cast(&p.ty, i));
            }
            let launch = if let Some(why) = unsupported {
                let _ = writeln!(rust, "    /// `{}` cannot run in the simulator.", k.name);
                format!(
                    "let _ = (__stream, __cfg{});\n        Err(SimError::unsupported({:?}, {:?}))",
                    k.params.iter().map(|p| format!(", {}", p.name)).collect::<String>(),
                    k.name,
                    why
                )
            } else {
                let _ = writeln!(
                    thunks,
                    "namespace {{ TSIM_NO_SANITIZE void tsim_body_{0}(const tsim_arg* a) {{ {0}({1}); }} }}",
                    k.name,
                    casts.join(", ")
                );
                let _ = writeln!(
                    thunks,
                    "extern \"C\" int tsim_launch_{0}(const tsim_launch* l, const tsim_arg* a, char* err, size_t errlen) {{ return tsim_launch_kernel(\"{0}\", {1}, l, a, {2}, &tsim_body_{0}, err, errlen); }}",
                    k.name,
                    launch_bounds(&k.signature),
                    k.params.len()
                );
                let _ = writeln!(rust, "    /// Runs `{}` in the simulator.", k.name);
                format!(
                    "let __args = [{list}];\n        // SAFETY: forwarded to the caller (see `# Safety`); the arguments are in the kernel's order.\n        unsafe {{ launch({0:?}, ffi::tsim_launch_{0}, __stream, &__cfg, &__args) }}",
                    k.name
                )
            };
            let _ = writeln!(
                rust,
                "    ///\n    /// # Safety\n    /// As for the CUDA handle: every buffer holds the elements the size arguments imply\n    /// (the simulator checks each access, and reports rather than corrupts).\n    #[allow(clippy::too_many_arguments, unused_variables)]\n    pub unsafe fn {}(&self, __stream: &SimStream, __cfg: LaunchConfig{args}) -> Result<(), SimError> {{\n        {launch}\n    }}\n",
                k.name
            );
        }
        rust.push_str("}\n\n");
        if unsupported.is_none() {
            let text = format!(
                "// @generated by build.rs from kernels/{0}: the simulator build.\n#include \"sim/cuda_sim.h\"\n#line 1 \"kernels/{0}\"\n{1}\n// ---- launch thunks ----\n{2}",
                f.file,
                sim_rewrite(&f.file, &src),
                thunks
            );
            let cc_path = simdir.join(format!("{}.cc", f.stem));
            fs::write(&cc_path, text).unwrap();
            kernels_build.file(&cc_path);
            compiled += 1;
            for k in &f.kernels {
                let _ = writeln!(
                    externs,
                    "        pub fn tsim_launch_{}(l: *const SimLaunch, a: *const SimArg, err: *mut std::ffi::c_char, errlen: usize) -> i32;",
                    k.name
                );
            }
        }
    }
    let _ = writeln!(
        rust,
        "mod ffi {{\n    use super::{{SimArg, SimLaunch}};\n    unsafe extern \"C\" {{\n{externs}    }}\n}}\n"
    );
    rust.push_str("/// Every product kernel family, in the simulator.\n#[derive(Debug, Clone, Copy, Default)]\npub struct SimAllKernels {\n");
    for f in families {
        let _ = writeln!(rust, "    /// `kernels/{}`.\n    pub {}: Sim{}Kernels,", f.file, f.stem, camel(&f.stem));
    }
    rust.push_str("}\n\n");
    let _ = writeln!(
        rust,
        "/// Each kernel's simulator status: product kernels and the planted-bug kernels of\n/// `kernels/sim/planted.cu`.\npub const SIM_KERNELS: &[SimStatus] = &[\n{status}];"
    );
    if compiled > 0 {
        kernels_build.compile("tessera_sim_kernels");
    }
    cc::Build::new()
        .cpp(true)
        .std("c++20")
        .opt_level(2)
        .debug(false)
        .file(kdir.join("sim/runtime.cc"))
        .compile("tessera_sim_runtime");
    rust
}
