#!/usr/bin/env bash
# Table 6 of He et al. 2015 on one GPU through raysnet's own commands, so the GPU
# measurement is of what a user runs: a local Ray,
# `python -m raysnet.tune tuning/table6-cifar.yaml` (five trials sharing the GPU, device-resident
# CIFAR-10, CUDA graphs), MLflow on SQLite, then `python -m raysnet.report`.
#
#   bash benchmarks/gpu_table6.sh [key=value ...]   # on the GPU machine, from the repository root
#
# key=value go to every trial (e.g. run.eval_every=2, model.compile_mode=default). What the GPU
# machine lacks comes with the working tree (benchmarks/gpu_bundle.sh builds it, benchmarks/gpu_env.sh
# unpacks it). CIFAR-10 is ../shared's JPEG archive, carried as .gpudata/cifar10-jpg.tar.gz.
#
# The sweep gets SWEEP_S seconds (default 480): a sweep still running then is interrupted, and what
# it reached is kept (every epoch is in MLflow as it ends). Written to $OUT (./gpu_table6 without
# $OUT): table6.log (everything printed), epochs.json (every trial's per-epoch metrics, finished or
# not), mlflow.db, and report/ (report.md, report.json, the figures) when the trials finished.
set -u -o pipefail
OUT=${OUT:-./gpu_table6}
SWEEP_S=${SWEEP_S:-480}
WORK=${WORK:-/tmp/raysnet-table6}
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$OUT/table6.log") 2>&1
START=$SECONDS

# shellcheck source=benchmarks/gpu_env.sh
source benchmarks/gpu_env.sh || { echo "gpu_env.sh failed: the bundle is missing or incomplete"; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
echo "cpus: $(nproc), $(python3 --version 2>&1), torch $(python3 -c 'import torch; print(torch.__version__)')"

export RAYSNET_DATA=$WORK/data RAY_TMPDIR=/tmp RAY_USAGE_STATS_ENABLED=0
STORAGE=$WORK/out
URI=sqlite:///$STORAGE/mlflow.db
ARGS=(data.source=.gpudata/cifar10-jpg.tar.gz "run.storage=$STORAGE" tracking.log_model=false "$@")

echo "=== sweep (limit ${SWEEP_S}s): python -m raysnet.tune tuning/table6-cifar.yaml ${ARGS[*]}"
t0=$SECONDS
timeout --signal=INT --kill-after=60 "$SWEEP_S" python3 -m raysnet.tune tuning/table6-cifar.yaml "${ARGS[@]}"
rc=$?
echo "=== sweep: exit $rc after $((SECONDS - t0))s (124: interrupted at the limit)"

# Every trial's epochs as MLflow holds them, whether or not the sweep finished.
python3 - "$URI" "$OUT/epochs.json" <<'EOF'
import json, sys
from raysnet import tracking

mlflow = tracking.client(sys.argv[1])
exp = mlflow.get_experiment_by_name("table6-cifar")
runs = tracking.all_runs(mlflow, exp.experiment_id) if exp else []
out = {r.info.run_name: {"arch": r.data.params.get("arch"), "status": r.info.status,
                         "start_ms": r.info.start_time, "end_ms": r.info.end_time,
                         "epochs": tracking.recorded_epochs(mlflow, r.info.run_id)}
       for r in runs if tracking.PARENT_TAG in r.data.tags}
json.dump(out, open(sys.argv[2], "w"), indent=1)
for name, run in out.items():
    last = run["epochs"][-1] if run["epochs"] else {}
    print(f"{name}: {run['status']}, {len(run['epochs'])} epochs, last val_err {last.get('val_err')}, "
          f"epoch_time_s {last.get('epoch_time_s')}, images/s {last.get('images_per_sec')}")
EOF

echo "=== report"
python3 -m raysnet.report experiment=table6-cifar "out=$OUT/report" "tracking.uri=$URI"
cp "$STORAGE/mlflow.db" "$OUT/" 2>/dev/null
echo "=== total $((SECONDS - START))s"
exit $rc
