#!/usr/bin/env bash
# The GPU section of docs/performance.md, measured in one run on a GPU machine.
#
# On the GPU machine (see ../shared/gpu/README.md for getting onnxruntime-gpu
# there), from the repository root, with `.gpu/run` carried:
#
#     source .gpu/run/gpu-env.sh && OUT=$OUT bash scripts/gpu-bench.sh
#
# then copy $OUT/gpu_*.json to bench/results/ and run `python -m bench.report`.
# The benchmarks are the CPU's own, unchanged; only their output names differ.
# QUICK=1 shortens every step, to try the script on a CPU first (about 4 min
# on 2 cores); its figures are not for the report.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"

if [ "${QUICK:-0}" = 1 ]; then
    SECONDS_PER=2 SOAK_S=10 RATE=20 BUDGET=(--budget-s 0.5) TRAIN=(--steps 2)
else
    SECONDS_PER=8 SOAK_S=30 RATE=1000 BUDGET=() TRAIN=(--steps 20 --epochs 3)
fi

step() { echo; echo "== $* ($(date -u +%H:%M:%S))"; }

step "execution providers"
"$PY" -c 'import onnxruntime as o; print(o.__version__, o.get_available_providers())'
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv

step "node placement: CPU-placed nodes with the batch dimension free and pinned"
"$PY" -m bench.node_placement models/bottle-pwae models/bottle-otproto \
    --out "$OUT/gpu_node_placement.json"

step "raw model latency, both families"
"$PY" -m bench.model_latency models/bottle-pwae models/bottle-otproto "${BUDGET[@]}" \
    --out "$OUT/gpu_model_latency.json"

step "through HTTP, batching on and off, next to the raw model"
for family in pwae otproto; do
    "$PY" -m bench.http_load "models/bottle-$family" --clients 1,8,32,128 \
        --seconds "$SECONDS_PER" --out "$OUT/gpu_http_load_$family.json"
done

step "P-WAE at a fixed open-loop rate of $RATE images/s"
"$PY" -m bench.soak models/bottle-pwae --rate "$RATE" --seconds "$SOAK_S" \
    --out "$OUT/gpu_soak.json"

step "training throughput, both families, on CUDA and on this machine's CPU"
"$PY" -m bench.train_speed --device auto "${TRAIN[@]}" --out "$OUT/gpu_train_speed.json"
"$PY" -m bench.train_speed --device cpu "${TRAIN[@]}" --out "$OUT/gpu_train_speed_cpu.json"

step "done"
ls -l "$OUT"
