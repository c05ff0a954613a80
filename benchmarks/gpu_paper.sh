#!/bin/bash
# The paper-scale run on a GPU machine, in one short script: simulate 5e6 clusters, train the `paper` profile
# for a fixed time budget, then SBC on 10,000 test clusters and the throughput benchmark on the GPU.
#
#     OUT=runs/gpu TRAIN_MIN=5.5 bash benchmarks/gpu_paper.sh
#
# The number of epochs is chosen from a measured training throughput so that the cosine learning-rate decay
# ends inside TRAIN_MIN minutes (the epochs used are recorded in the run's config.json). Small settings
# (N_SIM=20000 N_TEST=2000 TRAIN_MIN=0.3 DEVICE=cpu) check the wiring on a CPU in a minute.
# Results: OUT/paper_run.tgz (model, config, metrics, history, SBC) and OUT/log.txt.
set -u -o pipefail
OUT=${OUT:-runs/gpu}; TRAIN_MIN=${TRAIN_MIN:-5.5}; N_SIM=${N_SIM:-5000000}; N_TEST=${N_TEST:-100000}
DEVICE=${DEVICE:-cuda}; SEED=${SEED:-0}; W=${WORK:-/tmp/paper_run}
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
mkdir -p "$OUT" "$W"
exec > >(tee "$OUT/log.txt") 2>&1
PY=python3
stamp() { echo "[gpu_paper $(date +%H:%M:%S)] $*"; }
pack() {
  stamp "packing"
  tar czf "$OUT/paper_run.tgz" -C "$W" --ignore-failed-read run/model.pt run/config.json run/metrics.json \
    run/history.npz sbc 2>/dev/null
  ls -la "$OUT"
}
trap pack EXIT

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, numpy, scipy; print('torch', torch.__version__, 'numpy', numpy.__version__,
'scipy', scipy.__version__, 'cuda', torch.cuda.is_available())"
stamp "simulate $N_SIM"
$PY simulate.py --n "$N_SIM" --seed "$SEED" --out "$W/sim.npz" || exit 1
$PY preprocess.py --sim "$W/sim.npz" --out "$W/data" --n-val "$N_TEST" --n-test "$N_TEST" --seed "$SEED" \
  || exit 1
rm -f "$W/sim.npz"
stamp "measuring training throughput"
EPOCHS=$($PY - "$DEVICE" "$TRAIN_MIN" "$N_SIM" "$N_TEST" <<'EOF'
import sys
import torch
sys.path.insert(0, "benchmarks")
import bench_train, train
device, minutes, n_sim, n_test = torch.device(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
cfg = train.resolve_config("paper")
sps, _ = bench_train.train_throughput(cfg, 300 if device.type == "cuda" else 20, device)
n_train = n_sim - 2 * n_test
epochs = max(1, min(cfg["train"]["epochs"], int(0.92 * minutes * 60 * sps / n_train)))
print(f"training throughput {sps:.0f} samples/s -> {epochs} epochs of {n_train} in {minutes} min", file=sys.stderr)
print(epochs)
EOF
) || exit 1
stamp "train paper profile, $EPOCHS epochs"
$PY train.py --data "$W/data" --out "$W/run" --profile paper --epochs "$EPOCHS" --seed "$SEED" \
  --device "$DEVICE" --max-minutes "$($PY -c "print($TRAIN_MIN + 1)")" --n-eval 10000 || exit 1
stamp "SBC"
$PY evaluate.py sbc --model "$W/run" --obs "$W/data/test.npz" --n 10000 --L 100 --seed "$SEED" \
  --device "$DEVICE" --out "$W/sbc" || exit 1
stamp "throughput"
OMP_NUM_THREADS=1 $PY benchmarks/bench_evaluate.py --model "$W/run" --obs "$W/data/test.npz" --n 300 \
  --device "$DEVICE" --seed "$SEED"
$PY benchmarks/bench_train.py --profile paper --threads 1 --steps 300 --device "$DEVICE"
stamp "done"
