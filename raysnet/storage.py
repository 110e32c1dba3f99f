"""Object storage. Datasets: `data.root` may be a URI (s3://, gs://, any filesystem pyarrow.fs opens).

FFCV reads local files and most cloud clusters have no shared disk, so each node copies the
dataset directory once into a node-local cache and loads it from there as usual:
- the copy is verified against the sizes and SHA-256 digests `raysnet.prepare` recorded in
  meta.json ("files"), file by file, and a file enters the cache only by an atomic rename after it
  was verified, so a half-copied file is never used;
- meta.json is written into the cache last: a cache directory without it is unfinished;
- the workers of one node take a file lock, so the first copies and the others wait and reuse it.
Credentials and endpoints come from the environment as pyarrow reads them (AWS_ACCESS_KEY_ID,
AWS_ENDPOINT_URL, ...). Writing (`raysnet.prepare ... out=s3://...`) uploads meta.json last too.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

from raysnet.errors import UsageError

SPLITS = ("train.beton", "val.beton")
META = "meta.json"
CHUNK = 8 << 20


def is_uri(root: str) -> bool:
    return "://" in root


def _node() -> str:
    """This node, as a person finds it in the cluster: hostname and Ray's node address."""
    try:
        import ray

        ip = ray.util.get_node_ip_address() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - naming the node must never be what fails
        ip = None
    return f"node {socket.gethostname()}" + (f" ({ip})" if ip else "")


def _fail(uri: str, reason: str) -> UsageError:
    return UsageError(f"{_node()} cannot read the dataset at data.root={uri}: {reason}. Check the URI, that the "
                      "dataset was written there with `python -m raysnet.prepare ... out=URI`, and that this node "
                      "has credentials and a route to the object store (AWS_* variables for s3://).")


def open_uri(uri: str, what: str = "data.root"):
    """(filesystem, path) of a URI or a local directory; pyarrow picks the filesystem from the
    scheme. `what` names the setting the URI came from, for the error."""
    from pyarrow import fs

    if not is_uri(uri) and Path(uri).expanduser().is_file():
        raise UsageError(f"{what}={uri} is a file; expected a directory (created when missing).")
    try:
        return fs.FileSystem.from_uri(uri.rstrip("/") if is_uri(uri) else str(Path(uri).expanduser().resolve()))
    except (OSError, ValueError) as e:
        raise UsageError(f"{_node()} cannot open {what}={uri}: {str(e).splitlines()[0]}.") from None


def read_meta(uri: str) -> dict[str, Any]:
    """The dataset's meta.json, read from the object store, with the files it promises checked there."""
    filesystem, root = open_uri(uri)
    try:
        with filesystem.open_input_stream(f"{root}/{META}") as f:
            meta = json.loads(f.read())
        infos = filesystem.get_file_info([f"{root}/{name}" for name in SPLITS])
    except (OSError, ValueError) as e:
        raise _fail(uri, f"{META} is missing or unreadable ({str(e).splitlines()[0]})") from None
    if "files" not in meta:
        raise _fail(uri, f"its {META} records no sizes and checksums (prepared before they were recorded: "
                         "prepare it again)")
    for name, info in zip(SPLITS, infos):
        expected = meta["files"][name]["size"]
        if info.size != expected:
            found = "missing" if info.size is None else f"{info.size} bytes"
            raise _fail(uri, f"{name} is {found}, {META} says {expected} bytes")
    return meta


@contextlib.contextmanager
def _locked(directory: Path):
    """One process of this node at a time in `directory` (the others wait for its copy)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def cache_dir(uri: str) -> Path:
    """This node's copy of a dataset: $RAYSNET_CACHE (default ~/.cache/raysnet/remote)/<name>-<hash of URI>."""
    base = Path(os.environ.get("RAYSNET_CACHE") or Path.home() / ".cache" / "raysnet" / "remote")
    return base / f"{uri.rstrip('/').rpartition('/')[2]}-{hashlib.sha256(uri.encode()).hexdigest()[:12]}"


def _cached(local: Path, meta: dict[str, Any]) -> bool:
    """The cache holds this exact dataset (same recorded digests, every file of its size)."""
    try:
        if json.loads((local / META).read_text()).get("files") != meta["files"]:
            return False
    except (OSError, ValueError):
        return False
    return all((local / n).is_file() and (local / n).stat().st_size == meta["files"][n]["size"] for n in SPLITS)


def _copy(filesystem, src: str, dst: Path, expected: dict[str, Any], uri: str) -> None:
    """src -> dst, verified by size and SHA-256 before it takes its final name."""
    part = dst.with_name(dst.name + ".part")
    digest, size = hashlib.sha256(), 0
    with filesystem.open_input_stream(src) as f, open(part, "wb") as out:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
    if size != expected["size"] or digest.hexdigest() != expected["sha256"]:
        part.unlink()
        raise _fail(uri, f"{dst.name} arrived corrupt ({size} bytes, sha256 {digest.hexdigest()[:12]}…; "
                         f"{META} says {expected['size']} bytes, {expected['sha256'][:12]}…)")
    os.replace(part, dst)


def fetch(uri: str) -> Path:
    """The dataset at `uri` as a local directory on this node, copied once and verified. -> its path"""
    meta = read_meta(uri)
    local = cache_dir(uri)
    with _locked(local):
        if _cached(local, meta):
            return local
        (local / META).unlink(missing_ok=True)  # unfinished until the new meta.json lands, last
        filesystem, root = open_uri(uri)
        for name in SPLITS:
            try:
                _copy(filesystem, f"{root}/{name}", local / name, meta["files"][name], uri)
            except OSError as e:
                raise _fail(uri, f"copying {name} failed ({str(e).splitlines()[0]})") from None
        tmp = local / (META + ".part")
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, local / META)
    return local


def file_digests(directory: Path) -> dict[str, dict[str, Any]]:
    """{"train.beton": {"size": ..., "sha256": ...}, ...}: what meta.json records at prepare time."""
    out = {}
    for name in SPLITS:
        digest = hashlib.sha256()
        with open(directory / name, "rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        out[name] = {"size": (directory / name).stat().st_size, "sha256": digest.hexdigest()}
    return out


def exists(uri: str) -> bool:
    """Whether a dataset (its meta.json) is already at `uri`."""
    from pyarrow import fs

    filesystem, root = open_uri(uri)
    try:
        return filesystem.get_file_info(f"{root}/{META}").type != fs.FileType.NotFound
    except OSError as e:
        raise UsageError(f"cannot reach out={uri}: {str(e).splitlines()[0]}.") from None


def upload(local: Path, uri: str) -> None:
    """A prepared dataset directory to `uri`, meta.json last (until it lands, there is no dataset)."""
    from pyarrow import fs

    filesystem, root = open_uri(uri)
    try:
        filesystem.create_dir(root, recursive=True)
        if filesystem.get_file_info(f"{root}/{META}").type != fs.FileType.NotFound:
            filesystem.delete_file(f"{root}/{META}")  # overwriting: no longer a dataset until done
        for name in (*SPLITS, META):
            with open(local / name, "rb") as f, filesystem.open_output_stream(f"{root}/{name}") as out:
                while chunk := f.read(CHUNK):
                    out.write(chunk)
    except OSError as e:
        raise UsageError(f"cannot write the dataset to out={uri}: {str(e).splitlines()[0]}. Nothing was "
                         f"finished there: {META}, written last, is missing.") from None


def write_text(filesystem, path: str, text: str, what: str) -> None:
    """A small file written whole (a temporary name, then a move, where the filesystem has moves);
    a refusal is the person's to fix: `what` names the setting that pointed here."""
    try:
        filesystem.create_dir(path.rpartition("/")[0], recursive=True)
        with filesystem.open_output_stream(path + ".tmp") as out:
            out.write(text.encode())
        filesystem.move(path + ".tmp", path)
    except OSError as e:
        raise UsageError(f"cannot write to {what} ({path}): {str(e).splitlines()[0]}. Check that it exists, "
                         "that this machine has write permission there and a route to it.") from None
