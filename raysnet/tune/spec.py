"""A sweep file (tuning/NAME.yaml): which trials to run and how Tune schedules them.

Pure configuration, no Ray: the trials a file names are expanded and every one is resolved
with `load_config` before anything starts, so a key that does not exist is an error here.

    name: plain-vs-residual-cifar        # the sweep's name (MLflow experiment unless `experiment:`)
    recipe: cifar-paper                  # the base recipe of every trial
    overrides: {run.workers: 2}          # key=value for every trial (resources are config keys too)
    grid: {arch: [plain20, resnet20]}    # the full product of these values ...
    trials: [{arch: resnet34, model.shortcut: A}]   # ... times these explicit trials
    when: [{match: {arch: resnet110}, set: {recipe: cifar-paper-110}}]  # conditional overrides
    space: {optim.lr: {loguniform: [0.01, 0.5]}}      # random search: num_samples draws
    metric: val_err
    mode: min
    scheduler: {type: asha, grace_period: 2}
    max_concurrent_trials: 2
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from raysnet.config import Config, load_config
from raysnet.errors import ConfigError, from_omegaconf


@dataclass
class Distribution:
    """One random-search axis; exactly one of these is given."""

    uniform: list[float] | None = None  # [low, high]
    loguniform: list[float] | None = None  # [low, high], both > 0
    randint: list[int] | None = None  # [low, high), integers
    choice: list[Any] | None = None  # one of the values


@dataclass
class Condition:
    """`set` these overrides on every trial whose values `match` (a value, or a list of values)."""

    match: dict[str, Any] = field(default_factory=dict)
    set: dict[str, Any] = field(default_factory=dict)


@dataclass
class Scheduler:
    type: Literal["fifo", "asha"] = "fifo"
    # ASHA (Li et al. 2018), in epochs: every trial runs `grace_period` epochs, then at each rung
    # only the best 1/reduction_factor continue; max_t defaults to the trials' `epochs`.
    grace_period: int = 1
    reduction_factor: float = 4
    max_t: int | None = None


@dataclass
class Sweep:
    name: str = MISSING
    recipe: str = MISSING
    description: str = ""
    experiment: str = ""  # MLflow experiment; empty: `name` (a tracking.experiment=... override wins)
    overrides: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    trials: list[dict[str, Any]] = field(default_factory=list)
    when: list[Condition] = field(default_factory=list)
    space: dict[str, Distribution] = field(default_factory=dict)
    num_samples: int = 1  # repeats of the grid, each with a new draw from `space`
    seed: int | None = None  # for the random draws
    metric: str = "val_err"
    mode: Literal["min", "max"] = "min"
    scheduler: Scheduler = field(default_factory=Scheduler)
    max_concurrent_trials: int | None = None  # None: as many as the cluster's CPUs (GPUs) hold


def _fields(schema: Any = Sweep, prefix: str = "") -> list[str]:
    return [prefix + f.name for f in dataclasses.fields(schema)]


def _keys() -> list[str]:
    """Every key a sweep file may have, dotted."""
    return _fields() + _fields(Scheduler, "scheduler.")


def parse(node: DictConfig | dict, where: str) -> Sweep:
    """A sweep from its YAML mapping; unknown keys and bad types are ConfigErrors naming the key."""
    try:
        spec: Sweep = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Sweep), node))
    except OmegaConfBaseException as e:
        raise from_omegaconf(e, where, _keys()) from None
    _check(spec, where)
    return spec


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[Sweep, str]:
    """(sweep, the file's text) from a YAML file, with `sweep.KEY=VALUE` overrides of its keys
    (e.g. sweep.num_samples=2 sweep.max_concurrent_trials=1 to smoke-test a shipped sweep)."""
    path = Path(path).expanduser()
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read sweep file '{path}': {e.strerror}.") from None
    try:
        node = OmegaConf.create(text)
    except Exception as e:  # noqa: BLE001 - a YAML syntax error: keep the parser's words
        raise ConfigError(f"sweep file '{path}' is not valid YAML: {e}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"sweep file '{path}' must hold a mapping of keys to values.")
    if overrides:
        try:
            node = OmegaConf.merge(node, OmegaConf.from_dotlist([a.removeprefix("sweep.") for a in overrides]))
        except OmegaConfBaseException as e:
            raise from_omegaconf(e, f"{' '.join(overrides)} for sweep file '{path}'", _keys()) from None
    return parse(node, f"sweep file '{path}'" + (f" with {' '.join(overrides)}" if overrides else "")), text


def _check(spec: Sweep, where: str) -> None:
    from raysnet.tracking import METRICS

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", spec.name):
        raise ConfigError(f"bad value for 'name' in {where}: '{spec.name}'. Use letters, digits, '.', '_', '-' "
                          "(it names directories and MLflow runs).")
    if spec.metric not in METRICS:
        raise ConfigError(f"bad value for 'metric' in {where}: '{spec.metric}'. Expected one of the metrics each "
                          f"epoch reports: {', '.join(METRICS)}.")
    if spec.num_samples < 1:
        raise ConfigError(f"bad value for 'num_samples' in {where}: {spec.num_samples}. Expected 1 or more.")
    if spec.max_concurrent_trials is not None and spec.max_concurrent_trials < 1:
        raise ConfigError(f"bad value for 'max_concurrent_trials' in {where}: {spec.max_concurrent_trials}. "
                          "Expected 1 or more, or null for as many as the cluster holds.")
    if not (spec.grid or spec.trials or spec.space):
        raise ConfigError(f"{where} varies nothing: its 'grid', 'trials' and 'space' are all empty, which would run "
                          "one trial of the base config. Give at least one of them (e.g. grid: {arch: [plain20, "
                          "resnet20]}); a single run is python -m raysnet.train.")
    for key, values in spec.grid.items():
        if not values:
            raise ConfigError(f"bad value for 'grid.{key}' in {where}: an empty list leaves no trials.")
    for key, dist in spec.space.items():
        given = {k: v for k, v in dataclasses.asdict(dist).items() if v is not None}
        if len(given) != 1:
            raise ConfigError(f"bad value for 'space.{key}' in {where}: give exactly one of "
                              f"{', '.join(_fields(Distribution))}, e.g. {{loguniform: [0.01, 0.5]}}.")
        kind, bounds = next(iter(given.items()))
        if kind != "choice" and (len(bounds) != 2 or not bounds[0] < bounds[1] or (kind == "loguniform"
                                                                                  and bounds[0] <= 0)):
            raise ConfigError(f"bad value for 'space.{key}.{kind}' in {where}: {list(bounds)}. Expected "
                              f"[low, high] with low < high{' and low > 0' if kind == 'loguniform' else ''}.")
        if kind == "choice" and not bounds:
            raise ConfigError(f"bad value for 'space.{key}.choice' in {where}: an empty list.")
    both = (set(spec.grid) | {k for t in spec.trials for k in t}) & set(spec.space)
    if both:
        raise ConfigError(f"{where} sets {', '.join(sorted(both))} both in a grid/trials and in 'space'; "
                          "give each key one place.")
    if spec.scheduler.type == "asha" and (spec.scheduler.grace_period < 1 or spec.scheduler.reduction_factor <= 1):
        raise ConfigError(f"bad value for 'scheduler' in {where}: ASHA needs grace_period >= 1 and "
                          "reduction_factor > 1.")


def varied_keys(spec: Sweep) -> set[str]:
    """The keys whose values differ between trials."""
    return set(spec.grid) | {k for t in spec.trials for k in t} | set(spec.space) | \
        {k for c in spec.when for k in c.set}


def points(spec: Sweep) -> list[dict[str, Any]]:
    """The grid: each explicit trial times the product of `grid`, in file order."""
    keys = list(spec.grid)
    product = [dict(zip(keys, values)) for values in itertools.product(*(spec.grid[k] for k in keys))]
    return [{**t, **g} for t in (spec.trials or [{}]) for g in product]


def representative(spec: Sweep) -> dict[str, Any]:
    """A value from every `space` axis, to validate its key before any draw."""
    out = {}
    for key, dist in spec.space.items():
        out[key] = next(v for v in dataclasses.asdict(dist).values() if v is not None)[0]
    return out


def conditional(spec: Sweep, overrides: dict[str, Any]) -> dict[str, Any]:
    """The `when` overrides that apply to a trial with these values (later conditions win)."""
    out: dict[str, Any] = {}
    for cond in spec.when:
        if all(overrides.get(k) in (v if isinstance(v, list) else [v]) for k, v in cond.match.items()):
            out.update(cond.set)
    return out


def _value(v: Any) -> str:
    """A value as it reads in a run name."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_value(x) for x in v) + "]"
    return str(v)


def trial_config(spec: Sweep, overrides: dict[str, Any], cli: list[str]) -> Config:
    """A trial's config: base recipe <- sweep overrides <- the trial's values <- its conditional
    overrides <- the command line (merged as values; only the command line is text)."""
    layers = [{"recipe": spec.recipe}, spec.overrides, overrides, conditional(spec, overrides)]
    try:
        return load_config(cli, base=layers)
    except ConfigError as e:
        what = f"trial {json.dumps(overrides)}" if overrides else "its base"
        raise ConfigError(f"sweep '{spec.name}', {what}: {e}") from None


def validate(spec: Sweep, cli: list[str]) -> list[Config]:
    """Resolve every trial of the grid (with a representative of each `space` axis) -> their configs."""
    varied = varied_keys(spec)
    for arg in cli:
        key = arg.partition("=")[0]
        if key in varied:
            raise ConfigError(f"'{arg}' on the command line would give every trial of sweep '{spec.name}' the same "
                              f"'{key}', which is what the sweep varies. Drop it, or edit the sweep file.")
    rep = representative(spec)
    return [trial_config(spec, {**p, **rep}, cli) for p in points(spec)]


def identity(spec: Sweep, cli: list[str]) -> str:
    """`<name>-<hash>`: the same file contents and command line -> the same sweep (resumed)."""
    canonical = json.dumps({"sweep": OmegaConf.to_container(OmegaConf.structured(spec)), "cli": list(cli)},
                           sort_keys=True, default=str)
    return f"{spec.name}-{hashlib.sha1(canonical.encode()).hexdigest()[:8]}"


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else _value(v)


# What a trial's title always shows, in this order; its other overrides follow as key-value.
TITLE_KEYS = ("arch", "model.shortcut", "run.seed")


def trial_title(cfg: Config, overrides: dict[str, Any]) -> str:
    """The name the MLflow UI lists a trial by, so a sweep's children read like the paper's tables:
    `plain56-A-seed0`, then what else the trial varies (`resnet20-A-seed0-lr0.05`). run.name stays the
    unique `run_name` (it also names the trial's directory and finds its run again)."""
    from raysnet.models import get_arch

    shortcut = cfg.model.shortcut or get_arch(cfg.arch).default_shortcut
    rest = [f"{k.rpartition('.')[2]}{_short(v)}" for k, v in overrides.items() if k not in TITLE_KEYS]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join([cfg.arch, shortcut, f"seed{cfg.run.seed}", *rest]))


def run_name(sweep_id: str, spec: Sweep, overrides: dict[str, Any]) -> str:
    """A trial's run.name, the same on every rerun: `<sweep>-<its values>-<hash>`."""
    parts = [_short(v) if k == "arch" else f"{k.rpartition('.')[2]}{_short(v)}" for k, v in overrides.items()]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(parts))[:60].strip("-_")
    digest = hashlib.sha1(json.dumps([sweep_id, overrides], sort_keys=True, default=str).encode()).hexdigest()[:8]
    return "-".join(p for p in (spec.name, slug, digest) if p)
