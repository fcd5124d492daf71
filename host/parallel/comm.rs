//! Communicators: all-reduce (sum or mean, in place), broadcast, send and recv among a group
//! of ranks. [`RingComm`] runs a ring all-reduce (reduce-scatter, then all-gather) whose
//! additions run on each rank's own device with the reduce kernels (`axpy`), over a [`Wire`]
//! that moves buffers between ranks: [`LocalComm`] connects ranks that are threads of one
//! process (over GPUs the data stay on the GPUs); `MpiComm` (in [`crate::parallel::mpi`])
//! connects processes. Each chunk is summed in the same order on its way round the ring and
//! then copied, so every rank ends with the same bits, whatever the wire. `NcclComm` (for GPUs
//! across processes) implements the same trait over NCCL's own all-reduce.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::ops::reduce::ReduceOps;
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
    /// Reduce-scatter: sums `buf` over the group and leaves on each rank the sum of its own
    /// part, the range [`chunks`]`(len, size)[rank]` of `buf`; the rest of `buf` is scratch
    /// afterwards. Each rank sends and receives `(size - 1) / size` of the buffer, half an
    /// all-reduce; followed by [`Communicator::all_gather`] it gives every rank the sums.
    fn reduce_scatter_sum(&mut self, buf: &mut B::Buf<f32>) -> Result<()>;
    /// All-gather: copies each rank's part of its `buf` (the range [`chunks`]`(len,
    /// size)[rank]`) into the same range of every other rank's `buf`. Every rank passes a
    /// buffer of the same length.
    fn all_gather(&mut self, buf: &mut B::Buf<f32>) -> Result<()>;
    /// Sends `buf` to rank `to`.
    fn send(&mut self, buf: &B::Ref<'_, f32>, to: usize) -> Result<()>;
    /// Receives from rank `from` into `buf` (lengths must agree).
    fn recv(&mut self, buf: &mut B::Mut<'_, f32>, from: usize) -> Result<()>;
    /// Makes this rank's later work wait for `event` (recorded on another queue of this rank's
    /// device, e.g. after the buffer to reduce was written), without the host waiting.
    fn wait_event(&mut self, event: &B::Event) -> Result<()>;
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

/// A message: a buffer on the sender's device, and the event after which it holds the data.
struct Msg<B: Backend> {
    buf: B::Buf<f32>,
    ready: B::Event,
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
    /// A wait on another rank lasts at most [`DEFAULT_COMM_TIMEOUT`](crate::parallel::DEFAULT_COMM_TIMEOUT).
    pub fn group(devices: &[B]) -> Vec<LocalComm<B>> {
        Self::group_with_timeout(devices, crate::parallel::DEFAULT_COMM_TIMEOUT)
    }

    /// A group whose waits on another rank last at most `timeout`.
    pub fn group_with_timeout(devices: &[B], timeout: Duration) -> Vec<LocalComm<B>> {
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
                    timeout,
                };
                RingComm::new(rank, n, dev.clone(), wire)
            })
            .collect()
    }
}

/// How a backend's devices in one process form a data-parallel group: the communicators the
/// in-process engine gives the ranks (one per device, in order; hand each to its own thread),
/// each waiting at most `timeout` on another. The ring of [`LocalComm`] by default; on the CPU
/// [`SharedComm`], which sums in the ring's order straight from the other ranks' buffers (same
/// bits, no copies through messages).
pub trait LocalGroup: Ops {
    /// The group over `devices`.
    fn local_group(devices: &[Self], timeout: Duration) -> Vec<Box<dyn Communicator<Self>>> {
        LocalComm::group_with_timeout(devices, timeout)
            .into_iter()
            .map(|c| Box::new(c) as Box<dyn Communicator<Self>>)
            .collect()
    }
}

impl LocalGroup for crate::CudaDevice {}
impl LocalGroup for crate::SimDevice {}
impl LocalGroup for crate::CpuDevice {
    fn local_group(devices: &[Self], timeout: Duration) -> Vec<Box<dyn Communicator<Self>>> {
        SharedComm::group_with_timeout(devices, timeout)
            .into_iter()
            .map(|c| Box::new(c) as Box<dyn Communicator<Self>>)
            .collect()
    }
}

impl<B: Backend> Wire<B> for LocalWire<B> {
    fn post(&mut self, dev: &B, view: &B::Ref<'_, f32>, to: usize) -> Result<()> {
        let buf = dev.duplicate(view)?;
        // The receiver's queue waits for this event before it reads the copy.
        let ready = dev.record_event()?;
        self.to[to].send(Msg { buf, ready }).map_err(|_| Error::Parallel(format!("rank {to} of the group has stopped")))
    }

    fn take(&mut self, dev: &B, from: usize) -> Result<B::Buf<f32>> {
        let m = self.from[from].recv_timeout(self.timeout).map_err(|_| {
            Error::Parallel(format!(
                "rank {} waited {:?} for rank {from}, which stopped or hung. If it was only slow, allow more time: \
                 TESSERA_COMM_TIMEOUT={} (seconds)",
                self.rank,
                self.timeout,
                (self.timeout.as_secs() * 4).max(600)
            ))
        })?;
        // Usable here once the copy is done, then freed in this queue's order (or copied here:
        // a peer copy where the sender is another GPU).
        dev.wait_event(&m.ready)?;
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
        let r = self.ring_all_reduce(buf);
        if r.is_err() {
            // Work queued before the failure may still use `buf`: finish it before the caller
            // can free or reuse the buffer.
            let _ = self.dev.synchronize();
        }
        r
    }

    fn all_reduce_mean(&mut self, buf: &mut B::Buf<f32>) -> Result<()> {
        self.all_reduce_sum(buf)?;
        let s = 1.0 / self.size as f32;
        self.dev.scale(s, &mut B::view_mut(buf))?;
        // The caller uses `buf` on its own queue next.
        self.dev.synchronize()
    }

    fn reduce_scatter_sum(&mut self, buf: &mut B::Buf<f32>) -> Result<()> {
        let r = self.ring_reduce_scatter(buf, 0).and_then(|_| self.wire.flush());
        // Drained either way: the caller reads its part (or frees the buffer) next.
        let s = self.dev.synchronize();
        r.and(s)
    }

    fn all_gather(&mut self, buf: &mut B::Buf<f32>) -> Result<()> {
        let r = self.ring_all_gather(buf, 0).and_then(|_| self.wire.flush());
        let s = self.dev.synchronize();
        r.and(s)
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
        // The root's copies read `buf`, the others' copy writes it: done before the caller
        // touches it again on its own queue.
        self.dev.synchronize()
    }

    fn send(&mut self, buf: &B::Ref<'_, f32>, to: usize) -> Result<()> {
        if to >= self.size {
            return Err(Error::Invalid(format!("send to rank {to} in a group of {}", self.size)));
        }
        self.post(buf, to)?;
        // The posted copy reads `buf`: done before the caller may write it again.
        self.dev.synchronize()
    }

    fn recv(&mut self, buf: &mut B::Mut<'_, f32>, from: usize) -> Result<()> {
        if from >= self.size {
            return Err(Error::Invalid(format!("recv from rank {from} in a group of {}", self.size)));
        }
        let got = self.take(from)?;
        self.dev.copy(&B::view(&got), buf)?;
        // The copy writes `buf`, which the caller reads next on its own queue.
        self.dev.synchronize()
    }

    fn wait_event(&mut self, event: &B::Event) -> Result<()> {
        self.dev.wait_event(event)
    }
}

impl<B: Ops, W: Wire<B>> RingComm<B, W> {
    /// The ring's reduce-scatter: after `n - 1` steps rank r holds the full sum of chunk
    /// `(r + shift) mod n` (each chunk summed in ring order, starting from the rank after the
    /// one that ends with it). Empty chunks (fewer elements than ranks) are neither sent nor
    /// awaited, on both sides.
    fn ring_reduce_scatter(&mut self, buf: &mut B::Buf<f32>, shift: usize) -> Result<()> {
        let n = self.size;
        let c = chunks(B::buf_len(buf), n);
        let (next, prev) = ((self.rank + 1) % n, (self.rank + n - 1) % n);
        for step in 0..n.saturating_sub(1) {
            let send = (self.rank + shift + 2 * n - step - 1) % n;
            let recv = (self.rank + shift + 2 * n - step - 2) % n;
            if !c[send].is_empty() {
                self.post(&B::view_range(buf, c[send].clone()), next)?;
            }
            if !c[recv].is_empty() {
                let got = self.take(prev)?;
                let mut v = B::view_mut(buf);
                self.dev.axpy(1.0, &B::view(&got), &mut B::sub_mut(&mut v, c[recv].clone()))?;
            }
        }
        Ok(())
    }

    /// The ring's all-gather: rank r starts with chunk `(r + shift) mod n` final and passes
    /// the final chunks round the ring until every rank has all of them.
    fn ring_all_gather(&mut self, buf: &mut B::Buf<f32>, shift: usize) -> Result<()> {
        let n = self.size;
        let c = chunks(B::buf_len(buf), n);
        let (next, prev) = ((self.rank + 1) % n, (self.rank + n - 1) % n);
        for step in 0..n.saturating_sub(1) {
            let send = (self.rank + shift + n - step) % n;
            let recv = (self.rank + shift + 2 * n - step - 1) % n;
            if !c[send].is_empty() {
                self.post(&B::view_range(buf, c[send].clone()), next)?;
            }
            if !c[recv].is_empty() {
                let got = self.take(prev)?;
                let mut v = B::view_mut(buf);
                self.dev.copy(&B::view(&got), &mut B::sub_mut(&mut v, c[recv].clone()))?;
            }
        }
        Ok(())
    }

    /// The ring all-reduce (reduce-scatter, then all-gather), ending with its queue drained.
    fn ring_all_reduce(&mut self, buf: &mut B::Buf<f32>) -> Result<()> {
        let n = self.size;
        if n == 1 {
            return Ok(());
        }
        // Reduce-scatter leaving rank r the sum of chunk (r + 1) mod n, then all-gather.
        self.ring_reduce_scatter(buf, 1)?;
        self.ring_all_gather(buf, 1)?;
        self.wire.flush()?;
        self.dev.synchronize()
    }
}

/// A barrier for the ranks of a [`SharedComm`] group whose waits are bounded (by
/// `TESSERA_COMM_TIMEOUT`) and which a rank that stops (drops its communicator, or times out)
/// breaks for all: the others get an error instead of waiting for ever.
struct Rendezvous {
    state: Mutex<RendezvousState>,
    cv: Condvar,
    ranks: usize,
    timeout: Duration,
}

/// A rank's buffer, published to the others for one collective.
#[derive(Clone, Copy)]
struct BufPtr(*mut f32);
// SAFETY: the pointer is only dereferenced inside a collective, in the disjoint or
// rendezvous-ordered ranges that `SharedComm::collective` gives each rank.
unsafe impl Send for BufPtr {}

/// Held while a rank is inside a phase (and forgotten when it leaves normally): if the phase
/// panicked, the group is broken and the unwinding waits until no rank reads this rank's
/// buffer any more, before the buffer can be freed.
struct PhaseGuard<'a> {
    rv: &'a Rendezvous,
    rank: usize,
}

impl Drop for PhaseGuard<'_> {
    fn drop(&mut self) {
        let mut s = self.rv.lock();
        Rendezvous::leave_phase(&mut s);
        if s.broken.is_none() {
            s.broken = Some(format!("rank {} failed inside a collective", self.rank));
        }
        let _ = self.rv.fail(s, String::new());
    }
}

struct RendezvousState {
    arrived: usize,
    generation: u64,
    broken: Option<String>,
    /// Ranks inside a phase that reads other ranks' buffers. A rank leaves with an error only
    /// once this is 0, so no rank reads a buffer whose owner has moved on (the phases are plain
    /// loops over memory: they end in bounded time).
    busy: usize,
    /// Each rank's buffer for the collective in progress: (address, length).
    bufs: Vec<(BufPtr, usize)>,
}

impl Rendezvous {
    fn lock(&self) -> std::sync::MutexGuard<'_, RendezvousState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn break_with(&self, why: String) {
        let mut s = self.lock();
        if s.broken.is_none() {
            s.broken = Some(why);
        }
        self.cv.notify_all();
    }

    /// Leaves a phase that reads other ranks' buffers.
    fn leave_phase(s: &mut RendezvousState) {
        s.busy -= 1;
    }

    /// The error `why`, once no rank is inside a phase any more.
    fn fail(&self, mut s: std::sync::MutexGuard<'_, RendezvousState>, why: String) -> Result<()> {
        self.cv.notify_all();
        while s.busy > 0 {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        Err(Error::Parallel(why))
    }

    /// Waits until every rank has arrived (the memory each wrote before is then visible to all).
    /// `from_phase`: this rank comes from a phase (it stops reading others' buffers now);
    /// `into_phase`: all ranks go on into one.
    fn wait(&self, rank: usize, from_phase: bool, into_phase: bool) -> Result<()> {
        let mut s = self.lock();
        if from_phase {
            Self::leave_phase(&mut s);
        }
        if let Some(why) = s.broken.clone() {
            return self.fail(s, why);
        }
        let generation = s.generation;
        s.arrived += 1;
        if s.arrived == self.ranks {
            s.arrived = 0;
            s.generation += 1;
            if into_phase {
                s.busy = self.ranks;
            }
            self.cv.notify_all();
            return Ok(());
        }
        let deadline = std::time::Instant::now() + self.timeout;
        while s.generation == generation {
            if let Some(why) = s.broken.clone() {
                s.arrived -= 1;
                return self.fail(s, why);
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                let why = format!(
                    "rank {rank} waited {:?} for the others in a collective: a rank stopped or hung. If it was \
                     only slow, allow more time: TESSERA_COMM_TIMEOUT={} (seconds)",
                    self.timeout,
                    (self.timeout.as_secs() * 4).max(600)
                );
                s.broken = Some(why.clone());
                s.arrived -= 1;
                return self.fail(s, why);
            }
            s = self.cv.wait_timeout(s, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
        Ok(())
    }
}

/// One rank of an in-process group on the CPU whose all-reduce reads the other ranks' buffers
/// directly (they share the memory): rank `k` sums chunk `k` of every buffer into its own, in
/// the ring's order (`x_k + x_{k+1} + ... + x_{k-1}`, so the bits are those of [`RingComm`]
/// and of the MPI ring), then every rank copies the other chunks from their owners. Per rank it
/// reads and writes each element about 2.5 times for 2 ranks, against about 6 times (and two
/// allocations) through ring messages. Broadcast, send and recv go through a [`LocalComm`].
pub struct SharedComm {
    rank: usize,
    size: usize,
    dev: crate::CpuDevice,
    rv: std::sync::Arc<Rendezvous>,
    ring: LocalComm<crate::CpuDevice>,
}

impl SharedComm {
    /// A group over `devices`: rank `i` runs on `devices[i]`. Hand each to its own thread.
    /// A wait on another rank lasts at most [`DEFAULT_COMM_TIMEOUT`](crate::parallel::DEFAULT_COMM_TIMEOUT).
    pub fn group(devices: &[crate::CpuDevice]) -> Vec<SharedComm> {
        Self::group_with_timeout(devices, crate::parallel::DEFAULT_COMM_TIMEOUT)
    }

    /// A group whose waits on another rank last at most `timeout`.
    pub fn group_with_timeout(devices: &[crate::CpuDevice], timeout: Duration) -> Vec<SharedComm> {
        let n = devices.len();
        let rv = std::sync::Arc::new(Rendezvous {
            state: Mutex::new(RendezvousState {
                arrived: 0,
                generation: 0,
                broken: None,
                busy: 0,
                bufs: vec![(BufPtr(std::ptr::null_mut()), 0); n],
            }),
            cv: Condvar::new(),
            ranks: n,
            timeout,
        });
        LocalComm::group_with_timeout(devices, timeout)
            .into_iter()
            .enumerate()
            .map(|(rank, ring)| SharedComm { rank, size: n, dev: devices[rank].clone(), rv: rv.clone(), ring })
            .collect()
    }
}

impl Drop for SharedComm {
    fn drop(&mut self) {
        self.rv.break_with(format!("rank {} of the group has stopped", self.rank));
    }
}

/// Elements summed at a time in [`SharedComm`]'s reduction (a block of each source stays in
/// the L1 cache while the next is added).
const SHARED_BLOCK: usize = 4096;

impl SharedComm {
    /// The shared-memory collectives: publish every rank's buffer, then (when `reduce`) each
    /// rank sums its own chunk from all buffers into its own, then (when `gather`) copies every
    /// other chunk from its owner; `what` names the collective in errors.
    fn collective(&mut self, buf: &mut [f32], reduce: bool, gather: bool, what: &'static str) -> Result<()> {
        let (n, me) = (self.size, self.rank);
        if n == 1 {
            return Ok(());
        }
        // From here until the last rendezvous this rank touches its buffer only through `base`,
        // and every rank reads or writes only what the phases below give it, with a rendezvous
        // (a mutex and condition variable: it orders the memory) between the phases. Every rank
        // goes through all three, whatever happens in the phases, so the ranks stay in step.
        let base = buf.as_mut_ptr();
        let len = buf.len();
        self.rv.lock().bufs[me] = (BufPtr(base), len);
        self.rv.wait(me, false, true)?;
        // No rank publishes again before every rank has passed the last rendezvous, so all
        // see the same buffers and lengths.
        let bufs = self.rv.lock().bufs.clone();
        let same_length = bufs.iter().all(|b| b.1 == len);
        let guard = PhaseGuard { rv: &self.rv, rank: me };
        let c = chunks(len, n);
        if same_length && reduce {
            // Reduce: chunk `me`, in the ring's order, into this rank's own buffer. No other
            // rank reads chunk `me` of any buffer, or writes anything, in this phase. The
            // ring's all-reduce sums chunk `me` starting from rank `me` itself; its
            // reduce-scatter (which leaves chunk `me` on rank `me`) starts from rank `me + 1`
            // and adds rank `me` last: the same order here, so both give the ring's bits.
            let order: Vec<usize> =
                if gather { (0..n).map(|j| (me + j) % n).collect() } else { (1..=n).map(|j| (me + j) % n).collect() };
            let mine = c[me].clone();
            let mut acc = vec![0f32; SHARED_BLOCK.min(mine.len())];
            for start in (mine.start..mine.end).step_by(SHARED_BLOCK) {
                let end = (start + SHARED_BLOCK).min(mine.end);
                let acc = &mut acc[..end - start];
                for (step, &r) in order.iter().enumerate() {
                    // SAFETY: rank r's buffer holds len elements (as every buffer does) and is
                    // alive; in this phase only this rank accesses chunk `me` of any buffer.
                    let src = unsafe { std::slice::from_raw_parts(bufs[r].0 .0.add(start).cast_const(), end - start) };
                    if step == 0 {
                        acc.copy_from_slice(src);
                    } else {
                        // acc = x_r + acc, as the ring's axpy adds the received partial sum (an
                        // f32 addition is commutative, bit for bit).
                        crate::backend::cpu::wide(|| acc.iter_mut().zip(src).for_each(|(a, x)| *a += x));
                    }
                }
                // SAFETY: [start, end) lies in this rank's buffer; only this rank touches it now.
                unsafe { std::ptr::copy_nonoverlapping(acc.as_ptr(), base.add(start), end - start) };
            }
        }
        std::mem::forget(guard);
        if reduce && gather {
            self.rv.wait(me, true, true)?;
        }
        let guard = PhaseGuard { rv: &self.rv, rank: me };
        if same_length && gather {
            // Gather: every other chunk from its owner, which does not write its own chunk now.
            for (k, ck) in c.iter().enumerate().filter(|(k, ck)| *k != me && !ck.is_empty()) {
                let src = bufs[k].0 .0;
                // SAFETY: chunk k of rank k's buffer is final and only read in this phase; this
                // rank's chunk k is written only by this rank, and read by no other now.
                unsafe { std::ptr::copy_nonoverlapping(src.add(ck.start).cast_const(), base.add(ck.start), ck.len()) };
            }
        }
        std::mem::forget(guard);
        // Nobody returns (and writes its buffer again) while another may still read it.
        self.rv.wait(me, true, false)?;
        if !same_length {
            let lens: Vec<String> = bufs.iter().map(|b| b.1.to_string()).collect();
            return Err(Error::shape(
                what,
                format!(
                    "ranks 0..{n} hold {} elements: every rank must pass a buffer of the same length",
                    lens.join(", ")
                ),
            ));
        }
        Ok(())
    }
}

impl Communicator<crate::CpuDevice> for SharedComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&mut self, buf: &mut Vec<f32>) -> Result<()> {
        self.collective(buf, true, true, "all-reduce")
    }

    fn reduce_scatter_sum(&mut self, buf: &mut Vec<f32>) -> Result<()> {
        self.collective(buf, true, false, "reduce-scatter")
    }

    fn all_gather(&mut self, buf: &mut Vec<f32>) -> Result<()> {
        self.collective(buf, false, true, "all-gather")
    }

    fn all_reduce_mean(&mut self, buf: &mut Vec<f32>) -> Result<()> {
        self.all_reduce_sum(buf)?;
        self.dev.scale(1.0 / self.size as f32, &mut buf.as_mut_slice())
    }

    fn broadcast(&mut self, buf: &mut Vec<f32>, root: usize) -> Result<()> {
        self.ring.broadcast(buf, root)
    }

    fn wait_event(&mut self, _event: &()) -> Result<()> {
        Ok(())
    }
    fn send(&mut self, buf: &&[f32], to: usize) -> Result<()> {
        self.ring.send(buf, to)
    }

    fn recv(&mut self, buf: &mut &mut [f32], from: usize) -> Result<()> {
        self.ring.recv(buf, from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuDevice;

    /// Each rank's values: a spread of magnitudes, so the order of the additions shows in the bits.
    fn values(rank: usize, len: usize) -> Vec<f32> {
        (0..len).map(|i| ((i * 7919 + rank * 104729) % 10007) as f32 * 10f32.powi((i % 7) as i32 - 3) - 17.5).collect()
    }

    /// Runs `f` on every rank of `comms`, each on its own thread.
    fn on_threads<C: Send, R: Send>(comms: Vec<C>, f: impl Fn(usize, C) -> R + Sync) -> Vec<R> {
        std::thread::scope(|s| {
            let f = &f;
            let hs: Vec<_> = comms.into_iter().enumerate().map(|(r, c)| s.spawn(move || f(r, c))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn the_shared_memory_all_reduce_gives_the_ring_bits() {
        for n in 1usize..=5 {
            for len in [0usize, 1, 3, 7, 1000, SHARED_BLOCK * 2 + 13] {
                let devs: Vec<CpuDevice> = (0..n).map(CpuDevice::new).collect();
                let ring = on_threads(LocalComm::group(&devs), |r, mut c| {
                    let mut v = values(r, len);
                    c.all_reduce_sum(&mut v).unwrap();
                    v
                });
                let shared = on_threads(SharedComm::group(&devs), |r, mut c| {
                    let mut v = values(r, len);
                    // Twice: the second reduces the first's results (a group is reused every step).
                    c.all_reduce_sum(&mut v).unwrap();
                    let once = v.clone();
                    c.all_reduce_sum(&mut v).unwrap();
                    (once, v)
                });
                for (r, (once, twice)) in shared.iter().enumerate() {
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(once), bits(&ring[r]), "n={n} len={len} rank {r}");
                    let want: Vec<f32> = ring[0].iter().map(|x| (0..n).fold(0.0f32, |a, _| *x + a)).collect();
                    if n > 1 {
                        assert_eq!(bits(twice), bits(&want), "n={n} len={len} rank {r}: second round");
                    }
                }
            }
        }
    }

    #[test]
    fn the_shared_memory_group_refuses_mismatched_lengths_and_a_stopped_rank() {
        let devs: Vec<CpuDevice> = (0..3).map(CpuDevice::new).collect();
        let errs = on_threads(SharedComm::group(&devs), |r, mut c| {
            let mut v = vec![1.0f32; 10 + (r == 2) as usize];
            let e = c.all_reduce_sum(&mut v).unwrap_err().to_string();
            // The ranks stay in step: the group goes on working, again and again.
            for round in 0..50 {
                let mut w = vec![(r + round) as f32; 7 + round % 5];
                c.all_reduce_sum(&mut w).unwrap();
                assert!(w.iter().all(|&x| x == (3 * round + 3) as f32), "round {round}: {w:?}");
            }
            e
        });
        for e in &errs {
            assert!(e.contains("ranks 0..3 hold 10, 10, 11 elements"), "{e}");
        }
        // A rank that stops (drops its communicator) ends the others' wait at once.
        let t = std::time::Instant::now();
        let errs = on_threads(SharedComm::group(&devs), |r, mut c| {
            if r == 1 {
                drop(c);
                return String::new();
            }
            let mut v = vec![1.0f32; 10];
            c.all_reduce_sum(&mut v).unwrap_err().to_string()
        });
        assert!(t.elapsed() < std::time::Duration::from_secs(10));
        assert!(errs[0].contains("rank 1 of the group has stopped"), "{}", errs[0]);
        assert!(errs[2].contains("rank 1 of the group has stopped"), "{}", errs[2]);
    }

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

    /// Reduce-scatter leaves each rank the sum of its own part, and all-gather then gives every
    /// rank every part: the all-reduce's values, over the ring (CPU and simulated devices) and
    /// the shared-memory group, for lengths that do not split evenly and fewer elements than
    /// ranks.
    fn reduce_scatter_then_all_gather<B: Ops>(devs: &[B], comms: Vec<Box<dyn Communicator<B>>>, len: usize) {
        let n = devs.len();
        let input = |r: usize, i: usize| ((r * 31 + i * 7) % 101) as f32;
        let ranks: Vec<_> = comms.into_iter().zip(devs.iter().cloned()).collect();
        let got = on_threads(ranks, |r, (mut c, d)| {
            let mut b = d.upload(&(0..len).map(|i| input(r, i)).collect::<Vec<_>>()).unwrap();
            c.reduce_scatter_sum(&mut b).unwrap();
            let part = d.download(&B::view(&b)).unwrap();
            c.all_gather(&mut b).unwrap();
            let all = d.download(&B::view(&b)).unwrap();
            (part, all)
        });
        let want: Vec<f32> = (0..len).map(|i| (0..n).map(|r| input(r, i)).sum()).collect();
        let parts = chunks(len, n);
        for (r, (part, all)) in got.iter().enumerate() {
            assert_eq!(&part[parts[r].clone()], &want[parts[r].clone()], "n={n} len={len}: rank {r}'s part");
            assert_eq!(all, &want, "n={n} len={len}: rank {r} after the all-gather");
        }
    }

    #[test]
    fn reduce_scatter_and_all_gather_compose_to_the_all_reduce() {
        use crate::backend::sim::{SimDevice, StreamOrder};
        for n in 1usize..=4 {
            for len in [1usize, 3, 7, 1000, SHARED_BLOCK + 5] {
                let cpus: Vec<CpuDevice> = (0..n).map(CpuDevice::new).collect();
                let boxed = |v: Vec<LocalComm<CpuDevice>>| {
                    v.into_iter().map(|c| Box::new(c) as Box<dyn Communicator<CpuDevice>>).collect()
                };
                reduce_scatter_then_all_gather(&cpus, boxed(LocalComm::group(&cpus)), len);
                let shared =
                    SharedComm::group(&cpus).into_iter().map(|c| Box::new(c) as Box<dyn Communicator<CpuDevice>>);
                reduce_scatter_then_all_gather(&cpus, shared.collect(), len);
                if len <= 1000 {
                    let sims = SimDevice::group(n, StreamOrder::Deferred { shuffle: Some(n as u64) });
                    let comms =
                        LocalComm::group(&sims).into_iter().map(|c| Box::new(c) as Box<dyn Communicator<SimDevice>>);
                    reduce_scatter_then_all_gather(&sims, comms.collect(), len);
                }
            }
        }
        // Reduce-scatter alone: the shared-memory group's parts have the ring's bits.
        for n in 2usize..=5 {
            for len in [7usize, 1000, SHARED_BLOCK * 2 + 13] {
                let cpus: Vec<CpuDevice> = (0..n).map(CpuDevice::new).collect();
                let rs = |comms: Vec<Box<dyn Communicator<CpuDevice>>>| {
                    on_threads(comms, |r, mut c| {
                        let mut v = values(r, len);
                        c.reduce_scatter_sum(&mut v).unwrap();
                        v[chunks(len, n)[r].clone()].iter().map(|x| x.to_bits()).collect::<Vec<_>>()
                    })
                };
                let ring = rs(LocalComm::group(&cpus)
                    .into_iter()
                    .map(|c| Box::new(c) as Box<dyn Communicator<CpuDevice>>)
                    .collect());
                let shared = rs(SharedComm::group(&cpus)
                    .into_iter()
                    .map(|c| Box::new(c) as Box<dyn Communicator<CpuDevice>>)
                    .collect());
                assert_eq!(ring, shared, "n={n} len={len}");
            }
        }
        // The shared-memory group refuses parts of different lengths on every rank.
        let cpus: Vec<CpuDevice> = (0..2).map(CpuDevice::new).collect();
        let errs = on_threads(SharedComm::group(&cpus), |r, mut c| {
            let mut v = vec![1.0f32; 4 + r];
            c.reduce_scatter_sum(&mut v).unwrap_err().to_string()
        });
        assert!(errs.iter().all(|e| e.contains("reduce-scatter") && e.contains("same length")), "{errs:?}");
    }
}
