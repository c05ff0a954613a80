#!/bin/bash
# The paper-scale run on a GPU machine, in one short script: simulate 5e6 clusters, train the `paper`
# architecture for a fixed time budget (one or more batch/lr settings side by side), then SBC on 10,000 test
# clusters for each.
#
#     OUT=runs/gpu TRAIN_MIN=5.5 RUNS="paper:2048:5e-4 big:8192:1e-3" bash benchmarks/gpu_paper.sh
#
# RUNS lists name:batch:lr. The number of epochs of each is chosen from its measured training throughput
# (times SLOWDOWN for runs sharing the GPU) so that the cosine learning-rate decay ends inside TRAIN_MIN
# minutes; the epochs used are recorded in each run's config.json. Small settings (N_SIM=20000 N_TEST=2000
# TRAIN_MIN=0.3 DEVICE=cpu) check the wiring on a CPU in a minute or two.
# Results: OUT/<name>.tgz (model, config, metrics, history, training log, SBC) and OUT/log.txt.
set -u -o pipefail
OUT=${OUT:-runs/gpu}; TRAIN_MIN=${TRAIN_MIN:-5.5}; N_SIM=${N_SIM:-5000000}; N_TEST=${N_TEST:-100000}
DEVICE=${DEVICE:-cuda}; SEED=${SEED:-0}; W=${WORK:-/tmp/paper_run}; RUNS=${RUNS:-"paper:2048:5e-4"}
SLOWDOWN=${SLOWDOWN:-0.9}
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
mkdir -p "$OUT" "$W"
exec > >(tee "$OUT/log.txt") 2>&1
PY=python3
stamp() { echo "[gpu_paper $(date +%H:%M:%S)] $*"; }
pack() {
  stamp "packing"
  for spec in $RUNS; do
    name=${spec%%:*}
    [ -f "$W/$name.log" ] && cp "$W/$name.log" "$W/$name/train.log"
    tar czf "$OUT/$name.tgz" -C "$W" --ignore-failed-read "$name/model.pt" "$name/config.json" \
      "$name/metrics.json" "$name/history.npz" "$name/train.log" "sbc_$name" 2>/dev/null
  done
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

epochs_for() {   # batch -> epochs that fit TRAIN_MIN at the measured throughput
  $PY - "$DEVICE" "$TRAIN_MIN" "$N_SIM" "$N_TEST" "$1" "$SLOWDOWN" <<'EOF'
import sys
import torch
sys.path.insert(0, "benchmarks")
import bench_train, train
device, minutes, n_sim, n_test = torch.device(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
cfg = train.resolve_config("paper", batch_size=int(sys.argv[5]))
sps, _ = bench_train.train_throughput(cfg, 200 if device.type == "cuda" else 20, device)
n_train = n_sim - 2 * n_test
epochs = max(1, min(cfg["train"]["epochs"], int(float(sys.argv[6]) * minutes * 60 * sps / n_train)))
print(f"training throughput {sps:.0f} samples/s alone -> {epochs} epochs of {n_train} in {minutes} min",
      file=sys.stderr)
print(epochs)
EOF
}

pids=()
for spec in $RUNS; do           # runs train side by side: each is bound by its own kernel launches
  IFS=: read -r name batch lr <<<"$spec"
  stamp "measuring training throughput of $name (batch $batch)"
  epochs=$(epochs_for "$batch") || exit 1
  stamp "train $name: paper architecture, batch $batch, lr $lr, $epochs epochs"
  $PY train.py --data "$W/data" --out "$W/$name" --profile paper --epochs "$epochs" --batch-size "$batch" \
    --lr "$lr" --seed "$SEED" --device "$DEVICE" --max-minutes "$($PY -c "print($TRAIN_MIN + 0.5)")" \
    --n-eval 10000 > "$W/$name.log" 2>&1 &
  pids+=($!)
done
wait "${pids[@]}"
for spec in $RUNS; do
  name=${spec%%:*}
  stamp "run $name"; tail -6 "$W/$name.log"
  $PY evaluate.py sbc --model "$W/$name" --obs "$W/data/test.npz" --n 10000 --L 100 --seed "$SEED" \
    --device "$DEVICE" --out "$W/sbc_$name"
done
stamp "done"
