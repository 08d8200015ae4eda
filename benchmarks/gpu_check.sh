#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (see BENCHMARKS.md). It installs nothing: that
# machine has torch, torchvision, safetensors, typer, rich and pyyaml. pytest (pure Python) is used
# from wheels carried in .gpu-wheels/ if the machine lacks it (`pip download -d .gpu-wheels pytest`).
# Prints a short table; results also land in $OUT (or ./gpu-results) as JSON.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if ! $PY -m pytest --version >/dev/null 2>&1 && [ -d .gpu-wheels ]; then
    $PY -m pip install -q --no-index --find-links .gpu-wheels pytest >/dev/null 2>&1 || true
fi

echo "== GPU tests (pytest -m gpu)"
if $PY -m pytest --version >/dev/null 2>&1; then
    timeout 240 $PY -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -n 15
else
    echo "pytest not available: GPU tests NOT run"
fi

echo "== ResNet-50 Triplet train step, micro-batch 196, channels_last"
timeout 240 $PY benchmarks/bench_train_step.py --profile r50-3090x8 --precision fp16 bf16 --batch 196 \
    --steps 15 --warmup 5 --json "$OUT/train_step.json"

echo "== truncated triplet loss: vectorised vs loop"
timeout 60 $PY benchmarks/bench_loss.py --json "$OUT/loss.json" 2>&1 | tail -n 8

echo "== LARS / target update"
timeout 60 $PY benchmarks/bench_lars.py --json "$OUT/lars.json" 2>&1 | tail -n 8

echo "== DALI data path: two-view throughput, torchvision vs DALI cpu vs DALI mixed (nvJPEG)"
# The DALI GPU tests (tests/test_dali.py, marked gpu and dali) ran with `pytest -m gpu` above.
if $PY -c "import nvidia.dali" >/dev/null 2>&1; then
    timeout 300 $PY benchmarks/bench_data.py --n 384 --batch 64 --workers 2 4 \
        --json "$OUT/data.json" 2>&1 | tail -n 12
else
    echo "nvidia.dali not importable: DALI GPU tests skipped and throughput NOT measured" \
        "(needs nvidia-dali-cuda130, the dali extra)"
fi
