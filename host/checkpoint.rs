//! Checkpoints in safetensors, readable by other tools: parameters by layer name
//! (`layers.{i}.weight` as `in x out`, `layers.{i}.bias`), optimizer state
//! (`optimizer.{slot}.layers.{i}.weight`, ...), and in the metadata the model config, the
//! optimizer and schedule, the step and the data cursor, so a resumed run continues exactly
//! as the uninterrupted one would. Loading checks every name and shape and says what is wrong.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::error::{Error, Result};
use crate::nn::MlpConfig;
use crate::ops::activation::Activation;
use crate::ops::optim::{AdamW, Sgd};
use crate::train::{Cursor, LrSchedule, OptimizerConfig, TrainConfig};

/// The `format` metadata value of this layout.
pub const FORMAT: &str = "tessera-mlp/1";

/// Everything needed to resume a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// The run's config.
    pub config: TrainConfig,
    /// Batch size of the run.
    pub batch: usize,
    /// Steps taken.
    pub step: u64,
    /// The next batch of the epoch loop.
    pub cursor: Cursor,
    /// Flat parameters (the layout of [`MlpConfig::layout`]).
    pub params: Vec<f32>,
    /// Optimizer state, one flat vector per slot of [`OptimizerConfig::slots`].
    pub state: Vec<Vec<f32>>,
}

fn tensor_names(cfg: &MlpConfig, prefix: &str) -> Vec<(String, Vec<usize>, std::ops::Range<usize>)> {
    let mut v = Vec::new();
    for (i, l) in cfg.layout().iter().enumerate() {
        v.push((format!("{prefix}layers.{i}.weight"), vec![l.fan_in, l.fan_out], l.weight.clone()));
        v.push((format!("{prefix}layers.{i}.bias"), vec![l.fan_out], l.bias.clone()));
    }
    v
}

impl Checkpoint {
    fn metadata(&self) -> HashMap<String, String> {
        let c = &self.config;
        let mut m = HashMap::new();
        let mut put = |k: &str, v: String| {
            m.insert(k.to_string(), v);
        };
        put("format", FORMAT.into());
        put("widths", c.model.widths.iter().map(|w| w.to_string()).collect::<Vec<_>>().join(","));
        put("activation", c.model.act.to_string());
        put("optimizer", c.optimizer.name().into());
        match c.optimizer {
            OptimizerConfig::Sgd(o) => {
                put("lr", o.lr.to_string());
                put("momentum", o.momentum.to_string());
                put("weight_decay", o.weight_decay.to_string());
            }
            OptimizerConfig::AdamW(o) => {
                put("lr", o.lr.to_string());
                put("beta1", o.beta1.to_string());
                put("beta2", o.beta2.to_string());
                put("eps", o.eps.to_string());
                put("weight_decay", o.weight_decay.to_string());
            }
        }
        match c.schedule {
            LrSchedule::Constant => put("schedule", "constant".into()),
            LrSchedule::Cosine { warmup, total, min_factor } => {
                put("schedule", "cosine".into());
                put("warmup", warmup.to_string());
                put("total_steps", total.to_string());
                put("min_factor", min_factor.to_string());
            }
        }
        put("clip_norm", c.clip_norm.map(|x| x.to_string()).unwrap_or_else(|| "none".into()));
        put("seed", c.seed.to_string());
        put("batch", self.batch.to_string());
        put("step", self.step.to_string());
        put("epoch", self.cursor.epoch.to_string());
        put("batch_in_epoch", self.cursor.batch.to_string());
        m
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let n = self.config.model.param_count();
        if self.params.len() != n || self.state.iter().any(|s| s.len() != n) {
            return Err(Error::shape("Checkpoint::to_bytes", "parameters or optimizer state do not match the model"));
        }
        let mut views = Vec::new();
        for (name, shape, range) in tensor_names(&self.config.model, "") {
            views.push((name, shape, bytemuck::cast_slice::<f32, u8>(&self.params[range])));
        }
        for (slot, data) in self.config.optimizer.slots().iter().zip(&self.state) {
            for (name, shape, range) in tensor_names(&self.config.model, &format!("optimizer.{slot}.")) {
                views.push((name, shape, bytemuck::cast_slice::<f32, u8>(&data[range])));
            }
        }
        let tensors: Vec<(String, TensorView<'_>)> = views
            .into_iter()
            .map(|(n, s, d)| Ok((n, TensorView::new(Dtype::F32, s, d).map_err(|e| Error::Invalid(e.to_string()))?)))
            .collect::<Result<_>>()?;
        safetensors::serialize(tensors, Some(self.metadata())).map_err(|e| Error::Invalid(format!("serializing: {e}")))
    }

    /// Writes the checkpoint to `path` (through a temporary file and a rename, so a crash
    /// never leaves a half-written checkpoint in its place).
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes()?;
        let tmp = path.with_extension("safetensors.tmp");
        let io = |source| Error::Io { path: path.display().to_string(), source };
        std::fs::write(&tmp, bytes).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(|source| Error::Io { path: path.display().to_string(), source })
    }

    /// Reads and checks a checkpoint.
    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io { path: path.display().to_string(), source })?;
        Self::from_bytes(&path.display().to_string(), &bytes)
    }

    /// Parses and checks a checkpoint's bytes (`name` for messages).
    pub fn from_bytes(name: &str, bytes: &[u8]) -> Result<Self> {
        let err = |reason: String| Error::Checkpoint { path: name.to_string(), reason };
        let (_, meta) = SafeTensors::read_metadata(bytes)
            .map_err(|e| err(format!("not a readable safetensors file ({e}); it may be truncated or corrupt")))?;
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| err(format!("not a readable safetensors file ({e}); it may be truncated or corrupt")))?;
        let md = meta.metadata().clone().unwrap_or_default();
        let get = |k: &str| {
            md.get(k).cloned().ok_or_else(|| err(format!("metadata `{k}` is missing; was it written by tessera?")))
        };
        let num = |k: &str| -> Result<f64> {
            get(k)?.parse::<f64>().map_err(|_| err(format!("metadata `{k}` = `{}` is not a number", md[k])))
        };
        let format = get("format")?;
        if format != FORMAT {
            return Err(err(format!("format `{format}` is not {FORMAT}")));
        }
        let meta_err = |k: &str, e: Error| err(format!("metadata `{k}`: {e}"));
        let widths = MlpConfig::parse_widths(&get("widths")?).map_err(|e| meta_err("widths", e))?;
        let act: Activation = get("activation")?.parse().map_err(|e| meta_err("activation", e))?;
        let model = MlpConfig::new(widths, act).map_err(|e| meta_err("widths", e))?;
        let optimizer = match get("optimizer")?.as_str() {
            "sgd" => OptimizerConfig::Sgd(Sgd {
                lr: num("lr")? as f32,
                momentum: num("momentum")? as f32,
                weight_decay: num("weight_decay")? as f32,
            }),
            "adamw" => OptimizerConfig::AdamW(AdamW {
                lr: num("lr")? as f32,
                beta1: num("beta1")? as f32,
                beta2: num("beta2")? as f32,
                eps: num("eps")? as f32,
                weight_decay: num("weight_decay")? as f32,
            }),
            other => return Err(err(format!("unknown optimizer `{other}`"))),
        };
        let schedule = match get("schedule")?.as_str() {
            "constant" => LrSchedule::Constant,
            "cosine" => LrSchedule::Cosine {
                warmup: num("warmup")? as u64,
                total: num("total_steps")? as u64,
                min_factor: num("min_factor")? as f32,
            },
            other => return Err(err(format!("unknown schedule `{other}`"))),
        };
        let clip_norm = match get("clip_norm")?.as_str() {
            "none" => None,
            _ => Some(num("clip_norm")? as f32),
        };
        let config = TrainConfig { model, optimizer, schedule, clip_norm, seed: num("seed")? as u64 };

        let n = config.model.param_count();
        let mut expected: Vec<String> = Vec::new();
        let mut read = |prefix: &str| -> Result<Vec<f32>> {
            let mut flat = vec![0f32; n];
            for (tname, shape, range) in tensor_names(&config.model, prefix) {
                let t = st.tensor(&tname).map_err(|_| {
                    err(format!(
                        "tensor `{tname}` is missing: the file does not hold a {} model",
                        config.model.widths_string()
                    ))
                })?;
                if t.dtype() != Dtype::F32 || t.shape() != shape.as_slice() {
                    return Err(err(format!(
                        "tensor `{tname}` is {:?} {:?}, expected F32 {:?}",
                        t.dtype(),
                        t.shape(),
                        shape
                    )));
                }
                // Copy byte-wise: the file's data need not be 4-byte aligned.
                for (dst, src) in flat[range].iter_mut().zip(t.data().chunks_exact(4)) {
                    *dst = f32::from_le_bytes(src.try_into().unwrap());
                }
                expected.push(tname);
            }
            Ok(flat)
        };
        let params = read("")?;
        let state = config
            .optimizer
            .slots()
            .iter()
            .map(|slot| read(&format!("optimizer.{slot}.")))
            .collect::<Result<Vec<_>>>()?;
        if let Some(extra) = st.names().into_iter().find(|n| !expected.iter().any(|e| e == n)) {
            return Err(err(format!("unexpected tensor `{extra}` for a {} model", config.model.widths_string())));
        }
        if params.iter().any(|v| !v.is_finite()) {
            return Err(err("parameters hold NaN or infinity; the run that wrote it had diverged".into()));
        }
        Ok(Checkpoint {
            config,
            batch: num("batch")? as usize,
            step: num("step")? as u64,
            cursor: Cursor { epoch: num("epoch")? as u64, batch: num("batch_in_epoch")? as u64 },
            params,
            state,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        let model = MlpConfig::new(vec![3, 4, 2], Activation::Silu).unwrap();
        let n = model.param_count();
        Checkpoint {
            config: TrainConfig {
                model,
                optimizer: OptimizerConfig::AdamW(AdamW::default()),
                schedule: LrSchedule::Cosine { warmup: 3, total: 50, min_factor: 0.05 },
                clip_norm: Some(1.5),
                seed: 42,
            },
            batch: 16,
            step: 7,
            cursor: Cursor { epoch: 1, batch: 2 },
            params: (0..n).map(|i| i as f32 * 0.25 - 1.0).collect(),
            state: vec![vec![0.5; n], vec![1e-7; n]],
        }
    }

    #[test]
    fn round_trips_exactly() {
        let c = sample();
        let back = Checkpoint::from_bytes("x", &c.to_bytes().unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn corrupt_and_foreign_files_are_refused_with_reasons() {
        let bytes = sample().to_bytes().unwrap();
        let e = Checkpoint::from_bytes("x", &bytes[..bytes.len() - 10]).unwrap_err().to_string();
        assert!(e.contains("truncated or corrupt"), "{e}");
        let e = Checkpoint::from_bytes("x", b"hello world, not a checkpoint").unwrap_err().to_string();
        assert!(e.starts_with("checkpoint x: not a readable safetensors file"), "{e}");
        // A file from another tool: valid safetensors without tessera's metadata.
        let t = TensorView::new(Dtype::F32, vec![1], &[0u8; 4]).unwrap();
        let foreign = safetensors::serialize(vec![("w".to_string(), t)], None).unwrap();
        let e = Checkpoint::from_bytes("x", &foreign).unwrap_err().to_string();
        assert!(e.contains("metadata `format` is missing"), "{e}");
        // Metadata that tessera cannot read names the file and the key.
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let at = text.find("\"activation\":\"").expect("activation in the header") + "\"activation\":\"".len();
        let mut edited = bytes.clone();
        edited[at..at + 4].copy_from_slice(b"tanh"); // same length: the header stays valid
        let e = Checkpoint::from_bytes("x", &edited).unwrap_err().to_string();
        assert!(e.starts_with("checkpoint x: metadata `activation`:") && e.contains("tanh"), "{e}");
    }
}
