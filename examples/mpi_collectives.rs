//! The MPI communicator on its own, outside training: run it under a launcher,
//! `mpirun -np 3 target/debug/examples/mpi_collectives`. Every rank all-reduces,
//! reduce-scatters and all-gathers, broadcasts, and passes a buffer round the ring with send
//! and recv, and checks what it got; rank 0
//! prints `mpi collectives: ok on N ranks`.

use tessera::parallel::comm::Communicator;
use tessera::parallel::mpi;
use tessera::{Backend, CpuDevice};

fn main() -> Result<(), tessera::Error> {
    let rt = mpi::init()?;
    let world = rt.world().clone();
    let (rank, n) = (world.rank(), world.size());
    let dev = CpuDevice::new(0);
    let mut comm = mpi::world_ring(&world, &dev)?;
    for len in [1usize, 3, 1000, 100_003] {
        // all-reduce: rank r contributes r * 1000 + i at i.
        let mut v: Vec<f32> = (0..len).map(|i| (rank * 1000 + i % 1000) as f32).collect();
        comm.all_reduce_sum(&mut v)?;
        for (i, x) in v.iter().enumerate() {
            let want: f32 = (0..n).map(|r| (r * 1000 + i % 1000) as f32).sum();
            assert_eq!(*x, want, "rank {rank}: all-reduce at {i} of {len}");
        }
        // Reduce-scatter: this rank's part holds the sums; all-gather: every part everywhere.
        let mut s: Vec<f32> = (0..len).map(|i| (rank * 1000 + i % 1000) as f32).collect();
        comm.reduce_scatter_sum(&mut s)?;
        let part = tessera::parallel::comm::chunks(len, n)[rank].clone();
        for i in part {
            let want: f32 = (0..n).map(|r| (r * 1000 + i % 1000) as f32).sum();
            assert_eq!(s[i], want, "rank {rank}: reduce-scatter at {i} of {len}");
        }
        comm.all_gather(&mut s)?;
        assert_eq!(s, v, "rank {rank}: reduce-scatter then all-gather = all-reduce ({len})");
        // The mean of the same.
        let mut m: Vec<f32> = vec![rank as f32; len];
        comm.all_reduce_mean(&mut m)?;
        let mean = (0..n).sum::<usize>() as f32 / n as f32;
        assert!(m.iter().all(|x| (x - mean).abs() < 1e-6), "rank {rank}: mean");
        // broadcast from the last rank.
        let mut b = vec![rank as f32; len];
        comm.broadcast(&mut b, n - 1)?;
        assert!(b.iter().all(|&x| x == (n - 1) as f32), "rank {rank}: broadcast");
        // send to the next rank, receive from the previous.
        if n > 1 {
            let mine = vec![rank as f32; len];
            comm.send(&CpuDevice::view(&mine), (rank + 1) % n)?;
            let mut got = vec![0f32; len];
            comm.recv(&mut CpuDevice::view_mut(&mut got), (rank + n - 1) % n)?;
            assert!(got.iter().all(|&x| x == ((rank + n - 1) % n) as f32), "rank {rank}: recv");
        }
    }
    drop(comm);
    if rank == 0 {
        println!("mpi collectives: ok on {n} ranks");
    }
    Ok(())
}
