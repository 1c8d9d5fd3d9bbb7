//! A model's weights by Hugging Face tensor name: memory-mapped safetensors
//! (single-file or sharded), or a GGUF file dequantized on load.
//!
//! Files are mapped, never read into a buffer, so a safetensors tensor is copied
//! once: from the page cache into the backend's own storage (converted to its
//! dtype on the way). A shard index (`model.safetensors.index.json`) is followed
//! when present. Every tensor is located and its bounds checked when the files
//! are opened, so a corrupt or truncated file fails at load time with its name.
//! Backends ask for tensors by their Hugging Face names and shapes only; which
//! format is behind them is this module's business.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::SafeTensors;

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;

/// Where one tensor lives.
#[derive(Debug, Clone)]
struct Entry {
    file: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// A model's weights: its safetensors files or its GGUF file.
pub struct Weights {
    source: Source,
}

enum Source {
    Safetensors(Safetensors),
    Gguf(GgufFile),
}

impl From<GgufFile> for Weights {
    fn from(file: GgufFile) -> Self {
        Weights {
            source: Source::Gguf(file),
        }
    }
}

impl Weights {
    /// Opens a model's weights: a GGUF file, or the safetensors of a model directory.
    pub fn open(path: &Path) -> Result<Self> {
        if crate::gguf::is_gguf(path) {
            Ok(GgufFile::open(path)?.into())
        } else {
            Self::open_dir(path)
        }
    }

    /// Opens `model.safetensors.index.json` (sharded) or `model.safetensors` in `dir`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        Ok(Weights {
            source: Source::Safetensors(Safetensors::open_dir(dir)?),
        })
    }

    /// Whether a tensor of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        match &self.source {
            Source::Safetensors(st) => st.entries.contains_key(name),
            Source::Gguf(g) => g.contains(name),
        }
    }

    /// Loads a tensor of the expected shape as `dtype` on `device`.
    pub fn load(
        &self,
        name: &str,
        expected: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        match &self.source {
            Source::Safetensors(st) => st.load(name, expected, dtype, device),
            Source::Gguf(g) => Ok(g
                .load_f32(name, expected)?
                .to_dtype(dtype)?
                .to_device(device)?),
        }
    }

    /// Loads indices `range` of dimension `dim` (0 or 1) of a tensor
    /// whose full shape must be `expected`: a tensor-parallel rank's shard.
    pub fn load_narrow(
        &self,
        name: &str,
        expected: &[usize],
        dim: usize,
        range: Range<usize>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        match &self.source {
            Source::Safetensors(st) => st.load_narrow(name, expected, dim, range, dtype, device),
            Source::Gguf(g) => {
                let t = g.load_f32(name, expected)?;
                check_narrow(name, expected, dim, &range)?;
                Ok(t.narrow(dim, range.start, range.len())?
                    .contiguous()?
                    .to_dtype(dtype)?
                    .to_device(device)?)
            }
        }
    }
}

fn check_narrow(name: &str, shape: &[usize], dim: usize, range: &Range<usize>) -> Result<()> {
    if dim >= shape.len() || dim > 1 || range.end > shape[dim] {
        return Err(EngineError::InvalidInput(format!(
            "cannot take {}..{} of dimension {dim} of tensor {name:?} of shape {shape:?}",
            range.start, range.end
        )));
    }
    Ok(())
}

/// The mapped safetensors files of one model and an index of their tensors.
struct Safetensors {
    paths: Vec<PathBuf>,
    maps: Vec<Mmap>,
    entries: HashMap<String, Entry>,
}

impl Safetensors {
    fn open_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|source| EngineError::Io {
                path: index.clone(),
                source,
            })?;
            let parsed: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| EngineError::Weights {
                    path: index.clone(),
                    message: e.to_string(),
                })?;
            let map = parsed
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| EngineError::Weights {
                    path: index.clone(),
                    message: "no `weight_map` object".into(),
                })?;
            let mut files: Vec<String> = Vec::new();
            for file in map.values() {
                let file = file.as_str().ok_or_else(|| EngineError::Weights {
                    path: index.clone(),
                    message: "weight_map values must be file names".into(),
                })?;
                if file.contains('/') || file.contains("..") {
                    return Err(EngineError::Weights {
                        path: index.clone(),
                        message: format!("shard name {file:?} must be a plain file name"),
                    });
                }
                if !files.iter().any(|f| f == file) {
                    files.push(file.to_string());
                }
            }
            files.sort();
            Self::open_files(&files.iter().map(|f| dir.join(f)).collect::<Vec<_>>())
        } else {
            Self::open_files(&[dir.join("model.safetensors")])
        }
    }

    /// Maps and indexes the given safetensors files.
    fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut maps = Vec::with_capacity(paths.len());
        let mut entries = HashMap::new();
        for (file, path) in paths.iter().enumerate() {
            let handle = std::fs::File::open(path).map_err(|source| EngineError::Io {
                path: path.clone(),
                source,
            })?;
            // SAFETY: the file is mapped read-only; Tandem never writes model files while
            // serving them, and a file truncated underneath us is an operator error that
            // the safetensors bounds checks below catch at open time.
            let map = unsafe { Mmap::map(&handle) }.map_err(|source| EngineError::Io {
                path: path.clone(),
                source,
            })?;
            let st = SafeTensors::deserialize(&map).map_err(|e| EngineError::Weights {
                path: path.clone(),
                message: format!("not a valid safetensors file ({e})"),
            })?;
            let base = map.as_ptr() as usize;
            for (name, view) in st.tensors() {
                let start = view.data().as_ptr() as usize - base;
                entries.insert(
                    name,
                    Entry {
                        file,
                        dtype: view.dtype(),
                        shape: view.shape().to_vec(),
                        start,
                        end: start + view.data().len(),
                    },
                );
            }
            maps.push(map);
        }
        Ok(Safetensors {
            paths: paths.to_vec(),
            maps,
            entries,
        })
    }

    /// The dtype, shape and bytes of a tensor, straight from the mapping.
    fn raw(&self, name: &str) -> Result<(safetensors::Dtype, &[usize], &[u8])> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| EngineError::MissingTensor { name: name.into() })?;
        Ok((e.dtype, &e.shape, &self.maps[e.file][e.start..e.end]))
    }

    fn load(
        &self,
        name: &str,
        expected: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let (st_dtype, shape, bytes) = self.raw(name)?;
        if shape != expected {
            return Err(EngineError::TensorShape {
                name: name.into(),
                actual: shape.to_vec(),
                expected: expected.to_vec(),
            });
        }
        let file_dtype = self.file_dtype(name, st_dtype)?;
        let t = Tensor::from_raw_buffer(bytes, file_dtype, shape, device)?;
        Ok(t.to_dtype(dtype)?)
    }

    /// A tensor-parallel rank's shard (see [`Weights::load_narrow`]). Only the
    /// shard's bytes are copied out of the mapping (row slices of a row-major
    /// matrix are one range; column slices one range per row).
    fn load_narrow(
        &self,
        name: &str,
        expected: &[usize],
        dim: usize,
        range: Range<usize>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let (start, len) = (range.start, range.len());
        let (st_dtype, shape, bytes) = self.raw(name)?;
        if shape != expected {
            return Err(EngineError::TensorShape {
                name: name.into(),
                actual: shape.to_vec(),
                expected: expected.to_vec(),
            });
        }
        check_narrow(name, shape, dim, &range)?;
        let file_dtype = self.file_dtype(name, st_dtype)?;
        let elem = file_dtype.size_in_bytes();
        let rows = shape[0];
        let row_elems: usize = shape[1..].iter().product();
        let mut out_shape = shape.to_vec();
        out_shape[dim] = len;
        let t = if dim == 0 {
            let range = start * row_elems * elem..(start + len) * row_elems * elem;
            Tensor::from_raw_buffer(&bytes[range], file_dtype, &out_shape, device)?
        } else {
            // dim 1 of a matrix [rows, cols]: `len` columns out of every row.
            let cols = shape[1];
            let mut buf = Vec::with_capacity(rows * len * elem);
            for r in 0..rows {
                let from = (r * cols + start) * elem;
                buf.extend_from_slice(&bytes[from..from + len * elem]);
            }
            Tensor::from_raw_buffer(&buf, file_dtype, &out_shape, device)?
        };
        Ok(t.to_dtype(dtype)?)
    }

    fn file_dtype(&self, name: &str, st_dtype: safetensors::Dtype) -> Result<DType> {
        match st_dtype {
            safetensors::Dtype::F32 => Ok(DType::F32),
            safetensors::Dtype::F16 => Ok(DType::F16),
            safetensors::Dtype::BF16 => Ok(DType::BF16),
            other => {
                let e = &self.entries[name];
                Err(EngineError::Weights {
                    path: self.paths[e.file].clone(),
                    message: format!(
                        "tensor {name:?} has dtype {other:?}; expected f32, f16 or bf16"
                    ),
                })
            }
        }
    }
}
