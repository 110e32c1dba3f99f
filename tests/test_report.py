"""The report: the paper's tables and figures from runs read back out of MLflow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from raysnet.report import RunInfo, plot_curves, render_table, table_of, table_rows

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba/FFCV finaliser


def report_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raysnet.report", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, check=False)


def table_cells(markdown: str, title: str) -> dict[str, list[str]]:
    """run name -> the cells of its row, in the table whose heading contains `title`."""
    section = markdown.split(title, 1)[1].split("###", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells] for cells in rows[2:]}  # after header, rule


def _fake(arch: str, shortcut: str, top1: float, top5: float, family: str = "imagenet", depth: int = 0) -> RunInfo:
    from raysnet.models import get_arch

    a = get_arch(arch)
    return RunInfo(run_id=f"{arch}-{shortcut}", name=f"{arch}-{shortcut}", status="FINISHED", arch=arch,
                   depth=a.depth, family=a.family, residual=a.residual, shortcut=shortcut, variant=None,
                   dataset="imagenet", params={}, history={"val_err": [(0, top1 + 5), (1, top1)],
                                                           "val_err_top5": [(0, top5 + 2), (1, top5)],
                                                           "train_err": [(0, 50.0), (1, 40.0)]},
                   steps_per_epoch=5005, classes=None)


def test_imagenet_runs_land_in_the_papers_tables():
    runs = [_fake("plain18", "none", 30.0, 11.0), _fake("resnet34", "A", 26.0, 8.0), _fake("resnet34", "B", 25.0, 7.5),
            _fake("resnet50", "B", 23.0, 6.5), _fake("resnet50", "C", 22.5, 6.4)]
    assert [table_of(r) for r in runs] == [["2"], ["2", "3"], ["3"], ["3"], ["3"]]
    params = {r.run_id: 1 for r in runs}
    t2 = {r["run"]: r for r in table_rows(runs, "2", params)}
    assert set(t2) == {"plain18-none", "resnet34-A"}
    assert t2["plain18-none"]["paper_top1"] == 27.94 and t2["plain18-none"]["diff_top1"] == pytest.approx(30 - 27.94)
    assert t2["resnet34-A"]["paper_top5"] is None  # Table 2 gives top-1 only
    t3 = {r["run"]: r for r in table_rows(runs, "3", params)}
    assert (t3["resnet34-B"]["paper_top1"], t3["resnet34-B"]["paper_top5"]) == (24.52, 7.46)
    assert (t3["resnet34-A"]["paper_top1"], t3["resnet34-A"]["paper_top5"]) == (25.03, 7.76)
    assert (t3["resnet50-B"]["paper_top1"], t3["resnet50-B"]["diff_top5"]) == (22.85, pytest.approx(6.5 - 6.71))
    assert t3["resnet50-C"]["paper_top1"] is None  # the paper has no ResNet-50 with C: blank, not guessed
    cells = table_cells(render_table("3", list(t3.values())), "Table 3")
    assert cells["resnet50-B"][5:11] == ["23.00", "22.85", "+0.15", "6.50", "6.71", "-0.21"]
    assert cells["resnet50-C"][6:8] == ["", ""]


def test_curves_figure_without_mlflow(tmp_path):
    runs = [_fake("plain18", "none", 30.0, 11.0), _fake("plain34", "none", 31.0, 12.0),
            _fake("resnet18", "A", 28.0, 9.0), _fake("resnet34", "A", 26.0, 8.0)]
    path = plot_curves(runs, "imagenet", tmp_path / "fig4.png")
    assert path.stat().st_size > 10_000


@pytest.mark.e2e
@pytest.mark.budget(400, "the interrupted sweep of tests/sweep_helpers.py, in its set-up")
def test_report_of_the_smoke_sweep(smoke_sweep, tmp_path):
    import mlflow
    from mlflow import MlflowClient

    from raysnet.models import build_model

    assert smoke_sweep.rerun.returncode == 0, smoke_sweep.rerun.stderr[-3000:]
    out = tmp_path / "report"
    done = report_cli(f"experiment={smoke_sweep.experiment}", f"tracking.uri={smoke_sweep.uri}", f"out={out}",
                      "batches=2", "batch=100")
    assert done.returncode == 0, done.stderr[-3000:]

    # Table 6 holds each run's final numbers as MLflow has them, and the paper's in the right row.
    from raysnet.tracking import fluent_uri

    with fluent_uri(smoke_sweep.uri):
        runs = mlflow.search_runs(experiment_names=[smoke_sweep.experiment])
    runs = runs[runs["tags.mlflow.parentRunId"].notna()]  # the trials, not the sweep's parent
    assert len(runs) == 2
    cells = table_cells((out / "report.md").read_text(), "Table 6")
    for _, run in runs.iterrows():
        row = cells[run["tags.mlflow.runName"]]
        assert row[1] == run["tags.arch"] and row[2] == "20" and row[3] == run["tags.shortcut"]
        assert row[5] == f"{run['metrics.val_err']:.2f}" and row[8] == f"{run['metrics.val_err_top5']:.2f}"
        params = sum(p.numel() for p in build_model(run["tags.arch"], num_classes=10).parameters())
        assert row[4] == f"{params / 1e6:.2f}M"
        if run["tags.arch"] == "resnet20":
            assert row[6] == "8.75" and row[7] == f"{run['metrics.val_err'] - 8.75:+.2f}"
        else:
            assert row[6] == row[7] == ""  # the paper has no number for plain-20 in Table 6
    assert "Table 2" not in (out / "report.md").read_text()  # no ImageNet runs: no ImageNet tables

    # The figures, and Fig. 7's statistics for both models.
    for png in ("fig6-cifar-curves.png", "fig7-responses.png"):
        assert (out / png).stat().st_size > 10_000
    report = json.loads((out / "report.json").read_text())
    assert {r["arch"]: len(r["std"]) for r in report["responses"]} == {"plain20": 18, "resnet20": 18}
    assert all(str(smoke_sweep.storage) in r["checkpoint"] for r in report["responses"])

    # Logged to the sweep's parent run, so the MLflow UI shows it.
    parent = report["parent_run_id"]
    logged = {a.path for a in MlflowClient(smoke_sweep.uri).list_artifacts(parent, "report")}
    assert {"report/report.md", "report/fig6-cifar-curves.png", "report/fig7-responses.png"} <= logged



@pytest.mark.e2e
@pytest.mark.budget(400, "the interrupted sweep of tests/sweep_helpers.py, in its set-up")
def test_report_refuses_to_overwrite_and_names_experiments(smoke_sweep, tmp_path, capsys):
    from raysnet import cli
    from raysnet.report import run

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.md").write_text("mine")
    with pytest.raises(SystemExit) as again:
        cli.main(run, [f"experiment={smoke_sweep.experiment}", f"tracking.uri={smoke_sweep.uri}",
                       f"out={tmp_path / 'full'}"])
    assert again.value.code == 2 and "overwrite=true" in capsys.readouterr().err
    with pytest.raises(SystemExit) as missing:
        cli.main(run, ["experiment=nope", f"tracking.uri={smoke_sweep.uri}", f"out={tmp_path / 'x'}"])
    err = capsys.readouterr().err
    assert missing.value.code == 2 and "'nope'" in err and "table6-cifar" in err
    assert not (tmp_path / "x").exists()
