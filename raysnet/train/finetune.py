"""Fine-tuning: a run that starts from existing weights (model.init), with the loaded layers at a
lower lr (model.init_lr_scale) and the first stages frozen (model.freeze).

The driver reads the source once, in the preflight (`prepare`): every tensor whose name and shape
fit the run's freshly built network is kept, the head is left fresh when the classes differ, and
any other misfit is one paragraph before Ray starts. What fits is written into the run's directory
(`INIT_FILE`, and `INIT_NOTE` naming what was left fresh), where every worker reads it, on any node,
without the driver's disk or the source's store. A worker loads it only when the run has no
checkpoint of its own (`load`): a resumed run continues from its checkpoint and never reads it.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raysnet import checkpoint
from raysnet.config import Config, freeze_stages, from_dict
from raysnet.errors import UsageError
from raysnet.models import build_model, get_arch

INIT_FILE = "init.pt"  # the tensors that fit: {name: tensor}
INIT_NOTE = "init.json"  # {"source": model.init, "fresh": [names of the network's tensors left as built]}
HEAD = ("fc.weight", "fc.bias")
# The modules of each stage model.freeze names (raysnet.models.resnet); "layerN" is itself.
STEM = ("conv1", "bn1")


@dataclass(frozen=True)
class Source:
    """The weights at model.init, as read."""

    state: dict[str, torch.Tensor]
    arch: str | None  # the network a raysnet checkpoint names; None for a plain state dict
    classes: list[str] | None  # the class names it was trained on, when it carries them
    run_id: str | None  # the MLflow run that trained it, if any
    path: Path


@dataclass(frozen=True)
class Init:
    """What a run starts from: the tensors that fit, the names left fresh, and the line that says so."""

    state: dict[str, torch.Tensor]
    fresh: list[str]
    run_id: str | None
    line: str


# --- the driver: read, match, write ----------------------------------------------------------------

def read_source(cfg: Config) -> Source:
    """model.init, through the checkpoint reader (a missing path or an unknown MLflow model is its
    one-paragraph UsageError): a raysnet checkpoint names its network, a plain state dict is read as
    this run's arch."""
    path = checkpoint.find(cfg.model.init, cfg.tracking.uri)
    raw = checkpoint.read(path)  # once: the kind of file decides how it is read
    if isinstance(raw, dict) and "model" in raw and "config" in raw:
        source_cfg, labels = from_dict(raw["config"]), raw.get("labels") or {}
        return Source(raw["model"], source_cfg.arch, labels.get("classes"), raw.get("mlflow_run_id") or None, path)
    state = checkpoint.plain_state(raw)
    if state is None:
        raise UsageError(f"model.init={cfg.model.init}: '{path}' is neither a raysnet checkpoint nor a ResNet state "
                         "dict (no fc.weight). Expected a checkpoint.pt written by raysnet.train, models:/NAME/VERSION, "
                         "runs:/RUN_ID/model, or a torchvision-style state dict of this run's arch.")
    return Source(state, None, None, None, path)


def _head_differs(source: Source, model: nn.Module, classes: list[str]) -> bool:
    """The source's head answers other classes: another count, or (when it names them) other names."""
    if tuple(source.state.get("fc.weight", torch.empty(0)).shape) != tuple(model.fc.weight.shape):
        return True
    return source.classes is not None and list(source.classes) != list(classes)


def match(cfg: Config, source: Source, classes: list[str]) -> Init:
    """The source's tensors that fit a freshly built network of this run, the head left fresh when
    the classes differ; a UsageError naming the keys for any other misfit."""
    model = build_model(cfg.arch, num_classes=len(classes), shortcut=cfg.model.shortcut, variant=cfg.model.variant)
    own, state = model.state_dict(), dict(source.state)
    replace = _head_differs(source, model, classes)
    if replace:  # stand-ins, so that misfit counts only what else differs
        state.update({k: own[k] for k in HEAD})
    why = checkpoint.misfit(model, state)
    if why:
        hint = (f" It holds a {source.arch}: pass arch={source.arch}" + (" (and its model.shortcut/variant)"
                if source.arch != cfg.arch else " with the same model.shortcut and model.variant") + "."
                if source.arch else "")
        raise UsageError(f"model.init={cfg.model.init}: the weights in '{source.path}' do not fit this run's "
                         f"{cfg.arch} (shortcut {cfg.model.shortcut or get_arch(cfg.arch).default_shortcut}, variant "
                         f"{cfg.model.variant or 'v1'}, {len(classes)} classes): {why}.{hint} Only the head (fc) "
                         "may differ, and it is left fresh when the classes do.")
    loaded = {k: v.detach().clone() for k, v in state.items() if k in own and not (replace and k in HEAD)}
    fresh = [k for k in own if k not in loaded]
    return Init(loaded, fresh, source.run_id, _line(cfg, source, classes, loaded, fresh if replace else []))


def _line(cfg: Config, source: Source, classes: list[str], loaded: dict, head: list[str]) -> str:
    """The one console line of an initialisation."""
    what = ", ".join(filter(None, [source.arch or f"a plain state dict read as {cfg.arch}",
                                   source.run_id and f"MLflow run {source.run_id}"]))
    line = f"raysnet: initialised from {cfg.model.init} ({what}): {len(loaded)} tensors loaded"
    if not head:
        return line + ", the head too (the same classes)"
    count = len(source.state["fc.bias"]) if "fc.bias" in source.state else "?"
    there = f"{count} classes there" + (f": {_few(source.classes)};" if source.classes else ",")
    here = f"{len(classes)} here" + (f": {_few(classes)}" if source.classes else "")
    return f"{line}; {', '.join(head)} left fresh ({there} {here})"


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def prepare(cfg: Config, classes: list[str]) -> Init:
    """The preflight's part: read model.init and match it to this run (writes nothing)."""
    return match(cfg, read_source(cfg), classes)


def _run_file(cfg: Config, name: str):
    """(filesystem, path) of a file in the run's directory: local, s3://, gs:// alike."""
    from pyarrow import fs

    filesystem, root = fs.FileSystem.from_uri(cfg.run.storage)
    return filesystem, f"{root}/{cfg.run.name}/{name}"


def write(cfg: Config, init: Init) -> None:
    """The tensors (torch.save: tensors only, read back with weights_only) and the note of what
    stayed fresh, into the run's directory."""
    buffer = io.BytesIO()
    torch.save({k: v.contiguous() for k, v in init.state.items()}, buffer)
    for name, data in ((INIT_FILE, buffer.getvalue()),
                       (INIT_NOTE, json.dumps({"source": cfg.model.init, "fresh": init.fresh}).encode())):
        filesystem, path = _run_file(cfg, name)
        with filesystem.open_output_stream(path) as f:
            f.write(data)


# --- the worker: load, freeze, group -------------------------------------------------------------

def _read_run_file(cfg: Config, name: str) -> bytes:
    filesystem, path = _run_file(cfg, name)
    try:
        with filesystem.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise UsageError(f"model.init={cfg.model.init}: the run's copy of its initial weights, {path}, is gone; "
                         "the preflight writes it before the workers start. Start the run again under a new "
                         "run.name.") from None


def fresh_names(cfg: Config) -> set[str] | None:
    """The tensors the initialisation left as built (the note's); None without model.init."""
    if not cfg.model.init:
        return None
    return set(json.loads(_read_run_file(cfg, INIT_NOTE))["fresh"])


def load(model: nn.Module, cfg: Config) -> None:
    """Load the run's initial weights into the bare network (before DDP, which broadcasts rank 0's)."""
    state = torch.load(io.BytesIO(_read_run_file(cfg, INIT_FILE)), map_location="cpu", weights_only=True)
    initialise(model, state)


def initialise(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` (a matched subset of the network's tensors) in; everything else stays as built."""
    _, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected  # `match` kept only the network's own names


def frozen_modules(model: nn.Module, cfg: Config) -> list[nn.Module]:
    """The top-level modules model.freeze freezes: the stem (conv1, bn1) and every stage up to and
    including the one it names (`freeze_stages` lists them; the config was checked against it)."""
    if not cfg.model.freeze:
        return []
    stages = freeze_stages(cfg.arch)
    upto = stages[:stages.index(cfg.model.freeze) + 1]
    return [getattr(model, name) for stage in upto for name in (STEM if stage == "stem" else (stage,))]


def freeze(model: nn.Module, cfg: Config) -> list[nn.Module]:
    """Freeze the stages of model.freeze (no gradient: DDP and the optimiser leave them out) ->
    their BatchNorm layers, which `keep_frozen` puts back in eval mode after every model.train()."""
    norms = []
    for module in frozen_modules(model, cfg):
        for p in module.parameters():
            p.requires_grad_(False)
        norms += [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return norms


def keep_frozen(norms: list[nn.Module]) -> None:
    """Frozen BatchNorm layers normalise with their loaded statistics and never update them (in
    training mode they would use, and move, the batch's)."""
    for m in norms:
        m.eval()


def param_groups(model: nn.Module, cfg: Config, fresh: set[str] | None) -> list[dict[str, Any]]:
    """The trainable parameters as optimiser groups: the product of two splits. Weight decay: one
    group, or with optim.wd_bn_bias=false the conv and fc weights apart from the 1-d tensors (BN
    weights, biases), which get none (FFCV's ImageNet recipe). Fine-tuning (`fresh` not None):
    the parameters left fresh at optim.lr, the loaded ones at model.init_lr_scale of it, those first
    so that group 0's lr is the run's. The schedule (LambdaLR) scales every group's lr alike."""
    from raysnet.train.schedule import base_lr

    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [({}, lambda p: True)] if cfg.optim.wd_bn_bias else \
        [({}, lambda p: p.ndim > 1), ({"weight_decay": 0.0}, lambda p: p.ndim <= 1)]
    origin = [({}, lambda n: True)] if fresh is None else \
        [({}, lambda n: n in fresh), ({"lr": base_lr(cfg) * cfg.model.init_lr_scale}, lambda n: n not in fresh)]
    groups = []
    for first, keep in origin:
        for second, wd in decay:
            groups.append({"params": [p for n, p in params if keep(n) and wd(p)], **first, **second})
    return groups
