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
use std::sync::Mutex;

use cudarc::driver::LaunchConfig;

use crate::backend::{check_len, Backend, Elem, ViewLen};
use crate::error::{Error, Result};

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

/// The simulator's stand-in for a CUDA stream: work runs at once, in call order.
#[derive(Debug, Clone, Copy, Default)]
pub struct SimStream;

impl SimStream {
    /// A new buffer holding `data` (as `CudaStream::clone_htod`).
    pub fn clone_htod<T: Elem>(&self, data: &[T]) -> std::result::Result<SimBuf<T>, SimError> {
        bump(&counters::ALLOCS);
        bump(&counters::H2D);
        let mut b = SimBuf::zeroed(data.len());
        b.as_mut_slice().copy_from_slice(data);
        Ok(b)
    }
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

/// Runs one launch through its generated thunk.
///
/// # Safety
/// `args` are the kernel's parameters in order, each pointer valid for its stated length.
unsafe fn launch(
    name: &'static str,
    thunk: Thunk,
    _stream: &SimStream,
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
    let mut err = vec![0u8; 2048];
    // SAFETY: the thunk reads `l` and `args` (valid for the call) and writes at most
    // `err.len()` bytes, NUL-terminated, into `err`.
    let rc = unsafe { thunk(&l, args.as_ptr(), err.as_mut_ptr() as *mut c_char, err.len()) };
    if rc == 0 {
        Ok(())
    } else {
        let end = err.iter().position(|&b| b == 0).unwrap_or(err.len());
        Err(SimError(String::from_utf8_lossy(&err[..end]).into_owned()))
    }
}

include!(concat!(env!("OUT_DIR"), "/sim_kernels.rs"));

// ---- memory -----------------------------------------------------------------------------------

/// A buffer of simulated device memory: host memory aligned as `cudaMalloc` aligns, known to
/// the simulator's checker while it lives.
pub struct SimBuf<T: Elem> {
    ptr: NonNull<T>,
    len: usize,
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
        // SAFETY: registers the live allocation with the runtime (removed in Drop).
        unsafe { tsim_register_alloc(p as *const c_void, len * std::mem::size_of::<T>()) };
        SimBuf { ptr, len }
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

impl<T: Elem> Drop for SimBuf<T> {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout; unregistered before it is freed.
        unsafe {
            tsim_unregister_alloc(self.ptr.as_ptr() as *const c_void);
            std::alloc::dealloc(self.ptr.as_ptr() as *mut u8, Self::layout(self.len));
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
    fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: the view uniquely covers len initialised elements of a live buffer.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
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
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SimDevice {
    index: usize,
}

static STREAM: SimStream = SimStream;
static KERNELS: SimAllKernels = SimAllKernels {
    activation: SimActivationKernels,
    gemm: SimGemmKernels,
    loss: SimLossKernels,
    optim: SimOptimKernels,
    reduce: SimReduceKernels,
};

impl SimDevice {
    /// Simulated device number `index`.
    pub fn new(index: usize) -> Self {
        SimDevice { index }
    }
    /// Its index among the simulated devices.
    pub fn index(&self) -> usize {
        self.index
    }
    /// The kernels, with the same launch methods as [`crate::CudaDevice::kernels`].
    pub fn kernels(&self) -> &'static SimAllKernels {
        &KERNELS
    }
    /// The kernels of `kernels/sim/planted.cu` (planted bugs and shim probes).
    pub fn planted(&self) -> SimPlantedKernels {
        SimPlantedKernels
    }
    /// The stream stand-in (work runs at once).
    pub fn stream(&self) -> &'static SimStream {
        &STREAM
    }
    /// The streaming-multiprocessor count reported to launch heuristics ([`SIM_SMS`]).
    pub fn sms(&self) -> usize {
        SIM_SMS
    }
}

impl Backend for SimDevice {
    type Buf<T: Elem> = SimBuf<T>;
    type Ref<'a, T: Elem> = SimView<'a, T>;
    type Mut<'a, T: Elem> = SimViewMut<'a, T>;

    fn total_memory(&self) -> u64 {
        crate::backend::host_memory()
    }
    fn name(&self) -> String {
        format!("sim:{}", self.index)
    }
    fn alloc<T: Elem>(&self, len: usize) -> Result<SimBuf<T>> {
        bump(&counters::ALLOCS);
        Ok(SimBuf::zeroed(len))
    }
    fn upload<T: Elem>(&self, data: &[T]) -> Result<SimBuf<T>> {
        STREAM.clone_htod(data).map_err(Error::driver("uploading"))
    }
    fn write<T: Elem>(&self, dst: &mut SimViewMut<'_, T>, data: &[T]) -> Result<()> {
        check_len("write", "destination", dst.len(), data.len())?;
        bump(&counters::H2D);
        dst.as_mut_slice().copy_from_slice(data);
        Ok(())
    }
    fn download<T: Elem>(&self, src: &SimView<'_, T>) -> Result<Vec<T>> {
        bump(&counters::D2H);
        bump(&counters::SYNCS);
        Ok(src.as_slice().to_vec())
    }
    fn copy<T: Elem>(&self, src: &SimView<'_, T>, dst: &mut SimViewMut<'_, T>) -> Result<()> {
        check_len("copy", "destination", dst.len(), src.len())?;
        bump(&counters::D2D);
        dst.as_mut_slice().copy_from_slice(src.as_slice());
        Ok(())
    }
    fn with_own_queue(&self) -> Result<Self> {
        Ok(self.clone())
    }
    fn duplicate<T: Elem>(&self, src: &SimView<'_, T>) -> Result<SimBuf<T>> {
        bump(&counters::ALLOCS);
        bump(&counters::D2D);
        let mut b = SimBuf::zeroed(src.len());
        b.as_mut_slice().copy_from_slice(src.as_slice());
        Ok(b)
    }
    fn adopt<T: Elem>(&self, buf: SimBuf<T>) -> Result<SimBuf<T>> {
        Ok(buf)
    }
    fn synchronize(&self) -> Result<()> {
        bump(&counters::SYNCS);
        Ok(())
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
