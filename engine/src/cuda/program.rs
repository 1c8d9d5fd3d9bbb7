//! The NVRTC program: the kernel files of `kernels/`, concatenated in one
//! order into one translation unit (so nothing changes at run time against one
//! `kernels.cu`), and the constants the host shares with them, passed as `-D`
//! defines so that each is written once, here.
//!
//! `scripts/nvrtc_check.py` reads [`KERNEL_SOURCES`]' file names and
//! [`KERNEL_DEFINES`]' names and values from this file to compile the same
//! program without a GPU: keep both lists literal. Which include directory
//! and architecture it is compiled for is decided here too ([`include_dir`],
//! `TANDEM_CUDA_ARCH`).

use cudarc::driver::CudaContext;
use cudarc::nvrtc::Ptx;

use super::error::{CudaError, DriverContext, require};
use super::launch::{
    DECODE_TILE, MAX_SPLITS, PREFILL_BK, PREFILL_BQ, PREFILL_FP8_STAGES, PREFILL_STAGES,
    PREFILL_WS_BK,
};

/// Where NVRTC looks for `cuda_bf16.h` when neither `TANDEM_CUDA_INCLUDE` nor the
/// library path (below) names one: the system toolkit's usual places.
pub const DEFAULT_INCLUDE_DIRS: &[&str] = &["/usr/local/cuda/include", "/usr/include"];

/// The kernel files in the order they are concatenated: `common.cuh` first
/// (types and helpers every other file uses), then one file per concern.
pub(crate) const KERNEL_SOURCES: [(&str, &str); 7] = [
    ("common.cuh", include_str!("kernels/common.cuh")),
    ("elementwise.cu", include_str!("kernels/elementwise.cu")),
    ("kv_fp8.cu", include_str!("kernels/kv_fp8.cu")),
    ("decode_attn.cu", include_str!("kernels/decode_attn.cu")),
    ("sampling.cu", include_str!("kernels/sampling.cu")),
    ("prefill_attn.cu", include_str!("kernels/prefill_attn.cu")),
    ("gemv.cu", include_str!("kernels/gemv.cu")),
];

/// Constants compiled into the kernels as `-DNAME=VALUE`; the host sizes grids
/// and shared memory from the same values (`launch.rs`).
pub(crate) const KERNEL_DEFINES: [(&str, usize); 7] = [
    ("MAX_SPLITS", MAX_SPLITS),
    ("DECODE_TILE", DECODE_TILE),
    ("PREFILL_BQ", PREFILL_BQ),
    ("PREFILL_BK", PREFILL_BK),
    ("PREFILL_WS_BK", PREFILL_WS_BK),
    ("PREFILL_STAGES", PREFILL_STAGES),
    ("PREFILL_FP8_STAGES", PREFILL_FP8_STAGES),
];

/// The program's source: every file of [`KERNEL_SOURCES`] in order, each after
/// a `#line` directive so compiler messages name the file and line.
///
/// With `TANDEM_CUDA_KERNELS` set to a directory, each file is read from there
/// instead of the copy compiled into the binary: a kernel can then be changed
/// and measured on a GPU machine that has no Rust toolchain, as long as its
/// launch (arguments, grid, shared memory) stays the same. A file missing there
/// falls back to the compiled-in copy; one that cannot be read, or that declares
/// a kernel of the binary with other parameters ([`same_kernel_parameters`]),
/// is an error.
pub(crate) fn source() -> Result<String, CudaError> {
    let dir = std::env::var_os("TANDEM_CUDA_KERNELS").map(std::path::PathBuf::from);
    let mut s = String::new();
    for (name, builtin) in KERNEL_SOURCES {
        let from_dir = match &dir {
            Some(d) if d.join(name).exists() => {
                let path = d.join(name);
                let failed = |message: String| CudaError::Compile {
                    include: include_dir(),
                    message: format!("TANDEM_CUDA_KERNELS: {}: {message}", path.display()),
                };
                let text = std::fs::read_to_string(&path).map_err(|e| failed(e.to_string()))?;
                same_kernel_parameters(builtin, &text).map_err(failed)?;
                Some(text)
            }
            _ => None,
        };
        let text = from_dir.as_deref().unwrap_or(builtin);
        s.push_str(&format!("#line 1 \"{name}\"\n"));
        s.push_str(text);
        if !text.ends_with('\n') {
            s.push('\n');
        }
    }
    Ok(s)
}

/// Each `extern "C" __global__` kernel's name (as written, macro-made kernels
/// by their pasted name) and parameter list, whitespace and macro line
/// continuations folded.
fn kernel_parameters(src: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (at, _) in src.match_indices("extern \"C\" __global__") {
        let rest = &src[at..];
        // Kernels return void; the name runs from it to the parameter list.
        let Some(open) = rest.find("void ").and_then(|v| {
            let from = v + "void ".len();
            rest[from..].find('(').map(|p| (from, from + p))
        }) else {
            continue;
        };
        let (from, open) = open;
        let Some(close) = rest[open..].find(')') else {
            continue;
        };
        let fold = |t: &str| {
            t.replace('\\', " ")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        out.push((fold(&rest[from..open]), fold(&rest[open + 1..open + close])));
    }
    out
}

/// Whether `replacement` (a kernel file from `TANDEM_CUDA_KERNELS`) declares
/// every kernel of `builtin` (the binary's copy of that file) with the same
/// parameters: the binary launches them with its own argument lists, and a
/// kernel given other arguments fails to launch or reads garbage (a binary
/// given another revision's kernels died so on a GPU machine). Kernels only the
/// replacement declares are fine (a variant may add some).
pub(crate) fn same_kernel_parameters(builtin: &str, replacement: &str) -> Result<(), String> {
    let theirs = kernel_parameters(replacement);
    for (name, ours) in kernel_parameters(builtin) {
        match theirs.iter().find(|(n, _)| *n == name) {
            Some((_, p)) if *p == ours => {}
            Some((_, p)) => {
                return Err(format!(
                    "kernel `{name}` takes ({p}) there, but this binary launches it with ({ours}): \
                     these kernels come from another revision; use the binary built with them"
                ));
            }
            None => {
                return Err(format!(
                    "kernel `{name}` of this binary is not declared there: these kernels come \
                     from another revision; use the binary built with them"
                ));
            }
        }
    }
    Ok(())
}

/// NVRTC options besides the architecture and include path: the language
/// standard and [`KERNEL_DEFINES`].
pub(crate) fn options() -> Vec<String> {
    let mut o = vec!["--std=c++17".to_string()];
    o.extend(KERNEL_DEFINES.iter().map(|(n, v)| format!("-D{n}={v}")));
    o
}

/// Compiles the program for `ctx`'s GPU (or `TANDEM_CUDA_ARCH`), with the
/// include directory [`include_dir`] finds; returns the PTX and the target.
pub(crate) fn compile(ctx: &CudaContext) -> Result<(Ptx, &'static str), CudaError> {
    let include = include_dir();
    let arch = target_arch(ctx)?;
    let source = source()?;
    require("libnvrtc", cudarc::nvrtc::sys::is_culib_present)?;
    cudarc::nvrtc::compile_ptx_with_opts(
        source,
        cudarc::nvrtc::CompileOptions {
            arch: Some(arch),
            include_paths: vec![include.clone()],
            options: options(),
            ..Default::default()
        },
    )
    .map_err(|e| CudaError::Compile {
        include,
        message: e.to_string(),
    })
    .map(|ptx| (ptx, arch))
}

/// The include directory NVRTC gets: `TANDEM_CUDA_INCLUDE`; else the `include`
/// beside a `lib` directory on `LD_LIBRARY_PATH` that has `cuda_bf16.h` (the
/// layout of a toolkit and of the `nvidia-*` Python wheels, whose libraries are
/// the ones this process loads); else the first default that has it.
pub fn include_dir() -> String {
    if let Ok(dir) = std::env::var("TANDEM_CUDA_INCLUDE") {
        return dir;
    }
    let has_header = |d: &std::path::Path| d.join("cuda_bf16.h").exists();
    let beside_libs = std::env::var_os("LD_LIBRARY_PATH")
        .into_iter()
        .flat_map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .filter_map(|lib| lib.parent().map(|p| p.join("include")))
        .find(|d| has_header(d));
    if let Some(dir) = beside_libs {
        return dir.to_string_lossy().into_owned();
    }
    DEFAULT_INCLUDE_DIRS
        .iter()
        .find(|d| has_header(std::path::Path::new(d)))
        .unwrap_or(&DEFAULT_INCLUDE_DIRS[0])
        .to_string()
}

/// The `sm_XY` NVRTC compiles for: `TANDEM_CUDA_ARCH` (e.g. `sm_90`), else the
/// GPU's own compute capability (`sm_90a` on 9.0, so the Hopper-only kernels
/// are compiled; `TANDEM_CUDA_ARCH=sm_90` compiles the portable fallbacks).
fn target_arch(ctx: &CudaContext) -> Result<&'static str, CudaError> {
    use cudarc::driver::sys::CUdevice_attribute as A;
    let arch = match std::env::var("TANDEM_CUDA_ARCH") {
        Ok(a) => a,
        Err(_) => {
            let major = ctx
                .attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)
                .op("cuDeviceGetAttribute")?;
            let minor = ctx
                .attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)
                .op("cuDeviceGetAttribute")?;
            if major < 9 {
                return Err(CudaError::Unsupported(format!(
                    "compute capability {major}.{minor}: the kernels use Hopper's programmatic dependent launches (sm_90 or newer)"
                )));
            }
            // Hopper's warpgroup MMA (`wgmma`, the prefill attention's) exists
            // only in the architecture-specific target of compute capability 9.0.
            if (major, minor) == (9, 0) {
                "sm_90a".to_string()
            } else {
                format!("sm_{major}{minor}")
            }
        }
    };
    // NVRTC's options take a `&'static str`; one per process is compiled.
    Ok(Box::leak(arch.into_boxed_str()))
}

#[cfg(test)]
mod tests {
    use super::{
        KERNEL_DEFINES, KERNEL_SOURCES, kernel_parameters, options, same_kernel_parameters, source,
    };

    fn builtin(file: &str) -> &'static str {
        KERNEL_SOURCES
            .iter()
            .find(|(n, _)| *n == file)
            .map(|(_, s)| *s)
            .unwrap_or_default()
    }

    #[test]
    fn kernels_from_another_revision_with_other_parameters_are_refused() {
        // Every kernel the host launches is found, macro-made ones by their pasted name.
        let all: Vec<String> = KERNEL_SOURCES
            .iter()
            .flat_map(|(_, src)| kernel_parameters(src))
            .map(|(name, _)| name)
            .collect();
        for k in [
            "prefill_attn_##HD",
            "decode_attn_##HD##_##G",
            "rope_kv",
            "sample_rows",
            "gemv",
        ] {
            assert!(all.iter().any(|n| n == k), "{k} not in {all:?}");
        }
        for (file, src) in KERNEL_SOURCES {
            assert_eq!(same_kernel_parameters(src, src), Ok(()), "{file}");
        }
        // The prefill attention of a revision before TMA (no tensor-map parameter):
        // launched with this binary's arguments it failed, then the process died.
        let prefill = builtin("prefill_attn.cu");
        let before_tma = prefill.replacen(
            "const bf16* cache, const CUtensorMap* tmap,",
            "const bf16* cache,",
            1,
        );
        assert_ne!(before_tma, prefill);
        let e = same_kernel_parameters(prefill, &before_tma).unwrap_err();
        assert!(e.contains("kernel `prefill_attn_##HD` takes (const bf16* q, const bf16* cache, const int* tables"), "{e}");
        assert!(e.contains("another revision"), "{e}");
        // A kernel renamed away, and a body changed with the same parameters.
        let renamed = builtin("elementwise.cu").replace("void rope_kv(", "void rope_kv_v2(");
        let e = same_kernel_parameters(builtin("elementwise.cu"), &renamed).unwrap_err();
        assert!(
            e.contains("kernel `rope_kv` of this binary is not declared there"),
            "{e}"
        );
        let tweaked = builtin("elementwise.cu").replacen("{", "{ /* a variant */", 3);
        assert_eq!(
            same_kernel_parameters(builtin("elementwise.cu"), &tweaked),
            Ok(())
        );
    }

    #[test]
    fn the_shared_constants_are_defined_only_by_the_host() {
        let src = source().expect("the compiled-in kernels");
        for (name, _) in KERNEL_DEFINES {
            assert!(
                !src.contains(&format!("#define {name} ")),
                "{name} is defined in the kernel source as well as passed as -D"
            );
            assert!(src.contains(name), "{name} is passed but never used");
        }
        let o = options();
        assert!(o.contains(&"-DMAX_SPLITS=64".to_string()), "{o:?}");
        assert!(o.contains(&"-DDECODE_TILE=64".to_string()), "{o:?}");
        assert!(o.contains(&"-DPREFILL_BQ=128".to_string()), "{o:?}");
        assert!(o.contains(&"-DPREFILL_BK=64".to_string()), "{o:?}");
    }

    #[test]
    fn the_program_starts_with_the_common_header_and_names_each_file() {
        let src = source().expect("the compiled-in kernels");
        assert!(src.starts_with("#line 1 \"common.cuh\"\n"));
        let include = src.find("#include <cuda_bf16.h>").unwrap_or(usize::MAX);
        let first_kernel = src.find("__global__").unwrap_or(0);
        assert!(include < first_kernel);
        for f in [
            "elementwise.cu",
            "decode_attn.cu",
            "sampling.cu",
            "prefill_attn.cu",
            "gemv.cu",
        ] {
            assert_eq!(src.matches(&format!("#line 1 \"{f}\"")).count(), 1, "{f}");
        }
    }
}
