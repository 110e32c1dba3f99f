"""The one checkpoint reader and writer.

A raysnet checkpoint is one file, `CHECKPOINT_FILE`, in each of Ray Train's checkpoint_*
directories of a run. It holds everything a resumed run restores (model, optimiser, schedule,
random states, the epoch and the metrics so far) and everything a reader needs to rebuild the
model without the run (the resolved config, the MLflow run id). `load_model` also reads a
torchvision state dict, for the paper's testing of published weights.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from raysnet.config import Config, from_dict, to_dict
from raysnet.errors import UsageError
from raysnet.models import build_model

CHECKPOINT_FILE = "checkpoint.pt"


def find(path: str | Path) -> Path:
    """checkpoint.pt itself, a checkpoint directory holding it, or a run directory (its latest checkpoint)."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if (p / CHECKPOINT_FILE).is_file():
        return p / CHECKPOINT_FILE
    found = sorted(p.glob(f"checkpoint_*/{CHECKPOINT_FILE}"))  # Ray names them by time: the last is the newest
    if found:
        return found[-1]
    raise UsageError(f"no raysnet checkpoint at '{p}': give checkpoint=PATH to a {CHECKPOINT_FILE}, the directory "
                     f"holding it, or a run directory with checkpoint_*/{CHECKPOINT_FILE} inside.")


def _read(path: Path, device: torch.device | str = "cpu") -> Any:
    # weights_only=False: the file holds numpy and Python random states besides tensors. Only
    # read checkpoints you trust; this is the one place that reads them.
    return torch.load(path, map_location=device, weights_only=False)


def save(path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: torch.optim.lr_scheduler.LRScheduler, epoch: int, cfg: Config, run_id: str,
         history: list[dict]) -> None:
    """Write the checkpoint of a finished `epoch` (0-based) to `path`."""
    torch.save({
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        # Part of the file format: bf16 autocast needs no loss scaler, so this is always None; the
        # key stays so that fp16 training can store its GradScaler without a new format.
        "scaler": None,
        "epoch": epoch, "config": to_dict(cfg), "mlflow_run_id": run_id, "history": history,
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }, path)


def restore(path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device) -> tuple[int, list[dict]]:
    """Load `path` into the model, optimiser, schedule and random states -> (next epoch, history)."""
    ckpt = _read(Path(path), device)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    rng = ckpt["rng"]
    torch.set_rng_state(rng["torch"].cpu())
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in rng["cuda"]])
    return ckpt["epoch"] + 1, ckpt["history"]


@dataclass(frozen=True)
class Loaded:
    """A model read by `load_model`."""

    model: nn.Module  # in eval mode, on the CPU
    config: Config | None  # the run's config; None for a torchvision state dict
    run_id: str | None  # the MLflow run that wrote it, if any
    raw: dict  # the file's contents


def load_model(path: str | Path, arch: str | None = None) -> Loaded:
    """The model in a raysnet checkpoint (config inside), or in a torchvision state dict (`arch`
    names it; loaded into the v1.5/B variant, whose parameter names match torchvision's)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"checkpoint '{path}' is not a file; pass checkpoint=PATH to a raysnet "
                         "checkpoint.pt or a torchvision state dict (with arch=...).")
    try:
        raw = _read(p)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        raise UsageError(f"checkpoint '{p}' cannot be read by torch.load ({type(e).__name__}: {e}).") from None
    if isinstance(raw, dict) and "model" in raw and "config" in raw:
        cfg, state = from_dict(raw["config"]), raw["model"]
        arch = cfg.arch
        model = build_model(arch, num_classes=state["fc.weight"].shape[0], shortcut=cfg.model.shortcut,
                            variant=cfg.model.variant)
    elif isinstance(raw, dict) and "fc.weight" in raw:
        if not arch:
            raise UsageError(f"'{p}' is a plain state dict; name its architecture with arch=resnet50 (etc.).")
        cfg, state = None, raw
        model = build_model(arch, num_classes=state["fc.weight"].shape[0], shortcut="B", variant="v1.5")
    else:
        raise UsageError(f"'{p}' is neither a raysnet checkpoint nor a ResNet state dict.")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UsageError(f"the weights in '{p}' do not fit {arch}: {str(e).splitlines()[0]}") from None
    run_id = raw.get("mlflow_run_id") if cfg is not None else None
    return Loaded(model.eval(), cfg, run_id or None, raw)
