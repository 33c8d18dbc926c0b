#!/usr/bin/env bash
# The GPU check of issue 15, in one command and at most 6 minutes on one NVIDIA GPU:
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [--cpu]
#
# Writes one Markdown file per section to OUT_DIR (default: $OUT, else ./gpu_check):
#   rounds.md      fedvp_jax against seed-style PyTorch, torch.func.vmap and torch.compile, on
#                  FedAvg and FedGen with the Transformer and the LSTM (the researcher's setting)
#   heatmaps.md    10 x 640 viewpoints at grain 256: fedvp_jax, vectorised torch, the loop
#   arithmetic.md  FLOPs counted per loop iteration and the fraction of the matmul rate
#   scale.md       FedAvg rounds of 10 ... 10,000 clients, until memory runs out
#   end-to-end.md  300 FedGen rounds, David-m10-h1, Transformer, 10 users, local_epochs 10,
#                  batch 64, lr 0.01, evaluation every round
# and check.log with everything printed. Each section has its own time limit, so one that
# overruns is reported in check.log (and its table is missing) while the others still run. Needs only this repository, JAX with
# CUDA and (for the PyTorch rows) torch; it pip-installs the repository if fedvp_jax is not
# importable. The David traces come from $FEDVP_DATA, else shared/data or ../shared/data;
# without them the rounds use the Synthetic dataset, and the tables say so.
#
# --cpu runs the same path on the CPU with tiny workloads and the LSTM, compiled without
# optimisation (CI: tests/test_gpu_check.py); its times mean nothing.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${OUT:-gpu_check}"
CPU=0
for arg in "$@"; do
  case "$arg" in
    --cpu) CPU=1 ;;
    -*) echo "unknown option $arg" >&2; exit 2 ;;
    *) OUT_DIR="$arg" ;;
  esac
done
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
LOG="$OUT_DIR/check.log"
: > "$LOG"
PYTHON="${PYTHON:-python3}"
# This checkout, not whatever fedvp_jax may be installed elsewhere.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if ! "$PYTHON" -c "import fedvp_jax" 2>/dev/null; then
  "$PYTHON" -m pip install -q -e "$REPO" >> "$LOG" 2>&1
fi

if [ -z "${FEDVP_DATA:-}" ]; then
  for root in "$REPO/shared/data" "$REPO/../shared/data"; do
    if [ -d "$root/David_MMSys_18/sampled_dataset" ]; then
      export FEDVP_DATA="$root"
      break
    fi
  done
fi
DATASET="David-m10-h1"
if [ -z "${FEDVP_DATA:-}" ] || [ ! -d "$FEDVP_DATA/David_MMSys_18/sampled_dataset" ]; then
  DATASET="Synthetic-m10-h1"
  echo "David traces not found: using $DATASET" | tee -a "$LOG"
fi

if [ "$CPU" = 1 ]; then
  # A test of the path, not of speed: tiny workloads, XLA's quickest compiles (no LLVM
  # optimisation, and the older loop emitters, which compile the tiny FedGen round about 2x
  # faster than the fusion emitters), torch.compile's minutes of compiling left out, and every
  # section in one process (each start imports JAX and torch again).
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
  COMMON=(--device cpu --tiny --repeats 1)
  SECTIONS=("rounds,heatmaps 600 --algos fedgen --models lstm --torch vmap --scale-clients 2 --end-to-end 2")
else
  COMMON=(--device gpu --repeats 3 --dataset "$DATASET")
  # (sections, seconds allowed, their options): 345 s in all. The rounds section compiles
  # every round with torch.compile and runs the seed-style loops, hence 2 timed rounds.
  SECTIONS=(
    "rounds 170 --torch seed,vmap,compile --repeats 2"
    "heatmaps 15"
    "arithmetic 45"
    "none 55 --scale-clients 10,100,1000,10000"
    "none 60 --end-to-end 300"
  )
fi

status=0
for entry in "${SECTIONS[@]}"; do
  read -r sections seconds options <<< "$entry"
  echo "== $sections $options (at most ${seconds} s)" | tee -a "$LOG"
  # shellcheck disable=SC2086  # options are words on purpose
  if ! timeout "$seconds" "$PYTHON" "$REPO/benchmarks/run.py" "${COMMON[@]}" \
    --sections "$sections" $options --out-dir "$OUT_DIR" >> "$LOG" 2>&1; then
    echo "   did not finish within ${seconds} s or failed: see $LOG" | tee -a "$LOG"
    status=1
  fi
done
echo "tables in $OUT_DIR" | tee -a "$LOG"
exit "$status"
