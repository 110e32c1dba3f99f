#!/usr/bin/env bash
# Build the folders that carry raysnet's dependencies to a GPU machine that has Python 3.12 and torch
# but not Ray, MLflow, FFCV or OmegaConf, and cannot download them (git ignores these folders).
# benchmarks/gpu_env.sh, run there, installs them; benchmarks/gpu_check.sh uses set 2 alone.
#
#   set 1  .gpuenv/    site.tar.xz: a site-packages folder of Ray 2.60 [default,train,tune],
#                      MLflow-skinny 3.17.2 (the SQLite store: SQLAlchemy, Alembic) and what they
#                      need that the GPU machine lacks (its package list is DEVICE_HAS below), cp312;
#                      without Ray's Java jars, RLlib, Serve, LLM, the dashboard's web pages, tests,
#                      type stubs and symbol tables; and what raysnet never loads (DROP below)
#   set 2  .whl/       omegaconf + antlr4 (the versions installed here), FFCV 1.0.2 built for the GPU
#                      machine's Python (cp312) and FFCV's pure-Python dependencies; .whl/optional/
#                      torchvision for the GPU machine's torch (model.py), installed there only if missing
#          .gpulib/    libs.tar.xz: the shared libraries FFCV's extension loads (libturbojpeg, OpenCV
#                      core/imgproc) and theirs, less the C and C++ runtimes every Linux has
#          .gpudata/   the CIFAR-10 and ImageNet-sample archives from ../shared/data (prepared there);
#                      DATA=cifar10: CIFAR-10's alone (the Table-6 runs need nothing else)
#
#   bash benchmarks/gpu_bundle.sh                         # 5.5 minutes on 2 cores (xz of set 1: 3.5;
#                                                         # XZ_THREADS=2 halves that), pip's cache warm
#   DATA=cifar10 TORCHVISION= bash benchmarks/gpu_bundle.sh  # the smallest: one command carries it all
#
# Measured (2026-11-29): .gpuenv 27.7 MiB (178 MB unpacked, 40 packages); .whl 8.1 MiB (0.9 of it
# without optional/: the GPU machine has torchvision 0.26 already), .gpulib 6.4 MiB, .gpudata
# 29.4 MiB (18.7 with DATA=cifar10); the tracked tree 1.0 MiB. A command carries at most 64 MiB,
# so by default (71.6 MiB) the Ray/MLflow runs take two commands sent within 30 s of each other
# (the GPU machine's /tmp survives between them):
#   1st: carry .gpuenv                 run: bash benchmarks/gpu_env.sh   (to /tmp/raysnet-env, ~6 s)
#   2nd: carry .whl .gpulib .gpudata   run: bash benchmarks/gpu_env.sh python3 -m raysnet.train ...
# With DATA=cifar10 TORCHVISION= all four are 53.7 MiB, one command (DATA=cifar10 alone: 61.0 MiB).
# benchmarks/gpu_check.sh needs set 2 only. The script prints each set's size and exits 1 when one
# is over 64 MiB (LIMIT_MIB) with the tracked files.
#
# Needs: a CPython of the GPU machine's minor version (PY312), pkg-config with the libturbojpeg
# and OpenCV 4 development files, file and binutils' strip, and pip's index. The libraries come from
# this machine (Debian 12: glibc 2.36), so the GPU machine needs glibc >= 2.34 and libstdc++ >= GCC
# 12's.
set -euo pipefail
PY=${PY:-python}
PY312=${PY312:-$HOME/.pyenv/versions/3.12.1/bin/python}
PLATFORM=${PLATFORM:-manylinux_2_28_x86_64}
TORCHVISION=${TORCHVISION-0.26.0}   # the release for the GPU machine's torch 2.11; empty: none
SHARED=${SHARED:-../shared/data}
DATA=${DATA:-all}                   # all | cifar10
LIMIT_MIB=${LIMIT_MIB:-64}          # what one command may carry
XZ_THREADS=${XZ_THREADS:-1}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
case $DATA in all|cifar10) ;; *) echo "DATA must be all or cifar10, not '$DATA'" >&2; exit 2;; esac
rm -rf .whl .gpulib .gpudata .gpuenv
mkdir -p .whl/optional .gpulib .gpudata .gpuenv

version() { $PY -c "import importlib.metadata as m; print(m.version('$1'))"; }

# --- set 2: FFCV from source, for the GPU machine's Python; wheels of what it and raysnet import.
"$PY312" -m venv "$TMP/venv"
"$TMP/venv/bin/pip" install -q setuptools wheel
"$TMP/venv/bin/pip" download -q --no-deps --no-binary :all: "ffcv==$(version ffcv)" -d "$TMP/src"
tar xzf "$TMP"/src/ffcv-*.tar.gz -C "$TMP/src"
"$TMP/venv/bin/pip" wheel -q --no-deps --no-build-isolation "$TMP"/src/ffcv-*/ -w .whl
for pkg in omegaconf antlr4-python3-runtime fastargs terminaltables assertpy pytorch-pfn-extras tqdm; do
    "$TMP/venv/bin/pip" wheel -q --no-deps "$pkg==$(version "$pkg")" -w .whl
done
[[ -z $TORCHVISION ]] || $PY -m pip download -q --no-deps --only-binary :all: --python-version 3.12 \
    --platform "$PLATFORM" "torchvision==$TORCHVISION" -d .whl/optional

# The libraries FFCV's extension needs at run time, followed through symlinks.
unzip -q -o .whl/ffcv-*.whl 'ffcv/_libffcv*' -d "$TMP/ffcv"
mkdir "$TMP/libs"
ldd "$TMP"/ffcv/ffcv/_libffcv*.so | awk '$3 ~ /^\// {print $3}' | while read -r lib; do
    case $(basename "$lib") in
        libc.so.*|libm.so.*|libstdc++.so.*|libgcc_s.so.*|libz.so.*|libpthread.so.*|libdl.so.*) ;;
        *) cp -L "$lib" "$TMP/libs/" ;;
    esac
done
tar cf - -C "$TMP/libs" . | xz -9 -T"$XZ_THREADS" > .gpulib/libs.tar.xz

cp "$SHARED/cifar10-jpg.tar.gz" .gpudata/
[[ $DATA == all ]] && cp "$SHARED/imagenet-sample-100.tar.gz" .gpudata/

# --- set 1: Ray, MLflow and their dependencies, installed into a cp312 venv (binary wheels only),
# of which only the distributions the GPU machine lacks are kept.
"$TMP/venv/bin/pip" install -q --only-binary :all: "ray[default,train,tune]==$(version ray)" \
    "mlflow-skinny==$(version mlflow-skinny)" "sqlalchemy==$(version sqlalchemy)" "alembic==$(version alembic)"

# The GPU machine's Python packages (.library/device/KINDS.md, "Python packages already there", read
# 2026-11-17): not carried. Of those Ray and MLflow need, the versions are checked there (gpu_env.sh).
DEVICE_HAS="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx humanize
huggingface-hub hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib
jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml
markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas
nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile
nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless
optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip
pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core
scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson
six sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision
tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig
werkzeug wheel wrapt xarray xxhash yarl zipp"
# Lacking there, but never loaded by raysnet's runs: Ray's runtime_env virtualenvs and py-spy
# profiles, and Google Cloud's client libraries (Ray's GCP autoscaler and BigQuery, MLflow's GCS
# store, Databricks' Google auth); opencensus names google-api-core but imports only google.rpc.
# (cryptography stays: MLflow's SQL store imports it.)
DROP="virtualenv distlib python-discovery platformdirs py-spy google-api-core google-auth pyasn1 pyasn1-modules
proto-plus"

SITE=$("$TMP/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
mkdir "$TMP/stage"
DEVICE_HAS=$DEVICE_HAS DROP=$DROP "$TMP/venv/bin/python" - "$SITE" "$TMP/stage" <<'EOF'
# Copy the files of every distribution neither on the GPU machine nor dropped (RECORD lists them),
# less console scripts (gpu_env.sh writes its own) and byte code.
import importlib.metadata as md, os, re, shutil, sys
from pathlib import Path

site, stage = Path(sys.argv[1]), Path(sys.argv[2])
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
device, drop = set(map(norm, os.environ["DEVICE_HAS"].split())), set(map(norm, os.environ["DROP"].split()))
kept, left = [], []
for dist in sorted(md.distributions(path=[str(site)]), key=lambda d: norm(d.metadata["Name"])):
    name = norm(dist.metadata["Name"])
    if name in device or name in drop:
        left.append(f"{name} ({'GPU machine' if name in device else 'dropped'})")
        continue
    kept.append(f"{name}=={dist.version}")
    for f in dist.files or ():
        if f.parts[0] == ".." or "__pycache__" in f.parts:
            continue
        dst = stage / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(site / f, dst)
(stage / "raysnet-env-dropped.txt").write_text("".join(n + "\n" for n in sorted(drop)))
print(f"carried ({len(kept)}):", " ".join(kept))
print(f"not carried ({len(left)}):", ", ".join(left))
EOF

# What raysnet's runs never load: Ray's Java jars, RLlib, Serve, LLM and the dashboard's web pages
# (the dashboard serves its API without them, but wants build/static to exist), tests, stubs.
cd "$TMP/stage"
rm -rf ray/jars ray/rllib ray/serve ray/llm ray/dashboard/client/build
mkdir -p ray/dashboard/client/build/static
find . -depth -type d \( -name tests -o -name __pycache__ \) -exec rm -rf {} +
find . -name '*.pyi' -delete
# Symbol tables (for debuggers and crash stacks only): a third of Ray's binaries.
find . -type f \( -name '*.so' -o -name '*.so.*' -o -path './ray/core/src/*' \) -print0 |
    xargs -0 -r file | awk -F: '/ELF/ {print $1}' | xargs -r strip --strip-unneeded
cd - >/dev/null
tar cf - -C "$TMP/stage" . | xz -9 -T"$XZ_THREADS" > .gpuenv/site.tar.xz

ls -l .gpuenv .whl .whl/optional .gpulib .gpudata
mib() { du -cb "$@" | tail -1 | awk '{printf "%.1f", $1 / 1048576}'; }
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | awk '{printf "%.1f", $1 / 1048576}')
over=0
report() {  # report NAME FOLDER...: its size with the tracked tree; over LIMIT_MIB is an error
    local name=$1 size
    shift
    size=$(mib "$@")
    if awk "BEGIN {exit !($size + $tree > $LIMIT_MIB)}"; then
        echo "ERROR: $name ($*) is $size MiB + $tree MiB tracked: over the ${LIMIT_MIB} MiB one command carries" >&2
        over=1
    else
        echo "$name: $* = $size MiB (+ $tree MiB tracked files)"
    fi
}
report "set 1" .gpuenv
report "set 2" .whl .gpulib .gpudata
all=$(mib .gpuenv .whl .gpulib .gpudata)
if awk "BEGIN {exit !($all + $tree <= $LIMIT_MIB)}"; then
    echo "sets 1 and 2 fit one command: .gpuenv .whl .gpulib .gpudata = $all MiB"
else
    echo "sets 1 and 2 ($all MiB) take two commands within 30 s (gpu_env.sh); DATA=cifar10 TORCHVISION= makes them one"
fi
exit $over
