//! A buffer on a device with a row-major shape.

use crate::backend::{Backend, Elem};
use crate::error::{Error, Result};

/// A row-major tensor of `T` on device `B`.
pub struct Tensor<B: Backend, T: Elem = f32> {
    buf: B::Buf<T>,
    shape: Vec<usize>,
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl<B: Backend, T: Elem> Tensor<B, T> {
    /// A zero-filled tensor.
    pub fn zeros(dev: &B, shape: &[usize]) -> Result<Self> {
        Ok(Tensor { buf: dev.alloc(numel(shape))?, shape: shape.to_vec() })
    }

    /// A tensor holding `data` (its length must be the product of `shape`).
    pub fn from_vec(dev: &B, shape: &[usize], data: Vec<T>) -> Result<Self> {
        Self::from_slice(dev, shape, &data)
    }

    /// A tensor holding a copy of `data`.
    pub fn from_slice(dev: &B, shape: &[usize], data: &[T]) -> Result<Self> {
        if data.len() != numel(shape) {
            return Err(Error::shape(
                "Tensor::from_slice",
                format!("{} values given for shape {:?} ({} elements)", data.len(), shape, numel(shape)),
            ));
        }
        Ok(Tensor { buf: dev.upload(data)?, shape: shape.to_vec() })
    }

    /// Wraps an existing buffer.
    pub fn from_buf(buf: B::Buf<T>, shape: &[usize]) -> Result<Self> {
        let len = B::buf_len(&buf);
        if len != numel(shape) {
            return Err(Error::shape("Tensor::from_buf", format!("buffer of {len} for shape {shape:?}")));
        }
        Ok(Tensor { buf, shape: shape.to_vec() })
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        B::buf_len(&self.buf)
    }
    /// Whether it holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Changes the shape, keeping the elements (the element count must not change).
    pub fn reshape(mut self, shape: &[usize]) -> Result<Self> {
        if numel(shape) != self.len() {
            return Err(Error::shape("Tensor::reshape", format!("{:?} -> {shape:?}", self.shape)));
        }
        self.shape = shape.to_vec();
        Ok(self)
    }
    /// A read-only view of all elements.
    pub fn view(&self) -> B::Ref<'_, T> {
        B::view(&self.buf)
    }
    /// A writable view of all elements.
    pub fn view_mut(&mut self) -> B::Mut<'_, T> {
        B::view_mut(&mut self.buf)
    }
    /// The underlying buffer.
    pub fn buf(&self) -> &B::Buf<T> {
        &self.buf
    }
    /// The underlying buffer, writable.
    pub fn buf_mut(&mut self) -> &mut B::Buf<T> {
        &mut self.buf
    }
    /// Copies the elements to the host.
    pub fn to_vec(&self, dev: &B) -> Result<Vec<T>> {
        dev.download(&self.view())
    }
    /// Overwrites the elements from the host.
    pub fn write(&mut self, dev: &B, data: &[T]) -> Result<()> {
        dev.write(&mut B::view_mut(&mut self.buf), data)
    }
}
