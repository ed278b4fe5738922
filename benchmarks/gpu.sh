#!/usr/bin/env bash
# One GPU (H100/H200), about 10 minutes: Table 1 at the paper's protocol and the
# TJML-DTP / BP step-time ratios of LeNet, Simplified-VGG and the MLP-Mixer.
#
#   benchmarks/gpu.sh                     # from anywhere; needs no network
#   OUT=/path GPU_DATASETS=mnist benchmarks/gpu.sh
#   GPU_TINY=1 OUT=/tmp/x benchmarks/gpu.sh   # machinery check on CPU, a few minutes
#
# What runs, in this order:
#   1. the hardware line (nvidia-smi -L and JAX's devices) -> summary.md
#   2. Table 1 accuracy, profile `paper`: the configs' epochs, 5 seeds in one program
#      per (dataset, method), TJML-DTP, BP and FWDTP, on GPU_DATASETS
#   3. speed (profile `paper`'s timing plan, synthetic images of the real shapes: a
#      step's time does not depend on the pixel values): TJML-DTP and BP steps of LeNet
#      (Table 1: MNIST and CIFAR-10 shapes), VGG (Table 2) and the Mixer (Table 3)
#   4. LDRL on GPU_DATASETS, 5 seeds in one program, for the seconds left of
#      GPU_BUDGET_S (split evenly over the datasets; `train_seconds`: it stops at the
#      first host sync after its share), skipped when nothing is left
#   5. table1.md (+ accuracy curves and accuracy against wall-clock), table2.md and
#      table3.md (speed rows), summary.md, gpu.log and results.tar.gz (every run's
#      result.json, metrics.jsonl, evals.jsonl and the speed files) in $OUT
#
# Environment:
#   OUT           output folder (default runs/gpu); the runs themselves (checkpoints
#                 included) go to GPU_WORKDIR (default $OUT/runs)
#   GPU_DATASETS  Table 1 columns (default mnist,fashion_mnist, and cifar10 when its
#                 files are found under $TP_JAX_DATA or the loader's other places; the
#                 CIFAR-10 binaries are 184 MB: see BUILD_NOTES "GPU script")
#   GPU_BUDGET_S  the whole script's wall-clock target in seconds (default 600): what is
#                 left after steps 1-3 is LDRL's
#   GPU_TINY=1    the smoke profile on synthetic data, 2 seeds: checks the machinery
#                 anywhere (tests/test_gpu_script.py runs it)
#   PYTHON        the interpreter (default python3)
#
# Nothing is installed from the network: tp_jax is imported from this checkout
# (PYTHONPATH), the other packages must be there already. ml_collections, the one the
# GPU image lacks, is installed from a wheel in .whl/ when one is there (offline).
set -euo pipefail

cd "$(dirname "$0")/.."
START=$(date +%s)
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu}
WORK=${GPU_WORKDIR:-$OUT/runs}
BUDGET=${GPU_BUDGET_S:-600}
mkdir -p "$OUT" "$WORK"
LOG="$OUT/gpu.log"
: >"$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

say() { echo "[gpu.sh $(($(date +%s) - START)) s] $*" | tee -a "$LOG"; }
elapsed() { echo $(($(date +%s) - START)); }

# --- packages: present, or ml_collections from a local wheel; never the network
if ! "$PY" -c 'import ml_collections' 2>/dev/null && compgen -G '.whl/ml_collections-*.whl' >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --target /tmp/tp_jax_gpu_site .whl/ml_collections-*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/tp_jax_gpu_site"
  say "installed ml_collections from .whl/ (offline)"
fi
if ! missing=$("$PY" - <<'EOF'
import importlib.util
need = ['jax', 'flax', 'optax', 'chex', 'absl', 'ml_collections', 'orbax.checkpoint', 'numpy',
        'tensorboard', 'matplotlib']
gone = [n for n in need if importlib.util.find_spec(n.split('.')[0]) is None]
print(' '.join(gone))
raise SystemExit(1 if gone else 0)
EOF
); then
  say "missing Python packages: $missing. This script installs nothing from the network;"
  say "bring them as wheels into .whl/ (device README) or pip install them first."
  exit 1
fi

if [[ "${GPU_TINY:-0}" == 1 ]]; then
  PROFILE=smoke
  SEEDS=(--num_seeds=2)
  COMMON=(--profile=smoke --data=synthetic "${SEEDS[@]}")
  DATASETS=${GPU_DATASETS:-mnist,fashion_mnist,cifar10}
  say "GPU_TINY=1: smoke profile on synthetic data, 2 seeds: a machinery check, not results"
else
  PROFILE=paper
  SEEDS=() # the profile's: 0..4
  COMMON=(--profile=paper --data=real)
  if [[ -z "${GPU_DATASETS:-}" ]]; then
    if "$PY" -c '
from tp_jax import data
root = data.resolve_data_dir()
raise SystemExit(0 if all(p.is_file() for s in data.SPLITS for p in data.expected_paths("cifar10", s, root)) else 1)
' 2>/dev/null; then
      DATASETS=mnist,fashion_mnist,cifar10
    else
      DATASETS=mnist,fashion_mnist
      say "CIFAR-10's files are not here: Table 1 runs MNIST and Fashion-MNIST only"
    fi
  else
    DATASETS=$GPU_DATASETS
  fi
fi
N_DATASETS=$(echo "$DATASETS" | tr ',' '\n' | grep -c .)
REPRO=("$PY" -m experiments.reproduce --workdir="$WORK" "${COMMON[@]}")

# --- 1. hardware
HW=$("$PY" -c '
from experiments.reproduce import report
from tp_jax import train
print(report.hardware_line(train.hardware()))')
GPUS=$(nvidia-smi -L 2>/dev/null || echo 'nvidia-smi: none')
say "hardware: $HW; $GPUS"
say "Table 1 columns: $DATASETS; profile $PROFILE"

# --- 2. Table 1 accuracy: TJML-DTP, BP, FWDTP
T0=$(elapsed)
"${REPRO[@]}" --table=1 --what=accuracy --columns="$DATASETS" --methods=tjml_dtp,bp,fwdtp 2>&1 | tee -a "$LOG" >/dev/null
ACC_S=$(($(elapsed) - T0))
say "Table 1 TJML-DTP, BP, FWDTP done in $ACC_S s"

# --- 3. step-time ratios (synthetic images of the real shapes)
T0=$(elapsed)
SPEED=("$PY" -m experiments.reproduce --workdir="$WORK" --profile="$PROFILE" --data=synthetic)
"${SPEED[@]}" --table=1 --what=speed --columns=mnist,cifar10 --methods=tjml_dtp,bp 2>&1 | tee -a "$LOG" >/dev/null
"${SPEED[@]}" --table=2 --what=speed --methods=tjml_dtp,bp 2>&1 | tee -a "$LOG" >/dev/null
"${SPEED[@]}" --table=3 --what=speed --methods=tjml_dtp,bp 2>&1 | tee -a "$LOG" >/dev/null
SPEED_S=$(($(elapsed) - T0))
say "speed of LeNet, VGG, Mixer done in $SPEED_S s"

# --- 4. LDRL for what is left (30 s kept for compiling each run and for the tables)
LEFT=$((BUDGET - $(elapsed) - 30))
PER=$(((LEFT - 30 * N_DATASETS) / N_DATASETS))
WHY="the rest of $BUDGET s"
if [[ "${GPU_TINY:-0}" == 1 ]]; then PER=1 WHY="GPU_TINY"; fi
T0=$(elapsed)
if ((PER > 0)); then
  say "LDRL: $PER s of training per dataset ($LEFT s left of $BUDGET)"
  "${REPRO[@]}" --table=1 --what=accuracy --columns="$DATASETS" --methods=ldrl \
    --ldrl_seconds="$PER" 2>&1 | tee -a "$LOG" >/dev/null
  LDRL_NOTE="LDRL: a training budget of $PER s per dataset ($WHY), done in $(($(elapsed) - T0)) s"
else
  LDRL_NOTE="LDRL: skipped, no time left of $BUDGET s"
fi
say "$LDRL_NOTE"

# --- 5. tables, summary, results
for t in 1 2 3; do
  cols=()
  if [[ $t == 1 ]]; then cols=(--columns="$DATASETS"); fi
  "$PY" -m experiments.reproduce --workdir="$WORK" --profile="$PROFILE" --table=$t --what=table \
    "${cols[@]}" "${SEEDS[@]}" >/dev/null 2>>"$LOG"
  cp "$WORK/$PROFILE/table$t.md" "$OUT/"
done
cp "$WORK/$PROFILE/table1_curves.png" "$WORK/$PROFILE/table1_time.png" "$OUT/"
(cd "$WORK" && find . \( -name result.json -o -name metrics.jsonl -o -name evals.jsonl \
  -o -name 'speed_*.json' -o -name diverged.json \) -print0 | tar -czf - --null -T -) \
  >"$OUT/results.tar.gz"
{
  echo "# benchmarks/gpu.sh ($PROFILE profile)"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ); total $(elapsed) s (target $BUDGET s)"
  echo "- hardware: $HW; $GPUS"
  echo "- Table 1 columns: $DATASETS; TJML-DTP, BP, FWDTP in $ACC_S s; $LDRL_NOTE"
  echo "- speed (LeNet, VGG, Mixer; TJML-DTP and BP) in $SPEED_S s"
  echo
  echo "TJML-DTP / BP time per step:"
  echo
  grep -h 'TJML-DTP time per step / BP' "$OUT"/table[123].md || echo '(none measured)'
} >"$OUT/summary.md"
say "wrote $OUT/summary.md, table1.md, table2.md, table3.md, table1_curves.png, table1_time.png, results.tar.gz"
