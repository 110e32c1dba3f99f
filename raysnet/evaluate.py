"""`python -m raysnet.evaluate checkpoint=PATH [mode=all] [data.root=DIR] ...`: the paper's testing.

Modes (paper §3.4 "Testing"):
  single      the recipe's validation view (centre crop, or the original CIFAR image), FFCV's loader
  10crop      the four corners and centre of the whole image resized to shorter side data.val_resize
              (a rectangle at the image's own aspect ratio), and of its flip; probabilities averaged
  multiscale  fully convolutional on the whole image at shorter sides {224, 256, 384, 480, 640}
              (the network's global average pooling takes any size); probabilities averaged

10-crop and multi-scale read every validation image whole, as stored (`WholeImages`: prepare keeps
the shorter side up to 640 px, any aspect ratio), one image at a time, and run the network on
batches of views of one size: images are visited in order of aspect ratio, so neighbours share sizes.

The checkpoint is raysnet's (model and config inside) or a plain state dict with raysnet's parameter
names (`arch=NAME`, and `shortcut=`/`variant=` unless torchvision's B/v1.5 for ImageNet depths or
the paper's A/v1 for CIFAR's). `mean=`/`std=` give the normalisation the model was trained with
(default: the dataset's own). Errors are printed as top-1/top-5 error in %, and logged to the
checkpoint's MLflow run when it has one.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2.functional import ten_crop

from raysnet import checkpoint
from raysnet import cli as _cli
from raysnet.config import Config, ConfigError, DataConfig, load_config

MODES = ("single", "10crop", "multiscale")
DECODE_THREADS = 4  # JPEG decoding (OpenCV releases the GIL)


@dataclass(frozen=True)
class EvalConfig:
    """raysnet.evaluate's own keys; data=NAME and data.<field>=VALUE go to `load_config` instead."""

    checkpoint: str = ""
    mode: Literal["single", "10crop", "multiscale", "all"] = "all"
    scales: tuple[int, ...] = (224, 256, 384, 480, 640)
    arch: Optional[str] = None  # for a plain state dict
    shortcut: Optional[Literal["A", "B", "C"]] = None  # a plain state dict's (default: see the module docstring)
    variant: Optional[Literal["v1", "v1.5"]] = None
    # The per-channel normalisation the model was trained with, on the 0-255 scale of meta.json or
    # the 0-1 scale of torchvision's [0.485, 0.456, 0.406] (read so when every value is at most 1).
    # Empty: the dataset's own mean and std.
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    batch_size: int = 32
    max_batches: Optional[int] = None  # evaluate a prefix of the validation set (smoke tests; never logged)
    device: str = "auto"  # auto: the first GPU if there is one, else the CPU
    log: bool = True  # log to the checkpoint's MLflow run


def normalisation(meta: dict, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[list[float], list[float]]:
    """(mean, std) per channel on the 0-255 scale: the given ones (either scale), else the dataset's."""
    if not mean and not std:
        return list(meta["mean"]), list(meta["std"])
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ConfigError(f"bad value for 'mean'/'std': mean={list(mean)} std={list(std)}. Expected three values "
                          "each, the per-channel normalisation the model was trained with, std above 0: e.g. "
                          "mean=[0.485,0.456,0.406] std=[0.229,0.224,0.225] (0-1 scale) or the same times 255.")
    k = 255.0 if max(*mean, *std) <= 1 else 1.0
    return [m * k for m in mean], [s * k for s in std]


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


def predictions(model: nn.Module, data: DataConfig, meta: dict, mode: str, ecfg: EvalConfig,
                device: torch.device | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(class probabilities, labels) batch by batch over `data`'s validation set, tested the `mode`
    way, normalised with ecfg.mean/std (else the dataset's own); the model runs on `device` (CPU)."""
    device = device or torch.device("cpu")
    norm = normalisation(meta, ecfg.mean, ecfg.std)
    if mode == "single":
        for images, labels in loader(data, {**meta, "mean": norm[0], "std": norm[1]}, ecfg.batch_size,
                                     ecfg.max_batches):
            with torch.no_grad():
                yield model(images.to(device)).float().softmax(1).cpu(), labels
        return
    # 10-crop resizes to val_resize when the recipe's view does (ImageNet); CIFAR's is the image as stored.
    resize = data.val_resize if data.val_aug == "center" else None
    for images, labels in whole_image_batches(data, norm, ecfg.batch_size, ecfg.max_batches, device):
        yield predict(model, images, mode, data.crop, ecfg.scales, resize, ecfg.batch_size).cpu(), labels


def measure_error(model: nn.Module, data: DataConfig, meta: dict, mode: str, ecfg: EvalConfig,
                  device: torch.device | None = None) -> dict[str, float]:
    """Top-1 and top-5 error (%) of `model` on `data`'s validation set, tested the `mode` way."""
    top1 = top5 = n = 0
    for probs, labels in predictions(model, data, meta, mode, ecfg, device):
        best = probs.topk(min(5, probs.shape[1]), 1).indices
        top1 += (best[:, 0] == labels).sum().item()
        top5 += (best == labels[:, None]).any(1).sum().item()
        n += labels.shape[0]
    return {"err": 100 * (1 - top1 / max(n, 1)), "err_top5": 100 * (1 - top5 / max(n, 1)), "n": n}


def load_for_testing(ecfg: EvalConfig, data_args: list[str]) -> tuple[nn.Module, Config, str | None]:
    """-> (model in eval mode, the config to test it under, the MLflow run id of a raysnet checkpoint).

    `data_args` (data=NAME, data.<field>=VALUE) pick the dataset: for a raysnet checkpoint they
    replace its own (another dataset, or the same one moved); a plain state dict has none.
    """
    if ecfg.arch is not None:
        load_config([f"arch={ecfg.arch}"])  # an unknown name: one paragraph naming the valid ones
    loaded = checkpoint.load_model(ecfg.checkpoint, ecfg.arch, ecfg.shortcut, ecfg.variant)
    if loaded.config is None:
        return loaded.model, load_config([f"arch={ecfg.arch}", *data_args]), None
    cfg = loaded.config
    if data_args:
        named = any(a.startswith("data=") for a in data_args)
        data = load_config(data_args if named else [f"data={cfg.data.name}", *data_args]).data
        cfg = dataclasses.replace(cfg, data=data)
    return loaded.model, cfg, loaded.run_id


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise ConfigError(f"bad value for 'device': {name!r} ({str(e).splitlines()[0]}). Expected auto, cpu, cuda "
                          "or cuda:N of a GPU this machine has.") from None
    return device


def _stored_whole(meta: dict) -> None:
    """Datasets prepared before validation images were stored whole capped them at max_resolution
    (longer side): warn that 10-crop and multi-scale testing then see less than the whole image."""
    val = meta["splits"]["val"]
    cap = meta.get("write", {}).get("max_resolution")
    if "short_side" not in val and cap and val["image_size"]["width"]["max"] > cap:
        warnings.warn(f"this dataset's validation images were stored with the longer side at most {cap} px "
                      "(prepared before they were kept whole up to shorter side 640): 10-crop and multi-scale "
                      "see whole images, but smaller. Prepare it again for the paper's resolution.", stacklevel=2)


def _log(run_id: str | None, cfg: Config, results: dict[str, dict]) -> None:
    if not run_id or not cfg.tracking.uri:
        return
    try:
        from mlflow import MlflowClient

        client = MlflowClient(cfg.tracking.uri)
        for mode, r in results.items():
            client.log_metric(run_id, f"test_{mode}_err", r["err"])
            client.log_metric(run_id, f"test_{mode}_err_top5", r["err_top5"])
        print(f"logged to MLflow run {run_id} at {cfg.tracking.uri}")
    except Exception as e:  # noqa: BLE001 - the numbers are printed either way
        warnings.warn(f"could not log to MLflow ({type(e).__name__}: {e})", stacklevel=2)


def run(args: list[str]) -> int:
    from raysnet.data import check_dataset

    # data=NAME and data.<field>=VALUE pass through to load_config; the rest are EvalConfig's keys.
    data_args = [a for a in args if a.partition("=")[0].split(".")[0] == "data"]
    ecfg = _cli.parse_args(EvalConfig, [a for a in args if a not in data_args], "raysnet.evaluate")
    model, cfg, run_id = load_for_testing(ecfg, data_args)
    meta = check_dataset(cfg.data, num_classes=model.fc.out_features)
    normalisation(meta, ecfg.mean, ecfg.std)  # bad values stop here, before any image is read
    model = model.to(device := _device(ecfg.device))
    modes = MODES if ecfg.mode == "all" else (ecfg.mode,)
    if set(modes) - {"single"}:
        _stored_whole(meta)
    results = {}
    for mode in modes:
        r = results[mode] = measure_error(model, cfg.data, meta, mode, ecfg, device)
        print(f"{cfg.arch} {mode:>10}: top-1 error {r['err']:.2f}%  top-5 error {r['err_top5']:.2f}%  "
              f"({r['n']} images of {cfg.data.name})")
    if ecfg.log and ecfg.max_batches is not None and run_id:
        print(f"not logged to MLflow: max_batches={ecfg.max_batches} evaluated part of the validation set, and the "
              "run's test_* metrics hold whole evaluations only")
    elif ecfg.log:
        _log(run_id, cfg, results)
    return 0


def cli() -> None:
    _cli.main(run)


if __name__ == "__main__":
    cli()
