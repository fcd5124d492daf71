//! The CPU device: buffers are `Vec`s, ops run on rayon's pool and a kept GEMM crate.
//!
//! `cpu:N` makes N logical CPU devices that share the machine's cores; they are real devices
//! for every purpose of the parallel engine (own buffers, copies between them).

use std::ops::Range;

use crate::backend::{check_len, Backend, Elem};
use crate::error::Result;

/// A logical CPU device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuDevice {
    index: usize,
}

impl CpuDevice {
    /// Logical CPU device number `index`.
    pub fn new(index: usize) -> Self {
        CpuDevice { index }
    }

    /// Its index among the logical CPU devices.
    pub fn index(&self) -> usize {
        self.index
    }
}

impl Default for CpuDevice {
    fn default() -> Self {
        CpuDevice::new(0)
    }
}

impl Backend for CpuDevice {
    type Buf<T: Elem> = Vec<T>;
    type Ref<'a, T: Elem> = &'a [T];
    type Mut<'a, T: Elem> = &'a mut [T];

    fn name(&self) -> String {
        format!("cpu:{}", self.index)
    }
    fn alloc<T: Elem>(&self, len: usize) -> Result<Vec<T>> {
        Ok(vec![T::zeroed(); len])
    }
    fn upload<T: Elem>(&self, data: &[T]) -> Result<Vec<T>> {
        Ok(data.to_vec())
    }
    fn write<T: Elem>(&self, dst: &mut &mut [T], data: &[T]) -> Result<()> {
        check_len("write", "destination", dst.len(), data.len())?;
        dst.copy_from_slice(data);
        Ok(())
    }
    fn download<T: Elem>(&self, src: &&[T]) -> Result<Vec<T>> {
        Ok(src.to_vec())
    }
    fn copy<T: Elem>(&self, src: &&[T], dst: &mut &mut [T]) -> Result<()> {
        check_len("copy", "destination", dst.len(), src.len())?;
        dst.copy_from_slice(src);
        Ok(())
    }
    fn with_own_queue(&self) -> Result<Self> {
        Ok(self.clone())
    }
    fn duplicate<T: Elem>(&self, src: &&[T]) -> Result<Vec<T>> {
        Ok(src.to_vec())
    }
    fn adopt<T: Elem>(&self, buf: Vec<T>) -> Result<Vec<T>> {
        Ok(buf)
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn buf_len<T: Elem>(buf: &Vec<T>) -> usize {
        buf.len()
    }
    fn view<T: Elem>(buf: &Vec<T>) -> &[T] {
        buf
    }
    fn view_mut<T: Elem>(buf: &mut Vec<T>) -> &mut [T] {
        buf
    }
    fn view_range<T: Elem>(buf: &Vec<T>, range: Range<usize>) -> &[T] {
        &buf[range]
    }
    fn sub<'a, T: Elem>(v: &'a &[T], range: Range<usize>) -> &'a [T] {
        &v[range]
    }
    fn sub_mut<'a, T: Elem>(v: &'a mut &mut [T], range: Range<usize>) -> &'a mut [T] {
        &mut v[range]
    }
    fn split_mut<T: Elem>(buf: &mut Vec<T>, mid: usize) -> (&mut [T], &mut [T]) {
        buf.split_at_mut(mid)
    }
    fn reborrow<'a, T: Elem>(v: &'a &mut [T]) -> &'a [T] {
        v
    }
}

/// Elements per rayon task for elementwise work: large enough to amortise the task, small
/// enough to spread 1M elements over many cores.
pub(crate) const CHUNK: usize = 1 << 14;
