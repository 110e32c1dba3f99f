"""raysnet.evaluate's tensor work: the paper's testing views (10-crop, multi-scale), the network
run over them, whole validation images read from a .beton, and the errors.

A module of its own so that `python -m raysnet.evaluate --help` and a mistyped argument answer
at once: raysnet.evaluate imports this module (and with it torch, torchvision and FFCV) only once
it has a model to test. Settings come as plain arguments, not as raysnet.evaluate's EvalConfig:
imports go one way (tests/test_layout.py), and raysnet.evaluate imports this module.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2.functional import ten_crop

from raysnet.config import ConfigError, DataConfig

DECODE_THREADS = 4  # JPEG decoding (OpenCV releases the GIL)


def resize_short(image: torch.Tensor, side: int) -> torch.Tensor:
    """(3, H, W) -> (3, H', W') with min(H', W') = side and the aspect ratio kept (bilinear, antialiased)."""
    h, w = image.shape[-2:]
    if min(h, w) == side:
        return image
    size = (side, max(1, round(w * side / h))) if h <= w else (max(1, round(h * side / w)), side)
    return F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]


def views(image: torch.Tensor, mode: str, crop: int, scales: tuple[int, ...],
          resize: int | None = None) -> list[torch.Tensor]:
    """The inputs one prediction averages over, from one whole image (3, H, W) as stored.

    10crop: `ten_crop` of the image resized to shorter side `resize` (None: as stored): its four
    corners and centre, then the same five of its mirror image. multiscale: the whole image at
    each shorter side in `scales`. single: the image itself.
    """
    if mode == "single":
        return [image]
    if mode == "10crop":
        resized = image if resize is None else resize_short(image, resize)
        if min(resized.shape[-2:]) < crop:
            raise ConfigError(f"10-crop takes {crop}x{crop} crops (data.crop) from images resized to shorter side "
                              f"{min(resized.shape[-2:])} (data.val_resize); data.val_resize must be at least "
                              "data.crop.")
        return list(ten_crop(resized, [crop, crop]))
    return [resize_short(image, s) for s in scales]


@torch.no_grad()
def predict(model: nn.Module, images: list[torch.Tensor], mode: str, crop: int, scales: tuple[int, ...],
            resize: int | None = None, batch_size: int = 32) -> torch.Tensor:
    """Class probabilities of each whole image (3, H, W), normalised, averaged over the mode's
    views: (N, classes). Views of one size go through the network together, up to batch_size."""
    by_size: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = defaultdict(list)
    counts = torch.zeros(len(images))
    for i, image in enumerate(images):
        for v in views(image, mode, crop, scales, resize):
            by_size[tuple(v.shape)].append((i, v))
            counts[i] += 1
    total: torch.Tensor | None = None
    for group in by_size.values():
        for start in range(0, len(group), batch_size):
            owners, batch = zip(*group[start:start + batch_size])
            probs = model(torch.stack(batch)).float().softmax(1)
            total = probs.new_zeros(len(images), probs.shape[1]) if total is None else total
            total.index_add_(0, torch.tensor(owners, device=probs.device), probs)
    return total / counts.to(total.device)[:, None]


class WholeImages:
    """The images of a .beton, each whole as stored (any size), decoded one at a time.

    FFCV's decoders fill one fixed-size buffer per batch; here the stored bytes are read from the
    file directly (FFCV's Reader gives each sample's place, mode and size) and decoded by OpenCV.
    """

    def __init__(self, path: Path):
        import raysnet.data.ffcv_import  # noqa: F401
        from ffcv.reader import Reader

        reader = Reader(str(path))
        self.images, self.labels = reader.metadata["f0"], reader.metadata["f1"]
        table = reader.alloc_table
        self.bytes_at = dict(zip(table["ptr"].tolist(), table["size"].tolist()))
        self.file = np.memmap(path, dtype=np.uint8, mode="r")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        """-> (H x W x 3 uint8 RGB, label)."""
        import cv2

        field = self.images[i]
        ptr, h, w = int(field["data_ptr"]), int(field["height"]), int(field["width"])
        data = self.file[ptr:ptr + self.bytes_at[ptr]]
        if field["mode"] == 0:  # FFCV's IMAGE_MODES: 0 JPEG, 1 raw
            image = cv2.cvtColor(cv2.imdecode(np.asarray(data), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        else:
            image = np.array(data[:h * w * 3]).reshape(h, w, 3)  # a copy: the file is mapped read-only
        return image, int(self.labels[i])

    def by_aspect(self, n: int) -> np.ndarray:
        """The first n indices in order of aspect ratio (stable), so that neighbours share view sizes."""
        return np.argsort(self.images["width"][:n] / np.maximum(self.images["height"][:n], 1), kind="stable")


Batch = tuple[list[torch.Tensor], torch.Tensor]


def whole_image_batches(data: DataConfig, norm: tuple[list[float], list[float]], batch_size: int,
                        max_batches: int | None, device: torch.device) -> Iterator[Batch]:
    """([normalised (3, H, W) float32 images on `device`], labels) in batches of `batch_size` images."""
    from raysnet.data.dataset import dataset_dir

    images = WholeImages(dataset_dir(data) / "val.beton")
    n = len(images) if max_batches is None else min(len(images), max_batches * batch_size)
    mean = torch.tensor(norm[0], dtype=torch.float32, device=device).view(3, 1, 1)
    std = torch.tensor(norm[1], dtype=torch.float32, device=device).view(3, 1, 1).clamp(min=1e-3)
    order = images.by_aspect(n)
    chunks = [order[start:start + batch_size].tolist() for start in range(0, n, batch_size)]
    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        ahead = pool.map(images.__getitem__, chunks[0]) if chunks else iter(())
        for k in range(len(chunks)):
            decoded = list(ahead)
            if k + 1 < len(chunks):  # the next batch decodes while the network runs on this one
                ahead = pool.map(images.__getitem__, chunks[k + 1])
            batch = [(torch.from_numpy(im).to(device).permute(2, 0, 1).float() - mean) / std for im, _ in decoded]
            yield batch, torch.tensor([label for _, label in decoded])


def loader(data: DataConfig, meta: dict, batch_size: int, max_batches: int | None = None):
    """FFCV's loader of the recipe's single validation view, as training validates."""
    import raysnet.data.ffcv_import  # noqa: F401
    from ffcv.loader import Loader, OrderOption

    from raysnet.data.dataset import dataset_dir
    from raysnet.data.loaders import label_pipeline, to_batch, val_decoder

    cpu = torch.device("cpu")
    n = int(meta["splits"]["val"]["samples"])
    # A prefix by indices, not by breaking out of the loop: FFCV's threads must run to the end.
    n = n if max_batches is None else min(n, max_batches * batch_size)
    return Loader(str(dataset_dir(data) / "val.beton"), batch_size=batch_size, num_workers=2,
                  order=OrderOption.SEQUENTIAL, drop_last=False, indices=np.arange(n),
                  pipelines={"image": val_decoder(data, meta) + to_batch(meta, cpu, False),
                             "label": label_pipeline(cpu)})


def predictions(model: nn.Module, data: DataConfig, meta: dict, mode: str, norm: tuple[list[float], list[float]],
                scales: tuple[int, ...], batch_size: int, max_batches: int | None = None,
                device: torch.device | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(class probabilities, labels) batch by batch over `data`'s validation set (its first
    `max_batches` batches), tested the `mode` way, normalised with `norm` (mean, std per channel,
    0-255 scale); the model runs on `device` (the CPU)."""
    device = device or torch.device("cpu")
    if mode == "single":
        for images, labels in loader(data, {**meta, "mean": norm[0], "std": norm[1]}, batch_size, max_batches):
            with torch.no_grad():
                yield model(images.to(device)).float().softmax(1).cpu(), labels
        return
    # 10-crop resizes to val_resize when the recipe's view does (ImageNet); CIFAR's is the image as stored.
    resize = data.val_resize if data.val_aug == "center" else None
    for images, labels in whole_image_batches(data, norm, batch_size, max_batches, device):
        yield predict(model, images, mode, data.crop, scales, resize, batch_size).cpu(), labels


def measure_error(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
    """Top-1 and top-5 error (%) over (class probabilities, labels) batches, as `predictions` yields them."""
    top1 = top5 = n = 0
    for probs, labels in batches:
        best = probs.topk(min(5, probs.shape[1]), 1).indices
        top1 += (best[:, 0] == labels).sum().item()
        top5 += (best == labels[:, None]).any(1).sum().item()
        n += labels.shape[0]
    return {"err": 100 * (1 - top1 / max(n, 1)), "err_top5": 100 * (1 - top5 / max(n, 1)), "n": n}


def pick_device(name: str) -> torch.device:
    """The device named by evaluate's `device=` key (auto: the first GPU if there is one, else the CPU)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise ConfigError(f"bad value for 'device': {name!r} ({str(e).splitlines()[0]}). Expected auto, cpu, cuda "
                          "or cuda:N of a GPU this machine has.") from None
    return device
