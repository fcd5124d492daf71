//! Device strings: `cpu`, `cpu:N` (N logical CPU devices), `cuda`, `cuda:K` (GPU K),
//! `cuda:KxN` (N logical devices on GPU K, one stream each), `sim`, `sim:N` (the CUDA
//! kernels in the simulator, on N logical simulated devices) and `auto`.
//!
//! `auto` takes GPU 0 when one can run the kernels and otherwise the CPU, and says which and
//! why. Asking for `cuda` where there is none is an error, never a silent fallback.

use std::fmt;
use std::str::FromStr;

use crate::backend::cpu::CpuDevice;
use crate::backend::cuda::{self, CudaDevice};
use crate::backend::sim::SimDevice;
use crate::error::{Error, Result};

/// A parsed device string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// `count` logical CPU devices (`cpu` is `cpu:1`).
    Cpu {
        /// Number of logical devices.
        count: usize,
    },
    /// `count` logical devices on GPU `ordinal` (`cuda` is `cuda:0`, `cuda:1x4` four on GPU 1).
    Cuda {
        /// GPU ordinal.
        ordinal: usize,
        /// Logical devices on it.
        count: usize,
    },
    /// `count` logical simulated GPUs: the CUDA kernels run on the CPU by the simulator
    /// (`sim` is `sim:1`). Slow; for checking kernels without a GPU.
    Sim {
        /// Number of logical devices.
        count: usize,
    },
    /// A GPU if one can run the kernels, else the CPU.
    Auto,
}

impl FromStr for DeviceSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason: &str| Error::Device { spec: s.to_string(), reason: reason.to_string() };
        let num = |t: &str, what: &str| -> Result<usize> {
            t.parse::<usize>().map_err(|_| bad(&format!("`{t}` is not a {what}")))
        };
        let lower = s.trim().to_ascii_lowercase();
        let (kind, rest) = match lower.split_once(':') {
            Some((k, r)) => (k.to_string(), Some(r.to_string())),
            None => (lower.clone(), None),
        };
        match (kind.as_str(), rest) {
            ("auto", None) => Ok(DeviceSpec::Auto),
            ("cpu", None) => Ok(DeviceSpec::Cpu { count: 1 }),
            ("cpu", Some(n)) => {
                let count = num(&n, "device count")?;
                if count == 0 {
                    return Err(bad("cpu:N needs N >= 1"));
                }
                Ok(DeviceSpec::Cpu { count })
            }
            ("sim", None) => Ok(DeviceSpec::Sim { count: 1 }),
            ("sim", Some(n)) => {
                let count = num(&n, "device count")?;
                if count == 0 {
                    return Err(bad("sim:N needs N >= 1"));
                }
                Ok(DeviceSpec::Sim { count })
            }
            ("cuda" | "gpu", None) => Ok(DeviceSpec::Cuda { ordinal: 0, count: 1 }),
            ("cuda" | "gpu", Some(r)) => {
                let (o, c) = match r.split_once('x') {
                    Some((o, c)) => (num(o, "GPU ordinal")?, num(c, "logical device count")?),
                    None => (num(&r, "GPU ordinal")?, 1),
                };
                if c == 0 {
                    return Err(bad("cuda:KxN needs N >= 1"));
                }
                Ok(DeviceSpec::Cuda { ordinal: o, count: c })
            }
            _ => Err(bad("expected auto, cpu, cpu:N, cuda, cuda:K, cuda:KxN, sim or sim:N")),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => write!(f, "auto"),
            DeviceSpec::Cpu { count } => write!(f, "cpu:{count}"),
            DeviceSpec::Cuda { ordinal, count: 1 } => write!(f, "cuda:{ordinal}"),
            DeviceSpec::Cuda { ordinal, count } => write!(f, "cuda:{ordinal}x{count}"),
            DeviceSpec::Sim { count } => write!(f, "sim:{count}"),
        }
    }
}

/// Opened devices, all of one backend.
#[derive(Debug, Clone)]
pub enum Devices {
    /// Logical CPU devices.
    Cpu(Vec<CpuDevice>),
    /// Logical devices on a GPU.
    Cuda(Vec<CudaDevice>),
    /// Simulated GPUs.
    Sim(Vec<SimDevice>),
}

impl Devices {
    /// Number of devices.
    pub fn len(&self) -> usize {
        match self {
            Devices::Cpu(v) => v.len(),
            Devices::Cuda(v) => v.len(),
            Devices::Sim(v) => v.len(),
        }
    }
    /// Whether there is none (never, for opened devices).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Names, e.g. `cpu:0, cpu:1`.
    pub fn names(&self) -> Vec<String> {
        use crate::Backend;
        match self {
            Devices::Cpu(v) => v.iter().map(|d| d.name()).collect(),
            Devices::Cuda(v) => v.iter().map(|d| d.name()).collect(),
            Devices::Sim(v) => v.iter().map(|d| d.name()).collect(),
        }
    }
}

impl DeviceSpec {
    /// Opens the devices. Returns them and a line saying what was chosen (and, for `auto`, why).
    pub fn open(&self) -> Result<(Devices, String)> {
        match *self {
            DeviceSpec::Cpu { count } => {
                Ok((Devices::Cpu((0..count).map(CpuDevice::new).collect()), format!("device: cpu:{count}")))
            }
            DeviceSpec::Cuda { ordinal, count } => {
                let first = CudaDevice::new(ordinal)?;
                let mut v = vec![first.clone()];
                for i in 1..count {
                    v.push(first.logical(i)?);
                }
                let msg = format!("device: {self} ({})", first.info().name);
                Ok((Devices::Cuda(v), msg))
            }
            DeviceSpec::Sim { count } => {
                let order = crate::backend::sim::StreamOrder::from_env()?;
                let streams = match order {
                    crate::backend::sim::StreamOrder::Immediate => String::new(),
                    o => format!("; streams {o}: work runs when waited on, races between streams reported"),
                };
                Ok((
                    Devices::Sim(SimDevice::group(count, order)),
                    format!(
                        "device: sim:{count} (the CUDA kernels in the simulator, on the CPU: slow, every access checked{streams})"
                    ),
                ))
            }
            DeviceSpec::Auto => {
                let why_not = match cuda::gpu_count() {
                    Ok(0) if !cuda::driver_present() => match cuda::driver_problem() {
                        Some(cuda::DriverProblem::Incomplete(why)) => why,
                        _ => "no CUDA driver on this machine".to_string(),
                    },
                    Ok(0) => "the CUDA driver sees no GPU".to_string(),
                    Ok(_) => match CudaDevice::new(0) {
                        Ok(d) => {
                            let msg = format!("device: auto chose cuda:0 ({})", d.info().name);
                            return Ok((Devices::Cuda(vec![d]), msg));
                        }
                        Err(e) => e.to_string(),
                    },
                    Err(e) => e.to_string(),
                };
                Ok((Devices::Cpu(vec![CpuDevice::new(0)]), format!("device: auto chose cpu ({why_not})")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu { count: 1 });
        assert_eq!("CPU:4".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu { count: 4 });
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda { ordinal: 0, count: 1 });
        assert_eq!("cuda:1".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda { ordinal: 1, count: 1 });
        assert_eq!("cuda:0x4".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda { ordinal: 0, count: 4 });
        assert_eq!("cuda:0x4".parse::<DeviceSpec>().unwrap().to_string(), "cuda:0x4");
        assert_eq!("sim".parse::<DeviceSpec>().unwrap(), DeviceSpec::Sim { count: 1 });
        assert_eq!("sim:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Sim { count: 3 });
        for bad in ["tpu", "cpu:0", "cpu:x", "cuda:a", "cuda:0x0", "sim:0", "sim:x", ""] {
            let e = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(e.starts_with(&format!("device `{bad}`")), "{e}");
        }
    }

    #[test]
    fn cpu_opens_n_devices_and_auto_says_why() {
        let (d, msg) = DeviceSpec::Cpu { count: 3 }.open().unwrap();
        assert_eq!(d.names(), vec!["cpu:0", "cpu:1", "cpu:2"]);
        assert_eq!(msg, "device: cpu:3");
        let (_, msg) = DeviceSpec::Auto.open().unwrap();
        assert!(msg.starts_with("device: auto chose "), "{msg}");
    }

    #[test]
    fn cuda_without_a_gpu_is_an_error_not_a_fallback() {
        if cuda::gpu_count().unwrap_or(0) > 0 {
            eprintln!("skipped: a CUDA device is present");
            return;
        }
        let e = DeviceSpec::Cuda { ordinal: 0, count: 1 }.open().unwrap_err().to_string();
        assert!(e.contains("driver") || e.contains("not built") || e.contains("GPU"), "{e}");
    }
}
