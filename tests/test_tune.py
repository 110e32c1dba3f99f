"""Sweeps: the sweep files, their validation, and a real sweep on Ray Tune + Ray Train + MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest
from clitools import command, one_paragraph, ray_started, run_cli

from raysnet.config import ConfigError
from raysnet.tune import spec as sweeps

REPO = Path(__file__).resolve().parent.parent
SWEEP_FILES = sorted((REPO / "tuning").glob("*.yaml"))


def parse(text: str) -> sweeps.Sweep:
    from omegaconf import OmegaConf

    return sweeps.parse(OmegaConf.create(text), "test sweep")


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_every_sweep_file_validates(path):
    """Each file's keys exist in the sweep schema and every trial resolves with load_config."""
    spec, _ = sweeps.load(path)
    configs = sweeps.validate(spec, [])
    assert configs and spec.name == path.stem
    names = [sweeps.run_name(sweeps.identity(spec, []), spec, p) for p in sweeps.points(spec)]
    assert len(set(names)) == len(names)


def test_the_shipped_sweeps_are_the_papers_comparisons():
    cifar = sweeps.validate(sweeps.load(REPO / "tuning/plain-vs-residual-cifar.yaml")[0], [])
    assert [c.arch for c in cifar] == [f"{k}{d}" for k in ("plain", "resnet") for d in (20, 32, 44, 56, 110)]
    # §4.2: the 110-layer nets warm up at lr 0.01 (recipe cifar-paper-110); the others do not.
    assert {c.arch: c.recipe for c in cifar}["resnet110"] == "cifar-paper-110"
    assert all((c.optim.warmup_iters > 0) == c.arch.endswith("110") for c in cifar)
    table2 = sweeps.validate(sweeps.load(REPO / "tuning/plain-vs-residual-imagenet.yaml")[0], [])
    assert [(c.arch, c.model.shortcut) for c in table2] == [("plain18", "A"), ("plain34", "A"), ("resnet18", "A"),
                                                            ("resnet34", "A")]
    table3 = sweeps.validate(sweeps.load(REPO / "tuning/shortcuts-imagenet.yaml")[0], [])
    assert [(c.arch, c.model.shortcut) for c in table3] == [
        ("resnet34", "A"), ("resnet34", "B"), ("resnet34", "C"), ("resnet50", "B"), ("resnet101", "B"),
        ("resnet152", "B")]
    asha, _ = sweeps.load(REPO / "tuning/lr-wd-asha.yaml")
    assert asha.scheduler.type == "asha" and set(asha.space) == {"optim.lr", "optim.weight_decay"}
    assert sweeps.validate(asha, [])[0].data.name == "imagefolder"


def test_trials_times_grid_with_conditions():
    spec = parse("""
name: t
recipe: digits
trials: [{arch: resnet20}, {arch: resnet56}]
grid: {optim.lr: [0.1, 0.05]}
when: [{match: {arch: resnet56, optim.lr: [0.05]}, set: {epochs: 3}}]
""")
    pts = sweeps.points(spec)
    assert pts == [{"arch": "resnet20", "optim.lr": 0.1}, {"arch": "resnet20", "optim.lr": 0.05},
                   {"arch": "resnet56", "optim.lr": 0.1}, {"arch": "resnet56", "optim.lr": 0.05}]
    assert [c.epochs for c in sweeps.validate(spec, [])] == [15, 15, 15, 3]
    # Command-line overrides reach every trial; a key the sweep varies cannot be overridden for all.
    assert {c.batch_size for c in sweeps.validate(spec, ["batch_size=32"])} == {32}
    with pytest.raises(ConfigError, match="optim.lr"):
        sweeps.validate(spec, ["optim.lr=0.2"])


def test_trials_at_once_fit_the_machine_and_the_file_is_a_ceiling():
    from raysnet.tune.runner import concurrency

    # Five trials at once, each one worker of 2 CPUs and 0.2 GPU.
    table6 = sweeps.load(REPO / "tuning/table6-cifar.yaml")[0]
    cpu = sweeps.validate(table6, ["run.gpus_per_worker=0"])[0]
    # A local Ray on 2 cores (its logical CPUs raised for the trials): one at a time, and why.
    at_once, why = concurrency(table6, cpu, {"CPU": 11}, cores=2)
    assert at_once == 1 and "not the sweep file's max_concurrent_trials=5" in why and "2 cores" in why
    gpu = sweeps.validate(table6, [])[0]
    assert concurrency(table6, gpu, {"CPU": 16, "GPU": 1}, cores=16) == (5, "")  # one H200 shared by five
    assert concurrency(table6, gpu, {"CPU": 16, "GPU": 1}, cores=6)[0] == 3
    # A cluster: the file's number stands (an autoscaler may add nodes); without one, what it holds.
    assert concurrency(table6, cpu, {"CPU": 2}, cores=None) == (5, "")
    two = parse("name: t\nrecipe: digits\ngrid: {arch: [plain20, resnet20]}")
    assert concurrency(two, sweeps.validate(two, [])[0], {"CPU": 8}, cores=None) == (4, "")  # 2 workers each


def test_run_names_are_deterministic_and_distinct():
    spec = parse("name: t\nrecipe: digits\ngrid: {arch: [plain20, resnet20]}")
    a, b = sweeps.identity(spec, ["epochs=1"]), sweeps.identity(spec, ["epochs=2"])
    assert a == sweeps.identity(parse("name: t\nrecipe: digits\ngrid: {arch: [plain20, resnet20]}"), ["epochs=1"])
    assert a != b  # another command line is another sweep, with runs of its own
    assert sweeps.run_name(a, spec, {"arch": "plain20"}).startswith("t-plain20-")
    assert sweeps.run_name(a, spec, {"arch": "plain20"}) != sweeps.run_name(b, spec, {"arch": "plain20"})


@pytest.mark.parametrize("text, words", [
    ("name: t\nrecipe: digits\ngird: {arch: [resnet20]}", ["unknown key 'gird'", "grid"]),
    ("name: t\nrecipe: digits\ngrid: {optim.lrr: [0.1]}", ["optim.lrr", "optim.lr"]),
    ("name: t\nrecipe: digits\ngrid: {arch: [resnet21]}", ["resnet21", "resnet20"]),
    ("name: t\nrecipe: digits\ntrials: [{model.shortcut: D}]", ["model.shortcut"]),
    ("name: t\nrecipe: nope\ngrid: {arch: [resnet20]}", ["unknown recipe 'nope'"]),
    ("name: t\nrecipe: digits\nmetric: accuracy", ["metric", "val_err"]),
    ("name: t\nrecipe: digits\nscheduler: {type: hyperband}", ["scheduler.type"]),
    ("name: t\nrecipe: digits\nspace: {optim.lr: {loguniform: [0, 1]}}", ["space.optim.lr"]),
    ("recipe: digits", ["name"]),
    ("name: t\nrecipe: digits\ngrid: {}", ["varies nothing", "grid", "trials", "space"]),
    ("name: t\nrecipe: digits\ngrid: {arch: []}", ["grid.arch", "no trials"]),
])
def test_mistakes_name_the_key(text, words):
    with pytest.raises(ConfigError) as e:
        sweeps.validate(parse(text), [])
    assert all(w in str(e.value) for w in words), str(e.value)


def test_cli_rejects_a_bad_sweep_before_anything_starts(capsys, tmp_path):
    (tmp_path / "bad.yaml").write_text("name: bad\nrecipe: digits\ngrid: {optim.weight_decayy: [0.1]}\n")
    out = run_cli(capsys, "raysnet.tune", str(tmp_path / "bad.yaml"), f"run.storage={tmp_path / 'out'}")
    assert "optim.weight_decayy" in one_paragraph(out)
    assert not (tmp_path / "out").exists()
    assert not ray_started()


@pytest.mark.e2e  # a real process: outside the quick loop, which runs everything in-process
def test_the_tune_command_line_itself(tmp_path):
    """`python -m raysnet.tune` as typed (the test above calls its entry point in this process)."""
    proc = command("raysnet.tune", "epochs=1", f"run.storage={tmp_path / 'out'}", timeout=120)
    assert "usage: python -m raysnet.tune" in one_paragraph(proc) and proc.stdout == ""
    assert not (tmp_path / "out").exists()


# --- a real sweep, interrupted and resumed (tests/sweep_helpers.py) ---------------------------------

@pytest.mark.e2e
@pytest.mark.budget(400, "the interrupted sweep of tests/sweep_helpers.py, in its set-up")
def test_smoke_sweep_records_one_parent_and_a_child_per_trial(smoke_sweep):
    from mlflow import MlflowClient

    assert smoke_sweep.rerun.returncode == 0, smoke_sweep.rerun.stdout[-3000:] + smoke_sweep.rerun.stderr[-3000:]
    client = MlflowClient(smoke_sweep.uri)
    exp = client.get_experiment_by_name(smoke_sweep.experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "raysnet.sweep" in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    assert len(parents) == 1 and len(children) == 2 and len(runs) == 3
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    tags = {r.data.tags["arch"]: r.data.tags for r in children}
    assert {k: (t["depth"], t["residual"], t["shortcut"], t["sweep"]) for k, t in tags.items()} == {
        "plain20": ("20", "plain", "none", "table6-cifar"), "resnet20": ("20", "residual", "A", "table6-cifar")}
    for r in children:
        assert r.info.status == "FINISHED"
        assert {"train_err", "val_err", "val_err_top5", "train_loss"} <= set(r.data.metrics)
        assert r.data.params["epochs"] == "1" and r.data.params["run.workers"] == "1"
    # The parent carries the sweep file and the summary, and the best trial's numbers.
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")} | \
        {a.path for a in client.list_artifacts(parent.info.run_id, "summary")}
    assert {"sweep/table6-cifar.yaml", "summary/summary.md", "summary/summary.json"} <= artifacts
    best = min(r.data.metrics["val_err"] for r in children)  # two nets barely trained may tie
    assert parent.data.metrics["best.val_err"] == pytest.approx(best)
    assert parent.data.tags["best.run_name"] in {r.info.run_name for r in children if r.data.metrics["val_err"] == best}


@pytest.mark.e2e
@pytest.mark.budget(400, "the interrupted sweep of tests/sweep_helpers.py, in its set-up")
def test_a_stopped_sweep_resumes_without_rerunning_finished_trials(smoke_sweep):
    """SIGTERM, as a scheduler or `timeout` stops it: one line, exit status 143, no MLflow run left
    RUNNING (the parent and a trial in progress KILLED), none of Ray's stack dump; then the same
    command resumes it."""
    from mlflow import MlflowClient
    from sweep_helpers import child_runs, histories

    out = smoke_sweep.stopped_output
    assert smoke_sweep.stopped == 143, out[-3000:]
    assert out.count("raysnet.tune: stopped by SIGTERM") == 1 and "*** SIGTERM received" not in out, out[-3000:]
    statuses = smoke_sweep.statuses_after_stop
    assert "RUNNING" not in statuses.values() and list(statuses.values()).count("FINISHED") == 1, statuses
    assert smoke_sweep.rerun.returncode == 0, smoke_sweep.rerun.stdout[-3000:] + smoke_sweep.rerun.stderr[-3000:]
    assert "resuming sweep" in smoke_sweep.rerun.stdout
    children = child_runs(smoke_sweep.uri, smoke_sweep.experiment)
    assert len(children) == 2  # exactly the trials: nothing duplicated by the rerun
    first = MlflowClient(smoke_sweep.uri).get_run(smoke_sweep.first_run_id)
    assert first.info.start_time == smoke_sweep.first_start_time and first.info.status == "FINISHED"
    after = histories(smoke_sweep.uri, smoke_sweep.first_run_id)
    assert after == smoke_sweep.first_history  # not trained again, nothing logged twice
    assert [s for s, _ in after["val_err"]] == [0]
    # The trial that had not finished did so in the rerun, once.
    other = next(r for r in children if r.info.run_id != smoke_sweep.first_run_id)
    assert other.info.status == "FINISHED"
    assert [s for s, _ in histories(smoke_sweep.uri, other.info.run_id)["train_err"]] == [0]
