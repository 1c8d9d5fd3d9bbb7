"""cuBLAS through torch (cublasLt with its heuristics) on the 8B model's products, to
compare with `tandem-gpu-bench kernels` (cublasGemmEx, default algorithm): µs and
TFLOP/s per product and row count, median of 30 after 5 warm-ups."""
import torch

SHAPES = [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096),
          ("down", 4096, 14336), ("lm_head", 128256, 4096)]
print(f"## torch {torch.__version__} matmul bf16 on {torch.cuda.get_device_name()}\n")
print("| product (out × in) | rows | µs | TFLOP/s | weight GB/s |")
print("|---|---|---|---|---|")
for name, n, k in SHAPES:
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    for m in (1, 64, 128, 256, 8192):
        if name == "lm_head" and m == 8192:
            continue
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        for _ in range(5):
            torch.matmul(x, w.t())
        times = []
        for _ in range(30):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(); torch.matmul(x, w.t()); b.record(); b.synchronize()
            times.append(a.elapsed_time(b) * 1e3)
        us = sorted(times)[len(times) // 2]
        print(f"| {name} ({n} × {k}) | {m} | {us:.1f} | {2*m*n*k/us/1e6:.0f} | {n*k*2/us/1e3:.0f} |")
