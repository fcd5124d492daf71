//! Stream order in the simulator: a deferred mode in which launches and copies queue per
//! stream and run only when the host waits on them.
//!
//! A GPU runs the work of one stream in order, and the work of different streams in any order
//! that the recorded events allow. Code that forgets an event between two streams, or frees a
//! buffer while another stream's queued kernel still reads it, usually works on a GPU by luck
//! of timing, and always works in a simulator that runs each launch when it is issued. In
//! [`StreamOrder::Deferred`] nothing runs when it is issued: each stream's work waits in its
//! queue until the host waits on it (a download, a `synchronize`, a host wait on an event), and
//! then only what that wait needs runs: the stream's queue up to that point, and on other
//! streams exactly what its event waits name, latest possible (or, with a seed, in a shuffled
//! order among what stream order and events allow).
//!
//! Every operation is also checked when it is issued, against the operations of other streams
//! that it is not ordered after (a happens-before relation over stream order, event waits and
//! host waits, kept as vector clocks): two that touch the same bytes, one of them writing, are a
//! race a GPU may lose, and the launch or copy returns an [`Error::Sim`](crate::Error) naming
//! both. A buffer dropped on the host while an operation of another stream that is not ordered
//! before the free still uses it is reported, with both names, at the group's next call; its
//! memory is kept until the queued work has run, so the simulator itself never touches freed
//! memory. `TESSERA_SIM_TRACE_FREES=1` prints the host's stack where such a buffer was dropped.

use std::collections::VecDeque;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};

use super::SimError;
use crate::error::{Error, Result};

/// How a group of simulated devices runs the work queued on its streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StreamOrder {
    /// Each launch and copy runs when it is issued, in issue order (the default).
    #[default]
    Immediate,
    /// Work queues per stream and runs only when the host waits on it; races between streams
    /// and frees of buffers still in use are reported (see the module docs).
    Deferred {
        /// `None`: among what may run, streams are served in a fixed order. `Some(seed)`: in
        /// an order drawn from this seed.
        shuffle: Option<u64>,
    },
}

impl StreamOrder {
    /// The order named by `TESSERA_SIM_STREAMS` (`immediate`, `deferred` or `deferred:SEED`);
    /// `Immediate` when it is unset.
    pub fn from_env() -> Result<Self> {
        match std::env::var("TESSERA_SIM_STREAMS") {
            Ok(v) if !v.trim().is_empty() => v.parse(),
            _ => Ok(StreamOrder::Immediate),
        }
    }
}

impl FromStr for StreamOrder {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::Invalid(format!(
                "TESSERA_SIM_STREAMS={s}: use immediate, deferred, or deferred:SEED (a whole number) for a shuffled order"
            ))
        };
        match s.trim() {
            "immediate" => Ok(StreamOrder::Immediate),
            "deferred" => Ok(StreamOrder::Deferred { shuffle: None }),
            other => match other.strip_prefix("deferred:") {
                Some(seed) => Ok(StreamOrder::Deferred { shuffle: Some(seed.parse().map_err(|_| bad())?) }),
                None => Err(bad()),
            },
        }
    }
}

impl std::fmt::Display for StreamOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamOrder::Immediate => f.write_str("immediate"),
            StreamOrder::Deferred { shuffle: None } => f.write_str("deferred"),
            StreamOrder::Deferred { shuffle: Some(s) } => write!(f, "deferred:{s}"),
        }
    }
}

/// A byte range an operation reads or writes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Access {
    pub(crate) start: usize,
    pub(crate) end: usize,
    pub(crate) write: bool,
}

impl Access {
    pub(crate) fn read(start: usize, bytes: usize) -> Self {
        Access { start, end: start + bytes, write: false }
    }
    pub(crate) fn write(start: usize, bytes: usize) -> Self {
        Access { start, end: start + bytes, write: true }
    }
    fn overlaps(&self, start: usize, end: usize) -> bool {
        self.start < end && start < self.end
    }
}

/// The work of one queued operation.
pub(crate) type Job = Box<dyn FnOnce() -> std::result::Result<(), SimError> + Send>;

enum Entry {
    Op { label: Arc<str>, job: Job },
    Wait { stream: usize, seq: u64 },
}

struct Stream {
    name: String,
    /// What this stream's next operation is ordered after: per stream, the last operation.
    clock: Vec<u64>,
    issued: u64,
    done: u64,
    queue: VecDeque<Entry>,
}

/// An issued operation, kept for race checks until the host has waited past it.
struct Record {
    stream: usize,
    seq: u64,
    label: Arc<str>,
    access: Vec<Access>,
}

/// A point in a stream's work: what an event records.
#[derive(Debug, Clone)]
pub(crate) struct Point {
    pub(crate) stream: usize,
    seq: u64,
    clock: Vec<u64>,
}

/// Freed memory waiting for the queued work that uses it: that work's (stream, sequence
/// number)s, and the release.
type Zombie = (Vec<(usize, u64)>, Box<dyn FnOnce() + Send>);

struct State {
    streams: Vec<Stream>,
    /// What the host has seen finish.
    host: Vec<u64>,
    history: Vec<Record>,
    /// Memory freed on the host while queued work used it, with that work (stream, sequence
    /// number): released once it has all run.
    zombies: Vec<Zombie>,
    /// Failures found outside a call that could return them (a free), reported at the next one.
    faults: Vec<String>,
    rng: u64,
}

/// The queues of one group of simulated devices in deferred mode.
pub(crate) struct Sched {
    shuffle: Option<u64>,
    state: Mutex<State>,
}

fn at(c: &[u64], i: usize) -> u64 {
    c.get(i).copied().unwrap_or(0)
}

fn join(a: &mut Vec<u64>, b: &[u64]) {
    if a.len() < b.len() {
        a.resize(b.len(), 0);
    }
    for (x, y) in a.iter_mut().zip(b) {
        *x = (*x).max(*y);
    }
}

impl Sched {
    pub(crate) fn new(shuffle: Option<u64>) -> Arc<Self> {
        Arc::new(Sched {
            shuffle,
            state: Mutex::new(State {
                streams: Vec::new(),
                host: Vec::new(),
                history: Vec::new(),
                zombies: Vec::new(),
                faults: Vec::new(),
                rng: shuffle.unwrap_or(0) ^ 0x9E37_79B9_7F4A_7C15,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new stream, named `name` in reports; it starts ordered after what the host has seen.
    pub(crate) fn new_stream(&self, name: String) -> usize {
        let mut s = self.lock();
        let clock = s.host.clone();
        s.streams.push(Stream { name, clock, issued: 0, done: 0, queue: VecDeque::new() });
        s.streams.len() - 1
    }

    pub(crate) fn stream_count(&self) -> usize {
        self.lock().streams.len()
    }

    pub(crate) fn stream_name(&self, id: usize) -> String {
        self.lock().streams[id].name.clone()
    }

    /// Queues `job` on `stream` after checking its accesses against every operation of another
    /// stream it is not ordered after. Returns the point just after it (to wait for it).
    pub(crate) fn enqueue(&self, stream: usize, label: String, access: Vec<Access>, job: Job) -> Result<Point> {
        let mut st = self.lock();
        take_faults(&mut st)?;
        let host = st.host.clone();
        let s = &mut st.streams[stream];
        join(&mut s.clock, &host);
        let seq = s.issued + 1;
        let mut clock = s.clock.clone();
        if clock.len() <= stream {
            clock.resize(stream + 1, 0);
        }
        clock[stream] = seq;
        let label: Arc<str> = format!("{label} on {}", s.name).into();
        // The latest conflicting operation first: the one the code most likely meant to wait for.
        for r in st.history.iter().rev().filter(|r| r.stream != stream && at(&clock, r.stream) < r.seq) {
            for a in &access {
                if let Some(b) = r.access.iter().find(|b| (a.write || b.write) && b.overlaps(a.start, a.end)) {
                    let lo = a.start.max(b.start);
                    let hi = a.end.min(b.end);
                    return Err(Error::Sim {
                        during: "queueing work on a simulated stream".into(),
                        detail: format!(
                            "stream race: {label} {} bytes {:#x}..{:#x} that {} {}, and no event orders the two \
                             (the streams may run them in either order on a GPU). Record an event after the first \
                             (Backend::record_event) and make the second's queue wait on it (Backend::wait_event)",
                            if a.write { "writes" } else { "reads" },
                            lo,
                            hi,
                            r.label,
                            if b.write { "writes" } else { "reads" },
                        ),
                    });
                }
            }
        }
        let point = Point { stream, seq, clock: clock.clone() };
        let s = &mut st.streams[stream];
        s.clock = clock;
        s.issued = seq;
        s.queue.push_back(Entry::Op { label: label.clone(), job });
        if !access.is_empty() {
            st.history.push(Record { stream, seq, label, access });
        }
        Ok(point)
    }

    /// The point `stream` has reached (what an event recorded now stands for).
    pub(crate) fn record(&self, stream: usize) -> Point {
        let mut st = self.lock();
        let host = st.host.clone();
        let s = &mut st.streams[stream];
        join(&mut s.clock, &host);
        Point { stream, seq: s.issued, clock: s.clock.clone() }
    }

    /// Makes `stream`'s later work wait for `p`. The wait is an entry of the stream's queue with
    /// its own sequence number, so that waiting for the stream waits for what it waits on.
    pub(crate) fn wait(&self, stream: usize, p: &Point) {
        let mut st = self.lock();
        let host = st.host.clone();
        let s = &mut st.streams[stream];
        join(&mut s.clock, &host);
        join(&mut s.clock, &p.clock);
        s.issued += 1;
        if s.clock.len() <= stream {
            s.clock.resize(stream + 1, 0);
        }
        s.clock[stream] = s.issued;
        s.queue.push_back(Entry::Wait { stream: p.stream, seq: p.seq });
    }

    /// The host waits until `stream` has run everything queued on it.
    pub(crate) fn sync_stream(&self, stream: usize) -> Result<()> {
        let p = self.record(stream);
        self.sync_point(&p)
    }

    /// The host waits for the point `p` (an event).
    pub(crate) fn sync_point(&self, p: &Point) -> Result<()> {
        let mut st = self.lock();
        // On a failure the host has not seen the point: nothing is pruned or released.
        self.run_until(&mut st, p.stream, p.seq)?;
        join(&mut st.host, &p.clock);
        let host = st.host.clone();
        st.history.retain(|r| at(&host, r.stream) < r.seq);
        let zombies = std::mem::take(&mut st.zombies);
        for (users, free) in zombies {
            if users.iter().all(|&(s, seq)| st.streams[s].done >= seq) {
                free();
            } else {
                st.zombies.push((users, free));
            }
        }
        take_faults(&mut st)
    }

    /// Runs what `stream` needs to reach `upto`, and nothing else.
    fn run_until(&self, st: &mut State, stream: usize, upto: u64) -> Result<()> {
        let mut need = vec![0u64; st.streams.len()];
        need[stream] = upto;
        loop {
            let mut ready = Vec::new();
            let mut changed = true;
            while changed {
                changed = false;
                ready.clear();
                for i in 0..st.streams.len() {
                    if st.streams[i].done >= need[i] && !matches!(st.streams[i].queue.front(), Some(Entry::Wait { .. }))
                    {
                        continue;
                    }
                    match st.streams[i].queue.front() {
                        Some(Entry::Wait { stream: t, seq }) => {
                            let (t, seq) = (*t, *seq);
                            if st.streams[t].done >= seq {
                                st.streams[i].queue.pop_front();
                                st.streams[i].done += 1;
                                changed = true;
                            } else if st.streams[i].done < need[i] && need[t] < seq {
                                need[t] = seq;
                                changed = true;
                            }
                        }
                        Some(Entry::Op { .. }) => ready.push(i),
                        None => {}
                    }
                }
            }
            if st.streams[stream].done >= upto {
                return Ok(());
            }
            if ready.is_empty() {
                return Err(Error::Sim {
                    during: "waiting on a simulated stream".into(),
                    detail: format!(
                        "{} cannot reach operation {upto}: its queue waits on events that nothing queued will reach",
                        st.streams[stream].name
                    ),
                });
            }
            let pick = match self.shuffle {
                None => ready[0],
                Some(_) => {
                    // xorshift64*: a fixed sequence per seed.
                    st.rng ^= st.rng >> 12;
                    st.rng ^= st.rng << 25;
                    st.rng ^= st.rng >> 27;
                    ready[(st.rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % ready.len()]
                }
            };
            let Some(Entry::Op { label, job }) = st.streams[pick].queue.pop_front() else { unreachable!() };
            st.streams[pick].done += 1;
            if let Err(e) = job() {
                return Err(Error::Sim { during: format!("running {label} (queued earlier)"), detail: e.0 });
            }
        }
    }

    /// A buffer of `home`'s stream, at `start..end`, is freed by the host: `free` releases it,
    /// now or (when queued work still uses it) once the queues are empty. A use by another
    /// stream that is not ordered before the free is a fault, reported at the next call.
    pub(crate) fn free(&self, home: usize, start: usize, end: usize, free: Box<dyn FnOnce() + Send>) {
        let mut st = self.lock();
        let mut point = st.streams[home].clock.clone();
        join(&mut point, &st.host.clone());
        let mut users = Vec::new();
        let mut faults = Vec::new();
        for r in &st.history {
            if !r.access.iter().any(|a| a.overlaps(start, end)) {
                continue;
            }
            if r.seq > st.streams[r.stream].done {
                users.push((r.stream, r.seq));
            }
            if r.stream != home && at(&point, r.stream) < r.seq {
                faults.push(format!(
                    "use after free: a buffer of {} bytes at {start:#x} was freed on {} while {} still uses it, \
                     with no event ordering the free after it. Keep the buffer until that work is done, or make \
                     {} wait on an event recorded after it before dropping the buffer",
                    end - start,
                    st.streams[home].name,
                    r.label,
                    st.streams[home].name,
                ));
            }
        }
        if !faults.is_empty() && std::env::var_os("TESSERA_SIM_TRACE_FREES").is_some() {
            eprintln!("tessera: the early free was here:\n{}", std::backtrace::Backtrace::force_capture());
        }
        st.faults.extend(faults);
        for r in &mut st.history {
            r.access.retain(|a| !a.overlaps(start, end));
        }
        st.history.retain(|r| !r.access.is_empty());
        if !users.is_empty() {
            st.zombies.push((users, free));
        } else {
            drop(st);
            free();
        }
    }

    /// Failures found outside a call (frees), taken for reporting.
    pub(crate) fn check(&self) -> Result<()> {
        take_faults(&mut self.lock())
    }
}

fn take_faults(st: &mut State) -> Result<()> {
    if st.faults.is_empty() {
        return Ok(());
    }
    let all = std::mem::take(&mut st.faults);
    Err(Error::Sim { during: "freeing a simulated buffer".into(), detail: all.join("; ") })
}

impl Drop for Sched {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        // Queued work that nobody waited for never runs (as when a process exits); its memory
        // is released here.
        for s in &mut st.streams {
            s.queue.clear();
        }
        std::mem::take(&mut st.zombies).into_iter().for_each(|(_, free)| free());
    }
}
