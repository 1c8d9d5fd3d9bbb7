#!/usr/bin/env python3
"""Compiles the CUDA backend's kernels (engine/src/cuda/kernels/*.cu) with NVRTC for sm_90
on a machine without a GPU, as the CUDA backend does at start: the files concatenated in
the order of KERNEL_SOURCES and the -D defines of KERNEL_DEFINES, both read from
engine/src/cuda/program.rs (values from engine/src/cuda/launch.rs). With --ptxas it prints
each kernel's registers, shared memory and spills; with --ptx FILE it writes the PTX
(compare two revisions' kernels: identical PTX, identical kernels). Catches kernel compile
errors before any GPU time is spent.

    python3 -m pip install --target /tmp/nv "nvidia-cuda-nvrtc==13.0.*" \
        "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-nvcc==13.0.*"
    NV=/tmp/nv/nvidia/cu13 [ARCH=90a] python3 scripts/nvrtc_check.py [--ptxas] [--ptx FILE]

KERNELS=DIR compiles the kernel files of DIR instead (as TANDEM_CUDA_KERNELS=DIR on the GPU).

With --sass KERNEL it also prints the order in which ptxas placed KERNEL's tensor-core
products (HGMMA), its waits for them (WARPGROUP.DEPBAR), its ex2s (MUFU.EX2) and barriers,
consecutive repeats counted: where a wait landed is not where the source put it (the
fifteenth session's prefill attention, docs/GPU_BENCH.md). It needs cuobjdump and nvdisasm:

    python3 -m pip install --target /tmp/nvd "nvidia-cuda-cuobjdump==13.2.*" \
        "nvidia-cuda-nvdisasm==13.2.*"
    CUOBJDUMP=/tmp/nvd/nvidia/cu13/bin/cuobjdump (nvdisasm beside it)
SASS_OUT=FILE writes the kernel's whole SASS listing there as well.
"""
import ctypes
import os
import re
import subprocess
import sys
import tempfile

nv = os.environ.get("NV", "/tmp/nv/nvidia/cu13")
cuda_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "engine", "src", "cuda")
kernels_dir = os.environ.get("KERNELS", os.path.join(cuda_dir, "kernels"))


def program():
    """The program source and its -D options, as engine/src/cuda/program.rs builds them."""
    prog_rs = open(os.path.join(cuda_dir, "program.rs")).read()
    launch_rs = open(os.path.join(cuda_dir, "launch.rs")).read()
    files = re.findall(r'\("([\w.]+)", include_str!\("kernels/([\w.]+)"\)\)', prog_rs)
    if not files:
        sys.exit("no KERNEL_SOURCES found in program.rs")
    src = ""
    for name, path in files:
        text = open(os.path.join(kernels_dir, path)).read()
        src += f'#line 1 "{name}"\n' + text + ("" if text.endswith("\n") else "\n")
    table = prog_rs[prog_rs.index("const KERNEL_DEFINES"):]
    table = table[: table.index("];")]
    defines = []
    for name, const in re.findall(r'\("(\w+)", (\w+)\)', table):
        value = re.search(rf"const {const}: usize = (\d+);", launch_rs)
        if not value:
            sys.exit(f"no literal value for {const} in launch.rs")
        defines.append(f"-D{name}={value.group(1)}".encode())
    return src.encode(), defines


src, defines = program()
lib = ctypes.CDLL(os.path.join(nv, "lib", "libnvrtc.so.13"))
prog = ctypes.c_void_p()
rc = lib.nvrtcCreateProgram(ctypes.byref(prog), src, b"tandem_kernels.cu", 0, None, None)
assert rc == 0, rc
arch = os.environ.get("ARCH", "90")  # ARCH=90a: the Hopper-only (wgmma) kernels too
opts = [f"--gpu-architecture=compute_{arch}".encode(), b"--std=c++17", b"-I" + os.path.join(nv, "include").encode()] + defines
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
print(f"NVRTC: compiled, {size.value} bytes of PTX ({' '.join(d.decode() for d in defines)})")
if "--ptx" in sys.argv:
    with open(sys.argv[sys.argv.index("--ptx") + 1], "wb") as f:
        f.write(ptx.value)
if "--ptxas" in sys.argv:
    with tempfile.NamedTemporaryFile("wb", suffix=".ptx", delete=False) as f:
        f.write(ptx.value)
    ptxas = os.path.join(nv, "bin", "ptxas")
    out = subprocess.run([ptxas, f"-arch=sm_{arch}", "-v", f.name, "-o", "/dev/null"],
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
    if out.returncode != 0:
        sys.exit(out.returncode)
if "--sass" in sys.argv:
    kernel = sys.argv[sys.argv.index("--sass") + 1]
    cuobjdump = os.environ.get("CUOBJDUMP", "/tmp/nvd/nvidia/cu13/bin/cuobjdump")
    env = dict(os.environ, PATH=os.path.dirname(cuobjdump) + ":" + os.environ.get("PATH", ""))
    with tempfile.TemporaryDirectory() as d:
        ptx_path, cubin = os.path.join(d, "k.ptx"), os.path.join(d, "k.cubin")
        with open(ptx_path, "wb") as f:
            f.write(ptx.value)
        subprocess.run([os.path.join(nv, "bin", "ptxas"), f"-arch=sm_{arch}", ptx_path, "-o", cubin],
                       check=True)
        sass = subprocess.run([cuobjdump, "-sass", "-fun", kernel, cubin], env=env,
                              capture_output=True, text=True, check=True).stdout
    if os.environ.get("SASS_OUT"):  # the whole listing, for reading by hand
        with open(os.environ["SASS_OUT"], "w") as f:
            f.write(sass)
    runs = []  # [opcode, count]
    for line in sass.splitlines():
        m = re.search(r"\*/\s+(@!?U?P\w+\s+)?([A-Z][\w.]*)([^;]*);", line)
        if not m:
            continue
        op, args = m.group(2), m.group(3).strip()
        if op.startswith(("HGMMA", "MUFU.EX2", "BAR.", "NANOSLEEP")):
            key = op
        elif op == "WARPGROUP.DEPBAR.LE":
            key = f"{op} {args}"
        else:
            continue
        if runs and runs[-1][0] == key:
            runs[-1][1] += 1
        else:
            runs.append([key, 1])
    if not runs:
        sys.exit(f"no SASS for {kernel}")
    for key, n in runs:
        print(f"{n:4} {key}")
