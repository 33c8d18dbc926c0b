#!/usr/bin/env bash
# The researcher's weekly table at the researcher's 300 rounds on one GPU (issue 12): wall time
# of the whole `fedvp sweep weekly-table` command (15 runs x 2 seeds, David-m10-h1, Transformer,
# 10 clients, compile included), to set beside the 2.7 h one FedGen run took in PyTorch.
#
#   bash benchmarks/gpu_weekly_table.sh [ROUNDS] [LIMIT_SECONDS]
#
# Writes to $OUT (else ./gpu_weekly): results.md (the sweep's table), times.csv (per run: its
# rounds, first round incl. compile, median round, wall seconds) and sweep.log. Runs still going
# when LIMIT_SECONDS pass are cut; the finished ones are reported. Needs JAX with CUDA and the
# David traces in $FEDVP_DATA (else shared/data or gpu_data beside this repository's root).
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ROUNDS="${1:-300}"
LIMIT="${2:-480}"
OUT_DIR="${OUT:-gpu_weekly}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
for root in "${FEDVP_DATA:-}" "$REPO/shared/data" "$REPO/gpu_data"; do
  if [ -n "$root" ] && [ -d "$root/David_MMSys_18" ]; then export FEDVP_DATA="$root"; break; fi
done
PYTHON="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT_DIR/device.txt" 2>&1
"$PYTHON" -c "import jax; print(jax.__version__, jax.devices())" >> "$OUT_DIR/device.txt" 2>&1
SWEEP=/tmp/gpu-weekly-sweep
rm -rf "$SWEEP"
SECONDS=0
timeout "$LIMIT" "$PYTHON" -m fedvp_jax sweep weekly-table --rounds "$ROUNDS" --out "$SWEEP" \
  --device gpu --no-progress > "$OUT_DIR/sweep.log" 2>&1
status=$?
echo "exit $status; whole sweep command: $SECONDS s for $ROUNDS rounds" | tee -a "$OUT_DIR/sweep.log"
cp "$SWEEP/results.md" "$OUT_DIR/" 2>/dev/null
"$PYTHON" - "$SWEEP" > "$OUT_DIR/times.csv" <<'PY'
import json, pathlib, sys
print("run,rounds,seeds_together,first_round_s,median_round_s,wall_s")
for summary in sorted(pathlib.Path(sys.argv[1]).glob("*/seed0/summary.json")):
  s = json.loads(summary.read_text())
  print(f"{summary.parent.parent.name},{s['rounds']},{s['seeds_together']},"
        f"{s['first_round_seconds']:.2f},{s['median_round_seconds']:.4f},{s['wall_seconds']:.1f}")
PY
cat "$OUT_DIR/times.csv"
