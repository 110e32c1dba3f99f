#!/usr/bin/env bash
# Step time of the CIFAR nets at the paper's batch (128, 32x32, bf16, channels_last, synthetic data)
# under each way of running them: eager, model.compile_mode=cudagraphs (CUDA graphs of the eager
# kernels) and reduce-overhead (Inductor's kernels in CUDA graphs), compile time included in the
# wall time printed: which mode tuning/table6-cifar.yaml should use on a GPU.
#
#   bash benchmarks/gpu_compile_modes.sh [ARCH ...]   # default: resnet110 resnet20; after gpu_env.sh
#   MODES="eager cudagraphs" EXTRA="model.channels_last=false run.precision=fp32" bash benchmarks/gpu_compile_modes.sh
#
# One benchmarks/throughput.py process per (arch, mode), each cut at LIMIT_S (default 100) seconds;
# its last line (JSON) is printed with the wall time. EXTRA: key=value for every run (the layout,
# the precision). Measured on an H200: docs/RESULTS.md, section 2.
set -u -o pipefail
LIMIT_S=${LIMIT_S:-100}
read -r -a MODES <<< "${MODES:-eager cudagraphs reduce-overhead}"
read -r -a EXTRA <<< "${EXTRA:-}"
ARCHS=("$@")
(( ${#ARCHS[@]} )) || ARCHS=(resnet110 resnet20)
for arch in "${ARCHS[@]}"; do
    for mode in "${MODES[@]}"; do
        flags=()
        [[ $mode == eager ]] || flags=(--compile "model.compile_mode=$mode")
        t0=$SECONDS
        line=$(timeout --kill-after=10 "$LIMIT_S" python3 benchmarks/throughput.py --arch "$arch" --batch 128 \
               --size 32 --steps 200 --warmup 20 "${flags[@]}" "${EXTRA[@]}" 2>/dev/null | tail -1)
        echo "$arch $mode wall $((SECONDS - t0))s: ${line:-failed or cut at ${LIMIT_S}s}"
    done
done
