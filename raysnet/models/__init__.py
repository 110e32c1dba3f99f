"""The model family: `build_model(name, ...)` and `list_models()`. The registry (family.py) is
torch-free; the networks themselves (resnet.py) import torch when first asked for."""

from raysnet.models.family import SHORTCUTS, VARIANTS, Arch, get_arch, list_models

__all__ = ["SHORTCUTS", "VARIANTS", "Arch", "build_model", "get_arch", "list_models"]


def __getattr__(name: str):
    if name == "build_model":
        from raysnet.models.resnet import build_model

        return build_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
