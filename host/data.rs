//! Data: the IDX format MNIST ships in (gzip or raw), the 10,000 vendored digits embedded in
//! the binary (so the default job needs no download), a seeded per-epoch shuffle and batching,
//! and a synthetic generator (a random teacher network) for any widths.

use std::io::Read;
use std::path::Path;

use crate::error::{Error, Result};
use crate::rng::Rng;

/// A labelled classification data set held in host memory: `len` rows of `dim` features.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Row-major features, `len * dim`.
    pub x: Vec<f32>,
    /// One class label per row, in `0..classes`.
    pub y: Vec<i32>,
    /// Features per row.
    pub dim: usize,
    /// Number of classes.
    pub classes: usize,
}

const MNIST_IMAGES: &[u8] = include_bytes!("../data/mnist-10k/images-idx3-ubyte.gz");
const MNIST_LABELS: &[u8] = include_bytes!("../data/mnist-10k/labels-idx1-ubyte.gz");

fn bad(path: &str, what: impl Into<String>) -> Error {
    Error::Data { path: path.to_string(), reason: what.into() }
}

/// Parses an IDX file, raw or gzip (recognised by its magic bytes; multi-member gzip, as pigz
/// and bgzip write, is read whole): returns its dimensions and the u8 payload. Only
/// unsigned-byte data (type 0x08), as MNIST uses, is accepted. The header is read first, and a
/// gzip stream is decompressed no further than the size it declares (and one byte more, to tell
/// a file that holds more than its header says), so a small file cannot expand without bound;
/// dimensions whose product overflows are refused while parsing.
pub fn parse_idx(path: &str, bytes: &[u8]) -> Result<(Vec<usize>, Vec<u8>)> {
    let gz = bytes.starts_with(&[0x1f, 0x8b]);
    let mut reader: Box<dyn Read + '_> =
        if gz { Box::new(flate2::read::MultiGzDecoder::new(bytes)) } else { Box::new(bytes) };
    let corrupt = |e: std::io::Error| bad(path, format!("corrupt gzip stream: {e}"));
    // Reads up to `n` bytes (fewer only at the end of the data).
    let take = |reader: &mut Box<dyn Read + '_>, n: usize| -> Result<Vec<u8>> {
        let mut out = Vec::new();
        reader.take(n as u64).read_to_end(&mut out).map_err(corrupt)?;
        Ok(out)
    };
    let magic = take(&mut reader, 4)?;
    if magic.len() < 4 || magic[0] != 0 || magic[1] != 0 {
        return Err(bad(path, "not an IDX file (the magic number must start with two zero bytes)"));
    }
    if magic[2] != 0x08 {
        return Err(bad(
            path,
            format!("IDX element type 0x{:02x} is not supported (only unsigned bytes, 0x08)", magic[2]),
        ));
    }
    let ndim = magic[3] as usize;
    let header = take(&mut reader, 4 * ndim)?;
    if header.len() < 4 * ndim {
        return Err(bad(path, "IDX header is truncated"));
    }
    let dims: Vec<usize> = header.chunks_exact(4).map(|c| u32::from_be_bytes(c.try_into().unwrap()) as usize).collect();
    // The payload may not exceed what a 64-bit process could address as one buffer.
    let count = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d).filter(|&c| c <= isize::MAX as usize))
        .ok_or_else(|| bad(path, format!("IDX dimensions {dims:?} describe more data than can be held")))?;
    let data = take(&mut reader, count.saturating_add(1))?;
    if data.len() > count {
        return Err(bad(
            path,
            format!("IDX dimensions {dims:?} need {count} bytes of data, the file holds more: it is not one IDX array"),
        ));
    }
    if data.len() != count {
        return Err(bad(
            path,
            format!("IDX dimensions {dims:?} need {count} bytes of data, the file has {}", data.len()),
        ));
    }
    Ok((dims, data))
}

impl Dataset {
    /// Rows.
    pub fn len(&self) -> usize {
        self.y.len()
    }
    /// Whether it has no rows.
    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    /// Builds a data set from IDX images (n x rows x cols, u8) and labels (n, u8), scaling
    /// pixels to [0, 1].
    pub fn from_idx(images_path: &str, images: &[u8], labels_path: &str, labels: &[u8]) -> Result<Self> {
        let (idims, pixels) = parse_idx(images_path, images)?;
        let (ldims, lab) = parse_idx(labels_path, labels)?;
        if idims.len() < 2 {
            return Err(bad(images_path, format!("expected images (n x rows x cols), found dimensions {idims:?}")));
        }
        if ldims.len() != 1 {
            return Err(bad(labels_path, format!("expected a list of labels, found dimensions {ldims:?}")));
        }
        if idims[0] != ldims[0] {
            return Err(bad(labels_path, format!("{} labels for {} images in {images_path}", ldims[0], idims[0])));
        }
        let dim = idims[1..].iter().product();
        if dim == 0 {
            return Err(bad(images_path, format!("images of dimensions {idims:?} have no pixels")));
        }
        // As many classes as the labels use: 0..=max.
        let classes = lab.iter().copied().max().map(|m| m as usize + 1).unwrap_or(0);
        Ok(Dataset {
            x: pixels.iter().map(|&p| p as f32 / 255.0).collect(),
            y: lab.iter().map(|&l| l as i32).collect(),
            dim,
            classes,
        })
    }

    /// The 10,000 vendored MNIST digits: the first 8,000 to train, the last 2,000 to test.
    pub fn mnist_10k() -> Result<(Dataset, Dataset)> {
        let all = Dataset::from_idx(
            "<embedded mnist-10k images>",
            MNIST_IMAGES,
            "<embedded mnist-10k labels>",
            MNIST_LABELS,
        )?;
        Ok(all.split(8000))
    }

    /// Full MNIST from a directory holding `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
    /// `t10k-images-idx3-ubyte` and `t10k-labels-idx1-ubyte` (each optionally `.gz`).
    pub fn mnist_dir(dir: &Path) -> Result<(Dataset, Dataset)> {
        let dir_name = dir.display().to_string();
        match std::fs::metadata(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(bad(&dir_name, "does not exist; --data expects a directory with the four MNIST IDX files"))
            }
            Err(e) => return Err(bad(&dir_name, format!("cannot read it: {e}"))),
            Ok(m) if !m.is_dir() => {
                return Err(bad(
                    &dir_name,
                    "is not a directory; --data expects a directory with the four MNIST IDX files",
                ))
            }
            Ok(_) => {}
        }
        // Listing it tells an unreadable directory ("cannot read") from missing files.
        std::fs::read_dir(dir).map_err(|e| bad(&dir_name, format!("cannot read it: {e}")))?;
        let read = |stem: &str| -> Result<(String, Vec<u8>)> {
            for name in [format!("{stem}.gz"), stem.to_string()] {
                let p = dir.join(&name);
                match std::fs::read(&p) {
                    Ok(bytes) => return Ok((p.display().to_string(), bytes)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(bad(&p.display().to_string(), format!("cannot read it: {e}"))),
                }
            }
            Err(bad(
                &dir_name,
                format!("neither {stem} nor {stem}.gz is there; --data expects the four MNIST IDX files"),
            ))
        };
        let load = |img: &str, lab: &str| -> Result<Dataset> {
            let (ip, ib) = read(img)?;
            let (lp, lb) = read(lab)?;
            Dataset::from_idx(&ip, &ib, &lp, &lb)
        };
        Ok((
            load("train-images-idx3-ubyte", "train-labels-idx1-ubyte")?,
            load("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")?,
        ))
    }

    /// Rows `0..at` and `at..`.
    pub fn split(&self, at: usize) -> (Dataset, Dataset) {
        let at = at.min(self.len());
        let head = Dataset {
            x: self.x[..at * self.dim].to_vec(),
            y: self.y[..at].to_vec(),
            dim: self.dim,
            classes: self.classes,
        };
        let tail = Dataset {
            x: self.x[at * self.dim..].to_vec(),
            y: self.y[at..].to_vec(),
            dim: self.dim,
            classes: self.classes,
        };
        (head, tail)
    }

    /// `n` rows of standard-normal inputs of `widths[0]` features, labelled by the argmax of a
    /// random teacher MLP (ReLU) with these widths; the last width is the class count.
    pub fn synthetic(n: usize, widths: &[usize], seed: u64) -> Result<Dataset> {
        if widths.len() < 2 || widths.contains(&0) {
            return Err(Error::Invalid(format!("synthetic data needs at least two non-zero widths, got {widths:?}")));
        }
        let mut rng = Rng::new(seed);
        let layers: Vec<(Vec<f32>, usize, usize)> = widths
            .windows(2)
            .map(|w| {
                let s = (2.0 / w[0] as f32).sqrt();
                ((0..w[0] * w[1]).map(|_| rng.normal() * s).collect(), w[0], w[1])
            })
            .collect();
        let dim = widths[0];
        let mut x = Vec::with_capacity(n * dim);
        let mut y = Vec::with_capacity(n);
        for _ in 0..n {
            let input: Vec<f32> = (0..dim).map(|_| rng.normal()).collect();
            let mut h = input.clone();
            for (li, (w, fi, fo)) in layers.iter().enumerate() {
                let mut o = vec![0f32; *fo];
                for i in 0..*fi {
                    for j in 0..*fo {
                        o[j] += h[i] * w[i * fo + j];
                    }
                }
                if li + 1 < layers.len() {
                    o.iter_mut().for_each(|v| *v = v.max(0.0));
                }
                h = o;
            }
            let label = h.iter().enumerate().fold(0, |b, (i, v)| if *v > h[b] { i } else { b });
            x.extend_from_slice(&input);
            y.push(label as i32);
        }
        Ok(Dataset { x, y, dim, classes: *widths.last().unwrap() })
    }

    /// The rows of `idx`, gathered into a batch.
    pub fn gather(&self, idx: &[usize]) -> (Vec<f32>, Vec<i32>) {
        let mut x = Vec::with_capacity(idx.len() * self.dim);
        let mut y = Vec::with_capacity(idx.len());
        for &i in idx {
            x.extend_from_slice(&self.x[i * self.dim..(i + 1) * self.dim]);
            y.push(self.y[i]);
        }
        (x, y)
    }
}

/// The order of one epoch: a seeded shuffle, the same for the same `(seed, epoch)` on every
/// machine, so a resumed run sees the batches the uninterrupted one would have.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    Rng::new(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(0xE90C)).shuffle(&mut order);
    order
}

/// Number of batches of at most `batch` rows in an epoch of `n` (the last may be short).
pub fn batches_per_epoch(n: usize, batch: usize) -> usize {
    n.div_ceil(batch.max(1))
}

/// The row indices of batch `b` of an epoch order.
pub fn batch_indices(order: &[usize], batch: usize, b: usize) -> &[usize] {
    let start = (b * batch).min(order.len());
    &order[start..(start + batch).min(order.len())]
}

/// A character-level text corpus: its vocabulary (the sorted distinct characters), and the
/// text as token ids split into a training part and a validation part (the first 90% and the
/// last 10% of the characters, the split published character-level results use).
#[derive(Debug, Clone)]
pub struct TextCorpus {
    /// Where it came from (`tinyshakespeare (vendored)` or a path).
    pub name: String,
    /// The vocabulary: token `i` is `vocab[i]`.
    pub vocab: Vec<char>,
    /// The training characters as token ids.
    pub train: Vec<u32>,
    /// The validation characters as token ids.
    pub val: Vec<u32>,
}

const TINY_SHAKESPEARE: &[u8] = include_bytes!("../data/tinyshakespeare/input.txt.gz");

impl TextCorpus {
    /// The vendored tiny Shakespeare (`data/tinyshakespeare/`: 1,115,394 characters, 65 distinct).
    pub fn tiny_shakespeare() -> Result<Self> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(TINY_SHAKESPEARE)
            .read_to_string(&mut text)
            .map_err(|e| bad("tinyshakespeare (vendored)", format!("corrupt gzip stream: {e}")))?;
        Self::from_text("tinyshakespeare (vendored)", &text)
    }

    /// A corpus from a UTF-8 text file (plain, or gzip recognised by its magic bytes).
    pub fn from_file(path: &Path) -> Result<Self> {
        let name = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| bad(&name, format!("cannot read it: {e}")))?;
        let bytes = if bytes.starts_with(&[0x1f, 0x8b]) {
            let mut out = Vec::new();
            flate2::read::MultiGzDecoder::new(&bytes[..])
                .read_to_end(&mut out)
                .map_err(|e| bad(&name, format!("corrupt gzip stream: {e}")))?;
            out
        } else {
            bytes
        };
        let text = String::from_utf8(bytes).map_err(|e| bad(&name, format!("not UTF-8 text: {e}")))?;
        Self::from_text(&name, &text)
    }

    /// A corpus of `text`: vocabulary and the 90/10 split. Refuses a text too short to hold a
    /// validation part of at least two characters.
    pub fn from_text(name: &str, text: &str) -> Result<Self> {
        let chars: Vec<char> = text.chars().collect();
        let n_val = chars.len() - chars.len() * 9 / 10;
        if n_val < 2 {
            return Err(bad(
                name,
                format!("{} characters: too short to split into training and validation text", chars.len()),
            ));
        }
        let mut vocab = chars.clone();
        vocab.sort_unstable();
        vocab.dedup();
        let index: std::collections::HashMap<char, u32> =
            vocab.iter().enumerate().map(|(i, &c)| (c, i as u32)).collect();
        let ids: Vec<u32> = chars.iter().map(|c| index[c]).collect();
        let split = chars.len() - n_val;
        Ok(TextCorpus { name: name.to_string(), vocab, train: ids[..split].to_vec(), val: ids[split..].to_vec() })
    }

    /// Token ids of `s`, or an error naming the first character outside the vocabulary.
    pub fn encode(&self, s: &str) -> Result<Vec<u32>> {
        s.chars()
            .enumerate()
            .map(|(i, c)| {
                self.vocab.binary_search(&c).map(|t| t as u32).map_err(|_| {
                    Error::Invalid(format!(
                        "character {c:?} (at {i}) is not in the vocabulary of {} ({} characters: {:?})",
                        self.name,
                        self.vocab.len(),
                        self.vocab.iter().collect::<String>()
                    ))
                })
            })
            .collect()
    }

    /// The text of token ids (ids outside the vocabulary are an error).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        ids.iter()
            .map(|&t| {
                self.vocab.get(t as usize).copied().ok_or_else(|| {
                    Error::Invalid(format!("token {t} is outside the vocabulary of {} characters", self.vocab.len()))
                })
            })
            .collect()
    }

    /// The windows of `part` starting at `starts`, `t` characters each: the inputs as f32 token
    /// ids (`starts.len() x t`) and the labels, each position's next character.
    fn windows(part: &[u32], starts: &[usize], t: usize) -> (Vec<f32>, Vec<i32>) {
        let mut x = Vec::with_capacity(starts.len() * t);
        let mut y = Vec::with_capacity(starts.len() * t);
        for &s in starts {
            x.extend(part[s..s + t].iter().map(|&v| v as f32));
            y.extend(part[s + 1..s + t + 1].iter().map(|&v| v as i32));
        }
        (x, y)
    }

    /// A batch of training windows for step `step`: `batch` random starts drawn from a
    /// generator seeded by `seed` and the step, so a resumed run draws exactly the windows the
    /// uninterrupted one would. Errors when the training text is not longer than `t`.
    pub fn train_batch(&self, seed: u64, step: u64, batch: usize, t: usize) -> Result<(Vec<f32>, Vec<i32>)> {
        if self.train.len() <= t {
            return Err(bad(
                &self.name,
                format!("{} training characters cannot hold a window of {t} and its next character", self.train.len()),
            ));
        }
        let mut rng = Rng::new(seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17) ^ 0x5EED_7E47);
        let starts: Vec<usize> = (0..batch).map(|_| rng.below(self.train.len() - t)).collect();
        Ok(Self::windows(&self.train, &starts, t))
    }

    /// The whole validation text as windows of `t` side by side (starting at 0, `t`, `2t`, ...,
    /// each with its next characters as labels), so that every character is predicted once
    /// except the first and the last few (fewer than `t`, past the last whole window): the
    /// mean loss over them is the validation loss of the text, the same every run.
    pub fn val_text_windows(&self, t: usize) -> Result<(Vec<f32>, Vec<i32>)> {
        if self.val.len() <= t {
            return Err(bad(
                &self.name,
                format!("{} validation characters cannot hold a window of {t} and its next character", self.val.len()),
            ));
        }
        let starts: Vec<usize> = (0..self.val.len() - t).step_by(t).collect();
        Ok(Self::windows(&self.val, &starts, t))
    }

    /// The fixed validation windows: up to `count` windows of `t`, evenly spaced over the
    /// validation text (the same every run, whatever the seed).
    pub fn val_windows(&self, count: usize, t: usize) -> Result<(Vec<f32>, Vec<i32>)> {
        if self.val.len() <= t {
            return Err(bad(
                &self.name,
                format!("{} validation characters cannot hold a window of {t} and its next character", self.val.len()),
            ));
        }
        let span = self.val.len() - t;
        let count = count.clamp(1, span);
        let starts: Vec<usize> = (0..count).map(|i| i * span / count).collect();
        Ok(Self::windows(&self.val, &starts, t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vendored_tiny_shakespeare_has_the_documented_split_and_windows() {
        let c = TextCorpus::tiny_shakespeare().unwrap();
        assert_eq!(c.vocab.len(), 65);
        assert_eq!(c.vocab[0], '\n');
        assert_eq!((c.train.len(), c.val.len()), (1_003_854, 111_540));
        let text = c.decode(&c.train[..13]).unwrap();
        assert_eq!(text, "First Citizen");
        assert_eq!(c.encode("ROMEO:").unwrap().len(), 6);
        let e = c.encode("ROMEO\u{e9}").unwrap_err().to_string();
        assert!(e.contains("'\u{e9}'") && e.contains("at 5"), "{e}");
        // Windows: labels are the next characters; the same step and seed give the same batch.
        let (x, y) = c.train_batch(1, 7, 3, 8).unwrap();
        assert_eq!((x.len(), y.len()), (24, 24));
        for w in 0..3 {
            for p in 0..7 {
                assert_eq!(x[w * 8 + p + 1] as i32, y[w * 8 + p]);
            }
        }
        assert_eq!(c.train_batch(1, 7, 3, 8).unwrap(), (x.clone(), y.clone()));
        assert_ne!(c.train_batch(1, 8, 3, 8).unwrap().0, x);
        assert_ne!(c.train_batch(2, 7, 3, 8).unwrap().0, x);
        let (vx, _) = c.val_windows(100, 64).unwrap();
        assert_eq!(vx.len(), 6400);
        assert_eq!(c.val_windows(100, 64).unwrap().0, vx);
        // The whole text: windows side by side, every character after the first predicted once.
        let (ax, ay) = c.val_text_windows(64).unwrap();
        assert_eq!(ax.len(), 1742 * 64);
        assert_eq!(ay[64 * 1741 + 63], c.val[1741 * 64 + 64] as i32);
        assert_eq!(ax[64] as u32, c.val[64]);
        assert!(TextCorpus::from_text("t", "abc").unwrap_err().to_string().contains("too short"));
        let small = TextCorpus::from_text("t", "abcdefghijklmnopqrst").unwrap();
        assert!(small.train_batch(0, 0, 1, 18).unwrap_err().to_string().contains("cannot hold a window of 18"));
    }

    #[test]
    fn vendored_mnist_has_the_documented_counts() {
        let (train, test) = Dataset::mnist_10k().unwrap();
        assert_eq!((train.len(), test.len(), train.dim, train.classes), (8000, 2000, 784, 10));
        let mut counts = [0usize; 10];
        for &l in train.y.iter().chain(&test.y) {
            counts[l as usize] += 1;
        }
        assert_eq!(counts, [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]);
        assert!(train.x.iter().all(|&p| (0.0..=1.0).contains(&p)));
        assert!(train.x.iter().any(|&p| p > 0.9));
    }

    #[test]
    fn idx_errors_name_the_problem() {
        let e = parse_idx("f", &[1, 2, 3, 4]).unwrap_err().to_string();
        assert!(e.contains("f: not an IDX file"), "{e}");
        let e = parse_idx("f", &[0, 0, 0x0d, 1, 0, 0, 0, 2, 1, 2]).unwrap_err().to_string();
        assert!(e.contains("0x0d is not supported"), "{e}");
        let e = parse_idx("f", &[0, 0, 8, 1, 0, 0, 0, 3, 1, 2]).unwrap_err().to_string();
        assert!(e.contains("need 3 bytes of data, the file has 2"), "{e}");
        let e = parse_idx("f", &[0x1f, 0x8b, 0, 0]).unwrap_err().to_string();
        assert!(e.contains("corrupt gzip"), "{e}");
        let e = parse_idx("f", &[0, 0, 8, 1, 0, 0, 0, 1, 1, 2]).unwrap_err().to_string();
        assert!(e.contains("holds more"), "{e}");
        // Four dimensions of 2^32 - 1: the product overflows; refused while parsing the header.
        let mut huge = vec![0, 0, 8, 4];
        huge.extend([0xff; 16]);
        let e = parse_idx("f", &huge).unwrap_err().to_string();
        assert!(e.contains("more data than can be held"), "{e}");
        let (d, v) = parse_idx("f", &[0, 0, 8, 2, 0, 0, 0, 1, 0, 0, 0, 2, 7, 9]).unwrap();
        assert_eq!((d, v), (vec![1, 2], vec![7, 9]));
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// A gzip bomb: a header declaring 10 bytes, then a megabyte of zeros. It is refused after
    /// 11 bytes of output, not decompressed whole.
    #[test]
    fn gzip_is_decompressed_only_as_far_as_the_header_declares() {
        let mut raw = vec![0u8, 0, 8, 1, 0, 0, 0, 10];
        raw.extend(vec![0u8; 1 << 20]);
        let e = parse_idx("bomb.gz", &gzip(&raw)).unwrap_err().to_string();
        assert!(e.contains("holds more"), "{e}");
        // A declared size far beyond the stream: "the file has" what it really had.
        let raw = [0u8, 0, 8, 1, 0x7f, 0xff, 0xff, 0xff, 1, 2, 3];
        let e = parse_idx("short.gz", &gzip(&raw)).unwrap_err().to_string();
        assert!(e.contains("the file has 3"), "{e}");
    }

    /// Multi-member gzip (pigz, bgzip): every member is read, not only the first.
    #[test]
    fn multi_member_gzip_is_read_whole() {
        let raw = [0u8, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 4, 5, 6];
        let mut two = gzip(&raw[..10]);
        two.extend(gzip(&raw[10..]));
        let (d, v) = parse_idx("two.gz", &two).unwrap();
        assert_eq!((d, v), (vec![2, 3], vec![1, 2, 3, 4, 5, 6]));
    }

    #[test]
    fn classes_are_what_the_labels_use() {
        let images = [0u8, 0, 8, 3, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0, 2, 1, 2, 3, 4, 5, 6];
        let labels = [0u8, 0, 8, 1, 0, 0, 0, 3, 0, 4, 2];
        let d = Dataset::from_idx("i", &images, "l", &labels).unwrap();
        assert_eq!((d.classes, d.dim, d.len()), (5, 2, 3));
    }

    #[test]
    fn directories_that_cannot_be_read_say_so() {
        let dir = std::env::temp_dir().join(format!("tessera-data-test-{}", std::process::id()));
        let e = Dataset::mnist_dir(&dir).unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
        std::fs::write(&dir, b"x").unwrap();
        let e = Dataset::mnist_dir(&dir).unwrap_err().to_string();
        assert!(e.contains("is not a directory"), "{e}");
        std::fs::remove_file(&dir).unwrap();
        std::fs::create_dir(&dir).unwrap();
        let e = Dataset::mnist_dir(&dir).unwrap_err().to_string();
        assert!(e.contains("neither train-images-idx3-ubyte"), "{e}");
        // A file that exists but cannot be read (a directory in its place): "cannot read".
        std::fs::create_dir(dir.join("train-images-idx3-ubyte.gz")).unwrap();
        let e = Dataset::mnist_dir(&dir).unwrap_err().to_string();
        assert!(e.contains("cannot read it"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn shuffles_are_seeded_and_batches_cover_the_epoch() {
        assert_eq!(epoch_order(100, 1, 3), epoch_order(100, 1, 3));
        assert_ne!(epoch_order(100, 1, 3), epoch_order(100, 1, 4));
        let order = epoch_order(10, 0, 0);
        assert_eq!(batches_per_epoch(10, 4), 3);
        let all: Vec<usize> = (0..3).flat_map(|b| batch_indices(&order, 4, b).to_vec()).collect();
        assert_eq!(all, order);
        assert_eq!(batch_indices(&order, 4, 2).len(), 2);
    }

    #[test]
    fn synthetic_data_is_seeded_and_uses_every_class() {
        let a = Dataset::synthetic(500, &[8, 16, 4], 3).unwrap();
        let b = Dataset::synthetic(500, &[8, 16, 4], 3).unwrap();
        assert_eq!(a.y, b.y);
        assert_eq!((a.dim, a.classes, a.x.len()), (8, 4, 4000));
        for c in 0..4 {
            assert!(a.y.contains(&c), "class {c} never drawn");
        }
        assert!(Dataset::synthetic(5, &[8], 0).is_err());
    }
}
