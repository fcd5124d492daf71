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
        assert!(out.contains("built by CUDA 13.0 (PTX ISA 9.0) for sm_80, sm_86, sm_89, sm_90, compute_80"), "{out}");
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
fn an_unknown_command_is_an_error_with_usage() {
    let (ok, _, err) = tessera(&["fly"]);
    assert!(!ok);
    assert!(err.contains("unrecognized subcommand") && err.contains("Usage"), "{err}");
}
