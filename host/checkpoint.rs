//! Checkpoints in safetensors, readable by other tools: parameters by the names the model gives
//! them ([`crate::nn::ModelInfo::params`]: `layers.{i}.weight`, a shared parameter's own name),
//! optimizer state (`optimizer.{slot}.layers.{i}.weight`, ...), and in the metadata the model's
//! name and parameter order, the optimizer and schedule, the step and the data cursor, so a
//! resumed run continues exactly as the uninterrupted one would, on any plan. Loading checks
//! every name and shape and says what is wrong; [`Checkpoint::check_model`] checks the file
//! against the model it is to be loaded into.
//!
//! What a load trusts is checked: a CRC-32 of every tensor (name, shape and bytes) in the
//! metadata, verified before anything is used; parameters and optimizer state finite, AdamW's
//! second moments not negative; every metadata number parsed exactly as its type (a seed above
//! 2^53 survives; a negative, fractional or absurd count is refused); and the data the run was
//! trained on (its name and a CRC-32 of its contents), so a resume on other data is refused.
//! Saving writes a uniquely named temporary file created exclusively beside the target,
//! fsyncs it, renames it over the target and fsyncs the directory: two runs saving to one path
//! never mix their files, a failed save leaves nothing behind, and a device node, FIFO or
//! directory is never replaced. The same checkpoint always gives the same bytes (metadata keys
//! in a fixed order).

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

use crate::error::{Error, Result};
use crate::nn::{MlpConfig, ModelInfo};
use crate::ops::activation::Activation;
use crate::ops::optim::{AdamW, Sgd};
use crate::train::{Cursor, LrSchedule, OptimizerConfig, TrainConfig};

/// The `format` metadata value of this layout.
pub const FORMAT: &str = "tessera/3";

/// The format before models were generic: an MLP's widths and activation in the metadata.
/// Still read.
const FORMAT_MLP: &str = "tessera-mlp/2";

/// The largest batch a checkpoint may record (the kernels index rows with 32-bit integers).
pub const MAX_BATCH: usize = i32::MAX as usize;

/// The data a run was trained on: a name for people and a CRC-32 of its contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataId {
    /// `mnist-10k (vendored)`, or the `--data` directory as given.
    pub name: String,
    /// CRC-32 of the training and test sets' features and labels.
    pub crc32: u32,
}

impl DataId {
    /// The identity of a run's data: `name` and a CRC-32 over both sets' shapes, features and
    /// labels.
    pub fn of(name: &str, train: &crate::data::Dataset, test: &crate::data::Dataset) -> DataId {
        let mut h = crc32fast::Hasher::new();
        for d in [train, test] {
            h.update(&(d.dim as u64).to_le_bytes());
            h.update(&(d.len() as u64).to_le_bytes());
            h.update(bytemuck::cast_slice(&d.x));
            h.update(bytemuck::cast_slice(&d.y));
        }
        DataId { name: name.to_string(), crc32: h.finalize() }
    }
}

impl DataId {
    /// The identity of a text corpus: its name and a CRC-32 over its vocabulary and both
    /// splits' token ids.
    pub fn of_text(text: &crate::data::TextCorpus) -> DataId {
        let mut h = crc32fast::Hasher::new();
        let vocab: String = text.vocab.iter().collect();
        h.update(&(vocab.len() as u64).to_le_bytes());
        h.update(vocab.as_bytes());
        for ids in [&text.train, &text.val] {
            h.update(&(ids.len() as u64).to_le_bytes());
            h.update(bytemuck::cast_slice(ids));
        }
        DataId { name: text.name.clone(), crc32: h.finalize() }
    }
}

impl std::fmt::Display for DataId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (contents crc32 {:08x})", self.name, self.crc32)
    }
}

/// Everything needed to resume a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// The model's name ([`ModelInfo::name`]), e.g. `MLP 784-512-512-10 (relu)`.
    pub model: String,
    /// The model's parameters in order: names and shapes ([`Checkpoint::tensors_of`]).
    pub tensors: Vec<(String, Vec<usize>)>,
    /// How the run trains.
    pub config: TrainConfig,
    /// Batch size of the run.
    pub batch: usize,
    /// Steps taken.
    pub step: u64,
    /// The next batch of the epoch loop.
    pub cursor: Cursor,
    /// Flat parameters, the tensors of `tensors` one after the other.
    pub params: Vec<f32>,
    /// Optimizer state, one flat vector per slot of [`OptimizerConfig::slots`].
    pub state: Vec<Vec<f32>>,
    /// The data the run was trained on.
    pub data: DataId,
    /// A character-level text model's vocabulary: the characters its token ids stand for, in id
    /// order (metadata `vocab`), so that a sampler can encode a prompt and decode what it
    /// writes; `None` for other models.
    pub vocab: Option<String>,
}

/// CRC-32 over every tensor's name, shape and little-endian bytes, in name order.
fn tensors_crc32<'a>(tensors: impl IntoIterator<Item = (&'a str, &'a [usize], &'a [u8])>) -> u32 {
    let mut sorted: Vec<_> = tensors.into_iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut h = crc32fast::Hasher::new();
    for (name, shape, data) in sorted {
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(&(shape.len() as u64).to_le_bytes());
        for d in shape {
            h.update(&(*d as u64).to_le_bytes());
        }
        h.update(&(data.len() as u64).to_le_bytes());
        h.update(data);
    }
    h.finalize()
}

/// Rewrites a safetensors file's JSON header with its keys sorted (serde_json's map is
/// ordered), so that the same checkpoint always gives the same bytes; the header stays padded
/// to 8 bytes as safetensors writes it.
fn canonical_header(bytes: Vec<u8>) -> Result<Vec<u8>> {
    let bad = |what: &str| Error::Invalid(format!("serializing: {what}"));
    let n = u64::from_le_bytes(bytes.get(..8).ok_or_else(|| bad("no header"))?.try_into().unwrap()) as usize;
    let header = bytes.get(8..8 + n).ok_or_else(|| bad("short header"))?;
    let value: serde_json::Value = serde_json::from_slice(header).map_err(|e| bad(&e.to_string()))?;
    let mut text = serde_json::to_vec(&value).map_err(|e| bad(&e.to_string()))?;
    while text.len() % 8 != 0 {
        text.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + text.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    Ok(out)
}

/// Temporary names are unique per process and call, so concurrent saves never share one.
static SAVE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path` atomically and durably: a new, uniquely named file created
/// exclusively in the same directory, written, fsynced, renamed over `path`, and the directory
/// fsynced. On any failure the temporary file is removed. An existing `path` that is not a
/// regular file (a device, a FIFO, a directory) is refused; a symbolic link is followed, so the
/// file it points to is replaced and the link kept.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| Error::Io { path: path.display().to_string(), source };
    let mut target = PathBuf::from(path);
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_symlink() {
            target = std::fs::canonicalize(path).map_err(io)?;
        }
        let meta = std::fs::metadata(&target).map_err(io)?;
        if !meta.is_file() {
            return Err(Error::Invalid(format!(
                "{} exists and is not a regular file ({}); give the path of a file to write",
                path.display(),
                file_kind(&meta)
            )));
        }
    }
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let base = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "checkpoint".into());
    let nonce = SAVE_COUNTER.fetch_add(1, Ordering::Relaxed);
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let tmp = dir.join(format!(".{base}.{}.{nonce}.{stamp:x}.tmp", std::process::id()));
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp).map_err(io)?;
    let written = file.write_all(bytes).and_then(|_| file.sync_all());
    drop(file);
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    if let Err(e) = std::fs::rename(&tmp, &target) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    // The rename is durable once the directory is synced.
    std::fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(io)
}

/// What kind of file `meta` describes, for messages.
pub fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

impl Checkpoint {
    /// The parameter names and shapes of a model, in order: what [`Checkpoint::tensors`] holds.
    pub fn tensors_of(info: &ModelInfo) -> Vec<(String, Vec<usize>)> {
        info.params.iter().map(|p| (p.name.clone(), p.shape.clone())).collect()
    }

    /// An error unless the checkpoint holds `info`'s parameters: the same names with the same
    /// shapes in the same order. It says which name or shape differs.
    pub fn check_model(&self, info: &ModelInfo) -> Result<()> {
        let want = Self::tensors_of(info);
        let err =
            |why: String| Error::Invalid(format!("the checkpoint holds `{}`, not `{}`: {why}", self.model, info.name));
        for (i, (w, g)) in want.iter().zip(&self.tensors).enumerate() {
            if w.0 != g.0 {
                return Err(err(format!("parameter {i} is `{}` in the file, `{}` in the model", g.0, w.0)));
            }
            if w.1 != g.1 {
                return Err(err(format!("`{}` is {:?} in the file, {:?} in the model", w.0, g.1, w.1)));
            }
        }
        if want.len() != self.tensors.len() {
            return Err(err(format!("{} parameters in the file, {} in the model", self.tensors.len(), want.len())));
        }
        Ok(())
    }

    /// The checks before a run resumes from this checkpoint, each an error that says what to
    /// do: the model is the one that wrote it ([`Checkpoint::check_model`]), the data is the
    /// data it was trained on, and its place in the epoch exists in the epochs of this data
    /// (`batches_per_epoch` batches of its batch size).
    pub fn check_resume(&self, info: &ModelInfo, data: &DataId, batches_per_epoch: u64) -> Result<()> {
        self.check_model(info)?;
        if self.data.crc32 != data.crc32 {
            return Err(Error::Invalid(format!(
                "it was trained on {}, and this run's data is {}: resume on the same data, or start a new run",
                self.data, data
            )));
        }
        if self.cursor.batch > batches_per_epoch {
            return Err(Error::Invalid(format!(
                "it is at batch {} of an epoch, but batch {} over this data gives {batches_per_epoch} batches an epoch",
                self.cursor.batch, self.batch
            )));
        }
        Ok(())
    }

    /// Each tensor's range in the flat vectors.
    fn ranges(&self) -> Vec<std::ops::Range<usize>> {
        let mut off = 0;
        self.tensors
            .iter()
            .map(|(_, shape)| {
                let n: usize = shape.iter().product();
                off += n;
                off - n..off
            })
            .collect()
    }

    fn metadata(&self) -> HashMap<String, String> {
        let c = &self.config;
        let mut m = HashMap::new();
        let mut put = |k: &str, v: String| {
            m.insert(k.to_string(), v);
        };
        put("format", FORMAT.into());
        put("model", self.model.clone());
        put("params", self.tensors.iter().map(|t| t.0.as_str()).collect::<Vec<_>>().join(","));
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
        put("data", self.data.name.clone());
        put("data_crc32", format!("{:08x}", self.data.crc32));
        if let Some(v) = &self.vocab {
            put("vocab", v.clone());
        }
        m
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let ranges = self.ranges();
        let n = ranges.last().map_or(0, |r| r.end);
        if self.params.len() != n || self.state.iter().any(|s| s.len() != n) {
            return Err(Error::shape("Checkpoint::to_bytes", "parameters or optimizer state do not match the model"));
        }
        if self.tensors.iter().any(|t| t.0.is_empty() || t.0.contains(',')) {
            return Err(Error::Invalid(
                "a parameter name is empty or holds a comma; checkpoints cannot list it".into(),
            ));
        }
        if let Some(v) = &self.vocab {
            check_vocab(v).map_err(Error::Invalid)?;
        }
        let mut views = Vec::new();
        for ((name, shape), range) in self.tensors.iter().zip(&ranges) {
            views.push((name.clone(), shape.clone(), bytemuck::cast_slice::<f32, u8>(&self.params[range.clone()])));
        }
        for (slot, data) in self.config.optimizer.slots().iter().zip(&self.state) {
            for ((name, shape), range) in self.tensors.iter().zip(&ranges) {
                let bytes = bytemuck::cast_slice::<f32, u8>(&data[range.clone()]);
                views.push((format!("optimizer.{slot}.{name}"), shape.clone(), bytes));
            }
        }
        let crc = tensors_crc32(views.iter().map(|(n, s, d)| (n.as_str(), s.as_slice(), *d)));
        let mut meta = self.metadata();
        meta.insert("checksum".into(), format!("crc32:{crc:08x}"));
        let tensors: Vec<(String, TensorView<'_>)> = views
            .into_iter()
            .map(|(n, s, d)| Ok((n, TensorView::new(Dtype::F32, s, d).map_err(|e| Error::Invalid(e.to_string()))?)))
            .collect::<Result<_>>()?;
        let bytes =
            safetensors::serialize(tensors, Some(meta)).map_err(|e| Error::Invalid(format!("serializing: {e}")))?;
        canonical_header(bytes)
    }

    /// Writes the checkpoint to `path` with [`write_atomically`]: a crash never leaves a
    /// half-written checkpoint in its place, concurrent saves never mix, and a path that is not
    /// a regular file is refused.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes()?;
        write_atomically(path, &bytes)
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
        let format = get("format")?;
        if format != FORMAT && format != FORMAT_MLP {
            let hint = if format == "tessera-mlp/1" {
                ": it was written by an earlier tessera, whose checkpoints carry no checksum; retrain, or load its \
                 tensors with any safetensors reader"
            } else {
                ""
            };
            return Err(err(format!("format `{format}` is not {FORMAT}{hint}")));
        }
        // The checksum first: nothing in a file whose tensors changed is used.
        let want = get("checksum")?;
        let crc = tensors_crc32(st.tensors().iter().map(|(n, t)| (n.as_str(), t.shape(), t.data())));
        if want != format!("crc32:{crc:08x}") {
            return Err(err(format!(
                "its tensors do not match their checksum (metadata `checksum` = `{want}`, the tensors give \
                 crc32:{crc:08x}): the file is corrupt or was edited"
            )));
        }
        // Every number parsed exactly as its type: an integer never goes through f64.
        let int = |k: &str| -> Result<u64> {
            let v = get(k)?;
            v.parse::<u64>().map_err(|_| err(format!("metadata `{k}` = `{v}` is not a whole number (0 or more)")))
        };
        let real = |k: &str, ok: &dyn Fn(f32) -> bool, what: &str| -> Result<f32> {
            let v = get(k)?;
            match v.parse::<f32>() {
                Ok(x) if x.is_finite() && ok(x) => Ok(x),
                _ => Err(err(format!("metadata `{k}` = `{v}` is not {what}"))),
            }
        };
        let positive = |x: f32| x > 0.0;
        let non_negative = |x: f32| x >= 0.0;
        let fraction = |x: f32| (0.0..1.0).contains(&x);
        let meta_err = |k: &str, e: Error| err(format!("metadata `{k}`: {e}"));
        // The model and its parameters' order: listed, or (in the MLP format) from its widths.
        let (model, names): (String, Vec<String>) = if format == FORMAT_MLP {
            let widths = MlpConfig::parse_widths(&get("widths")?).map_err(|e| meta_err("widths", e))?;
            let act: Activation = get("activation")?.parse().map_err(|e| meta_err("activation", e))?;
            let mlp = MlpConfig::new(widths, act).map_err(|e| meta_err("widths", e))?;
            let names =
                (0..mlp.depth()).flat_map(|i| [format!("layers.{i}.weight"), format!("layers.{i}.bias")]).collect();
            (mlp.describe(), names)
        } else {
            let list = get("params")?;
            (get("model")?, list.split(',').filter(|n| !n.is_empty()).map(str::to_string).collect())
        };
        let optimizer = match get("optimizer")?.as_str() {
            "sgd" => OptimizerConfig::Sgd(Sgd {
                lr: real("lr", &positive, "a positive number")?,
                momentum: real("momentum", &fraction, "a momentum in [0, 1)")?,
                weight_decay: real("weight_decay", &non_negative, "a weight decay of 0 or more")?,
            }),
            "adamw" => OptimizerConfig::AdamW(AdamW {
                lr: real("lr", &positive, "a positive number")?,
                beta1: real("beta1", &fraction, "a beta in [0, 1)")?,
                beta2: real("beta2", &fraction, "a beta in [0, 1)")?,
                eps: real("eps", &positive, "a positive epsilon")?,
                weight_decay: real("weight_decay", &non_negative, "a weight decay of 0 or more")?,
            }),
            other => return Err(err(format!("unknown optimizer `{other}`"))),
        };
        let schedule = match get("schedule")?.as_str() {
            "constant" => LrSchedule::Constant,
            "cosine" => {
                let (warmup, total) = (int("warmup")?, int("total_steps")?);
                if total == 0 || warmup > total {
                    return Err(err(format!(
                        "metadata: a cosine schedule of {total} steps with {warmup} warm-up steps is not a schedule"
                    )));
                }
                LrSchedule::Cosine {
                    warmup,
                    total,
                    min_factor: real("min_factor", &|x| (0.0..=1.0).contains(&x), "a factor in [0, 1]")?,
                }
            }
            other => return Err(err(format!("unknown schedule `{other}`"))),
        };
        let clip_norm = match get("clip_norm")?.as_str() {
            "none" => None,
            _ => Some(real("clip_norm", &positive, "a positive norm")?),
        };
        let config = TrainConfig { optimizer, schedule, clip_norm, seed: int("seed")? };
        let batch = int("batch")?;
        if batch == 0 || batch > MAX_BATCH as u64 {
            return Err(err(format!("metadata `batch` = {batch} is not a batch size (1 to {MAX_BATCH})")));
        }
        let step = int("step")?;
        if let LrSchedule::Cosine { total, .. } = config.schedule {
            if step > total {
                return Err(err(format!("metadata `step` = {step} is past the end of its cosine schedule ({total})")));
            }
        }
        let cursor = Cursor { epoch: int("epoch")?, batch: int("batch_in_epoch")? };
        let data_crc = get("data_crc32")?;
        let data = DataId {
            name: get("data")?,
            crc32: u32::from_str_radix(&data_crc, 16)
                .ok()
                .filter(|_| data_crc.len() == 8)
                .ok_or_else(|| err(format!("metadata `data_crc32` = `{data_crc}` is not 8 hex digits")))?,
        };

        let mut tensors = Vec::with_capacity(names.len());
        for name in &names {
            let t = st.tensor(name).map_err(|_| {
                err(format!("tensor `{name}` is missing: the metadata lists it among the parameters of `{model}`"))
            })?;
            if t.dtype() != Dtype::F32 {
                return Err(err(format!("tensor `{name}` is {:?}, expected F32", t.dtype())));
            }
            if tensors.iter().any(|(n, _): &(String, Vec<usize>)| n == name) {
                return Err(err(format!("the metadata lists parameter `{name}` twice")));
            }
            tensors.push((name.clone(), t.shape().to_vec()));
        }
        let mut expected: Vec<String> = Vec::new();
        let mut read = |prefix: &str| -> Result<Vec<f32>> {
            let mut flat = Vec::new();
            for (name, shape) in &tensors {
                let tname = format!("{prefix}{name}");
                let t = st.tensor(&tname).map_err(|_| {
                    err(format!("tensor `{tname}` is missing: the file holds parameter `{name}` without it"))
                })?;
                if t.dtype() != Dtype::F32 || t.shape() != shape.as_slice() {
                    return Err(err(format!(
                        "tensor `{tname}` is {:?} {:?}, expected F32 {:?} like `{name}`",
                        t.dtype(),
                        t.shape(),
                        shape
                    )));
                }
                // Copy byte-wise: the file's data need not be 4-byte aligned.
                flat.extend(t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())));
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
            return Err(err(format!("unexpected tensor `{extra}`: it is not among the parameters of `{model}`")));
        }
        if params.iter().any(|v| !v.is_finite()) {
            return Err(err("parameters hold NaN or infinity; the run that wrote it had diverged".into()));
        }
        for (slot, values) in config.optimizer.slots().iter().zip(&state) {
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                return Err(err(format!(
                    "optimizer state `{slot}` holds {} (element {i}); the run that wrote it had diverged, or the \
                     file was edited",
                    values[i]
                )));
            }
            if *slot == "exp_avg_sq" {
                if let Some(i) = values.iter().position(|v| *v < 0.0) {
                    return Err(err(format!(
                        "optimizer state `exp_avg_sq` holds the negative second moment {} (element {i}); a mean of \
                         squares cannot be negative, so the file was edited or corrupted",
                        values[i]
                    )));
                }
            }
        }
        let vocab = match md.get("vocab") {
            Some(v) => Some(check_vocab(v).map(|_| v.clone()).map_err(|why| err(format!("metadata `vocab`: {why}")))?),
            None => None,
        };
        Ok(Checkpoint { model, tensors, config, batch: batch as usize, step, cursor, params, state, data, vocab })
    }
}

/// A vocabulary holds at least one character and none twice.
fn check_vocab(v: &str) -> std::result::Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    if v.is_empty() {
        return Err("a vocabulary of no characters".into());
    }
    match v.chars().find(|c| !seen.insert(*c)) {
        Some(c) => Err(format!("the character {c:?} is listed twice, so two token ids would stand for it")),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        let model = MlpConfig::new(vec![3, 4, 2], Activation::Silu).unwrap();
        let n = model.param_count();
        let info = model.info();
        Checkpoint {
            model: info.name.clone(),
            tensors: Checkpoint::tensors_of(&info),
            config: TrainConfig {
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
            data: DataId { name: "mnist-10k (vendored)".into(), crc32: 0x1234_abcd },
            vocab: None,
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
        let pat = b"\"optimizer\":\"";
        let at = bytes.windows(pat.len()).position(|w| w == pat).expect("optimizer in the header") + pat.len();
        let mut edited = bytes.clone();
        edited[at..at + 5].copy_from_slice(b"adamx"); // same length: the header stays valid
        let e = Checkpoint::from_bytes("x", &edited).unwrap_err().to_string();
        assert!(e.starts_with("checkpoint x: unknown optimizer `adamx`"), "{e}");
    }

    /// `bytes` with metadata `key` set to `value` (the header rewritten; tensors untouched).
    fn with_meta(bytes: &[u8], key: &str, value: &str) -> Vec<u8> {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let mut h: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
        h["__metadata__"][key] = serde_json::Value::String(value.to_string());
        let mut text = serde_json::to_vec(&h).unwrap();
        while text.len() % 8 != 0 {
            text.push(b' ');
        }
        let mut out = (text.len() as u64).to_le_bytes().to_vec();
        out.extend(text);
        out.extend_from_slice(&bytes[8 + n..]);
        out
    }

    #[test]
    fn the_same_checkpoint_gives_the_same_bytes() {
        let a = sample().to_bytes().unwrap();
        for _ in 0..5 {
            assert_eq!(sample().to_bytes().unwrap(), a, "metadata order changed between two serializations");
        }
    }

    #[test]
    fn optimizer_state_is_checked_like_weights() {
        let mut c = sample();
        c.state[0][3] = f32::NAN;
        let e = Checkpoint::from_bytes("x", &c.to_bytes().unwrap()).unwrap_err().to_string();
        assert!(e.contains("optimizer state `exp_avg` holds NaN"), "{e}");
        let mut c = sample();
        c.state[1][0] = -1e-3;
        let e = Checkpoint::from_bytes("x", &c.to_bytes().unwrap()).unwrap_err().to_string();
        assert!(e.contains("negative second moment"), "{e}");
        let mut c = sample();
        c.state[1][5] = f32::INFINITY;
        assert!(Checkpoint::from_bytes("x", &c.to_bytes().unwrap()).is_err());
    }

    #[test]
    fn metadata_numbers_are_parsed_exactly() {
        // A seed above 2^53 survives (f64 would round it).
        let mut c = sample();
        c.config.seed = (1u64 << 53) + 1;
        let back = Checkpoint::from_bytes("x", &c.to_bytes().unwrap()).unwrap();
        assert_eq!(back.config.seed, (1u64 << 53) + 1);
        c.config.seed = u64::MAX;
        assert_eq!(Checkpoint::from_bytes("x", &c.to_bytes().unwrap()).unwrap().config.seed, u64::MAX);
        let bytes = sample().to_bytes().unwrap();
        for (key, value, says) in [
            ("step", "-3", "not a whole number"),
            ("step", "2.5", "not a whole number"),
            ("step", "1e3", "not a whole number"),
            ("epoch", "NaN", "not a whole number"),
            ("seed", "18446744073709551616", "not a whole number"),
            ("batch", "0", "not a batch size"),
            ("batch", "99999999999999", "not a batch size"),
            ("lr", "NaN", "not a positive number"),
            ("lr", "-1", "not a positive number"),
            ("beta2", "1.5", "not a beta"),
            ("step", "51", "past the end of its cosine schedule"),
            ("warmup", "60", "is not a schedule"),
            ("data_crc32", "xyz", "not 8 hex digits"),
            // The parameter list names what the file does not hold, or leaves out what it does.
            ("params", "layers.0.weight,layers.9.bias", "tensor `layers.9.bias` is missing"),
            ("params", "layers.0.weight,layers.0.weight", "lists parameter `layers.0.weight` twice"),
            ("params", "layers.0.weight", "unexpected tensor"),
        ] {
            let e = Checkpoint::from_bytes("x", &with_meta(&bytes, key, value)).unwrap_err().to_string();
            assert!(e.contains(says), "{key} = {value}: {e}");
        }
        let e = Checkpoint::from_bytes("x", &with_meta(&bytes, "format", "tessera-mlp/1")).unwrap_err().to_string();
        assert!(e.contains("earlier tessera"), "{e}");
    }

    /// A checkpoint of the MLP format (`tessera-mlp/2`, widths and activation in the metadata)
    /// still loads, as the same checkpoint.
    #[test]
    fn the_mlp_format_still_loads() {
        let c = sample();
        let old = with_meta(&with_meta(&c.to_bytes().unwrap(), "format", FORMAT_MLP), "widths", "3,4,2");
        let old = with_meta(&old, "activation", "silu");
        assert_eq!(Checkpoint::from_bytes("x", &old).unwrap(), c);
    }

    /// A checkpoint loads only into the model that wrote it: the name or shape that differs is
    /// named.
    #[test]
    fn a_checkpoint_is_checked_against_its_model() {
        let c = sample();
        c.check_model(&MlpConfig::new(vec![3, 4, 2], Activation::Relu).unwrap().info()).unwrap();
        let e = c.check_model(&MlpConfig::new(vec![3, 5, 2], Activation::Silu).unwrap().info()).unwrap_err();
        assert!(e.to_string().contains("`layers.0.weight` is [3, 4] in the file, [3, 5] in the model"), "{e}");
        let e = c.check_model(&MlpConfig::new(vec![3, 4, 4, 2], Activation::Silu).unwrap().info()).unwrap_err();
        assert!(e.to_string().contains("`layers.1.weight` is [4, 2] in the file, [4, 4] in the model"), "{e}");
        let e = c.check_model(&MlpConfig::new(vec![3, 2], Activation::Silu).unwrap().info()).unwrap_err();
        assert!(e.to_string().contains("parameter 0 is `layers.0.weight`") || e.to_string().contains("[3, 2]"), "{e}");
    }

    #[test]
    fn a_flipped_byte_anywhere_in_the_tensors_is_refused() {
        let bytes = sample().to_bytes().unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        for at in [8 + n, 8 + n + 17, bytes.len() - 1] {
            let mut b = bytes.clone();
            b[at] ^= 0x01;
            let e = Checkpoint::from_bytes("x", &b).unwrap_err().to_string();
            assert!(e.contains("do not match their checksum"), "byte {at}: {e}");
        }
    }

    /// Concurrent saves to one path, and to sibling paths (`run.a`, `run.b`, which once shared a
    /// temporary name), never mix: each file holds exactly one writer's checkpoint, and no
    /// temporary file is left.
    #[test]
    fn concurrent_saves_never_mix() {
        let dir = std::env::temp_dir().join(format!("tessera-concurrent-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mk = |v: f32| {
            let mut c = sample();
            c.params.iter_mut().for_each(|p| *p = v);
            c
        };
        let (ca, cb) = (mk(1.0), mk(2.0));
        std::thread::scope(|sc| {
            for (c, own) in [(&ca, "run.a"), (&cb, "run.b")] {
                let dir = &dir;
                sc.spawn(move || {
                    for _ in 0..40 {
                        c.save(&dir.join(own)).unwrap();
                        c.save(&dir.join("run.same")).unwrap();
                    }
                });
            }
        });
        assert_eq!(Checkpoint::load(&dir.join("run.a")).unwrap(), ca);
        assert_eq!(Checkpoint::load(&dir.join("run.b")).unwrap(), cb);
        let same = Checkpoint::load(&dir.join("run.same")).unwrap();
        assert!(same == ca || same == cb);
        let names: Vec<String> =
            std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(names.len(), 3, "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
