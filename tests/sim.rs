//! The CUDA simulator's detectors, proved on planted bugs (`kernels/sim/planted.cu`): each
//! buggy kernel is reported with the kernel, the block, the thread and the index, and its
//! correct twin passes. Also: the shim's warp intrinsics and dynamic shared memory against
//! hand-computed answers, and launches the simulator must refuse.

use cudarc::driver::LaunchConfig;
use tessera::backend::sim::{SimError, SIM_KERNELS};
use tessera::check::inputs;
use tessera::{Backend, SimDevice};

fn cfg(blocks: u32, threads: u32, smem: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: smem }
}

fn expect_report(r: Result<(), SimError>, parts: &[&str]) -> String {
    let e = r.expect_err("the simulator must report the planted bug").0;
    for p in parts {
        assert!(e.contains(p), "report lacks `{p}`:\n{e}");
    }
    eprintln!("reported: {e}");
    e
}

#[test]
fn missing_barrier_is_a_shared_memory_race() {
    let d = SimDevice::new(0);
    let n = 300usize;
    let x = inputs(1, n, 1.0);
    let xb = d.upload(&x).unwrap();
    let mut out = d.alloc::<f32>(n).unwrap();
    let k = d.planted();
    // The twin with the barrier is right.
    unsafe { k.reverse_ok(d.stream(), cfg(2, 256, 0), n as i32, &xb.as_view(), &mut out.as_view_mut()) }.unwrap();
    let got = d.download(&out.as_view()).unwrap();
    for (j, g) in got.iter().enumerate() {
        let (b, t) = (j / 256, 255 - j % 256);
        let i = b * 256 + t;
        assert_eq!(*g, if i < n { x[i] } else { 0.0 }, "reverse_ok at {j}");
    }
    let r = unsafe {
        k.reverse_missing_barrier(d.stream(), cfg(2, 256, 0), n as i32, &xb.as_view(), &mut out.as_view_mut())
    };
    expect_report(
        r,
        &[
            "kernel reverse_missing_barrier",
            "block (0,0,0)",
            "thread (",
            "data race on shared tile[",
            "no __syncthreads",
        ],
    );
}

#[test]
fn off_by_one_write_is_out_of_bounds() {
    let d = SimDevice::new(0);
    let n = 1000usize;
    let x = inputs(2, n, 1.0);
    let xb = d.upload(&x).unwrap();
    let mut y = d.alloc::<f32>(n).unwrap();
    let k = d.planted();
    unsafe { k.double_ok(d.stream(), cfg(2, 256, 0), n as i64, &xb.as_view(), &mut y.as_view_mut()) }.unwrap();
    let want: Vec<f32> = x.iter().map(|v| 2.0 * v).collect();
    assert_eq!(d.download(&y.as_view()).unwrap(), want);
    // 2 blocks of 256 threads, grid-stride: i = 1000 is thread 488 of the grid's second pass,
    // i.e. block 1, thread 232.
    let r = unsafe { k.double_off_by_one(d.stream(), cfg(2, 256, 0), n as i64, &xb.as_view(), &mut y.as_view_mut()) };
    let e = expect_report(
        r,
        &[
            "kernel double_off_by_one",
            "block (1,0,0)",
            "thread (232,0,0)",
            "out-of-bounds write",
            "y[1000]",
            "holds 1000",
        ],
    );
    // The bad write was not performed: the buffer after y is untouched (the view ends at n).
    assert!(!e.contains("x["), "{e}");
}

#[test]
fn barrier_in_a_divergent_branch_is_reported_not_a_hang() {
    let d = SimDevice::new(0);
    let n = 300usize;
    let x = inputs(3, n, 1.0);
    let xb = d.upload(&x).unwrap();
    let mut out = d.alloc::<f32>(2).unwrap();
    let k = d.planted();
    unsafe { k.block_sum_ok(d.stream(), cfg(2, 256, 0), n as i32, &xb.as_view(), &mut out.as_view_mut()) }.unwrap();
    let got = d.download(&out.as_view()).unwrap();
    let want = [x[..256].iter().map(|&v| v as f64).sum::<f64>(), x[256..].iter().map(|&v| v as f64).sum::<f64>()];
    for b in 0..2 {
        assert!((got[b] as f64 - want[b]).abs() < 1e-4, "block {b}: {} vs {}", got[b], want[b]);
    }
    // Block 1 has 44 live threads; thread 44 returns first (the round-robin runs thread 0..43 to
    // the barrier first, then 44 exits).
    let r = unsafe {
        k.block_sum_divergent_barrier(d.stream(), cfg(2, 256, 0), n as i32, &xb.as_view(), &mut out.as_view_mut())
    };
    expect_report(
        r,
        &[
            "kernel block_sum_divergent_barrier",
            "block (1,0,0)",
            "thread (44,0,0)",
            "__syncthreads at planted.cu:",
            "divergent branch",
        ],
    );
}

#[test]
fn shim_warp_intrinsics_and_dynamic_shared_memory() {
    let d = SimDevice::new(0);
    let x: Vec<f32> = (0..64).map(|i| if i % 3 == 0 { i as f32 + 1.0 } else { -(i as f32) }).collect();
    let xb = d.upload(&x).unwrap();
    let mut out = d.alloc::<f32>(260).unwrap();
    unsafe { d.planted().probe(d.stream(), cfg(1, 64, 64 * 4), 64, &xb.as_view(), &mut out.as_view_mut()) }.unwrap();
    let o = d.download(&out.as_view()).unwrap();
    for t in 0..64usize {
        let (lane, w0) = (t % 32, t / 32 * 32);
        let down = if lane + 1 < 32 { x[t + 1] } else { x[t] };
        let up = if lane >= 2 { x[t - 2] } else { x[t] };
        let idx = x[w0 + (lane & !7) + 5];
        assert_eq!(o[t], down, "shfl_down lane {t}");
        assert_eq!(o[64 + t], up, "shfl_up lane {t}");
        assert_eq!(o[128 + t], idx, "shfl width 8 lane {t}");
        assert_eq!(o[192 + t], x[63 - t], "dynamic shared memory at {t}");
    }
    let ballot: u32 = (0..32).filter(|i| x[*i] > 0.0).map(|i| 1u32 << i).sum();
    assert_eq!(o[256], (ballot & 0xffff) as f32);
    assert_eq!(o[259], (ballot >> 16) as f32);
    assert_eq!(o[257], x.iter().filter(|v| **v > 0.0).count() as f32);
    let sum: f32 = x.iter().sum();
    assert!((o[258] - sum).abs() < 1e-3, "atomicAdd {} vs {sum}", o[258]);
}

#[test]
fn launches_the_gpu_would_refuse_are_refused() {
    let d = SimDevice::new(0);
    let xb = d.upload(&[1.0f32; 64]).unwrap();
    let mut out = d.alloc::<f32>(260).unwrap();
    let k = d.planted();
    // More threads than __launch_bounds__(64).
    let e = unsafe { k.probe(d.stream(), cfg(1, 128, 256), 64, &xb.as_view(), &mut out.as_view_mut()) }.unwrap_err();
    assert!(e.0.contains("__launch_bounds__(64)"), "{e}");
    // Too little dynamic shared memory: the read of dyn[63] is past the launch's 128 bytes.
    let e = unsafe { k.probe(d.stream(), cfg(1, 64, 128), 64, &xb.as_view(), &mut out.as_view_mut()) }.unwrap_err();
    assert!(e.0.contains("dynamic shared memory") && e.0.contains("128 bytes"), "{e}");
    // An empty grid.
    let e = unsafe { k.probe(d.stream(), cfg(0, 64, 256), 64, &xb.as_view(), &mut out.as_view_mut()) }.unwrap_err();
    assert!(e.0.contains("invalid launch"), "{e}");
    // An input buffer shorter than the kernel reads: reported as a read of x past its end.
    let short = d.upload(&[1.0f32; 10]).unwrap();
    let e = unsafe { k.probe(d.stream(), cfg(1, 64, 256), 64, &short.as_view(), &mut out.as_view_mut()) }.unwrap_err();
    assert!(e.0.contains("out-of-bounds read") && e.0.contains("x[10]"), "{e}");
}

#[test]
fn op_errors_carry_the_simulator_report() {
    // Through the op layer, a simulator report becomes Error::Sim with what was being done.
    let e = tessera::Error::driver::<SimError>("launching gemm")(SimError("kernel gemm_nn: test".into()));
    assert!(matches!(e, tessera::Error::Sim { .. }));
    assert!(e.to_string().contains("launching gemm") && e.to_string().contains("kernel gemm_nn"), "{e}");
}

#[test]
fn every_kernel_has_a_simulator_status() {
    for k in tessera::kernels::KERNELS {
        let s = SIM_KERNELS.iter().find(|s| s.name == k.name).unwrap_or_else(|| panic!("{} has no sim status", k.name));
        assert!(!s.planted);
        assert!(s.unsupported.is_none(), "{} cannot run in the simulator: {:?}", k.name, s.unsupported);
    }
    let planted: Vec<_> = SIM_KERNELS.iter().filter(|s| s.planted).map(|s| s.name).collect();
    for p in ["reverse_missing_barrier", "double_off_by_one", "block_sum_divergent_barrier", "copy_overlapping_tiles"] {
        assert!(planted.contains(&p), "{p} missing from {planted:?}");
    }
}

#[test]
fn an_overrun_into_a_neighbouring_view_of_the_same_buffer_is_caught() {
    // y and x are two views of one allocation, y first: y[n] is x[0]'s address. The kernel
    // runs on private copies of its arguments, so the overrun is reported, not absorbed.
    let d = SimDevice::new(0);
    let n = 1000usize;
    let mut both = d.upload(&inputs(5, 2 * n, 1.0)).unwrap();
    let (mut y, x) = SimDevice::split_mut(&mut both, n);
    let x = x.as_view();
    let r = unsafe { d.planted().double_off_by_one(d.stream(), cfg(2, 256, 0), n as i64, &x, &mut y) };
    expect_report(r, &["out-of-bounds write", "y[1000]"]);
}

#[test]
fn syncwarp_ordering_and_shared_atomics_are_not_races() {
    let d = SimDevice::new(0);
    let n = 100usize;
    let x: Vec<f32> = (0..n).map(|i| (i * 7 % 23) as f32).collect();
    let xb = d.upload(&x).unwrap();
    let mut out = d.alloc::<f32>(72).unwrap();
    unsafe {
        d.planted().warp_sync_and_atomics(d.stream(), cfg(2, 64, 0), n as i32, &xb.as_view(), &mut out.as_view_mut())
    }
    .unwrap();
    let o = d.download(&out.as_view()).unwrap();
    assert_eq!(o[0], x[..64].iter().sum::<f32>());
    assert_eq!(o[1], x[64..].iter().sum::<f32>());
    for b in 0..8 {
        let want = x[..64].iter().filter(|v| (**v as i32) & 7 == b as i32).count();
        assert_eq!(o[64 + b], want as f32, "histogram bin {b}");
    }
}

#[test]
fn two_blocks_writing_one_element_is_a_global_race() {
    let d = SimDevice::new(0);
    let n = 600usize;
    let xb = d.upload(&inputs(6, n, 1.0)).unwrap();
    let mut y = d.alloc::<f32>(n).unwrap();
    let r = unsafe {
        d.planted().copy_overlapping_tiles(d.stream(), cfg(3, 256, 0), n as i32, &xb.as_view(), &mut y.as_view_mut())
    };
    expect_report(
        r,
        &[
            "kernel copy_overlapping_tiles",
            "block (1,0,0)",
            "thread (0,0,0)",
            "data race on y[255]",
            "blocks are not ordered",
        ],
    );
}

#[test]
fn asynchronous_copies_land_at_their_wait() {
    let d = SimDevice::new(0);
    let n = 300usize;
    let x = inputs(7, n, 1.0);
    let xb = d.upload(&x).unwrap();
    let mut out = d.alloc::<f32>(n).unwrap();
    let k = d.planted();
    unsafe { k.async_reverse_ok(d.stream(), cfg(2, 256, 0), n as i32, &xb.as_view(), &mut out.as_view_mut()) }.unwrap();
    let got = d.download(&out.as_view()).unwrap();
    for (j, g) in got.iter().enumerate() {
        // out[j] = tile[255 - t] for j = b*256 + 255 - t: thread 255 - t's copy, i.e. x[j].
        assert_eq!(*g, x[j], "async_reverse_ok at {j}");
    }
    // Without the wait, thread 0 reads tile[255] after the barrier while thread 255's copy is
    // still in flight (it lands at thread 255's wait, which never comes before its exit).
    let r = unsafe {
        k.async_reverse_missing_wait(d.stream(), cfg(2, 256, 0), n as i32, &xb.as_view(), &mut out.as_view_mut())
    };
    expect_report(
        r,
        &[
            "kernel async_reverse_missing_wait",
            "block (0,0,0), thread (0,0,0)",
            "data race on shared tile[255]",
            "thread (255,0,0)'s asynchronous copy into it (issued at planted.cu:",
            "is in flight",
        ],
    );
    // Two groups, __pipeline_wait_prior(1): the older landed (reading it is fine), the newer not.
    let r = unsafe {
        k.async_read_before_wait(d.stream(), cfg(2, 256, 0), n as i32, &xb.as_view(), &mut out.as_view_mut())
    };
    expect_report(
        r,
        &[
            "kernel async_read_before_wait",
            "block (0,0,0), thread (0,0,0)",
            "read of shared tile2[0]",
            "in flight",
            "__pipeline_wait_prior",
        ],
    );
}

/// Stream order, planted bug one: a kernel on one stream reads what a kernel on another stream
/// writes, with no event between them. In deferred mode the read is refused when it is queued,
/// naming both kernels and both streams; with the event it runs, and only when waited on.
#[test]
fn a_missing_event_between_streams_is_caught_in_deferred_mode() {
    use tessera::{Activation, ActivationOps, StreamOrder};
    for order in [StreamOrder::Deferred { shuffle: None }, StreamOrder::Deferred { shuffle: Some(3) }] {
        let devs = SimDevice::group(2, order);
        let (a, b) = (&devs[0], &devs[1]);
        let x = inputs(11, 500, 1.0);
        let xb = a.upload(&x).unwrap();
        let mut y = a.alloc::<f32>(500).unwrap();
        let mut z = b.alloc::<f32>(500).unwrap();
        a.act_forward(Activation::Relu, &xb.as_view(), &mut y.as_view_mut()).unwrap();
        // The planted bug: b reads y with no event after a's write.
        let e = b.act_forward(Activation::Relu, &y.as_view(), &mut z.as_view_mut()).unwrap_err().to_string();
        for part in ["stream race", "kernel act_fwd on sim:1 reads", "kernel act_fwd on sim:0 writes", "record_event"] {
            assert!(e.contains(part), "report lacks `{part}`:\n{e}");
        }
        eprintln!("reported: {e}");
        // The fix: b waits on an event recorded after the write.
        let ev = a.record_event().unwrap();
        b.wait_event(&ev).unwrap();
        b.act_forward(Activation::Relu, &y.as_view(), &mut z.as_view_mut()).unwrap();
        let got = b.download(&z.as_view()).unwrap();
        let want: Vec<f32> = x.iter().map(|v| v.max(0.0)).collect();
        assert_eq!(got, want, "{order}");
        // A write after a read on another stream is a race too (the write may overtake it).
        let mut x2 = a.alloc::<f32>(500).unwrap();
        b.act_forward(Activation::Relu, &xb.as_view(), &mut x2.as_view_mut()).unwrap_err();
        let ev = b.record_event().unwrap();
        a.wait_event(&ev).unwrap();
        a.act_forward(Activation::Relu, &z.as_view(), &mut y.as_view_mut()).unwrap();
        a.synchronize().unwrap();
    }
}

/// Stream order, planted bug two: the host drops a buffer while another stream's queued kernel
/// still reads it. The free is reported at the group's next call with both names, and the
/// memory is kept until the kernel has run (the simulator never reads freed memory).
#[test]
fn a_free_while_another_stream_still_reads_is_caught_in_deferred_mode() {
    use tessera::{Activation, ActivationOps, StreamOrder};
    let devs = SimDevice::group(1, StreamOrder::Deferred { shuffle: None });
    let a = &devs[0];
    let b = a.with_own_queue().unwrap();
    let x = inputs(5, 300, 1.0);
    let mut z = b.alloc::<f32>(300).unwrap();
    {
        let xb = a.upload(&x).unwrap();
        b.wait_event(&a.record_event().unwrap()).unwrap();
        b.act_forward(Activation::Relu, &xb.as_view(), &mut z.as_view_mut()).unwrap();
        // The planted bug: xb (a's) is dropped here, while b's kernel is still queued.
    }
    let e = a.synchronize().unwrap_err().to_string();
    for part in ["use after free", "freed on sim:0", "kernel act_fwd on sim:0 (stream 1)"] {
        assert!(e.contains(part), "report lacks `{part}`:\n{e}");
    }
    eprintln!("reported: {e}");
    // The kernel still ran on live memory.
    let want: Vec<f32> = x.iter().map(|v| v.max(0.0)).collect();
    assert_eq!(b.download(&z.as_view()).unwrap(), want);
    // The fix: a waits for b's work before the buffer goes.
    {
        let xb = a.upload(&x).unwrap();
        b.wait_event(&a.record_event().unwrap()).unwrap();
        b.act_forward(Activation::Relu, &xb.as_view(), &mut z.as_view_mut()).unwrap();
        a.wait_event(&b.record_event().unwrap()).unwrap();
    }
    a.synchronize().unwrap();
    // Dropped on its own stream after a queued use there: stream order covers it.
    {
        let xb = a.upload(&x).unwrap();
        let mut y = a.alloc::<f32>(300).unwrap();
        a.act_forward(Activation::Relu, &xb.as_view(), &mut y.as_view_mut()).unwrap();
    }
    a.synchronize().unwrap();
}

/// Deferred work runs only when the host waits, and then only what that wait needs: a kernel
/// fault queued on one stream is not reported by a wait on another stream that does not need
/// it, and is reported, naming the kernel, by the wait that runs it.
#[test]
fn deferred_work_runs_when_waited_on() {
    use tessera::StreamOrder;
    let devs = SimDevice::group(2, StreamOrder::Deferred { shuffle: None });
    let (a, b) = (&devs[0], &devs[1]);
    let n = 1000usize;
    let xb = a.upload(&inputs(2, n, 1.0)).unwrap();
    let mut y = a.alloc::<f32>(n).unwrap();
    let k = a.planted();
    // Queued, not run: the launch itself reports nothing.
    unsafe { k.double_off_by_one(a.stream(), cfg(2, 256, 0), n as i64, &xb.as_view(), &mut y.as_view_mut()) }.unwrap();
    let mut w = b.alloc::<f32>(4).unwrap();
    b.write(&mut w.as_view_mut(), &[5.0; 4]).unwrap();
    assert_eq!(b.download(&w.as_view()).unwrap(), vec![5.0; 4], "b's wait does not need a's queue");
    // b now waits for a's work: b's download runs a's kernel, and reports its fault.
    b.wait_event(&a.record_event().unwrap()).unwrap();
    let e = b.download(&w.as_view()).unwrap_err().to_string();
    for part in ["kernel double_off_by_one on sim:0 (queued earlier)", "out-of-bounds write", "y[1000]"] {
        assert!(e.contains(part), "report lacks `{part}`:\n{e}");
    }
    // A wait that ends a stream's queue is waited for too: synchronizing b runs what b waits
    // on, even with nothing queued on b after the wait.
    unsafe { k.double_off_by_one(a.stream(), cfg(2, 256, 0), n as i64, &xb.as_view(), &mut y.as_view_mut()) }.unwrap();
    b.wait_event(&a.record_event().unwrap()).unwrap();
    let e = b.synchronize().unwrap_err().to_string();
    assert!(e.contains("kernel double_off_by_one on sim:0"), "{e}");
    // And a stream waiting on that stream's later point, through the chain c -> b -> a.
    let c = a.with_own_queue().unwrap();
    unsafe { k.double_off_by_one(a.stream(), cfg(2, 256, 0), n as i64, &xb.as_view(), &mut y.as_view_mut()) }.unwrap();
    b.wait_event(&a.record_event().unwrap()).unwrap();
    c.wait_event(&b.record_event().unwrap()).unwrap();
    let e = c.synchronize().unwrap_err().to_string();
    assert!(e.contains("kernel double_off_by_one on sim:0"), "{e}");
}
