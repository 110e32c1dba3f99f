"""`python -m raysnet.evaluate checkpoint=PATH [mode=all] [data.root=DIR] ...`: the paper's testing.

Modes (paper §3.4 "Testing"):
  single      the recipe's validation view (centre crop, or the original CIFAR image), FFCV's loader
  10crop      the four corners and centre of the whole image resized to shorter side data.val_resize
              (a rectangle at the image's own aspect ratio), and of its flip; probabilities averaged
  multiscale  fully convolutional on the whole image at shorter sides {224, 256, 384, 480, 640}
              (the network's global average pooling takes any size); probabilities averaged

10-crop and multi-scale read every validation image whole, as stored (raysnet.inference's
`WholeImages`: prepare keeps the shorter side up to 640 px, any aspect ratio), one image at a time,
and run the network on batches of views of one size: images are visited in order of aspect ratio,
so neighbours share sizes.

The checkpoint is raysnet's (model and config inside) or a plain state dict with raysnet's parameter
names (`arch=NAME`, and `shortcut=`/`variant=` unless torchvision's B/v1.5 for ImageNet depths or
the paper's A/v1 for CIFAR's). `mean=`/`std=` give the normalisation the model was trained with
(default: the dataset's own). Errors are printed as top-1/top-5 error in %, and logged to the
checkpoint's MLflow run when it has one.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Optional

from raysnet import cli as _cli
from raysnet.config import Config, ConfigError, load_config

if TYPE_CHECKING:
    from torch import nn

MODES = ("single", "10crop", "multiscale")


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


def load_for_testing(ecfg: EvalConfig, data_args: list[str]) -> tuple[nn.Module, Config, str | None]:
    """-> (model in eval mode, the config to test it under, the MLflow run id of a raysnet checkpoint).

    `data_args` (data=NAME, data.<field>=VALUE) pick the dataset: for a raysnet checkpoint they
    replace its own (another dataset, or the same one moved); a plain state dict has none.
    """
    from raysnet import checkpoint  # imports torch: here, not at the top (see run)

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
    # data=NAME and data.<field>=VALUE pass through to load_config; the rest are EvalConfig's keys.
    data_args = [a for a in args if a.partition("=")[0].split(".")[0] == "data"]
    ecfg = _cli.parse_args(EvalConfig, [a for a in args if a not in data_args], "raysnet.evaluate")
    # Imported once the arguments are read, not at the top: torch, torchvision and FFCV take seconds
    # to import, and --help or a mistyped key should answer at once.
    from raysnet import inference
    from raysnet.data import check_dataset

    model, cfg, run_id = load_for_testing(ecfg, data_args)
    meta = check_dataset(cfg.data, num_classes=model.fc.out_features)
    norm = normalisation(meta, ecfg.mean, ecfg.std)  # bad values stop here, before any image is read
    model = model.to(device := inference.pick_device(ecfg.device))
    modes = MODES if ecfg.mode == "all" else (ecfg.mode,)
    if set(modes) - {"single"}:
        _stored_whole(meta)
    results = {}
    for mode in modes:
        batches = inference.predictions(model, cfg.data, meta, mode, norm, ecfg.scales, ecfg.batch_size,
                                        ecfg.max_batches, device)
        r = results[mode] = inference.measure_error(batches)
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
