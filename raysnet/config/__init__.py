"""Resolve a `Config` from recipe files and `key=value` overrides (OmegaConf does the parsing).

Grammar, as in Hydra's config groups:
  recipe=NAME      picks raysnet/recipes/NAME.yaml (default: finetune with model.init, else imagenet-paper for
                   ImageNet depths, else digits),
                   or a YAML recipe of your own (recipe=path/to/mine.yaml; its base: may name a built-in one)
  data=NAME        picks raysnet/recipes/data/NAME.yaml, or a YAML file of your own (data=path/to/mine.yaml)
  data.root=DIR    sets a field of the selected dataset recipe; likewise every other dotted key

Code passes its overrides as values, not strings: `load_config(base=[{"optim.lr": 0.05}])`.
`data.root` is made absolute here, once; every other module reads it as it is.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from raysnet.config.schema import Config, DataConfig, ModelConfig, OptimConfig, RunConfig, TrackingConfig, worker_range
from raysnet.errors import ConfigError, from_omegaconf
from raysnet.models import get_arch, list_models

__all__ = [
    "Config", "ConfigError", "DataConfig", "ModelConfig", "OptimConfig", "RunConfig", "TrackingConfig",
    "check_run_name", "data_root", "flatten", "freeze_stages", "from_dict", "from_yaml", "load_config", "recipes",
    "resolve_root", "to_dict", "to_yaml",
]

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
GROUPS = ("recipe", "data")


def recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def datasets() -> list[str]:
    return sorted(p.stem for p in (RECIPES / "data").glob("*.yaml"))


def _valid_keys(node: Any = Config, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(node):
        key = prefix + f.name
        keys.append(key)
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            keys += _valid_keys(f.default_factory, key + ".")
    return keys


def _text_keys(node: Any = Config, prefix: str = "") -> set[str]:
    """Dotted keys whose type is plain `str` (annotations are strings under `from __future__`)."""
    keys = set()
    for f in dataclasses.fields(node):
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            keys |= _text_keys(f.default_factory, f"{prefix}{f.name}.")
        elif f.type in ("str", str):
            keys.add(prefix + f.name)
    return keys


def _load_yaml(path: Path, what: str) -> DictConfig:
    try:
        node = OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(f"{what} file '{path}' does not exist.") from None
    except Exception as e:  # a YAML syntax error: name the file, keep the parser's words
        raise ConfigError(f"{what} file '{path}' is not valid YAML: {e}") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{what} file '{path}' must hold a mapping of keys to values.")
    return node


def _recipe(name: str, seen: tuple[str, ...] = ()) -> DictConfig:
    """A recipe (a built-in name, or a YAML file of one's own, as for data=) with its `base:` chain
    merged underneath it (child wins)."""
    own = name.endswith((".yaml", ".yml")) or Path(name).expanduser().is_file()
    if not own and name not in recipes():
        raise ConfigError(f"unknown recipe '{name}'; valid recipes are: {', '.join(recipes())} "
                          f"(files in {RECIPES}), or the path of a YAML recipe of your own.")
    if name in seen:
        raise ConfigError(f"recipe '{name}' inherits from itself through 'base:' ({' -> '.join(seen + (name,))}).")
    node = _load_yaml(Path(name).expanduser() if own else RECIPES / f"{name}.yaml", "recipe")
    base = node.pop("base", None)
    return OmegaConf.merge(_recipe(base, seen + (name,)), node) if base else node


def _data_recipe(name: str) -> DictConfig:
    path = Path(name).expanduser()
    if name.endswith((".yaml", ".yml")) or path.is_file():
        node = _load_yaml(path, "dataset recipe")
        node.setdefault("name", path.stem)
        return node
    if name not in datasets():
        raise ConfigError(f"unknown dataset '{name}' for key 'data'; valid datasets are: {', '.join(datasets())}, "
                          "or the path of a YAML dataset recipe of your own.")
    return _load_yaml(RECIPES / "data" / f"{name}.yaml", "dataset recipe")


def data_root(data: DataConfig) -> str:
    """Where a dataset lives when `data.root` is not given."""
    base = os.environ.get("RAYSNET_DATA") or Path.home() / ".cache" / "raysnet" / "data"
    return str(Path(base) / data.name)


def _split(args: list[str]) -> tuple[dict[str, str], list[str]]:
    groups, overrides = {}, []
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq or not key:
            raise ConfigError(f"cannot read argument '{arg}': arguments are key=value, e.g. arch=resnet56 "
                              "or optim.lr=0.05.")
        if key in GROUPS:
            groups[key] = value
        else:
            overrides.append(arg)
    return groups, overrides


def _from_args(overrides: list[str]) -> DictConfig:
    """`key=value` strings as a node; text keys take the value as typed (YAML would read
    run.name=007 as the number 7)."""
    text = _text_keys()
    try:
        node = OmegaConf.from_dotlist([a for a in overrides if a.partition("=")[0] not in text])
        for arg in overrides:
            key, _, value = arg.partition("=")
            if key in text:
                OmegaConf.update(node, key, value, force_add=True)
    except OmegaConfBaseException as e:
        raise from_omegaconf(e, f"overrides {overrides}", _valid_keys()) from None
    return node


def _from_mapping(mapping: Mapping[str, Any]) -> tuple[dict[str, str], DictConfig]:
    """(groups, node) from {dotted key: typed value}: the values are merged as they are, never printed."""
    groups, node = {}, OmegaConf.create()
    try:
        for key, value in mapping.items():
            if key in GROUPS and isinstance(value, str):
                groups[key] = value
            else:
                OmegaConf.update(node, key, value, force_add=True)
    except OmegaConfBaseException as e:
        raise from_omegaconf(e, f"overrides {dict(mapping)}", _valid_keys()) from None
    return groups, node


# The boolean data.colour once did brightness/contrast/saturation jitter under a name that
# promised the paper's colour augmentation; it became two keys that say what they do, and the old
# key is refused with this message rather than silently meaning something else.
OLD_COLOUR = ("'data.colour' was replaced by two keys that say what they do: data.pca_lighting=0.1 (AlexNet's "
              "PCA lighting, the colour augmentation paper §3.4 cites) and data.colour_jitter=0.4 (brightness, "
              "contrast and saturation, what colour=true did); 0 turns either off.")


def _merge(base: DictConfig, update: Any, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, update)
    except ConfigKeyError as e:
        if str(e.full_key).endswith("colour"):
            raise ConfigError(f"{where}: {OLD_COLOUR}") from None
        err = from_omegaconf(e, where, _valid_keys())
        raise ConfigError(f"{err} Print every key and its value with --print-config.") from None
    except ValidationError as e:
        if not e.full_key:  # a value for a whole section (model=3): OmegaConf names no key
            e.full_key = next((k for k, v in update.items() if isinstance(base.get(k), DictConfig)
                               and not isinstance(v, (dict, DictConfig))), "?")
        err = from_omegaconf(e, where)
        choices = f" Valid architectures: {', '.join(list_models())}." if e.full_key == "arch" else ""
        raise ConfigError(f"{err}{choices}") from None
    except OmegaConfBaseException as e:
        raise from_omegaconf(e, where) from None


def resolve_root(root: str) -> str:
    """A dataset directory as every process reads it: absolute (~ expanded, relative to the working
    directory of the process that loads the config); a URI (s3://...) stays as given."""
    return root if "://" in root else os.path.abspath(os.path.expanduser(root))


def _default_recipe(layers: list[tuple[str, DictConfig]]) -> str:
    """The recipe follows what is asked unless named: starting from existing weights (model.init) is
    a fine-tune, with its short schedule; the paper trains ImageNet depths on ImageNet, and
    everything else starts from the embedded digits quickstart."""
    init = next((node.model.init for _, node in reversed(layers)
                 if isinstance(node.get("model"), DictConfig) and "init" in node.model), "")
    if init:
        return "finetune"
    arch = next((str(node.arch) for _, node in reversed(layers) if "arch" in node), "")
    return "imagenet-paper" if arch in list_models() and get_arch(arch).family == "imagenet" else "digits"


def _with_recipes(groups: dict[str, str], layers: list[tuple[str, DictConfig]]) -> DictConfig:
    """Schema defaults <- the recipe (and its bases) <- its dataset recipe."""
    name = groups.get("recipe") or _default_recipe(layers)
    recipe = _recipe(name)
    data = groups.get("data") or recipe.pop("data", None) or "digits"
    if not isinstance(data, str):
        raise ConfigError(f"recipe '{name}': 'data' must name a dataset recipe, not a mapping.")
    recipe.pop("data", None)
    cfg = _merge(OmegaConf.structured(Config), recipe, f"recipe {name}")
    return _merge(cfg, {"recipe": name, "data": _data_recipe(data)}, f"dataset recipe {data}")


def load_config(args: Sequence[str] = (), *, base: Sequence[Mapping[str, Any]] = ()) -> Config:
    """Schema defaults <- recipe (and its bases) <- dataset recipe <- each of `base` <- `args`.

    `args`: the command line's `key=value` strings. `base`: mappings of dotted keys to typed values,
    e.g. [{"recipe": "cifar-paper"}, {"run.workers": 2, "optim.lr": 0.05}], merged as values in
    order. The groups `recipe` and `data` may be set in any layer; the last one wins.
    """
    groups: dict[str, str] = {}
    layers: list[tuple[str, DictConfig]] = []
    for mapping in base:
        named, node = _from_mapping(mapping)
        groups.update(named)
        layers.append(("overrides", node))
    named, overrides = _split(list(args))
    groups.update(named)
    layers.append(("command line", _from_args(overrides)))

    cfg = _with_recipes(groups, layers)
    for where, node in layers:
        cfg = _merge(cfg, node, where)
    # Resolved here, once, so every worker and every later reader sees the same directory.
    cfg = _merge(cfg, {"data": {"root": resolve_root(cfg.data.root or data_root(cfg.data))}}, "data.root")
    try:
        config: Config = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:  # a required value left missing
        raise from_omegaconf(e, "the resolved configuration", _valid_keys()) from None
    validate(config)
    return config


# run.name is a directory inside run.storage and a value inside MLflow filter strings
# (tracking.find_run): one path component, no quotes, no whitespace, so that a name can neither
# escape run.storage nor change the meaning of a filter.
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
RUN_NAME_MAX = 128


def check_run_name(name: str, hint: str = "Leave it empty for a generated name.") -> None:
    """A ConfigError unless `name` is one safe directory name (empty: generated later)."""
    if not name or (RUN_NAME.fullmatch(name) and ".." not in name and len(name) <= RUN_NAME_MAX):
        return
    raise ConfigError(f"bad value for 'run.name': {name!r}. Expected one directory name inside run.storage, at most "
                      f"{RUN_NAME_MAX} characters of letters, digits, '.', '_' and '-', starting with a letter or "
                      "digit: no '/', '\\', '..', quotes or whitespace (it is also matched in MLflow searches). "
                      f"{hint}")


def validate(cfg: Config) -> None:
    if cfg.arch not in list_models():
        close = difflib.get_close_matches(cfg.arch, list_models(), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown architecture '{cfg.arch}' for key 'arch'.{hint} "
                          f"Valid architectures: {', '.join(list_models())}.")
    _, high = worker_range(cfg.run.workers)
    positive = {"epochs": cfg.epochs, "batch_size": cfg.batch_size,
                "run.cpus_per_worker": cfg.run.cpus_per_worker, "data.crop": cfg.data.crop,
                "optim.ref_batch_size": cfg.optim.ref_batch_size, "run.eval_every": cfg.run.eval_every,
                # Here rather than in the preflight: it needs no dataset, so --print-config and every
                # sweep trial see it too. Ray must keep the latest checkpoint for a resume.
                "run.keep_checkpoints": cfg.run.keep_checkpoints}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"bad value for '{key}': {value}. Expected an integer of at least 1.")
    if cfg.batch_size < high:
        raise ConfigError(f"bad value for 'batch_size': {cfg.batch_size} is the global batch, split across the "
                          f"workers, and run.workers={cfg.run.workers} may have {high}: each needs at least one "
                          f"sample. Expected batch_size of at least {high}, or fewer run.workers.")
    if not cfg.run.resize_check_s > 0:
        raise ConfigError(f"bad value for 'run.resize_check_s': {cfg.run.resize_check_s}. Expected a positive "
                          "number of seconds between an elastic run's checks for room to grow.")
    if not (cfg.optim.lr > 0 and math.isfinite(cfg.optim.lr)):
        raise ConfigError(f"bad value for 'optim.lr': {cfg.optim.lr}. Expected a positive number.")
    _check_finite(cfg)
    if not all(0 < m < 1 for m in cfg.optim.milestones) or list(cfg.optim.milestones) != sorted(cfg.optim.milestones):
        raise ConfigError(f"bad value for 'optim.milestones': {list(cfg.optim.milestones)}. Expected increasing "
                          "fractions of the run between 0 and 1, e.g. [0.5,0.75] for the paper's CIFAR steps.")
    for key in ("pca_lighting", "colour_jitter"):
        if not 0 <= getattr(cfg.data, key) <= 1:
            raise ConfigError(f"bad value for 'data.{key}': {getattr(cfg.data, key)}. Expected a strength from 0 (off) "
                              "to 1: AlexNet's PCA lighting is 0.1, fb.resnet.torch's colour jitter 0.4.")
    if cfg.data.scale_range[0] > cfg.data.scale_range[1]:
        raise ConfigError(f"bad value for 'data.scale_range': {list(cfg.data.scale_range)}. Expected [min, max].")
    gpus = cfg.run.gpus_per_worker
    if gpus is not None and (gpus < 0 or (gpus > 1 and gpus != int(gpus))):
        raise ConfigError(f"bad value for 'run.gpus_per_worker': {gpus}. Expected 0 or more: a fraction of one GPU "
                          "(e.g. 0.2, five workers sharing it) or a whole number of GPUs.")
    check_run_name(cfg.run.name)
    _validate_watching(cfg)
    _validate_finetune(cfg)


def freeze_stages(arch: str) -> list[str]:
    """What model.freeze may name for `arch`, in the order the input meets them: the stem (conv1,
    bn1), then the stages layer1.. (the module names of raysnet.models.resnet)."""
    return ["stem", *(f"layer{i + 1}" for i in range(len(get_arch(arch).blocks)))]


def _validate_finetune(cfg: Config) -> None:
    """model.init, model.init_lr_scale and model.freeze (the source itself is read by the preflight)."""
    scale = cfg.model.init_lr_scale
    if not 0 < scale <= 1:
        raise ConfigError(f"bad value for 'model.init_lr_scale': {scale}. Expected a fraction of optim.lr above 0 "
                          "and at most 1 for the loaded layers (0.1: a tenth; 1: the same lr as the fresh ones).")
    if not cfg.model.freeze:
        return
    stages = freeze_stages(cfg.arch)
    if cfg.model.freeze not in stages:
        raise ConfigError(f"bad value for 'model.freeze': {cfg.model.freeze!r}. Expected one of {', '.join(stages)} "
                          f"(the stages of {cfg.arch}; everything up to and including it is frozen), or empty.")
    # Frozen random weights are never what is meant: the stages frozen are those model.init loads.
    if not cfg.model.init:
        raise ConfigError(f"model.freeze={cfg.model.freeze} freezes weights that model.init loads, but model.init is "
                          "empty, so it would freeze random ones. Give model.init=SOURCE (a checkpoint, "
                          "models:/NAME/VERSION, runs:/RUN_ID/model), or leave model.freeze empty.")


def _check_finite(cfg: Config) -> None:
    """nan passes every comparison above, and inf most of them: no float key may hold either."""
    for key, value in flatten(cfg).items():
        values = value if isinstance(value, list | tuple) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            raise ConfigError(f"bad value for '{key}': {list(values) if len(values) > 1 else value}. Expected a "
                              "finite number.")


def _validate_watching(cfg: Config) -> None:
    """The keys of what a run shows while it runs: progress lines, step metrics, system metrics, registry."""
    cadences = {"run.progress_s": cfg.run.progress_s, "tracking.step_every": cfg.tracking.step_every or 0,
                "tracking.system_metrics_s": cfg.tracking.system_metrics_s}
    for key, value in cadences.items():
        if value < 0:
            raise ConfigError(f"bad value for '{key}': {value}. Expected 0 (off) or more.")
    if cfg.tracking.register and not cfg.tracking.log_model:
        raise ConfigError(f"tracking.register={cfg.tracking.register} registers the model that tracking.log_model "
                          "logs, but tracking.log_model=false. Set tracking.log_model=true, or leave "
                          "tracking.register empty.")


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict: what travels to Ray workers and into checkpoints."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def from_dict(d: Mapping[str, Any]) -> Config:
    """The inverse of `to_dict`; also reads the configs of checkpoints written while `data.colour` existed."""
    data = d.get("data")
    if isinstance(data, Mapping) and "colour" in data:  # colour=true was colour_jitter=0.4
        data = {k: v for k, v in data.items() if k != "colour"} | {"colour_jitter": 0.4 if data["colour"] else 0.0}
        d = {**d, "data": data}
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), d))


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml(source: str | Path) -> Config:
    """A Config from `to_yaml`'s text (a str) or from a file of it (a Path)."""
    where = f"config file '{source}'" if isinstance(source, Path) else "config text"
    try:
        node = OmegaConf.load(source) if isinstance(source, Path) else OmegaConf.create(source)
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), node))
    except OmegaConfBaseException as e:
        raise from_omegaconf(e, where, _valid_keys()) from None


def flatten(cfg: Config) -> dict[str, Any]:
    """{"optim.lr": 0.1, ...}: MLflow params and Tune's keys."""
    out: dict[str, Any] = {}

    def walk(node: dict, prefix: str) -> None:
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[prefix + k] = v

    walk(to_dict(cfg), "")
    return out
