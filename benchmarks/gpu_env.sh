#!/usr/bin/env bash
# On the GPU machine (Python 3.12 and torch, no network): install what benchmarks/gpu_bundle.sh
# built and the command carried, and set up the environment raysnet's commands run in there:
# Ray 2.60 (train, tune, the dashboard's API), MLflow 3.17 on SQLite, OmegaConf, FFCV 1.0.2, raysnet.
#
#   bash benchmarks/gpu_env.sh               # install what was carried; print which modules import
#   bash benchmarks/gpu_env.sh --check       # the same; exit 1 unless ray, mlflow, ffcv, omegaconf
#                                            # and raysnet all import
#   bash benchmarks/gpu_env.sh CMD [ARG...]  # install, then run CMD in the environment
#   source benchmarks/gpu_env.sh             # install, and export the environment into this shell
#
# Installs into $RAYSNET_ENV (/tmp/raysnet-env), each part once (a part already there is skipped, so
# a command sent within 30 s of the last one, while the GPU machine's /tmp survives, needs to carry
# only what is still missing):
#   .gpuenv/*.tar.xz    -> site/   Ray, MLflow and what they need (set 1: 27.7 MiB, 178 MB unpacked, ~6 s)
#   .whl/*.whl          -> site/   each wheel whose module the GPU machine lacks (omegaconf, FFCV, ...);
#                                  .whl/optional/ too (torchvision, only where missing)
#   .gpulib/libs.tar.xz -> lib/    the shared libraries FFCV's extension loads
#   bin/                           ray, tune, mlflow, alembic, raysnet-train, raysnet-tune, ... for
#                                  this Python
# and exports PYTHONPATH=site:<repo root>, PATH=bin:..., LD_LIBRARY_PATH=lib:... (not with
# GPU_ENV_NO_LD=1: benchmarks/gpu_check.sh adds lib/ itself for its FFCV steps) and
# RAY_USAGE_STATS_ENABLED=0 (no network). It warns about each requirement of a carried package that
# the GPU machine's own packages do not meet (a version the bundle was not built against).
# Two commands, when the bundle is over the 64 MiB one command carries (gpu_bundle.sh says which):
#   1st: carry .gpuenv                   bash benchmarks/gpu_env.sh     (~10 s with its import check)
#   2nd: carry .whl .gpulib .gpudata     bash benchmarks/gpu_env.sh python3 -m raysnet.train ...
# (or `source benchmarks/gpu_env.sh` at the top of a script, as benchmarks/gpu_check.sh does).
# Bash only. Installing everything takes ~10 s; a part already installed costs nothing.

_gpu_env_setup() {
    local root py env
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    py=${PY:-python3}
    env=${RAYSNET_ENV:-/tmp/raysnet-env}
    mkdir -p "$env/site" "$env/lib" "$env/bin" "$env/done" || return 1
    "$py" - "$root" "$env" <<'EOF' || return 1
import importlib.metadata as md, importlib.util, os, re, sys, tarfile, zipfile
from pathlib import Path

root, env = Path(sys.argv[1]), Path(sys.argv[2])
site, lib, bin_, done = env / "site", env / "lib", env / "bin", env / "done"
sys.path.insert(0, str(site))


def unpack(archive, into):  # once per archive (name and size)
    stamp = done / f"{archive.name}-{archive.stat().st_size}"
    if stamp.exists():
        print(f"gpu_env: {archive} already unpacked into {into}")
        return
    with tarfile.open(archive) as t:
        t.extractall(into, filter="data")
    stamp.touch()
    print(f"gpu_env: unpacked {archive} into {into}")


for archive in sorted(root.glob(".gpuenv/*.tar.xz")):
    unpack(archive, site)
importlib.invalidate_caches()
# A wheel is a zip: unpacking it into a folder on PYTHONPATH installs it. Only where the module is missing.
for wheel in sorted(root.glob(".whl/*.whl")) + sorted(root.glob(".whl/optional/*.whl")):
    with zipfile.ZipFile(wheel) as z:
        tops = {n.split("/")[0] for n in z.namelist() if not n.split("/")[0].endswith((".dist-info", ".libs", ".data"))}
        modules = sorted(t[:-3] if t.endswith(".py") else t for t in tops)
        if all(importlib.util.find_spec(m) is not None for m in modules):
            print(f"gpu_env: have {', '.join(modules)}; not installing {wheel.name}")
            continue
        z.extractall(site)
        importlib.invalidate_caches()
        print(f"gpu_env: installed {wheel.name}")
if (root / ".gpulib/libs.tar.xz").exists():
    unpack(root / ".gpulib/libs.tar.xz", lib)


def script(name, module, attr):  # a console script for this Python
    path = bin_ / name
    path.write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import {attr.split('.')[0]}\n"
                    f"sys.exit({attr}())\n")
    path.chmod(0o755)


def exists(module):  # without importing it
    base = site / module.replace(".", "/")
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


carried = list(md.distributions(path=[str(site)]))
for dist in carried:
    for ep in dist.entry_points.select(group="console_scripts"):
        if exists(ep.module):  # not Serve's, which the bundle leaves out
            script(ep.name, ep.module, ep.attr)
try:
    import tomllib
    for name, target in tomllib.loads((root / "pyproject.toml").read_text())["project"]["scripts"].items():
        script(name, *target.split(":"))
except (OSError, KeyError, ValueError) as e:
    print(f"gpu_env: no raysnet-* commands ({e})")

# Does the GPU machine meet what the carried packages require of it?
try:
    from packaging.requirements import Requirement
except ImportError:
    print("gpu_env: no packaging module: requirements not checked")
    Requirement = None
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
dropped = site / "raysnet-env-dropped.txt"
dropped = set(dropped.read_text().split()) if dropped.exists() else set()
extras = {"ray": ("", "default", "train", "tune")}  # what gpu_bundle.sh installed
also = {"opencv-python": ("opencv-python-headless",)}  # the same module, cv2
unmet = 0
for dist in carried if Requirement else ():
    name = norm(dist.metadata["Name"])
    for line in dist.requires or ():
        req = Requirement(line)
        if req.marker and not any(req.marker.evaluate({"extra": e}) for e in extras.get(name, ("",))):
            continue
        if norm(req.name) in dropped:
            continue
        have = None
        for other in (req.name, *also.get(norm(req.name), ())):
            try:
                have = md.version(other)
                break
            except md.PackageNotFoundError:
                pass
        if have is None or (req.specifier and not req.specifier.contains(have, prereleases=True)):
            print(f"gpu_env: WARNING: {name} {dist.version} requires {req}; this machine has {have or 'none'}")
            unmet += 1
print(f"gpu_env: {len(carried)} packages in {site}; {unmet} unmet requirement(s)")
missing = [f"{m} (carry {folder})" for m, folder in (("ray", ".gpuenv"), ("mlflow", ".gpuenv"), ("omegaconf", ".whl"),
                                                    ("ffcv", ".whl")) if importlib.util.find_spec(m) is None]
if not (lib / "libturbojpeg.so.0").exists():
    missing.append("FFCV's libraries (carry .gpulib)")
if missing:
    print(f"gpu_env: not installed yet: {', '.join(missing)}")
EOF
    case ":${PYTHONPATH:-}:" in *":$env/site:$root:"*) ;; *)
        export PYTHONPATH="$env/site:$root${PYTHONPATH:+:$PYTHONPATH}" ;; esac
    case ":$PATH:" in *":$env/bin:"*) ;; *) export PATH="$env/bin:$PATH" ;; esac
    if [[ ${GPU_ENV_NO_LD:-0} != 1 ]]; then
        case ":${LD_LIBRARY_PATH:-}:" in *":$env/lib:"*) ;; *)
            export LD_LIBRARY_PATH="$env/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;; esac
    fi
    export RAYSNET_ENV=$env RAY_USAGE_STATS_ENABLED=${RAY_USAGE_STATS_ENABLED:-0}
}

_gpu_env_imports() {  # print each module's version; fail if one does not import
    "${PY:-python3}" - <<'EOF'
import importlib, sys
failed = 0
for name in ("ray", "mlflow", "ffcv", "omegaconf", "raysnet", "torch"):
    try:
        m = importlib.import_module(name)
        print(f"gpu_env: {name} {getattr(m, '__version__', '')} from {m.__file__}")
    except Exception as e:
        print(f"gpu_env: {name} does not import: {type(e).__name__}: {e}")
        failed += 1
sys.exit(1 if failed else 0)
EOF
}

if [[ ${BASH_SOURCE[0]} != "$0" ]]; then  # sourced
    _gpu_env_setup || { echo "gpu_env: setup failed" >&2; return 1; }
else
    set -u -o pipefail
    _gpu_env_setup || exit 1
    case ${1:-} in
        "") _gpu_env_imports || true ;;
        --check) _gpu_env_imports ;;
        *) exec "$@" ;;
    esac
fi
