//! The CUDA backend's error type: every driver, NVRTC and cuBLAS failure, named.

/// What can go wrong on the GPU.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// A CUDA library could not be loaded: the driver's (no NVIDIA driver on
    /// this machine) or one of the toolkit's (cuBLAS, cuBLASLt, NVRTC).
    #[error(
        "{0} could not be loaded: this machine has no NVIDIA driver, or the library's \
         directory is not on LD_LIBRARY_PATH (the README's GPU section says which)"
    )]
    Missing(&'static str),
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

/// Fails with [`CudaError::Missing`] naming `library` unless `present` finds
/// it. cudarc panics when a library it loads at first use is missing; asking
/// first makes that an error, with no panic message or backtrace in the log.
pub(crate) fn require(
    library: &'static str,
    present: unsafe fn() -> bool,
) -> Result<(), CudaError> {
    // SAFETY: loading a CUDA library runs only its own initialisers.
    if unsafe { present() } {
        Ok(())
    } else {
        Err(CudaError::Missing(library))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_an_error_naming_it() {
        fn absent() -> bool {
            false
        }
        fn present() -> bool {
            true
        }
        let e = require("libcublas", absent).expect_err("absent");
        assert!(matches!(e, CudaError::Missing("libcublas")));
        let message = e.to_string();
        assert!(
            message.starts_with("libcublas could not be loaded")
                && message.contains("LD_LIBRARY_PATH"),
            "{message}"
        );
        require("libcublas", present).expect("present");
    }
}
