"""Images to prepare, and what a prepared .beton holds, sample by sample."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image


def photo(rng: np.random.Generator, h: int, w: int, mode: str = "RGB") -> Image.Image:
    """Smooth colour fields plus grain: compresses and decodes like a photograph, unlike pure noise."""
    coarse = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-10, 11, (h, w, 3), dtype=np.int16)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).convert(mode)


class Stored(NamedTuple):
    mode: int  # FFCV's: 0 JPEG, 1 raw
    height: int  # as stored
    width: int
    label: int
    data: bytes  # the stored bytes: a JPEG file, or the raw pixels


def stored_samples(beton: Path) -> list[Stored]:
    """Every sample in stored order. Two datasets with equal lists store the same pixels, in the
    same order, with the same labels, whatever their page layout."""
    import raysnet.data.ffcv_import  # noqa: F401  (before any ffcv import: see there)
    from ffcv.reader import Reader

    reader = Reader(str(beton))
    data = np.fromfile(beton, dtype=np.uint8)
    size = {(int(a["sample_id"]), int(a["ptr"])): int(a["size"]) for a in reader.alloc_table}
    out = []
    for i, m in enumerate(reader.metadata):
        image, label = m["f0"], m["f1"]
        ptr = int(image["data_ptr"])
        out.append(Stored(int(image["mode"]), int(image["height"]), int(image["width"]), int(label),
                          data[ptr:ptr + size[(i, ptr)]].tobytes()))
    return out
