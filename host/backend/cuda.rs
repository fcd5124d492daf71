//! The CUDA device: cudarc's driver API, loaded at run time, and the kernels of `kernels/`.
//!
//! Start-up checks, in order, each with an error that says what to do: the driver library is
//! there (`is_culib_present`, since cudarc panics otherwise), the kernels were built, the
//! driver is new enough for the toolkit that built them, the device exists, its compute
//! capability is covered by the fatbin's SASS or PTX, and the modules load.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, CudaView, CudaViewMut, PinnedHostSlice};

use crate::backend::{check_len, Backend, Elem};
use crate::error::{Error, Result};
use crate::kernels::{AllKernels, MANIFEST};

/// One GPU, or one logical device on a GPU (its own stream on a shared context).
#[derive(Clone)]
pub struct CudaDevice {
    inner: Arc<Gpu>,
    stream: Arc<CudaStream>,
    logical: usize,
    /// Page-locked buffers that uploads go through, so that `write` queues its copy and returns
    /// without waiting for the device (a copy from pageable memory waits for the stream).
    staging: Arc<Mutex<Staging>>,
    /// The split-K GEMM's workspace, kept between calls (work of this stream only).
    gemm_ws: Arc<Mutex<Option<CudaSlice<f32>>>>,
}

/// Uploads staged in turn through this many page-locked buffers: one is reused only after the
/// copy four uploads back has finished (a wait only when the device is that far behind).
const STAGING_SLOTS: usize = 4;

/// The staging ring of a stream.
#[derive(Default)]
struct Staging {
    slots: Vec<(Option<PinnedHostSlice<u8>>, Option<CudaEvent>)>,
    next: usize,
}

impl Drop for Staging {
    fn drop(&mut self) {
        // A queued copy may still read a page-locked buffer: let it finish before the buffer
        // is freed (cuMemFreeHost does not promise to wait).
        for (_, done) in &self.slots {
            if let Some(e) = done {
                let _ = e.synchronize();
            }
        }
    }
}

/// What every logical device on one GPU shares.
struct Gpu {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    kernels: AllKernels,
    info: GpuInfo,
}

/// What the driver says about a GPU.
#[derive(Debug, Clone)]
pub struct GpuInfo {
    /// Device ordinal.
    pub ordinal: usize,
    /// Marketing name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Total memory, bytes.
    pub total_mem: usize,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Streaming multiprocessors.
    pub sms: i32,
    /// Driver version as `cuDriverGetVersion` reports it (e.g. 13000 for 13.0).
    pub driver_version: i32,
    /// How this build's kernels run there (`sm_90 SASS`, `JIT from compute_80 PTX`), or why not.
    pub runs_kernels: std::result::Result<String, String>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice").field("ordinal", &self.inner.ordinal).field("logical", &self.logical).finish()
    }
}

/// The driver entry points tessera's CUDA path reaches through cudarc. cudarc looks each one up
/// on its first call and panics when it is missing, so a library that lacks any of them (a
/// toolkit's stub, a partial or foreign install) is refused before the first call instead.
pub const REQUIRED_DRIVER_SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDriverGetVersion",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetName",
    "cuDeviceTotalMem_v2",
    "cuDeviceGetAttribute",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxSetCurrent",
    "cuCtxGetCurrent",
    "cuCtxSynchronize",
    "cuStreamCreate",
    "cuStreamSynchronize",
    "cuStreamWaitEvent",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventSynchronize",
    "cuEventDestroy_v2",
    "cuModuleLoadData",
    "cuModuleGetFunction",
    "cuLaunchKernel",
    "cuMemAllocAsync",
    "cuMemFreeAsync",
    "cuMemcpyHtoDAsync_v2",
    "cuMemcpyDtoHAsync_v2",
    "cuMemcpyDtoDAsync_v2",
    "cuMemsetD8Async",
    "cuMemHostAlloc",
    "cuMemFreeHost",
    "cuMemGetInfo_v2",
    "cuGetErrorString",
    "cuGetErrorName",
];

/// Why the CUDA driver cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DriverProblem {
    /// No library of the names cudarc tries loads: no driver on this machine.
    Missing,
    /// A library loads but lacks entry points tessera calls (a toolkit's stub, a partial
    /// install): why, in words.
    Incomplete(String),
}

impl DriverProblem {
    /// The error a caller that needs a GPU returns for it.
    pub fn error(&self) -> Error {
        match self {
            DriverProblem::Missing => Error::NoDriver,
            DriverProblem::Incomplete(why) => Error::BadDriver(why.clone()),
        }
    }
}

impl std::fmt::Display for DriverProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DriverProblem::Missing => f.write_str("no CUDA driver on this machine (libcuda.so.1 could not be loaded)"),
            DriverProblem::Incomplete(why) => f.write_str(why),
        }
    }
}

/// Why the CUDA driver library cannot be used, or `None` when it loads (the first of the names
/// cudarc tries, in cudarc's order) and has every symbol of [`REQUIRED_DRIVER_SYMBOLS`].
/// Checked once per process.
pub fn driver_problem() -> Option<DriverProblem> {
    static PROBLEM: std::sync::OnceLock<Option<DriverProblem>> = std::sync::OnceLock::new();
    PROBLEM.get_or_init(|| check_driver_library(&cudarc::get_lib_name_candidates("cuda"))).clone()
}

/// The check behind [`driver_problem`], over the library names `candidates` (tried in order, as
/// the dynamic loader finds them).
pub fn check_driver_library(candidates: &[String]) -> Option<DriverProblem> {
    for name in candidates {
        let Ok(c) = std::ffi::CString::new(name.as_str()) else { continue };
        // SAFETY: dlopen with a NUL-terminated name; RTLD_LAZY | RTLD_LOCAL binds nothing global.
        // The handle is kept open for the life of the process (cudarc opens the same library).
        let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL) };
        if handle.is_null() {
            continue;
        }
        let missing: Vec<&str> = REQUIRED_DRIVER_SYMBOLS
            .iter()
            .copied()
            .filter(|sym| {
                let s = std::ffi::CString::new(*sym).expect("symbol names have no NUL");
                // SAFETY: the handle is open; dlsym only looks the name up.
                unsafe { libc::dlsym(handle, s.as_ptr()) }.is_null()
            })
            .collect();
        if missing.is_empty() {
            return None;
        }
        return Some(DriverProblem::Incomplete(format!(
            "the CUDA driver library {name} lacks {} of the entry points tessera needs ({}{}): it is not a complete \
             NVIDIA driver (a toolkit's stub library, or a partial install). Install the NVIDIA driver, or take the \
             folder holding that library off LD_LIBRARY_PATH",
            missing.len(),
            missing[..missing.len().min(4)].join(", "),
            if missing.len() > 4 { ", ..." } else { "" }
        )));
    }
    Some(DriverProblem::Missing)
}

/// Whether a usable CUDA driver library is on this machine (it loads and has every entry point
/// tessera calls; see [`driver_problem`]).
pub fn driver_present() -> bool {
    driver_problem().is_none()
}

/// The driver's version (e.g. 13000), or `NoDriver`.
pub fn driver_version() -> Result<i32> {
    if let Some(problem) = driver_problem() {
        return Err(problem.error());
    }
    let mut v = 0i32;
    // SAFETY: the library is present (checked above); cuDriverGetVersion only writes `v`.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }.result().map_err(Error::driver("cuDriverGetVersion"))?;
    Ok(v)
}

/// Number of GPUs the driver sees (0 where there is no usable driver, and where the driver says
/// there is no device: `cuInit` returning CUDA_ERROR_NO_DEVICE).
pub fn gpu_count() -> Result<usize> {
    if !driver_present() {
        return Ok(0);
    }
    match cudarc::driver::result::init() {
        Err(e) if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_NO_DEVICE => return Ok(0),
        r => r.map_err(Error::driver("cuInit"))?,
    }
    let n = cudarc::driver::result::device::get_count().map_err(Error::driver("cuDeviceGetCount"))?;
    Ok(n.max(0) as usize)
}

/// An error unless the driver sees a GPU numbered `ordinal`.
fn check_ordinal(ordinal: usize) -> Result<()> {
    let count = gpu_count()?;
    if ordinal >= count {
        return Err(Error::Device {
            spec: format!("cuda:{ordinal}"),
            reason: format!("the driver sees {count} GPU(s); ordinals run 0..{count}"),
        });
    }
    Ok(())
}

/// Describes GPU `ordinal` without loading kernels.
pub fn describe(ordinal: usize) -> Result<GpuInfo> {
    let driver_version = driver_version()?;
    check_ordinal(ordinal)?;
    let ctx = CudaContext::new(ordinal).map_err(Error::driver(format!("creating a context on GPU {ordinal}")))?;
    info_of(&ctx, ordinal, driver_version)
}

fn info_of(ctx: &Arc<CudaContext>, ordinal: usize, driver_version: i32) -> Result<GpuInfo> {
    use cudarc::driver::sys::CUdevice_attribute as A;
    let d = Error::driver("querying the device");
    let name = ctx.name().map_err(Error::driver("querying the device name"))?;
    let total_mem = ctx.total_mem().map_err(Error::driver("querying the device memory"))?;
    let compute_capability = ctx.compute_capability().map_err(d)?;
    let sms =
        ctx.attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT).map_err(Error::driver("querying the SM count"))?;
    let runs_kernels = if MANIFEST.built {
        MANIFEST.supports(compute_capability.0, compute_capability.1)
    } else {
        Err("the kernels were not built (no nvcc at build time)".to_string())
    };
    Ok(GpuInfo { ordinal, name, total_mem, compute_capability, sms, driver_version, runs_kernels })
}

/// Keeps freed memory in the device's default pool instead of handing it back to the driver
/// at every synchronisation, so that the small per-step buffers cost no new mapping. Best
/// effort: a device without memory pools keeps the default.
fn keep_pool_memory(ctx: &Arc<CudaContext>) {
    use cudarc::driver::{result, sys};
    let _ = ctx.bind_to_thread();
    // SAFETY: the device comes from a live context; the attribute takes a u64.
    unsafe {
        if let Ok(pool) = result::device::get_default_mem_pool(ctx.cu_device()) {
            let mut keep = u64::MAX;
            let _ = result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut keep as *mut u64 as *mut std::ffi::c_void,
            );
        }
    }
}

impl CudaDevice {
    /// Opens GPU `ordinal`, checks that it can run this build's kernels and loads them.
    pub fn new(ordinal: usize) -> Result<Self> {
        if let Some(problem) = driver_problem() {
            return Err(problem.error());
        }
        if !MANIFEST.built {
            return Err(Error::KernelsNotBuilt);
        }
        let driver = driver_version()?;
        if let Some(need) = MANIFEST.min_driver() {
            if driver < need {
                return Err(Error::Incompatible {
                    ordinal,
                    reason: format!(
                        "the driver supports CUDA {}.{}, but the kernels were built by CUDA {} (PTX ISA {}), which needs a driver for CUDA {}.{} or newer. Update the NVIDIA driver, or rebuild tessera with an nvcc no newer than the driver (NVCC=/path/to/nvcc cargo build --release)",
                        driver / 1000,
                        (driver % 1000) / 10,
                        MANIFEST.toolkit,
                        MANIFEST.ptx_isa,
                        need / 1000,
                        (need % 1000) / 10
                    ),
                });
            }
        }
        check_ordinal(ordinal)?;
        let ctx = CudaContext::new(ordinal).map_err(Error::driver(format!("creating a context on GPU {ordinal}")))?;
        let info = info_of(&ctx, ordinal, driver)?;
        if let Err(reason) = &info.runs_kernels {
            return Err(Error::Incompatible { ordinal, reason: reason.clone() });
        }
        keep_pool_memory(&ctx);
        // No event per buffer argument of every launch: tessera orders its streams itself, with
        // an event where two streams meet (Backend::wait_event); the simulator's deferred mode
        // checks that no meeting point lacks one.
        // SAFETY: set before any stream or buffer of this context exists.
        unsafe { ctx.disable_event_tracking() };
        let kernels = AllKernels::load(&ctx).map_err(|e| Error::Incompatible {
            ordinal,
            reason: format!(
                "{e}. The fatbin targets {}; rebuild with TESSERA_CUDA_ARCHS naming this GPU's sm_XX",
                MANIFEST.archs.join(", ")
            ),
        })?;
        let stream = ctx.new_stream().map_err(Error::driver("creating a stream"))?;
        Ok(CudaDevice {
            inner: Arc::new(Gpu { ordinal, ctx, kernels, info }),
            stream,
            logical: 0,
            staging: Arc::default(),
            gemm_ws: Arc::default(),
        })
    }

    /// Another logical device on the same GPU: same context and kernels, its own stream.
    pub fn logical(&self, index: usize) -> Result<Self> {
        let stream = self.inner.ctx.new_stream().map_err(Error::driver("creating a stream"))?;
        Ok(CudaDevice {
            inner: self.inner.clone(),
            stream,
            logical: index,
            staging: Arc::default(),
            gemm_ws: Arc::default(),
        })
    }

    /// The GPU's ordinal.
    pub fn ordinal(&self) -> usize {
        self.inner.ordinal
    }
    /// What the driver says about this GPU.
    pub fn info(&self) -> &GpuInfo {
        &self.inner.info
    }
    /// The stream this device queues work on (for cuBLAS baselines and custom kernels).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
    /// The CUDA context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.inner.ctx
    }
    /// The loaded kernels.
    pub fn kernels(&self) -> &AllKernels {
        &self.inner.kernels
    }
    /// Number of streaming multiprocessors, for sizing grids.
    pub fn sms(&self) -> usize {
        self.inner.info.sms.max(1) as usize
    }
    /// The split-K GEMM's workspace of this stream.
    pub(crate) fn gemm_workspace(&self) -> &Mutex<Option<CudaSlice<f32>>> {
        &self.gemm_ws
    }
}

impl Backend for CudaDevice {
    type Buf<T: Elem> = CudaSlice<T>;
    type Ref<'a, T: Elem> = CudaView<'a, T>;
    type Mut<'a, T: Elem> = CudaViewMut<'a, T>;

    fn total_memory(&self) -> u64 {
        self.info().total_mem as u64
    }
    fn name(&self) -> String {
        if self.logical == 0 {
            format!("cuda:{}", self.inner.ordinal)
        } else {
            format!("cuda:{}.{}", self.inner.ordinal, self.logical)
        }
    }
    fn alloc<T: Elem>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros::<T>(len)
            .map_err(Error::driver(format!("allocating {len} elements on {}", self.name())))
    }
    fn upload<T: Elem>(&self, data: &[T]) -> Result<CudaSlice<T>> {
        self.stream.clone_htod(data).map_err(Error::driver(format!("uploading to {}", self.name())))
    }
    fn write<T: Elem>(&self, dst: &mut CudaViewMut<'_, T>, data: &[T]) -> Result<()> {
        check_len("write", "destination", dst.len(), data.len())?;
        let bytes: &[u8] = bytemuck::cast_slice(data);
        if bytes.is_empty() {
            return Ok(());
        }
        let what = format!("uploading to {}", self.name());
        let d = || Error::driver(what.clone());
        let mut staging = self.staging.lock().unwrap_or_else(|e| e.into_inner());
        if staging.slots.is_empty() {
            staging.slots.resize_with(STAGING_SLOTS, || (None, None));
        }
        let i = staging.next;
        staging.next = (i + 1) % STAGING_SLOTS;
        let (host, done) = &mut staging.slots[i];
        if let Some(ev) = done.take() {
            ev.synchronize().map_err(d())?;
        }
        if host.as_ref().is_none_or(|h| h.len() < bytes.len()) {
            *host = None;
            // SAFETY: the buffer is written below before any copy reads it.
            *host = Some(unsafe { self.inner.ctx.alloc_pinned::<u8>(bytes.len().next_power_of_two()) }.map_err(d())?);
        }
        let staged = host.as_mut().expect("allocated above").as_mut_slice().map_err(d())?;
        staged[..bytes.len()].copy_from_slice(bytes);
        let (dptr, _record) = cudarc::driver::DevicePtrMut::device_ptr_mut(dst, &self.stream);
        // SAFETY: `dptr` holds `bytes.len()` bytes (checked lengths); the page-locked source stays
        // untouched until the event recorded next says the copy is done.
        unsafe { cudarc::driver::result::memcpy_htod_async(dptr, &staged[..bytes.len()], self.stream.cu_stream()) }
            .map_err(d())?;
        *done = Some(self.record_event()?);
        Ok(())
    }
    fn download<T: Elem>(&self, src: &CudaView<'_, T>) -> Result<Vec<T>> {
        self.stream.clone_dtoh(src).map_err(Error::driver(format!("downloading from {}", self.name())))
    }
    fn copy<T: Elem>(&self, src: &CudaView<'_, T>, dst: &mut CudaViewMut<'_, T>) -> Result<()> {
        check_len("copy", "destination", dst.len(), src.len())?;
        // Same context: an async device copy; another GPU: a peer copy (cudarc stages it).
        self.stream.memcpy_dtod(src, dst).map_err(Error::driver(format!("copying to {}", self.name())))?;
        if cudarc::driver::DeviceSlice::stream(src).context() != &self.inner.ctx {
            // The source's stream does not wait for a peer copy: finish it before the source
            // can be written again.
            self.synchronize()?;
        }
        Ok(())
    }
    fn with_own_queue(&self) -> Result<Self> {
        self.logical(self.logical)
    }
    fn duplicate<T: Elem>(&self, src: &CudaView<'_, T>) -> Result<CudaSlice<T>> {
        self.stream.clone_dtod(src).map_err(Error::driver(format!("copying on {}", self.name())))
    }
    fn adopt<T: Elem>(&self, buf: CudaSlice<T>) -> Result<CudaSlice<T>> {
        if buf.context() != &self.inner.ctx {
            // Another GPU: a peer copy, finished before the source is freed on its own stream.
            let b = self.duplicate(&buf.as_view())?;
            self.synchronize()?;
            return Ok(b);
        }
        if Arc::ptr_eq(cudarc::driver::DeviceSlice::stream(&buf), &self.stream) {
            return Ok(buf);
        }
        // Same context, another stream: the allocation becomes this stream's, so that it is
        // freed (cuMemFreeAsync) in this stream's order, after this stream's uses of it.
        let len = buf.len();
        let ptr = buf.leak();
        // SAFETY: `ptr` is a live allocation of `len` elements of T on this context, now owned
        // by nobody else (leaked above); the caller made this stream wait for its other uses.
        Ok(unsafe { self.stream.upgrade_device_ptr(ptr, len) })
    }
    fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(Error::driver(format!("synchronizing {}", self.name())))
    }
    type Event = cudarc::driver::CudaEvent;
    fn record_event(&self) -> Result<cudarc::driver::CudaEvent> {
        // No timing: the lightest event the driver has.
        let flags = cudarc::driver::sys::CUevent_flags::CU_EVENT_DISABLE_TIMING;
        self.stream.record_event(Some(flags)).map_err(Error::driver(format!("recording an event on {}", self.name())))
    }
    fn wait_event(&self, event: &cudarc::driver::CudaEvent) -> Result<()> {
        self.stream.wait(event).map_err(Error::driver(format!("waiting on an event on {}", self.name())))
    }
    fn sync_event(&self, event: &cudarc::driver::CudaEvent) -> Result<()> {
        event.synchronize().map_err(Error::driver(format!("waiting for an event of {}", self.name())))
    }
    fn buf_len<T: Elem>(buf: &CudaSlice<T>) -> usize {
        buf.len()
    }
    fn view<T: Elem>(buf: &CudaSlice<T>) -> CudaView<'_, T> {
        buf.as_view()
    }
    fn view_mut<T: Elem>(buf: &mut CudaSlice<T>) -> CudaViewMut<'_, T> {
        buf.as_view_mut()
    }
    fn view_range<T: Elem>(buf: &CudaSlice<T>, range: Range<usize>) -> CudaView<'_, T> {
        buf.slice(range)
    }
    fn view_range_mut<T: Elem>(buf: &mut CudaSlice<T>, range: Range<usize>) -> CudaViewMut<'_, T> {
        buf.slice_mut(range)
    }
    fn sub<'a, T: Elem>(v: &'a CudaView<'_, T>, range: Range<usize>) -> CudaView<'a, T> {
        v.slice(range)
    }
    fn sub_mut<'a, T: Elem>(v: &'a mut CudaViewMut<'_, T>, range: Range<usize>) -> CudaViewMut<'a, T> {
        v.slice_mut(range)
    }
    fn split_mut<T: Elem>(buf: &mut CudaSlice<T>, mid: usize) -> (CudaViewMut<'_, T>, CudaViewMut<'_, T>) {
        buf.split_at_mut(mid)
    }
    fn reborrow<'a, T: Elem>(v: &'a CudaViewMut<'_, T>) -> CudaView<'a, T> {
        v.as_view()
    }
}
