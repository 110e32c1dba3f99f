#!/usr/bin/env bash
# The fast path (compile, channels_last, bf16, FFCV) measured on one GPU, in one run of under
# 8 minutes on an H100/H200:
#
#   bash benchmarks/gpu_check.sh            # from the repository root; QUICK=1: a tiny run on any machine
#
#  1. the GPU (nvidia-smi) and the software
#  2. ResNet-50, 224 px, synthetic data, bf16 + channels_last, batch 256: images/s and MFU,
#     eager and torch.compile'd (benchmarks/throughput.py)
#  3. ResNet-20 epoch time on CIFAR-10-sized synthetic data (50k images, 32 px, batch 128, cifar-paper)
#  4. benchmarks/model.py: raysnet's ResNet-18/50 against torchvision's
#  5. with FFCV: ResNet-50 images/s (eager) on real ImageNet photographs (the 100-image sample,
#     repeated to 4,000) through the imagenet-fast pipeline at 224 px, and the ResNet-20 epoch time
#     on real CIFAR-10 through the cifar-paper pipeline; both prepared here by raysnet.prepare
#  6. if time is left: the CIFAR-sized synthetic epoch with a compiled ResNet-20
#
# The GPU machine may lack raysnet's dependencies (Ray and MLflow are not needed: nothing here
# imports them). What it lacks comes with the working tree, in folders git ignores (made by
# benchmarks/gpu_bundle.sh, installed into /tmp/raysnet-env by benchmarks/gpu_env.sh):
#   .whl/      omegaconf, antlr4 and FFCV 1.0.2 (cp312) with its pure-Python dependencies;
#              .whl/optional/ torchvision, installed only where it is missing (model.py)
#   .gpulib/   libs.tar.xz: libturbojpeg, libopencv_core/imgproc and the libraries they load
#   .gpudata/  cifar10-jpg.tar.gz, imagenet-sample-100.tar.gz (copies of ../shared/data)
# Everything printed also goes to $OUT/gpu_check.log (./gpu_check.log without $OUT). Each step
# has a time limit and a failed step does not stop the others; the exit status counts failures.

set -u -o pipefail
PY=${PY:-python3}
OUT=${OUT:-.}
LOG="$OUT/gpu_check.log"
WORK=${WORK:-/tmp/raysnet-gpu-check}
QUICK=${QUICK:-0}
DEADLINE_S=${DEADLINE_S:-465}  # every step ends by then (each is cut to the time left); later ones are skipped
mkdir -p "$OUT" "$WORK"
exec > >(tee -a "$LOG") 2>&1
START=$SECONDS
FAILED=0

step() {  # step NAME LIMIT_S COMMAND...: run it with a time limit, report its time and status
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE_S - (SECONDS - START)))
    if (( left < 20 )); then
        echo "=== $name: skipped (the ${DEADLINE_S}s deadline is near)"
        FAILED=$((FAILED + 1))
        return 3
    fi
    (( limit > left )) && limit=$left
    echo "=== $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0))s (total $((SECONDS - START))s)"
    (( rc == 0 )) || FAILED=$((FAILED + 1))
    return $rc
}

# --- 1. the machine, and what is missing from it
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit --format=csv || true
nvidia-smi || true
echo "cpus: $(nproc), $($PY --version 2>&1)"

# Install each carried wheel whose module this Python lacks, and FFCV's shared libraries, into
# /tmp/raysnet-env (benchmarks/gpu_env.sh; also Ray and MLflow where .gpuenv was carried), and put
# them on PYTHONPATH. Not yet on LD_LIBRARY_PATH: step 5 adds the libraries.
GPU_ENV_NO_LD=1
source benchmarks/gpu_env.sh
unset GPU_ENV_NO_LD
$PY - <<'EOF'
import sys, torch
import raysnet.train.worker, raysnet.models  # noqa: F401  (must not need Ray or MLflow)
assert "ray" not in sys.modules and "mlflow" not in sys.modules, "raysnet.train.worker imported Ray or MLflow"
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
      f"GPU: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
EOF

if (( QUICK )); then  # a tiny run of every step, to check this script on a CPU
    R50="--arch resnet18 --size 64 --batch 8 --steps 2 --warmup 2"
    R20="--batch 32 --epochs 2" EPOCH="--epoch-size 256"
    MODEL="--archs resnet18 --batch 4 --size 64 --rounds 1 --steps 1"
    REPEAT=2 CIFAR_TRAIN=500 COMPILE=0  # torch.compile on a CPU takes minutes
else
    R50="--arch resnet50 --size 224 --batch 256 --steps 30 --warmup 10"
    R20="--batch 128 --epochs 3" EPOCH="--epoch-size 50000"
    MODEL="--archs resnet18 resnet50 --batch 256 --size 224 --rounds 3"
    REPEAT=40 CIFAR_TRAIN=50000 COMPILE=1
fi
TP="$PY benchmarks/throughput.py"

# --- 2. ResNet-50 on synthetic data: the model, optimiser and step alone
step "resnet50 synthetic eager" 120 $TP $R50
# torch.compile needs Triton and a C compiler on the machine: later compiled runs only if this one works.
(( COMPILE )) && step "resnet50 synthetic torch.compile" 240 $TP $R50 --compile --warmup 15 || COMPILE=0

# --- 3. ResNet-20, the paper's CIFAR recipe, an epoch of 50k synthetic images (first epoch: warm-up)
step "resnet20 cifar-sized synthetic epochs" 120 $TP --arch resnet20 --size 32 $R20 $EPOCH

# --- 4. raysnet vs torchvision, forward + backward
step "benchmarks/model.py" 150 $PY benchmarks/model.py $MODEL

# --- 5. FFCV: real photographs and real CIFAR-10, prepared here. Only FFCV's extension needs the
# carried libraries: the steps before ran without them.
export LD_LIBRARY_PATH="${RAYSNET_ENV:-/tmp/raysnet-env}/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if step "import ffcv" 60 $PY -c "import ffcv, ffcv.libffcv, raysnet.data; print('ffcv', ffcv.__file__)"; then
    cat > "$WORK/trees.py" <<'EOF'
# ImageFolder trees for raysnet.prepare: the ImageNet sample's 100 photographs repeated (symlinks)
# to make a training split worth timing, the originals as val; CIFAR-10 as shipped (QUICK: a subset).
import sys
from pathlib import Path

work, repeat, cifar_train = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
sample, tree = work / "src" / "imagenet-sample", work / "imagenet-tree"
for photo in sorted(sample.glob("*/*")):
    for split, copies in (("train", repeat), ("val", 1)):
        folder = tree / split / photo.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(copies):
            link = folder / f"{k:03d}_{photo.name}"
            if not link.exists():
                link.symlink_to(photo.resolve())
cifar = work / "src" / "cifar10"
if cifar_train < 50000:  # QUICK: the first images of each class
    per_class = cifar_train // 10
    for folder in (cifar / "train").iterdir():
        for f in sorted(folder.iterdir())[per_class:]:
            f.unlink()
print(f"imagenet tree: {sum(1 for _ in (tree / 'train').glob('*/*'))} train images; "
      f"cifar10: {sum(1 for _ in (cifar / 'train').glob('*/*'))} train images")
EOF
    rm -rf "$WORK/src" && mkdir -p "$WORK/src"
    step "unpack the datasets' sources" 90 bash -c "tar xzf .gpudata/imagenet-sample-100.tar.gz -C '$WORK/src' && \
        tar xzf .gpudata/cifar10-jpg.tar.gz -C '$WORK/src' && $PY '$WORK/trees.py' '$WORK' $REPEAT $CIFAR_TRAIN"
    step "prepare imagenet-sample x$REPEAT" 120 $PY -m raysnet.prepare source=imagefolder root="$WORK/imagenet-tree" \
        out="$WORK/imagenet" overwrite=true progress=false
    step "prepare cifar10 (raw)" 120 $PY -m raysnet.prepare source=imagefolder root="$WORK/src/cifar10" \
        out="$WORK/cifar10" storage=raw max_resolution=0 overwrite=true progress=false

    # FFCV normalises on the GPU with cupy when it is installed; a cupy built for another CUDA
    # fails there, so a run that fails (exit 1, not a time-out) is retried with torch's normalisation.
    ffcv_run() {
        local name=$1 limit=$2
        shift 2
        step "$name" "$limit" $TP "$@"
        (( $? == 1 )) && step "$name (--no-cupy)" "$limit" $TP "$@" --no-cupy
    }
    # Eager, as the first synthetic run: the difference between the two is the data pipeline's.
    ffcv_run "resnet50 ffcv imagenet-sample, imagenet-fast pipeline" 180 $R50 --data-root "$WORK/imagenet"
    ffcv_run "resnet20 ffcv cifar10 epochs, cifar-paper pipeline" 150 --arch resnet20 --data-root "$WORK/cifar10" $R20
else
    echo "FFCV did not import: its measurements are skipped"
fi

# --- 6. if time is left: the CIFAR epoch with a compiled ResNet-20
(( COMPILE )) && step "resnet20 cifar-sized synthetic epochs, torch.compile" 150 \
    $TP --arch resnet20 --size 32 $R20 $EPOCH --compile

echo "=== done in $((SECONDS - START))s, $FAILED step(s) failed; log: $LOG"
exit $FAILED
