#!/usr/bin/env bash
# The device check, as one command on a GPU machine with no network (see docs/results/gpu.md):
#   bash bench/gpu_device.sh bench/wheels   (the folder of carried Python 3.12 wheels; may be absent)
# 1. installs the carried wheels into /tmp/site (--no-deps, ahead of the machine's own packages),
# 2. bench/gpu.py: ours vs TRL on the Qwen3-shaped models (one JSON line per phase in $OUT/gpu.jsonl),
# 3. the CUDA tests (precision, CUDA-graph decode, fused head, multi-turn training) on the device,
# 4. the tiny training presets end to end on CUDA in bf16-mixed.
# Each part has its own time limit and writes under $OUT, so a part that fails or is cut off keeps the others.
set -u
WHEELS=${1:-bench/wheels}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=$(command -v python3 || command -v python)
if [ -d "$WHEELS" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || export PYTHONPATH=$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >"$OUT/smi.txt" 2>&1
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee "$OUT/versions.txt"
timeout "${GPU_BENCH_S:-280}" $PY bench/gpu.py --out-dir "$OUT" 2>&1 | grep -v Warning | tee "$OUT/bench.log" | tail -30
timeout "${GPU_TESTS_S:-100}" $PY -m pytest -q -p no:cacheprovider -x \
  tests/integration/test_cuda_decode.py tests/integration/test_precision.py tests/unit/test_fused_head.py \
  tests/integration/test_fused_update.py tests/integration/test_train_multiturn.py >"$OUT/pytest.txt" 2>&1
echo "pytest rc $?"; tail -8 "$OUT/pytest.txt"
for preset in tiny tiny_multiturn; do
  timeout "${GPU_TRAIN_S:-45}" $PY -m opdplus train --config "configs/$preset.yaml" run.dir="/tmp/runs/$preset" \
    run.precision=bf16-mixed run.steps=20 run.progress=none >"$OUT/train_$preset.txt" 2>&1
  echo "train $preset rc $?"; tail -4 "$OUT/train_$preset.txt"
done
