#!/usr/bin/env bash
# The ablation's variants x seeds as parallel in-process sweeps (benchmarks/sweep.py, no
# Prefect, no MLflow), one process and one torch thread per run, all sharing the machine's
# accelerator (results/gpu/ablation-64px was made so). Each evaluated point is appended to
# OUT/points.jsonl as it is measured, so a run stopped at the deadline keeps its curve;
# finished runs also land in OUT/runs.jsonl (benchmarks/sweep_table.py reads it).
#
#   benchmarks/sweep_parallel.sh OUT DEADLINE_S [sweep.py options ...]
#   VARIANTS="tempflow flow_grpo_fixed" SEEDS="0 1" benchmarks/sweep_parallel.sh out 600 \
#       --iterations 48 --eval-every 6 --set model.path=models/tiny-shapes-sd3
set -u
out=$1 deadline=$2
shift 2
mkdir -p "$out"
py=${PYTHON:-python3}
pids=()
for v in ${VARIANTS:-flow_grpo flow_grpo_fixed reweight branch tempflow}; do
  for s in ${SEEDS:-0 1 2}; do
    OMP_NUM_THREADS=1 timeout -s TERM "$deadline" "$py" -m benchmarks.sweep --threads 1 "$@" \
      --run "$v-s$s:algorithm=$v,train.seed=$s" --out "$out/runs.jsonl" --points "$out/points.jsonl" \
      >> "$out/log.txt" 2>&1 &
    pids+=($!)
  done
done
wait "${pids[@]}"
echo "sweep_parallel: $(wc -l < "$out/runs.jsonl" 2>/dev/null || echo 0) runs finished, $(wc -l < "$out/points.jsonl" 2>/dev/null || echo 0) points"
