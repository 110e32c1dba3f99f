#!/usr/bin/env bash
# Installs raysnet with the system libraries FFCV compiles against (Debian/Ubuntu), then the
# Python package. Usage: bash install.sh            # raysnet
#                        bash install.sh test       # raysnet and the test extras
set -euo pipefail
cd "$(dirname "$0")"

if command -v apt-get >/dev/null && ! pkg-config --exists libturbojpeg opencv4 2>/dev/null; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq pkg-config libturbojpeg0-dev libopencv-dev >/dev/null
fi
# The test extra also drives a headless Chromium through the MLflow UI (tests/test_train.py).
if [ "${1:-}" = test ] && command -v apt-get >/dev/null && ! command -v chromedriver >/dev/null; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver >/dev/null
fi

python=$(command -v python || command -v python3)
"$python" -m pip install -q -e ".${1:+[$1]}"
