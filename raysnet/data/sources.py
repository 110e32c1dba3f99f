"""Where images come from before they become FFCV files: ImageFolder trees, CIFAR-10, digits.

Each source yields a `Source`: class names, a train and a val `Split` (indexable by the FFCV
writer, one `(HxWx3 uint8 image, label)` per index), the train split's per-channel mean and
std and the principal components of its RGB pixels, and the files that were skipped with the
reason why.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
from PIL import Image
from tqdm import tqdm

from raysnet.errors import UsageError, child_signals, fork_context, signals_held

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
DIGITS_VAL_FRACTION = 0.2  # 1,797 digits -> 1,437 train / 360 val, stratified
DIGITS_SEED = 0  # fixed: every machine prepares the same split
# ImageFolder trees whose images all fit in this many pixels a side are stored raw, as CIFAR is:
# for such tiny images decoding costs more than reading.
TINY_SIDE = 64
DIGITS_SIZE = 32  # upscaled so the CIFAR nets (32x32 input, paper §4.2) run unchanged
# Validation images keep their shorter side up to the largest scale of the paper's multi-scale
# testing (§3.4: shorter sides {224, 256, 384, 480, 640}), at any aspect ratio, so that 10-crop
# and multi-scale testing see each whole image, as the paper's do, not a crop of it.
EVAL_SHORT_SIDE = 640


class Samples(Protocol):
    """What the FFCV writer indexes: `samples[i] -> (image HxWx3 uint8, label)`."""

    def __len__(self) -> int: ...

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]: ...


@dataclass
class ArraySamples:
    images: np.ndarray  # N x H x W x 3, uint8
    labels: np.ndarray  # N, int

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])


@dataclass
class FileSamples:
    """Image files decoded on demand in the writer's processes."""

    paths: list[str]
    labels: np.ndarray
    # Longest side the writer will keep (FFCV's `max_resolution`); lets JPEG decode at a
    # reduced DCT scale instead of decoding full size and shrinking afterwards.
    max_resolution: int | None = None
    short_side: int | None = None  # images are scaled down here so their shorter side is at most this

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return load_rgb(self.paths[i], self.max_resolution, self.short_side), int(self.labels[i])


@dataclass
class Split:
    samples: Samples
    labels: np.ndarray  # N, int64: the class of every sample, in write order
    heights: np.ndarray  # N: source image sizes, before any max_resolution
    widths: np.ndarray
    # Set: the samples come with their shorter side at most this many pixels (the validation split,
    # EVAL_SHORT_SIDE), and the writer stores them as they come, without FFCV's max_resolution.
    short_side: int | None = None


@dataclass
class Source:
    kind: str
    classes: list[str]
    splits: dict[str, Split]  # "train", "val"
    mean: list[float]  # per channel, 0-255 scale, train split
    std: list[float]
    info: dict[str, Any]  # where it came from, for meta.json
    skipped: list[dict[str, str]] = field(default_factory=list)
    storage: str = "raw"  # the write mode "storage=auto" picks for this source
    # The train split's RGB principal components, for AlexNet's PCA lighting (data.pca_lighting):
    # {"eigval": [3], "eigvec": 3x3 with the eigenvectors as columns}, pixels on a 0-1 scale.
    pca: dict[str, Any] | None = None


def principal_components(cov: np.ndarray) -> dict[str, Any]:
    """Eigen-decomposition of a 3x3 RGB covariance of 0-255 pixel values, largest first, on the 0-1
    scale of fb.resnet.torch's published ImageNet values (Krizhevsky et al. 2012, §4.1)."""
    values, vectors = np.linalg.eigh(np.asarray(cov, dtype=np.float64) / 255.0**2)
    order = np.argsort(values)[::-1]
    return {"eigval": [float(f"{max(v, 0.0):.6g}") for v in values[order]],
            "eigvec": [[float(f"{x:.6g}") for x in row] for row in vectors[:, order]]}


def load_rgb(path: str, max_resolution: int | None = None, short_side: int | None = None) -> np.ndarray:
    with Image.open(path) as im:
        w, h = im.size
        k = min(max_resolution / max(w, h) if max_resolution else 1.0, short_side / min(w, h) if short_side else 1.0)
        if im.format == "JPEG" and k < 0.5:
            # Decode at 1/2, 1/4 or 1/8 scale while the image stays at least k times its size.
            im.draft("RGB", (int(w * k) + 1, int(h * k) + 1))
        rgb = to_rgb(im)
    if short_side and min(rgb.shape[:2]) > short_side:  # area-averaged, as FFCV's own resizer
        ratio = short_side / min(rgb.shape[:2])
        size = (max(short_side, round(rgb.shape[1] * ratio)), max(short_side, round(rgb.shape[0] * ratio)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    return rgb


SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # Pillow's 16-bit greys ("I": 16-bit PNGs, as 32-bit ints)


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
    return np.asarray(im.convert("RGB"))


def _array_stats(images: np.ndarray) -> tuple[list[float], list[float], dict[str, Any]]:
    pixels = images.reshape(-1, 3).astype(np.float64)
    return pixels.mean(0).tolist(), pixels.std(0).tolist(), principal_components(np.cov(pixels.T, bias=True))


def _array_split(images: np.ndarray, labels: np.ndarray) -> Split:
    n, h, w, _ = images.shape
    return Split(ArraySamples(np.ascontiguousarray(images), labels.astype(np.int64)), labels.astype(np.int64),
                 np.full(n, h), np.full(n, w))


def from_arrays(kind: str, classes: list[str], train: tuple[np.ndarray, np.ndarray],
                val: tuple[np.ndarray, np.ndarray], info: dict[str, Any] | None = None) -> Source:
    """A source from in-memory uint8 NxHxWx3 images and their labels (CIFAR, digits, tests)."""
    mean, std, pca = _array_stats(train[0])
    return Source(kind, classes, {"train": _array_split(*train), "val": _array_split(*val)}, mean, std,
                  info or {"kind": kind}, storage="raw", pca=pca)


# --- digits: scikit-learn's 1,797 real 8x8 handwritten digits, the embedded default ---------------

def digits_arrays() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((train images, labels), (val images, labels)): 32x32 RGB uint8, a fixed stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Values are 0..16 ink counts; scale to 0..255, upsample bilinearly, copy to three channels.
    small = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(im).resize((DIGITS_SIZE, DIGITS_SIZE), Image.BILINEAR))
                    for im in small])
    rgb = np.repeat(big[..., None], 3, axis=3)
    labels = digits.target.astype(np.int64)
    train_ix, val_ix = train_test_split(np.arange(len(labels)), test_size=DIGITS_VAL_FRACTION,
                                        stratify=labels, random_state=DIGITS_SEED)
    train_ix, val_ix = np.sort(train_ix), np.sort(val_ix)
    return (rgb[train_ix], labels[train_ix]), (rgb[val_ix], labels[val_ix])


def digits() -> Source:
    train, val = digits_arrays()
    return from_arrays("digits", [str(d) for d in range(10)], train, val,
                       {"kind": "digits", "origin": "sklearn.datasets.load_digits", "val_fraction": DIGITS_VAL_FRACTION,
                        "split_seed": DIGITS_SEED, "size": DIGITS_SIZE})


# --- CIFAR-10: the pickled release (cifar-10-batches-py) -------------------------------------------

CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_FILES = (*CIFAR_TRAIN, "test_batch", "batches.meta")


def _cifar_dir(root: Path) -> Path | None:
    for d in (root / "cifar-10-batches-py", root):
        if (d / "data_batch_1").is_file():
            return d
    return None


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")
    except Exception as e:  # a damaged download: name the file
        raise UsageError(f"cannot read CIFAR-10 file '{path}': {e}. Delete it and prepare again.") from None


def _cifar_batches(d: Path, names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for name in names:
        batch = _unpickle(d / name)
        # Rows are 3072 bytes: the red plane, then green, then blue, each 32x32 row-major.
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch["labels"], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def cifar10(root: Path, download: bool) -> Source:
    d = _cifar_dir(root)
    if d is None and download:
        try:
            import torchvision

            torchvision.datasets.CIFAR10(str(root), train=True, download=True)
        except Exception as e:  # offline, or a proxy in the way
            raise UsageError(f"no CIFAR-10 under '{root}' (looked for {root}/cifar-10-batches-py/data_batch_1) and "
                             f"the download failed: {e}. Download cifar-10-python.tar.gz from "
                             "https://www.cs.toronto.edu/~kriz/cifar.html, extract it into that directory, or pass "
                             "root=DIR pointing at the directory that holds cifar-10-batches-py.") from None
        d = _cifar_dir(root)
    if d is None:
        raise UsageError(f"no CIFAR-10 under '{root}': expected {root}/cifar-10-batches-py/data_batch_1 .. "
                         "data_batch_5, test_batch and batches.meta. Pass root=DIR pointing at the directory that "
                         "holds cifar-10-batches-py, or download=true.")
    missing = [n for n in CIFAR_FILES if not (d / n).is_file()]
    if missing:
        raise UsageError(f"CIFAR-10 directory '{d}' lacks {', '.join(missing)}; extract cifar-10-python.tar.gz again.")
    classes = list(_unpickle(d / "batches.meta")["label_names"])
    train, val = _cifar_batches(d, CIFAR_TRAIN), _cifar_batches(d, ("test_batch",))
    return from_arrays("cifar10", classes, train, val, {"kind": "cifar10", "root": str(d.resolve()),
                                                        "val": "test_batch"})


# --- ImageFolder: DIR/train/<class>/*, DIR/val/<class>/* (or DIR/test/) --------------------------

@dataclass
class _Checked:
    path: str
    reason: str  # empty: a readable image
    height: int = 0
    width: int = 0
    sums: np.ndarray | None = None  # per channel: sum of the pixel values
    products: np.ndarray | None = None  # 3x3: sums of the products of channel pairs (squares on the diagonal)
    pixels: int = 0


def _check_image(job: tuple[str, bool]) -> _Checked:
    """Decode an image completely, so truncated and corrupt files are found before writing."""
    path, stats = job
    try:
        with Image.open(path) as im:
            im.verify()  # structure and checksums (PNG CRCs), without decoding
        with Image.open(path) as im:
            rgb = to_rgb(im)  # full decode: truncated JPEG data fails here
    except Exception as e:  # PIL raises many kinds; every one means "skip this file"
        return _Checked(path, f"{type(e).__name__}: {e}".strip())
    h, w, _ = rgb.shape
    if not stats:
        return _Checked(path, "", h, w)
    sums, products = pixel_sums(rgb)
    return _Checked(path, "", h, w, sums, products, h * w)


_VALUES = np.arange(256, dtype=np.float64)
_PAIRS = np.outer(_VALUES, _VALUES).ravel()  # value of (a << 8 | b): a * b


def pixel_sums(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Of uint8 RGB pixels: per channel the sum of the values, and the 3x3 sums of the products of
    channel pairs, exactly (integers below 2^53). Counted in histograms of values and of value
    pairs rather than by a float64 copy and a matrix product: no copy 8 times the image's size
    (480 MB for 20 megapixels) and a third less time for a photograph."""
    flat = rgb.reshape(-1, 3)
    channels = [flat[:, k] for k in range(3)]
    counts = [np.bincount(c, minlength=256) for c in channels]
    sums = np.array([n @ _VALUES for n in counts])
    products = np.diag([n @ _VALUES**2 for n in counts])
    for i in range(3):
        high = channels[i].astype(np.uint16) << 8
        for j in range(i + 1, 3):
            products[i, j] = products[j, i] = np.bincount(high | channels[j], minlength=65536) @ _PAIRS
    return sums, products


def _list_split(split_dir: Path, classes: list[str] | None, root: Path,
                skipped: list[dict[str, str]]) -> tuple[list[str], list[int], list[str]]:
    """Image paths and labels under split_dir/<class>/ (recursively); non-images go to `skipped`."""
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    for p in sorted(split_dir.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            skipped.append({"path": str(p.relative_to(root)), "reason": "not inside a class folder"})
    if not found:
        raise UsageError(f"'{split_dir}' holds no class folders; expected {split_dir}/<class>/<image files>.")
    if classes is None:
        classes = found
    extra = [c for c in found if c not in classes]
    if extra:
        raise UsageError(f"'{split_dir}' has class folders that train/ lacks: {', '.join(extra)}. Every class "
                         "must have training images.")
    paths, labels = [], []
    for label, name in enumerate(classes):
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue  # a class missing from val/ just has no validation images
        images = []
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                if f.startswith("."):
                    continue
                p = Path(dirpath) / f
                if p.suffix.lower() in IMAGE_EXTENSIONS:
                    images.append(str(p))
                else:
                    skipped.append({"path": str(p.relative_to(root)), "reason": f"not an image file name "
                                    f"(expected one of {', '.join(IMAGE_EXTENSIONS)})"})
        if not images:
            raise UsageError(f"class folder '{class_dir}' is empty: it holds no image files "
                             f"({', '.join(IMAGE_EXTENSIONS)}). Add images or remove the folder.")
        paths += images
        labels += [label] * len(images)
    return paths, labels, classes


def imagefolder(root: Path, workers: int, max_resolution: int | None, progress: bool = True) -> Source:
    if not (root / "train").is_dir():
        raise UsageError(f"no training images: '{root / 'train'}' is not a directory. An ImageFolder dataset is "
                         "DIR/train/<class>/<images> and DIR/val/<class>/<images> (or DIR/test/).")
    val_name = next((n for n in ("val", "test") if (root / n).is_dir()), None)
    if val_name is None:
        raise UsageError(f"no validation images: neither '{root / 'val'}' nor '{root / 'test'}' is a directory. "
                         "Put held-out images in DIR/val/<class>/ (they become val.beton).")
    skipped: list[dict[str, str]] = []
    train_paths, train_labels, classes = _list_split(root / "train", None, root, skipped)
    val_paths, val_labels, _ = _list_split(root / val_name, classes, root, skipped)

    # Decode every image once, in parallel, before writing: the FFCV writer cannot skip a sample
    # once the file's sample count is fixed, and a worker that raises would stop the run.
    jobs = [(p, True) for p in train_paths] + [(p, False) for p in val_paths]
    with contextlib.ExitStack() as stack:
        with signals_held():  # see raysnet.errors.signals_held; a stop held there ends the pool too
            pool = stack.enter_context(fork_context().Pool(max(1, workers), initializer=child_signals))
        checked = list(tqdm(pool.imap(_check_image, jobs, chunksize=8), total=len(jobs), desc="check images",
                            disable=not progress, unit="img"))
    train_checked, val_checked = checked[:len(train_paths)], checked[len(train_paths):]

    splits = {}
    sums, products, pixels = np.zeros(3), np.zeros((3, 3)), 0
    for name, results, labels in (("train", train_checked, train_labels), ("val", val_checked, val_labels)):
        keep = [i for i, c in enumerate(results) if not c.reason]
        for c in results:
            if c.reason:
                skipped.append({"path": str(Path(c.path).relative_to(root)), "reason": c.reason})
        kept_labels = np.asarray([labels[i] for i in keep], dtype=np.int64)
        if name == "train":
            for label, cls in enumerate(classes):
                if not np.any(kept_labels == label):
                    raise UsageError(f"class folder '{root / 'train' / cls}' has no readable image: every file in "
                                     "it was skipped (see the reasons above).")
            for i in keep:
                sums, products = sums + results[i].sums, products + results[i].products
                pixels += results[i].pixels
        # Validation keeps each whole image, its shorter side capped at the largest test scale (unless
        # max_resolution=0 keeps every image's size); training is capped by max_resolution.
        short = None if name == "train" or not max_resolution else EVAL_SHORT_SIDE
        samples = FileSamples([results[i].path for i in keep], kept_labels, None if short else max_resolution, short)
        splits[name] = Split(samples, kept_labels, np.asarray([results[i].height for i in keep]),
                             np.asarray([results[i].width for i in keep]), short)
    if len(splits["val"].labels) == 0:
        raise UsageError(f"'{root / val_name}' has no readable image.")
    mean = sums / pixels
    cov = products / pixels - np.outer(mean, mean)
    std = np.sqrt(np.maximum(cov.diagonal(), 0.0))
    return Source("imagefolder", classes, splits, mean.tolist(), std.tolist(),
                  {"kind": "imagefolder", "root": str(root.resolve()), "val": val_name}, skipped,
                  storage="raw" if all(max(s.heights.max(), s.widths.max()) <= TINY_SIDE for s in splits.values())
                  else "jpeg", pca=principal_components(cov))
