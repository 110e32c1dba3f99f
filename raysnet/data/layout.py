"""A prepared dataset directory: the names of its files. Written by raysnet.data.writer, checked by
raysnet.data.dataset, read by the loaders."""

from __future__ import annotations

from pathlib import Path

META = "meta.json"
BETON = {"train": "train.beton", "val": "val.beton"}
META_FORMAT = 1


def out_is_free(out: Path) -> bool:
    """An absent or empty directory may be written; anything else needs overwrite=true."""
    return not out.exists() or (out.is_dir() and not any(out.iterdir()))
