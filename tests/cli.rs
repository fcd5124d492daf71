//! The command line: `tessera devices` and `tessera kernels` say what is there.

mod common;

use common::tessera;

#[test]
fn kernels_lists_every_kernel_with_its_ptxas_report() {
    let (ok, out, err) = tessera(&["kernels"]);
    assert!(ok, "{err}");
    for k in tessera::kernels::KERNELS {
        let line = out
            .lines()
            .find(|l| l.split_whitespace().next() == Some(k.name))
            .unwrap_or_else(|| panic!("{} missing:\n{out}", k.name));
        assert!(line.contains(k.file), "{line}");
        if tessera::kernels::MANIFEST.built {
            // regs/smem/spill for sm_90, e.g. 125/16896/0
            assert!(line.split_whitespace().last().unwrap().split('/').count() == 3, "{line}");
        }
    }
    assert!(out.contains(&format!("{} kernels", tessera::kernels::KERNELS.len())));
    if tessera::kernels::MANIFEST.built {
        // The archs the build was asked for: the default list, or TESSERA_CUDA_ARCHS (the GPU
        // binaries are built for sm_90 only).
        let want = tessera::kernels::MANIFEST.archs.join(", ");
        assert!(out.contains(&format!("built by CUDA 13.0 (PTX ISA 9.0) for {want}")), "{out}");
        if option_env!("TESSERA_CUDA_ARCHS").is_none() {
            assert_eq!(want, "sm_80, sm_86, sm_89, sm_90, compute_80", "the default arch list");
        }
    } else {
        assert!(out.contains("NOT BUILT"), "{out}");
    }
}

#[test]
fn devices_reports_the_cpu_and_the_cuda_state() {
    let (ok, out, err) = tessera(&["devices"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("CPU: "), "{out}");
    assert!(out.contains("CUDA kernels: "), "{out}");
    assert!(out.contains("CUDA driver: "), "{out}");
}

#[test]
fn a_gemm_kernel_family_can_be_chosen_for_a_whole_run() {
    // On the simulator (the same kernels as the GPU): a run with the pipelined family trains.
    let args = ["train", "--device", "sim", "--widths", "784,16,10", "--steps", "2", "--batch", "32", "--json"];
    let (ok, out, err) = common::tessera_env(&args, &[("TESSERA_GEMM_KERNEL", "pipe16")]);
    assert!(ok, "{err}");
    assert!(out.contains("accuracy"), "{out}");
    let (ok, _, err) = common::tessera_env(&args, &[("TESSERA_GEMM_KERNEL", "fastest")]);
    assert!(!ok);
    assert!(err.contains("TESSERA_GEMM_KERNEL") && err.contains("pipe16"), "{err}");
}

#[test]
fn an_unknown_command_is_an_error_with_usage() {
    let (ok, _, err) = tessera(&["fly"]);
    assert!(!ok);
    assert!(err.contains("unrecognized subcommand") && err.contains("Usage"), "{err}");
}
