"""Where images come from before they become FFCV files: ImageFolder trees, CIFAR-10, digits.

Each source yields a `Source`: class names, a train and a val `Split` (what to encode, in write
order, with the labels), and the files the listing skipped with the reason why. The images
themselves are read, checked, counted and encoded later, once each, by raysnet.data.encode.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from raysnet.errors import UsageError
from raysnet.storage import is_uri, open_uri

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
DIGITS_VAL_FRACTION = 0.2  # 1,797 digits -> 1,437 train / 360 val, stratified
DIGITS_SEED = 0  # fixed: every machine prepares the same split
DIGITS_SIZE = 32  # upscaled so the CIFAR nets (32x32 input, paper §4.2) run unchanged


@dataclass
class ArraySamples:
    images: np.ndarray  # N x H x W x 3, uint8

    def __len__(self) -> int:
        return len(self.images)

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self.images)


@dataclass
class FileSamples:
    paths: list[str]  # local paths or URIs, in write order
    names: list[str]  # the same, relative to the source's root: how skipped files are listed

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class Split:
    samples: ArraySamples | FileSamples
    labels: np.ndarray  # N, int64: the class of every sample, in write order
    # Set: stored whole, the shorter side scaled down to at most this many pixels (the validation
    # split of an ImageFolder: raysnet.data.encode.EVAL_SHORT_SIDE), without FFCV's max_resolution.
    short_side: int | None = None


@dataclass
class Source:
    kind: str
    classes: list[str]
    splits: dict[str, Split]  # "train", "val"
    info: dict[str, Any]  # where it came from, for meta.json
    skipped: list[dict[str, str]] = field(default_factory=list)  # found while listing (not images, ...)
    # The storage "storage=auto" picks: raw for arrays; for ImageFolder "auto" still, decided once
    # every image was read (raw when all are tiny, see raysnet.data.encode.TINY_SIDE, else jpeg).
    storage: str = "raw"


def from_arrays(kind: str, classes: list[str], train: tuple[np.ndarray, np.ndarray],
                val: tuple[np.ndarray, np.ndarray], info: dict[str, Any] | None = None) -> Source:
    """A source from in-memory uint8 NxHxWx3 images and their labels (CIFAR, digits, tests)."""
    splits = {name: Split(ArraySamples(np.ascontiguousarray(images)), np.asarray(labels, dtype=np.int64))
              for name, (images, labels) in (("train", train), ("val", val))}
    return Source(kind, classes, splits, info or {"kind": kind}, storage="raw")


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


# --- ImageFolder: DIR/train/<class>/*, DIR/val/<class>/* (or DIR/test/); DIR local or a URI ---------

def _walk_order(relative: str) -> tuple:
    """Sort key that puts paths in `os.walk` order (each folder's files, then its folders), so a
    tree in object storage is prepared in the order the same tree on disk is."""
    *folders, name = relative.split("/")
    return (*((1, f) for f in folders), (0, name))


def _visible(relative: str) -> bool:
    return not any(part.startswith(".") for part in relative.split("/"))


def _listing(root: str, split: str) -> tuple[list[str], list[str]]:
    """(the class folders of root/split, every visible file under it relative to it, in walk order).
    A URI's folders are the prefixes of its objects (object stores have no empty folders)."""
    if is_uri(root):
        from pyarrow import fs

        filesystem, base = open_uri(root, "root")
        top = f"{base}/{split}"
        infos = filesystem.get_file_info(fs.FileSelector(top, recursive=True))
        files = [i.path[len(top) + 1:] for i in infos if i.type == fs.FileType.File]
        folders = {f.split("/")[0] for f in files if "/" in f}
    else:
        top = Path(root) / split
        folders = {p.name for p in top.iterdir() if p.is_dir()}
        files = [str(Path(d, f).relative_to(top).as_posix()) for d, _, names in os.walk(top) for f in names]
    return sorted(f for f in folders if _visible(f)), sorted(filter(_visible, files), key=_walk_order)


def _split_exists(root: str, split: str) -> bool:
    if not is_uri(root):
        return (Path(root) / split).is_dir()
    from pyarrow import fs

    filesystem, base = open_uri(root, "root")
    return filesystem.get_file_info(f"{base}/{split}").type == fs.FileType.Directory


def _list_split(root: str, split: str, classes: list[str] | None,
                skipped: list[dict[str, str]]) -> tuple[FileSamples, list[int], list[str]]:
    """Image paths and labels under root/split/<class>/ (recursively); non-images go to `skipped`."""
    where = f"{root.rstrip('/')}/{split}"
    found, files = _listing(root, split)
    for f in files:
        if "/" not in f:
            skipped.append({"path": f"{split}/{f}", "reason": "not inside a class folder"})
    if not found:
        raise UsageError(f"'{where}' holds no class folders; expected {where}/<class>/<image files>.")
    if classes is None:
        classes = found
    extra = [c for c in found if c not in classes]
    if extra:
        raise UsageError(f"'{where}' has class folders that train/ lacks: {', '.join(extra)}. Every class "
                         "must have training images.")
    label_of = {c: i for i, c in enumerate(classes)}
    by_class: dict[str, list[str]] = {c: [] for c in found}
    for f in files:
        cls = f.split("/")[0]
        if "/" not in f:
            continue
        if Path(f).suffix.lower() in IMAGE_EXTENSIONS:
            by_class[cls].append(f"{split}/{f}")
        else:
            skipped.append({"path": f"{split}/{f}", "reason": f"not an image file name "
                            f"(expected one of {', '.join(IMAGE_EXTENSIONS)})"})
    names, labels = [], []
    for cls in sorted(by_class, key=label_of.__getitem__):  # class order, each in walk order
        if not by_class[cls]:
            raise UsageError(f"class folder '{where}/{cls}' is empty: it holds no image files "
                             f"({', '.join(IMAGE_EXTENSIONS)}). Add images or remove the folder.")
        names += by_class[cls]
        labels += [label_of[cls]] * len(by_class[cls])
    base = root.rstrip("/") if is_uri(root) else str(Path(root).resolve())
    return FileSamples([f"{base}/{n}" for n in names], names), labels, classes


def imagefolder(root: str, short_side: int | None) -> Source:
    """An ImageFolder tree, listed (nothing is read yet). `short_side`: the validation split's cap."""
    if not _split_exists(root, "train"):
        raise UsageError(f"no training images: '{root.rstrip('/')}/train' is not a directory. An ImageFolder dataset "
                         "is DIR/train/<class>/<images> and DIR/val/<class>/<images> (or DIR/test/).")
    val_name = next((n for n in ("val", "test") if _split_exists(root, n)), None)
    if val_name is None:
        raise UsageError(f"no validation images: neither '{root.rstrip('/')}/val' nor '{root.rstrip('/')}/test' is a "
                         "directory. Put held-out images in DIR/val/<class>/ (they become val.beton).")
    skipped: list[dict[str, str]] = []
    train, train_labels, classes = _list_split(root, "train", None, skipped)
    val, val_labels, _ = _list_split(root, val_name, classes, skipped)
    splits = {"train": Split(train, np.asarray(train_labels, dtype=np.int64)),
              "val": Split(val, np.asarray(val_labels, dtype=np.int64), short_side)}
    where = root if is_uri(root) else str(Path(root).resolve())
    return Source("imagefolder", classes, splits, {"kind": "imagefolder", "root": where, "val": val_name}, skipped,
                  storage="auto")
