#!/usr/bin/env bash
# Installs raysnet with the system libraries FFCV compiles against (Debian/Ubuntu), then the
# Python package. Usage: bash install.sh            # raysnet (its dependency ranges, open)
#                        bash install.sh test       # raysnet and the test extras, at the versions of constraints.txt
#                        bash install.sh lock       # upgrade within the ranges, write constraints.txt anew
# The test install is pinned so that a fresh machine gets what CI last passed with: a new release of
# a dependency enters only through `lock`, followed by the suite, in one deliberate commit.
set -euo pipefail
cd "$(dirname "$0")"

if command -v apt-get >/dev/null && ! pkg-config --exists libturbojpeg opencv4 2>/dev/null; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq pkg-config libturbojpeg0-dev libopencv-dev >/dev/null
fi
# The test extra also drives a headless Chromium through the MLflow UI (tests/test_train.py).
if [ "${1:-}" != "" ] && command -v apt-get >/dev/null && ! command -v chromedriver >/dev/null; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver >/dev/null
fi

python=$(command -v python || command -v python3)
case "${1:-}" in
    "") "$python" -m pip install -q -e . ;;
    test) "$python" -m pip install -q -c constraints.txt -e ".[test]" ;;
    lock)
        "$python" -m pip install -q --upgrade --upgrade-strategy eager -e ".[test]"
        # Every distribution raysnet[test] needs, as installed now (markers of this machine).
        "$python" - > constraints.txt <<'PY'
from importlib import metadata
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pins, todo = {}, [("raysnet", {"test"})]
while todo:
    name, extras = todo.pop()
    dist = metadata.distribution(name)
    key = canonicalize_name(dist.metadata["Name"])
    if pins.get(key, (None, set()))[1] >= extras and key in pins:
        continue
    pins[key] = (dist.version, pins.get(key, (None, set()))[1] | extras)
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
            todo.append((req.name, set(req.extras)))
print("# What `bash install.sh test` installs: the versions CI last passed with. Regenerate with `bash install.sh lock`.")
print("\n".join(f"{k}=={v}" for k, (v, _) in sorted(pins.items()) if k != "raysnet"))
PY
        ;;
    *) echo "usage: bash install.sh [test|lock]" >&2; exit 2 ;;
esac
# pip byte-compiles what it installs, but not an editable install's own source; where Python writes
# no bytecode itself (PYTHONDONTWRITEBYTECODE), every process a run starts (its driver, each Ray
# worker) compiled raysnet's modules anew: about a second of CPU each on 2 cores.
"$python" -m compileall -q raysnet >/dev/null
