"""Run a sweep on Ray Tune: each trial is one whole raysnet run (`lifecycle.run_one`, launched
from a Tune function trainable, the Train V2 way), recorded as an MLflow child run of the
sweep's parent run.

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
import time
from pathlib import Path
from typing import Any

from raysnet import lifecycle, ray_address, storage, tracking
from raysnet.config import Config
from raysnet.errors import Stopped
from raysnet.tables import fmt, markdown_table
from raysnet.tune import spec as sweeps
from raysnet.tune.spec import Sweep

# A trial only launches its TorchTrainer, whose workers request their own CPUs and GPUs. Tune
# cannot place a trial that asks for nothing, so it asks for a sliver of memory: never of CPU,
# which would leave a node of N CPUs (a 1-CPU test node, a GPU node sized to run.cpus_per_worker)
# N - 0.01 and keep a worker that asks for all N off it.
TRIAL_RESOURCES = {"CPU": 0, "GPU": 0, "memory": 1 << 20}


@dataclasses.dataclass(frozen=True)
class Context:
    """What every trial needs from the sweep's driver (plain data: it travels to the trial actors)."""

    spec: Sweep
    cli: list[str]  # the command line's key=value overrides, for every trial
    sweep_id: str
    parent_run_id: str
    storage: str  # the sweep's directory: each trial's run.storage
    uri: str
    experiment: str
    cwd: str

    def run_name(self, overrides: dict[str, Any]) -> str:
        return sweeps.run_name(self.sweep_id, self.spec, overrides)


def trial_overrides(config: dict[str, Any]) -> dict[str, Any]:
    """Tune's resolved config of a trial -> its overrides (grid point, then random draws)."""
    return {**config.get("point", {}), **config.get("space", {})}


def resolve(ctx: Context, overrides: dict[str, Any]) -> Config:
    """The full config of one trial, as it will run."""
    cfg = sweeps.trial_config(ctx.spec, overrides, ctx.cli)
    return dataclasses.replace(
        cfg, run=dataclasses.replace(cfg.run, storage=ctx.storage, name=ctx.run_name(overrides)),
        tracking=dataclasses.replace(cfg.tracking, uri=ctx.uri, experiment=ctx.experiment))


# --- the trial ---------------------------------------------------------------------------------

def _report_callback():
    from ray.tune.integration.ray_train import TuneReportCallback

    class SweepReport(TuneReportCallback):
        """Train -> Tune, once per epoch, from rank 0's metrics. Adds `epochs_done` (ASHA's clock) and
        fills in every metric (NaN) on a report that lacks them (the non-finite stop), since Tune
        rejects a result without its metric."""

        def after_report(self, run_context, metrics, checkpoint):
            metrics = [{**{k: math.nan for k in tracking.METRICS}, **m, "epochs_done": m.get("epoch", -1) + 1}
                       for m in metrics]
            super().after_report(run_context, metrics, checkpoint)

    return SweepReport()


def run_trial(config: dict[str, Any], ctx: Context) -> None:
    """Tune's function trainable: one whole raysnet run. A run whose loss became non-finite is an
    outcome of its settings (e.g. too high an lr): the trial is done, not retried."""
    from ray import tune

    # Tune starts a trial in its own directory; relative paths on the command line mean the sweep's.
    if os.path.isdir(ctx.cwd):
        os.chdir(ctx.cwd)
    overrides = trial_overrides(config)
    cfg = resolve(ctx, overrides)
    mlflow = tracking.client(ctx.uri)
    done = tracking.find_run(mlflow, ctx.experiment, tracking.RUN_NAME_TAG, cfg.run.name)
    if done is not None and (done.info.status == "FINISHED" or tracking.DIVERGED_TAG in done.data.tags):
        for epoch in tracking.recorded_epochs(mlflow, done.info.run_id):  # Tune missed its end: tell it
            tune.report({**epoch, "epochs_done": epoch["epoch"] + 1})
        return
    print(f"raysnet: trial {cfg.run.name} {json.dumps(overrides)}", flush=True)
    tags = {"sweep": ctx.spec.name, tracking.SWEEP_ID_TAG: ctx.sweep_id, tracking.TRIAL_TAG: json.dumps(overrides)}
    lifecycle.run_one(cfg, parent_run_id=ctx.parent_run_id, tags=tags, callbacks=[_report_callback()],
                      title=sweeps.trial_title(cfg, overrides))


def _tune_callbacks(ctx: Context) -> list:
    from ray import tune

    class MarkStopped(tune.Callback):
        """A trial the scheduler stops leaves its MLflow run RUNNING: close it as stopped early."""

        def on_trial_complete(self, iteration, trials, trial, **info):
            mlflow = tracking.client(ctx.uri)
            name = ctx.run_name(trial_overrides(trial.config))
            run = tracking.find_run(mlflow, ctx.experiment, tracking.RUN_NAME_TAG, name)
            if run is not None and run.info.status == "RUNNING":
                mlflow.set_tag(run.info.run_id, tracking.STOPPED_TAG, "early, by the scheduler")
                mlflow.set_terminated(run.info.run_id, status=tracking.STATUS_STOPPED)

    return [MarkStopped()]


class TrialName:
    """Tune's name and directory for a trial: its run.name (picklable, for Tune's saved state)."""

    def __init__(self, ctx: Context):
        self.ctx = ctx

    def __call__(self, trial) -> str:
        return self.ctx.run_name(trial_overrides(trial.config))


# --- the sweep's MLflow parent run -------------------------------------------------------------

def open_parent(mlflow, experiment_id: str, sweep_id: str, spec: Sweep, text: str, path: str,
                cli: list[str], n_trials: int) -> tuple[str, bool]:
    """The sweep's parent run, found again by its tag on a rerun. -> (run id, resumed)"""
    found = mlflow.search_runs([experiment_id], filter_string=f"tags.`{tracking.SWEEP_TAG}` = '{sweep_id}'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    if found:
        mlflow.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id, True
    run = mlflow.create_run(experiment_id, run_name=sweep_id, tags={
        tracking.SWEEP_TAG: sweep_id, "sweep": spec.name, "raysnet.role": "sweep",
        "mlflow.note.content": spec.description or f"raysnet sweep {spec.name}"})
    tracking.log_params(mlflow, run.info.run_id, {
        "sweep.name": spec.name, "sweep.recipe": spec.recipe, "sweep.metric": spec.metric, "sweep.mode": spec.mode,
        "sweep.scheduler": spec.scheduler.type, "sweep.trials": n_trials, "sweep.num_samples": spec.num_samples,
        "sweep.command_line": " ".join(cli) or "-"})
    mlflow.log_text(run.info.run_id, text, f"sweep/{Path(path).name}")
    return run.info.run_id, False


def trial_rows(mlflow, experiment_id: str, parent_run_id: str, metric: str) -> list[dict[str, Any]]:
    """Each child run's final metrics and status (DIVERGED for a non-finite loss), from MLflow."""
    rows = []
    for run in tracking.all_runs(mlflow, experiment_id, parent_run_id):
        m = run.data.metrics
        status = "DIVERGED" if tracking.DIVERGED_TAG in run.data.tags else run.info.status
        rows.append({"run": run.info.run_name, "run_id": run.info.run_id, "status": status,
                     "overrides": json.loads(run.data.tags.get(tracking.TRIAL_TAG, "{}")),
                     **{k: m.get(k) for k in ("train_err", "val_err", "val_err_top5", "val_loss")},
                     "epochs": len(mlflow.get_metric_history(run.info.run_id, metric))})
    return rows


def best_row(rows: list[dict[str, Any]], spec: Sweep) -> dict[str, Any] | None:
    """The best trial by the sweep's metric: one that trained to the end, unless none did."""
    sign = 1 if spec.mode == "min" else -1
    ranked = [r for r in rows if r.get(spec.metric) is not None and math.isfinite(r[spec.metric])]
    ranked = [r for r in ranked if r["status"] == "FINISHED"] or ranked
    return min(ranked, key=lambda r: sign * r[spec.metric]) if ranked else None


def summarize(mlflow, experiment_id: str, parent_run_id: str, spec: Sweep, out_dir: str) -> tuple[list, str]:
    """The trials' final metrics as rows and a Markdown table, written to `out_dir` (a local path or
    a URI) and logged to the parent run; the best trial's values become the parent's `best.*`
    metrics and tags."""
    from mlflow.entities import Metric

    rows = trial_rows(mlflow, experiment_id, parent_run_id, spec.metric)
    best = best_row(rows, spec)
    status = {tracking.STATUS_STOPPED: "stopped early", "DIVERGED": "diverged (non-finite loss)"}
    table = markdown_table(
        ["trial", "overrides", "status", "epochs", "train_err %", "val_err %", "val_err_top5 %"],
        [[("**" + r["run"] + "**") if r is best else r["run"], " ".join(f"{k}={v}" for k, v in r["overrides"].items()),
          status.get(r["status"], r["status"]), str(r["epochs"]), fmt(r["train_err"]), fmt(r["val_err"]),
          fmt(r["val_err_top5"])] for r in rows])
    text = f"# Sweep {spec.name}\n\n{spec.description}\n\nmetric: {spec.metric} ({spec.mode}); " \
           f"best: {best['run'] if best else 'none yet'}\n\n{table}\n"
    filesystem, root = storage.open_uri(out_dir, "run.storage")
    for name, content in (("summary.md", text), ("summary.json", json.dumps(rows, indent=1, default=str))):
        storage.write_text(filesystem, f"{root}/{name}", content, "run.storage")
        mlflow.log_text(parent_run_id, content, f"summary/{name}")
    if best:
        now = int(time.time() * 1000)
        mlflow.log_batch(parent_run_id, metrics=[Metric(f"best.{k}", best[k], now, 0)
                                                 for k in ("train_err", "val_err", "val_err_top5")
                                                 if best.get(k) is not None])
        mlflow.set_tag(parent_run_id, "best.run_name", best["run"])
        for k, v in best["overrides"].items():
            mlflow.set_tag(parent_run_id, f"best.{k}", str(v))
    return rows, text


# --- the sweep ---------------------------------------------------------------------------------

def concurrency(spec: Sweep, cfg: Config, resources: dict[str, float], cores: int | None) -> tuple[int, str]:
    """How many trials run at once: as many as the resources hold, the sweep file's
    max_concurrent_trials being a ceiling. `cores`: a local Ray's machine (its logical CPUs are
    raised so that one trial fits even on a small laptop, so they say nothing of what runs well);
    None on a cluster, which is judged by its resources. -> (trials at a time, a line saying why
    when fewer than the file asks for, else "")"""
    per_trial = cfg.run.min_workers * cfg.run.cpus_per_worker
    cpus = cores if cores is not None else resources.get("CPU", 1)
    fit = int(cpus // per_trial)
    gpus = cfg.run.gpus_per_worker  # None: one each where there are GPUs (lifecycle.gpus_per_worker)
    gpus = (1 if resources.get("GPU", 0) > 0 else 0) if gpus is None else gpus
    if gpus:  # fractional shares: 1 GPU / 0.2 is five trials (not 1 // 0.2, which is 4.0 in floats)
        fit = min(fit, math.floor(resources.get("GPU", 0) / (cfg.run.min_workers * gpus) + 1e-6))
    fit = max(1, fit)
    asked = spec.max_concurrent_trials
    if cores is None and asked:  # a cluster may grow (autoscaling): the file's number stands
        return asked, ""
    if asked is None or asked <= fit:
        return asked or fit, ""
    held = f"{cores} cores" + (f" and {resources.get('GPU', 0):g} GPU(s)" if gpus else "")
    return fit, (f"raysnet: {fit} trial(s) at a time, not the sweep file's max_concurrent_trials={asked}: this "
                 f"machine's {held} hold {fit} trial(s) of {cfg.run.workers} worker(s) x {cfg.run.cpus_per_worker} "
                 "CPU(s); more at once would only share the same cores.")


def prepare_sweep(path: str, cli: list[str], sweep_overrides: list[str]) -> tuple[Sweep, str, list[Config], Config]:
    """Everything cheap that can fail, before Ray starts: the file, every trial's config, the
    tracking server, the datasets (once here, not in every trial at the same time).
    -> (sweep, the file's text, the trials' configs, the first one finalized: the sweep's storage and store)"""
    from raysnet.data import ensure_dataset

    spec, text = sweeps.load(path, sweep_overrides)
    configs = sweeps.validate(spec, cli)  # every trial resolves, or nothing starts
    ray_address.check_ray_address()
    base = lifecycle.finalize(configs[0])
    tracking.check_reachable(base.tracking.uri)
    for data in {c.data for c in configs}:
        ensure_dataset(data)
    return spec, text, configs, base


def _stop_like_ctrl_c_on_sigterm() -> list[int]:
    """SIGTERM (a scheduler's stop, `timeout`) ends the sweep the way Ctrl-C does in Ray Tune: the
    running trials stopped, the sweep's state saved for a rerun. Installed after ray.init, which gave
    this process Ray's own handler (a C++ stack dump, the sweep's MLflow runs left RUNNING).
    -> the SIGTERMs received, filled in by the handler"""
    import signal

    received: list[int] = []

    def handler(signum: int, frame) -> None:
        received.append(signum)
        os.kill(os.getpid(), signal.SIGINT)  # Tune's graceful stop, from its own SIGINT handler

    signal.signal(signal.SIGTERM, handler)
    return received


def close_stopped(mlflow, experiment_id: str, parent_run_id: str, why: str) -> None:
    """A stopped sweep leaves no MLflow run RUNNING: its running trials and itself end KILLED, with why."""
    for run in tracking.all_runs(mlflow, experiment_id, parent_run_id):
        if run.info.status == "RUNNING":
            mlflow.set_tag(run.info.run_id, tracking.STOPPED_TAG, why)
            mlflow.set_terminated(run.info.run_id, status=tracking.STATUS_STOPPED)
    mlflow.set_tag(parent_run_id, tracking.STOPPED_TAG, why)
    mlflow.set_terminated(parent_run_id, status=tracking.STATUS_STOPPED)


def run_sweep(path: str, cli: list[str], sweep_overrides: list[str] | tuple[str, ...] = ()) -> int:
    """`python -m raysnet.tune SWEEP.yaml [key=value ...] [sweep.key=value ...]` -> exit status."""
    spec, text, configs, base = prepare_sweep(path, cli, list(sweep_overrides))
    sweep_id = sweeps.identity(spec, cli)  # the file (with sweep.* overrides) and the command line
    # A local path (finalize made it absolute) or a URI (s3://...): joined as text, never as a Path.
    sweep_dir = f"{base.run.storage.rstrip('/')}/sweeps/{sweep_id}"
    experiment = configs[0].tracking.experiment or spec.experiment or spec.name
    # Enough logical CPUs for one trial's workers, even on a small laptop (as a run does).
    ray = lifecycle.connect_ray(base.run.max_workers * base.run.cpus_per_worker + 1)
    cores = (os.cpu_count() or 1) if ray_address.local_ray() else None
    at_once, why = concurrency(spec, base, ray.cluster_resources(), cores)
    if why:
        print(why, flush=True)

    mlflow = tracking.client(base.tracking.uri)
    exp_id = tracking.experiment_id(mlflow, experiment, base.run.storage, base.tracking.uri)
    n_trials = len(configs) * spec.num_samples
    parent, resumed = open_parent(mlflow, exp_id, sweep_id, spec, text, path, [*cli, *sweep_overrides], n_trials)
    ctx = Context(spec=spec, cli=list(cli), sweep_id=sweep_id, parent_run_id=parent, storage=sweep_dir,
                  uri=base.tracking.uri, experiment=experiment, cwd=os.getcwd())
    print(f"raysnet: {'resuming' if resumed else 'starting'} sweep {sweep_id}: {n_trials} trial(s), "
          f"{at_once} at a time, {spec.scheduler.type} scheduler on {spec.metric} ({spec.mode}); "
          f"MLflow experiment {experiment}, parent run {parent}", flush=True)
    stops = _stop_like_ctrl_c_on_sigterm()
    results = _tuner(spec, ctx, sweep_dir, at_once, base.epochs).fit()
    if stops:
        close_stopped(mlflow, exp_id, parent, "stopped by SIGTERM; the same command resumes the sweep")
        raise Stopped()  # one line, exit status 143 (raysnet.cli)

    rows, table = summarize(mlflow, exp_id, parent, spec, f"{sweep_dir}/summary")
    errors = [str(e).splitlines()[0] for e in results.errors] if results.errors else []
    missing = n_trials - len(rows)
    mlflow.set_terminated(parent, status="FAILED" if errors or missing > 0 else "FINISHED")
    print(table)
    if errors or missing > 0:
        print(f"raysnet: sweep {sweep_id}: {len(errors)} trial(s) failed"
              f"{f', {missing} never started' if missing > 0 else ''}. Run the same command again to retry them; "
              "finished trials are kept.\n  " + "\n  ".join(errors))
        return 1
    print(f"raysnet: sweep {sweep_id} done. Tune state: {sweep_dir}/tune; MLflow: "
          f"{tracking.ui_command(base.tracking.uri, exp_id)}")
    return 0


def _domain(dist: sweeps.Distribution):
    from ray import tune

    if dist.choice is not None:
        return tune.choice(list(dist.choice))
    if dist.randint is not None:
        return tune.randint(*dist.randint)
    if dist.loguniform is not None:
        return tune.loguniform(*dist.loguniform)
    return tune.uniform(*dist.uniform)


def _tuner(spec: Sweep, ctx: Context, sweep_dir: str, concurrency: int, epochs: int):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), TRIAL_RESOURCES)
    exp_dir = f"{sweep_dir}/tune"
    if tune.Tuner.can_restore(exp_dir):
        return tune.Tuner.restore(exp_dir, trainable, resume_unfinished=True, resume_errored=True)
    if spec.scheduler.type == "asha":
        # stop_last_trials=False: a trial that reaches max_t ends by itself, so its run closes
        # normally (a stopped trial's actor is killed, and its TorchTrainer with it).
        scheduler = ASHAScheduler(time_attr="epochs_done", max_t=spec.scheduler.max_t or epochs,
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
        run_config=tune.RunConfig(name="tune", storage_path=sweep_dir, callbacks=_tune_callbacks(ctx),
                                  failure_config=tune.FailureConfig(max_failures=1), verbose=1))
