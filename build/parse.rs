//! Reading the kernels' sources: the `#define TESSERA_NAME <int>` constants of `common.cuh`,
//! each `extern "C" __global__` signature (name, parameters and their C types), the C-to-Rust
//! parameter types the generator knows, and `__launch_bounds__`. Plain `std`, so the library's
//! tests include this file to test the parser (`host/kernels.rs`).

use std::path::PathBuf;

pub(crate) struct Param {
    pub(crate) name: String,
    pub(crate) ty: String,
}

pub(crate) struct Kernel {
    pub(crate) name: String,
    pub(crate) signature: String,
    pub(crate) params: Vec<Param>,
}

pub(crate) struct Family {
    pub(crate) file: String,
    pub(crate) stem: String,
    pub(crate) path: PathBuf,
    pub(crate) kernels: Vec<Kernel>,
}

pub(crate) fn parse_defines(src: &str) -> Vec<(String, i64)> {
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

pub(crate) fn parse_kernels(file: &str, src: &str) -> Vec<Kernel> {
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
pub(crate) fn rust_type(ty: &str, name: &str) -> Option<&'static str> {
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
        ("const unsigned short*", false) => "&CudaView<'_, u16>",
        ("unsigned short*", false) => "&mut CudaViewMut<'_, u16>",
        ("const float* const*", false) => "&CudaView<'_, u64>",
        _ => return None,
    })
}

/// `__launch_bounds__(N...)` of a kernel line: N, or 0 when absent.
pub(crate) fn launch_bounds(signature: &str) -> u32 {
    signature
        .split("__launch_bounds__(")
        .nth(1)
        .and_then(|r| r.split([',', ')']).next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defines_are_the_tessera_integers() {
        let src = "#define TESSERA_EW_THREADS 256\n#define OTHER 3\n  #define TESSERA_ACT_GELU 2\n#define TESSERA_NAME x\n#define TESSERA_NEG -4";
        assert_eq!(parse_defines(src), vec![("EW_THREADS".into(), 256), ("ACT_GELU".into(), 2), ("NEG".into(), -4)]);
    }

    #[test]
    fn kernel_signatures_give_names_params_and_types() {
        let src = r#"
// extern "C" __global__ void commented_out(int n)   <- not at the line's start
extern "C" __global__ __launch_bounds__(256) void axpy(long long n, float a, const float* __restrict__ x, float* y) {
extern "C" __global__ void opt(int n, const float* bias_opt, float *out_opt, const int* labels, int* err,
static __device__ void helper(int n) {}
extern "C" __global__ void table(const float* const* srcs, int k) {
"#;
        // The second kernel's parameter list spans two lines: refused, with its name.
        let r = std::panic::catch_unwind(|| parse_kernels("f.cu", src));
        let msg = *r.err().expect("refused").downcast::<String>().unwrap();
        assert!(msg.contains("kernel `opt`: the parameter list must sit on one line"), "{msg}");
        let src = src.replace("int* err,\n", "int* err) {\n");
        let ks = parse_kernels("f.cu", &src);
        let names: Vec<&str> = ks.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names, ["axpy", "opt", "table"]);
        let types = |k: &Kernel| k.params.iter().map(|p| format!("{} {}", p.ty, p.name)).collect::<Vec<_>>();
        assert_eq!(types(&ks[0]), ["long long n", "float a", "const float* x", "float* y"]);
        assert_eq!(
            types(&ks[1]),
            ["int n", "const float* bias_opt", "float* out_opt", "const int* labels", "int* err"]
        );
        assert_eq!(types(&ks[2]), ["const float* const* srcs", "int k"]);
        assert_eq!(launch_bounds(&ks[0].signature), 256);
        assert_eq!(launch_bounds(&ks[1].signature), 0);
        assert_eq!(rust_type("const float*", "bias_opt"), Some("Option<&CudaView<'_, f32>>"));
        assert_eq!(rust_type("float*", "y"), Some("&mut CudaViewMut<'_, f32>"));
    }

    #[test]
    fn an_unknown_parameter_type_is_refused_with_the_kernel_and_the_type() {
        let src = "extern \"C\" __global__ void k(double x) {";
        let r = std::panic::catch_unwind(|| parse_kernels("g.cu", src));
        let msg = *r.err().expect("refused").downcast::<String>().unwrap();
        assert!(msg.contains("g.cu: kernel `k` parameter `x` has type `double`"), "{msg}");
    }
}
