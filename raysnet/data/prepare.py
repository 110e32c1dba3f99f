"""Turn a source (ImageFolder, CIFAR-10, digits) into a raysnet dataset directory.

    python -m raysnet.prepare source=digits                       # into $RAYSNET_DATA/digits
    python -m raysnet.prepare source=cifar10 root=~/downloads out=/data/cifar10
    python -m raysnet.prepare source=imagefolder root=/data/imagenet-raw out=/data/imagenet workers=32
    python -m raysnet.prepare source=imagefolder root=../shared/data/cifar10-jpg.tar.gz out=/data/cifar10-jpg

Storage follows FFCV practice. CIFAR and digits are stored raw (32x32: decoding costs more than
reading), and so are ImageFolder trees whose images are all tiny (longer side at most 64 px, as
CIFAR-10 saved as JPEG files). Other ImageFolder images are stored as JPEG (quality 90) with the
longer side at most 512 px: ImageNet's photographs are mostly about 500x375, so 512 keeps nearly
all of them untouched while capping the few large ones, and the scale augmentation (shorter side
up to 480, paper §3.4) reads from close to full resolution. Validation images are the exception:
each is kept whole, its shorter side at most 640 px (the largest test scale) at any aspect ratio,
for 10-crop and multi-scale testing from the whole image (max_resolution=0 keeps every size).
`storage=proportion` (a `compress_probability` share as JPEG, the rest raw) or `raw` trade disk
for decoding time, as in FFCV's ImageNet example. Prepare writes into a hidden sibling of `out`
and renames it at the end: Ctrl-C or SIGTERM leaves nothing, and the next prepare removes what a
killed one (SIGKILL) left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from omegaconf import MISSING

from raysnet import storage
from raysnet.config import DataConfig, data_root
from raysnet.data import sources
from raysnet.data.encode import EVAL_SHORT_SIDE
from raysnet.errors import ConfigError, UsageError, ray_in_this_process

SOURCES = ("imagefolder", "cifar10", "digits")
SHOW_SKIPPED = 20  # the summary lists this many skipped files; meta.json has them all


@dataclass(frozen=True)
class PrepareConfig:
    source: Literal["imagefolder", "cifar10", "digits"] = MISSING
    # The dataset directory to create. Empty: where training looks by default ($RAYSNET_DATA/<source>).
    out: str = ""
    # imagefolder: the tree with train/<class>/ and val/<class>/ (or test/), or a .tar/.tar.gz
    # archive of it (the tree at its top or one folder down; unpacked to a temporary directory).
    # cifar10: the directory holding cifar-10-batches-py (empty: $RAYSNET_DATA/downloads). digits: unused.
    root: str = ""
    overwrite: bool = False  # replace an existing, non-empty `out`
    download: bool = True  # cifar10: fetch it with torchvision when `root` lacks it
    # auto: raw for CIFAR and digits, jpeg for ImageFolder. See the module docstring.
    storage: Literal["auto", "raw", "jpeg", "proportion", "smart"] = "auto"
    max_resolution: Optional[int] = 512  # longer side kept; null or 0: keep every image's size
    jpeg_quality: int = 90
    compress_probability: float = 0.5  # storage=proportion
    smart_threshold: int = 3 * 256 * 256  # storage=smart: JPEG for images whose raw pixels exceed this many bytes
    workers: int = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # (processes that check and encode images: every core this process may use; engine=local)
    # Where ImageFolder images are read and encoded: local (this machine's processes), ray (tasks on
    # every node of the Ray cluster at RAY_ADDRESS; one writer here), auto (ray when RAY_ADDRESS is set).
    engine: Literal["auto", "local", "ray"] = "auto"
    progress: bool = True


def _validate(cfg: PrepareConfig) -> None:
    if cfg.max_resolution is not None and cfg.max_resolution < 0:
        raise ConfigError(f"bad value for 'max_resolution': {cfg.max_resolution}. Expected a positive number of "
                          "pixels, or 0/null to keep every image's size.")
    if not 1 <= cfg.jpeg_quality <= 100:
        raise ConfigError(f"bad value for 'jpeg_quality': {cfg.jpeg_quality}. Expected 1 to 100.")
    if not 0 <= cfg.compress_probability <= 1:
        raise ConfigError(f"bad value for 'compress_probability': {cfg.compress_probability}. Expected 0 to 1.")
    if cfg.workers < 1:
        raise ConfigError(f"bad value for 'workers': {cfg.workers}. Expected 1 or more processes.")
    if cfg.source == "imagefolder" and not cfg.root:
        raise ConfigError("source=imagefolder needs root=DIR, the directory holding train/<class>/ and "
                          "val/<class>/ (or test/<class>/).")


def default_out(source: str) -> Path:
    return Path(data_root(DataConfig(name=source)))


@contextlib.contextmanager
def imagefolder_root(root: str) -> Iterator[str]:
    """The ImageFolder tree at `root`: the directory (or object-store prefix) itself, or an archive
    (a file, or an object: fetched first) unpacked for the duration."""
    if storage.is_uri(root):
        if not root.endswith(ARCHIVES):
            yield root
            return
        with tempfile.TemporaryDirectory(prefix="raysnet-fetch-") as tmp:
            archive = Path(tmp) / Path(root).name
            _fetch(root, archive)
            with _unpacked(archive, root) as tree:
                yield tree
        return
    path = Path(root).expanduser()
    if path.is_dir():
        yield str(path)
        return
    if not path.exists():
        raise UsageError(f"ImageFolder root '{path}' does not exist.")
    if not (path.is_file() and tarfile.is_tarfile(path)):
        raise UsageError(f"ImageFolder root '{path}' is neither a directory nor a .tar/.tar.gz archive of one.")
    with _unpacked(path, str(path)) as tree:
        yield tree


ARCHIVES = (".tar", ".tar.gz", ".tgz")


def _is_archive(root: str) -> bool:
    return root.endswith(ARCHIVES) if storage.is_uri(root) else Path(root).expanduser().is_file()


def _fetch(uri: str, into: Path) -> None:
    filesystem, where = storage.open_uri(uri, "root")
    try:
        with filesystem.open_input_stream(where) as src, open(into, "wb") as dst:
            shutil.copyfileobj(src, dst, storage.CHUNK)
    except OSError as e:
        raise UsageError(f"cannot read the archive root={uri}: {str(e).splitlines()[0]}. Check the URI and this "
                         "machine's credentials for the object store.") from None


@contextlib.contextmanager
def _unpacked(archive: Path, named: str) -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="raysnet-unpack-") as tmp:
        _unpack(archive, Path(tmp), named)
        top = [p for p in Path(tmp).iterdir() if not p.name.startswith(".")]
        tree = top[0] if len(top) == 1 and top[0].is_dir() and not (Path(tmp) / "train").is_dir() else Path(tmp)
        if not (tree / "train").is_dir():
            raise UsageError(f"archive '{named}' holds no ImageFolder tree: expected train/<class>/ at its top or "
                             "inside its single top-level folder.")
        yield str(tree)


def _unpack(archive: Path, into: Path, named: str) -> None:
    """Extract with tarfile's "data" filter: nothing outside `into`, no absolute or outward links,
    no devices. A member that breaks those rules, or a damaged archive, stops prepare."""
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(into, filter="data")
    except tarfile.FilterError as e:
        raise UsageError(f"archive '{named}' is unsafe: its member '{e.tarinfo.name}' {_unsafe(e)}. Nothing was "
                         "extracted outside a temporary directory (now removed); repack the tree with relative "
                         "paths and regular files only.") from None
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise UsageError(f"archive '{named}' cannot be unpacked ({type(e).__name__}: {e}): it is truncated or "
                         "damaged. Download or pack it again.") from None


def _unsafe(e: tarfile.FilterError) -> str:
    if isinstance(e, (tarfile.AbsoluteLinkError, tarfile.LinkOutsideDestinationError)):
        return f"is a link to '{e.tarinfo.linkname}', outside the archive"
    if isinstance(e, tarfile.OutsideDestinationError):
        return "would be written outside the directory it is unpacked into"
    if isinstance(e, tarfile.SpecialFileError):
        return "is a device or other special file"
    return f"is refused ({type(e).__name__})"


def load_source(cfg: PrepareConfig, tree: str | None = None) -> sources.Source:
    if cfg.source == "digits":
        return sources.digits()
    if cfg.source == "cifar10":
        root = Path(cfg.root).expanduser() if cfg.root else default_out("downloads")
        return sources.cifar10(root, cfg.download)
    # Validation keeps each whole image, its shorter side capped at the largest test scale (unless
    # max_resolution=0 keeps every image's size); training is capped by max_resolution.
    return sources.imagefolder(tree or cfg.root, EVAL_SHORT_SIDE if cfg.max_resolution else None)


def engine(cfg: PrepareConfig) -> str:
    """local or ray: auto prepares on the Ray cluster RAY_ADDRESS names (a `ray job submit`), if any."""
    if cfg.engine != "auto":
        return cfg.engine
    return "ray" if cfg.source == "imagefolder" and os.environ.get("RAY_ADDRESS") else "local"


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Read the source, write the dataset directory atomically, return its meta.json contents.
    `out` may be a URI (s3://...): the dataset is written locally, then uploaded, meta.json last."""
    from raysnet.data.spread import local_pool, ray_tasks
    from raysnet.data.writer import WriteSettings, staging, write_into  # FFCV: imported when writing

    _validate(cfg)
    if storage.is_uri(cfg.out):
        return _prepare_remote(cfg)
    out = Path(cfg.out).expanduser() if cfg.out else default_out(cfg.source)
    files = cfg.source == "imagefolder"
    # The output place first: one that cannot be written fails before minutes of reading the source.
    with staging(out, cfg.overwrite) as tmp, \
            imagefolder_root(cfg.root) if files else contextlib.nullcontext() as tree:
        source = load_source(cfg, tree)
        if files and _is_archive(cfg.root):
            source.info["archive"] = cfg.root if storage.is_uri(cfg.root) else str(Path(cfg.root).expanduser().resolve())
        kind = source.storage if cfg.storage == "auto" else cfg.storage
        settings = WriteSettings(kind, cfg.max_resolution or None, cfg.jpeg_quality, cfg.compress_probability,
                                 cfg.smart_threshold, cfg.workers, cfg.progress)
        pool = (ray_tasks() if engine(cfg) == "ray" else local_pool(cfg.workers)) if files else contextlib.nullcontext()
        with pool as workers:
            meta = write_into(source, tmp, out, settings, cfg.overwrite, workers)
        if engine(cfg) == "ray":
            print(f"encoded on {len(meta['write']['encoded_on'])} Ray node(s)", flush=True)
        return meta


def prepare_isolated(cfg: PrepareConfig) -> dict[str, Any]:
    """`prepare`, in a fresh Python process when this one holds a Ray driver or worker (a sweep's
    trial, a second run in one program): prepare forks its image workers, and a process that holds
    Ray must not fork. In this process otherwise, which saves the child's start-up (imports)."""
    if not ray_in_this_process():
        return prepare(cfg)
    child = subprocess.run([sys.executable, "-c", "from raysnet.data.prepare import _prepare_stdin; _prepare_stdin()"],
                           input=json.dumps(dataclasses.asdict(cfg)), capture_output=True, text=True, check=False)
    lines = child.stdout.strip().splitlines()
    answer = json.loads(lines[-1]) if lines else {"error": f"prepare stopped with exit status {child.returncode}: "
                                                           f"{child.stderr.strip()[-2000:]}"}
    if "error" in answer:
        raise UsageError(answer["error"])
    return answer["meta"]


def _prepare_stdin() -> None:
    """The child of `prepare_isolated`: a PrepareConfig as JSON on stdin, one JSON line on stdout."""
    cfg = PrepareConfig(**json.loads(sys.stdin.read()))
    try:
        answer = {"meta": prepare(cfg)}
    except (UsageError, ConfigError) as e:
        answer = {"error": str(e)}
    print(json.dumps(answer), flush=True)


def _prepare_remote(cfg: PrepareConfig) -> dict[str, Any]:
    if storage.exists(cfg.out) and not cfg.overwrite:
        raise UsageError(f"a dataset already exists at out={cfg.out}; nothing was changed. Pass overwrite=true to "
                         "replace it, or choose another out=URI.")
    with tempfile.TemporaryDirectory(prefix="raysnet-prepare-") as tmp:
        meta = prepare(dataclasses.replace(cfg, out=str(Path(tmp) / "dataset")))
        storage.upload(Path(tmp) / "dataset", cfg.out)
    return meta


def summary(meta: dict[str, Any], out: Path | str) -> str:
    lines = [f"prepared {meta['source']['kind']} into {out}: {meta['num_classes']} classes"]
    for s in meta["splits"].values():
        h, w = s["image_size"]["height"], s["image_size"]["width"]
        lines.append(f"  {s['file']}: {s['samples']} images, {s['bytes'] / 2**20:.1f} MiB, "
                     f"height {h['min']}-{h['max']} (mean {h['mean']}), width {w['min']}-{w['max']} (mean {w['mean']})")
    lines.append(f"  mean {[round(m, 1) for m in meta['mean']]}, std {[round(s, 1) for s in meta['std']]} (0-255, train)")
    if meta["skipped"]:
        lines.append(f"  skipped {len(meta['skipped'])} file(s):")
        lines += [f"    {s['path']}: {s['reason']}" for s in meta["skipped"][:SHOW_SKIPPED]]
        if len(meta["skipped"]) > SHOW_SKIPPED:
            lines.append(f"    ... and {len(meta['skipped']) - SHOW_SKIPPED} more, listed in meta.json")
    return "\n".join(lines)
