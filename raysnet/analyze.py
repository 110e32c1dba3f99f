"""Fig. 7 of He et al. 2015: the standard deviation of each 3x3 layer's response.

    python -m raysnet.analyze checkpoint=outputs/resnet56-cifar10-.../checkpoint_.../checkpoint.pt
    python -m raysnet.analyze checkpoint=RUN_DIR data.root=/data/cifar10 batches=20 out=resnet56.json

"The responses are the outputs of each 3x3 layer, after BN and before other nonlinearity
(ReLU/addition)" (paper §4.2, Fig. 7). Here:
- a layer is every 3x3 conv inside the residual/plain blocks (both convs of a basic block, the
  middle conv of a bottleneck), in forward order: the figure's "layer index". The CIFAR stem is
  a 3x3 conv too but sits outside the blocks; `stem=true` counts it as layer 0.
- its response is the output of the BatchNorm that follows the conv, taken by a forward hook on
  that BN, so before the ReLU (which works in place and would overwrite it) and the addition.
- its std is over every element of the response (images x channels x height x width), pooled
  over the evaluated validation batches, in eval mode (BN with its running statistics).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import MISSING

from raysnet import cli as _cli
from raysnet import storage
from raysnet.config import Config, resolve_root
from raysnet.errors import UsageError

# torch (and raysnet.checkpoint, which imports it) is imported inside the functions that use it:
# it takes seconds, and --help or a mistyped key should answer at once.
if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class DataArgs:
    root: str = ""  # empty: the dataset directory recorded in the checkpoint's config


@dataclass
class AnalyzeArgs:
    checkpoint: str = MISSING  # checkpoint.pt, a checkpoint directory, or a run directory (its latest)
    batch: int = 128
    batches: int = 10  # validation batches to evaluate; 0: the whole validation set
    stem: bool = False  # count the CIFAR stem's 3x3 conv as layer 0
    out: str = "responses.json"
    overwrite: bool = False  # replace an existing `out`
    data: DataArgs = field(default_factory=DataArgs)


def response_layers(model: nn.Module, stem: bool = False) -> list[tuple[str, nn.BatchNorm2d]]:
    """(name, BN) for each 3x3 conv's BN, in forward order. Blocks name them convK -> bnK."""
    from torch import nn

    layers = []
    for name, module in model.named_modules():
        is_stem = name == ""
        if is_stem and not stem:
            continue
        for child, conv in module.named_children():
            if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and child.startswith("conv"):
                bn = getattr(module, "bn" + child[len("conv"):], None)
                if isinstance(bn, nn.BatchNorm2d):
                    layers.append((f"{name}.{child}" if name else child, bn))
    return layers


def layer_stds(model: nn.Module, batches: Iterable[torch.Tensor], stem: bool = False) -> list[tuple[str, float]]:
    """[(layer, std of its response)] over the images in `batches`, in layer order."""
    import torch

    layers = response_layers(model, stem)
    # Sums in float64 on the host: count, sum, sum of squares per layer.
    sums = [[0, 0.0, 0.0] for _ in layers]

    def hook(i: int):
        def record(module, inputs, output: torch.Tensor) -> None:
            x = output.detach().double()
            sums[i][0] += x.numel()
            sums[i][1] += x.sum().item()
            sums[i][2] += x.square().sum().item()
        return record

    handles = [bn.register_forward_hook(hook(i)) for i, (_, bn) in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for images in batches:
                model(images)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = []
    for (name, _), (n, s, s2) in zip(layers, sums):
        mean = s / max(n, 1)
        out.append((name, math.sqrt(max(s2 / max(n, 1) - mean * mean, 0.0))))
    return out


def validation_batches(cfg: Config, data_root: str = "", batch: int = 128, batches: int = 10):
    """The first `batches` validation images batches of the run's dataset, on the CPU.
    `data_root`: the user's override of the directory recorded in the checkpoint's config."""
    import torch

    from raysnet.data import ensure_dataset, make_loaders

    data = dataclasses.replace(cfg.data, root=resolve_root(data_root)) if data_root else cfg.data
    meta = ensure_dataset(data)
    _, val = make_loaders(data, meta, batch, device=torch.device("cpu"), seed=0, distributed=False,
                          channels_last=False)
    for i, (images, _) in enumerate(val):
        if batches and i >= batches:
            break
        yield images


def analyze(checkpoint: str | Path, data_root: str = "", batch: int = 128, batches: int = 10,
            stem: bool = False) -> dict[str, Any]:
    """Fig. 7's statistics for one checkpoint: {"layers": [names], "std": [values], ...}, in layer order."""
    from raysnet.checkpoint import find, load_model
    from raysnet.models import get_arch

    path = find(checkpoint)
    loaded = load_model(path)
    model, cfg = loaded.model, loaded.config
    seen = []

    def counted():
        for images in validation_batches(cfg, data_root, batch, batches):
            seen.append(images.shape[0])
            yield images

    stds = layer_stds(model, counted(), stem)
    arch = get_arch(cfg.arch)
    return {"checkpoint": str(path), "arch": cfg.arch, "depth": arch.depth,
            "residual": arch.residual, "shortcut": cfg.model.shortcut or arch.default_shortcut,
            "dataset": cfg.data.name, "images": sum(seen), "stem": stem,
            "layers": [n for n, _ in stds], "std": [s for _, s in stds]}


def run(args: list[str]) -> int:
    a = _cli.parse_args(AnalyzeArgs, args, "raysnet.analyze")
    if a.batch < 1 or a.batches < 0:
        raise UsageError(f"bad value for 'batch' ({a.batch}) or 'batches' ({a.batches}): batch >= 1, batches >= 0.")
    out = Path(a.out).expanduser()
    if out.is_dir() or (out.exists() and not a.overwrite):
        raise UsageError(f"out={a.out} {'is a directory' if out.is_dir() else 'already exists'}; nothing was "
                         "changed. Give out= a new file name (JSON), or pass overwrite=true to replace the file.")
    result = analyze(a.checkpoint, a.data.root, a.batch, a.batches, a.stem)
    from pyarrow import fs

    storage.write_text(fs.LocalFileSystem(), str(out.absolute()), json.dumps(result, indent=1), f"out={a.out}")
    std = result["std"]
    print(f"raysnet: {result['arch']}: {len(std)} 3x3 layers over {result['images']} validation images; response "
          f"std mean {sum(std) / max(len(std), 1):.3f}, min {min(std, default=0):.3f}, max {max(std, default=0):.3f}"
          f". Written to {a.out}")
    return 0


def cli() -> None:
    _cli.main(run, sigterm=True)


if __name__ == "__main__":
    cli()
