"""`python -m raysnet.evaluate checkpoint=PATH [mode=all] [data.root=DIR] ...`: the paper's testing.

Modes (paper §3.4 "Testing"):
  single      the recipe's validation view (centre crop, or the original CIFAR image)
  10crop      four corners and centre of the resized image and of its flip, predictions averaged
  multiscale  fully-convolutional at shorter side {224, 256, 384, 480, 640}, scores averaged

The checkpoint is raysnet's (model and config inside) or a torchvision state dict (`arch=resnet50`;
loaded into the v1.5/B variant whose parameter names match). Errors are printed as top-1/top-5
error in %, and logged to the checkpoint's MLflow run when it has one.

Choice where the paper is silent: 10-crop and multi-scale views are taken from the centre square
of the image (FFCV decodes fixed-size squares), resized to the scale.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2.functional import ten_crop

from raysnet import checkpoint
from raysnet import cli as _cli
from raysnet.config import Config, DataConfig, load_config

MODES = ("single", "10crop", "multiscale")


@dataclass(frozen=True)
class EvalConfig:
    """raysnet.evaluate's own keys; data=NAME and data.<field>=VALUE go to `load_config` instead."""

    checkpoint: str = ""
    mode: Literal["single", "10crop", "multiscale", "all"] = "all"
    scales: tuple[int, ...] = (224, 256, 384, 480, 640)
    arch: Optional[str] = None  # for a torchvision state dict
    batch_size: int = 32
    max_batches: Optional[int] = None  # evaluate a prefix of the validation set (smoke tests)
    log: bool = True  # log to the checkpoint's MLflow run


def views(images: torch.Tensor, mode: str, crop: int, scales: tuple[int, ...]) -> list[torch.Tensor]:
    """The inputs one prediction averages over. images: (N, 3, S, S) at the decode size."""
    if mode == "single":
        return [images]
    if mode == "10crop":
        return list(ten_crop(images, [crop, crop]))  # 5 crops, then the same 5 of the flipped image
    return [images if s == images.shape[-1] else
            F.interpolate(images, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
            for s in scales]


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, mode: str, crop: int, scales: tuple[int, ...]) -> torch.Tensor:
    """Class probabilities averaged over the mode's views: (N, classes)."""
    inputs = views(images, mode, crop, scales)
    return torch.stack([model(x).softmax(1) for x in inputs]).mean(0)


def decode_size(data: DataConfig, meta: dict, mode: str, scales: tuple[int, ...]) -> int | None:
    """Square side each image is decoded at for 10-crop and multi-scale; None: as stored (fixed-size data)."""
    size = meta["splits"]["val"]["image_size"]
    if size["height"]["min"] == size["height"]["max"] and size["width"]["min"] == size["width"]["max"]:
        return None
    return data.val_resize if mode == "10crop" else max(scales)


def loader(data: DataConfig, meta: dict, mode: str, scales: tuple[int, ...], batch_size: int,
           max_batches: int | None = None):
    from ffcv.fields.rgb_image import CenterCropRGBImageDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption

    from raysnet.data.dataset import dataset_dir
    from raysnet.data.loaders import label_pipeline, to_batch, val_decoder

    if mode == "single":
        decode = val_decoder(data, meta)
    else:
        side = decode_size(data, meta, mode, scales)
        decode = [SimpleRGBImageDecoder() if side is None else CenterCropRGBImageDecoder((side, side), ratio=1.0)]
    cpu = torch.device("cpu")
    n = int(meta["splits"]["val"]["samples"])
    # A prefix by indices, not by breaking out of the loop: FFCV's threads must run to the end.
    n = n if max_batches is None else min(n, max_batches * batch_size)
    return Loader(str(dataset_dir(data) / "val.beton"), batch_size=batch_size, num_workers=2,
                  order=OrderOption.SEQUENTIAL, drop_last=False, indices=np.arange(n),
                  pipelines={"image": decode + to_batch(meta, cpu, False), "label": label_pipeline(cpu)})


def load_for_testing(ecfg: EvalConfig, data_args: list[str]) -> tuple[nn.Module, Config, str | None]:
    """-> (model in eval mode, the config to test it under, the MLflow run id of a raysnet checkpoint).

    `data_args` (data=NAME, data.<field>=VALUE) pick the dataset: for a raysnet checkpoint they
    replace its own (another dataset, or the same one moved); a torchvision state dict has none.
    """
    loaded = checkpoint.load_model(ecfg.checkpoint, ecfg.arch)
    if loaded.config is None:
        return loaded.model, load_config([f"arch={ecfg.arch}", *data_args]), None
    cfg = loaded.config
    if data_args:
        named = any(a.startswith("data=") for a in data_args)
        data = load_config(data_args if named else [f"data={cfg.data.name}", *data_args]).data
        cfg = dataclasses.replace(cfg, data=data)
    return loaded.model, cfg, loaded.run_id


def measure_error(model: nn.Module, data: DataConfig, meta: dict, mode: str, ecfg: EvalConfig) -> dict[str, float]:
    """Top-1 and top-5 error (%) of `model` on `data`'s validation set, tested the `mode` way."""
    top1 = top5 = n = 0
    for images, labels in loader(data, meta, mode, ecfg.scales, ecfg.batch_size, ecfg.max_batches):
        probs = predict(model, images, mode, data.crop, ecfg.scales)
        best = probs.topk(min(5, probs.shape[1]), 1).indices
        top1 += (best[:, 0] == labels).sum().item()
        top5 += (best == labels[:, None]).any(1).sum().item()
        n += labels.shape[0]
    return {"err": 100 * (1 - top1 / max(n, 1)), "err_top5": 100 * (1 - top5 / max(n, 1)), "n": n}


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
    modes = MODES if ecfg.mode == "all" else (ecfg.mode,)
    results = {}
    for mode in modes:
        r = results[mode] = measure_error(model, cfg.data, meta, mode, ecfg)
        print(f"{cfg.arch} {mode:>10}: top-1 error {r['err']:.2f}%  top-5 error {r['err_top5']:.2f}%  "
              f"({r['n']} images of {cfg.data.name})")
    if ecfg.log:
        _log(run_id, cfg, results)
    return 0


def cli() -> None:
    _cli.main(run)


if __name__ == "__main__":
    cli()
