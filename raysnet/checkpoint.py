"""The one checkpoint reader and writer.

A raysnet checkpoint is one file, `CHECKPOINT_FILE`, in each of Ray Train's checkpoint_*
directories of a run. It holds everything a resumed run restores (model, optimiser, schedule,
random states, the epoch and the metrics so far) and everything a reader needs to rebuild the
model without the run (the resolved config, the MLflow run id) and to use it on images without
the dataset (`labels`: the class names, and the normalisation it was trained with). `load_model`
also reads a torchvision state dict, for the paper's testing of published weights, and finds a
model in MLflow (`models:/NAME/VERSION`, `models:/NAME@alias`, `runs:/RUN_ID/model`).

Every file is read with torch.load(weights_only=True): tensors and plain data only, so a file from
elsewhere can be refused but never run code (a pickle's __reduce__ would). The random states are
stored that way too.
"""

from __future__ import annotations

import pickle
import random
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from raysnet.config import Config, from_dict, to_dict
from raysnet.errors import UsageError, root_cause
from raysnet.models import build_model, get_arch

CHECKPOINT_FILE = "checkpoint.pt"


MLFLOW_SCHEMES = ("models:/", "runs:/")


def is_mlflow_uri(source: str | Path) -> bool:
    return str(source).startswith(MLFLOW_SCHEMES)


def find(path: str | Path, tracking_uri: str | None = None) -> Path:
    """checkpoint.pt itself, a checkpoint directory holding it, a run directory (its latest
    checkpoint), an MLflow model URI (downloaded: see `from_mlflow`), or an object-store URI (`from_uri`)."""
    if is_mlflow_uri(path):
        return from_mlflow(str(path), tracking_uri)
    if "://" in str(path):
        return from_uri(str(path))
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


def from_uri(uri: str) -> Path:
    """A checkpoint in object storage (s3://bucket/run/checkpoint.pt, or the prefix holding one),
    downloaded into a fresh temporary directory."""
    import tempfile

    from pyarrow import fs

    from raysnet.storage import CHUNK, open_uri

    filesystem, where = open_uri(uri, "model")
    local = Path(tempfile.mkdtemp(prefix="raysnet-model-")) / CHECKPOINT_FILE
    try:
        if filesystem.get_file_info(where).type == fs.FileType.Directory:
            where = f"{where}/{CHECKPOINT_FILE}"
        with filesystem.open_input_stream(where) as src, open(local, "wb") as dst:
            while chunk := src.read(CHUNK):
                dst.write(chunk)
    except OSError as e:
        raise UsageError(f"no raysnet checkpoint at '{uri}' ({str(e).splitlines()[0]}): give the URI of a "
                         f"{CHECKPOINT_FILE} or of the prefix holding one, reachable with this machine's "
                         "credentials (AWS_* variables for s3://).") from None
    return local


def _mlflow_run_of(source: str, mlflow_client) -> str:
    """The MLflow run that logged the model `source` names."""
    if source.startswith("runs:/"):
        return source.removeprefix("runs:/").split("/")[0]
    name, _, version = source.removeprefix("models:/").partition("/")
    if "@" in name:
        name, alias = name.split("@", 1)
        return mlflow_client.get_model_version_by_alias(name, alias).run_id
    return mlflow_client.get_model_version(name, version).run_id


def from_mlflow(source: str, tracking_uri: str | None = None) -> Path:
    """The checkpoint.pt of an MLflow model, downloaded into a fresh temporary directory: the file
    inside the logged model (raysnet logs it there), else, for a model logged without one, the
    checkpoint its run logged (`checkpoint/`). `tracking_uri` None: $MLFLOW_TRACKING_URI."""
    import tempfile

    import mlflow

    from raysnet import tracking

    uri = tracking_uri or mlflow.get_tracking_uri()
    where = tempfile.mkdtemp(prefix="raysnet-model-")
    try:
        with tracking.fluent_uri(uri):
            mlflow.set_registry_uri(uri)
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=where))
            found = sorted(local.rglob(CHECKPOINT_FILE)) if local.is_dir() else [local]
            if not found:
                run_id = _mlflow_run_of(source, tracking.client(uri))
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{run_id}/checkpoint",
                                                                 dst_path=where))
                found = sorted(local.rglob(CHECKPOINT_FILE))
    except Exception as e:  # noqa: BLE001 - MLflow raises many kinds for "no such model": one message
        raise UsageError(f"no model at '{source}' in the MLflow store {uri} ({root_cause(e)}). Expected "
                         "models:/NAME/VERSION or models:/NAME@ALIAS of a registered model, or runs:/RUN_ID/model "
                         "of a raysnet run; the store is tracking.uri, else $MLFLOW_TRACKING_URI.") from None
    if not found:
        raise UsageError(f"the MLflow model '{source}' holds no raysnet {CHECKPOINT_FILE}, and its run logged no "
                         "checkpoint: it was not logged by raysnet.train.")
    return found[0]


def _legacy_numpy_globals() -> list:
    """What `np.random.get_state()`'s uint32 array needs from the unpickler: checkpoints written
    before the numpy state was stored as plain data (`_numpy_state`) hold that array pickled by
    numpy. Only these are allowed, and only while `read` reads (torch's list stays as it was)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, (_reconstruct, "numpy.core.multiarray._reconstruct"),  # numpy 1's name for it
            np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _foreign_globals(path: Path, error: str) -> str:
    """The Python objects a refused file asks for: from its opcodes (nothing executed), else from
    torch's message (a legacy or plain pickle)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - not a zip file: torch names the first one it met
        names = re.findall(r"GLOBAL (\S+) (?:was not|whose module)", error)[:1]
    return f" (it asks for {', '.join(names[:5])}{', ...' if len(names) > 5 else ''})" if names else ""


def read(path: Path, device: torch.device | str = "cpu") -> Any:
    """The one reader of checkpoints and state dicts: torch.load(weights_only=True), so a file can
    hold tensors and plain data but never run code, whoever wrote it."""
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # a plain pickle: refused below
            return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower():
            raise UsageError(f"'{path}' is not a raysnet checkpoint or state dict: torch.load(weights_only=True) "
                             f"found more than tensors and plain data in it{_foreign_globals(path, str(e))}, so it "
                             "was refused and was not executed. Pass a checkpoint.pt written by raysnet.train, or a "
                             "torchvision state dict with arch=NAME.") from None
        why = f"UnpicklingError: {str(e).splitlines()[0]}"
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        first = (str(e).splitlines() or [""])[0]
        why = f"{type(e).__name__}: {first}" if first else type(e).__name__
    raise UsageError(f"checkpoint '{path}' cannot be read by torch.load ({why}): it is not a file torch.save wrote, "
                     "or it is truncated. Expected a raysnet checkpoint.pt or a torchvision state dict.")


def _numpy_state() -> tuple:
    """`np.random.get_state()` as plain data: its uint32 key array as an int64 tensor, so the file
    loads with weights_only=True."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)


def _set_numpy_state(state: tuple | list) -> None:
    """The inverse of `_numpy_state`; also takes the old form (the key array as an ndarray)."""
    name, keys, *rest = state
    keys = keys.cpu().numpy() if torch.is_tensor(keys) else keys
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))


def labels(meta: dict) -> dict:
    """What a model needs of its dataset to be used on images: the class names (in label order) and
    the per-channel mean and std it was normalised with (0-255 scale). The crop and resize are the
    config's (data.crop, data.val_aug, data.val_resize)."""
    return {"classes": list(meta["classes"]), "mean": list(meta["mean"]), "std": list(meta["std"])}


def save(path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: torch.optim.lr_scheduler.LRScheduler, epoch: int, cfg: Config, run_id: str,
         history: list[dict], dataset: dict | None = None) -> None:
    """Write the checkpoint of a finished `epoch` (0-based) to `path`; `dataset` is `labels(meta)`."""
    torch.save({"labels": dataset,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        # Part of the file format: bf16 autocast needs no loss scaler, so this is always None; the
        # key stays so that fp16 training can store its GradScaler without a new format.
        "scaler": None,
        "epoch": epoch, "config": to_dict(cfg), "mlflow_run_id": run_id, "history": history,
        "rng": {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }, path)


MODEL_KEYS = ("model", "config", "labels", "mlflow_run_id")


def save_model_only(source: str | Path, path: str | Path) -> None:
    """A copy of checkpoint `source` with what using the model needs and nothing a resume needs
    (no optimiser, schedule or random states): the file an MLflow model carries."""
    raw = read(Path(source))
    torch.save({k: raw.get(k) for k in MODEL_KEYS}, path)


def restore(path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device) -> tuple[int, list[dict]]:
    """Load `path` into the model, optimiser, schedule and random states -> (next epoch, history)."""
    ckpt = read(Path(path), device)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    rng = ckpt["rng"]
    torch.set_rng_state(rng["torch"].cpu())
    _set_numpy_state(rng["numpy"])
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
    path: Path | None = None  # the file it was read from

    @property
    def labels(self) -> dict | None:
        """`labels(meta)` of the dataset it was trained on; None for a state dict, or a checkpoint
        written before checkpoints carried them."""
        return self.raw.get("labels") if self.config is not None else None


SHOW_KEYS = 6  # a failed load names this many keys of each kind


def misfit(model: nn.Module, state: dict) -> str:
    """Why `state` does not load into `model` strictly: its missing and unexpected keys and shape
    mismatches, each list capped at SHOW_KEYS; '' when it fits. A missing BN `num_batches_tracked`
    is not counted (testing never reads it, and many published state dicts lack it)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model" for k in own
              if k in state and torch.is_tensor(state[k]) and state[k].shape != own[k].shape]
    parts = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("with another shape", shapes)):
        if keys:
            more = f", and {len(keys) - SHOW_KEYS} more" if len(keys) > SHOW_KEYS else ""
            parts.append(f"{len(keys)} key(s) {what}: {', '.join(keys[:SHOW_KEYS])}{more}")
    return "; ".join(parts)


def plain_state(raw: dict) -> dict | None:
    """A ResNet state dict as published: itself, or under "state_dict"/"model", keys perhaps
    prefixed "module." (DataParallel) -> keys as raysnet's; None if it is not one."""
    state = raw.get("state_dict", raw.get("model", raw)) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        return None
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state if "fc.weight" in state else None


def _same_network(path: Path, cfg: Config, **given: str | None) -> None:
    """A raysnet checkpoint names its own network: arch=, shortcut= and variant= describe a plain state
    dict, and given for a checkpoint they must agree with it rather than be silently ignored."""
    holds = {"arch": cfg.arch, "shortcut": cfg.model.shortcut or get_arch(cfg.arch).default_shortcut,
             "variant": cfg.model.variant or "v1"}
    differ = [f"{k}={v} (it holds {holds[k]})" for k, v in given.items() if v is not None and v != holds[k]]
    if differ:
        raise UsageError(f"checkpoint '{path}' is a raysnet checkpoint of {cfg.arch} (shortcut {holds['shortcut']}, "
                         f"variant {holds['variant']}), which names its own network; {', '.join(differ)} "
                         "describe a plain state dict. Leave them out for a raysnet checkpoint.")


def load_model(path: str | Path, arch: str | None = None, shortcut: str | None = None,
               variant: str | None = None, tracking_uri: str | None = None) -> Loaded:
    """The model in a raysnet checkpoint (config inside; a file, directory or MLflow model URI, see
    `find`), or in a plain state dict with raysnet's parameter names (`arch` names it;
    `shortcut`/`variant` default to torchvision's B and v1.5 for the ImageNet depths, whose names
    match torchvision's, and to the paper's A and v1 for CIFAR's)."""
    p = find(path, tracking_uri)
    raw = read(p)
    hint = ""
    if isinstance(raw, dict) and "model" in raw and "config" in raw:
        cfg, state = from_dict(raw["config"]), raw["model"]
        _same_network(p, cfg, arch=arch, shortcut=shortcut, variant=variant)
        arch, shortcut, variant = cfg.arch, cfg.model.shortcut, cfg.model.variant
    elif (state := plain_state(raw)) is not None:
        if not arch:
            raise UsageError(f"'{p}' is a plain state dict; name its architecture with arch=resnet50 (etc.).")
        cfg, imagenet = None, get_arch(arch).family == "imagenet"
        shortcut, variant = shortcut or ("B" if imagenet else "A"), variant or ("v1.5" if imagenet else "v1")
        hint = (" A plain state dict needs raysnet's parameter names (torchvision's: conv1, bn1, layerN.M.convK, "
                "downsample.0/1, fc) and the network's options: shortcut=A|B|C, variant=v1|v1.5.")
    else:
        raise UsageError(f"'{p}' is neither a raysnet checkpoint nor a ResNet state dict (no fc.weight).")
    model = build_model(arch, num_classes=state["fc.weight"].shape[0], shortcut=shortcut, variant=variant)
    why = misfit(model, state)
    if why:
        raise UsageError(f"the weights in '{p}' do not fit {arch} (shortcut {shortcut or 'default'}, variant "
                         f"{variant or 'v1'}): {why}.{hint}")
    model.load_state_dict(state, strict=False)  # strict but for num_batches_tracked (misfit)
    run_id = raw.get("mlflow_run_id") if cfg is not None else None
    return Loaded(model.eval(), cfg, run_id or None, raw, p)
