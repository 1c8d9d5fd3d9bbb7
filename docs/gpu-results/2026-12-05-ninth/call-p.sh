#!/usr/bin/env bash
# Device call P (written in the ninth session, when no device was lent; ~40 s): the CUDA backend's
# forward_every_logit (prompt log probabilities) against prefill-then-decode on the GPU,
# and the other GPU tests of cuda::check_sampling if time allows. Carry .gpu15
# (engine-tests.xz: `cargo test --release -p tandem-engine --features cuda --lib --no-run`
# of this checkout, stripped; `WHICH=15 bash scripts/gpu-pending/prepare.sh`). When it
# passes, `CudaBackend::computes_every_logit` (engine/src/cuda/mod.rs) turns true and a
# GPU decode node serves prompt_logprobs.
set -u
O=${OUT:-/tmp/out}/p; mkdir -p "$O"
NV=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
export LD_LIBRARY_PATH=$NV/cu13/lib:${LD_LIBRARY_PATH:-}
python3 -c "import lzma,sys; open('/tmp/et','wb').write(lzma.open(sys.argv[1]).read())" .gpu15/engine-tests.xz
chmod +x /tmp/et
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$O/env.txt"
timeout -s KILL 25 /tmp/et --ignored gpu_every_logit --test-threads 1 > "$O/every-logit.md" 2>&1
echo "every-logit rc=$?"; grep -E "^test |test result|panicked|assert" "$O/every-logit.md" | head
timeout -s KILL 20 /tmp/et --ignored cuda::check_sampling --test-threads 1 > "$O/check-sampling.md" 2>&1
echo "check_sampling rc=$?"; grep -E "^test |test result" "$O/check-sampling.md" | head
