//! The simulator's build: the kernels rewritten for the host compiler with the CUDA shim
//! (`kernels/sim/`), and the Rust handles that launch them (`OUT_DIR/sim_kernels.rs`).

use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use crate::codegen::camel;
use crate::parse::{launch_bounds, Family};

/// Why a kernel file cannot run in the simulator (inline PTX, tensor cores), or `None`.
pub(crate) fn sim_unsupported(src: &str) -> Option<&'static str> {
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
pub(crate) fn sim_rewrite_line(file: &str, lineno: usize, line: &str) -> String {
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

pub(crate) fn sim_rewrite(file: &str, src: &str) -> String {
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
pub(crate) fn sim_cast(ty: &str, i: usize) -> String {
    match ty {
        "int" => format!("(int)a[{i}].i"),
        "long long" => format!("(long long)a[{i}].i"),
        "float" => format!("a[{i}].f"),
        other => format!("({other})a[{i}].p"),
    }
}

/// The Rust parameter type of a kernel parameter on the simulator.
pub(crate) fn sim_rust_type(ty: &str, name: &str) -> &'static str {
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
        ("const unsigned short*", false) => "&SimView<'_, u16>",
        ("unsigned short*", false) => "&mut SimViewMut<'_, u16>",
        ("const float* const*", false) => "&SimView<'_, u64>",
        _ => unreachable!("checked by parse_kernels"),
    }
}

pub(crate) fn sim_arg_expr(ty: &str, name: &str) -> String {
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

/// Compiles the kernels for the host with the simulator's shim and runtime, and returns the
/// generated Rust: one `Sim<Family>Kernels` per file with the same launch methods as the CUDA
/// handles, and the simulator status of every kernel.
pub(crate) fn build_simulator(kdir: &Path, out: &Path, families: &[Family], planted: &Family) -> String {
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
