"""The numbers He et al. 2015 report, keyed as raysnet's MLflow tags key a run: (arch, shortcut).

`shortcut` is the run's `shortcut` tag: "A", "B" or "C" for residual nets, "none" for plain
ones. Errors are in %. These are facts restated from the paper, so reports can put a measured
number next to the published one; nothing here is read from anywhere at run time.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Reported:
    top1: float
    top5: float | None = None
    note: str = ""


Key = tuple[str, str]  # (arch, shortcut tag)

# Table 2: ImageNet val, 10-crop top-1; the residual nets use option A.
TABLE2: dict[Key, Reported] = {
    ("plain18", "none"): Reported(27.94),
    ("plain34", "none"): Reported(28.54),
    ("resnet18", "A"): Reported(27.88),
    ("resnet34", "A"): Reported(25.03),
}

# Table 3: ImageNet val, 10-crop top-1 / top-5; 50/101/152 use option B.
TABLE3: dict[Key, Reported] = {
    ("plain34", "none"): Reported(28.54, 10.02),
    ("resnet34", "A"): Reported(25.03, 7.76),
    ("resnet34", "B"): Reported(24.52, 7.46),
    ("resnet34", "C"): Reported(24.19, 7.40),
    ("resnet50", "B"): Reported(22.85, 6.71),
    ("resnet101", "B"): Reported(21.75, 6.05),
    ("resnet152", "B"): Reported(21.43, 5.71),
}

# Table 4: ImageNet val, single model, fully-convolutional multi-scale testing.
TABLE4: dict[Key, Reported] = {
    ("resnet34", "B"): Reported(21.84, 5.71),
    ("resnet34", "C"): Reported(21.53, 5.60),
    ("resnet50", "B"): Reported(20.74, 5.25),
    ("resnet101", "B"): Reported(19.87, 4.60),
    ("resnet152", "B"): Reported(19.38, 4.49),
}

# Table 6: CIFAR-10 test error, option A. The paper gives no top-5 and no number for plain nets
# (their curves are in Fig. 6).
TABLE6: dict[Key, Reported] = {
    ("resnet20", "A"): Reported(8.75),
    ("resnet32", "A"): Reported(7.51),
    ("resnet44", "A"): Reported(7.17),
    ("resnet56", "A"): Reported(6.97),
    ("resnet110", "A"): Reported(6.43, note="best of 5 runs; mean 6.61 ± 0.16"),
    ("resnet1202", "A"): Reported(7.93, note="overfits"),
}

# Table 6's parameter counts (millions), as printed.
TABLE6_PARAMS_M: dict[str, float] = {"resnet20": 0.27, "resnet32": 0.46, "resnet44": 0.66, "resnet56": 0.85,
                                     "resnet110": 1.7, "resnet1202": 19.4}

TABLES: dict[str, dict[Key, Reported]] = {"2": TABLE2, "3": TABLE3, "4": TABLE4, "6": TABLE6}


def reported(table: str, arch: str, shortcut: str) -> Reported | None:
    """The paper's number for this (arch, shortcut) in Table `table`, or None where it gives none."""
    return TABLES[table].get((arch, shortcut))
