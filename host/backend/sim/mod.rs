//! The CUDA simulator as a device: the very kernels of `kernels/*.cu`, compiled for the host
//! by the build script, run on the CPU with CUDA's semantics (`--device sim`).
//!
//! A block's threads run concurrently as fibers, so `__syncthreads` and the warp shuffles
//! behave as on a GPU; blocks run one after another and launches never overlap. Every memory
//! access of the kernel code is checked before it happens (the kernels are compiled with the
//! compiler's thread-sanitizer instrumentation, whose callbacks the simulator's runtime
//! defines): a global access outside the buffers passed to the launch, a write to a `const`
//! parameter, a shared-memory data race between barriers, a `__syncthreads` that not every
//! thread reaches, a shuffle whose mask names an exited lane, and a deadlock are each reported
//! as an `Error::Sim` ([`crate::Error`]) naming the kernel, the block, the thread and the
//! index. The runtime is `kernels/sim/runtime.cc`; the shim header `kernels/sim/cuda_sim.h`.
//!
//! Host code drives it exactly as it drives a GPU: [`SimDevice::kernels`] holds handles with
//! the same names and arguments as [`CudaDevice::kernels`](crate::CudaDevice::kernels), over
//! [`SimView`]s instead of `CudaView`s. The op families run on it through the same code as on
//! CUDA (one macro instantiates both). It is slow (thousands of times slower than a GPU) and
//! meant for checking kernels, not for training at scale.

use std::alloc::Layout;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CStr};
use std::marker::PhantomData;
use std::ops::Range;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use cudarc::driver::LaunchConfig;

use crate::backend::{check_len, Backend, Elem, ViewLen};
use crate::error::{Error, Result};

mod streams;
pub use streams::StreamOrder;
use streams::{Access, Point, Sched};

/// The number of streaming multiprocessors the simulator reports to launch-shape heuristics.
/// Small on purpose: a few blocks per grid keep simulation fast, and the GEMM still takes
/// its large-tile path for shapes of four tiles or more.
pub const SIM_SMS: usize = 4;

/// Alignment of simulated allocations, as `cudaMalloc` gives (so vectorised paths are taken
/// exactly where a GPU takes them).
const ALIGN: usize = 256;

/// A kernel failure found by the simulator (or a launch it refused), as text that names the
/// kernel, the block, the thread and what went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimError(pub String);

impl crate::error::DeviceFailure for SimError {
    fn into_error(self, during: String) -> Error {
        Error::Sim { during, detail: self.0 }
    }
}

impl SimError {
    /// A kernel that the simulator cannot run.
    pub fn unsupported(kernel: &str, why: &str) -> Self {
        SimError(format!("kernel {kernel} cannot run in the simulator: it uses {why}"))
    }
}

impl std::fmt::Display for SimError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SimError {}

/// One kernel's standing in the simulator.
#[derive(Debug, Clone, Copy)]
pub struct SimStatus {
    /// Symbol name.
    pub name: &'static str,
    /// Source file under `kernels/`.
    pub file: &'static str,
    /// Why the simulator cannot run it (inline PTX, tensor cores), or `None`.
    pub unsupported: Option<&'static str>,
    /// A kernel with a planted bug or a shim probe (`kernels/sim/planted.cu`), for the
    /// simulator's own tests.
    pub planted: bool,
}

/// The simulator's stand-in for a CUDA stream: work runs at once, in call order
/// ([`StreamOrder::Immediate`]), or queues until the host waits on it
/// ([`StreamOrder::Deferred`]).
#[derive(Clone, Default)]
pub struct SimStream {
    q: Option<Queue>,
}

/// A stream of a deferred group: its scheduler and its number there.
#[derive(Clone)]
struct Queue {
    sched: Arc<Sched>,
    id: usize,
}

impl std::fmt::Debug for SimStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.q {
            None => f.write_str("SimStream(immediate)"),
            Some(q) => write!(f, "SimStream({})", q.sched.stream_name(q.id)),
        }
    }
}

impl PartialEq for SimStream {
    fn eq(&self, o: &Self) -> bool {
        match (&self.q, &o.q) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(&a.sched, &b.sched) && a.id == b.id,
            _ => false,
        }
    }
}
impl Eq for SimStream {}

/// Sends raw pointers into a queued job (the simulator's equivalent of handing them to a GPU).
struct Raw<T>(T);
// SAFETY: the pointers a job holds stay valid until it runs: the buffers they point into are
// kept alive (as zombies) while queued work uses them; see `streams::Sched::free`.
unsafe impl<T> Send for Raw<T> {}

fn sim_err(e: Error) -> SimError {
    match e {
        Error::Sim { detail, .. } => SimError(detail),
        other => SimError(other.to_string()),
    }
}

impl SimStream {
    /// A new buffer holding `data` (as `CudaStream::clone_htod`).
    pub fn clone_htod<T: Elem>(&self, data: &[T]) -> std::result::Result<SimBuf<T>, SimError> {
        bump(&counters::ALLOCS);
        bump(&counters::H2D);
        let mut b = SimBuf::zeroed(data.len());
        b.as_mut_slice().copy_from_slice(data);
        self.adopt_new(b, "upload").map_err(sim_err)
    }

    /// Gives a new buffer this stream as its home: in deferred mode its filling is an operation
    /// of this stream (as `cuMemAllocAsync` and the copy or memset after it are).
    fn adopt_new<T: Elem>(&self, mut b: SimBuf<T>, what: &str) -> Result<SimBuf<T>> {
        if let Some(q) = &self.q {
            let bytes = b.len * std::mem::size_of::<T>();
            let access = if bytes == 0 { vec![] } else { vec![Access::write(b.ptr.as_ptr() as usize, bytes)] };
            q.sched.enqueue(q.id, format!("{what} of {bytes} bytes"), access, Box::new(|| Ok(())))?;
            b.home = Some(q.clone());
        }
        Ok(b)
    }

    /// Queues `job` (deferred mode) or runs it now; returns where it sits, to wait for it.
    fn submit(&self, label: impl FnOnce() -> String, access: Vec<Access>, job: streams::Job) -> Result<Option<Point>> {
        match &self.q {
            None => job().map_err(|e| Error::Sim { during: label(), detail: e.0 }).map(|_| None),
            Some(q) => q.sched.enqueue(q.id, label(), access, job).map(Some),
        }
    }

    /// The host waits for everything queued on this stream.
    fn sync(&self) -> Result<()> {
        match &self.q {
            None => Ok(()),
            Some(q) => q.sched.sync_stream(q.id),
        }
    }
}

/// An event of a simulated stream: the point its queue had reached when it was recorded.
#[derive(Debug, Clone)]
pub struct SimEvent {
    at: Option<(usize, Point)>,
}

// ---- FFI with kernels/sim/runtime.cc ----------------------------------------------------------

/// Launch shape, as the runtime reads it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct SimLaunch {
    grid: [u32; 3],
    block: [u32; 3],
    dyn_smem: u64,
}

/// One kernel argument, as the runtime reads it (`tsim_arg` in `kernels/sim/cuda_sim.h`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct SimArg {
    kind: i32,
    f: f32,
    i: i64,
    p: *mut c_void,
    len: u64,
    elem: u64,
    name: *const c_char,
}

const ARG_INT: i32 = 0;
const ARG_FLOAT: i32 = 1;
const ARG_CONST_PTR: i32 = 2;
const ARG_MUT_PTR: i32 = 3;
const ARG_TABLE: i32 = 4;

impl SimArg {
    fn blank(kind: i32, name: &'static CStr) -> Self {
        SimArg { kind, f: 0.0, i: 0, p: std::ptr::null_mut(), len: 0, elem: 0, name: name.as_ptr() }
    }
    /// An `int` or `long long` argument.
    pub fn int(name: &'static CStr, v: i64) -> Self {
        SimArg { i: v, ..Self::blank(ARG_INT, name) }
    }
    /// A `float` argument.
    pub fn float(name: &'static CStr, v: f32) -> Self {
        SimArg { f: v, ..Self::blank(ARG_FLOAT, name) }
    }
    /// A `const T*` argument: readable over the view's elements.
    pub fn input<T: Elem>(name: &'static CStr, v: &SimView<'_, T>) -> Self {
        SimArg {
            p: v.ptr as *mut c_void,
            len: v.len as u64,
            elem: std::mem::size_of::<T>() as u64,
            ..Self::blank(ARG_CONST_PTR, name)
        }
    }
    /// An optional `const T*` argument (`nullptr` when `None`).
    pub fn opt_input<T: Elem>(name: &'static CStr, v: Option<&SimView<'_, T>>) -> Self {
        match v {
            Some(v) => Self::input(name, v),
            None => Self::blank(ARG_CONST_PTR, name),
        }
    }
    /// A `T*` argument: readable and writable over the view's elements.
    pub fn output<T: Elem>(name: &'static CStr, v: &mut SimViewMut<'_, T>) -> Self {
        SimArg {
            p: v.ptr as *mut c_void,
            len: v.len as u64,
            elem: std::mem::size_of::<T>() as u64,
            ..Self::blank(ARG_MUT_PTR, name)
        }
    }
    /// An optional `T*` argument.
    pub fn opt_output<T: Elem>(name: &'static CStr, v: Option<&mut SimViewMut<'_, T>>) -> Self {
        match v {
            Some(v) => Self::output(name, v),
            None => Self::blank(ARG_MUT_PTR, name),
        }
    }
    /// A `const float* const*` table of device pointers: the table is readable, and each entry
    /// may be read up to the end of the allocation it points into.
    pub fn table(name: &'static CStr, v: &SimView<'_, u64>) -> Self {
        SimArg { p: v.ptr as *mut c_void, len: v.len as u64, elem: 8, ..Self::blank(ARG_TABLE, name) }
    }
}

unsafe extern "C" {
    fn tsim_register_alloc(p: *const c_void, bytes: usize);
    fn tsim_unregister_alloc(p: *const c_void);
}

static LAUNCHES: Mutex<BTreeMap<&'static str, u64>> = Mutex::new(BTreeMap::new());

/// Live simulated allocations, start address to bytes (to resolve pointer tables' entries).
static ALLOCS: Mutex<BTreeMap<usize, usize>> = Mutex::new(BTreeMap::new());

/// What the host asked of the simulated devices, counted through the same code path a GPU run
/// takes: the host work of a step, which timings on a shared CPU cannot show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SimCounts {
    /// Kernel launches.
    pub launches: u64,
    /// Waits of the host for a device: `synchronize`, and every download (which blocks).
    pub host_syncs: u64,
    /// Device allocations.
    pub allocations: u64,
    /// Copies from the host to a device.
    pub host_to_device: u64,
    /// Copies from a device to the host.
    pub device_to_host: u64,
    /// Copies between device buffers.
    pub device_to_device: u64,
}

impl std::ops::Sub for SimCounts {
    type Output = SimCounts;
    fn sub(self, o: SimCounts) -> SimCounts {
        SimCounts {
            launches: self.launches - o.launches,
            host_syncs: self.host_syncs - o.host_syncs,
            allocations: self.allocations - o.allocations,
            host_to_device: self.host_to_device - o.host_to_device,
            device_to_host: self.device_to_host - o.device_to_host,
            device_to_device: self.device_to_device - o.device_to_device,
        }
    }
}

mod counters {
    use std::sync::atomic::AtomicU64;
    pub(super) static LAUNCHES: AtomicU64 = AtomicU64::new(0);
    pub(super) static SYNCS: AtomicU64 = AtomicU64::new(0);
    pub(super) static ALLOCS: AtomicU64 = AtomicU64::new(0);
    pub(super) static H2D: AtomicU64 = AtomicU64::new(0);
    pub(super) static D2H: AtomicU64 = AtomicU64::new(0);
    pub(super) static D2D: AtomicU64 = AtomicU64::new(0);
}

fn bump(c: &std::sync::atomic::AtomicU64) {
    c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// The counts so far in this process (all simulated devices together); subtract two readings
/// for what happened between them.
pub fn counts() -> SimCounts {
    use std::sync::atomic::Ordering::Relaxed;
    SimCounts {
        launches: counters::LAUNCHES.load(Relaxed),
        host_syncs: counters::SYNCS.load(Relaxed),
        allocations: counters::ALLOCS.load(Relaxed),
        host_to_device: counters::H2D.load(Relaxed),
        device_to_host: counters::D2H.load(Relaxed),
        device_to_device: counters::D2D.load(Relaxed),
    }
}

/// How many times each kernel has been launched in the simulator by this process (for
/// coverage checks: a test can assert that every kernel ran).
pub fn launch_counts() -> BTreeMap<&'static str, u64> {
    LAUNCHES.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

type Thunk = unsafe extern "C" fn(*const SimLaunch, *const SimArg, *mut c_char, usize) -> i32;

/// The byte ranges a launch reads and writes: each pointer argument over its view (`const`
/// ones read, others written), and for a pointer table the table and, from each entry, the rest
/// of the allocation it points into.
fn accesses(args: &[SimArg]) -> Vec<Access> {
    let mut out = Vec::new();
    for a in args {
        let bytes = (a.len * a.elem) as usize;
        if a.p.is_null() || bytes == 0 {
            continue;
        }
        match a.kind {
            ARG_CONST_PTR => out.push(Access::read(a.p as usize, bytes)),
            ARG_MUT_PTR => out.push(Access::write(a.p as usize, bytes)),
            ARG_TABLE => {
                out.push(Access::read(a.p as usize, bytes));
                // SAFETY: a table argument is a live simulated buffer of `len` u64 entries.
                let entries = unsafe { std::slice::from_raw_parts(a.p as *const u64, a.len as usize) };
                let map = ALLOCS.lock().unwrap_or_else(|e| e.into_inner());
                for &e in entries {
                    let e = e as usize;
                    if let Some((&start, &len)) = map.range(..=e).next_back() {
                        if e < start + len {
                            out.push(Access::read(e, start + len - e));
                        }
                    }
                }
            }
            _ => {}
        }
    }
    out
}

fn run_thunk(thunk: Thunk, l: &SimLaunch, args: &[SimArg]) -> std::result::Result<(), SimError> {
    let mut err = vec![0u8; 2048];
    // SAFETY: the thunk reads `l` and `args` (valid for the call) and writes at most
    // `err.len()` bytes, NUL-terminated, into `err`.
    let rc = unsafe { thunk(l, args.as_ptr(), err.as_mut_ptr() as *mut c_char, err.len()) };
    if rc == 0 {
        Ok(())
    } else {
        let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
        Err(SimError(String::from_utf8_lossy(&err[..end]).into_owned()))
    }
}

/// Runs one launch through its generated thunk, now or (deferred) when its stream is waited on.
///
/// # Safety
/// `args` are the kernel's parameters in order, each pointer valid for its stated length (in
/// deferred mode, until the launch runs: the buffers outlive their queued uses).
unsafe fn launch(
    name: &'static str,
    thunk: Thunk,
    stream: &SimStream,
    cfg: &LaunchConfig,
    args: &[SimArg],
) -> std::result::Result<(), SimError> {
    *LAUNCHES.lock().unwrap_or_else(|e| e.into_inner()).entry(name).or_default() += 1;
    bump(&counters::LAUNCHES);
    let l = SimLaunch {
        grid: [cfg.grid_dim.0, cfg.grid_dim.1, cfg.grid_dim.2],
        block: [cfg.block_dim.0, cfg.block_dim.1, cfg.block_dim.2],
        dyn_smem: cfg.shared_mem_bytes as u64,
    };
    match &stream.q {
        None => run_thunk(thunk, &l, args),
        Some(q) => {
            let access = accesses(args);
            let held = Raw(args.to_vec());
            let job = Box::new(move || {
                let held = held;
                run_thunk(thunk, &l, &held.0)
            });
            q.sched.enqueue(q.id, format!("kernel {name}"), access, job).map(|_| ()).map_err(sim_err)
        }
    }
}

include!(concat!(env!("OUT_DIR"), "/sim_kernels.rs"));

// ---- memory -----------------------------------------------------------------------------------

/// A buffer of simulated device memory: host memory aligned as `cudaMalloc` aligns, known to
/// the simulator's checker while it lives.
pub struct SimBuf<T: Elem> {
    ptr: NonNull<T>,
    len: usize,
    /// The stream it was allocated on, in deferred mode (its free is that stream's operation).
    home: Option<Queue>,
    /// The device whose memory it counts in ([`memory_in_use`]), once a device allocated it.
    owner: Option<usize>,
}

/// Bytes in use and the peak since [`reset_peak_memory`], per simulated device index.
static MEMORY: Mutex<BTreeMap<usize, (u64, u64)>> = Mutex::new(BTreeMap::new());

/// Bytes of simulated memory that device `sim:index` holds now: the buffers it allocated (or
/// that were uploaded or copied into new buffers on it) and that are still alive. What a GPU
/// would hold, so that a plan's memory per device can be measured without one.
pub fn memory_in_use(index: usize) -> u64 {
    MEMORY.lock().unwrap_or_else(|e| e.into_inner()).get(&index).map_or(0, |m| m.0)
}

/// The most bytes device `sim:index` held at once since the last [`reset_peak_memory`].
pub fn peak_memory(index: usize) -> u64 {
    MEMORY.lock().unwrap_or_else(|e| e.into_inner()).get(&index).map_or(0, |m| m.1)
}

/// Starts the peaks of [`peak_memory`] again from the bytes in use now.
pub fn reset_peak_memory() {
    for m in MEMORY.lock().unwrap_or_else(|e| e.into_inner()).values_mut() {
        m.1 = m.0;
    }
}

// SAFETY: SimBuf owns its allocation like a Vec<T> (T: Send + Sync).
unsafe impl<T: Elem> Send for SimBuf<T> {}
// SAFETY: as above; shared access is read-only.
unsafe impl<T: Elem> Sync for SimBuf<T> {}

impl<T: Elem> SimBuf<T> {
    fn layout(len: usize) -> Layout {
        let bytes = (len * std::mem::size_of::<T>()).max(1).next_multiple_of(ALIGN);
        Layout::from_size_align(bytes, ALIGN).expect("simulated allocation too large")
    }

    fn zeroed(len: usize) -> Self {
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(p as *mut T) else { std::alloc::handle_alloc_error(layout) };
        let bytes = len * std::mem::size_of::<T>();
        // SAFETY: registers the live allocation with the runtime (removed when it is freed).
        unsafe { tsim_register_alloc(p as *const c_void, bytes) };
        ALLOCS.lock().unwrap_or_else(|e| e.into_inner()).insert(p as usize, bytes);
        SimBuf { ptr, len, home: None, owner: None }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: as above, and &mut self is unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
    /// A view of the whole buffer.
    pub fn as_view(&self) -> SimView<'_, T> {
        SimView { ptr: self.ptr.as_ptr(), len: self.len, _p: PhantomData }
    }
    /// A writable view of the whole buffer.
    pub fn as_view_mut(&mut self) -> SimViewMut<'_, T> {
        SimViewMut { ptr: self.ptr.as_ptr(), len: self.len, _p: PhantomData }
    }
    /// A view of part of the buffer.
    pub fn slice(&self, range: Range<usize>) -> SimView<'_, T> {
        self.as_view().slice(range)
    }
}

impl<T: Elem> SimBuf<T> {
    /// Counts the buffer in device `index`'s memory.
    fn owned_by(mut self, index: usize) -> Self {
        let bytes = (self.len * std::mem::size_of::<T>()) as u64;
        let mut m = MEMORY.lock().unwrap_or_else(|e| e.into_inner());
        let e = m.entry(index).or_default();
        e.0 += bytes;
        e.1 = e.1.max(e.0);
        self.owner = Some(index);
        self
    }
}

impl<T: Elem> Drop for SimBuf<T> {
    fn drop(&mut self) {
        if let Some(i) = self.owner {
            let bytes = (self.len * std::mem::size_of::<T>()) as u64;
            if let Some(e) = MEMORY.lock().unwrap_or_else(|e| e.into_inner()).get_mut(&i) {
                e.0 = e.0.saturating_sub(bytes);
            }
        }
        let addr = self.ptr.as_ptr() as usize;
        let layout = Self::layout(self.len);
        let free = move || {
            ALLOCS.lock().unwrap_or_else(|e| e.into_inner()).remove(&addr);
            // SAFETY: allocated in `zeroed` with this layout; unregistered before it is freed, once.
            unsafe {
                tsim_unregister_alloc(addr as *const c_void);
                std::alloc::dealloc(addr as *mut u8, layout);
            }
        };
        match self.home.take() {
            Some(q) => q.sched.free(q.id, addr, addr + self.len * std::mem::size_of::<T>(), Box::new(free)),
            None => free(),
        }
    }
}

impl<T: Elem> std::fmt::Debug for SimBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SimBuf({} x {})", self.len, std::any::type_name::<T>())
    }
}

/// A read-only view of (part of) a simulated buffer.
#[derive(Debug, Clone, Copy)]
pub struct SimView<'a, T> {
    ptr: *const T,
    len: usize,
    _p: PhantomData<&'a [T]>,
}

/// A writable view of (part of) a simulated buffer.
#[derive(Debug)]
pub struct SimViewMut<'a, T> {
    ptr: *mut T,
    len: usize,
    _p: PhantomData<&'a mut [T]>,
}

// SAFETY: the views behave as &[T] and &mut [T].
unsafe impl<T: Sync> Send for SimView<'_, T> {}
// SAFETY: as &[T].
unsafe impl<T: Sync> Sync for SimView<'_, T> {}
// SAFETY: as &mut [T].
unsafe impl<T: Send> Send for SimViewMut<'_, T> {}
// SAFETY: as &mut [T].
unsafe impl<T: Sync> Sync for SimViewMut<'_, T> {}

fn check_range(range: &Range<usize>, len: usize) {
    assert!(range.start <= range.end && range.end <= len, "range {range:?} out of bounds of a view of {len} elements");
}

impl<'a, T> SimView<'a, T> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// A sub-range (panics if out of bounds, like slice indexing).
    pub fn slice(&self, range: Range<usize>) -> SimView<'a, T> {
        check_range(&range, self.len);
        // SAFETY: in bounds (checked).
        SimView { ptr: unsafe { self.ptr.add(range.start) }, len: range.end - range.start, _p: PhantomData }
    }
    /// The device address, as `cudarc`'s `device_ptr` gives (with nothing to guard).
    pub fn device_ptr(&self, _stream: &SimStream) -> (u64, ()) {
        (self.ptr as u64, ())
    }
    fn as_slice(&self) -> &'a [T] {
        // SAFETY: the view covers len initialised elements of a live buffer borrowed for 'a.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl<T> SimViewMut<'_, T> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// A read-only view of the same elements.
    pub fn as_view(&self) -> SimView<'_, T> {
        SimView { ptr: self.ptr, len: self.len, _p: PhantomData }
    }
    /// A writable sub-range.
    pub fn slice_mut(&mut self, range: Range<usize>) -> SimViewMut<'_, T> {
        check_range(&range, self.len);
        // SAFETY: in bounds (checked); borrows self mutably.
        SimViewMut { ptr: unsafe { self.ptr.add(range.start) }, len: range.end - range.start, _p: PhantomData }
    }
}

impl<T> ViewLen for SimView<'_, T> {
    fn view_len(&self) -> usize {
        self.len
    }
}
impl<T> ViewLen for SimViewMut<'_, T> {
    fn view_len(&self) -> usize {
        self.len
    }
}

// ---- the device -------------------------------------------------------------------------------

/// A simulated GPU (`sim`, or `sim:N` for N logical devices). See the module docs.
#[derive(Debug, Clone, Default)]
pub struct SimDevice {
    index: usize,
    stream: SimStream,
    /// The split-K GEMM's workspace, kept between calls (work of this stream only).
    gemm_ws: Arc<Mutex<Option<SimBuf<f32>>>>,
}

impl PartialEq for SimDevice {
    fn eq(&self, o: &Self) -> bool {
        self.index == o.index && self.stream == o.stream
    }
}
impl Eq for SimDevice {}

static KERNELS: SimAllKernels = SimAllKernels {
    activation: SimActivationKernels,
    convert: SimConvertKernels,
    gemm: SimGemmKernels,
    loss: SimLossKernels,
    optim: SimOptimKernels,
    reduce: SimReduceKernels,
    transformer: SimTransformerKernels,
};

fn bytes_of<T>(len: usize) -> usize {
    len * std::mem::size_of::<T>()
}

/// Copies `bytes` from `src` to `dst` when a job runs.
fn copy_job(src: usize, dst: usize, bytes: usize) -> streams::Job {
    Box::new(move || {
        // SAFETY: both ranges lie in live simulated buffers (kept alive while queued work uses
        // them) and do not overlap (a view and a distinct writable view).
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst as *mut u8, bytes) };
        Ok(())
    })
}

impl SimDevice {
    /// Simulated device number `index`, running work as it is issued
    /// ([`StreamOrder::Immediate`]).
    pub fn new(index: usize) -> Self {
        SimDevice { index, stream: SimStream::default(), gemm_ws: Arc::default() }
    }
    /// `count` simulated devices `sim:0..count` that run their work in `order`. In deferred
    /// mode they share one scheduler, so that events, copies and races between them are seen.
    pub fn group(count: usize, order: StreamOrder) -> Vec<Self> {
        match order {
            StreamOrder::Immediate => (0..count).map(Self::new).collect(),
            StreamOrder::Deferred { shuffle } => {
                let sched = Sched::new(shuffle);
                (0..count)
                    .map(|index| {
                        let id = sched.new_stream(format!("sim:{index}"));
                        SimDevice {
                            index,
                            stream: SimStream { q: Some(Queue { sched: sched.clone(), id }) },
                            gemm_ws: Arc::default(),
                        }
                    })
                    .collect()
            }
        }
    }
    /// Its index among the simulated devices.
    pub fn index(&self) -> usize {
        self.index
    }
    /// Whether its work queues until waited on ([`StreamOrder::Deferred`]).
    pub fn is_deferred(&self) -> bool {
        self.stream.q.is_some()
    }
    /// The kernels, with the same launch methods as [`crate::CudaDevice::kernels`].
    pub fn kernels(&self) -> &'static SimAllKernels {
        &KERNELS
    }
    /// The kernels of `kernels/sim/planted.cu` (planted bugs and shim probes).
    pub fn planted(&self) -> SimPlantedKernels {
        SimPlantedKernels
    }
    /// This device's stream.
    pub fn stream(&self) -> &SimStream {
        &self.stream
    }
    /// The streaming-multiprocessor count reported to launch heuristics ([`SIM_SMS`]).
    pub fn sms(&self) -> usize {
        SIM_SMS
    }
    /// The split-K GEMM's workspace of this stream.
    pub(crate) fn gemm_workspace(&self) -> &Mutex<Option<SimBuf<f32>>> {
        &self.gemm_ws
    }
    /// Failures found since the last call that could report them (a buffer freed while another
    /// stream's queued work used it), as an error.
    pub fn check(&self) -> Result<()> {
        match &self.stream.q {
            Some(q) => q.sched.check(),
            None => Ok(()),
        }
    }
    fn sched_of(&self, e: &SimEvent) -> Result<Option<(Arc<Sched>, usize, Point)>> {
        match (&self.stream.q, &e.at) {
            (None, None) => Ok(None),
            (Some(q), Some((group, p))) if *group == Arc::as_ptr(&q.sched) as usize => {
                Ok(Some((q.sched.clone(), q.id, p.clone())))
            }
            _ => Err(Error::Invalid(format!(
                "an event of another group of simulated devices was given to {}: events order work within one group \
                 (SimDevice::group)",
                self.name()
            ))),
        }
    }
}

impl Backend for SimDevice {
    type Buf<T: Elem> = SimBuf<T>;
    type Ref<'a, T: Elem> = SimView<'a, T>;
    type Mut<'a, T: Elem> = SimViewMut<'a, T>;
    type Event = SimEvent;

    fn total_memory(&self) -> u64 {
        crate::backend::host_memory()
    }
    fn name(&self) -> String {
        format!("sim:{}", self.index)
    }
    fn alloc<T: Elem>(&self, len: usize) -> Result<SimBuf<T>> {
        bump(&counters::ALLOCS);
        self.stream.adopt_new(SimBuf::zeroed(len).owned_by(self.index), "allocation")
    }
    fn upload<T: Elem>(&self, data: &[T]) -> Result<SimBuf<T>> {
        Ok(self.stream.clone_htod(data).map_err(Error::driver("uploading"))?.owned_by(self.index))
    }
    fn write<T: Elem>(&self, dst: &mut SimViewMut<'_, T>, data: &[T]) -> Result<()> {
        check_len("write", "destination", dst.len(), data.len())?;
        bump(&counters::H2D);
        let bytes = bytes_of::<T>(data.len());
        let held: Vec<u8> = bytemuck::cast_slice(data).to_vec();
        let dst_addr = dst.ptr as usize;
        let job: streams::Job = Box::new(move || {
            // SAFETY: dst is a live simulated buffer of `bytes` bytes (kept alive while queued).
            unsafe { std::ptr::copy_nonoverlapping(held.as_ptr(), dst_addr as *mut u8, bytes) };
            Ok(())
        });
        let access = if bytes == 0 { vec![] } else { vec![Access::write(dst_addr, bytes)] };
        self.stream.submit(|| format!("upload of {bytes} bytes to {}", self.name()), access, job)?;
        Ok(())
    }
    fn download<T: Elem>(&self, src: &SimView<'_, T>) -> Result<Vec<T>> {
        bump(&counters::D2H);
        bump(&counters::SYNCS);
        let Some(q) = &self.stream.q else { return Ok(src.as_slice().to_vec()) };
        let bytes = bytes_of::<T>(src.len());
        let out = Arc::new(Mutex::new(vec![T::zeroed(); src.len()]));
        let (src_addr, sink) = (src.ptr as usize, out.clone());
        let job: streams::Job = Box::new(move || {
            let mut v = sink.lock().unwrap_or_else(|e| e.into_inner());
            let dst: &mut [u8] = bytemuck::cast_slice_mut(&mut v[..]);
            // SAFETY: src is a live simulated buffer of `bytes` bytes (kept alive while queued).
            unsafe { std::ptr::copy_nonoverlapping(src_addr as *const u8, dst.as_mut_ptr(), bytes) };
            Ok(())
        });
        let access = if bytes == 0 { vec![] } else { vec![Access::read(src_addr, bytes)] };
        let at = q.sched.enqueue(q.id, format!("download of {bytes} bytes"), access, job)?;
        q.sched.sync_point(&at)?;
        let v = std::mem::take(&mut *out.lock().unwrap_or_else(|e| e.into_inner()));
        Ok(v)
    }
    fn copy<T: Elem>(&self, src: &SimView<'_, T>, dst: &mut SimViewMut<'_, T>) -> Result<()> {
        check_len("copy", "destination", dst.len(), src.len())?;
        bump(&counters::D2D);
        let bytes = bytes_of::<T>(src.len());
        let (s, d) = (src.ptr as usize, dst.ptr as usize);
        let access = if bytes == 0 { vec![] } else { vec![Access::read(s, bytes), Access::write(d, bytes)] };
        self.stream.submit(|| format!("copy of {bytes} bytes to {}", self.name()), access, copy_job(s, d, bytes))?;
        Ok(())
    }
    fn with_own_queue(&self) -> Result<Self> {
        let stream = match &self.stream.q {
            None => SimStream::default(),
            Some(q) => {
                let id = q.sched.new_stream(format!("sim:{} (stream {})", self.index, q.sched.stream_count()));
                SimStream { q: Some(Queue { sched: q.sched.clone(), id }) }
            }
        };
        Ok(SimDevice { index: self.index, stream, gemm_ws: Arc::default() })
    }
    fn duplicate<T: Elem>(&self, src: &SimView<'_, T>) -> Result<SimBuf<T>> {
        bump(&counters::ALLOCS);
        bump(&counters::D2D);
        let mut b = SimBuf::zeroed(src.len()).owned_by(self.index);
        b.home = self.stream.q.clone();
        let bytes = bytes_of::<T>(src.len());
        let (s, d) = (src.ptr as usize, b.ptr.as_ptr() as usize);
        let access = if bytes == 0 { vec![] } else { vec![Access::read(s, bytes), Access::write(d, bytes)] };
        self.stream.submit(|| format!("copy of {bytes} bytes on {}", self.name()), access, copy_job(s, d, bytes))?;
        Ok(b)
    }
    fn adopt<T: Elem>(&self, mut buf: SimBuf<T>) -> Result<SimBuf<T>> {
        // Its free becomes this stream's operation (the caller made this stream wait for its
        // other uses).
        if self.stream.q.is_some() {
            buf.home = self.stream.q.clone();
        }
        Ok(buf)
    }
    fn synchronize(&self) -> Result<()> {
        bump(&counters::SYNCS);
        self.stream.sync()
    }
    fn record_event(&self) -> Result<SimEvent> {
        Ok(SimEvent { at: self.stream.q.as_ref().map(|q| (Arc::as_ptr(&q.sched) as usize, q.sched.record(q.id))) })
    }
    fn wait_event(&self, e: &SimEvent) -> Result<()> {
        if let Some((sched, id, p)) = self.sched_of(e)? {
            sched.wait(id, &p);
        }
        Ok(())
    }
    fn sync_event(&self, e: &SimEvent) -> Result<()> {
        bump(&counters::SYNCS);
        match self.sched_of(e)? {
            Some((sched, _, p)) => sched.sync_point(&p),
            None => Ok(()),
        }
    }
    fn buf_len<T: Elem>(buf: &SimBuf<T>) -> usize {
        buf.len
    }
    fn view<T: Elem>(buf: &SimBuf<T>) -> SimView<'_, T> {
        buf.as_view()
    }
    fn view_mut<T: Elem>(buf: &mut SimBuf<T>) -> SimViewMut<'_, T> {
        buf.as_view_mut()
    }
    fn view_range<T: Elem>(buf: &SimBuf<T>, range: Range<usize>) -> SimView<'_, T> {
        buf.slice(range)
    }
    fn view_range_mut<T: Elem>(buf: &mut SimBuf<T>, range: Range<usize>) -> SimViewMut<'_, T> {
        check_range(&range, buf.len);
        // SAFETY: in bounds (checked); the view borrows the buffer mutably.
        SimViewMut { ptr: unsafe { buf.ptr.as_ptr().add(range.start) }, len: range.end - range.start, _p: PhantomData }
    }
    fn sub<'a, T: Elem>(v: &'a SimView<'_, T>, range: Range<usize>) -> SimView<'a, T> {
        v.slice(range)
    }
    fn sub_mut<'a, T: Elem>(v: &'a mut SimViewMut<'_, T>, range: Range<usize>) -> SimViewMut<'a, T> {
        v.slice_mut(range)
    }
    fn split_mut<T: Elem>(buf: &mut SimBuf<T>, mid: usize) -> (SimViewMut<'_, T>, SimViewMut<'_, T>) {
        check_range(&(0..mid), buf.len);
        let p = buf.ptr.as_ptr();
        (
            SimViewMut { ptr: p, len: mid, _p: PhantomData },
            // SAFETY: mid <= len (checked); the two views are disjoint.
            SimViewMut { ptr: unsafe { p.add(mid) }, len: buf.len - mid, _p: PhantomData },
        )
    }
    fn reborrow<'a, T: Elem>(v: &'a SimViewMut<'_, T>) -> SimView<'a, T> {
        v.as_view()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_split_and_slice_like_slices() {
        let d = SimDevice::new(0);
        let mut b = d.upload(&[1.0f32, 2.0, 3.0, 4.0, 5.0]).unwrap();
        assert_eq!(b.as_view().as_ptr_align(), 0);
        {
            let (mut lo, hi) = SimDevice::split_mut(&mut b, 2);
            d.write(&mut lo, &[9.0, 8.0]).unwrap();
            assert_eq!(d.download(&hi.as_view()).unwrap(), vec![3.0, 4.0, 5.0]);
        }
        assert_eq!(d.download(&b.slice(1..3)).unwrap(), vec![8.0, 3.0]);
        assert_eq!(d.download(&SimDevice::sub(&b.as_view(), 4..5)).unwrap(), vec![5.0]);
    }

    impl<T> SimView<'_, T> {
        fn as_ptr_align(&self) -> usize {
            self.ptr as usize % ALIGN
        }
    }
}
