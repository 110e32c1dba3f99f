"""The model family: `build_model(name, ...)` and `list_models()`."""

from raysnet.models.resnet import SHORTCUTS, VARIANTS, Arch, build_model, get_arch, list_models

__all__ = ["SHORTCUTS", "VARIANTS", "Arch", "build_model", "get_arch", "list_models"]
