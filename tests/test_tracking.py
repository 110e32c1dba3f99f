"""MLflow's side of a run without Ray: experiments, step-level points across restarts, system
metrics, the UI's address, the keys that steer them, and sweep trials' titles (real SQLite stores)."""

from __future__ import annotations

import time

import pytest

from raysnet import tracking
from raysnet.config import ConfigError, load_config


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for this file's tests (MLflow builds its tables in seconds, once)."""
    return tmp_path_factory.mktemp("store")


def _run(store, name: str, **overrides):
    """A new run `name` in the store: (its config, run id)."""
    import dataclasses

    cfg = load_config([f"run.storage={store}", f"run.name={name}"])
    cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(
        cfg.tracking, uri=f"sqlite:///{store / 'mlflow.db'}", experiment="raysnet-test", **overrides))
    run_id, _ = tracking.open_run(cfg, {}, {})
    return cfg, run_id


def test_experiments_raysnet_creates_open_on_the_runs_table(store):
    cfg, _ = _run(store, "kind")
    mlflow = tracking.client(cfg.tracking.uri)
    exp = mlflow.get_experiment_by_name("raysnet-test")
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    command = tracking.ui_command(cfg.tracking.uri, exp.experiment_id)
    assert command.startswith(f"mlflow ui --backend-store-uri {cfg.tracking.uri} --host 127.0.0.1")
    assert command.endswith(f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs?"
                            "workflowType=machine_learning")
    assert tracking.ui_command("http://h:5000", "7") == \
        "open http://h:5000/#/experiments/7/runs?workflowType=machine_learning in a browser"


def test_step_points_land_once_across_a_restart(store):
    """A restarted process trains again the steps after the last checkpoint: MLflow keeps the points it
    has and gets only the later ones, each global step once."""
    cfg, run_id = _run(store, "steps")

    def points(steps):
        return [(s, {"iter/train_loss": 1.0 / s, "iter/train_err": 50.0, "iter/lr": 0.1}) for s in steps]

    first = tracking.Tracker(cfg, run_id)
    first.log_steps(points(range(1, 11)))
    first.close()  # the process is killed after step 10 ...
    again = tracking.Tracker(cfg, run_id)  # ... and its successor starts from the checkpoint at step 6
    again.log_steps(points(range(7, 16)))
    again.log_steps(points(range(16, 21)))
    again.sync([{"epoch": 0, **{k: 1.0 for k in tracking.METRICS}}])  # waits for the queued points
    mlflow = tracking.client(cfg.tracking.uri)
    for key in tracking.STEP_METRICS:
        assert sorted(m.step for m in mlflow.get_metric_history(run_id, key)) == list(range(1, 21)), key
    assert [m.step for m in mlflow.get_metric_history(run_id, "train_loss")] == [0]  # epochs: step = epoch
    again.close()


def test_an_epoch_without_validation_logs_no_val_numbers(store, capsys):
    """run.eval_every > 1: the epochs between validations have NaN val_* in their history; MLflow
    gets their training numbers and nothing (no NaN point) for validation."""
    cfg, run_id = _run(store, "every")
    tracker = tracking.Tracker(cfg, run_id)
    tracker.sync([{"epoch": 0, **{k: float("nan") if k.startswith("val_") else 1.0 for k in tracking.METRICS}},
                  {"epoch": 1, **{k: 2.0 for k in tracking.METRICS}}])
    tracker.close()
    h = tracking.history(tracking.client(cfg.tracking.uri), run_id)
    assert [s for s, _ in h["train_loss"]] == [0, 1] and h["val_err"] == [(1, 2.0)] and h["val_loss"] == [(1, 2.0)]
    # And the driver's epoch line says so instead of "val_err nan%".
    from raysnet.lifecycle import _epoch_printer

    unvalidated = {"epoch": 0, "train_err": 50.0, "val_err": float("nan"), "lr": 0.1, "images_per_sec": 9.0,
                   "epoch_time_s": 1.0}
    _epoch_printer(3).after_report(None, [unvalidated], None)
    assert capsys.readouterr().out == "epoch 1/3: train_err 50.00%  not validated  lr 0.1  9 images/s  1.0 s\n"


def test_system_metrics_land_under_the_node(store):
    cfg, run_id = _run(store, "system", system_metrics_s=0.2)
    monitor = tracking.start_system_metrics(cfg, run_id, "node0", "here 127.0.0.1")
    time.sleep(1.5)
    monitor.finish()
    run = tracking.client(cfg.tracking.uri).get_run(run_id)
    keys = set(run.data.metrics)
    assert {"system/node0/cpu_utilization_percentage", "system/node0/system_memory_usage_megabytes"} <= keys
    assert run.data.tags[f"{tracking.NODE_TAG}.node0"] == "here 127.0.0.1"
    assert tracking.start_system_metrics(load_config(["tracking.system_metrics_s=0"]), run_id, "node0", "x") is None


@pytest.mark.parametrize("args, words", [
    (["run.progress_s=-1"], ["run.progress_s", "0 (off)"]),
    (["tracking.step_every=-5"], ["tracking.step_every"]),
    (["tracking.system_metrics_s=-1"], ["tracking.system_metrics_s"]),
    (["tracking.register=resnets", "tracking.log_model=false"], ["tracking.register=resnets", "log_model"]),
])
def test_bad_watch_keys_name_the_key(args, words):
    with pytest.raises(ConfigError) as e:
        load_config(args)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_step_every_defaults_to_a_few_dozen_points_an_epoch():
    from raysnet.train.progress import step_every

    assert step_every(load_config([]), 390) == 13  # CIFAR-10 at batch 128: 30 points an epoch
    assert step_every(load_config([]), 11) == 1
    assert step_every(load_config(["tracking.step_every=50"]), 390) == 50
    assert step_every(load_config(["tracking.step_every=0"]), 390) == 0


def test_sweep_trials_are_listed_like_the_papers_tables():
    from raysnet.tune.spec import trial_title

    assert trial_title(load_config(["arch=plain56"]), {"arch": "plain56"}) == "plain56-A-seed0"
    cfg = load_config(["arch=resnet34", "model.shortcut=C", "run.seed=2", "optim.lr=0.05"])
    assert trial_title(cfg, {"arch": "resnet34", "model.shortcut": "C", "optim.lr": 0.05}) == "resnet34-C-seed2-lr0.05"
