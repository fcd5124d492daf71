//! NCCL for GPUs across processes: the gradient all-reduce (and broadcast, send, recv) of
//! [`Communicator`] over NCCL, loaded at run time (no NCCL at build time; a clear error where it
//! is missing). tessera loads it itself ([`library`]): the names `libnccl.so.2` (what the libnccl2
//! package and PyTorch's wheel ship) and `libnccl.so` through the loader's search
//! (`LD_LIBRARY_PATH`, the ld.so cache), then the NCCL of an installed NVIDIA or PyTorch Python
//! wheel (`site-packages/nvidia/nccl/lib`) or conda environment. cudarc's loader knows only
//! `libnccl.so` and `libnccl.so.{13,12,11,10,9,1}`, so it is not used. Under MPI the NCCL unique id is created by the
//! group's rank 0 and sent to the others over MPI
//! ([`StageGroup::share_bytes`](crate::parallel::mpi::StageGroup::share_bytes)).
//!
//! One NCCL rank per GPU: a single card cannot host two ranks of one communicator, so on one
//! GPU the communicator has one rank (its all-reduce is then a copy, still through NCCL).
//!
//! Bus bandwidth, NCCL's measure for comparing all-reduce speeds across rank counts:
//! `busbw = algbw * 2 (n - 1) / n`, where `algbw = bytes / time` and `n` is the number of ranks
//! ([`bus_bandwidth`]).

use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cudarc::driver::{DevicePtr, DevicePtrMut};

use crate::backend::cuda::CudaDevice;
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::parallel::comm::Communicator;

type NcclResult = c_int;
type RawComm = *mut c_void;
type RawStream = *mut c_void;

/// `ncclUniqueId`: 128 opaque bytes, passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [c_char; 128],
}

const NCCL_FLOAT32: c_int = 7;
const NCCL_SUM: c_int = 0;
const NCCL_AVG: c_int = 4;

/// NCCL's entry points, from the loaded library.
pub struct Nccl {
    /// Where it was loaded from (the name given to the loader, or a path).
    pub path: String,
    /// `ncclGetVersion`: e.g. 22304 for 2.23.4.
    pub version: i32,
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> NcclResult,
    comm_init_rank: unsafe extern "C" fn(*mut RawComm, c_int, UniqueId, c_int) -> NcclResult,
    comm_destroy: unsafe extern "C" fn(RawComm) -> NcclResult,
    error_string: unsafe extern "C" fn(NcclResult) -> *const c_char,
    all_reduce: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, RawComm, RawStream) -> NcclResult,
    broadcast: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, RawComm, RawStream) -> NcclResult,
    reduce_scatter:
        unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, RawComm, RawStream) -> NcclResult,
    all_gather: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, RawComm, RawStream) -> NcclResult,
    send: unsafe extern "C" fn(*const c_void, usize, c_int, c_int, RawComm, RawStream) -> NcclResult,
    recv: unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, RawComm, RawStream) -> NcclResult,
    _lib: libloading::Library,
}

/// The places tessera looks for NCCL, in order: names for the loader's own search, then the
/// library of NVIDIA's or PyTorch's Python wheels and of a conda environment, wherever such
/// folders exist on this machine.
pub fn candidates() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = vec!["libnccl.so.2".into(), "libnccl.so".into()];
    let mut roots: Vec<PathBuf> = Vec::new();
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(p) = std::env::var_os(var) {
            roots.push(PathBuf::from(&p).join("lib"));
            v.push(PathBuf::from(p).join("lib").join("libnccl.so.2"));
        }
    }
    if let Some(home) = std::env::var_os("HOME") {
        roots.push(PathBuf::from(home).join(".local/lib"));
    }
    for r in ["/usr/local/lib", "/usr/lib", "/opt/conda/lib"] {
        roots.push(r.into());
    }
    for root in roots {
        let Ok(entries) = std::fs::read_dir(&root) else { continue };
        let mut pythons: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("python3")))
            .collect();
        pythons.sort();
        for py in pythons.iter().rev() {
            for pkgs in ["site-packages", "dist-packages"] {
                let lib = py.join(pkgs).join("nvidia/nccl/lib/libnccl.so.2");
                if lib.exists() {
                    v.push(lib);
                }
            }
        }
    }
    v
}

/// Loads NCCL from the first of `candidates` that has every entry point tessera calls.
pub fn load_from(candidates: &[PathBuf]) -> std::result::Result<Nccl, String> {
    let mut tried = Vec::new();
    for c in candidates {
        // SAFETY: loading a shared library runs its initialisers; NCCL's are plain set-up.
        match unsafe { libloading::Library::new(c) } {
            Ok(lib) => match unsafe { bind(lib, c) } {
                Ok(n) => return Ok(n),
                Err(e) => tried.push(format!("{} ({e})", c.display())),
            },
            Err(_) => tried.push(format!("{} (not found)", c.display())),
        }
    }
    Err(format!(
        "NCCL could not be loaded: tried {}. Install NCCL (Debian/Ubuntu: libnccl2 from NVIDIA's repository; or pip \
         install nvidia-nccl-cu12) and put its folder on LD_LIBRARY_PATH, or use --allreduce ring",
        tried.join(", ")
    ))
}

/// # Safety
/// `lib` must be an NCCL 2 library: its symbols are taken with NCCL's C signatures.
unsafe fn bind(lib: libloading::Library, at: &Path) -> std::result::Result<Nccl, String> {
    macro_rules! sym {
        ($name:literal) => {
            *lib.get(concat!($name, "\0").as_bytes()).map_err(|_| format!("it lacks {}", $name))?
        };
    }
    let get_version: unsafe extern "C" fn(*mut c_int) -> NcclResult = sym!("ncclGetVersion");
    let mut version = 0;
    if get_version(&mut version) != 0 {
        return Err("ncclGetVersion failed".into());
    }
    Ok(Nccl {
        path: at.display().to_string(),
        version,
        get_unique_id: sym!("ncclGetUniqueId"),
        comm_init_rank: sym!("ncclCommInitRank"),
        comm_destroy: sym!("ncclCommDestroy"),
        error_string: sym!("ncclGetErrorString"),
        all_reduce: sym!("ncclAllReduce"),
        broadcast: sym!("ncclBroadcast"),
        reduce_scatter: sym!("ncclReduceScatter"),
        all_gather: sym!("ncclAllGather"),
        send: sym!("ncclSend"),
        recv: sym!("ncclRecv"),
        _lib: lib,
    })
}

/// NCCL, loaded once per process from [`candidates`].
pub fn library() -> Result<&'static Nccl> {
    static LIB: OnceLock<std::result::Result<Nccl, String>> = OnceLock::new();
    LIB.get_or_init(|| load_from(&candidates())).as_ref().map_err(|e| Error::Parallel(e.clone()))
}

impl Nccl {
    /// `2.23.4` from the version number.
    pub fn version_string(&self) -> String {
        let v = self.version;
        if v >= 10000 {
            format!("{}.{}.{}", v / 10000, (v % 10000) / 100, v % 100)
        } else {
            format!("{}.{}.{}", v / 1000, (v % 1000) / 100, v % 100)
        }
    }
    fn check(&self, during: &str, r: NcclResult) -> Result<()> {
        if r == 0 {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any code.
        let msg = unsafe { CStr::from_ptr((self.error_string)(r)) }.to_string_lossy().into_owned();
        Err(Error::Parallel(format!("NCCL failed during {during}: {msg} (code {r}; NCCL_DEBUG=INFO says more)")))
    }
}

/// One rank of an NCCL communicator on a GPU. Every call waits for its operation to finish
/// (on the communicator's own stream), so `send` and `recv` between two ranks must be ordered
/// (one sends first while the other receives), as NCCL's point-to-point calls outside a group
/// are; the gradient all-reduce, what training uses, has no such constraint.
pub struct NcclComm {
    nccl: &'static Nccl,
    comm: RawComm,
    rank: usize,
    size: usize,
    dev: CudaDevice,
}

// SAFETY: an NCCL communicator may be used from another thread as long as calls on it are not
// concurrent; a Communicator is owned by one thread at a time (`&mut self`).
unsafe impl Send for NcclComm {}

/// A new NCCL unique id (on the group's rank 0), as bytes to send to the other ranks.
pub fn new_id() -> Result<Vec<u8>> {
    let nccl = library()?;
    let mut id = UniqueId { internal: [0; 128] };
    // SAFETY: `id` is a valid ncclUniqueId to write.
    nccl.check("creating a unique id", unsafe { (nccl.get_unique_id)(&mut id) })?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

impl NcclComm {
    /// Rank `rank` of `size`, on `dev` (its own stream), from the id rank 0 made.
    pub fn new(dev: &CudaDevice, rank: usize, size: usize, id: &[u8]) -> Result<Self> {
        if id.len() != 128 {
            return Err(Error::Parallel(format!("an NCCL unique id has 128 bytes, got {}", id.len())));
        }
        if rank >= size {
            return Err(Error::Parallel(format!("NCCL rank {rank} is not a rank of a group of {size}")));
        }
        let nccl = library()?;
        let mut uid = UniqueId { internal: [0; 128] };
        for (d, s) in uid.internal.iter_mut().zip(id) {
            *d = *s as c_char;
        }
        let dev = dev.with_own_queue()?;
        dev.stream()
            .context()
            .bind_to_thread()
            .map_err(|e| Error::Parallel(format!("binding the GPU for NCCL: {e:?}")))?;
        let mut comm: RawComm = std::ptr::null_mut();
        let (n, r) = (c_int::try_from(size), c_int::try_from(rank));
        let (Ok(n), Ok(r)) = (n, r) else {
            return Err(Error::Parallel(format!("NCCL group of {size} ranks is too large")));
        };
        // SAFETY: `comm` is written by NCCL; the device's context is current on this thread.
        nccl.check("joining the communicator", unsafe { (nccl.comm_init_rank)(&mut comm, n, uid, r) })?;
        Ok(NcclComm { nccl, comm, rank, size, dev })
    }

    /// A one-rank communicator on `dev` (to exercise NCCL on a single GPU).
    pub fn single(dev: &CudaDevice) -> Result<Self> {
        Self::new(dev, 0, 1, &new_id()?)
    }

    fn stream(&self) -> RawStream {
        self.dev.stream().cu_stream() as RawStream
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // SAFETY: the communicator was made by ncclCommInitRank and is destroyed once.
        unsafe { (self.nccl.comm_destroy)(self.comm) };
    }
}

impl Communicator<CudaDevice> for NcclComm {
    fn wait_event(&mut self, event: &cudarc::driver::CudaEvent) -> Result<()> {
        crate::Backend::wait_event(&self.dev, event)
    }
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum(&mut self, buf: &mut cudarc::driver::CudaSlice<f32>) -> Result<()> {
        self.all_reduce(buf, NCCL_SUM)
    }
    fn all_reduce_mean(&mut self, buf: &mut cudarc::driver::CudaSlice<f32>) -> Result<()> {
        self.all_reduce(buf, NCCL_AVG)
    }
    fn reduce_scatter_sum(&mut self, buf: &mut cudarc::driver::CudaSlice<f32>) -> Result<()> {
        let (n, len) = (self.size, buf.len());
        if n == 1 {
            return Ok(());
        }
        if len % n != 0 {
            // NCCL's reduce-scatter takes equal parts: uneven ones get the whole sum (every
            // part, this rank's included, holds its sum; twice the traffic).
            return self.all_reduce(buf, NCCL_SUM);
        }
        let count = len / n;
        let stream = self.dev.stream().clone();
        {
            let (ptr, _sync) = buf.device_ptr_mut(&stream);
            let p = ptr as *mut f32;
            // SAFETY: `p` holds `len` floats on this device; NCCL's in-place reduce-scatter
            // receives into this rank's part of the send buffer.
            let r = unsafe {
                (self.nccl.reduce_scatter)(
                    p as *const c_void,
                    p.add(self.rank * count) as *mut c_void,
                    count,
                    NCCL_FLOAT32,
                    NCCL_SUM,
                    self.comm,
                    self.stream(),
                )
            };
            self.nccl.check("reduce-scatter", r)?;
        }
        self.dev.synchronize()
    }
    fn all_gather(&mut self, buf: &mut cudarc::driver::CudaSlice<f32>) -> Result<()> {
        let (n, len) = (self.size, buf.len());
        if n == 1 {
            return Ok(());
        }
        let stream = self.dev.stream().clone();
        {
            let (ptr, _sync) = buf.device_ptr_mut(&stream);
            let p = ptr as *mut f32;
            if len % n == 0 {
                let count = len / n;
                // SAFETY: in place: this rank's part of the receive buffer is what it sends.
                let r = unsafe {
                    (self.nccl.all_gather)(
                        p.add(self.rank * count) as *const c_void,
                        p as *mut c_void,
                        count,
                        NCCL_FLOAT32,
                        self.comm,
                        self.stream(),
                    )
                };
                self.nccl.check("all-gather", r)?;
            } else {
                // Uneven parts: each owner broadcasts its own, in rank order on every rank.
                for (root, c) in crate::parallel::comm::chunks(len, n).into_iter().enumerate() {
                    if c.is_empty() {
                        continue;
                    }
                    // SAFETY: `c` lies within the `len` floats at `p`; in place.
                    let r = unsafe {
                        let q = p.add(c.start) as *mut c_void;
                        (self.nccl.broadcast)(q, q, c.len(), NCCL_FLOAT32, root as c_int, self.comm, self.stream())
                    };
                    self.nccl.check("all-gather (broadcast of a part)", r)?;
                }
            }
        }
        self.dev.synchronize()
    }
    fn broadcast(&mut self, buf: &mut cudarc::driver::CudaSlice<f32>, root: usize) -> Result<()> {
        if root >= self.size() {
            return Err(Error::Invalid(format!("broadcast root {root} is not a rank of a group of {}", self.size())));
        }
        let stream = self.dev.stream().clone();
        let n = buf.len();
        {
            let (ptr, _sync) = buf.device_ptr_mut(&stream);
            let p = ptr as *mut c_void;
            // SAFETY: `p` holds `n` floats on this communicator's device; in place (send = recv).
            let r = unsafe { (self.nccl.broadcast)(p, p, n, NCCL_FLOAT32, root as c_int, self.comm, self.stream()) };
            self.nccl.check("broadcast", r)?;
        }
        self.dev.synchronize()
    }
    fn send(&mut self, buf: &cudarc::driver::CudaView<'_, f32>, to: usize) -> Result<()> {
        let stream = self.dev.stream().clone();
        let n = buf.len();
        {
            let (ptr, _sync) = buf.device_ptr(&stream);
            // SAFETY: `ptr` holds `n` floats on this device.
            let r = unsafe {
                (self.nccl.send)(ptr as *const c_void, n, NCCL_FLOAT32, to as c_int, self.comm, self.stream())
            };
            self.nccl.check("send", r)?;
        }
        self.dev.synchronize()
    }
    fn recv(&mut self, buf: &mut cudarc::driver::CudaViewMut<'_, f32>, from: usize) -> Result<()> {
        let stream = self.dev.stream().clone();
        let n = buf.len();
        {
            let (ptr, _sync) = buf.device_ptr_mut(&stream);
            // SAFETY: `ptr` has room for `n` floats on this device.
            let r = unsafe {
                (self.nccl.recv)(ptr as *mut c_void, n, NCCL_FLOAT32, from as c_int, self.comm, self.stream())
            };
            self.nccl.check("recv", r)?;
        }
        self.dev.synchronize()
    }
}

impl NcclComm {
    fn all_reduce(&mut self, buf: &mut cudarc::driver::CudaSlice<f32>, op: c_int) -> Result<()> {
        let stream = self.dev.stream().clone();
        let n = buf.len();
        {
            let (ptr, _sync) = buf.device_ptr_mut(&stream);
            let p = ptr as *mut c_void;
            // SAFETY: `p` holds `n` floats on this communicator's device; in place.
            let r = unsafe { (self.nccl.all_reduce)(p, p, n, NCCL_FLOAT32, op, self.comm, self.stream()) };
            self.nccl.check("all-reduce", r)?;
        }
        self.dev.synchronize()
    }
}

/// NCCL's bus bandwidth of an all-reduce of `bytes` over `ranks` ranks that took `seconds`:
/// `algbw * 2 (n - 1) / n` (0 for one rank, where nothing crosses a bus).
pub fn bus_bandwidth(bytes: usize, ranks: usize, seconds: f64) -> f64 {
    let algbw = bytes as f64 / seconds.max(1e-12);
    algbw * 2.0 * (ranks.saturating_sub(1)) as f64 / ranks.max(1) as f64
}

#[cfg(test)]
mod tests {
    /// The lookup finds `libnccl.so.2` (the only name NCCL's packages ship) in a folder, takes
    /// every entry point from it, and says what it tried where the library is missing.
    #[test]
    fn nccl_is_found_by_the_name_its_packages_ship() {
        let dir = std::env::temp_dir().join(format!("tessera-fake-nccl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let c = crate::check::fake_nccl_c_source();
        std::fs::write(dir.join("fake.c"), c).unwrap();
        let lib = dir.join("libnccl.so.2");
        let built = std::process::Command::new("cc")
            .args(["-shared", "-fPIC", "-o"])
            .arg(&lib)
            .arg(dir.join("fake.c"))
            .status();
        if !built.is_ok_and(|s| s.success()) {
            eprintln!("skipped: no C compiler to build a fake libnccl.so.2");
            return;
        }
        let n = super::load_from(&[dir.join("libnccl.so"), lib.clone()]).unwrap();
        assert_eq!(n.version_string(), "2.23.4");
        assert_eq!(n.path, lib.display().to_string());
        // The names tessera asks the loader for come first, libnccl.so.2 before libnccl.so.
        let c = super::candidates();
        assert_eq!(c[0].to_str(), Some("libnccl.so.2"));
        let e = super::load_from(&[dir.join("nothing.so")]).err().unwrap();
        assert!(e.contains("nothing.so (not found)") && e.contains("--allreduce ring"), "{e}");
        // A library without NCCL's entry points is refused with the one it lacks.
        std::fs::write(dir.join("empty.c"), "int unrelated(void) { return 0; }\n").unwrap();
        let empty = dir.join("libempty.so");
        let ok = std::process::Command::new("cc")
            .args(["-shared", "-fPIC", "-o"])
            .arg(&empty)
            .arg(dir.join("empty.c"))
            .status();
        assert!(ok.unwrap().success());
        let e = super::load_from(&[empty]).err().unwrap();
        assert!(e.contains("it lacks ncclGetVersion"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bus_bandwidth_follows_the_nccl_formula() {
        assert_eq!(super::bus_bandwidth(1000, 1, 1.0), 0.0);
        assert_eq!(super::bus_bandwidth(1000, 2, 1.0), 1000.0);
        assert_eq!(super::bus_bandwidth(1000, 4, 0.5), 3000.0);
    }
}
