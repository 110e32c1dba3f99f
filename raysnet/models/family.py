"""The named networks of the family: what differs between them, without building one. Torch-free, so
that checking a config (and every command line's --help) does not import torch."""

from __future__ import annotations

from dataclasses import dataclass

SHORTCUTS = ("A", "B", "C")
VARIANTS = ("v1", "v1.5")


@dataclass(frozen=True)
class Arch:
    """One entry of the registry: everything that differs between named networks."""

    family: str  # "imagenet" or "cifar"
    depth: int
    block: str  # "basic" or "bottleneck"
    blocks: tuple[int, ...]  # blocks per stage
    residual: bool

    @property
    def default_shortcut(self) -> str:
        # Paper: option A for CIFAR (§4.2), B for the ImageNet nets (§4.1, Table 3).
        return "A" if self.family == "cifar" else "B"

    @property
    def default_classes(self) -> int:
        return 10 if self.family == "cifar" else 1000


# Stage tables: Table 1 for ImageNet, §4.2 (n = (depth - 2) / 6) for CIFAR.
IMAGENET_STAGES = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)


def _registry() -> dict[str, Arch]:
    archs: dict[str, Arch] = {}
    for residual, prefix in ((True, "resnet"), (False, "plain")):
        for depth, (block, blocks) in IMAGENET_STAGES.items():
            archs[f"{prefix}{depth}"] = Arch("imagenet", depth, block, blocks, residual)
        for depth in CIFAR_DEPTHS:
            n = (depth - 2) // 6
            archs[f"{prefix}{depth}"] = Arch("cifar", depth, "basic", (n, n, n), residual)
    return archs


ARCHS = _registry()


def check(what: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {what} {value!r}; valid choices are: {', '.join(choices)}")


def get_arch(name: str) -> Arch:
    check("architecture", name, list_models())
    return ARCHS[name]


def list_models() -> list[str]:
    return list(ARCHS)
