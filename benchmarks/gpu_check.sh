#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (BENCHMARKS.md "GPU"). Installs nothing: that
# machine has torch, torchvision, safetensors, typer, rich, pyyaml, pytest, scikit-learn. DALI is
# used from /tmp/dali_site when benchmarks/gpu_dali_chunk.sh has put it there (the wheel is too
# big for one transfer); otherwise the DALI steps say they were not run.
#
#   bash benchmarks/gpu_check.sh            # GPU_CHECK_BUDGET_S=400 bounds the whole run
#
# Every step runs under `timeout`, bounded by what is left of the budget; a failing step is
# reported (FAIL, its exit code) and the script goes on; the exit code is non-zero when any
# step failed. Prints one table at the end; the full log and JSON results land in $OUT
# (default ./gpu-results): gpu_check.log, train_step.json, cudnn_benchmark.json, e2e.json,
# reid_features.json, data.json.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
OUT="${OUT:-gpu-results}"
mkdir -p "$OUT"
PY=${PY:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-400}
LOG="$OUT/gpu_check.log"

if ! $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: no CUDA device found (torch.cuda.is_available() is false here): nothing was checked"
    exit 2
fi
[ -d /tmp/dali_site ] && export PYTHONPATH="$PYTHONPATH:/tmp/dali_site"

exec > >(tee "$LOG") 2>&1
declare -a TABLE=()
FAILED=0

# step NAME LIMIT_S CMD...: run CMD under min(LIMIT_S, budget left); record ok / FAIL / SKIP.
step() {
    local name=$1 limit=$2 left rc t0
    shift 2
    left=$((BUDGET - SECONDS))
    if [ "$left" -lt 20 ]; then
        TABLE+=("$(printf '%-28s %-6s %s' "$name" SKIP "budget spent")")
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit} s)"
    t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    if [ "$rc" -eq 0 ]; then
        TABLE+=("$(printf '%-28s %-6s %4d s' "$name" ok $((SECONDS - t0)))")
    else
        FAILED=1
        local why="exit $rc"
        [ "$rc" -eq 124 ] && why="timed out after ${limit} s"
        TABLE+=("$(printf '%-28s %-6s %4d s  %s' "$name" FAIL $((SECONDS - t0)) "$why")")
    fi
}

echo "== machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY - <<'EOF'
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
try:
    import nvidia.dali as dali
    print(f"DALI {dali.__version__}")
except Exception as e:  # noqa: BLE001
    print(f"DALI not importable ({type(e).__name__}: {e}): DALI GPU tests skip, DALI rows not run")
EOF
HAVE_DALI=0
$PY -c 'import nvidia.dali' >/dev/null 2>&1 && HAVE_DALI=1

step "pytest -m gpu" 170 $PY -m pytest -q -m gpu -p no:cacheprovider -rs tests
step "train step fp16/bf16 x CL" 120 $PY benchmarks/bench_train_step.py --profile r50-3090x8 \
    --precision fp16 bf16 --channels-last on off --batch 196 --steps 15 --warmup 5 \
    --json "$OUT/train_step.json"
BACKENDS="torchvision"
[ "$HAVE_DALI" = 1 ] && BACKENDS="dali torchvision"
step "pretrain e2e + resume" 170 $PY benchmarks/bench_pretrain_e2e.py --make 2000 \
    --backend $BACKENDS --batch 196 --precision bf16 --workers 14 --steps 20 --resume-steps 4 \
    --json "$OUT/e2e.json"
step "eval-reid features" 60 $PY benchmarks/bench_reid_features.py --n 4096 --batch 256 \
    --workers 14 --precision bf16 fp32 --json "$OUT/reid_features.json"
if [ "$HAVE_DALI" = 1 ]; then
    step "data loaders (no model)" 60 $PY benchmarks/bench_data.py --n 384 --batch 64 \
        --workers 4 8 --json "$OUT/data.json"
fi
# train.cudnn_benchmark (off by default): multi-resolution inputs change shape most steps, so
# autotuning may cost more than it gains; this row decides. (torch.compile, run here before,
# did not finish compiling in 145 s on the H200: dropped.)
step "train step bf16 cudnn.benchmark" 120 $PY benchmarks/bench_train_step.py --profile r50-3090x8 \
    --precision bf16 --channels-last on --cudnn-benchmark on --batch 196 --steps 15 --warmup 5 \
    --json "$OUT/cudnn_benchmark.json"

echo
echo "== summary ($SECONDS s in all; DALI importable: $([ "$HAVE_DALI" = 1 ] && echo yes || echo no))"
printf '%s\n' "${TABLE[@]}"
$PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def rows(name):
    p = out / name
    return json.loads(p.read_text()) if p.is_file() else []
for r in rows("train_step.json") + rows("cudnn_benchmark.json"):
    print(f"train step {r['precision']} channels_last={r['channels_last']} "
          f"cudnn.benchmark={r.get('cudnn_benchmark', False)}: "
          f"{r['img_per_s']:.0f} img/s, peak {r['peak_mem_gib']:.1f} GiB, "
          f"loss+LARS+EMA {r['loss_opt_share']:.1%}, MFU {r.get('mfu', 0):.1%}")
for r in rows("e2e.json"):
    print(f"pretrain e2e {r['backend']}: ok={r['ok']} {r['img_per_s']:.0f} img/s "
          f"loss {r['last_loss']:.4f} ckpt step {r['ckpt_step']} resumed at {r['resumed_from']}")
for r in rows("reid_features.json"):
    print(f"eval-reid features {r['precision']}: {r['img_per_s']:.0f} img/s")
EOF
exit $FAILED
