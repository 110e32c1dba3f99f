"""One image in, what a dataset stores of it out: checked, counted, resized and encoded in one decode.

This is the work of prepare's worker processes (a local pool, or Ray tasks on a cluster's nodes);
the single writer (raysnet.data.writer) only copies the results into the .beton file, in order.

    recipe = Recipe({"jpeg": Field("jpg", max_resolution=512)}, stats=True, max_resolution=512)
    encode_file("/data/train/cat/1.jpg", recipe)  # -> Encoded: the stored bytes, sizes, pixel sums
    encode_pixels(rgb_array, recipe)               # images already in memory (CIFAR, digits)

A file that cannot be read becomes an `Encoded` with a reason, never an exception: the writer
lists it as skipped and goes on.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass, field
from typing import NamedTuple

import cv2
import numpy as np
from PIL import Image

# Validation images keep their shorter side up to the largest scale of the paper's multi-scale
# testing (§3.4: shorter sides {224, 256, 384, 480, 640}), at any aspect ratio, so that 10-crop
# and multi-scale testing see each whole image, as the paper's do, not a crop of it.
EVAL_SHORT_SIDE = 640
# ImageFolder trees whose images all fit in this many pixels a side are stored raw, as CIFAR is:
# for such tiny images decoding costs more than reading.
TINY_SIDE = 64
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # Pillow's 16-bit greys ("I": 16-bit PNGs, as 32-bit ints)


class Field(NamedTuple):
    """The settings of FFCV's RGBImageField: plain data, so a recipe travels to a Ray task without
    importing FFCV to unpickle it (an FFCV import without raysnet.data.ffcv_import costs seconds)."""

    write_mode: str  # FFCV's: jpg, raw, proportion, smart
    max_resolution: int | None
    jpeg_quality: int = 90
    compress_probability: float = 0.5
    smart_threshold: int | None = None


@functools.lru_cache(maxsize=16)
def ffcv_field(spec: Field):
    import raysnet.data.ffcv_import  # noqa: F401  (before any ffcv import: see there)
    from ffcv.fields import RGBImageField

    return RGBImageField(write_mode=spec.write_mode, max_resolution=spec.max_resolution,
                         smart_threshold=spec.smart_threshold, jpeg_quality=spec.jpeg_quality,
                         compress_probability=spec.compress_probability)


@dataclass(frozen=True)
class Recipe:
    """How every image of one split is stored."""

    # Storage name -> its field. One entry, or for storage=auto two ("jpeg", "raw"): whether a tree
    # is all tiny images (stored raw) is known only once every image was read, so tiny images are
    # encoded both ways and the writer keeps one.
    fields: dict[str, Field]
    stats: bool = False  # the training split: count the pixels for the mean, std and PCA
    max_resolution: int | None = None  # longer side stored (FFCV resizes down to it); lets JPEG decode smaller
    short_side: int | None = None  # shorter side stored at most (validation: whole images, see EVAL_SHORT_SIDE)


@dataclass
class Encoded:
    reason: str = ""  # empty: a readable image; else why the file is skipped
    height: int = 0  # as found, before any resizing
    width: int = 0
    # Storage name -> (FFCV's metadata row for the image: mode and stored size, data_ptr unset; the bytes).
    stored: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    sums: np.ndarray | None = None  # per channel: sum of the pixel values
    products: np.ndarray | None = None  # 3x3: sums of the products of channel pairs
    pixels: int = 0


def pixel_sums(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Of uint8 RGB pixels: per channel the sum of the values, and the 3x3 sums of the products of
    channel pairs, exactly. OpenCV multiplies the channels into 16 bits (255 * 255 fits) and averages
    with integer partial sums; mean * count gives the sum back exactly (below 2^53 / 65025 pixels
    an image, about 10^11). A fifth of the time of a float64 matrix product, and no 8-fold copy."""
    n = rgb.shape[0] * rgb.shape[1]
    r, g, b = cv2.split(rgb)

    def total(image: np.ndarray) -> np.ndarray:
        return np.rint(np.asarray(cv2.mean(image)[:3]) * n)

    sums = total(rgb)
    squares = total(cv2.multiply(rgb, rgb, dtype=cv2.CV_16U))
    rg, gb, br = total(cv2.multiply(rgb, cv2.merge([g, b, r]), dtype=cv2.CV_16U))
    products = np.diag(squares)
    products[0, 1] = products[1, 0] = rg
    products[1, 2] = products[2, 1] = gb
    products[0, 2] = products[2, 0] = br
    return sums, products


def to_rgb(im: Image.Image) -> np.ndarray:
    """An image's pixels as 8-bit RGB (height x width x 3, uint8). 16-bit greys are scaled
    (Pillow's own convert clips them to 255: almost all white); floating-point images have no
    defined range and are refused (the caller skips the file and says why)."""
    if im.mode in SIXTEEN_BIT:
        grey = np.asarray(im).astype(np.int64)
        if grey.min() < 0 or grey.max() > 65535:
            raise ValueError(f"{im.mode} pixels outside 0-65535: not a 16-bit image")
        return np.repeat(((grey * 255 + 32767) // 65535).astype(np.uint8)[..., None], 3, axis=2)
    if im.mode == "F":
        raise ValueError("floating-point pixels (mode F) have no 0-255 range to convert from")
    return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))


def _scale(w: int, h: int, recipe: Recipe) -> float:
    """The factor the stored image is at most of the found one."""
    return min(recipe.max_resolution / max(w, h) if recipe.max_resolution else 1.0,
               recipe.short_side / min(w, h) if recipe.short_side else 1.0)


def _decode(data: bytes, recipe: Recipe, full: bool) -> np.ndarray:
    """The pixels. A JPEG whose stored size is under half its own decodes at 1/2, 1/4 or 1/8 scale
    (libjpeg's DCT scaling) unless `full`: the pixel counts need every pixel."""
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        k = _scale(w, h, recipe)
        if not full and im.format == "JPEG" and k < 0.5:
            im.draft("RGB", (int(w * k) + 1, int(h * k) + 1))  # at least k times the size, each side
        return to_rgb(im)


def _shorter_side(rgb: np.ndarray, short_side: int | None) -> np.ndarray:
    if not short_side or min(rgb.shape[:2]) <= short_side:
        return rgb
    ratio = short_side / min(rgb.shape[:2])  # area-averaged, as FFCV's own resizer
    size = (max(short_side, round(rgb.shape[1] * ratio)), max(short_side, round(rgb.shape[0] * ratio)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def load_rgb(data: bytes, recipe: Recipe) -> np.ndarray:
    """The pixels as the dataset stores them before FFCV's own resizing (max_resolution)."""
    return _shorter_side(_decode(data, recipe, full=False), recipe.short_side)


def _why(e: Exception) -> str:
    if isinstance(e, Image.UnidentifiedImageError):  # its message holds the repr of an in-memory buffer
        return "UnidentifiedImageError: not an image file Pillow can read"
    return f"{type(e).__name__}: {e}".strip()


def encode_file(path: str, recipe: Recipe) -> Encoded:
    """Read, check and encode one image file (a local path, or a URI that pyarrow opens)."""
    try:
        return encode_bytes(read_bytes(path), recipe)
    except OSError as e:
        return Encoded(_why(e))


def encode_bytes(data: bytes, recipe: Recipe) -> Encoded:
    """Check and encode one image file's bytes: decoded completely (truncated JPEG data fails there),
    once, unless it is counted (training) and stored under half its size: then the counting decode is
    full size and the stored one, like a validation image's, at the reduced DCT scale."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # structure and checksums (PNG CRCs), without decoding
            w, h = im.size
        full = recipe.stats or _scale(w, h, recipe) >= 0.5
        rgb = _decode(data, recipe, full)
        counted = pixel_sums(rgb) if recipe.stats else None
        if full and _scale(w, h, recipe) < 0.5:
            rgb = _decode(data, recipe, full=False)
    except Exception as e:  # noqa: BLE001 - Pillow raises many kinds; every one means "skip this file"
        return Encoded(_why(e))
    return _encoded(_shorter_side(rgb, recipe.short_side), (h, w), recipe, counted)


def encode_pixels(rgb: np.ndarray, recipe: Recipe) -> Encoded:
    """Encode an image already in memory (HxWx3 uint8)."""
    return _encoded(rgb, rgb.shape[:2], recipe, pixel_sums(rgb) if recipe.stats else None)


def _encoded(rgb: np.ndarray, found: tuple[int, int], recipe: Recipe,
             counted: tuple[np.ndarray, np.ndarray] | None) -> Encoded:
    out = Encoded("", int(found[0]), int(found[1]))
    if counted is not None:
        out.sums, out.products, out.pixels = counted[0], counted[1], int(found[0]) * int(found[1])
    tiny = max(found) <= TINY_SIDE
    for name, fld in recipe.fields.items():
        if name == "raw" and len(recipe.fields) > 1 and not tiny:
            continue  # storage=auto: raw only matters if every image is tiny
        out.stored[name] = _store(ffcv_field(fld), rgb)
    return out


def _store(fld, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FFCV's own encoding of the image (its resizing, JPEG settings and modes), caught in memory."""
    row = np.zeros(1, dtype=fld.metadata_type)
    payload: list[np.ndarray] = []

    def malloc(size: int) -> tuple[int, np.ndarray]:
        payload.append(np.empty(size, dtype=np.uint8))
        return 0, payload[-1]

    fld.encode(row, rgb, malloc)
    return row[0], payload[0]


def read_bytes(path: str) -> bytes:
    """A local file's bytes, or an object's (s3://bucket/key: the store's filesystem opened once a process)."""
    if "://" not in path:
        with open(path, "rb") as f:
            return f.read()
    scheme, _, rest = path.partition("://")
    bucket, _, key = rest.partition("/")
    filesystem, base = _filesystem(f"{scheme}://{bucket}")
    with filesystem.open_input_stream(f"{base}/{key}") as f:
        return f.read()


@functools.lru_cache(maxsize=8)
def _filesystem(bucket_uri: str):
    from raysnet.storage import open_uri

    return open_uri(bucket_uri, "root")
