//! The CUDA backend's error type: every driver, NVRTC and cuBLAS failure, named.

/// What can go wrong on the GPU.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// The CUDA driver library could not be loaded (no GPU driver on this machine).
    #[error("the CUDA driver could not be loaded: {0}")]
    NoDriver(String),
    /// A driver call (allocation, copy, launch, synchronization) failed.
    #[error("CUDA driver call `{op}` failed: {source}")]
    Driver {
        /// What was being done.
        op: &'static str,
        /// The driver's error.
        source: cudarc::driver::DriverError,
    },
    /// NVRTC could not compile the kernels.
    #[error("NVRTC could not compile the kernels (include dir {include:?}): {message}")]
    Compile {
        /// The include directory passed to NVRTC.
        include: String,
        /// The compiler's message and log.
        message: String,
    },
    /// A cuBLAS call failed.
    #[error("cuBLAS `{op}` failed: {source}")]
    Blas {
        /// What was being done.
        op: &'static str,
        /// cuBLAS's error.
        source: cudarc::cublas::result::CublasError,
    },
    /// A cuBLASLt call failed.
    #[error("cuBLASLt `{op}` failed: {source}")]
    BlasLt {
        /// What was being done.
        op: &'static str,
        /// cuBLASLt's error.
        source: cudarc::cublaslt::result::CublasError,
    },
    /// The model or request does not fit what the backend supports or was sized for.
    #[error("{0}")]
    Unsupported(String),
}

impl From<CudaError> for crate::error::EngineError {
    fn from(e: CudaError) -> Self {
        crate::error::EngineError::Device(Box::new(e))
    }
}

/// Attaches the operation's name to a driver error.
pub(crate) trait DriverContext<T> {
    fn op(self, op: &'static str) -> Result<T, CudaError>;
}

impl<T> DriverContext<T> for Result<T, cudarc::driver::DriverError> {
    fn op(self, op: &'static str) -> Result<T, CudaError> {
        self.map_err(|source| CudaError::Driver { op, source })
    }
}

impl<T> DriverContext<T> for Result<T, cudarc::cublas::result::CublasError> {
    fn op(self, op: &'static str) -> Result<T, CudaError> {
        self.map_err(|source| CudaError::Blas { op, source })
    }
}

impl<T> DriverContext<T> for Result<T, cudarc::cublaslt::result::CublasError> {
    fn op(self, op: &'static str) -> Result<T, CudaError> {
        self.map_err(|source| CudaError::BlasLt { op, source })
    }
}
