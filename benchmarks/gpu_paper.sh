#!/bin/bash
# The paper-scale run on a GPU machine, in one short script: simulate 5e6 clusters, train the `full`
# profile for a number of epochs chosen to fit a time budget (one or more settings side by side), then SBC on 10,000 test clusters
# for each.
#
#     OUT=runs/gpu TRAIN_MIN=5.5 RUNS="full:16384:1.5e-3 big:16384:1.5e-3:big.json" bash benchmarks/gpu_paper.sh
#
# Budget a 15-minute lend: ~1.5 min to start the machine, ~0.5 min to simulate and split, the target transform
# (3.2 min for two runs of 4.9e6 clusters on 16 cores with the age profile), TRAIN_MIN, ~0.3 min to evaluate.
#
# RUNS lists name:batch:lr[:config], config being a JSON file as for train.py --config (overrides the full
# profile for that run; CONFIG gives one for the runs without their own; METHOD refined or paper). WORKERS processes per run do the
# one-off target transform (default: the cores shared among the runs; the age profile costs ~0.2 ms per
# cluster). SBC=0 skips the on-device SBC (run it later on any machine from the returned model). The number of
# epochs of each run is chosen from its measured training throughput (times SLOWDOWN for runs sharing the GPU)
# so that the cosine learning-rate decay ends inside TRAIN_MIN minutes; the epochs used are recorded in each
# run's config.json. Small settings (N_SIM=20000 N_TEST=2000 TRAIN_MIN=0.3 DEVICE=cpu) check the wiring on a
# CPU in a minute or two.
# Results: OUT/<name>.tgz (model, config, metrics, history, training log, SBC) and OUT/log.txt; the archives
# are refreshed every minute, so a run cut off by the machine's time limit still returns its best model.
set -u -o pipefail
OUT=${OUT:-runs/gpu}; TRAIN_MIN=${TRAIN_MIN:-5.5}; N_SIM=${N_SIM:-5000000}; N_TEST=${N_TEST:-100000}
DEVICE=${DEVICE:-cuda}; SEED=${SEED:-0}; W=${WORK:-/tmp/paper_run}; RUNS=${RUNS:-"full:16384:1.5e-3"}
CONFIG=${CONFIG:-}; SBC=${SBC:-1}; N_EVAL=${N_EVAL:-10000}; METHOD=${METHOD:-refined}
N_RUNS=$(wc -w <<<"$RUNS"); WORKERS=${WORKERS:-$(( $(nproc) / N_RUNS > 1 ? $(nproc) / N_RUNS : 1 ))}
# two full-size runs side by side on an H200 each trained at 0.56-0.67 of its speed alone; a run alone trains at
# the speed measured alone (an H200: 521,000 samples/s measured, 500,000-560,000 per epoch), so the measurement
# is per machine and SLOWDOWN only covers the sharing
SLOWDOWN=${SLOWDOWN:-$( [ "$N_RUNS" -gt 1 ] && echo 0.55 || echo 1.0 )}
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
mkdir -p "$OUT" "$W"
exec > >(tee "$OUT/log.txt") 2>&1
PY=python3
stamp() { echo "[gpu_paper $(date +%H:%M:%S)] $*"; }
pack() {
  for spec in $RUNS; do
    name=${spec%%:*}
    [ -d "$W/$name" ] || continue
    [ -f "$W/$name.log" ] && cp "$W/$name.log" "$W/$name/train.log"
    tar czf "$OUT/$name.tgz.part" -C "$W" --ignore-failed-read "$name/model.pt" "$name/config.json" \
      "$name/metrics.json" "$name/history.npz" "$name/train.log" "sbc_$name" 2>/dev/null
    mv "$OUT/$name.tgz.part" "$OUT/$name.tgz"
  done
}
trap 'stamp packing; pack; ls -la "$OUT"' EXIT

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch, numpy, scipy; print('torch', torch.__version__, 'numpy', numpy.__version__,
'scipy', scipy.__version__, 'cuda', torch.cuda.is_available())"
echo "$(nproc) cores; $WORKERS transform processes per run"
stamp "simulate $N_SIM"
$PY simulate.py --n "$N_SIM" --seed "$SEED" --out "$W/sim.npz" || exit 1
$PY preprocess.py --sim "$W/sim.npz" --out "$W/data" --n-val "$N_TEST" --n-test "$N_TEST" --seed "$SEED" \
  || exit 1
rm -f "$W/sim.npz"

epochs_for() {   # batch, config -> epochs that fit TRAIN_MIN at the measured throughput
  $PY - "$DEVICE" "$TRAIN_MIN" "$N_SIM" "$N_TEST" "$1" "$SLOWDOWN" "$2" "$METHOD" <<'EOF'
import sys
import torch
sys.path.insert(0, "benchmarks")
import bench_train, train
device, minutes, n_sim, n_test = torch.device(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
cfg = train.resolve_config("full", sys.argv[8], sys.argv[7] or None, batch_size=int(sys.argv[5]))
sps, _ = bench_train.train_throughput(cfg, 200 if device.type == "cuda" else 20, device)
n_train = n_sim - 2 * n_test
epochs = max(1, min(cfg.train.epochs, int(float(sys.argv[6]) * minutes * 60 * sps / n_train)))
print(f"training throughput {sps:.0f} samples/s alone -> {epochs} epochs of {n_train} in {minutes} min",
      file=sys.stderr)
print(epochs)
EOF
}

pids=()
for spec in $RUNS; do           # runs train side by side: each is bound by its own kernel launches
  IFS=: read -r name batch lr cfg <<<"$spec"
  cfg=${cfg:-$CONFIG}
  stamp "measuring training throughput of $name (batch $batch${cfg:+, config $cfg})"
  epochs=$(epochs_for "$batch" "$cfg") || exit 1
  stamp "train $name: full profile, $METHOD${cfg:+ + $cfg}, batch $batch, lr $lr, $epochs epochs"
  $PY train.py --data "$W/data" --out "$W/$name" --profile full --method "$METHOD" ${cfg:+--config "$cfg"} --epochs "$epochs" \
    --batch-size "$batch" --lr "$lr" --seed "$SEED" --device "$DEVICE" --workers "$WORKERS" \
    --max-minutes "$($PY -c "print($TRAIN_MIN + 0.5)")" --n-eval "$N_EVAL" > "$W/$name.log" 2>&1 &
  pids+=($!)
done
( while sleep 60; do pack; done ) &
packer=$!
wait "${pids[@]}"
kill "$packer" 2>/dev/null
for spec in $RUNS; do
  name=${spec%%:*}
  stamp "run $name"; tail -6 "$W/$name.log"
  [ "$SBC" = 0 ] && continue
  $PY evaluate.py sbc --model "$W/$name" --obs "$W/data/test.npz" --n 10000 --L 100 --seed "$SEED" \
    --device "$DEVICE" --out "$W/sbc_$name"
done
stamp "done"
