//! A model: a Hugging Face directory (`config.json`, `tokenizer.json`,
//! safetensors) or a GGUF file, its config and tokenizer read once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::backend::Backend;
use crate::config::ModelConfig;
use crate::cpu::{CpuBackend, CpuModel};
use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use crate::kv_cache::KvDtype;
use crate::tokenizer::Tokenizer;
use crate::weights::Weights;

/// Where a model's forward pass runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Device {
    /// The CPU backend (candle, f32).
    #[default]
    Cpu,
    /// The CUDA backend on this GPU (bf16; needs a build with the `cuda` feature).
    Cuda(usize),
}

/// The most one forward pass of a node may hold, from the node's config
/// (`prefill.max_batch_tokens`, `decode.max_batch`, ...), and how the node's
/// GPU work ranks. A backend that sizes its buffers once (CUDA) sizes them for
/// this; the CPU backend allocates per pass and only checks that the limits
/// are positive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Tokens in one pass, all sequences together.
    pub max_tokens: usize,
    /// Sequences (chunks) in one pass.
    pub max_seqs: usize,
    /// Its rank against other backends' work on the same GPU.
    pub priority: GpuPriority,
}

/// How a backend's GPU work ranks against that of the other backends of this
/// process on the same GPU: CUDA stream priorities, which decide whose waiting
/// blocks the GPU schedules next when a multiprocessor frees (a running block
/// is not preempted); under the CUDA MPS daemon they count between processes
/// too (docs/GPU_BENCH.md, "twenty-ninth session"). The CPU backend has one
/// rank.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuPriority {
    /// The default.
    #[default]
    Normal,
    /// Ahead of `Normal` work (`[decode] gpu_priority = "high"`: a decode
    /// node's steps, which users wait on token by token, ahead of a prefill
    /// node's passes on the same GPU).
    High,
    /// `High` for steps of at least [`AUTO_HIGH_FROM_SEQS`] sequences,
    /// `Normal` for smaller ones (`[decode] gpu_priority = "auto"`): a full
    /// batch's tokens go ahead of a prompt's prefill on the same GPU, a few
    /// sequences' steps do not hold it back (docs/GPU_BENCH.md, thirtieth
    /// session).
    Auto,
}

/// The sequences in a step from which [`GpuPriority::Auto`] ranks it `High`.
/// On a GPU shared by two processes under MPS (an H100), ranking a decode
/// node's steps high took a saturated cluster's P99 inter-token latency to
/// 0.61x (256 sequences a step) and a lightly loaded one's time to first token
/// to 1.12x (a few sequences a step; docs/GPU_BENCH.md, twenty-ninth session);
/// 32 lies well between the two.
pub const AUTO_HIGH_FROM_SEQS: usize = 32;

impl GpuPriority {
    /// Whether a step of `seqs` sequences runs at the high rank.
    pub fn high_for(self, seqs: usize) -> bool {
        match self {
            GpuPriority::Normal => false,
            GpuPriority::High => true,
            GpuPriority::Auto => seqs >= AUTO_HIGH_FROM_SEQS,
        }
    }
}

impl BatchLimits {
    fn check(self) -> Result<()> {
        if self.max_tokens == 0 || self.max_seqs == 0 {
            return Err(crate::error::EngineError::InvalidInput(format!(
                "batch limits of {} tokens and {} sequences: both must be positive",
                self.max_tokens, self.max_seqs
            )));
        }
        Ok(())
    }
}

/// A model (directory or GGUF file) whose config and tokenizer have been read and checked.
pub struct ModelDir {
    /// Where it is: a directory, or a `.gguf` file.
    pub path: PathBuf,
    /// Its normalized `config.json`.
    pub config: ModelConfig,
    /// Its tokenizer and chat template.
    pub tokenizer: Tokenizer,
    /// Where [`load`](Self::load) puts the model (the CPU unless set).
    pub device: Device,
    /// The name the model goes by unless configured otherwise.
    name: String,
    /// CPU weights by tensor-parallel size, loaded once and shared by every
    /// CPU backend made from this directory (the prefill and decode nodes of
    /// one `tandem up` process).
    cpu_models: Mutex<HashMap<usize, CpuModel>>,
    /// The same for the weights on each GPU (CUDA backends).
    #[cfg(feature = "cuda")]
    gpu_models: crate::cuda::GpuModels,
}

impl ModelDir {
    /// Reads a directory's `config.json` and `tokenizer.json`, or a GGUF file's
    /// metadata (weights are mapped by the backend).
    pub fn open(path: &Path) -> Result<Self> {
        // A path that is not there is named as it was given (not as a
        // directory's missing `config.json`).
        std::fs::metadata(path).map_err(|source| EngineError::Io {
            path: path.to_owned(),
            source,
        })?;
        let (config, tokenizer, name) = if crate::gguf::is_gguf(path) {
            let file = GgufFile::open(path)?;
            let config = file.config()?;
            let tokenizer = crate::gguf::tokenizer::load(&file, &config)?;
            (config, tokenizer, file.name())
        } else {
            let config = ModelConfig::from_file(&path.join("config.json"))?;
            let tokenizer = Tokenizer::from_dir(path, &config)?;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into());
            (config, tokenizer, name)
        };
        Ok(ModelDir {
            path: path.to_owned(),
            config,
            tokenizer,
            device: Device::Cpu,
            name,
            cpu_models: Mutex::new(HashMap::new()),
            #[cfg(feature = "cuda")]
            gpu_models: Default::default(),
        })
    }

    /// The model's name: a directory's last component, a GGUF file's
    /// `general.name` (else its file stem).
    pub fn name(&self) -> String {
        self.name.clone()
    }

    /// Maps the model's weight files.
    pub fn weights(&self) -> Result<Weights> {
        Weights::open(&self.path)
    }

    /// Loads the weights onto [`device`](Self::device) with a KV cache of
    /// `num_blocks` blocks of `block_size` tokens, for passes within `limits`.
    pub fn load(
        &self,
        num_blocks: usize,
        block_size: usize,
        limits: BatchLimits,
    ) -> Result<Box<dyn Backend>> {
        limits.check()?;
        match self.device {
            Device::Cpu => Ok(Box::new(self.load_cpu(num_blocks, block_size)?)),
            #[cfg(feature = "cuda")]
            Device::Cuda(ordinal) => self.load_cuda(
                ordinal,
                num_blocks,
                block_size,
                crate::cuda::CudaLimits::from(limits),
            ),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => Err(crate::error::EngineError::InvalidInput(
                "this build has no CUDA backend: rebuild with `--features cuda`".into(),
            )),
        }
    }

    /// Like [`load_tp`](Self::load_tp) with the KV cache in `kv_dtype`:
    /// `None` is the backend's own (f32 on the CPU, bf16 on CUDA);
    /// `Some(KvDtype::Fp8E4m3)` stores e4m3 with per-block scales (both
    /// backends); `Some(KvDtype::Bf16)` is CUDA's own and a CPU option (half
    /// the memory of f32, and the same KV a CUDA node sends); f16 is refused.
    pub fn load_tp_kv(
        &self,
        tp: usize,
        num_blocks: usize,
        block_size: usize,
        limits: BatchLimits,
        kv_dtype: Option<KvDtype>,
    ) -> Result<Box<dyn Backend>> {
        let Some(dtype) = kv_dtype else {
            return self.load_tp(tp, num_blocks, block_size, limits);
        };
        limits.check()?;
        match self.device {
            Device::Cpu if matches!(dtype, KvDtype::F32 | KvDtype::Bf16 | KvDtype::Fp8E4m3) => {
                Ok(Box::new(CpuBackend::with_kv_dtype(
                    self.cpu_model(tp)?,
                    num_blocks,
                    block_size,
                    dtype,
                )?))
            }
            Device::Cuda(_) if dtype == KvDtype::Bf16 => {
                self.load_tp(tp, num_blocks, block_size, limits)
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(ordinal) if dtype == KvDtype::Fp8E4m3 => {
                if tp != 1 {
                    return self.load_tp(tp, num_blocks, block_size, limits);
                }
                self.load_cuda(
                    ordinal,
                    num_blocks,
                    block_size,
                    crate::cuda::CudaLimits {
                        kv_dtype: dtype,
                        ..crate::cuda::CudaLimits::from(limits)
                    },
                )
            }
            _ => Err(crate::error::EngineError::InvalidInput(format!(
                "kv_dtype {}: the {:?} backend's cache holds {} or fp8_e4m3",
                dtype.name(),
                self.device,
                if self.device == Device::Cpu {
                    "f32, bf16"
                } else {
                    "bf16"
                },
            ))),
        }
    }

    /// Like [`load`](Self::load), sharded over `tp` tensor-parallel ranks
    /// (CPU only for now; `tp = 1` is exactly `load`).
    pub fn load_tp(
        &self,
        tp: usize,
        num_blocks: usize,
        block_size: usize,
        limits: BatchLimits,
    ) -> Result<Box<dyn Backend>> {
        limits.check()?;
        match self.device {
            _ if tp == 1 => self.load(num_blocks, block_size, limits),
            Device::Cpu => self.load_cpu_tp(tp, num_blocks, block_size),
            Device::Cuda(_) => Err(crate::error::EngineError::InvalidInput(format!(
                "tp = {tp}: tensor parallelism runs on the CPU backend only so far"
            ))),
        }
    }

    /// Loads the weights onto GPU `ordinal` (or shares those another backend
    /// from this directory holds there) with a cache of `num_blocks` blocks.
    #[cfg(feature = "cuda")]
    fn load_cuda(
        &self,
        ordinal: usize,
        num_blocks: usize,
        block_size: usize,
        limits: crate::cuda::CudaLimits,
    ) -> Result<Box<dyn Backend>> {
        Ok(Box::new(crate::cuda::CudaBackend::load_shared(
            ordinal,
            &self.config,
            &self.gpu_models,
            || self.weights(),
            (num_blocks, block_size),
            limits,
        )?))
    }

    /// A CPU backend with a KV cache of `num_blocks` blocks over this
    /// directory's CPU weights (loaded at the first call).
    pub fn load_cpu(&self, num_blocks: usize, block_size: usize) -> Result<CpuBackend> {
        CpuBackend::new(self.cpu_model(1)?, num_blocks, block_size)
    }

    /// The weights on the CPU sharded over `tp` ranks: loaded at the first
    /// call for `tp`, shared afterwards.
    pub fn cpu_model(&self, tp: usize) -> Result<CpuModel> {
        let mut models = self.cpu_models.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(model) = models.get(&tp) {
            return Ok(model.clone());
        }
        let model = CpuModel::load_sharded(&self.config, &self.weights()?, tp)?;
        models.insert(tp, model.clone());
        Ok(model)
    }

    /// Loads the weights onto the CPU sharded over `tp` tensor-parallel ranks
    /// (each with a KV cache of `num_blocks` blocks for its heads); `tp = 1`
    /// is exactly [`load_cpu`](Self::load_cpu).
    pub fn load_cpu_tp(
        &self,
        tp: usize,
        num_blocks: usize,
        block_size: usize,
    ) -> Result<Box<dyn Backend>> {
        Ok(Box::new(CpuBackend::new(
            self.cpu_model(tp)?,
            num_blocks,
            block_size,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::{SynthSpec, write_model_dir};

    #[test]
    fn cpu_backends_of_one_directory_share_its_weights() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_model_dir(dir.path(), &SynthSpec::default()).expect("synth");
        let model = ModelDir::open(dir.path()).expect("open");
        let (a, b) = (model.cpu_model(1).unwrap(), model.cpu_model(1).unwrap());
        assert!(a.shares_weights_with(&b), "loaded once");
        let sharded = model.cpu_model(2).unwrap();
        assert!(!a.shares_weights_with(&sharded), "each TP size its own");
        // Another directory object loads its own.
        let other = ModelDir::open(dir.path())
            .expect("open")
            .cpu_model(1)
            .unwrap();
        assert!(!a.shares_weights_with(&other));
    }

    #[test]
    fn auto_ranks_only_full_steps_high() {
        use GpuPriority::*;
        for seqs in [0, 1, AUTO_HIGH_FROM_SEQS - 1] {
            assert_eq!(
                [Normal, High, Auto].map(|p| p.high_for(seqs)),
                [false, true, false]
            );
        }
        for seqs in [AUTO_HIGH_FROM_SEQS, 256] {
            assert_eq!(
                [Normal, High, Auto].map(|p| p.high_for(seqs)),
                [false, true, true]
            );
        }
    }
}
