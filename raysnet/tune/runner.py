"""Run a sweep on Ray Tune: each trial is a whole raysnet training run (a Tune function trainable
that launches a Ray Train `TorchTrainer`, the Train V2 way), recorded as an MLflow child run of
the sweep's parent run.

Where things go, under `run.storage` (default outputs/):
    sweeps/<sweep>-<hash>/tune/          Tune's experiment state (restored when the command reruns)
    sweeps/<sweep>-<hash>/<trial run>/   each trial's Ray Train checkpoints
    mlflow.db, mlartifacts/              the local MLflow store, shared with plain training runs

Resuming: the same command again restores Tune's experiment (finished trials stay finished,
unfinished and errored ones run again); a trial resumes from its own checkpoints (same run.name)
and continues its own MLflow run. A trial whose MLflow run is already FINISHED (the sweep was
killed after the run closed, before Tune recorded it) only reports its recorded epochs to Tune.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from raysnet.config import Config
from raysnet.tune import spec as sweeps
from raysnet.tune.spec import Sweep

# A trial only launches its TorchTrainer, whose workers request their own CPUs and GPUs. Tune
# cannot place a trial that asks for nothing, so it asks for a sliver.
TRIAL_CPU = 0.01
SWEEP_TAG = "raysnet.sweep"  # on the parent: the sweep's identity, how a rerun finds it
TRIAL_TAG = "raysnet.trial"  # on a child: the trial's overrides as JSON
STEPS_TAG = "raysnet.steps_per_epoch"  # on a child: for plots against iterations
DIVERGED_TAG = "raysnet.diverged"  # on a child whose loss became non-finite: a result, not a failure
CHILD_STATUS_STOPPED = "KILLED"  # MLflow's status for a trial the scheduler stopped early


@dataclasses.dataclass(frozen=True)
class Context:
    """What every trial needs from the sweep's driver (plain data: it travels to the trial actors)."""

    spec: dict[str, Any]
    cli: list[str]
    sweep_id: str
    parent_run_id: str
    storage: str  # the sweep's directory: each trial's run.storage
    uri: str
    experiment: str
    cwd: str

    def sweep(self) -> Sweep:
        return sweeps.parse(self.spec, f"sweep '{self.sweep_id}'")


def trial_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """Tune's resolved config of a trial -> its overrides (grid point, then random draws)."""
    return {**config.get("point", {}), **config.get("space", {})}


def resolve(ctx: Context, overrides: dict[str, Any]) -> Config:
    """The full config of one trial, as it will run."""
    spec = ctx.sweep()
    cfg = sweeps.trial_config(spec, overrides, ctx.cli)
    root = cfg.data.root if os.path.isabs(cfg.data.root) else os.path.join(ctx.cwd, cfg.data.root)
    return dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, root=root),
        run=dataclasses.replace(cfg.run, storage=ctx.storage, name=sweeps.run_name(ctx.sweep_id, spec, overrides)),
        tracking=dataclasses.replace(cfg.tracking, uri=ctx.uri, experiment=ctx.experiment))


# --- MLflow helpers --------------------------------------------------------------------------

def find_run(client, experiment: str, run_name: str):
    from raysnet.train.tracking import RUN_NAME_TAG

    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    return found[0] if found else None


def recorded_epochs(client, run_id: str) -> list[dict[str, float]]:
    """A run's per-epoch metrics from MLflow (step = epoch), oldest first."""
    from raysnet.train.tracking import METRICS

    epochs: dict[int, dict[str, float]] = {}
    for key in METRICS:
        for m in client.get_metric_history(run_id, key):
            epochs.setdefault(m.step, {"epoch": m.step})[key] = m.value
    return [epochs[e] for e in sorted(epochs)]


def children(client, experiment_id: str, parent_run_id: str) -> list:
    return client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                              order_by=["attributes.start_time ASC"], max_results=10000)


# --- the trial ---------------------------------------------------------------------------------

def _report_callback():
    from ray.tune.integration.ray_train import TuneReportCallback

    class SweepReport(TuneReportCallback):
        """Train -> Tune, once per epoch, from rank 0's metrics. Adds `epochs_done` (ASHA's clock) and
        fills in every metric (NaN) on a report that lacks them (the non-finite stop), since Tune
        rejects a result without its metric."""

        def after_report(self, run_context, metrics, checkpoint):
            from raysnet.train.tracking import METRICS

            metrics = [{**{k: math.nan for k in METRICS}, **m, "epochs_done": m.get("epoch", -1) + 1}
                       for m in metrics]
            super().after_report(run_context, metrics, checkpoint)

    return SweepReport()


def run_trial(config: dict[str, Any], ctx: Context) -> None:
    """Tune's function trainable: one whole raysnet run through the driver's steps."""
    import ray
    from mlflow import MlflowClient
    from ray import tune

    from raysnet.train import driver, tracking

    # Tune starts a trial in its own directory; relative paths on the command line mean the sweep's.
    if os.path.isdir(ctx.cwd):
        os.chdir(ctx.cwd)
    overrides = trial_overrides(config)
    cfg = resolve(ctx, overrides)
    client = MlflowClient(ctx.uri)
    done = find_run(client, ctx.experiment, cfg.run.name)
    if done is not None and (done.info.status == "FINISHED" or DIVERGED_TAG in done.data.tags):
        for epoch in recorded_epochs(client, done.info.run_id):  # Tune missed its end: tell it, train nothing
            tune.report({**epoch, "epochs_done": epoch["epoch"] + 1})
        return

    cfg, meta, resumed = driver.prepare(cfg)
    gpus = driver.gpus_per_worker(cfg)
    steps = meta["splits"]["train"]["samples"] // cfg.batch_size
    tags = {"sweep": ctx.spec["name"], "raysnet.sweep_id": ctx.sweep_id, TRIAL_TAG: json.dumps(overrides),
            STEPS_TAG: str(min(steps, cfg.run.max_steps or steps))}
    run_id, _ = tracking.open_run(cfg, driver.hardware(ray, gpus, cfg), parent_run_id=ctx.parent_run_id,
                                  extra_tags=tags)
    print(f"raysnet: {'resuming' if resumed else 'starting'} trial {cfg.run.name} {json.dumps(overrides)}",
          flush=True)
    try:
        result = driver.make_trainer(cfg, meta, run_id, gpus, callbacks=[_report_callback()]).fit()
        code = driver.finish(cfg, meta, run_id, result)
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    if code:
        # The loss became non-finite (finish() marked the run FAILED and said where): an outcome of
        # these settings, e.g. too high an lr, so the trial is done rather than retried.
        client.set_tag(run_id, DIVERGED_TAG, "the training loss became non-finite")


def _tune_callbacks(ctx: Context) -> list:
    from ray import tune

    class MarkStopped(tune.Callback):
        """A trial the scheduler stops leaves its MLflow run RUNNING: close it as stopped early."""

        def on_trial_complete(self, iteration, trials, trial, **info):
            from mlflow import MlflowClient

            client = MlflowClient(ctx.uri)
            run = find_run(client, ctx.experiment, resolve(ctx, trial_overrides(trial.config)).run.name)
            if run is not None and run.info.status == "RUNNING":
                client.set_tag(run.info.run_id, "raysnet.stopped", "early, by the scheduler")
                client.set_terminated(run.info.run_id, status=CHILD_STATUS_STOPPED)

    return [MarkStopped()]


class TrialName:
    """Tune's name and directory for a trial: its run.name (picklable, for Tune's saved state)."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def __call__(self, trial) -> str:
        return sweeps.run_name(self.ctx.sweep_id, self.ctx.sweep(), trial_overrides(trial.config))


# --- the sweep ---------------------------------------------------------------------------------

def _domain(dist: sweeps.Distribution):
    from ray import tune

    if dist.choice is not None:
        return tune.choice(list(dist.choice))
    if dist.randint is not None:
        return tune.randint(*dist.randint)
    if dist.loguniform is not None:
        return tune.loguniform(*dist.loguniform)
    return tune.uniform(*dist.uniform)


def _experiment(client, name: str, storage: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    # As open_run does: artifacts beside a local SQLite store.
    location = str(Path(storage) / "mlartifacts") if uri.startswith("sqlite:") else None
    return client.create_experiment(name, artifact_location=location)


def open_parent(client, experiment_id: str, sweep_id: str, spec: Sweep, text: str, path: str,
                cli: list[str], n_trials: int) -> tuple[str, bool]:
    """The sweep's parent run, found again by its tag on a rerun. -> (run id, resumed)"""
    found = client.search_runs([experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_id}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id, True
    run = client.create_run(experiment_id, run_name=sweep_id, tags={
        SWEEP_TAG: sweep_id, "sweep": spec.name, "raysnet.role": "sweep",
        "mlflow.note.content": spec.description or f"raysnet sweep {spec.name}"})
    from mlflow.entities import Param

    params = {"sweep.name": spec.name, "sweep.recipe": spec.recipe, "sweep.metric": spec.metric,
              "sweep.mode": spec.mode, "sweep.scheduler": spec.scheduler.type, "sweep.trials": n_trials,
              "sweep.num_samples": spec.num_samples, "sweep.command_line": " ".join(cli) or "-"}
    client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()])
    client.log_text(run.info.run_id, text, f"sweep/{Path(path).name}")
    return run.info.run_id, False


def summarize(client, experiment_id: str, parent_run_id: str, spec: Sweep, out_dir: Path) -> tuple[list, str]:
    """The trials' final metrics (from MLflow), as rows and a Markdown table; the best trial's
    values become the parent's `best.*` metrics and tags."""
    from raysnet.report import fmt, markdown_table

    rows = []
    for run in children(client, experiment_id, parent_run_id):
        m = run.data.metrics
        status = "DIVERGED" if DIVERGED_TAG in run.data.tags else run.info.status
        rows.append({"run": run.info.run_name, "run_id": run.info.run_id, "status": status,
                     "overrides": json.loads(run.data.tags.get(TRIAL_TAG, "{}")),
                     **{k: m.get(k) for k in ("train_err", "val_err", "val_err_top5", "val_loss")},
                     "epochs": len(client.get_metric_history(run.info.run_id, spec.metric))})
    sign = 1 if spec.mode == "min" else -1
    ranked = [r for r in rows if r.get(spec.metric) is not None and math.isfinite(r[spec.metric])]
    # The best trial is one that trained to the end, unless none did.
    ranked = [r for r in ranked if r["status"] == "FINISHED"] or ranked
    best = min(ranked, key=lambda r: sign * r[spec.metric]) if ranked else None
    status = {CHILD_STATUS_STOPPED: "stopped early", "DIVERGED": "diverged (non-finite loss)"}
    table = markdown_table(
        ["trial", "overrides", "status", "epochs", "train_err %", "val_err %", "val_err_top5 %"],
        [[("**" + r["run"] + "**") if r is best else r["run"],
          " ".join(f"{k}={v}" for k, v in r["overrides"].items()), status.get(r["status"], r["status"]),
          str(r["epochs"]),
          fmt(r["train_err"]), fmt(r["val_err"]), fmt(r["val_err_top5"])] for r in rows])
    text = f"# Sweep {spec.name}\n\n{spec.description}\n\nmetric: {spec.metric} ({spec.mode}); " \
           f"best: {best['run'] if best else 'none yet'}\n\n{table}\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.md").write_text(text)
    (out_dir / "summary.json").write_text(json.dumps(rows, indent=1, default=str))
    client.log_artifact(parent_run_id, str(out_dir / "summary.md"), "summary")
    client.log_artifact(parent_run_id, str(out_dir / "summary.json"), "summary")
    if best:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        client.log_batch(parent_run_id, metrics=[Metric(f"best.{k}", best[k], now, 0)
                                                 for k in ("train_err", "val_err", "val_err_top5")
                                                 if best.get(k) is not None])
        client.set_tag(parent_run_id, "best.run_name", best["run"])
        for k, v in best["overrides"].items():
            client.set_tag(parent_run_id, f"best.{k}", str(v))
    return rows, text


def _concurrency(spec: Sweep, cfg: Config, ray) -> int:
    """The sweep file's max_concurrent_trials, else as many trials as the cluster's CPUs (GPUs) hold."""
    from raysnet.train.driver import gpus_per_worker

    if spec.max_concurrent_trials:
        return spec.max_concurrent_trials
    resources = ray.cluster_resources()
    fit = int(resources.get("CPU", 1) // (cfg.run.workers * cfg.run.cpus_per_worker))
    gpus = gpus_per_worker(cfg)
    if gpus:
        fit = min(fit, int(resources.get("GPU", 0) // (cfg.run.workers * gpus)))
    return max(1, fit)


def run_sweep(path: str, cli: list[str], sweep_overrides: list[str] | tuple[str, ...] = ()) -> int:
    """`python -m raysnet.tune SWEEP.yaml [key=value ...] [sweep.key=value ...]` -> exit status."""
    from mlflow import MlflowClient

    from raysnet.data import ensure_dataset
    from raysnet.train import driver, tracking

    spec, text = sweeps.load(path, sweep_overrides)
    configs = sweeps.validate(spec, cli)  # every trial resolves, or nothing starts
    base = driver.finalize(configs[0])
    sweep_id = sweeps.identity(spec, cli)  # the file (with sweep.* overrides) and the command line
    storage = Path(base.run.storage)
    sweep_dir = storage / "sweeps" / sweep_id
    experiment = next((a.partition("=")[2] for a in reversed(cli) if a.startswith("tracking.experiment=")),
                      spec.experiment or spec.name)
    tracking.check_reachable(base.tracking.uri)
    for data in {c.data for c in configs}:  # once here, not in every trial at the same time
        ensure_dataset(data)

    # Enough logical CPUs for the concurrent trials' workers, even on a small laptop (as a run does).
    n = spec.max_concurrent_trials or 1
    ray = driver.connect_ray(dataclasses.replace(base, run=dataclasses.replace(
        base.run, workers=n * base.run.workers * base.run.cpus_per_worker + 1, cpus_per_worker=1)))
    concurrency = _concurrency(spec, base, ray)

    client = MlflowClient(base.tracking.uri)
    exp_id = _experiment(client, experiment, str(storage), base.tracking.uri)
    n_trials = len(configs) * spec.num_samples
    parent, resumed = open_parent(client, exp_id, sweep_id, spec, text, path, [*cli, *sweep_overrides], n_trials)
    ctx = Context(spec=OmegaConf.to_container(OmegaConf.structured(spec)), cli=list(cli), sweep_id=sweep_id,
                  parent_run_id=parent, storage=str(sweep_dir), uri=base.tracking.uri, experiment=experiment,
                  cwd=os.getcwd())
    print(f"raysnet: {'resuming' if resumed else 'starting'} sweep {sweep_id}: {n_trials} trial(s), "
          f"{concurrency} at a time, {spec.scheduler.type} scheduler on {spec.metric} ({spec.mode}); "
          f"MLflow experiment {experiment}, parent run {parent}", flush=True)
    results = _tuner(spec, ctx, sweep_dir, concurrency, base).fit()

    rows, table = summarize(client, exp_id, parent, spec, sweep_dir / "summary")
    errors = [str(e).splitlines()[0] for e in results.errors] if results.errors else []
    missing = n_trials - len(rows)
    client.set_terminated(parent, status="FAILED" if errors or missing > 0 else "FINISHED")
    print(table)
    if errors or missing > 0:
        print(f"raysnet: sweep {sweep_id}: {len(errors)} trial(s) failed{f', {missing} never started' if missing > 0 else ''}"
              f". Run the same command again to retry them; finished trials are kept.\n  " + "\n  ".join(errors))
        return 1
    print(f"raysnet: sweep {sweep_id} done. Tune state: {sweep_dir / 'tune'}; MLflow: "
          f"{tracking.ui_command(base.tracking.uri)}")
    return 0


def _tuner(spec: Sweep, ctx: Context, sweep_dir: Path, concurrency: int, base: Config):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), {"CPU": TRIAL_CPU, "GPU": 0})
    exp_dir = sweep_dir / "tune"
    if tune.Tuner.can_restore(str(exp_dir)):
        return tune.Tuner.restore(str(exp_dir), trainable, resume_unfinished=True, resume_errored=True)
    if spec.scheduler.type == "asha":
        # stop_last_trials=False: a trial that reaches max_t ends by itself, so its run closes
        # normally (a stopped trial's actor is killed, and its TorchTrainer with it).
        scheduler = ASHAScheduler(time_attr="epochs_done", max_t=spec.scheduler.max_t or base.epochs,
                                  grace_period=spec.scheduler.grace_period,
                                  reduction_factor=spec.scheduler.reduction_factor, stop_last_trials=False)
    else:
        scheduler = FIFOScheduler()
    space = {"point": tune.grid_search(sweeps.points(spec))}
    if spec.space:
        space["space"] = {k: _domain(d) for k, d in spec.space.items()}
    return tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(
            metric=spec.metric, mode=spec.mode, scheduler=scheduler, num_samples=spec.num_samples,
            search_alg=BasicVariantGenerator(max_concurrent=concurrency, random_state=spec.seed),
            trial_name_creator=TrialName(ctx), trial_dirname_creator=TrialName(ctx)),
        run_config=tune.RunConfig(name="tune", storage_path=str(sweep_dir), callbacks=_tune_callbacks(ctx),
                                  failure_config=tune.FailureConfig(max_failures=1), verbose=1))
