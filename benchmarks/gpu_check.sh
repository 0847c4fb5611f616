#!/usr/bin/env bash
# The GPU checks, as one prepared run for a machine with a CUDA device (CI has none):
#   1. every test marked `gpu` (true fp16 loss scaling, autocast bounds, half-precision capture agreement, keyed
#      noise and projections on CUDA), and tests/gradients, whose engine tests also run on CUDA when it is there;
#   2. the GPU rows of bench_factored.py: fp32 / 16-mixed / bf16-mixed Kronecker-projected sweeps of a 28x28 ConvVAE
#      over 60,000 images with their agreement with fp32 (Spearman per query, top-10 overlap), and a projected top-10
#      of 10,000 queries against 1,000,000 x 10,000 rows (time and peak GPU memory).
# From the repository root: bash benchmarks/gpu_check.sh [--quick]   (--quick: 6,000 images, 100,000 rows)
set -uo pipefail
cd "$(dirname "$0")/.."
# The package from this tree, without installing (a GPU machine may have no network); its dependencies must be there.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python -c "import lightning_influence" || { echo "missing dependencies of lightning_influence (pyproject.toml)"; exit 1; }
python - <<'PY' || exit 1
import torch
assert torch.cuda.is_available(), "no CUDA device: nothing to check here"
print("torch", torch.__version__, "|", torch.cuda.get_device_name(), "|", round(torch.cuda.get_device_properties(0).total_memory / 2**30), "GiB")
PY
status=0
python -m pytest -q -p no:cacheprovider -m gpu tests || status=$?
python -m pytest -q -p no:cacheprovider -m "not gpu" tests/gradients || status=$?
python benchmarks/bench_factored.py --gpu-only "$@" || status=$?
exit $status
