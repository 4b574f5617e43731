#!/usr/bin/env bash
# The GPU measurements, in one call on a lent GPU machine (about 3 minutes; at most 6 by its timeouts):
#   1. in one process, no Ray: the plain per-task loop against distmeta's core (loop, vmap, bf16
#      autocast) on CUDA, MAML Conv4 5-way 1-shot (strided and max-pool), meta-batch 32, and the
#      mini-ImageNet Conv4-32;
#   2. the full system (Ray, one GPU worker, checked to have run on the GPU) on the strided case.
# Omniglot-shaped synthetic images (benchmarks/peers.py --synthetic): the shards need not travel,
# and a GPU step's time does not depend on what the pixels show.
#
# Prepare here (once):   bash ../shared/tools/device-ray-wheels.sh     # .whl/: Ray for Python 3.12
# Run (device tool):     run(command="bash benchmarks/gpu.sh", carry=[".whl"], timeout_s=400), then give_back
# The results come back as $OUT/gpu.json, $OUT/gpu_system.json and $OUT/gpu.log (each case's JSON is
# written as it finishes; a step that fails is logged and the next one still runs; Ray's logs come
# back as $OUT/ray_logs.tgz if the system step fails).
set -uo pipefail
status=0   # any failed step makes the script's exit status 1 (each is still logged, and the next one runs)
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" RAY_USAGE_STATS_ENABLED=0
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_mode --format=csv,noheader | tee "$OUT/gpu.log"
python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" \
  | tee -a "$OUT/gpu.log"

# 1. in-process, CUDA, no Ray
timeout -k 10 170 python3 benchmarks/peers.py --device cuda --synthetic --no-system --bf16 --steps 40 \
  --case maml-strided --case maml-maxpool --case miniimagenet-conv4-32 --json "$OUT/gpu.json" 2>&1 | tee -a "$OUT/gpu.log" \
  || { rc=${PIPESTATUS[0]}; status=1; echo "step 1 failed (rc $rc): what it measured is in gpu.json" | tee -a "$OUT/gpu.log"; }

# 2. the full system with one GPU worker: Ray from the carried wheels
if ls .whl/ray-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    || { status=1; echo "installing the carried Ray wheels failed" | tee -a "$OUT/gpu.log"; }
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
  # SIGKILL 10 s after the SIGTERM: distmeta's handler would otherwise wait for a logging step that a hang never reaches
  if ! timeout -k 10 150 python3 benchmarks/peers.py --device cuda --synthetic --steps 40 --implementations loop \
      --case maml-strided --json "$OUT/gpu_system.json" 2>&1 | tee -a "$OUT/gpu.log"; then
    rc=${PIPESTATUS[0]}; status=1; echo "step 2 failed (rc $rc): Ray's logs in ray_logs.tgz" | tee -a "$OUT/gpu.log"
    tar czf "$OUT/ray_logs.tgz" -C /tmp/ray/session_latest logs 2>/dev/null || true
  fi
else
  echo "no .whl/ray-*.whl carried: skipped the full system (bash ../shared/tools/device-ray-wheels.sh)" | tee -a "$OUT/gpu.log"
fi
exit "$status"
