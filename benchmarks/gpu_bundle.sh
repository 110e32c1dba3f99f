#!/usr/bin/env bash
# Build the folders benchmarks/gpu_check.sh carries to a GPU machine that has Python and torch but
# not raysnet's other dependencies, and cannot download them (git ignores these folders):
#
#   .whl/      omegaconf + antlr4 (the versions installed here), FFCV 1.0.2 built for the GPU
#              machine's Python (cp312) and FFCV's pure-Python dependencies; .whl/optional/
#              torchvision for the GPU machine's torch (model.py), installed there only if missing
#   .gpulib/   libs.tar.xz: the shared libraries FFCV's extension loads (libturbojpeg, OpenCV
#              core/imgproc) and theirs, less the C and C++ runtimes every Linux has
#   .gpudata/  the CIFAR-10 and ImageNet-sample archives from ../shared/data (prepared there)
#
#   bash benchmarks/gpu_bundle.sh   # ~1 minute; then carry .whl .gpulib .gpudata (~44 MiB)
#
# Needs: a CPython of the GPU machine's minor version (PY312), pkg-config with the libturbojpeg
# and OpenCV 4 development files, and pip's index. The libraries come from this machine (Debian
# 12: glibc 2.36), so the GPU machine needs glibc >= 2.34 and libstdc++ >= GCC 12's.
set -euo pipefail
PY=${PY:-python}
PY312=${PY312:-$HOME/.pyenv/versions/3.12.1/bin/python}
PLATFORM=${PLATFORM:-manylinux_2_28_x86_64}
TORCHVISION=${TORCHVISION:-0.26.0}  # the release for the GPU machine's torch 2.11
SHARED=${SHARED:-../shared/data}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
rm -rf .whl .gpulib .gpudata
mkdir -p .whl/optional .gpulib .gpudata

version() { $PY -c "import importlib.metadata as m; print(m.version('$1'))"; }

# FFCV from source, for the GPU machine's Python; wheels of what it and raysnet import.
"$PY312" -m venv "$TMP/venv"
"$TMP/venv/bin/pip" install -q setuptools wheel
"$TMP/venv/bin/pip" download -q --no-deps --no-binary :all: "ffcv==$(version ffcv)" -d "$TMP/src"
tar xzf "$TMP"/src/ffcv-*.tar.gz -C "$TMP/src"
"$TMP/venv/bin/pip" wheel -q --no-deps --no-build-isolation "$TMP"/src/ffcv-*/ -w .whl
for pkg in omegaconf antlr4-python3-runtime fastargs terminaltables assertpy pytorch-pfn-extras tqdm; do
    "$TMP/venv/bin/pip" wheel -q --no-deps "$pkg==$(version "$pkg")" -w .whl
done
$PY -m pip download -q --no-deps --only-binary :all: --python-version 3.12 --platform "$PLATFORM" \
    "torchvision==$TORCHVISION" -d .whl/optional

# The libraries FFCV's extension needs at run time, followed through symlinks.
unzip -q -o .whl/ffcv-*.whl 'ffcv/_libffcv*' -d "$TMP/ffcv"
mkdir "$TMP/libs"
ldd "$TMP"/ffcv/ffcv/_libffcv*.so | awk '$3 ~ /^\// {print $3}' | while read -r lib; do
    case $(basename "$lib") in
        libc.so.*|libm.so.*|libstdc++.so.*|libgcc_s.so.*|libz.so.*|libpthread.so.*|libdl.so.*) ;;
        *) cp -L "$lib" "$TMP/libs/" ;;
    esac
done
tar cf - -C "$TMP/libs" . | xz -9 > .gpulib/libs.tar.xz

cp "$SHARED/cifar10-jpg.tar.gz" "$SHARED/imagenet-sample-100.tar.gz" .gpudata/
ls -l .whl .whl/optional .gpulib .gpudata
du -ch .whl .gpulib .gpudata | tail -1
