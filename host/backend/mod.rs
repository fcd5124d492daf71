//! The core of a device: memory, copies and synchronisation. Nothing about ops lives here;
//! each op family is its own trait in [`crate::ops`].

pub mod cpu;
pub mod cuda;
pub mod sim;

use std::fmt::Debug;
use std::ops::Range;

use crate::error::Result;

/// An element type that devices store: plain old data that the GPU can hold too.
pub trait Elem:
    bytemuck::Pod + Default + Debug + Send + Sync + cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + 'static
{
}
impl Elem for f32 {}
impl Elem for f64 {}
impl Elem for i32 {}
impl Elem for u32 {}
/// A 16-bit float's bits (bf16 or f16).
impl Elem for u16 {}
impl Elem for u64 {}

/// The length, in elements, of a device view.
pub trait ViewLen {
    /// Number of elements.
    fn view_len(&self) -> usize;
}

impl<T> ViewLen for &[T] {
    fn view_len(&self) -> usize {
        self.len()
    }
}
impl<T> ViewLen for &mut [T] {
    fn view_len(&self) -> usize {
        self.len()
    }
}
impl<T> ViewLen for cudarc::driver::CudaView<'_, T> {
    fn view_len(&self) -> usize {
        self.len()
    }
}
impl<T> ViewLen for cudarc::driver::CudaViewMut<'_, T> {
    fn view_len(&self) -> usize {
        self.len()
    }
}

/// A device: where buffers live and kernels run.
///
/// Buffers are owned (`Buf`); ops take views (`Ref`, `Mut`), which may be sub-ranges of a
/// larger buffer, so that a model's parameters can live in one buffer with a view per layer.
/// Work may be asynchronous: [`Backend::synchronize`] waits for it; downloads synchronise.
pub trait Backend: Clone + Send + Sync + 'static {
    /// An owned buffer of `T` on this device.
    type Buf<T: Elem>: Send + Sync;
    /// A read-only view of (part of) a buffer.
    type Ref<'a, T: Elem>: ViewLen
    where
        Self: 'a;
    /// A writable view of (part of) a buffer.
    type Mut<'a, T: Elem>: ViewLen
    where
        Self: 'a;

    /// A short name, e.g. `cpu:0` or `cuda:0`.
    fn name(&self) -> String;
    /// The memory of the hardware this device runs on, bytes: the machine's for the CPU and
    /// the simulator, the GPU's for CUDA (logical devices on one piece of hardware share it).
    fn total_memory(&self) -> u64;
    /// A zero-filled buffer of `len` elements.
    fn alloc<T: Elem>(&self, len: usize) -> Result<Self::Buf<T>>;
    /// A buffer holding a copy of `data`.
    fn upload<T: Elem>(&self, data: &[T]) -> Result<Self::Buf<T>>;
    /// Copies `data` into an existing view of equal length.
    fn write<T: Elem>(&self, dst: &mut Self::Mut<'_, T>, data: &[T]) -> Result<()>;
    /// Copies a view to the host (waits for pending work on it).
    fn download<T: Elem>(&self, src: &Self::Ref<'_, T>) -> Result<Vec<T>>;
    /// Copies `src` into `dst` (equal lengths). `src` may live on another device of this
    /// backend (another logical CPU device, another GPU); the copy runs on `self`'s queue.
    fn copy<T: Elem>(&self, src: &Self::Ref<'_, T>, dst: &mut Self::Mut<'_, T>) -> Result<()>;
    /// Another handle on the same device with its own queue of work (a new stream on a GPU;
    /// the same device on the CPU), e.g. for communication that overlaps compute.
    fn with_own_queue(&self) -> Result<Self>;
    /// A new buffer of this device holding a copy of `src` (queued on this device), in one pass.
    fn duplicate<T: Elem>(&self, src: &Self::Ref<'_, T>) -> Result<Self::Buf<T>>;
    /// Makes a buffer of another device or queue of this backend this one's: the buffer itself
    /// where this device can read it (CPU memory; a GPU buffer of the same context), else a
    /// copy here. Either way it is then freed in this queue's order, so this queue must already
    /// wait ([`Backend::wait_event`]) for every use of it queued elsewhere.
    fn adopt<T: Elem>(&self, buf: Self::Buf<T>) -> Result<Self::Buf<T>>;
    /// Waits until all work queued on this device has finished.
    fn synchronize(&self) -> Result<()>;

    /// A marker of the work queued on this device's queue so far (a CUDA event): what another
    /// queue can wait for ([`Backend::wait_event`]) without the host waiting.
    type Event: Send + Sync;
    /// Records an event after the work queued so far on this queue.
    fn record_event(&self) -> Result<Self::Event>;
    /// Makes the work queued on this queue from now on wait for the work `event` marks (which
    /// may be another queue's, or another device's of the same backend). The host does not wait.
    fn wait_event(&self, event: &Self::Event) -> Result<()>;
    /// The host waits until the work `event` marks has finished.
    fn sync_event(&self, event: &Self::Event) -> Result<()>;

    /// Number of elements of a buffer.
    fn buf_len<T: Elem>(buf: &Self::Buf<T>) -> usize;
    /// A view of a whole buffer.
    fn view<T: Elem>(buf: &Self::Buf<T>) -> Self::Ref<'_, T>;
    /// A writable view of a whole buffer.
    fn view_mut<T: Elem>(buf: &mut Self::Buf<T>) -> Self::Mut<'_, T>;
    /// A view of part of a buffer. Panics if `range` is out of bounds.
    fn view_range<T: Elem>(buf: &Self::Buf<T>, range: Range<usize>) -> Self::Ref<'_, T>;
    /// A writable view of part of a buffer. Panics if `range` is out of bounds.
    fn view_range_mut<T: Elem>(buf: &mut Self::Buf<T>, range: Range<usize>) -> Self::Mut<'_, T>;
    /// A sub-range of a view. Panics if `range` is out of bounds, like slice indexing.
    fn sub<'a, T: Elem>(v: &'a Self::Ref<'_, T>, range: Range<usize>) -> Self::Ref<'a, T>;
    /// A writable sub-range of a writable view. Panics if out of bounds.
    fn sub_mut<'a, T: Elem>(v: &'a mut Self::Mut<'_, T>, range: Range<usize>) -> Self::Mut<'a, T>;
    /// Two disjoint writable views of one buffer, split at `mid`.
    fn split_mut<T: Elem>(buf: &mut Self::Buf<T>, mid: usize) -> (Self::Mut<'_, T>, Self::Mut<'_, T>);
    /// A read-only view of a writable view (to pass an output on as the next op's input).
    fn reborrow<'a, T: Elem>(v: &'a Self::Mut<'_, T>) -> Self::Ref<'a, T>;
}

/// Checks that two lengths agree, for `op`.
pub(crate) fn check_len(op: &'static str, what: &str, got: usize, want: usize) -> Result<()> {
    if got != want {
        return Err(crate::Error::shape(op, format!("{what} has {got} elements, expected {want}")));
    }
    Ok(())
}

/// The machine's memory (`MemTotal` of `/proc/meminfo`), bytes; 8 GiB where it cannot be read.
pub(crate) fn host_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().find(|l| l.starts_with("MemTotal")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kib| kib * 1024)
        .unwrap_or(8 << 30)
}
