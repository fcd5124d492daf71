//! Communicators: all-reduce (sum or mean, in place), broadcast, send and recv among a group
//! of ranks. [`RingComm`] runs a ring all-reduce (reduce-scatter, then all-gather) whose
//! additions run on each rank's own device with the reduce kernels (`axpy`), over a [`Wire`]
//! that moves buffers between ranks: [`LocalComm`] connects ranks that are threads of one
//! process (over GPUs the data stay on the GPUs); `MpiComm` (in [`crate::parallel::mpi`])
//! connects processes. Each chunk is summed in the same order on its way round the ring and
//! then copied, so every rank ends with the same bits, whatever the wire. `NcclComm` (for GPUs
//! across processes) implements the same trait over NCCL's own all-reduce.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::Duration;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::ops::Ops;

/// A group of ranks that exchange f32 buffers.
pub trait Communicator<B: Backend>: Send {
    /// This rank, `0..size`.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn size(&self) -> usize;
    /// Sums `buf` over the group, in place on every rank.
    fn all_reduce_sum(&mut self, buf: &mut B::Buf<f32>) -> Result<()>;
    /// Averages `buf` over the group, in place on every rank.
    fn all_reduce_mean(&mut self, buf: &mut B::Buf<f32>) -> Result<()>;
    /// Copies `root`'s `buf` into every other rank's `buf`.
    fn broadcast(&mut self, buf: &mut B::Buf<f32>, root: usize) -> Result<()>;
    /// Sends `buf` to rank `to`.
    fn send(&mut self, buf: &B::Ref<'_, f32>, to: usize) -> Result<()>;
    /// Receives from rank `from` into `buf` (lengths must agree).
    fn recv(&mut self, buf: &mut B::Mut<'_, f32>, from: usize) -> Result<()>;
}

/// How the ranks of a [`RingComm`] move buffers: in order, per pair of ranks.
pub trait Wire<B: Backend>: Send {
    /// Hands a copy of `view` (on `dev`) to rank `to` (a group rank).
    fn post(&mut self, dev: &B, view: &B::Ref<'_, f32>, to: usize) -> Result<()>;
    /// The next buffer from rank `from`, as a buffer usable on `dev`.
    fn take(&mut self, dev: &B, from: usize) -> Result<B::Buf<f32>>;
    /// Waits until every posted buffer has been taken (a wire whose posts do not complete at
    /// once, such as MPI's).
    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
}

/// One rank of a group whose collectives run as a ring over a [`Wire`].
pub struct RingComm<B: Backend, W: Wire<B>> {
    rank: usize,
    size: usize,
    dev: B,
    wire: W,
}

/// A message: a buffer on the sender's device.
struct Msg<B: Backend> {
    buf: B::Buf<f32>,
}

/// The in-process wire: one channel per ordered pair of ranks; buffers stay on their devices
/// (a GPU buffer is peer-copied only where the receiver cannot read it).
pub struct LocalWire<B: Backend> {
    rank: usize,
    /// `to[r]`: the channel into rank r's mailbox from this rank.
    to: Vec<Sender<Msg<B>>>,
    /// `from[r]`: this rank's mailbox for messages from rank r.
    from: Vec<Receiver<Msg<B>>>,
    timeout: Duration,
}

/// One rank of an in-process group (one thread per rank).
pub type LocalComm<B> = RingComm<B, LocalWire<B>>;

impl<B: Backend, W: Wire<B>> RingComm<B, W> {
    /// Rank `rank` of a group of `size` on `dev`, over `wire`.
    pub fn new(rank: usize, size: usize, dev: B, wire: W) -> Self {
        RingComm { rank, size, dev, wire }
    }
    fn post(&mut self, view: &B::Ref<'_, f32>, to: usize) -> Result<()> {
        self.wire.post(&self.dev, view, to)
    }
    fn take(&mut self, from: usize) -> Result<B::Buf<f32>> {
        self.wire.take(&self.dev, from)
    }
}

/// The even split of `n` elements into `parts` contiguous chunks (the first `n % parts` get one
/// more).
pub fn chunks(n: usize, parts: usize) -> Vec<std::ops::Range<usize>> {
    let parts = parts.max(1);
    let (q, r) = (n / parts, n % parts);
    let mut start = 0;
    (0..parts)
        .map(|i| {
            let len = q + (i < r) as usize;
            let c = start..start + len;
            start += len;
            c
        })
        .collect()
}

impl<B: Ops> RingComm<B, LocalWire<B>> {
    /// A group over `devices`: rank `i` runs on `devices[i]`. Hand each to its own thread.
    pub fn group(devices: &[B]) -> Vec<LocalComm<B>> {
        let n = devices.len();
        // chans[from][to]
        let mut senders: Vec<Vec<Option<Sender<Msg<B>>>>> = (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
        let mut receivers: Vec<Vec<Option<Receiver<Msg<B>>>>> =
            (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
        for (from, row) in senders.iter_mut().enumerate() {
            for (to, slot) in row.iter_mut().enumerate() {
                let (tx, rx) = channel();
                *slot = Some(tx);
                receivers[to][from] = Some(rx);
            }
        }
        devices
            .iter()
            .enumerate()
            .map(|(rank, dev)| {
                let wire = LocalWire {
                    rank,
                    to: senders[rank].iter_mut().map(|s| s.take().unwrap()).collect(),
                    from: receivers[rank].iter_mut().map(|r| r.take().unwrap()).collect(),
                    // TESSERA_COMM_TIMEOUT (an engine checks the value before it builds a group).
                    timeout: crate::parallel::engine::comm_timeout()
                        .unwrap_or(crate::parallel::engine::DEFAULT_COMM_TIMEOUT),
                };
                RingComm::new(rank, n, dev.clone(), wire)
            })
            .collect()
    }
}

impl<B: Backend> Wire<B> for LocalWire<B> {
    fn post(&mut self, dev: &B, view: &B::Ref<'_, f32>, to: usize) -> Result<()> {
        let buf = dev.duplicate(view)?;
        // The receiver's device reads it: the copy must be done first.
        dev.synchronize()?;
        self.to[to].send(Msg { buf }).map_err(|_| Error::Parallel(format!("rank {to} of the group has stopped")))
    }

    fn take(&mut self, dev: &B, from: usize) -> Result<B::Buf<f32>> {
        let m = self.from[from].recv_timeout(self.timeout).map_err(|_| {
            Error::Parallel(format!(
                "rank {} waited {:?} for rank {from}, which stopped or hung",
                self.rank, self.timeout
            ))
        })?;
        // Usable here as it is, or copied here (a peer copy where the sender is another GPU).
        dev.adopt(m.buf)
    }
}

impl<B: Ops, W: Wire<B>> Communicator<B> for RingComm<B, W> {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&mut self, buf: &mut B::Buf<f32>) -> Result<()> {
        let n = self.size;
        if n == 1 {
            return Ok(());
        }
        let c = chunks(B::buf_len(buf), n);
        let (next, prev) = ((self.rank + 1) % n, (self.rank + n - 1) % n);
        // Reduce-scatter: after n-1 steps rank r holds the full sum of chunk (r+1) mod n.
        for step in 0..n - 1 {
            let send = (self.rank + n - step) % n;
            let recv = (self.rank + n - step - 1) % n;
            // Empty chunks (fewer elements than ranks) are neither sent nor awaited, on both sides.
            if !c[send].is_empty() {
                self.post(&B::view_range(buf, c[send].clone()), next)?;
            }
            if !c[recv].is_empty() {
                let got = self.take(prev)?;
                let mut v = B::view_mut(buf);
                self.dev.axpy(1.0, &B::view(&got), &mut B::sub_mut(&mut v, c[recv].clone()))?;
            }
        }
        // All-gather: pass the summed chunks around the ring.
        for step in 0..n - 1 {
            let send = (self.rank + 1 + n - step) % n;
            let recv = (self.rank + n - step) % n;
            if !c[send].is_empty() {
                self.post(&B::view_range(buf, c[send].clone()), next)?;
            }
            if !c[recv].is_empty() {
                let got = self.take(prev)?;
                let mut v = B::view_mut(buf);
                self.dev.copy(&B::view(&got), &mut B::sub_mut(&mut v, c[recv].clone()))?;
            }
        }
        self.wire.flush()?;
        self.dev.synchronize()
    }

    fn all_reduce_mean(&mut self, buf: &mut B::Buf<f32>) -> Result<()> {
        self.all_reduce_sum(buf)?;
        let s = 1.0 / self.size as f32;
        self.dev.scale(s, &mut B::view_mut(buf))
    }

    fn broadcast(&mut self, buf: &mut B::Buf<f32>, root: usize) -> Result<()> {
        if root >= self.size {
            return Err(Error::Invalid(format!("broadcast root {root} is not a rank of a group of {}", self.size)));
        }
        if self.rank == root {
            for r in (0..self.size).filter(|&r| r != root) {
                self.post(&B::view(buf), r)?;
            }
            self.wire.flush()?;
        } else {
            let got = self.take(root)?;
            if B::buf_len(&got) != B::buf_len(buf) {
                return Err(Error::shape(
                    "broadcast",
                    format!("root sent {} elements, rank {} holds {}", B::buf_len(&got), self.rank, B::buf_len(buf)),
                ));
            }
            self.dev.copy(&B::view(&got), &mut B::view_mut(buf))?;
        }
        Ok(())
    }

    fn send(&mut self, buf: &B::Ref<'_, f32>, to: usize) -> Result<()> {
        if to >= self.size {
            return Err(Error::Invalid(format!("send to rank {to} in a group of {}", self.size)));
        }
        self.post(buf, to)
    }

    fn recv(&mut self, buf: &mut B::Mut<'_, f32>, from: usize) -> Result<()> {
        if from >= self.size {
            return Err(Error::Invalid(format!("recv from rank {from} in a group of {}", self.size)));
        }
        let got = self.take(from)?;
        let r = self.dev.copy(&B::view(&got), buf);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuDevice;

    #[test]
    fn chunks_cover_and_balance() {
        assert_eq!(chunks(10, 3), vec![0..4, 4..7, 7..10]);
        assert_eq!(chunks(2, 4), vec![0..1, 1..2, 2..2, 2..2]);
    }

    #[test]
    fn ring_all_reduce_broadcast_and_point_to_point() {
        for n in [1usize, 2, 3, 4, 5] {
            for len in [1usize, 3, 7, 1000] {
                let devs: Vec<CpuDevice> = (0..n).map(CpuDevice::new).collect();
                let comms = LocalComm::group(&devs);
                let results: Vec<Vec<f32>> = std::thread::scope(|s| {
                    let hs: Vec<_> = comms
                        .into_iter()
                        .map(|mut c| {
                            s.spawn(move || {
                                let r = c.rank();
                                let mut v: Vec<f32> = (0..len).map(|i| (r * 1000 + i) as f32).collect();
                                c.all_reduce_sum(&mut v).unwrap();
                                let mut b: Vec<f32> = vec![r as f32; len];
                                c.broadcast(&mut b, n - 1).unwrap();
                                assert!(b.iter().all(|&x| x == (n - 1) as f32));
                                if n > 1 {
                                    let mut got = vec![0f32; 2];
                                    c.send(&[r as f32, 1.0].as_slice(), (r + 1) % n).unwrap();
                                    c.recv(&mut got.as_mut_slice(), (r + n - 1) % n).unwrap();
                                    assert_eq!(got, vec![((r + n - 1) % n) as f32, 1.0]);
                                }
                                v
                            })
                        })
                        .collect();
                    hs.into_iter().map(|h| h.join().unwrap()).collect()
                });
                let want: Vec<f32> = (0..len).map(|i| (0..n).map(|r| (r * 1000 + i) as f32).sum()).collect();
                for v in &results {
                    assert_eq!(v, &want, "n={n} len={len}");
                }
            }
        }
    }
}
