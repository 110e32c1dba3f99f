"""`../shared`'s CIFAR-10 is JPEG-encoded (quality 75, 4:2:0): every place that shows a number
measured on it says so, and what it costs."""

from __future__ import annotations

import re
from pathlib import Path

from raysnet.report import JPEG_CIFAR_NOTE, RunInfo, curve_sections, render_table

REPO = Path(__file__).resolve().parent.parent


def _row(dataset: str) -> dict:
    return {"run": "r20", "arch": "resnet20", "layers": 20, "shortcut": "A", "params": 270_000, "dataset": dataset,
            "top1": 18.0, "top5": None, "paper_top1": 8.75, "paper_top5": None, "diff_top1": 9.25,
            "diff_top5": None, "note": ""}


def test_the_reports_cifar_numbers_carry_the_jpeg_caveat(tmp_path):
    assert all(words in JPEG_CIFAR_NOTE for words in ("quality 75", "4:2:0", "about 10 points", "8.27% -> 18.97%",
                                                      "source=cifar10"))
    assert JPEG_CIFAR_NOTE in render_table("6", [_row("cifar10-jpg")])
    assert JPEG_CIFAR_NOTE not in render_table("6", [_row("cifar10")])  # the original images: no caveat
    info = RunInfo(run_id="r", name="r20", status="FINISHED", arch="resnet20", depth=20, family="cifar",
                   residual=True, shortcut="A", variant=None, dataset="cifar10-jpg", params={},
                   history={"train_err": [(0, 50.0)], "val_err": [(0, 40.0)]}, steps_per_epoch=390, classes=10)
    _, sections = curve_sections([info], tmp_path)
    assert JPEG_CIFAR_NOTE in sections[0]


def test_results_say_it_beside_every_cifar_table():
    text = (REPO / "docs" / "RESULTS.md").read_text()
    assert "quality 75" in text and "4:2:0" in text and "8.27 % error on the original" in text
    # Every error table of the CIFAR sections (§1, §2) has the copy named in the lines just above it.
    for section in re.split(r"\n## ", text)[1:3]:
        for table in re.finditer(r"\n\| (net|epoch) ", section):
            assert "JPEG" in section[max(0, table.start() - 700):table.start()], section[table.start():][:80]
