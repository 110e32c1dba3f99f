"""The reproduction study of docs/RESULTS.md stays runnable: its sweep file, then its report.

The study itself (tuning/degradation-cifar-cpu.yaml on CIFAR-10) takes an hour on 2 cores; here
the same file runs on the embedded digits for one epoch, through the same two commands.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from raysnet.tune import spec as sweeps

REPO = Path(__file__).resolve().parent.parent
STUDY = REPO / "tuning" / "degradation-cifar-cpu.yaml"
ARCHS = ["plain56", "resnet56", "plain20", "resnet20"]
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba/FFCV finaliser


def test_the_study_is_the_papers_degradation_comparison():
    """Fig. 6's nets with the paper's recipe (option A, lr steps at 50% and 75%), only shorter."""
    configs = sweeps.validate(sweeps.load(STUDY)[0], [])
    assert [c.arch for c in configs] == ARCHS
    for c in configs:
        assert (c.recipe, c.data.name, c.epochs, c.batch_size) == ("cifar-paper", "cifar10-jpg", 8, 128)
        assert c.model.shortcut is None and c.data.train_aug == "cifar" and c.data.val_aug == "original"
        assert (c.optim.lr, c.optim.weight_decay, c.optim.milestones) == (0.1, 1e-4, (0.5, 0.75))
        assert c.data.source == "../shared/data/cifar10-jpg.tar.gz" and c.data.auto_prepare


@pytest.mark.e2e
def test_the_study_runs_on_digits_through_tune_and_report(tmp_path, digits):
    from sweep_helpers import child_runs, tune_cli

    storage = tmp_path / "out"
    uri = f"sqlite:///{storage / 'mlflow.db'}"
    tuned = tune_cli(STUDY, ["data=digits", f"data.root={digits}", "epochs=1", f"run.storage={storage}",
                             "tracking.log_model=false"], timeout=900)
    assert tuned.returncode == 0, tuned.stdout[-3000:] + tuned.stderr[-3000:]
    runs = child_runs(uri, "degradation-cifar-cpu")
    assert sorted(r.data.params["arch"] for r in runs) == sorted(ARCHS)
    assert all(r.info.status == "FINISHED" for r in runs)

    out = tmp_path / "report"
    report = subprocess.run([sys.executable, "-m", "raysnet.report", "experiment=degradation-cifar-cpu", f"out={out}",
                             f"tracking.uri={uri}", "batches=1"], cwd=REPO, capture_output=True, text=True,
                            timeout=600, check=False)
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    text = (out / "report.md").read_text()
    assert "Table 6" in text and all(a in text for a in ARCHS)
    assert list(out.glob("fig6-*.png")) and (out / "fig7-responses.png").is_file()
