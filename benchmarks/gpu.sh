#!/usr/bin/env bash
# The GPU measurements, in one call on a lent GPU machine (at most about 5 minutes):
#   1. in one process, no Ray: the plain per-task loop against distmeta's core (loop, vmap, bf16
#      autocast) on CUDA, MAML Conv4 5-way 1-shot (strided and max-pool), meta-batch 32, and the
#      mini-ImageNet Conv4-32;
#   2. the full system (Ray, one GPU worker, the layout auto picks) on the strided case.
# Omniglot-shaped synthetic images (benchmarks/peers.py --synthetic): the shards need not travel,
# and a GPU step's time does not depend on what the pixels show.
#
# Prepare here (once):   bash ../shared/tools/device-ray-wheels.sh     # .whl/: Ray for Python 3.12
# Run (device tool):     run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=480)
# The results come back as $OUT/gpu.json and $OUT/gpu.log.
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.log"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.log"

# 1. in-process, CUDA, no Ray
timeout 240 python3 benchmarks/peers.py --device cuda --synthetic --no-system --bf16 --steps 20 \
  --case maml-strided --case maml-maxpool --case miniimagenet-conv4-32 --json "$OUT/gpu.json" 2>&1 | tee -a "$OUT/gpu.log"

# 2. the full system with one GPU worker: Ray from the carried wheels
if ls .whl/ray-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
  timeout 180 python3 benchmarks/peers.py --device cuda --synthetic --steps 20 --implementations loop vmap \
    --case maml-strided --json "$OUT/gpu_system.json" 2>&1 | tee -a "$OUT/gpu.log"
else
  echo "no .whl/ray-*.whl carried: skipped the full system (bash ../shared/tools/device-ray-wheels.sh)" | tee -a "$OUT/gpu.log"
fi
