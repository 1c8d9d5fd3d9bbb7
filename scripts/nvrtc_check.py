#!/usr/bin/env python3
"""Compiles engine/src/cuda/kernels.cu with NVRTC for sm_90 on a machine without a GPU,
as the CUDA backend does at start, and (with ptxas) prints each kernel's registers,
shared memory and spills. Catches kernel compile errors before any GPU time is spent.

    python3 -m pip install --target /tmp/nv "nvidia-cuda-nvrtc==13.0.*" \
        "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-nvcc==13.0.*"
    NV=/tmp/nv/nvidia/cu13 python3 scripts/nvrtc_check.py [--ptxas]
"""
import ctypes
import os
import subprocess
import sys
import tempfile

nv = os.environ.get("NV", "/tmp/nv/nvidia/cu13")
src_path = os.path.join(os.path.dirname(__file__), "..", "engine", "src", "cuda", "kernels.cu")
src = open(src_path, "rb").read()
lib = ctypes.CDLL(os.path.join(nv, "lib", "libnvrtc.so.13"))
prog = ctypes.c_void_p()
rc = lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"kernels.cu", 0, None, None)
assert rc == 0, rc
opts = [b"--gpu-architecture=compute_90", b"--std=c++17", b"-I" + os.path.join(nv, "include").encode()]
arr = (ctypes.c_char_p * len(opts))(*opts)
rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
size = ctypes.c_size_t()
lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
log = ctypes.create_string_buffer(size.value)
lib.nvrtcGetProgramLog(prog, log)
if log.value.strip():
    print(log.value.decode())
if rc != 0:
    print(f"NVRTC failed: {rc}")
    sys.exit(1)
lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
ptx = ctypes.create_string_buffer(size.value)
lib.nvrtcGetPTX(prog, ptx)
print(f"NVRTC: compiled, {size.value} bytes of PTX")
if "--ptxas" in sys.argv:
    with tempfile.NamedTemporaryFile("wb", suffix=".ptx", delete=False) as f:
        f.write(ptx.value)
    ptxas = os.path.join(nv, "bin", "ptxas")
    out = subprocess.run([ptxas, "-arch=sm_90", "-v", f.name, "-o", "/dev/null"],
                         capture_output=True, text=True)
    lines = (out.stdout + out.stderr).splitlines()
    fn = None
    for line in lines:
        if "Compiling entry function" in line:
            fn = line.split("'")[1]
        elif "registers" in line or "spill" in line:
            if "spill" in line and "0 bytes spill stores, 0 bytes spill loads" in line:
                continue
            print(f"{fn}: {line.split('info    : ')[-1]}")
    sys.exit(out.returncode)
