"""Is the dataset directory there and whole? Checked by the driver before any worker starts.

FFCV's reader trusts its file: a truncated .beton makes it read past the end (a crash or a
hang inside a worker). So the header, the allocation table and the byte count recorded in
meta.json are checked here first, and every problem is one paragraph naming the file.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from raysnet import storage
from raysnet.config import DataConfig, data_root
from raysnet.data.layout import BETON, META, META_FORMAT, out_is_free
from raysnet.errors import UsageError

FIELDS = ("image", "label")


def dataset_dir(data: DataConfig) -> Path:
    # load_config made data.root absolute; the default only serves a DataConfig built in code.
    return Path(data.root or data_root(data))


def prepare_command(data: DataConfig) -> str:
    """The exact command that creates `data`'s directory."""
    out = dataset_dir(data)
    if data.name in ("digits", "cifar10"):
        return f"python -m raysnet.prepare source={data.name} out={out}"
    if data.source:
        return f"python -m raysnet.prepare source=imagefolder root={data.source} out={out}"
    return f"python -m raysnet.prepare source=imagefolder root=/path/to/images out={out}"


def _redo(data: DataConfig) -> str:
    return f"Prepare it again: {prepare_command(data)} overwrite=true"


def _read_meta(root: Path, data: DataConfig) -> dict[str, Any]:
    path = root / META
    try:
        meta = json.loads(path.read_text())
        _ = meta["classes"], meta["mean"], meta["std"], meta["splits"]["train"]["samples"], meta["splits"]["val"]
    except FileNotFoundError:
        raise UsageError(f"dataset directory '{root}' has no {META}, so it was not made by raysnet.prepare "
                         f"(or not finished). {_redo(data)}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(f"dataset file '{path}' is not a raysnet meta.json ({type(e).__name__}: {e}). "
                         f"{_redo(data)}") from None
    if meta.get("format", META_FORMAT) > META_FORMAT:
        raise UsageError(f"dataset '{root}' was written by a newer raysnet ({meta.get('raysnet_version')}, format "
                         f"{meta['format']}); upgrade raysnet or prepare it again with this one.")
    return meta


def read_beton_header(path: Path) -> dict[str, Any]:
    """Validate a .beton's structure without FFCV's reader; return its sample count and layout.

    Layout (FFCV 1.0.2 writer): header | field descriptors | per-sample metadata | data pages |
    allocation table (to the end of the file). Every pointer must land inside the file.
    """
    # Here, not at the top: importing FFCV (with torch) takes seconds, which a command's --help and a
    # config check need not wait for.
    import raysnet.data.ffcv_import  # noqa: F401
    from ffcv.types import ALLOC_TABLE_TYPE, CURRENT_VERSION, FieldDescType, HeaderType, get_handlers, get_metadata_type

    size = path.stat().st_size

    def bad(why: str) -> UsageError:
        return UsageError(f"dataset file '{path}' is truncated or corrupt: {why}.")

    if size < HeaderType.itemsize:
        raise bad(f"it holds {size} bytes, fewer than FFCV's {HeaderType.itemsize}-byte header")
    header = np.fromfile(path, dtype=HeaderType, count=1)[0]
    if header["version"] != CURRENT_VERSION:
        raise bad(f"its format version is {header['version']}, FFCV {CURRENT_VERSION} expected")
    n, n_fields, table_at = int(header["num_samples"]), int(header["num_fields"]), int(header["alloc_table_ptr"])
    desc_end = HeaderType.itemsize + n_fields * FieldDescType.itemsize
    if not 0 < n_fields <= 16 or size < desc_end:
        raise bad(f"the header declares {n_fields} fields, which the file cannot hold")
    descriptors = np.fromfile(path, dtype=FieldDescType, count=n_fields, offset=HeaderType.itemsize)
    names = [bytes(d["name"]).rstrip(b"\0").decode("ascii", "replace") for d in descriptors]
    if tuple(names) != FIELDS:
        raise bad(f"its fields are {names}, not {list(FIELDS)}")
    try:
        metadata_end = desc_end + n * get_metadata_type(get_handlers(descriptors)).itemsize
    except Exception as e:  # unknown field type ids
        raise bad(f"its field descriptors are unreadable ({e})") from None
    if table_at < metadata_end or table_at > size or (size - table_at) % ALLOC_TABLE_TYPE.itemsize:
        raise bad(f"it holds {size} bytes, but its header puts the allocation table at byte {table_at} "
                  f"(the sample metadata ends at {metadata_end})")
    table = np.fromfile(path, dtype=ALLOC_TABLE_TYPE, offset=table_at)
    if len(table) < n:  # one image allocation per sample
        raise bad(f"its allocation table lists {len(table)} regions for {n} samples")
    if len(table) and int((table["ptr"] + table["size"]).max()) > table_at:
        raise bad("image data points past the end of its data region")
    return {"samples": n, "bytes": size}


def check_dataset(data: DataConfig, num_classes: int | None = None) -> dict[str, Any]:
    """The meta.json of `data`'s directory, after checking every file against it (on object
    storage: that every file is there with its recorded size)."""
    if storage.is_uri(data.root):
        return _check_classes(storage.read_meta(data.root), data.root, num_classes)
    root = dataset_dir(data)
    if not root.is_dir():
        raise UsageError(f"dataset directory '{root}' does not exist. Create it with: {prepare_command(data)}")
    meta = _read_meta(root, data)
    for split, file in BETON.items():
        path = root / file
        if not path.is_file():
            raise UsageError(f"dataset file '{path}' is missing. {_redo(data)}")
        expected = meta["splits"][split]
        size = path.stat().st_size
        if "bytes" in expected and size != expected["bytes"]:
            raise UsageError(f"dataset file '{path}' is truncated or corrupt: it holds {size} bytes, "
                             f"{META} says {expected['bytes']}. {_redo(data)}")
        try:
            found = read_beton_header(path)
        except UsageError as e:
            raise UsageError(f"{e} {_redo(data)}") from None
        if found["samples"] != expected["samples"]:
            raise UsageError(f"dataset file '{path}' holds {found['samples']} samples, {META} says "
                             f"{expected['samples']}. {_redo(data)}")
    return _check_classes(meta, root, num_classes)


def _check_classes(meta: dict[str, Any], root: Path | str, num_classes: int | None) -> dict[str, Any]:
    if num_classes is not None and num_classes != len(meta["classes"]):
        raise UsageError(f"dataset '{root}' has {len(meta['classes'])} classes but the model has {num_classes} "
                         "outputs; pick the dataset the model was made for, or let the model follow the dataset.")
    return meta


def local_copy(data: DataConfig) -> DataConfig:
    """`data` as FFCV reads it on this node: a dataset on object storage is fetched into the
    node's cache once (raysnet.storage.fetch) and read from there."""
    if not storage.is_uri(data.root):
        return data
    return dataclasses.replace(data, root=str(storage.fetch(data.root)))


def ensure_dataset(data: DataConfig, num_classes: int | None = None) -> dict[str, Any]:
    """`check_dataset`, after preparing it on first use when `data.auto_prepare`: the embedded
    digits, or the ImageFolder tree or archive named by `data.source`.

    Anything else that is missing is an error that gives the command to create it.
    """
    if storage.is_uri(data.root):
        return check_dataset(data, num_classes)  # never prepared on first use: `raysnet.prepare out=URI` writes it
    root = dataset_dir(data)
    if out_is_free(root) and data.auto_prepare and (data.name == "digits" or data.source):
        from raysnet.data.prepare import PrepareConfig, prepare_isolated

        if data.name == "digits":
            what, cfg = "the embedded digits dataset", PrepareConfig(source="digits", out=str(root), progress=False)
        else:
            source = Path(data.source).expanduser()
            if not source.exists():
                raise UsageError(f"data.source '{data.source}' (for data={data.name}) does not exist (resolved "
                                 f"from {Path.cwd()}); expected an ImageFolder tree or a .tar.gz of one. Point "
                                 f"data.source at it, or prepare the dataset yourself into {root}.")
            what, cfg = f"'{source}'", PrepareConfig(source="imagefolder", root=str(source), out=str(root),
                                                    progress=False)
        print(f"raysnet: preparing {what} into {root} (first use)", flush=True)
        try:
            prepare_isolated(cfg)
        except UsageError:
            if out_is_free(root):  # not another process finishing first: a real failure
                raise
    elif out_is_free(root):
        raise UsageError(f"no dataset at '{root}' (data.root for data={data.name}). Create it with: "
                         f"{prepare_command(data)}")
    return check_dataset(data, num_classes)
