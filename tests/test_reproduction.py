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
TABLE6 = REPO / "tuning" / "table6-cifar.yaml"
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


def test_table6_is_the_papers_recipe_on_one_shared_gpu():
    """Table 6's five nets and Fig. 6's plain ones: the whole recipe (164 epochs of 390 steps = 64k
    iterations), option A, the 110-layer warm-up; the trials fill one GPU exactly, on device data."""
    table6 = sweeps.validate(sweeps.load(TABLE6)[0], [])
    plain = sweeps.validate(sweeps.load(REPO / "tuning" / "fig6-plain-cifar.yaml")[0], [])
    assert [c.arch for c in table6] == ["resnet110", "resnet56", "resnet44", "resnet32", "resnet20"]
    assert sorted(c.arch for c in plain) == ["plain20", "plain32", "plain44", "plain56"]
    for spec, configs in ((sweeps.load(TABLE6)[0], table6), (sweeps.load(REPO / "tuning" / "fig6-plain-cifar.yaml")[0],
                                                                 plain)):
        assert spec.max_concurrent_trials == len(configs)
        assert sum(c.run.gpus_per_worker * c.run.max_workers for c in configs) == pytest.approx(1.0)
        for c in configs:
            assert (c.epochs, c.batch_size, c.optim.lr, c.optim.weight_decay, c.optim.milestones) == \
                (164, 128, 0.1, 1e-4, (0.5, 0.75))
            assert c.data.loader == "device" and c.data.train_aug == "cifar" and c.data.name == "cifar10-jpg"
            assert c.optim.warmup_iters == (400 if c.arch == "resnet110" else 0)
    assert all(c.model.shortcut == "A" for c in table6)


# (sweep file, key=value for a 2-core CPU, the nets it trains). Two nets of each file, a few steps:
# what is tested is that the file, the sweep and the report still fit together.
STUDIES = {
    "degradation-cifar-cpu": (STUDY, ["sweep.grid.arch=[plain20,resnet56]"], ["plain20", "resnet56"]),
    # Without a GPU: the same loader (data.loader=device runs on the CPU), eager. (The 110-layer
    # net's warm-up recipe: test_table6_is_the_papers_recipe_on_one_shared_gpu.)
    "table6-cifar": (TABLE6, ["run.gpus_per_worker=0", "model.compile=false", "sweep.grid.arch=[resnet32,resnet20]"],
                     ["resnet32", "resnet20"]),
}


@pytest.mark.e2e
# The CPU study's file with -m slow. Table 6's file runs in the default suite as the interrupted
# sweep that tests/test_tune.py and tests/test_report.py share (tests/sweep_helpers.py), its report
# checked there.
@pytest.mark.slow
@pytest.mark.parametrize("study", ["degradation-cifar-cpu", "table6-cifar"])
def test_the_study_runs_on_digits_through_tune_and_report(tmp_path, digits, ray_head, study):
    from sweep_helpers import child_runs, tune_cli

    path, extra, archs = STUDIES[study]
    storage = tmp_path / "out"
    uri = f"sqlite:///{storage / 'mlflow.db'}"
    tuned = tune_cli(path, ["data=digits", f"data.root={digits}", "epochs=1", "run.max_steps=3",
                            f"run.storage={storage}", "tracking.log_model=false", *extra], ray_head, timeout=900)
    assert tuned.returncode == 0, tuned.stdout[-3000:] + tuned.stderr[-3000:]
    runs = child_runs(uri, study)
    assert sorted(r.data.params["arch"] for r in runs) == sorted(archs)
    assert all(r.info.status == "FINISHED" for r in runs)

    out = tmp_path / "report"
    report = subprocess.run([sys.executable, "-m", "raysnet.report", f"experiment={study}", f"out={out}",
                             f"tracking.uri={uri}", "batches=1"], cwd=REPO, capture_output=True, text=True,
                            timeout=600, check=False)
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    text = (out / "report.md").read_text()
    assert "Table 6" in text and all(a in text for a in archs)
    assert list(out.glob("fig6-*.png")) and (out / "fig7-responses.png").is_file()
